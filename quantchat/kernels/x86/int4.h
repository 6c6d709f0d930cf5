// int4 in the portable layout (quantchat.quant.rtn): float and int16-activation GEMVs, dequantized tiles + sgemm.
//
// int4 format (quantchat.quant.rtn, stored as is): packed uint8 [N, Kp/2], byte j of a row holds
// column 2j in its low nibble and 2j+1 in its high nibble; scales float16 [N, G]; mins float16 [N, G];
// w[n, k] = code * scale[n, g] + min[n, g] with g = k / group_size; Kp = G * group_size >= K
// (min = -zero * scale, llama.cpp Q4_1's m). The float16 values are widened with F16C (vcvtph2ps):
// the GEMV converts the scales / mins of each 4-row block once into a per-thread float buffer, the
// tiled path one group at a time.
//
// GEMV (decode): per call, x is copied once into a "nibble order" buffer xp [M, Kp] (per block of
// 16 columns: the 8 even columns, then the 8 odd ones; zeros past in_features), so that one
// vpmovzxbd of 8 packed bytes gives 16 codes: (v & 15) are the even columns, (v >> 4) the odd ones.
// y[m, n] = sum_g s[n,g] * (sum_{k in g} q[n,k] xp[m,k]) + sum_g min[n,g] Sx[m,g], with the
// per-group sums Sx computed once per call (M = 1; M = 2: two weight rows x two x rows). M >= 3 (batched
// decode): each weight row is dequantized in registers, 16 values at a time (w = code * scale + min),
// and multiply-added into up to 8 x rows at once. Accumulation is float32 (no activation quantization).
//
// Tiles (prefill): each thread dequantizes T rows of the weight into a float32 buffer [T, Kp] (a
// few hundred KiB, L2-resident) and calls sgemm on it, writing y[:, n0:n0+T] in place.
//
// A part of the kernels' translation unit: cpu_kernels.cpp includes the parts in this order (after common.h).
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
// int4
// ================================================================================================
struct Int4 {
  const uint8_t* w;    // [N, Kp/2]
  const uint16_t* s;   // [N, G] float16 scales
  const uint16_t* mn;  // [N, G] float16 mins (w = code * scale + min)
  int64_t N, K, Kp, G, gs;
};

// float16 src[0, n) -> float32 dst (F16C). src may be read up to ``avail`` elements (>= n): whole
// vectors of 8 as long as they stay within it (dst needs room for n rounded up to 8), then scalars.
inline void half_to_float(const uint16_t* src, float* dst, int64_t n, int64_t avail) {
  int64_t i = 0;
  for (; i < n && i + 8 <= avail; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}

// scales and mins of rows [n, n + rows) as float32: sf / mf [rows, G] (each with 8 floats of slack)
inline void rows_to_float(const Int4& q, int64_t n, int64_t rows, float* sf, float* mf) {
  const int64_t avail = (q.N - n) * q.G;
  half_to_float(q.s + n * q.G, sf, rows * q.G, avail);
  half_to_float(q.mn + n * q.G, mf, rows * q.G, avail);
}

// x [M, K] (row stride ldx) -> xp [M, Kp] in nibble order (zero padded), sx [M, G] group sums
void prep_x_int4(const Int4& q, const float* x, int64_t ldx, int64_t M, float* xp, float* sx) {
  const int64_t K = q.K, Kp = q.Kp;
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * ldx;
    float* o = xp + m * Kp;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      __m256 a = _mm256_loadu_ps(xr + k), b = _mm256_loadu_ps(xr + k + 8);
      // shuffle_ps per 128-bit lane: [a0 a2 b0 b2 | a4 a6 b4 b6]; permute 64-bit blocks 0,2,1,3
      __m256 ev = _mm256_shuffle_ps(a, b, 0x88), od = _mm256_shuffle_ps(a, b, 0xDD);
      ev = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(ev), 0xD8));
      od = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(od), 0xD8));
      _mm256_storeu_ps(o + k, ev);
      _mm256_storeu_ps(o + k + 8, od);
    }
    for (; k < Kp; k += 16) {
      for (int i = 0; i < 8; ++i) {
        const int64_t c = k + 2 * i;
        o[k + i] = c < K ? xr[c] : 0.0f;
        o[k + 8 + i] = c + 1 < K ? xr[c + 1] : 0.0f;
      }
    }
    float* sr = sx + m * q.G;
    for (int64_t g = 0; g < q.G; ++g) {
      const int64_t k0 = g * q.gs, k1 = std::min(K, k0 + q.gs);
      __m256 acc = _mm256_setzero_ps();
      int64_t kk = k0;
      for (; kk + 8 <= k1; kk += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(xr + kk));
      float s = hsum(acc);
      for (; kk < k1; ++kk) s += xr[kk];
      sr[g] = s;
    }
  }
}

