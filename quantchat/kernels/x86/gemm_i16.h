// The GEMM on int16-rounded activations (prefill without AMX): activation rounding, the 6 x 16 register-blocked kernel (AVX2; vpdpwssd on AVX-512 VNNI), int4 r8 panels.
//
// A part of the kernels' translation unit: cpu_kernels.cpp includes the parts in this order (after int4_r8.h).
// The helpers stay in an anonymous namespace: one library per CPU variant, nothing exported from here.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include "cpu_kernels.h"
#include "x86/amx_gemm.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// x [M, K] -> xq int16 [M, Kp] per row (dx = absmax / 32767; zeros past K)
void prep_x_i16_rows(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t Kp, int16_t* xq, float* dx) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * ldx;
    __m256 vmax = _mm256_setzero_ps();
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(xr + k), absmask));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    float amax = _mm_cvtss_f32(h);
    for (; k < K; ++k) amax = std::max(amax, std::abs(xr[k]));
    const float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
    dx[m] = amax / 32767.0f;
    int16_t* o = xq + m * Kp;
    const __m256 iv = _mm256_set1_ps(inv);
    k = 0;
    for (; k + 16 <= K; k += 16) {  // round to nearest even (the MXCSR default), as std::nearbyint
      const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k), iv));
      const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k + 8), iv));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + k), _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8));
    }
    for (; k < K; ++k) {
      const int32_t v = static_cast<int32_t>(std::nearbyint(xr[k] * inv));
      o[k] = static_cast<int16_t>(std::max(-32767, std::min(32767, v)));
    }
    for (; k < Kp; ++k) o[k] = 0;
  }
}


// ------------------------------------------------------------------------------------------------
// kR8I16 (prefill): int16 activations (per row and weight group, dx = absmax / 32767) times the int4
// codes, exact integer sums per weight group (vpmaddwd: 16 multiply-adds per instruction, twice the
// FMA's), scaled per group in float: y[m, n] = sum_g s[n,g] dx[m,g] sum_{k in g} q xq + sum_g min[n,g]
// sx[m,g], with sx[m,g] = dx[m,g] sum_{k in g} xq. Each thread unpacks 16 weight rows (two 8-row blocks)
// at a time into a panel of int16 code pairs [Kp/2][16] (L1 / L2), then runs a 6 x 16 register-blocked
// kernel over it for every 6 activation rows. Not float32-exact (the rounding of x: ~1e-5 of the output);
// a row's result does not depend on the other rows.
// ------------------------------------------------------------------------------------------------
constexpr int64_t kI16MR = 6;

