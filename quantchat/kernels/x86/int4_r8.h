// int4 with rows interleaved in blocks of 8 (r8): the int8-activation decode GEMV (AVX2 and AVX-512 VNNI), the exact small-M kernel, dequantized tiles.
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
// int4, rows interleaved in blocks of 8 ("r8"), for decode: int8 activations (as llama.cpp's Q8_0)
// ================================================================================================
// Layout (quantchat.quant.rtn.interleave_rows8; N padded to N8, a multiple of 8, with zero rows):
// packed uint8 [N8, Kp/2] holds, per block of 8 rows b, per group g, per 8 columns c of the group, 32
// bytes: byte 4r+p has code[8b+r, g*gs+8c+p] in its low nibble and code[8b+r, g*gs+8c+4+p] in its high
// one; scales / mins float16 [N8, G] hold, per block, [G, 8] (group-major). One 32-byte load unpacks
// (and, shift) into two registers whose 32-bit lane r holds 4 consecutive codes of row 8b+r, so
// vpmaddubsw against 4 broadcast int8 activations yields all 8 rows at once.
// Activations: per row and 32 columns, xq = round(x / dx) in [-127, 127], dx = absmax / 127 (error <=
// dx / 2 per element). y[m, n] = sum_g s[n,g] sum_{b in g} dx[m,b] sum_k q xq + sum_g min[n,g] sx[m,g],
// sx[m,g] = sum_{b in g} dx[m,b] sum_k xq (the same rounded x). Integer sums are exact (int16 over 32
// columns: at most 8 * 2 * 15 * 127 = 30480), so a row's result does not depend on the batch it is in.
// kR8Q8 (the q8 GEMV) is what the fused decode step uses; kR8Exact keeps the float activations (exact float,
// as int4_linear's): up to kR8SmallMaxM rows the small-M kernel below (kR8ExactSmall forces it), above that
// dequantized tiles and sgemm. The Python forward and prefill run kR8Prefill (AMX, else kR8I16).
struct Int4R8 {
  const uint8_t* w;    // [N8, Kp/2] interleaved
  const uint16_t* s;   // [N8 / 8, G, 8] float16
  const uint16_t* mn;  // [N8 / 8, G, 8] float16
  int64_t N, N8, K, Kp, G, gs;
};

// x [M, K] (row stride ldx) -> xq int8 [M, Kp] (zero past K), dx [M, Kp/32], sx [M, G]
void prep_x_q8(const Int4R8& q, const float* x, int64_t ldx, int64_t M, int8_t* xq, float* dx, float* sx) {
  const int64_t K = q.K, Kp = q.Kp, nb = Kp / 32, per_g = q.gs / 32;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  alignas(32) float tmp[32];
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * ldx;
    for (int64_t j = 0; j < nb; ++j) {
      const float* src = xr + j * 32;
      if (j * 32 + 32 > K) {  // the last, partial block: zero padded copy
        for (int i = 0; i < 32; ++i) tmp[i] = j * 32 + i < K ? src[i] : 0.0f;
        src = tmp;
      }
      __m256 v[4];
      for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(src + 8 * i);
      __m256 a = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                               _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      h = _mm_max_ss(h, _mm_movehdup_ps(h));
      const float amax = _mm_cvtss_f32(h);
      const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
      __m256i i32[4];
      for (int i = 0; i < 4; ++i) i32[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));  // nearest even
      const __m256i tot = _mm256_add_epi32(_mm256_add_epi32(i32[0], i32[1]), _mm256_add_epi32(i32[2], i32[3]));
      const __m256i p = _mm256_permutevar8x32_epi32(
          _mm256_packs_epi16(_mm256_packs_epi32(i32[0], i32[1]), _mm256_packs_epi32(i32[2], i32[3])), perm);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + m * Kp + j * 32), p);
      const float d = amax / 127.0f;
      dx[m * nb + j] = d;
      __m128i t = _mm_add_epi32(_mm256_castsi256_si128(tot), _mm256_extracti128_si256(tot, 1));
      t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
      t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
      const float part = d * static_cast<float>(_mm_cvtsi128_si32(t));
      if (j % per_g == 0) sx[m * q.G + j / per_g] = part;
      else sx[m * q.G + j / per_g] += part;
    }
  }
}

