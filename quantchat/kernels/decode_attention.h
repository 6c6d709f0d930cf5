// The fused decode step's attention: the KV-cache write and grouped-query attention over the cache (AVX2 + FMA +
// F16C). A part of decode_step.cpp's translation unit (anonymous namespace, as x86/*.h).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_kernels.h"
#include "decode_math.h"  // exp1, axpy; the quantchat_kernels helpers

namespace {

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

// one query head over n cached keys / values (rows of hd floats): o = softmax(q K^T * scale + bias) V, where
// bias = slope * (rel0 + j) for key j (ALiBi: slope * (key position - query position); slope 0: none).
// NV = hd / 8 > 0: scores 8 keys at a time, the output kept in registers; NV = 0: any hd.
template <int NV, typename T>
void attend_head(const float* q, const T* kr, const T* vr, int64_t n, int64_t hd, float scale, float slope,
                 int64_t rel0, float* sc, float* o) {
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
  if (slope != 0.0f)
    for (int64_t jj = 0; jj < n; ++jj) sc[jj] += slope * static_cast<float>(rel0 + jj);
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

struct AttentionShape {
  int64_t n_head, n_kv, hd, window;  // window 0: no sliding window
  float scale;                       // of q . k
  const float* alibi;                // per-head ALiBi slopes, or null
};

// each row's keys and values into its slot's cache at its position, then its attention over that
// cache (T: the cache's element type: float or uint16_t for float16); qkv [B, (n_head + 2 n_kv) * hd] (roped) -> out [B, n_head * hd]
template <typename T>
void cache_and_attend(const AttentionShape& a, const float* q, int64_t ldq, float* out, const at::Tensor& k_cache,
                      const at::Tensor& v_cache, const int64_t* pos, int64_t first_slot, int64_t B) {
  const int64_t n_head = a.n_head, n_kv = a.n_kv, hd = a.hd, window = a.window;
  const int64_t rep = n_head / n_kv, S = k_cache.size(2), qs = n_head * hd, kvs = n_kv * hd;
  T* kc = static_cast<T*>(k_cache.data_ptr());
  T* vc = static_cast<T*>(v_cache.data_ptr());
  for (int64_t b = 0; b < B; ++b) {
    const float* row = q + b * ldq;
    for (int64_t g = 0; g < n_kv; ++g) {
      const int64_t off = (((first_slot + b) * n_kv + g) * S + pos[b]) * hd;
      store_row(row + qs + g * hd, kc + off, hd);
      store_row(row + qs + kvs + g * hd, vc + off, hd);
    }
  }
  const float scale = a.scale;
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
        const float slope = a.alibi ? a.alibi[h] : 0.0f;
        const int64_t rel0 = start - pos[b];
        switch (hd) {
          case 16: attend_head<2>(qh, kr, vr, n, hd, scale, slope, rel0, sc.data(), o); break;
          case 32: attend_head<4>(qh, kr, vr, n, hd, scale, slope, rel0, sc.data(), o); break;
          case 64: attend_head<8>(qh, kr, vr, n, hd, scale, slope, rel0, sc.data(), o); break;
          case 128: attend_head<16>(qh, kr, vr, n, hd, scale, slope, rel0, sc.data(), o); break;
          case 256: attend_head<32>(qh, kr, vr, n, hd, scale, slope, rel0, sc.data(), o); break;
          default: attend_head<0>(qh, kr, vr, n, hd, scale, slope, rel0, sc.data(), o); break;
        }
      }
    }
  });
}

}  // namespace