// blocks b0 and b0 + 1 (absent past the last: zero codes) -> panel [Kp/2][16][2]: per pair of columns
// (k, k+1), rows 0..15 as int16 (code k, code k+1); float scales / mins -> sf, mf [G][16]
void int4r8_panel_i16(const Int4R8& q, int64_t b0, int16_t* panel, float* sf, float* mf) {
  const int64_t G = q.G, Kp = q.Kp, blocks = q.N8 / 8;
  const __m256i m4 = _mm256_set1_epi8(15);
  // per 32-bit lane (one row): bytes 0, 1 -> words (code k, code k+1); bytes 2, 3 -> the next pair
  const __m256i pair0 = _mm256_setr_epi8(0, -1, 1, -1, 4, -1, 5, -1, 8, -1, 9, -1, 12, -1, 13, -1,
                                         0, -1, 1, -1, 4, -1, 5, -1, 8, -1, 9, -1, 12, -1, 13, -1);
  const __m256i pair1 = _mm256_setr_epi8(2, -1, 3, -1, 6, -1, 7, -1, 10, -1, 11, -1, 14, -1, 15, -1,
                                         2, -1, 3, -1, 6, -1, 7, -1, 10, -1, 11, -1, 14, -1, 15, -1);
  for (int h = 0; h < 2; ++h) {
    const int64_t b = b0 + h;
    if (b >= blocks) {
      for (int64_t kp = 0; kp < Kp / 2; ++kp) std::memset(panel + (kp * 16 + h * 8) * 2, 0, 8 * 2 * sizeof(int16_t));
      for (int64_t g = 0; g < G; ++g) {
        _mm256_storeu_ps(sf + g * 16 + h * 8, _mm256_setzero_ps());
        _mm256_storeu_ps(mf + g * 16 + h * 8, _mm256_setzero_ps());
      }
      continue;
    }
    const uint8_t* w = q.w + b * 8 * (Kp / 2);
    for (int64_t g = 0; g < G; ++g) {
      _mm256_storeu_ps(sf + g * 16 + h * 8,
                       _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q.s + (b * G + g) * 8))));
      _mm256_storeu_ps(mf + g * 16 + h * 8,
                       _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q.mn + (b * G + g) * 8))));
    }
    for (int64_t c = 0; c < Kp / 8; ++c) {  // 8 columns: lo holds columns 8c..8c+3, hi 8c+4..8c+7
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c * 32));
      const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
      const __m256i pairs[4] = {_mm256_shuffle_epi8(lo, pair0), _mm256_shuffle_epi8(lo, pair1),
                                _mm256_shuffle_epi8(hi, pair0), _mm256_shuffle_epi8(hi, pair1)};
      for (int j = 0; j < 4; ++j)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(panel + ((c * 4 + j) * 16 + h * 8) * 2), pairs[j]);
    }
  }
}

#define QC_I16_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
// C[m][0..15] = sum_g sf[g] dx[m, g] (sum_{k in g} q xq) for rows m < MB of xq (row stride Kp; dx [MB, G])
template <int MB>
__attribute__((noinline)) void i16_gemm_kernel(const int16_t* panel, const float* sf, const int16_t* xq,
                                                 const float* dx, int64_t Kp, int64_t G, int64_t gs, float* C) {
  static_assert(MB >= 1 && MB <= 6, "i16_gemm_kernel: 1..6 rows");
  for (int i = 0; i < MB * 16; ++i) C[i] = 0.0f;
  const int64_t kpg = gs / 2;  // code pairs per group
  for (int64_t g = 0; g < G; ++g) {
#define QC_DECL(m) __m256i a0_##m = _mm256_setzero_si256(), a1_##m = _mm256_setzero_si256();
    QC_I16_ROWS(QC_DECL)
#undef QC_DECL
    const int16_t* pg = panel + g * kpg * 32;
    const int16_t* xg = xq + g * gs;
    for (int64_t kp = 0; kp < kpg; ++kp) {
      const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pg + kp * 32));
      const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pg + kp * 32 + 16));
// one row: broadcast its code-pair of activations, multiply-add both halves of the panel. In asm: gcc
// hoisted the six broadcasts (spilling accumulators) or, held back by barriers, copied each sum once more
#define QC_MADD(m)                                                                                     \
      if constexpr (MB > m) {                                                                          \
        __m256i t, u;                                                                                  \
        __asm__("vpbroadcastd %[x], %[t]\n\t"                                                          \
                "vpmaddwd %[b0], %[t], %[u]\n\t"                                                       \
                "vpmaddwd %[b1], %[t], %[t]\n\t"                                                       \
                "vpaddd %[u], %[a0], %[a0]\n\t"                                                        \
                "vpaddd %[t], %[a1], %[a1]"                                                           \
                : [a0] "+x"(a0_##m), [a1] "+x"(a1_##m), [t] "=&x"(t), [u] "=&x"(u)                    \
                : [x] "m"(*reinterpret_cast<const int32_t*>(xg + m * Kp + 2 * kp)), [b0] "x"(b0), [b1] "x"(b1)); \
      }
      QC_I16_ROWS(QC_MADD)
#undef QC_MADD
    }
    const __m256 s0 = _mm256_loadu_ps(sf + g * 16), s1 = _mm256_loadu_ps(sf + g * 16 + 8);