// R weight rows (n0..n0+R) x MB activation rows (m0..m0+MB), their float scales / mins in sr / mr
// ([R, G]). NB = group_size / 16 (0: runtime).
// ACC2: even and odd columns accumulate separately (two independent FMA chains per output; where
// registers allow).
// pf: prefetch the rows 4 further on, at the pace these are read (weights stream from DRAM at decode).
// noinline: inlined into int4_gemv_rows it ran ~8% slower (register allocation in the larger function).
template <int R, int MB, int NB, bool ACC2>
__attribute__((noinline)) void int4_gemv_kernel(const Int4& q, const float* xp, const float* sx, const float* sr,
                                                const float* mr, float* y, int64_t ldy, int64_t n0, int64_t m0,
                                                bool pf) {
  const int64_t nb = NB > 0 ? NB : q.gs / 16;
  const int64_t ldw = q.Kp / 2, G = q.G, Kp = q.Kp, gbytes = q.gs / 2;
  const __m256i mask = _mm256_set1_epi32(15);
  __m256 tot[R][MB];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) tot[r][m] = _mm256_setzero_ps();
  const uint8_t* wr = q.w + n0 * ldw;
  const uint8_t* pfp = wr + 4 * ldw;
  const float* xb = xp + m0 * Kp;
  for (int64_t g = 0; g < G; ++g) {
    if (pf) {
      for (int64_t off = 0; off < R * gbytes; off += 64)
        _mm_prefetch(reinterpret_cast<const char*>(pfp + g * R * gbytes + off), _MM_HINT_T0);
    }
    __m256 acc[R][MB][2];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m) acc[r][m][0] = acc[r][m][1] = _mm256_setzero_ps();
    const uint8_t* wg = wr + g * gbytes;
    const float* xg = xb + g * q.gs;
#pragma GCC unroll 8
    for (int64_t b = 0; b < nb; ++b) {
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m256i v = load8_u8_epi32(wg + r * ldw + b * 8);
        const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, mask));
        const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
#pragma GCC unroll 4
        for (int m = 0; m < MB; ++m) {
          acc[r][m][0] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xg + m * Kp + b * 16), acc[r][m][0]);
          acc[r][m][ACC2 ? 1 : 0] =
              _mm256_fmadd_ps(hi, _mm256_loadu_ps(xg + m * Kp + b * 16 + 8), acc[r][m][ACC2 ? 1 : 0]);
        }
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 sv = _mm256_set1_ps(sr[r * G + g]);
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m)
        tot[r][m] =
            _mm256_fmadd_ps(ACC2 ? _mm256_add_ps(acc[r][m][0], acc[r][m][1]) : acc[r][m][0], sv, tot[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m)
      y[(m0 + m) * ldy + n0 + r] = hsum(tot[r][m]) + dot(mr + r * G, sx + (m0 + m) * G, G);
}

