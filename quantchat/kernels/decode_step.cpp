// One decode step of a LLaMA-family model in a single C++ call: every layer, the final norm and the
// LM head, for B sequences that each add one token (their own position, their own KV-cache slot).
//
// The Python model (quantchat/model/llama.py) runs ~15 torch ops per layer per token; at decode
// their dispatch cost is larger than the arithmetic (SmolLM2-135M: ~450 ops, ~12 ms of a 25 ms
// step on 2 cores). Here the same math runs as plain loops between the packed linear kernels of
// cpu_kernels.cpp, called directly:
//   h = x;  per layer:  a = rmsnorm(h) ; q,k,v = wqkv(a) ; rope(q, k) at pos[b] ; cache[slot b][pos[b]] = k, v
//                       h += wo(attention(q, cache[0 .. pos[b]]))  (grouped-query, optional sliding window)
//                       a = rmsnorm(h) ; g,u = w13(a) ; h += w2(silu(g) * u)
//   logits = head(rmsnorm(h))
// Registered as the custom class torch.classes.quantchat.DecodePlan (built once per model and KV
// cache by quantchat/engine/fused_decode.py, which documents the tensor order).
// Float32 activations and norms; the KV cache float32 or float16 (read and written with F16C: half the
// bytes each step reads, which bound batched decode at long contexts); linears: float ([N, K] or transposed [K, N]),
// quantchat's int4 (packed, scales, mins) and int8 (qweight, scales) formats, optional bias.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_kernels.h"

namespace {

using quantchat_kernels::dot;
using quantchat_kernels::exp8;
using quantchat_kernels::hsum;
using quantchat_kernels::load1;
using quantchat_kernels::load8;

// ------------------------------------------------------------------------------------------------
// vector math
// ------------------------------------------------------------------------------------------------
inline float exp1(float x) {
  alignas(32) float v[8];
  _mm256_store_ps(v, exp8(_mm256_set1_ps(x)));
  return v[0];
}

// y[i] += a * x[i] (x float32 or float16)
template <typename T>
inline void axpy(float a, const T* x, float* y, int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, load8(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * load1(x + i);
}

// out = x * rsqrt(mean(x^2) + eps) * w, row by row ([B, D])
void rmsnorm(const float* x, const float* w, float* out, int64_t B, int64_t D, float eps) {
  for (int64_t b = 0; b < B; ++b) {
    const float* xr = x + b * D;
    float* o = out + b * D;
    const float r = 1.0f / std::sqrt(dot(xr, xr, D) / static_cast<float>(D) + eps);
    const __m256 rv = _mm256_set1_ps(r);
    int64_t i = 0;
    for (; i + 8 <= D; i += 8)
      _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + i), rv), _mm256_loadu_ps(w + i)));
    for (; i < D; ++i) o[i] = xr[i] * r * w[i];
  }
}

// h[b, :] += y[b, :] (y may have a row stride)
void add_rows(float* h, const at::Tensor& y, int64_t B, int64_t D) {
  const float* yp = y.data_ptr<float>();
  const int64_t ld = y.stride(0);
  for (int64_t b = 0; b < B; ++b) axpy(1.0f, yp + b * ld, h + b * D, D);
}

// out[b, i] = silu(gu[b, i]) * gu[b, F + i]
void silu_mul(const at::Tensor& gu, float* out, int64_t B, int64_t F) {
  const float* g0 = gu.data_ptr<float>();
  const int64_t ld = gu.stride(0);
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t b = 0; b < B; ++b) {
    const float* g = g0 + b * ld;
    const float* u = g + F;
    float* o = out + b * F;
    int64_t i = 0;
    for (; i + 8 <= F; i += 8) {
      const __m256 gv = _mm256_loadu_ps(g + i);
      const __m256 den = _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv)));
      _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(gv, den), _mm256_loadu_ps(u + i)));
    }
    for (; i < F; ++i) o[i] = g[i] / (1.0f + exp1(-g[i])) * u[i];
  }
}

// the 8 sums of a[0..7] as one vector (a[i]'s total in lane i)
inline __m256 reduce8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// softmax of sc[0, n) in place; returns 1 / sum of the exponentials (the caller scales by it)
inline float softmax_unnormalized(float* sc, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) mx = std::max(mx, sc[j]);
  const __m256 mv = _mm256_set1_ps(mx);
  __m256 sv = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + j), mv));
    _mm256_storeu_ps(sc + j, e);
    sv = _mm256_add_ps(sv, e);
  }
  float sum = hsum(sv);
  for (; j < n; ++j) {
    sc[j] = exp1(sc[j] - mx);
    sum += sc[j];
  }
  return 1.0f / sum;
}

// dst[0, n) = src as the cache's element type (float16: round to nearest even)
inline void store_row(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }
inline void store_row(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}