#define QC_ACC(m)                                                                                         \
    if constexpr (MB > m) {                                                                               \
      const __m256 d = _mm256_broadcast_ss(dx + m * G + g);                                               \
      _mm256_storeu_ps(C + m * 16, _mm256_fmadd_ps(_mm256_cvtepi32_ps(a0_##m), _mm256_mul_ps(s0, d),      \
                                                   _mm256_loadu_ps(C + m * 16)));                         \
      _mm256_storeu_ps(C + m * 16 + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(a1_##m), _mm256_mul_ps(s1, d),  \
                                                       _mm256_loadu_ps(C + m * 16 + 8)));                 \
    }
    QC_I16_ROWS(QC_ACC)
#undef QC_ACC
  }
}
#undef QC_I16_ROWS

#ifdef QC_VNNI
// AVX-512 VNNI form of i16_gemm_kernel (above: its reference): one vpdpwssd per row and code pair multiplies
// all 16 panel rows (the AVX2 kernel: two vpmaddwd + two vpaddd); the same exact integer sums per group and
// the same float epilogue, so the same results bit for bit.
template <int MB>
__attribute__((noinline)) void i16_gemm_kernel_vnni(const int16_t* panel, const float* sf, const int16_t* xq,
                                                      const float* dx, int64_t Kp, int64_t G, int64_t gs, float* C) {
  static_assert(MB >= 1 && MB <= 6, "i16_gemm_kernel_vnni: 1..6 rows");
  __m512 c[MB];
#pragma GCC unroll 6
  for (int m = 0; m < MB; ++m) c[m] = _mm512_setzero_ps();
  const int64_t kpg = gs / 2;  // code pairs per group
  for (int64_t g = 0; g < G; ++g) {
    __m512i a[MB];
#pragma GCC unroll 6
    for (int m = 0; m < MB; ++m) a[m] = _mm512_setzero_si512();
    const int16_t* pg = panel + g * kpg * 32;
    const int16_t* xg = xq + g * gs;
    for (int64_t kp = 0; kp < kpg; ++kp) {
      const __m512i b = _mm512_loadu_si512(pg + kp * 32);
#pragma GCC unroll 6
      for (int m = 0; m < MB; ++m) {
        int32_t xv;
        std::memcpy(&xv, xg + m * Kp + 2 * kp, 4);
        a[m] = _mm512_dpwssd_epi32(a[m], b, _mm512_set1_epi32(xv));
      }
    }
    const __m512 sv = _mm512_loadu_ps(sf + g * 16);
#pragma GCC unroll 6
    for (int m = 0; m < MB; ++m)
      c[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[m]), _mm512_mul_ps(sv, _mm512_set1_ps(dx[m * G + g])), c[m]);
  }
#pragma GCC unroll 6
  for (int m = 0; m < MB; ++m) _mm512_storeu_ps(C + m * 16, c[m]);
}
#define QC_I16_KERNEL i16_gemm_kernel_vnni
#else
#define QC_I16_KERNEL i16_gemm_kernel
#endif

// x [M, K] -> xq int16 [M, Kp] (zeros past K), per row and group of gs columns: dx [M, G] (absmax / 32767:
// an outlier channel coarsens only its own group) and sx [M, G] = dx * (the group's sum of xq)
void prep_x_i16_groups(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t Kp, int64_t gs, int16_t* xq,
                       float* dx, float* sx) {
  const int64_t G = Kp / gs;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < G; ++g) {  // a group as a row of its columns below K (zeros after them)
      int16_t* o = xq + m * Kp + g * gs;
      float d;
      prep_x_i16_rows(x + m * ldx + g * gs, ldx, 1, std::clamp<int64_t>(K - g * gs, 0, gs), gs, o, &d);
      int64_t s = 0;
      for (int64_t k = 0; k < gs; ++k) s += o[k];
      dx[m * G + g] = d;
      sx[m * G + g] = d * static_cast<float>(s);
    }
  }
}