// Several activation rows (M > 1): the weights of one output row are dequantized 16 at a time in
// registers (w = code * scale + min: no per-group correction terms) and multiply-added into all MB
// activation rows, so the unpacking is shared and every FMA is useful work. ACC2 (small MB): even and
// odd columns accumulate separately, for enough independent FMA chains.
template <int MB, bool ACC2>
__attribute__((noinline)) void int4_gemv_dq_kernel(const Int4& q, const float* xp, const float* sr, const float* mr,
                                                   float* y, int64_t ldy, int64_t n, int64_t m0, bool pf) {
  const int64_t nb = q.gs / 16, ldw = q.Kp / 2, G = q.G, Kp = q.Kp, gbytes = q.gs / 2;
  const __m256i mask = _mm256_set1_epi32(15);
  __m256 acc[MB][ACC2 ? 2 : 1];
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m) {
    acc[m][0] = _mm256_setzero_ps();
    if (ACC2) acc[m][ACC2 ? 1 : 0] = _mm256_setzero_ps();
  }
  const uint8_t* wr = q.w + n * ldw;
  if (pf && n + 4 < q.N) {
    for (int64_t off = 0; off < ldw; off += 64)
      _mm_prefetch(reinterpret_cast<const char*>(wr + 4 * ldw + off), _MM_HINT_T0);
  }
  const float* xb = xp + m0 * Kp;
  for (int64_t g = 0; g < G; ++g) {
    const __m256 sv = _mm256_set1_ps(sr[g]), mv = _mm256_set1_ps(mr[g]);
    const uint8_t* wg = wr + g * gbytes;
    const float* xg = xb + g * q.gs;
    for (int64_t b = 0; b < nb; ++b) {
      const __m256i v = load8_u8_epi32(wg + b * 8);
      const __m256 lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, mask)), sv, mv);
      const __m256 hi = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), sv, mv);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) {
        acc[m][0] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xg + m * Kp + b * 16), acc[m][0]);
        acc[m][ACC2 ? 1 : 0] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xg + m * Kp + b * 16 + 8), acc[m][ACC2 ? 1 : 0]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    y[(m0 + m) * ldy + n] = hsum(ACC2 ? _mm256_add_ps(acc[m][0], acc[m][ACC2 ? 1 : 0]) : acc[m][0]);
}

template <int NB>
void int4_gemv_rows(const Int4& q, const float* xp, const float* sx, int64_t M, float* y, int64_t ldy,
                    int64_t nb, int64_t ne) {
  const int64_t G = q.G;
  std::vector<float> buf(static_cast<size_t>(8 * G + 16));  // float scales and mins of a 4-row block
  float* const sf = buf.data();
  float* const mf = sf + 4 * G + 8;
  for (int64_t n = nb; n < ne; n += 4) {
    const int64_t rows = std::min<int64_t>(4, ne - n);
    rows_to_float(q, n, rows, sf, mf);
    if (M == 1) {
      if (rows == 4) {
        int4_gemv_kernel<4, 1, NB, true>(q, xp, sx, sf, mf, y, ldy, n, 0, true);
      } else {
        for (int64_t r = 0; r < rows; ++r)
          int4_gemv_kernel<1, 1, NB, true>(q, xp, sx, sf + r * G, mf + r * G, y, ldy, n + r, 0, true);
      }
      continue;
    }
    if (M == 2 && rows % 2 == 0) {  // two weight rows x two activation rows: as fast as dequantizing here
      for (int64_t r = 0; r < rows; r += 2)
        int4_gemv_kernel<2, 2, NB, false>(q, xp, sx, sf + r * G, mf + r * G, y, ldy, n + r, 0, true);
      continue;
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float* s1 = sf + r * G;
      const float* m1 = mf + r * G;
      for (int64_t m0 = 0; m0 < M; m0 += 8) {
        const bool pf = m0 == 0;  // prefetch during the first pass over the row
        switch (std::min<int64_t>(8, M - m0)) {
          case 1: int4_gemv_dq_kernel<1, true>(q, xp, s1, m1, y, ldy, n + r, m0, pf); break;
          case 2: int4_gemv_dq_kernel<2, true>(q, xp, s1, m1, y, ldy, n + r, m0, pf); break;
          case 3: int4_gemv_dq_kernel<3, true>(q, xp, s1, m1, y, ldy, n + r, m0, pf); break;
          case 4: int4_gemv_dq_kernel<4, true>(q, xp, s1, m1, y, ldy, n + r, m0, pf); break;
          case 5: int4_gemv_dq_kernel<5, false>(q, xp, s1, m1, y, ldy, n + r, m0, pf); break;
          case 6: int4_gemv_dq_kernel<6, false>(q, xp, s1, m1, y, ldy, n + r, m0, pf); break;
          case 7: int4_gemv_dq_kernel<7, false>(q, xp, s1, m1, y, ldy, n + r, m0, pf); break;
          default: int4_gemv_dq_kernel<8, false>(q, xp, s1, m1, y, ldy, n + r, m0, pf); break;
        }
      }
    }
  }
}