// one query head over n cached keys / values (rows of hd floats): o = softmax(q K^T * scale) V.
// NV = hd / 8 > 0: scores 8 keys at a time, the output kept in registers; NV = 0: any hd.
template <int NV, typename T>
void attend_head(const float* q, const T* kr, const T* vr, int64_t n, int64_t hd, float scale, float* sc,
                 float* o) {
  int64_t j = 0;
  if (NV > 0) {
    for (; j + 8 <= n; j += 8) {
      __m256 a[8];
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
#pragma GCC unroll 16
      for (int c = 0; c < NV; ++c) {
        const __m256 qv = _mm256_loadu_ps(q + 8 * c);
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(qv, load8(kr + (j + i) * hd + 8 * c), a[i]);
      }
      _mm256_storeu_ps(sc + j, _mm256_mul_ps(reduce8(a), _mm256_set1_ps(scale)));
    }
  }
  for (; j < n; ++j) sc[j] = dot(q, kr + j * hd, hd) * scale;
  const float inv = softmax_unnormalized(sc, n);
  if (NV > 0) {
    __m256 acc[NV > 0 ? NV : 1];
#pragma GCC unroll 16
    for (int c = 0; c < NV; ++c) acc[c] = _mm256_setzero_ps();
    for (int64_t jj = 0; jj < n; ++jj) {
      const __m256 pv = _mm256_set1_ps(sc[jj]);
#pragma GCC unroll 16
      for (int c = 0; c < NV; ++c) acc[c] = _mm256_fmadd_ps(pv, load8(vr + jj * hd + 8 * c), acc[c]);
    }
    const __m256 iv = _mm256_set1_ps(inv);
#pragma GCC unroll 16
    for (int c = 0; c < NV; ++c) _mm256_storeu_ps(o + 8 * c, _mm256_mul_ps(acc[c], iv));
    return;
  }
  std::fill(o, o + hd, 0.0f);
  for (int64_t jj = 0; jj < n; ++jj) axpy(sc[jj], vr + jj * hd, o, hd);
  for (int64_t d = 0; d < hd; ++d) o[d] *= inv;
}

