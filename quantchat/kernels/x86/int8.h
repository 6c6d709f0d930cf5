// int8 per output channel: float GEMV, tiles, the int16-activation GEMV (the LM head at decode; vpdpwssd on AVX-512 VNNI),
// int8 panels for the int16 GEMM and the AMX GEMM.
//
// A part of the kernels' translation unit: cpu_kernels.cpp includes the parts in this order (after gemm_i16.h).
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

// ================================================================================================
// int8 (per output channel): w[n, k] = q[n, k] * s[n]
// ================================================================================================
template <int R, int MB>
void int8_gemv_kernel(const int8_t* w, int64_t K, const float* s, const float* x, int64_t ldx, float* y,
                      int64_t ldy, int64_t n0, int64_t m0, bool pf) {
  __m256 acc[R][MB][2];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) acc[r][m][0] = acc[r][m][1] = _mm256_setzero_ps();
  const int8_t* wr = w + n0 * K;
  const float* xb = x + m0 * ldx;
  const int8_t* pfp = wr + 4 * K;  // rows 4 further on, prefetched at the pace these are read
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if (pf && ((k * R) & 63) < R * 16) _mm_prefetch(reinterpret_cast<const char*>(pfp + k * R), _MM_HINT_T0);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 w0 = load8_i8_ps(wr + r * K + k), w1 = load8_i8_ps(wr + r * K + k + 8);
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m) {
        acc[r][m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xb + m * ldx + k), acc[r][m][0]);
        acc[r][m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + m * ldx + k + 8), acc[r][m][1]);
      }
    }
  }
  if (k + 8 <= K) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 w0 = load8_i8_ps(wr + r * K + k);
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m)
        acc[r][m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xb + m * ldx + k), acc[r][m][0]);
    }
    k += 8;
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) {
      float v = hsum(_mm256_add_ps(acc[r][m][0], acc[r][m][1]));
      for (int64_t kk = k; kk < K; ++kk) v += static_cast<float>(wr[r * K + kk]) * xb[m * ldx + kk];
      y[(m0 + m) * ldy + n0 + r] = v * s[n0 + r];
    }
}

// one weight row x MB (5..8) activation rows in one pass: the row is converted to float once for all
// of them (two passes of 4 convert it twice); one accumulator per activation row (MB independent chains)
template <int MB>
__attribute__((noinline)) void int8_gemv_wide_kernel(const int8_t* w, int64_t K, const float* s, const float* x,
                                                     int64_t ldx, float* y, int64_t ldy, int64_t n, int64_t m0) {
  __m256 acc[MB];
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
  const int8_t* wr = w + n * K;
  const float* xb = x + m0 * ldx;
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 wv = load8_i8_ps(wr + k);
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xb + m * ldx + k), acc[m]);
  }
  for (int m = 0; m < MB; ++m) {
    float v = hsum(acc[m]);
    for (int64_t kk = k; kk < K; ++kk) v += static_cast<float>(wr[kk]) * xb[m * ldx + kk];
    y[(m0 + m) * ldy + n] = v * s[n];
  }
}

void int8_gemv_rows(const int8_t* w, int64_t K, const float* s, const float* x, int64_t ldx, int64_t M, float* y,
                    int64_t ldy, int64_t nb, int64_t ne) {
  for (int64_t n = nb; n < ne; n += 4) {
    const int64_t rows = std::min<int64_t>(4, ne - n);
    for (int64_t m0 = 0; m0 < M;) {
      const int64_t left = M - m0;
      if (left >= 5 && left <= 8) {
        for (int64_t r = 0; r < rows; ++r) {
          switch (left) {
            case 5: int8_gemv_wide_kernel<5>(w, K, s, x, ldx, y, ldy, n + r, m0); break;
            case 6: int8_gemv_wide_kernel<6>(w, K, s, x, ldx, y, ldy, n + r, m0); break;
            case 7: int8_gemv_wide_kernel<7>(w, K, s, x, ldx, y, ldy, n + r, m0); break;
            default: int8_gemv_wide_kernel<8>(w, K, s, x, ldx, y, ldy, n + r, m0); break;
          }
        }
        m0 = M;
        continue;
      }
      const int64_t mb = std::min<int64_t>(4, left);
      if (mb == 1) {
        if (rows == 4) {
          int8_gemv_kernel<4, 1>(w, K, s, x, ldx, y, ldy, n, m0, m0 == 0);
        } else {
          for (int64_t r = 0; r < rows; ++r) int8_gemv_kernel<1, 1>(w, K, s, x, ldx, y, ldy, n + r, m0, m0 == 0);
        }
      } else if (mb == 2) {
        int64_t r = 0;
        for (; r + 2 <= rows; r += 2) int8_gemv_kernel<2, 2>(w, K, s, x, ldx, y, ldy, n + r, m0, m0 == 0);
        for (; r < rows; ++r) int8_gemv_kernel<1, 2>(w, K, s, x, ldx, y, ldy, n + r, m0, m0 == 0);
      } else if (mb == 3) {
        for (int64_t r = 0; r < rows; ++r) int8_gemv_kernel<1, 3>(w, K, s, x, ldx, y, ldy, n + r, m0, m0 == 0);
      } else {
        for (int64_t r = 0; r < rows; ++r) int8_gemv_kernel<1, 4>(w, K, s, x, ldx, y, ldy, n + r, m0, m0 == 0);
      }
      m0 += mb;
    }
  }
}