void int4_gemv(const Int4& q, const float* x, int64_t ldx, int64_t M, float* y) {
  // the nibble-order copy of x and its group sums (small: M <= ~8 rows)
  std::vector<float> xp(static_cast<size_t>(M * q.Kp)), sx(static_cast<size_t>(M * q.G));
  prep_x_int4(q, x, ldx, M, xp.data(), sx.data());
  const int64_t bytes_per_row = q.Kp / 2 + q.G * 4;
  const int64_t grain = std::max<int64_t>(4, (int64_t{32} << 10) / bytes_per_row);  // >= 32 KiB per thread
  const float* xpp = xp.data();
  const float* sxp = sx.data();
  at::parallel_for(0, q.N, grain, [&](int64_t nb, int64_t ne) {
    switch (q.gs) {
      case 32: int4_gemv_rows<2>(q, xpp, sxp, M, y, q.N, nb, ne); break;
      case 64: int4_gemv_rows<4>(q, xpp, sxp, M, y, q.N, nb, ne); break;
      case 128: int4_gemv_rows<8>(q, xpp, sxp, M, y, q.N, nb, ne); break;
      default: int4_gemv_rows<0>(q, xpp, sxp, M, y, q.N, nb, ne); break;
    }
  });
}

// ------------------------------------------------------------------------------------------------
// int4 GEMV with int16 activations (opt-in): x is rounded per call to int16 per weight group,
// x ~= dx[m, g] * xq (dx = absmax / 32767, error <= absmax / 65534 per element: about 1e-5 of the
// output, far below bfloat16 rounding), and the products are exact integer sums (vpmaddwd):
// y = sum_g s[n,g] dx[m,g] sum_k q xq + sum_g min[n,g] dx[m,g] sum_k xq. Half the instructions of the
// float GEMV.
// Needs group_size % 32 == 0 (xq per 32 columns: the 16 even, then the 16 odd ones).
// ------------------------------------------------------------------------------------------------
void prep_x_i16(const Int4& q, const float* x, int64_t ldx, int64_t M, int16_t* xq, float* dx, float* sx) {
  const int64_t K = q.K, Kp = q.Kp, gs = q.gs;
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * ldx;
    for (int64_t g = 0; g < q.G; ++g) {
      const int64_t k0 = g * gs, k1 = std::min(K, k0 + gs);
      float amax = 0.0f;
      for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::abs(xr[k]));
      const float d = amax / 32767.0f;
      const float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
      int64_t sum = 0;
      int16_t* o = xq + m * Kp + k0;
      for (int64_t c = 0; c < gs; c += 32) {  // 32 columns: even ones, then odd ones
        for (int i = 0; i < 16; ++i) {
          const int64_t ke = k0 + c + 2 * i, ko = ke + 1;
          const int32_t ve = ke < k1 ? static_cast<int32_t>(std::nearbyint(xr[ke] * inv)) : 0;
          const int32_t vo = ko < k1 ? static_cast<int32_t>(std::nearbyint(xr[ko] * inv)) : 0;
          o[c + i] = static_cast<int16_t>(std::max(-32767, std::min(32767, ve)));
          o[c + 16 + i] = static_cast<int16_t>(std::max(-32767, std::min(32767, vo)));
          sum += o[c + i] + o[c + 16 + i];
        }
      }
      dx[m * q.G + g] = d;
      sx[m * q.G + g] = d * static_cast<float>(sum);
    }
  }
}