// rotate-half rope in place on n_heads heads of size hd: x' = x * cos + rotate_half(x) * sin
void rope(float* x, int64_t n_heads, int64_t hd, const float* cos, const float* sin) {
  const int64_t half = hd / 2;
  for (int64_t h = 0; h < n_heads; ++h) {
    float* v = x + h * hd;
    int64_t i = 0;
    for (; i + 8 <= half; i += 8) {
      const __m256 a = _mm256_loadu_ps(v + i), b = _mm256_loadu_ps(v + i + half);
      _mm256_storeu_ps(v + i, _mm256_fmsub_ps(a, _mm256_loadu_ps(cos + i), _mm256_mul_ps(b, _mm256_loadu_ps(sin + i))));
      _mm256_storeu_ps(v + i + half, _mm256_fmadd_ps(b, _mm256_loadu_ps(cos + i + half),
                                                     _mm256_mul_ps(a, _mm256_loadu_ps(sin + i + half))));
    }
    for (; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * cos[i] - b * sin[i];
      v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
  }
}

// ------------------------------------------------------------------------------------------------
// the plan
// ------------------------------------------------------------------------------------------------
enum LinearKind : int64_t { kFloat = 0, kInt4 = 1, kInt8 = 2, kFloatT = 3, kInt4R8 = 4 };

struct Linear {
  int64_t kind = kFloat, group_size = 0, in_features = 0, out_features = 0;  // kInt8: group_size = kernel path
  // float: weight [N, K] (kFloatT: [K, N]); int4 (kInt4R8: rows interleaved): packed, scales, mins; int8: qweight, scales
  at::Tensor a, b, c, bias;

  at::Tensor operator()(const at::Tensor& x) const {
    at::Tensor y;
    switch (kind) {
      case kInt4: y = quantchat_kernels::int4_linear(x, a, b, c, group_size, in_features, 0); break;
      case kInt4R8:  // int8-rounded activations (the decode GEMV; see int4r8_linear)
        y = quantchat_kernels::int4r8_linear(x, a, b, c, out_features, group_size, in_features, 1);
        break;
      case kInt8:  // group_size holds int8_linear's path: 3 = int16-rounded activations (KL ~2e-8 on the LM head)
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

constexpr int64_t kTensorsPerLayer = 20;  // attn_norm, wqkv x4, wo x4, ffn_norm, w13 x4, w2 x4, k_cache, v_cache
constexpr int64_t kMetaHead = 7;          // n_layer, dim, n_head, n_kv_head, head_dim, sliding_window, hidden

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
    TORCH_CHECK(meta.size() >= kMetaHead, "DecodePlan: short meta");
    n_layer = meta[0], dim = meta[1], n_head = meta[2], n_kv = meta[3], hd = meta[4], window = meta[5],
    hidden = meta[6];
    TORCH_CHECK(n_layer > 0 && n_kv > 0 && n_head % n_kv == 0 && hd % 2 == 0, "DecodePlan: bad shape meta");
    TORCH_CHECK(static_cast<int64_t>(meta.size()) == kMetaHead + 4 * (4 * n_layer + 1), "DecodePlan: meta size");
    TORCH_CHECK(static_cast<int64_t>(t.size()) == kTensorsPerLayer * n_layer + 7, "DecodePlan: tensor count");
    size_t mi = kMetaHead, ti = 0;
    auto linear = [&]() {
      Linear l;
      l.kind = meta[mi], l.group_size = meta[mi + 1], l.in_features = meta[mi + 2], l.out_features = meta[mi + 3];
      mi += 4;
      l.a = t[ti], l.b = t[ti + 1], l.c = t[ti + 2], l.bias = t[ti + 3];
      ti += 4;
      TORCH_CHECK(l.kind >= kFloat && l.kind <= kInt4R8, "DecodePlan: unknown linear kind ", l.kind);
      if (l.kind == kFloat || l.kind == kFloatT) check_float(l.a, "a float weight");
      if (l.bias.numel() > 0) check_float(l.bias, "a bias");
      return l;
    };
    for (int64_t i = 0; i < n_layer; ++i) {
      Layer L;
      L.attn_norm = t[ti++];
      L.wqkv = linear();
      L.wo = linear();
      L.ffn_norm = t[ti++];
      L.w13 = linear();
      L.w2 = linear();
      L.k_cache = t[ti++];
      L.v_cache = t[ti++];
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
    norm = t[ti++];
    check_float(norm, "the final norm weight");
    head = linear();
    rope_cos = t[ti++];
    rope_sin = t[ti++];
    check_float(rope_cos, "rope_cos");
    check_float(rope_sin, "rope_sin");
    TORCH_CHECK(rope_cos.dim() == 2 && rope_cos.size(1) == hd && rope_sin.sizes() == rope_cos.sizes(),
                "DecodePlan: rope tables must be [length, head_dim]");
    max_batch = layers[0].k_cache.size(0);
    max_seq = std::min(layers[0].k_cache.size(2), rope_cos.size(0));
  }

  // each row's keys and values into its slot's cache at its position, then its attention over that
  // cache (T: the cache's element type); qkv [B, (n_head + 2 n_kv) * hd] (roped) -> out [B, n_head * hd]
  template <typename T>
  void cache_and_attend(const float* q, int64_t ldq, float* out, const Layer& L, const int64_t* pos,
                        int64_t first_slot, int64_t B) const {
    const int64_t rep = n_head / n_kv, S = L.k_cache.size(2), qs = n_head * hd, kvs = n_kv * hd;
    T* kc = static_cast<T*>(L.k_cache.data_ptr());
    T* vc = static_cast<T*>(L.v_cache.data_ptr());
    for (int64_t b = 0; b < B; ++b) {
      const float* row = q + b * ldq;
      for (int64_t g = 0; g < n_kv; ++g) {
        const int64_t off = (((first_slot + b) * n_kv + g) * S + pos[b]) * hd;
        store_row(row + qs + g * hd, kc + off, hd);
        store_row(row + qs + kvs + g * hd, vc + off, hd);
      }
    }
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    at::parallel_for(0, B * n_kv, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> sc;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / n_kv, g = t % n_kv;
        const int64_t len = pos[b] + 1;
        const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0;
        const int64_t n = len - start;
        const size_t off = static_cast<size_t>(((first_slot + b) * n_kv + g) * S + start) * hd;
        const T* kr = kc + off;
        const T* vr = vc + off;
        sc.resize(static_cast<size_t>(n + 8));
        for (int64_t r = 0; r < rep; ++r) {
          const int64_t h = g * rep + r;
          const float* qh = q + b * ldq + h * hd;
          float* o = out + b * n_head * hd + h * hd;
          switch (hd) {
            case 16: attend_head<2>(qh, kr, vr, n, hd, scale, sc.data(), o); break;
            case 32: attend_head<4>(qh, kr, vr, n, hd, scale, sc.data(), o); break;
            case 64: attend_head<8>(qh, kr, vr, n, hd, scale, sc.data(), o); break;
            case 128: attend_head<16>(qh, kr, vr, n, hd, scale, sc.data(), o); break;
            default: attend_head<0>(qh, kr, vr, n, hd, scale, sc.data(), o); break;
          }
        }
      }
    });
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
      if (half_cache) cache_and_attend<uint16_t>(qp, ld, att.data_ptr<float>(), L, pos, first_slot, B);
      else cache_and_attend<float>(qp, ld, att.data_ptr<float>(), L, pos, first_slot, B);
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
