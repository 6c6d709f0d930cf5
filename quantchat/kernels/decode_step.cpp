// One decode step of a decoder model in a single C++ call: every layer, the final norm and the LM head, for
// B sequences that each add one token (their own position, their own KV-cache slot). The LLaMA layout below;
// the plan's meta switches in the other families' parts: LayerNorm (with bias), no rope (learned positions are
// in the embeddings) or ALiBi slopes in the scores, clamped q/k/v (MPT), per-head q/k RMSNorm, a sliding
// window and local rope tables per layer and norms after attention and MLP (Gemma 3), GeGLU / plain GELU
// MLPs, and the parallel block (Falcon: h += attn(n(h)) + mlp(n'(h)), n' = n in the 7B layout).
//
// The Python model (quantchat/model/transformer.py) runs ~15 torch ops per layer per token; at decode
// their dispatch cost is larger than the arithmetic (SmolLM2-135M: ~450 ops, ~12 ms of a 25 ms
// step on 2 cores). Here the same math runs as plain loops between the packed linear kernels of
// cpu_kernels.cpp, called directly:
//   h = x;  per layer:  a = rmsnorm(h) ; q,k,v = wqkv(a) ; rope(q, k) at pos[b] ; cache[slot b][pos[b]] = k, v
//                       h += wo(attention(q, cache[0 .. pos[b]]))  (grouped-query, optional sliding window)
//                       a = rmsnorm(h) ; g,u = w13(a) ; h += w2(silu(g) * u)
//   logits = head(rmsnorm(h))
// Registered as the custom class torch.classes.quantchat.DecodePlan (built once per model and KV
// cache by quantchat/engine/fused_decode.py). Its meta and tensor lists are laid out as
// quantchat/kernels/defs.py says (the named indices kLayerWo, kLinBias, ... of the generated
// quantchat_defs.h); the math is in decode_math.h and decode_attention.h.
// Float32 activations and norms; the KV cache float32 or float16 (read and written with F16C: half the
// bytes each step reads, which bound batched decode at long contexts); linears: float ([N, K] or transposed [K, N]),
// quantchat's int4 (packed, scales, mins) and int8 (qweight, scales) formats, optional bias.

#include <ATen/core/Tensor.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_kernels.h"
#include "decode_attention.h"
#include "decode_math.h"
#include "quantchat_defs.h"

namespace {

// ------------------------------------------------------------------------------------------------
// the plan
// ------------------------------------------------------------------------------------------------
struct Linear {
  int64_t kind = kFloat, group_size = 0, in_features = 0, out_features = 0;  // kInt8: group_size = kernel path
  // float: weight [N, K] (kFloatT: [K, N]); int4 (kInt4R8: rows interleaved): packed, scales, mins; int8: qweight, scales
  at::Tensor a, b, c, bias;

  at::Tensor operator()(const at::Tensor& x) const {
    at::Tensor y;
    switch (kind) {
      case kInt4: y = quantchat_kernels::int4_linear(x, a, b, c, group_size, in_features, kPathAuto); break;
      case kInt4R8:  // int8-rounded activations (the decode GEMV; see int4r8_linear)
        y = quantchat_kernels::int4r8_linear(x, a, b, c, out_features, group_size, in_features, kR8Q8);
        break;
      case kInt8:  // group_size holds int8_linear's path: kPathGemvI16 = int16-rounded activations (KL ~2e-8 on
                   // the LM head), kPathAuto with QUANTCHAT_NO_Q8
        y = quantchat_kernels::int8_linear(x, a, b, group_size);
        break;
      case kFloatT: y = x.matmul(a); break;
      default: y = x.matmul(a.t()); break;
    }
    if (bias.numel() > 0) y.add_(bias);
    return y;
  }
};

struct Layer {
  int64_t window = 0;
  bool local = false;
  // empty where the model has none: the norm biases, q/k norms, the norms after attention and after the MLP
  at::Tensor attn_norm, attn_norm_bias, q_norm, k_norm, post_attn_norm, ffn_norm, ffn_norm_bias, post_ffn_norm;
  at::Tensor k_cache, v_cache;
  Linear wqkv, wo, w13, w2;
};

void check_float(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), "DecodePlan: ", what,
              " must be a contiguous float32 CPU tensor");
}

// an optional float vector of n entries: empty, or contiguous float32 of that size
void check_optional(const at::Tensor& t, int64_t n, const char* what) {
  if (t.numel() == 0) return;
  check_float(t, what);
  TORCH_CHECK(t.numel() == n, "DecodePlan: ", what, " has ", t.numel(), " entries, not ", n);
}