// the first ``n`` (1..8) lanes of v to y (the last 8-row block of an output may be partial)
inline void store_lanes(float* y, __m256 v, int64_t n) {
  if (n == 8) {
    _mm256_storeu_ps(y, v);
    return;
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  std::copy(t, t + n, y);
}

inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// The decode GEMVs stream each weight block once (from L3 or DRAM): the 128 bytes of 32 columns are
// prefetched this far ahead (the blocks of a thread's rows are contiguous, so it runs on into the next
// block). On an Intel Xeon with AMX (2 threads, the default model int4 g32) a decode step took 3.5-3.8 ms
// with it against 4.4-4.8 without, interleaved runs; the hardware prefetchers alone do not keep up.
#ifndef QC_R8_PREFETCH
#define QC_R8_PREFETCH 4096
#endif
inline void prefetch_r8(const uint8_t* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p + QC_R8_PREFETCH), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(p + QC_R8_PREFETCH + 64), _MM_HINT_T0);
}

// rows 8b..8b+7 x activation rows m0..m0+MB
template <int MB>
__attribute__((noinline)) void int4r8_q8_kernel(const Int4R8& q, const int8_t* xq, const float* dx, const float* sx,
                                                float* y, int64_t ldy, int64_t b, int64_t m0) {
  const int64_t G = q.G, per_g = q.gs / 32, Kp = q.Kp, nb = Kp / 32;
  const __m256i m4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  const uint8_t* wb = q.w + b * 8 * (Kp / 2);
  const uint16_t* sb = q.s + b * 8 * G;
  const uint16_t* mb = q.mn + b * 8 * G;
  __m256 acc[MB];
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const __m256 sv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + g * 8)));
    const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mb + g * 8)));
    for (int64_t j = g * per_g; j < (g + 1) * per_g; ++j) {  // 32 columns
      prefetch_r8(wb + j * 128);
      __m256i a16[MB];
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m) a16[m] = _mm256_setzero_si256();
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + (j * 4 + c) * 32));
        const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
#pragma GCC unroll 4
        for (int m = 0; m < MB; ++m) {
          const int8_t* xr = xq + (m0 + m) * Kp + j * 32 + c * 8;
          a16[m] = _mm256_add_epi16(a16[m], _mm256_maddubs_epi16(lo, bcast4(xr)));
          a16[m] = _mm256_add_epi16(a16[m], _mm256_maddubs_epi16(hi, bcast4(xr + 4)));
          __asm__("" : "+x"(a16[m]));  // keep the running sum in a register: no reassociation into spills
        }
      }
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m)
        acc[m] = _mm256_fmadd_ps(_mm256_mul_ps(sv, _mm256_set1_ps(dx[(m0 + m) * nb + j])),
                                 _mm256_cvtepi32_ps(_mm256_madd_epi16(a16[m], ones)), acc[m]);
    }
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_fmadd_ps(mv, _mm256_set1_ps(sx[(m0 + m) * G + g]), acc[m]);
  }
  const int64_t n0 = b * 8, rows = std::min<int64_t>(8, q.N - n0);
  for (int m = 0; m < MB; ++m) store_lanes(y + (m0 + m) * ldy + n0, acc[m], rows);
}

#ifdef QC_VNNI
// AVX-512 VNNI form of int4r8_q8_kernel (the one above is its reference): the same exact integer sums per
// 32 columns, so the same results bit for bit. One 64-byte load holds two 8-column chunks of the block (32-bit
// lanes 0-7: chunk c, 8-15: chunk c + 1), and vpdpbusd (u8 codes x s8 activations, 4 products per lane) takes
// the activations expanded once per call by expand_x_vnni: per row and 32 columns, 4 x 64 bytes, each the
// 4-byte groups the lanes need ([w0 x 8 | w2 x 8], [w1 | w3], [w4 | w6], [w5 | w7] of the 8 words).
constexpr int64_t kVnniXBytes = 256;  // expanded activation bytes per row and 32 columns

void expand_x_vnni(const int8_t* xq, int64_t M, int64_t Kp, int8_t* xe) {
  const __m512i idx[4] = {_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2),
                          _mm512_setr_epi32(1, 1, 1, 1, 1, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3, 3),
                          _mm512_setr_epi32(4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6, 6, 6),
                          _mm512_setr_epi32(5, 5, 5, 5, 5, 5, 5, 5, 7, 7, 7, 7, 7, 7, 7, 7)};
  const int64_t nb = Kp / 32;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < nb; ++j) {
      const __m512i v = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * Kp + j * 32)));
      int8_t* o = xe + (m * nb + j) * kVnniXBytes;
      for (int i = 0; i < 4; ++i) _mm512_storeu_si512(o + 64 * i, _mm512_permutexvar_epi32(idx[i], v));
    }
}

