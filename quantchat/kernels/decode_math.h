// The fused decode step's vector math: RMSNorm and LayerNorm, residual adds, the MLP activations (SwiGLU,
// GeGLU, plain GELU), rope (AVX2 + FMA + F16C).
// A part of decode_step.cpp's translation unit (anonymous namespace, as x86/*.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <immintrin.h>

#include <algorithm>
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

// out = (x - mean(x)) * rsqrt(var(x) + eps) * w (+ bias), row by row ([B, D]; bias may be null)
void layernorm(const float* x, const float* w, const float* bias, float* out, int64_t B, int64_t D, float eps) {
  for (int64_t b = 0; b < B; ++b) {
    const float* xr = x + b * D;
    float* o = out + b * D;
    double sum = 0.0;
    for (int64_t i = 0; i < D; ++i) sum += xr[i];
    const float mean = static_cast<float>(sum / static_cast<double>(D));
    double var = 0.0;
    for (int64_t i = 0; i < D; ++i) var += static_cast<double>(xr[i] - mean) * (xr[i] - mean);
    const float r = 1.0f / std::sqrt(static_cast<float>(var / static_cast<double>(D)) + eps);
    for (int64_t i = 0; i < D; ++i) o[i] = (xr[i] - mean) * r * w[i] + (bias ? bias[i] : 0.0f);
  }
}

// h[b, :] += y[b, :] (y may have a row stride)
void add_rows(float* h, const at::Tensor& y, int64_t B, int64_t D) {
  const float* yp = y.data_ptr<float>();
  const int64_t ld = y.stride(0);
  for (int64_t b = 0; b < B; ++b) axpy(1.0f, yp + b * ld, h + b * D, D);
}

enum Activation : int64_t { kSilu = 0, kGelu = 1, kGeluTanh = 2 };  // defs.ACTIVATION's order

inline float gelu1(float x) { return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f)); }

// x * sigmoid(x) (silu) or GELU's tanh approximation 0.5 x (1 + tanh(u)) = x * sigmoid(2u),
// u = sqrt(2/pi) (x + 0.044715 x^3): both x / (1 + exp(-z)) with z = x or 2u
inline __m256 sigmoid_times(__m256 x, __m256 z) {
  const __m256 den = _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), z)));
  return _mm256_div_ps(x, den);
}
inline float sigmoid_times1(float x, float z) { return x / (1.0f + exp1(-z)); }
inline __m256 tanh_arg2(__m256 x) {  // 2u of gelu_tanh
  const __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
  return _mm256_mul_ps(_mm256_set1_ps(1.5957691216057308f), _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), x3, x));
}
inline float tanh_arg2_1(float x) { return 1.5957691216057308f * (x + 0.044715f * x * x * x); }

// out[b, i] = act(g[b, i]) * (gated ? g[b, F + i] : 1): SwiGLU / GeGLU (gated) or a plain MLP's activation
void activate(const at::Tensor& gu, float* out, int64_t B, int64_t F, int64_t act, bool gated) {
  const float* g0 = gu.data_ptr<float>();
  const int64_t ld = gu.stride(0);
  for (int64_t b = 0; b < B; ++b) {
    const float* g = g0 + b * ld;
    const float* u = g + F;
    float* o = out + b * F;
    int64_t i = 0;
    if (act == kGelu) {
      for (; i < F; ++i) o[i] = gelu1(g[i]) * (gated ? u[i] : 1.0f);
      continue;
    }
    for (; i + 8 <= F; i += 8) {
      const __m256 gv = _mm256_loadu_ps(g + i);
      __m256 y = sigmoid_times(gv, act == kSilu ? gv : tanh_arg2(gv));
      if (gated) y = _mm256_mul_ps(y, _mm256_loadu_ps(u + i));
      _mm256_storeu_ps(o + i, y);
    }
    for (; i < F; ++i) o[i] = sigmoid_times1(g[i], act == kSilu ? g[i] : tanh_arg2_1(g[i])) * (gated ? u[i] : 1.0f);
  }
}

// x[i] = clamp(x[i], -c, c) over rows of n floats with stride ld
void clamp_rows(float* x, int64_t ld, int64_t B, int64_t n, float c) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < n; ++i) x[b * ld + i] = std::min(c, std::max(-c, x[b * ld + i]));
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