void int8_dequant_rows(const int8_t* w, int64_t K, const float* s, int64_t n0, int64_t T, float* out) {
  for (int64_t t = 0; t < T; ++t) {
    const int8_t* wr = w + (n0 + t) * K;
    float* o = out + t * K;
    const float sc = s[n0 + t];
    const __m256 sv = _mm256_set1_ps(sc);
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) _mm256_storeu_ps(o + k, _mm256_mul_ps(load8_i8_ps(wr + k), sv));
    for (; k < K; ++k) o[k] = static_cast<float>(wr[k]) * sc;
  }
}

// ------------------------------------------------------------------------------------------------
// int8 GEMV with int16 activations (kPathGemvI16, and kPathAutoI16 for M <= kMaxGemvM8): x is rounded per call
// and row to int16, x ~= dx[m] * xq (dx = absmax / 32767, error <= dx / 2 per element: about 1e-5 of
// the output, far below bfloat16 rounding), and the products are exact integer sums (vpmaddwd on the
// sign-extended weights): y = s[n] dx[m] sum_k q xq. Half the instructions per multiply-add of the
// float GEMV, and a row's result does not depend on the batch it is in. The int32 lanes are flushed to
// float every kI16Chunk columns (at most 2 * kI16Chunk / 16 products of |q| <= 128, |xq| <= 32767 per
// lane: < 2^31).
// ------------------------------------------------------------------------------------------------
constexpr int64_t kI16Chunk = 2048;

// x [M, K] (row stride ldx) -> xq int16 [M, Kp] (Kp = K rounded up to 16; zeros past K), dx [M]

// y[m0 + m, n0 + r] for R weight rows x MB activation rows
template <int R, int MB>
__attribute__((noinline)) void int8_gemv_i16_kernel(const int8_t* w, int64_t K, const float* s, const int16_t* xq,
                                                    int64_t Kp, const float* dx, float* y, int64_t ldy, int64_t n0,
                                                    int64_t m0, bool pf) {
  const int8_t* wr = w + n0 * K;
  const int16_t* xb = xq + m0 * Kp;
  const int8_t* pfp = wr + R * K;  // the next rows, prefetched at the pace these are read
  const int64_t K16 = K / 16 * 16;
  float tot[R][MB] = {};
  for (int64_t c0 = 0; c0 < K16; c0 += kI16Chunk) {
    const int64_t c1 = std::min(K16, c0 + kI16Chunk);
    __m256i acc[R][MB];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_si256();
    int64_t k = c0;
#ifdef QC_VNNI
    // AVX-512 VNNI: vpdpwssd over 32 columns; 32-bit lane i + 8 holds the products lane i gets 16 columns later
    // in the AVX2 loop below, so folding the halves gives its integer sums exactly (the same results)
    __m512i acc5[R][MB];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) acc5[r][m] = _mm512_setzero_si512();
    for (; k + 32 <= c1; k += 32) {
      if (pf && (k & 63) == 0) {
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(pfp + r * K + k), _MM_HINT_T0);
      }
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + r * K + k)));
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) acc5[r][m] = _mm512_dpwssd_epi32(acc5[r][m], wv, _mm512_loadu_si512(xb + m * Kp + k));
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m)
        acc[r][m] = _mm256_add_epi32(_mm512_castsi512_si256(acc5[r][m]), _mm512_extracti64x4_epi64(acc5[r][m], 1));
#endif
    for (; k < c1; k += 16) {
      if (pf && (k & 63) == 0) {
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(pfp + r * K + k), _MM_HINT_T0);
      }
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + r * K + k)));
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m)
          acc[r][m] = _mm256_add_epi32(
              acc[r][m],
              _mm256_madd_epi16(wv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + m * Kp + k))));
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) tot[r][m] += hsum(_mm256_cvtepi32_ps(acc[r][m]));
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) {
      int32_t t = 0;  // the last K % 16 columns
      for (int64_t k = K16; k < K; ++k) t += static_cast<int32_t>(wr[r * K + k]) * xb[m * Kp + k];
      y[(m0 + m) * ldy + n0 + r] = (tot[r][m] + static_cast<float>(t)) * (dx[m0 + m] * s[n0 + r]);
    }
}