template <int MB>
__attribute__((noinline)) void int4r8_q8_kernel_vnni(const Int4R8& q, const int8_t* xe, const float* dx,
                                                     const float* sx, float* y, int64_t ldy, int64_t b, int64_t m0) {
  const int64_t G = q.G, per_g = q.gs / 32, Kp = q.Kp, nb = Kp / 32;
  const __m512i m4 = _mm512_set1_epi8(15);
  const uint8_t* wb = q.w + b * 8 * (Kp / 2);
  const uint16_t* sb = q.s + b * 8 * G;
  const uint16_t* mb = q.mn + b * 8 * G;
  __m256 acc[MB];
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const __m256 sv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + g * 8)));
    const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mb + g * 8)));
    for (int64_t j = g * per_g; j < (g + 1) * per_g; ++j) {  // 32 columns
      prefetch_r8(wb + j * 128);
      const __m512i v0 = _mm512_loadu_si512(wb + j * 128), v1 = _mm512_loadu_si512(wb + j * 128 + 64);
      const __m512i lo0 = _mm512_and_si512(v0, m4), hi0 = _mm512_and_si512(_mm512_srli_epi16(v0, 4), m4);
      const __m512i lo1 = _mm512_and_si512(v1, m4), hi1 = _mm512_and_si512(_mm512_srli_epi16(v1, 4), m4);
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m) {
        const int8_t* xr = xe + ((m0 + m) * nb + j) * kVnniXBytes;
        __m512i a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo0, _mm512_loadu_si512(xr));
        a = _mm512_dpbusd_epi32(a, hi0, _mm512_loadu_si512(xr + 64));
        a = _mm512_dpbusd_epi32(a, lo1, _mm512_loadu_si512(xr + 128));
        a = _mm512_dpbusd_epi32(a, hi1, _mm512_loadu_si512(xr + 192));
        const __m256i s = _mm256_add_epi32(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64(a, 1));
        acc[m] = _mm256_fmadd_ps(_mm256_mul_ps(sv, _mm256_set1_ps(dx[(m0 + m) * nb + j])), _mm256_cvtepi32_ps(s),
                                 acc[m]);
      }
    }
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_fmadd_ps(mv, _mm256_set1_ps(sx[(m0 + m) * G + g]), acc[m]);
  }
  const int64_t n0 = b * 8, rows = std::min<int64_t>(8, q.N - n0);
  for (int m = 0; m < MB; ++m) store_lanes(y + (m0 + m) * ldy + n0, acc[m], rows);
}
#endif

void int4r8_gemv(const Int4R8& q, const float* x, int64_t ldx, int64_t M, float* y) {
  std::vector<int8_t> xq(static_cast<size_t>(M * q.Kp));
  std::vector<float> dx(static_cast<size_t>(M * q.Kp / 32)), sx(static_cast<size_t>(M * q.G));
  prep_x_q8(q, x, ldx, M, xq.data(), dx.data(), sx.data());
  const int64_t blocks = q.N8 / 8, block_bytes = 4 * q.Kp + 32 * q.G;
  const int64_t grain = std::max<int64_t>(1, (int64_t{32} << 10) / block_bytes);  // >= 32 KiB per thread
#ifdef QC_VNNI
  std::vector<int8_t> xe(static_cast<size_t>(M * (q.Kp / 32) * kVnniXBytes));
  expand_x_vnni(xq.data(), M, q.Kp, xe.data());
  const int8_t* xk = xe.data();
#define QC_Q8_KERNEL int4r8_q8_kernel_vnni
#else
  const int8_t* xk = xq.data();
#define QC_Q8_KERNEL int4r8_q8_kernel
#endif
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        switch (std::min<int64_t>(4, M - m0)) {
          case 1: QC_Q8_KERNEL<1>(q, xk, dx.data(), sx.data(), y, q.N, b, m0); break;
          case 2: QC_Q8_KERNEL<2>(q, xk, dx.data(), sx.data(), y, q.N, b, m0); break;
          case 3: QC_Q8_KERNEL<3>(q, xk, dx.data(), sx.data(), y, q.N, b, m0); break;
          default: QC_Q8_KERNEL<4>(q, xk, dx.data(), sx.data(), y, q.N, b, m0); break;
        }
      }
    }
  });