template <int R, int MB>
__attribute__((noinline)) void int4_gemv_i16_kernel(const Int4& q, const int16_t* xq, const float* dx,
                                                    const float* sx, const float* sr, const float* mr, float* y,
                                                    int64_t ldy, int64_t n0, int64_t m0, bool pf) {
  const int64_t nc = q.gs / 32;
  const int64_t ldw = q.Kp / 2, G = q.G, Kp = q.Kp, gbytes = q.gs / 2;
  const __m256i mask = _mm256_set1_epi16(15);
  __m256 tot[R][MB];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) tot[r][m] = _mm256_setzero_ps();
  const uint8_t* wr = q.w + n0 * ldw;
  const uint8_t* pfp = wr + 4 * ldw;
  const int16_t* xb = xq + m0 * Kp;
  for (int64_t g = 0; g < G; ++g) {
    if (pf) {
      for (int64_t off = 0; off < R * gbytes; off += 64)
        _mm_prefetch(reinterpret_cast<const char*>(pfp + g * R * gbytes + off), _MM_HINT_T0);
    }
    __m256i acc[R][MB];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_si256();
    const uint8_t* wg = wr + g * gbytes;
    const int16_t* xg = xb + g * q.gs;
#pragma GCC unroll 4
    for (int64_t c = 0; c < nc; ++c) {
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m256i v =
            _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wg + r * ldw + c * 16)));
        const __m256i lo = _mm256_and_si256(v, mask);
        const __m256i hi = _mm256_srli_epi16(v, 4);
#pragma GCC unroll 4
        for (int m = 0; m < MB; ++m) {
          const __m256i xe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg + m * Kp + c * 32));
          const __m256i xo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg + m * Kp + c * 32 + 16));
          acc[r][m] = _mm256_add_epi32(acc[r][m], _mm256_madd_epi16(lo, xe));
          acc[r][m] = _mm256_add_epi32(acc[r][m], _mm256_madd_epi16(hi, xo));
        }
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 sv = _mm256_set1_ps(sr[r * G + g]);
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m)
        tot[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][m]),
                                    _mm256_mul_ps(sv, _mm256_set1_ps(dx[(m0 + m) * G + g])), tot[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m)
      y[(m0 + m) * ldy + n0 + r] = hsum(tot[r][m]) + dot(mr + r * G, sx + (m0 + m) * G, G);
}