void int8_gemv_i16_rows(const int8_t* w, int64_t K, const float* s, const int16_t* xq, int64_t Kp, const float* dx,
                        int64_t M, float* y, int64_t ldy, int64_t nb, int64_t ne) {
  for (int64_t n = nb; n < ne; n += 4) {
    const int64_t rows = std::min<int64_t>(4, ne - n);
    for (int64_t m0 = 0; m0 < M;) {
      const int64_t left = M - m0;
      const int64_t mb = left <= 8 ? left : (left >= 12 ? 8 : left - 4);  // passes of at most 8 rows
      const bool pf = m0 == 0;
      if (mb == 1 && rows == 4) {
        int8_gemv_i16_kernel<4, 1>(w, K, s, xq, Kp, dx, y, ldy, n, m0, pf);
      } else if (mb == 2 && rows == 4) {
        int8_gemv_i16_kernel<2, 2>(w, K, s, xq, Kp, dx, y, ldy, n, m0, pf);
        int8_gemv_i16_kernel<2, 2>(w, K, s, xq, Kp, dx, y, ldy, n + 2, m0, pf);
      } else {
        for (int64_t r = 0; r < rows; ++r) {
          switch (mb) {
            case 1: int8_gemv_i16_kernel<1, 1>(w, K, s, xq, Kp, dx, y, ldy, n + r, m0, pf); break;
            case 2: int8_gemv_i16_kernel<1, 2>(w, K, s, xq, Kp, dx, y, ldy, n + r, m0, pf); break;
            case 3: int8_gemv_i16_kernel<1, 3>(w, K, s, xq, Kp, dx, y, ldy, n + r, m0, pf); break;
            case 4: int8_gemv_i16_kernel<1, 4>(w, K, s, xq, Kp, dx, y, ldy, n + r, m0, pf); break;
            case 5: int8_gemv_i16_kernel<1, 5>(w, K, s, xq, Kp, dx, y, ldy, n + r, m0, pf); break;
            case 6: int8_gemv_i16_kernel<1, 6>(w, K, s, xq, Kp, dx, y, ldy, n + r, m0, pf); break;
            case 7: int8_gemv_i16_kernel<1, 7>(w, K, s, xq, Kp, dx, y, ldy, n + r, m0, pf); break;
            default: int8_gemv_i16_kernel<1, 8>(w, K, s, xq, Kp, dx, y, ldy, n + r, m0, pf); break;
          }
        }
      }
      m0 += mb;
    }
  }
}

// int8 weights in the int16-activation GEMM (kPathAutoI16 above kMaxGemvM8 rows: prefill without AMX): groups of kI8Group
// columns (the integer sums of a group stay below 2^31: 64 pairs x 2 x 128 x 32767), the row's scale for
// every group, no mins. Panel rows 16p..16p+15: 8 rows x 16 columns at a time, sign-extended and
// transposed (8 x 8 32-bit pairs) into [pair][row] order.
constexpr int64_t kI8Group = 128;