inline const float* ptr_or_null(const at::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

struct DecodePlan : torch::CustomClassHolder {
  int64_t n_layer, dim, n_head, n_kv, hd, hidden, norm_kind, act, max_batch, max_seq;
  bool gated, parallel, shared_norm, rope_on;
  float eps, attn_scale, clip_qkv;
  std::vector<Layer> layers;
  at::Tensor norm, norm_bias, rope_cos, rope_sin, rope_cos_local, rope_sin_local, alibi;
  Linear head;

  DecodePlan(std::vector<int64_t> meta, std::vector<double> floats, std::vector<at::Tensor> t) {
    TORCH_CHECK(static_cast<int64_t>(meta.size()) >= kPlanMeta, "DecodePlan: short meta");
    TORCH_CHECK(static_cast<int64_t>(floats.size()) == kPlanFloats, "DecodePlan: ", kPlanFloats, " floats expected");
    n_layer = meta[kMetaNLayer], dim = meta[kMetaDim], n_head = meta[kMetaNHead], n_kv = meta[kMetaNKvHead],
    hd = meta[kMetaHeadDim], hidden = meta[kMetaHidden], norm_kind = meta[kMetaNorm], act = meta[kMetaActivation];
    gated = meta[kMetaGated] != 0, parallel = meta[kMetaParallel] != 0, shared_norm = meta[kMetaSharedNorm] != 0;
    const int64_t position = meta[kMetaPosition];
    eps = static_cast<float>(floats[kFloatsNormEps]), attn_scale = static_cast<float>(floats[kFloatsAttnScale]);
    clip_qkv = static_cast<float>(floats[kFloatsClipQkv]);
    TORCH_CHECK(n_layer > 0 && n_kv > 0 && n_head % n_kv == 0 && hd % 2 == 0, "DecodePlan: bad shape meta");
    TORCH_CHECK(norm_kind == 0 || norm_kind == 1, "DecodePlan: unknown norm ", norm_kind);
    TORCH_CHECK(act >= kSilu && act <= kGeluTanh, "DecodePlan: unknown activation ", act);
    TORCH_CHECK(position >= 0 && position <= 2, "DecodePlan: unknown position kind ", position);
    rope_on = position == 0;
    TORCH_CHECK(static_cast<int64_t>(meta.size()) == kPlanMeta + kLayerMeta * n_layer + kFinalMeta,
                "DecodePlan: meta size");
    TORCH_CHECK(static_cast<int64_t>(t.size()) == kLayerTensors * n_layer + kFinalTensors,
                "DecodePlan: tensor count");
    // a linear: its tensors from t[ti], its numbers from meta[mi]
    auto linear = [&](int64_t ti, int64_t mi) {
      Linear l;
      l.kind = meta[mi + kLinKind], l.group_size = meta[mi + kLinGroupSize];
      l.in_features = meta[mi + kLinInFeatures], l.out_features = meta[mi + kLinOutFeatures];
      l.a = t[ti + kLinA], l.b = t[ti + kLinB], l.c = t[ti + kLinC], l.bias = t[ti + kLinBias];
      TORCH_CHECK(l.kind >= 0 && l.kind <= kLinearKindLast, "DecodePlan: unknown linear kind ", l.kind);
      if (l.kind == kFloat || l.kind == kFloatT) check_float(l.a, "a float weight");
      if (l.bias.numel() > 0) check_float(l.bias, "a bias");
      return l;
    };
    for (int64_t i = 0; i < n_layer; ++i) {
      const int64_t ti = kLayerTensors * i, mi = kPlanMeta + kLayerMeta * i;
      Layer L;
      L.window = meta[mi + kLayerMetaWindow];
      L.local = meta[mi + kLayerMetaLocal] != 0;
      TORCH_CHECK(L.window >= 0, "DecodePlan: negative sliding window");
      L.attn_norm = t[ti + kLayerAttnNorm];
      L.attn_norm_bias = t[ti + kLayerAttnNormBias];
      L.wqkv = linear(ti + kLayerWqkv, mi + kLayerMetaWqkv);
      L.q_norm = t[ti + kLayerQNorm];
      L.k_norm = t[ti + kLayerKNorm];
      L.wo = linear(ti + kLayerWo, mi + kLayerMetaWo);
      L.post_attn_norm = t[ti + kLayerPostAttnNorm];
      L.ffn_norm = t[ti + kLayerFfnNorm];
      L.ffn_norm_bias = t[ti + kLayerFfnNormBias];
      L.w13 = linear(ti + kLayerW13, mi + kLayerMetaW13);
      L.w2 = linear(ti + kLayerW2, mi + kLayerMetaW2);
      L.post_ffn_norm = t[ti + kLayerPostFfnNorm];
      L.k_cache = t[ti + kLayerKCache];
      L.v_cache = t[ti + kLayerVCache];
      check_float(L.attn_norm, "a norm weight");
      TORCH_CHECK(L.attn_norm.numel() == dim, "DecodePlan: a norm weight must have dim entries");
      if (!(parallel && shared_norm)) {
        check_float(L.ffn_norm, "a norm weight");
        TORCH_CHECK(L.ffn_norm.numel() == dim, "DecodePlan: a norm weight must have dim entries");
      }
      for (const at::Tensor* n : {&L.attn_norm_bias, &L.ffn_norm_bias, &L.post_attn_norm, &L.post_ffn_norm})
        check_optional(*n, dim, "a norm weight or bias");
      check_optional(L.q_norm, hd, "q_norm");
      check_optional(L.k_norm, hd, "k_norm");
      TORCH_CHECK((L.q_norm.numel() == 0) == (L.k_norm.numel() == 0), "DecodePlan: q_norm and k_norm go together");
      TORCH_CHECK((L.post_attn_norm.numel() == 0) == (L.post_ffn_norm.numel() == 0),
                  "DecodePlan: post_attn_norm and post_ffn_norm go together");
      TORCH_CHECK(!parallel || L.post_attn_norm.numel() == 0, "DecodePlan: a parallel block has no post norms");
      const at::ScalarType ct = layers.empty() ? L.k_cache.scalar_type() : layers[0].k_cache.scalar_type();
      for (const at::Tensor* c : {&L.k_cache, &L.v_cache})
        TORCH_CHECK(c->device().is_cpu() && c->is_contiguous() && c->scalar_type() == ct &&
                        (ct == at::kFloat || ct == at::kHalf),
                    "DecodePlan: the KV cache must be contiguous float32 or float16 CPU tensors, one dtype in all layers");
      TORCH_CHECK(L.k_cache.dim() == 4 && L.k_cache.size(1) == n_kv && L.k_cache.size(3) == hd &&
                      L.v_cache.sizes() == L.k_cache.sizes(),
                  "DecodePlan: KV cache must be [max_batch, n_kv_head, max_seq_len, head_dim]");
      layers.push_back(std::move(L));
    }
    const int64_t ti = kLayerTensors * n_layer, mi = kPlanMeta + kLayerMeta * n_layer;
    norm = t[ti + kFinalNorm];
    norm_bias = t[ti + kFinalNormBias];
    check_float(norm, "the final norm weight");
    check_optional(norm_bias, dim, "the final norm bias");
    head = linear(ti + kFinalHead, mi + kFinalMetaHead);
    rope_cos = t[ti + kFinalRopeCos];
    rope_sin = t[ti + kFinalRopeSin];
    rope_cos_local = t[ti + kFinalRopeCosLocal];
    rope_sin_local = t[ti + kFinalRopeSinLocal];
    alibi = t[ti + kFinalAlibi];
    max_seq = layers[0].k_cache.size(2);
    if (rope_on) {
      bool any_local = false;
      for (const Layer& L : layers) any_local = any_local || L.local;
      for (int k = 0; k < (any_local ? 2 : 1); ++k) {
        const at::Tensor& c = k ? rope_cos_local : rope_cos;
        const at::Tensor& s = k ? rope_sin_local : rope_sin;
        check_float(c, "rope_cos");
        check_float(s, "rope_sin");
        TORCH_CHECK(c.dim() == 2 && c.size(1) == hd && s.sizes() == c.sizes(),
                    "DecodePlan: rope tables must be [length, head_dim]");
        max_seq = std::min(max_seq, c.size(0));
      }
    }
    TORCH_CHECK((position == 2) == (alibi.numel() > 0), "DecodePlan: ALiBi slopes go with position alibi");
    check_optional(alibi, n_head, "the ALiBi slopes");
    max_batch = layers[0].k_cache.size(0);
  }

  // out = norm(x) (RMSNorm, or LayerNorm with an optional bias), [B, dim]
  void normalize(const float* x, const at::Tensor& w, const at::Tensor& bias, float* out, int64_t B) const {
    if (norm_kind == 1) layernorm(x, w.data_ptr<float>(), ptr_or_null(bias), out, B, dim, eps);
    else rmsnorm(x, w.data_ptr<float>(), out, B, dim, eps);
  }

  // y = post_norm(y) in place where the layer has one (Gemma's norms after attention and after the MLP)
  at::Tensor post(const at::Tensor& y, const at::Tensor& w, int64_t B) const {
    if (w.numel() == 0) return y;
    at::Tensor o = y.new_empty({B, dim});
    rmsnorm(y.contiguous().data_ptr<float>(), w.data_ptr<float>(), o.data_ptr<float>(), B, dim, eps);
    return o;
  }

  at::Tensor run(const at::Tensor& x_in, const at::Tensor& pos_in, int64_t first_slot) {
    TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == dim, "DecodePlan.run: x must be [B, ", dim, "]");
    TORCH_CHECK(pos_in.dim() == 1 && pos_in.size(0) == x_in.size(0), "DecodePlan.run: pos must be [B]");
    const int64_t B = x_in.size(0);
    TORCH_CHECK(first_slot >= 0 && first_slot + B <= max_batch, "DecodePlan.run: slots ", first_slot, "..",
                first_slot + B - 1, " outside the KV cache's ", max_batch);
    const at::Tensor pos_t = pos_in.to(at::kLong).contiguous();
    const int64_t* pos = pos_t.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(pos[b] >= 0 && pos[b] < max_seq, "DecodePlan.run: position ", pos[b], " outside [0, ", max_seq,
                  ")");
    at::Tensor h = x_in.to(at::kFloat).contiguous().clone();
    at::Tensor a = h.new_empty({B, dim});
    at::Tensor att = h.new_empty({B, n_head * hd});
    at::Tensor act_buf = h.new_empty({B, hidden});
    float* hp = h.data_ptr<float>();
    float* ap = a.data_ptr<float>();
    const int64_t qs = n_head * hd;
    const bool half_cache = layers[0].k_cache.scalar_type() == at::kHalf;
    for (const Layer& L : layers) {
      normalize(hp, L.attn_norm, L.attn_norm_bias, ap, B);
      at::Tensor qkv = L.wqkv(a);  // [B, (n_head + 2 n_kv) * hd]
      float* qp = qkv.data_ptr<float>();
      const int64_t ld = qkv.stride(0);
      if (clip_qkv > 0.0f) clamp_rows(qp, ld, B, qs + 2 * n_kv * hd, clip_qkv);
      const float* cos = rope_on ? (L.local ? rope_cos_local : rope_cos).data_ptr<float>() : nullptr;
      const float* sin = rope_on ? (L.local ? rope_sin_local : rope_sin).data_ptr<float>() : nullptr;
      for (int64_t b = 0; b < B; ++b) {
        float* row = qp + b * ld;
        if (L.q_norm.numel()) {  // RMSNorm over each head of q and of k
          rmsnorm(row, L.q_norm.data_ptr<float>(), row, n_head, hd, eps);
          rmsnorm(row + qs, L.k_norm.data_ptr<float>(), row + qs, n_kv, hd, eps);
        }
        if (rope_on) {
          const int64_t p = pos[b];
          rope(row, n_head, hd, cos + p * hd, sin + p * hd);
          rope(row + qs, n_kv, hd, cos + p * hd, sin + p * hd);
        }
      }
      const AttentionShape shape{n_head, n_kv, hd, L.window, attn_scale, ptr_or_null(alibi)};
      float* op = att.data_ptr<float>();
      if (half_cache) cache_and_attend<uint16_t>(shape, qp, ld, op, L.k_cache, L.v_cache, pos, first_slot, B);
      else cache_and_attend<float>(shape, qp, ld, op, L.k_cache, L.v_cache, pos, first_slot, B);
      at::Tensor attn_out = post(L.wo(att), L.post_attn_norm, B);
      if (!parallel) {
        add_rows(hp, attn_out, B, dim);
        normalize(hp, L.ffn_norm, L.ffn_norm_bias, ap, B);
      } else if (!shared_norm) {  // the MLP reads the block's input through its own norm
        normalize(hp, L.ffn_norm, L.ffn_norm_bias, ap, B);
      }  // shared: the MLP reads the attention's normed input, still in a
      activate(L.w13(a), act_buf.data_ptr<float>(), B, hidden, act, gated);
      at::Tensor mlp_out = post(L.w2(act_buf), L.post_ffn_norm, B);
      if (parallel) add_rows(hp, attn_out, B, dim);
      add_rows(hp, mlp_out, B, dim);
    }
    normalize(hp, norm, norm_bias, ap, B);
    return head(a);
  }
};

}  // namespace

#ifndef QC_NS
#define QC_NS quantchat
#endif

TORCH_LIBRARY_FRAGMENT(QC_NS, m) {
  m.class_<DecodePlan>("DecodePlan")
      .def(torch::init<std::vector<int64_t>, std::vector<double>, std::vector<at::Tensor>>())
      .def("run", &DecodePlan::run);
}
