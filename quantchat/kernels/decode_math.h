// The fused decode step's vector math: rmsnorm, residual adds, SwiGLU, rope (AVX2 + FMA + F16C).
// A part of decode_step.cpp's translation unit (anonymous namespace, as x86/*.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>

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

}  // namespace