// The int16-activation GEMM over panels of 16 weight rows: y [M, N] = for each panel p (rows 16p..16p+15),
// make_panel(p, panel, sf, mf) unpacks its codes (int16 pairs [Kp/2][16][2]) and per-group float scales
// sf and mins mf [G][16] (mf left alone without has_mins); then, 6 activation rows at a time,
// y = sum_g sf dx (integer sums) + sum_g mf sx.
template <typename MakePanel>
void i16_gemm(int64_t N, int64_t Kp, int64_t gs, const float* x, int64_t ldx, int64_t K, int64_t M, float* y,
              bool has_mins, MakePanel make_panel) {
  const int64_t G = Kp / gs;
  std::vector<int16_t> xq(static_cast<size_t>(M * Kp));
  std::vector<float> dx(static_cast<size_t>(M * G)), sx(static_cast<size_t>(M * G));
  prep_x_i16_groups(x, ldx, M, K, Kp, gs, xq.data(), dx.data(), sx.data());
  const int64_t panels = (N + 15) / 16;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    std::vector<int16_t> panel(static_cast<size_t>(Kp * 16));
    std::vector<float> sf(static_cast<size_t>(G * 16)), mf(static_cast<size_t>(G * 16));
    alignas(32) float C[kI16MR * 16];
    for (int64_t p = p0; p < p1; ++p) {
      make_panel(p, panel.data(), sf.data(), mf.data());
      const int64_t n0 = p * 16, cols = std::min<int64_t>(16, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += kI16MR) {
        const int64_t mb = std::min<int64_t>(kI16MR, M - m0);
        const int16_t* xm = xq.data() + m0 * Kp;
        const float* dxm = dx.data() + m0 * G;
        switch (mb) {
          case 1: QC_I16_KERNEL<1>(panel.data(), sf.data(), xm, dxm, Kp, G, gs, C); break;
          case 2: QC_I16_KERNEL<2>(panel.data(), sf.data(), xm, dxm, Kp, G, gs, C); break;
          case 3: QC_I16_KERNEL<3>(panel.data(), sf.data(), xm, dxm, Kp, G, gs, C); break;
          case 4: QC_I16_KERNEL<4>(panel.data(), sf.data(), xm, dxm, Kp, G, gs, C); break;
          case 5: QC_I16_KERNEL<5>(panel.data(), sf.data(), xm, dxm, Kp, G, gs, C); break;
          default: QC_I16_KERNEL<6>(panel.data(), sf.data(), xm, dxm, Kp, G, gs, C); break;
        }
        for (int64_t m = 0; m < mb; ++m) {  // y = C + sum_g min * sx
          __m256 y0 = _mm256_load_ps(C + m * 16), y1 = _mm256_load_ps(C + m * 16 + 8);
          const float* sxm = sx.data() + (m0 + m) * G;
          for (int64_t g = 0; has_mins && g < G; ++g) {
            const __m256 s = _mm256_set1_ps(sxm[g]);
            y0 = _mm256_fmadd_ps(_mm256_loadu_ps(mf.data() + g * 16), s, y0);
            y1 = _mm256_fmadd_ps(_mm256_loadu_ps(mf.data() + g * 16 + 8), s, y1);
          }
          float* yr = y + (m0 + m) * N + n0;
          if (cols == 16) {
            _mm256_storeu_ps(yr, y0);
            _mm256_storeu_ps(yr + 8, y1);
          } else {
            store_lanes(yr, y0, std::min<int64_t>(8, cols));
            if (cols > 8) store_lanes(yr + 8, y1, cols - 8);
          }
        }
      }
    }
  });
}

void int4r8_i16_gemm(const Int4R8& q, const float* x, int64_t ldx, int64_t M, float* y) {
  i16_gemm(q.N, q.Kp, q.gs, x, ldx, q.K, M, y, true, [&](int64_t p, int16_t* panel, float* sf, float* mf) {
    int4r8_panel_i16(q, 2 * p, panel, sf, mf);
  });
}

}  // namespace