void int4_gemv_i16(const Int4& q, const float* x, int64_t ldx, int64_t M, float* y) {
  std::vector<int16_t> xq(static_cast<size_t>(M * q.Kp));
  std::vector<float> dx(static_cast<size_t>(M * q.G)), sx(static_cast<size_t>(M * q.G));
  prep_x_i16(q, x, ldx, M, xq.data(), dx.data(), sx.data());
  const int64_t bytes_per_row = q.Kp / 2 + q.G * 4;
  const int64_t grain = std::max<int64_t>(4, (int64_t{32} << 10) / bytes_per_row);
  const int16_t* xqp = xq.data();
  const float* dxp = dx.data();
  const float* sxp = sx.data();
  at::parallel_for(0, q.N, grain, [&](int64_t nb, int64_t ne) {
    const int64_t G = q.G;
    std::vector<float> buf(static_cast<size_t>(8 * G + 16));  // float scales and mins of a 4-row block
    float* const sf = buf.data();
    float* const mf = sf + 4 * G + 8;
    for (int64_t n = nb; n < ne; n += 4) {
      const int64_t rows = std::min<int64_t>(4, ne - n);
      rows_to_float(q, n, rows, sf, mf);
      for (int64_t m0 = 0; m0 < M;) {
        const int64_t mb = std::min<int64_t>(4, M - m0);
        const bool pf = m0 == 0;
        if (mb == 1 && rows == 4) {
          int4_gemv_i16_kernel<4, 1>(q, xqp, dxp, sxp, sf, mf, y, q.N, n, m0, pf);
        } else if (mb == 2 && rows == 4) {
          int4_gemv_i16_kernel<2, 2>(q, xqp, dxp, sxp, sf, mf, y, q.N, n, m0, pf);
          int4_gemv_i16_kernel<2, 2>(q, xqp, dxp, sxp, sf + 2 * G, mf + 2 * G, y, q.N, n + 2, m0, pf);
        } else {
          for (int64_t r = 0; r < rows; ++r) {
            const float* s1 = sf + r * G;
            const float* m1 = mf + r * G;
            switch (mb) {
              case 1: int4_gemv_i16_kernel<1, 1>(q, xqp, dxp, sxp, s1, m1, y, q.N, n + r, m0, pf); break;
              case 2: int4_gemv_i16_kernel<1, 2>(q, xqp, dxp, sxp, s1, m1, y, q.N, n + r, m0, pf); break;
              case 3: int4_gemv_i16_kernel<1, 3>(q, xqp, dxp, sxp, s1, m1, y, q.N, n + r, m0, pf); break;
              default: int4_gemv_i16_kernel<1, 4>(q, xqp, dxp, sxp, s1, m1, y, q.N, n + r, m0, pf); break;
            }
          }
        }
        m0 += mb;
      }
    }
  });
}

// dequantize rows [n0, n0+T) into out [T, Kp] (the padding columns come out as code * s + min = 0)
void int4_dequant_rows(const Int4& q, int64_t n0, int64_t T, float* out) {
  const int64_t ldw = q.Kp / 2, G = q.G, gs = q.gs;
  const __m128i m4 = _mm_set1_epi8(0x0F);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t n = n0 + t;
    const uint8_t* wr = q.w + n * ldw;
    float* o = out + t * q.Kp;
    for (int64_t g = 0; g < G; ++g) {
      const float s = _cvtsh_ss(q.s[n * G + g]);
      const float mn = _cvtsh_ss(q.mn[n * G + g]);
      const __m256 sv = _mm256_set1_ps(s);
      const __m256 mv = _mm256_set1_ps(mn);
      const int64_t k0 = g * gs;
      int64_t k = k0;
      for (; k + 16 <= k0 + gs; k += 16) {
        const __m128i p = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr + k / 2));
        const __m128i lo = _mm_and_si128(p, m4);
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(p, 4), m4);
        const __m128i il = _mm_unpacklo_epi8(lo, hi);  // 16 codes in column order
        const __m256 c0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(il));
        const __m256 c1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(il, 8)));
        _mm256_storeu_ps(o + k, _mm256_fmadd_ps(c0, sv, mv));
        _mm256_storeu_ps(o + k + 8, _mm256_fmadd_ps(c1, sv, mv));
      }
      for (; k < k0 + gs; ++k) {
        const int32_t c = (wr[k / 2] >> ((k & 1) * 4)) & 15;
        o[k] = std::fma(static_cast<float>(c), s, mn);
      }
    }
  }
}

void int4_tiled(const Int4& q, const at::Tensor& x, const at::Tensor& y) {
  const int64_t T = tile_rows(q.Kp);
  const int64_t grain = std::max<int64_t>(16, std::min<int64_t>(T, (q.N + 1) / 2));
  const GemmArgs ga{x, y};
  at::parallel_for(0, q.N, grain, [&](int64_t nb, int64_t ne) {
    const at::Tensor buf = x.new_empty({std::min(T, ne - nb) * q.Kp});  // per thread, L2-sized
    for (int64_t n = nb; n < ne; n += T) {
      const int64_t t = std::min(T, ne - n);
      int4_dequant_rows(q, n, t, buf.data_ptr<float>());
      gemm_tile(ga, n, t, q.K, buf, q.Kp);
    }
  });
}

}  // namespace
