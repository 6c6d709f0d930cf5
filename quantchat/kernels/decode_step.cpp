// One decode step of a LLaMA-family model in a single C++ call: every layer, the final norm and the
// LM head, for B sequences that each add one token (their own position, their own KV-cache slot).
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
  at::Tensor attn_norm, ffn_norm, k_cache, v_cache;
  Linear wqkv, wo, w13, w2;
};

void check_float(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), "DecodePlan: ", what,
              " must be a contiguous float32 CPU tensor");
}

struct DecodePlan : torch::CustomClassHolder {
  int64_t n_layer, dim, n_head, n_kv, hd, window, hidden, max_batch, max_seq;
  double eps;
  std::vector<Layer> layers;
  at::Tensor norm, rope_cos, rope_sin;
  Linear head;

  DecodePlan(std::vector<int64_t> meta, double eps_, std::vector<at::Tensor> t) : eps(eps_) {
    TORCH_CHECK(static_cast<int64_t>(meta.size()) >= kPlanMeta, "DecodePlan: short meta");
    n_layer = meta[kMetaNLayer], dim = meta[kMetaDim], n_head = meta[kMetaNHead], n_kv = meta[kMetaNKvHead],
    hd = meta[kMetaHeadDim], window = meta[kMetaSlidingWindow], hidden = meta[kMetaHidden];
    TORCH_CHECK(n_layer > 0 && n_kv > 0 && n_head % n_kv == 0 && hd % 2 == 0, "DecodePlan: bad shape meta");
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
      L.attn_norm = t[ti + kLayerAttnNorm];
      L.wqkv = linear(ti + kLayerWqkv, mi + kLayerMetaWqkv);
      L.wo = linear(ti + kLayerWo, mi + kLayerMetaWo);
      L.ffn_norm = t[ti + kLayerFfnNorm];
      L.w13 = linear(ti + kLayerW13, mi + kLayerMetaW13);
      L.w2 = linear(ti + kLayerW2, mi + kLayerMetaW2);
      L.k_cache = t[ti + kLayerKCache];
      L.v_cache = t[ti + kLayerVCache];
      check_float(L.attn_norm, "a norm weight");
      check_float(L.ffn_norm, "a norm weight");
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
    check_float(norm, "the final norm weight");
    head = linear(ti + kFinalHead, mi + kFinalMetaHead);
    rope_cos = t[ti + kFinalRopeCos];
    rope_sin = t[ti + kFinalRopeSin];
    check_float(rope_cos, "rope_cos");
    check_float(rope_sin, "rope_sin");
    TORCH_CHECK(rope_cos.dim() == 2 && rope_cos.size(1) == hd && rope_sin.sizes() == rope_cos.sizes(),
                "DecodePlan: rope tables must be [length, head_dim]");
    max_batch = layers[0].k_cache.size(0);
    max_seq = std::min(layers[0].k_cache.size(2), rope_cos.size(0));
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
    at::Tensor act = h.new_empty({B, hidden});
    float* hp = h.data_ptr<float>();
    float* ap = a.data_ptr<float>();
    const float e = static_cast<float>(eps);
    const int64_t qs = n_head * hd;
    const float* cos = rope_cos.data_ptr<float>();
    const float* sin = rope_sin.data_ptr<float>();
    const bool half_cache = layers[0].k_cache.scalar_type() == at::kHalf;
    const AttentionShape shape{n_head, n_kv, hd, window};
    for (const Layer& L : layers) {
      rmsnorm(hp, L.attn_norm.data_ptr<float>(), ap, B, dim, e);
      at::Tensor qkv = L.wqkv(a);  // [B, (n_head + 2 n_kv) * hd]
      float* qp = qkv.data_ptr<float>();
      const int64_t ld = qkv.stride(0);
      for (int64_t b = 0; b < B; ++b) {
        float* row = qp + b * ld;
        const int64_t p = pos[b];
        rope(row, n_head, hd, cos + p * hd, sin + p * hd);
        rope(row + qs, n_kv, hd, cos + p * hd, sin + p * hd);
      }
      float* op = att.data_ptr<float>();
      if (half_cache) cache_and_attend<uint16_t>(shape, qp, ld, op, L.k_cache, L.v_cache, pos, first_slot, B);
      else cache_and_attend<float>(shape, qp, ld, op, L.k_cache, L.v_cache, pos, first_slot, B);
      add_rows(hp, L.wo(att), B, dim);
      rmsnorm(hp, L.ffn_norm.data_ptr<float>(), ap, B, dim, e);
      silu_mul(L.w13(a), act.data_ptr<float>(), B, hidden);
      add_rows(hp, L.w2(act), B, dim);
    }
    rmsnorm(hp, norm.data_ptr<float>(), ap, B, dim, e);
    return head(a);
  }
};

}  // namespace

#ifndef QC_NS
#define QC_NS quantchat
#endif

TORCH_LIBRARY_FRAGMENT(QC_NS, m) {
  m.class_<DecodePlan>("DecodePlan")
      .def(torch::init<std::vector<int64_t>, double, std::vector<at::Tensor>>())
      .def("run", &DecodePlan::run);
}