#undef QC_Q8_KERNEL
}

// dequantize row blocks [b0, b0 + nblk) into out [8 * nblk, Kp] (float32)
void int4r8_dequant_blocks(const Int4R8& q, int64_t b0, int64_t nblk, float* out) {
  const int64_t G = q.G, Kp = q.Kp, gs = q.gs;
  const __m256i m4 = _mm256_set1_epi8(15);
  alignas(32) float sf[8], mf[8];
  for (int64_t bi = 0; bi < nblk; ++bi) {
    const int64_t b = b0 + bi;
    const uint8_t* wb = q.w + b * 8 * (Kp / 2);
    float* o = out + bi * 8 * Kp;
    for (int64_t g = 0; g < G; ++g) {
      _mm256_store_ps(sf, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q.s + (b * G + g) * 8))));
      _mm256_store_ps(mf, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q.mn + (b * G + g) * 8))));
      for (int64_t c = 0; c < gs / 8; ++c) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + (g * gs / 8 + c) * 32));
        const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        // 64-bit halves: rows 0, 1 | 4, 5 (ul) and 2, 3 | 6, 7 (uh), each 8 codes in column order
        const __m256i ul = _mm256_unpacklo_epi32(lo, hi), uh = _mm256_unpackhi_epi32(lo, hi);
        const __m128i h[4] = {_mm256_castsi256_si128(ul), _mm256_castsi256_si128(uh),
                              _mm256_extracti128_si256(ul, 1), _mm256_extracti128_si256(uh, 1)};
        for (int i = 0; i < 4; ++i) {
          for (int half = 0; half < 2; ++half) {
            const int r = (i / 2) * 4 + (i % 2) * 2 + half;
            const __m128i codes = half ? _mm_srli_si128(h[i], 8) : h[i];
            const __m256 w = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes)),
                                             _mm256_set1_ps(sf[r]), _mm256_set1_ps(mf[r]));
            _mm256_storeu_ps(o + r * Kp + g * gs + c * 8, w);
          }
        }
      }
    }
  }
}

// kR8ExactSmall (kR8Exact with few activation rows): one 8-row block at a time is dequantized (the same
// fma(code, scale, min) as the tiles) into a column-major L1 buffer wb[k][8], then multiplied with up to
// kR8RowsPerPass activation rows at once; each (row, output) sum runs over k in a fixed order (two
// partial sums, even and odd k), so a row's result does not depend on how many rows came with it.
constexpr int64_t kR8RowsPerPass = 6;
constexpr int64_t kR8SmallMaxM = 16;  // kR8Exact runs this kernel up to here (faster than the tiles: measured)

void int4r8_dequant_block_cols(const Int4R8& q, int64_t b, float* wb) {
  const int64_t G = q.G, Kp = q.Kp, gs = q.gs;
  const __m256i m4 = _mm256_set1_epi8(15), byte = _mm256_set1_epi32(0xFF);
  const uint8_t* w = q.w + b * 8 * (Kp / 2);
  for (int64_t g = 0; g < G; ++g) {
    const __m256 sv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q.s + (b * G + g) * 8)));
    const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q.mn + (b * G + g) * 8)));
    for (int64_t c = 0; c < gs / 8; ++c) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (g * gs / 8 + c) * 32));
      const __m256i half[2] = {_mm256_and_si256(v, m4), _mm256_and_si256(_mm256_srli_epi16(v, 4), m4)};
      float* o = wb + (g * gs + c * 8) * 8;
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {  // lane r of half[j / 4], byte j % 4: code[8b + r, g*gs + 8c + j]
        const __m256i codes = _mm256_and_si256(_mm256_srli_epi32(half[j / 4], 8 * (j % 4)), byte);
        _mm256_storeu_ps(o + j * 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(codes), sv, mv));
      }
    }
  }
}