void int8_panel_i16(const int8_t* w, const float* s, int64_t N, int64_t K, int64_t Kp, int64_t p, int16_t* panel,
                    float* sf) {
  const int64_t G = Kp / kI8Group, K16 = K / 16 * 16;
  int32_t* out = reinterpret_cast<int32_t*>(panel);  // [Kp/2][16] pairs
  for (int64_t h = 0; h < 2; ++h) {
    const int64_t r0 = p * 16 + h * 8;
    const int64_t rows = std::max<int64_t>(0, std::min<int64_t>(8, N - r0));
    for (int64_t k = 0; k < K16 && rows == 8; k += 16) {
      __m256i r[8];
      for (int i = 0; i < 8; ++i)
        r[i] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (r0 + i) * K + k)));
      const __m256i t0 = _mm256_unpacklo_epi32(r[0], r[1]), t1 = _mm256_unpackhi_epi32(r[0], r[1]);
      const __m256i t2 = _mm256_unpacklo_epi32(r[2], r[3]), t3 = _mm256_unpackhi_epi32(r[2], r[3]);
      const __m256i t4 = _mm256_unpacklo_epi32(r[4], r[5]), t5 = _mm256_unpackhi_epi32(r[4], r[5]);
      const __m256i t6 = _mm256_unpacklo_epi32(r[6], r[7]), t7 = _mm256_unpackhi_epi32(r[6], r[7]);
      const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
      const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
      const __m256i u4 = _mm256_unpacklo_epi64(t4, t6), u5 = _mm256_unpackhi_epi64(t4, t6);
      const __m256i u6 = _mm256_unpacklo_epi64(t5, t7), u7 = _mm256_unpackhi_epi64(t5, t7);
      const __m256i o[8] = {_mm256_permute2x128_si256(u0, u4, 0x20), _mm256_permute2x128_si256(u1, u5, 0x20),
                            _mm256_permute2x128_si256(u2, u6, 0x20), _mm256_permute2x128_si256(u3, u7, 0x20),
                            _mm256_permute2x128_si256(u0, u4, 0x31), _mm256_permute2x128_si256(u1, u5, 0x31),
                            _mm256_permute2x128_si256(u2, u6, 0x31), _mm256_permute2x128_si256(u3, u7, 0x31)};
      for (int j = 0; j < 8; ++j)  // pair k/2 + j of rows r0..r0+7
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (k / 2 + j) * 16 + h * 8), o[j]);
    }
    for (int64_t i = 0; i < 8; ++i) {  // the rest: columns past K16 (all of them for a partial 8 rows), zeros
      const int64_t n = r0 + i;
      for (int64_t k = (rows == 8 ? K16 : 0); k < Kp; k += 2) {
        int16_t pair[2] = {0, 0};
        for (int j = 0; j < 2; ++j)
          if (i < rows && k + j < K) pair[j] = w[n * K + k + j];
        std::memcpy(out + (k / 2) * 16 + h * 8 + i, pair, 4);
      }
      const float sc = i < rows ? s[n] : 0.0f;
      for (int64_t g = 0; g < G; ++g) sf[g * 16 + h * 8 + i] = sc;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// int8_linear's kernels over all M rows of x and N outputs (cpu_kernels.cpp maps the paths to them)
// ------------------------------------------------------------------------------------------------
struct Int8 {
  const int8_t* w;  // [N, K]
  const float* s;   // [N]
  int64_t N, K;
};

// rows [n0, n0 + rows) dequantized into out [rows, Kp] (zeros past K): the AMX GEMM's panels
void int8_dequant_rows_padded(const Int8& q, int64_t n0, int64_t rows, int64_t Kp, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    int8_dequant_rows(q.w, q.K, q.s, n0 + r, 1, out + r * Kp);
    std::fill(out + r * Kp + q.K, out + (r + 1) * Kp, 0.0f);
  }
}

// the int16-activation GEMM (prefill without AMX)
void int8_i16_gemm(const Int8& q, const float* x, int64_t ldx, int64_t M, float* y) {
  const int8_t* w = q.w;
  const float* s = q.s;
  const int64_t N = q.N, K = q.K;
  const int64_t Kp = (K + kI8Group - 1) / kI8Group * kI8Group;
  i16_gemm(N, Kp, kI8Group, x, ldx, K, M, y, false, [&](int64_t p, int16_t* panel, float* sf, float*) {
    int8_panel_i16(w, s, N, K, Kp, p, panel, sf);
  });
}

// the GEMV on int16 activations (rounded per row)
void int8_gemv_i16(const Int8& q, const float* x, int64_t ldx, int64_t M, float* y) {
  const int64_t N = q.N, K = q.K;
  const int64_t Kp = (K + 15) / 16 * 16;
  std::vector<int16_t> xq(static_cast<size_t>(M * Kp));
  std::vector<float> dx(static_cast<size_t>(M));
  prep_x_i16_rows(x, ldx, M, K, Kp, xq.data(), dx.data());
  const int16_t* xqp = xq.data();
  const float* dxp = dx.data();
  const int64_t grain = std::max<int64_t>(4, (int64_t{32} << 10) / K);
  at::parallel_for(0, N, grain, [&](int64_t nb, int64_t ne) {
    int8_gemv_i16_rows(q.w, K, q.s, xqp, Kp, dxp, M, y, N, nb, ne);
  });
}

// the float GEMV
void int8_gemv(const Int8& q, const float* x, int64_t ldx, int64_t M, float* y) {
  const int64_t N = q.N, K = q.K;
  const int64_t grain = std::max<int64_t>(4, (int64_t{32} << 10) / K);
  at::parallel_for(0, N, grain, [&](int64_t nb, int64_t ne) {
    int8_gemv_rows(q.w, K, q.s, x, ldx, M, y, N, nb, ne);
  });
}

// dequantized tiles + sgemm
void int8_tiled(const Int8& q, const at::Tensor& x, const at::Tensor& y) {
  const int64_t N = q.N, K = q.K;
  const int64_t T = tile_rows(K);
  const int64_t grain = std::max<int64_t>(16, std::min<int64_t>(T, (N + 1) / 2));
  const GemmArgs ga{x, y};
  at::parallel_for(0, N, grain, [&](int64_t nb, int64_t ne) {
    const at::Tensor buf = x.new_empty({std::min(T, ne - nb) * K});
    for (int64_t n = nb; n < ne; n += T) {
      const int64_t t = std::min(T, ne - n);
      int8_dequant_rows(q.w, K, q.s, n, t, buf.data_ptr<float>());
      gemm_tile(ga, n, t, K, buf, K);
    }
  });
}

}  // namespace