// accumulators as named variables: gcc kept an __m256 array of them on the stack (a store and a
// reload per FMA, 4x slower), asm barrier or not
#define QC_R8_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
template <int MB>
__attribute__((noinline)) void int4r8_exact_rows(const float* wb, int64_t K, const float* x, int64_t ldx, float* y,
                                                 int64_t ldy, int64_t n0, int64_t rows) {
  static_assert(MB >= 1 && MB <= 6, "int4r8_exact_rows: 1..6 rows");
#define QC_DECL(m) __m256 a0_##m = _mm256_setzero_ps(), a1_##m = _mm256_setzero_ps();
  QC_R8_ROWS(QC_DECL)
#undef QC_DECL
  int64_t k = 0;
  for (; k + 2 <= K; k += 2) {
    const __m256 w0 = _mm256_loadu_ps(wb + k * 8), w1 = _mm256_loadu_ps(wb + k * 8 + 8);
#define QC_FMA2(m)                                                                      \
    if constexpr (MB > m) {                                                             \
      a0_##m = _mm256_fmadd_ps(w0, _mm256_broadcast_ss(x + m * ldx + k), a0_##m);       \
      a1_##m = _mm256_fmadd_ps(w1, _mm256_broadcast_ss(x + m * ldx + k + 1), a1_##m);   \
    }
    QC_R8_ROWS(QC_FMA2)
#undef QC_FMA2
  }
  if (k < K) {
    const __m256 w0 = _mm256_loadu_ps(wb + k * 8);
#define QC_FMA1(m) \
    if constexpr (MB > m) a0_##m = _mm256_fmadd_ps(w0, _mm256_broadcast_ss(x + m * ldx + k), a0_##m);
    QC_R8_ROWS(QC_FMA1)
#undef QC_FMA1
  }
  const __m256 sums[6] = {_mm256_add_ps(a0_0, a1_0), _mm256_add_ps(a0_1, a1_1), _mm256_add_ps(a0_2, a1_2),
                          _mm256_add_ps(a0_3, a1_3), _mm256_add_ps(a0_4, a1_4), _mm256_add_ps(a0_5, a1_5)};
  for (int m = 0; m < MB; ++m) store_lanes(y + m * ldy + n0, sums[m], rows);
}
#undef QC_R8_ROWS

void int4r8_exact_small(const Int4R8& q, const float* x, int64_t ldx, int64_t M, float* y) {
  const int64_t blocks = q.N8 / 8;
  at::parallel_for(0, blocks, 4, [&](int64_t b0, int64_t b1) {
    std::vector<float> wb(static_cast<size_t>(q.Kp * 8));
    for (int64_t b = b0; b < b1; ++b) {
      int4r8_dequant_block_cols(q, b, wb.data());
      const int64_t n0 = b * 8, rows = std::min<int64_t>(8, q.N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += kR8RowsPerPass) {
        const float* xm = x + m0 * ldx;
        float* ym = y + m0 * q.N;
        switch (std::min<int64_t>(kR8RowsPerPass, M - m0)) {
          case 1: int4r8_exact_rows<1>(wb.data(), q.K, xm, ldx, ym, q.N, n0, rows); break;
          case 2: int4r8_exact_rows<2>(wb.data(), q.K, xm, ldx, ym, q.N, n0, rows); break;
          case 3: int4r8_exact_rows<3>(wb.data(), q.K, xm, ldx, ym, q.N, n0, rows); break;
          case 4: int4r8_exact_rows<4>(wb.data(), q.K, xm, ldx, ym, q.N, n0, rows); break;
          case 5: int4r8_exact_rows<5>(wb.data(), q.K, xm, ldx, ym, q.N, n0, rows); break;
          default: int4r8_exact_rows<6>(wb.data(), q.K, xm, ldx, ym, q.N, n0, rows); break;
        }
      }
    }
  });
}

void int4r8_tiled(const Int4R8& q, const at::Tensor& x, const at::Tensor& y) {
  // tiles of whole 8-row blocks; y has N columns, the padding rows of the last block are not written
  const int64_t blocks = q.N8 / 8;
  const int64_t tb = std::max<int64_t>(1, tile_rows(q.Kp) / 8);
  const int64_t grain = std::max<int64_t>(2, std::min<int64_t>(tb, (blocks + 1) / 2));
  const GemmArgs ga{x, y};
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    const at::Tensor buf = x.new_empty({std::min(tb, b1 - b0) * 8 * q.Kp});
    for (int64_t b = b0; b < b1; b += tb) {
      const int64_t nblk = std::min(tb, b1 - b);
      int4r8_dequant_blocks(q, b, nblk, buf.data_ptr<float>());
      gemm_tile(ga, b * 8, std::min(nblk * 8, q.N - b * 8), q.K, buf, q.Kp);
    }
  });
}

}  // namespace
