// Weight-only int4 / int8 linear kernels for x86-64 CPUs: AVX2 + FMA everywhere, AVX-512 VNNI decode GEMVs
// and the AMX-BF16 prefill GEMM (x86/amx_gemm.cpp) in the variants built for CPUs that have them.
//
// Built at first use by quantchat/kernels/cpu.py, once per CPU variant (avx2: -mavx2 -mfma -mf16c;
// avx512_vnni: + -mavx512{f,bw,vl,dq,vnni}; amx: + -mavx512bf16 -mamx-{tile,int8,bf16}), each into its own
// library with its ops in its own namespace (QC_NS = quantchat_<variant>):
//   torch.ops.quantchat_<variant>.int4_linear(x, packed, scales, mins, group_size, in_features, path=0)
//   torch.ops.quantchat_<variant>.int8_linear(x, qweight, scales, path=0)
// The code a variant adds is chosen at compile time (QC_VNNI below; QC_HAVE_AMX in x86/amx_gemm.cpp) next
// to the AVX2 code it replaces, which stays the reference (and gives the same integer sums).
//
// path (kPath* below): 0 = auto (float GEMV for M <= 12 (int8: 12), dequantized tiles + sgemm above), 1 = float
// GEMV, 2 = tiles, 3 = GEMV with int16 activations, 4 = auto with the int16 GEMV for M <= 12 (int4: tiles
// above, int8: the int16-activation GEMM above), 5-7 = the AMX-BF16 GEMM with 1-3 bf16 passes, 8 = prefill:
// AMX from kAmxMinM rows where this build and the OS allow it, else 4 (int8) / 0 (int4).
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
// Threads: at::parallel_for over output rows (torch's OpenMP pool, torch.get_num_threads()).
// Inside the parallel region MKL's sgemm runs single-threaded (OpenMP nesting is off).

// Only the core Tensor class, the parallel-for and the op registry (the first build's time is mostly
// spent parsing torch headers); Tensor methods (new_empty, addmm_) cover the rest.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "cpu_kernels.h"
#include "x86/amx_gemm.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

// Fortran BLAS sgemm, exported by torch's MKL build (libtorch_cpu). Weak: a torch without it
// leaves this null and Tensor::addmm_ is used instead.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace {

using quantchat_kernels::dot;
using quantchat_kernels::hsum;

// auto path: GEMV for M <= these, dequantized tiles + sgemm above (measured crossovers, 1 thread)
constexpr int64_t kMaxGemvM = 12;     // int4, float GEMV
constexpr int64_t kMaxGemvI16M = 12;  // int4, int16-activation GEMV (path 4)

// int4r8_linear's paths (cpu.py: R8_*)
constexpr int64_t kR8Exact = 0, kR8Q8 = 1, kR8ExactSmall = 2, kR8I16 = 3, kR8Amx1 = 4, kR8Amx2 = 5, kR8Amx3 = 6,
                  kR8Prefill = 7, kR8LastPath = 7;
// int8_linear's paths (cpu.py: PATH_*)
constexpr int64_t kPathAuto = 0, kPathGemv = 1, kPathTiled = 2, kPathGemvI16 = 3, kPathAutoI16 = 4, kPathAmx1 = 5,
                  kPathAmx2 = 6, kPathAmx3 = 7, kPathPrefill = 8, kPathLast = 8;
// the prefill paths (kR8Prefill, kPathPrefill): the AMX GEMM from this many rows (where the build and the OS
// allow it), with this many bf16 passes; below, or without AMX, the int16-activation GEMM / GEMV
#ifndef QC_AMX_MIN_M
#define QC_AMX_MIN_M 48
#endif
#ifndef QC_AMX_PASSES
#define QC_AMX_PASSES 3
#endif
constexpr int64_t kAmxMinM = QC_AMX_MIN_M;
constexpr int kAmxPasses = QC_AMX_PASSES;

bool use_amx(int64_t M) { return M >= kAmxMinM && quantchat_kernels::amx_unavailable_reason() == nullptr; }
constexpr int64_t kMaxGemvM8 = 12;    // int8
#ifndef QC_TILE_KIB
#define QC_TILE_KIB 192
#endif
constexpr int64_t kTileBytes = QC_TILE_KIB << 10;  // dequantized tile per thread (L2: 512 KiB on Zen 3)

inline __m256i load8_u8_epi32(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

inline __m256 load8_i8_ps(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// ------------------------------------------------------------------------------------------------
// sgemm on a dequantized tile: y[m, n0 + t] = sum_k x[m, k] * tile[t, k], t < T, m < M, with
// tile [T, K] (row stride ldt), x [M, K] (row stride ldx), y [M, N] (row stride ldy).
// Fallback without the BLAS symbol: addmm_ on tensor views.
// ------------------------------------------------------------------------------------------------
struct GemmArgs {
  const at::Tensor& x;  // [M, K] float32, unit column stride
  const at::Tensor& y;  // [M, N]
};

void gemm_tile(const GemmArgs& a, int64_t n0, int64_t T, int64_t K, const at::Tensor& tile, int64_t ldt) {
  const float* tp = tile.data_ptr<float>();
  const float* xp = a.x.data_ptr<float>();
  float* yp = a.y.data_ptr<float>() + n0;
  const int64_t M = a.x.size(0), ldx = a.x.stride(0), ldy = a.y.stride(0);
#ifndef QC_NO_SGEMM
  if (sgemm_ != nullptr) {
    // column-major view: y^T [T, M] (ld ldy) = tile [T, K] (as K x T, transposed) * x^T [K, M] (ld ldx)
    const char ta = 'T', tb = 'N';
    const int m = static_cast<int>(T), n = static_cast<int>(M), k = static_cast<int>(K);
    const int lda = static_cast<int>(ldt), ldb = static_cast<int>(ldx), ldc = static_cast<int>(ldy);
    const float one = 1.0f, zero = 0.0f;
    sgemm_(&ta, &tb, &m, &n, &k, &one, tp, &lda, xp, &ldb, &zero, yp, &ldc);
    return;
  }
#endif
  at::Tensor w = tile.as_strided({T, K}, {ldt, 1});
  at::Tensor out = a.y.narrow(1, n0, T);
  out.addmm_(a.x, w.t(), /*beta=*/0, /*alpha=*/1);
}

// rows per tile for the tiled path: ~kTileBytes of floats, but at least 64 rows (sgemm is less
// efficient on thinner tiles: measured at K=1536)
int64_t tile_rows(int64_t row_floats) {
  int64_t t = kTileBytes / (row_floats * 4);
  t = std::max<int64_t>(64, std::min<int64_t>(256, t));
  return t / 8 * 8;
}

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

at::Tensor as_float_rows(const at::Tensor& x) {
  // [M, K] float32 with unit column stride (any row stride)
  if (x.stride(1) == 1 && x.stride(0) >= x.size(1)) return x;
  return x.contiguous();
}

void check_int4_args(const char* op, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                     const at::Tensor& mins, int64_t group_size, int64_t group_multiple, int64_t in_features) {
  // shared by the canonical and the r8 int4 layouts: codes [rows, Kp/2], float16 scales/mins [rows, G]
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, op, ": x must be a float32 [M, K]");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous(), op,
              ": packed must be a contiguous uint8 [N, Kp/2]");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.dim() == 2 && scales.is_contiguous() &&
                  mins.scalar_type() == at::kHalf && mins.sizes() == scales.sizes() && mins.is_contiguous(),
              op, ": scales and mins must be contiguous float16 [N, G]");
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), op, ": CPU tensors only");
  const int64_t Kp = packed.size(1) * 2, G = scales.size(1);
  TORCH_CHECK(scales.size(0) == packed.size(0), op, ": scales rows != packed rows");
  TORCH_CHECK(group_size > 0 && group_size % group_multiple == 0 && G * group_size == Kp, op,
              ": group_size must be a multiple of ", group_multiple,
              " with groups * group_size == packed width * 2");
  TORCH_CHECK(in_features > 0 && in_features <= Kp && Kp - in_features < group_size, op,
              ": in_features inconsistent with the packed width");
  TORCH_CHECK(x.size(1) == in_features, op, ": x has ", x.size(1), " columns, expected ", in_features);
}

at::Tensor int4_linear(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scales,
                       const at::Tensor& mins, int64_t group_size, int64_t in_features, int64_t path) {
  check_int4_args("int4_linear", x_in, packed, scales, mins, group_size, 2, in_features);
  const int64_t N = packed.size(0), Kp = packed.size(1) * 2, G = scales.size(1);
  const at::Tensor x = as_float_rows(x_in);
  const int64_t M = x.size(0);
  at::Tensor y = x.new_empty({M, N});
  if (M == 0 || N == 0) return y;
  Int4 q{packed.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()),
         reinterpret_cast<const uint16_t*>(mins.data_ptr<at::Half>()), N, in_features, Kp, G, group_size};
  // the float GEMV reads 16 codes at a time, the int16 one 32: other group sizes take the tiled path
  const bool small = M <= kMaxGemvM, small_i16 = M <= kMaxGemvI16M;
  const bool f_ok = group_size % 16 == 0, i_ok = group_size % 32 == 0;
  const int kTiled = 0, kGemv = 1, kGemvI16 = 3, kAmx = 5;
  int mode, passes = kAmxPasses;
  // prefill: AMX where there, else float activations as before (the r8 layout has the int16 GEMM)
  if (path == kPathPrefill) path = use_amx(M) && Kp % 32 == 0 ? kPathAmx1 + kAmxPasses - 1 : kPathAuto;
  switch (path) {
    case kPathAmx1:
    case kPathAmx2:
    case kPathAmx3:
      mode = Kp % 32 == 0 ? kAmx : kTiled;
      passes = static_cast<int>(path - kPathAmx1 + 1);
      break;
    case 0: mode = small && f_ok ? kGemv : kTiled; break;
    case 1: mode = f_ok ? kGemv : kTiled; break;
    case 2: mode = kTiled; break;
    case 3: mode = i_ok ? kGemvI16 : (f_ok ? kGemv : kTiled); break;
    case 4: mode = !small_i16 ? kTiled : (i_ok ? kGemvI16 : (f_ok ? kGemv : kTiled)); break;
    default: TORCH_CHECK(false, "int4_linear: unknown path ", path);
  }
  if (mode == kAmx) {
    quantchat_kernels::amx_bf16_gemm(N, in_features, Kp, x.data_ptr<float>(), x.stride(0), M, y.data_ptr<float>(), N,
                                     passes, [&](int64_t n0, int64_t rows, float* out) {
                                       int4_dequant_rows(q, n0, rows, out);
                                     });
  } else if (mode == kGemvI16) {
    int4_gemv_i16(q, x.data_ptr<float>(), x.stride(0), M, y.data_ptr<float>());
  } else if (mode == kGemv) {
    int4_gemv(q, x.data_ptr<float>(), x.stride(0), M, y.data_ptr<float>());
  } else {
    int4_tiled(q, x, y);
  }
  return y;
}

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
// path 1 (q8 GEMV) is what the fused decode step uses; path 0 keeps the float activations (exact float,
// as int4_linear's): up to kR8SmallMaxM rows the small-M kernel below (path 2 forces it), above that
// dequantized tiles and sgemm. The Python forward and prefill run path 0.
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

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define QC_VNNI 1
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

// path 2 (EXACT with few activation rows): one 8-row block at a time is dequantized (the same
// fma(code, scale, min) as the tiles) into a column-major L1 buffer wb[k][8], then multiplied with up to
// kR8RowsPerPass activation rows at once; each (row, output) sum runs over k in a fixed order (two
// partial sums, even and odd k), so a row's result does not depend on how many rows came with it.
constexpr int64_t kR8RowsPerPass = 6;
constexpr int64_t kR8SmallMaxM = 16;  // path 0 runs this kernel up to here (faster than the tiles: measured)

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

void prep_x_i16_rows(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t Kp, int16_t* xq, float* dx);

// ------------------------------------------------------------------------------------------------
// path 3 (prefill): int16 activations (per row and weight group, dx = absmax / 32767) times the int4
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

at::Tensor int4r8_linear(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scales,
                         const at::Tensor& mins, int64_t out_features, int64_t group_size, int64_t in_features,
                         int64_t path) {
  check_int4_args("int4r8_linear", x_in, packed, scales, mins, group_size, 32, in_features);
  const int64_t N8 = packed.size(0), Kp = packed.size(1) * 2, G = scales.size(1);
  TORCH_CHECK(N8 % 8 == 0, "int4r8_linear: rows must be a multiple of 8 (padded)");
  TORCH_CHECK(out_features > N8 - 8 && out_features <= N8, "int4r8_linear: out_features inconsistent with rows");
  TORCH_CHECK(path >= 0 && path <= kR8LastPath, "int4r8_linear: unknown path ", path);
  const at::Tensor x = as_float_rows(x_in);
  const int64_t M = x.size(0);
  at::Tensor y = x.new_empty({M, out_features});
  if (M == 0) return y;
  Int4R8 q{packed.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()),
           reinterpret_cast<const uint16_t*>(mins.data_ptr<at::Half>()), out_features, N8, in_features, Kp, G,
           group_size};
  if (path == kR8Prefill) path = use_amx(M) ? kR8Amx1 + kAmxPasses - 1 : kR8I16;
  if (path >= kR8Amx1 && path <= kR8Amx3) {
    quantchat_kernels::amx_bf16_gemm(out_features, in_features, Kp, x.data_ptr<float>(), x.stride(0), M,
                                     y.data_ptr<float>(), out_features, static_cast<int>(path - kR8Amx1 + 1),
                                     [&](int64_t n0, int64_t rows, float* out) {
                                       int4r8_dequant_blocks(q, n0 / 8, (rows + 7) / 8, out);
                                     });
  } else if (path == kR8Q8) {
    int4r8_gemv(q, x.data_ptr<float>(), x.stride(0), M, y.data_ptr<float>());
  } else if (path == kR8I16) {
    int4r8_i16_gemm(q, x.data_ptr<float>(), x.stride(0), M, y.data_ptr<float>());
  } else if (path == 2 || M <= kR8SmallMaxM) {
    int4r8_exact_small(q, x.data_ptr<float>(), x.stride(0), M, y.data_ptr<float>());
  } else {
    int4r8_tiled(q, x, y);
  }
  return y;
}

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
// int8 GEMV with int16 activations (path 3, and path 4 for M <= kMaxGemvM8): x is rounded per call
// and row to int16, x ~= dx[m] * xq (dx = absmax / 32767, error <= dx / 2 per element: about 1e-5 of
// the output, far below bfloat16 rounding), and the products are exact integer sums (vpmaddwd on the
// sign-extended weights): y = s[n] dx[m] sum_k q xq. Half the instructions per multiply-add of the
// float GEMV, and a row's result does not depend on the batch it is in. The int32 lanes are flushed to
// float every kI16Chunk columns (at most 2 * kI16Chunk / 16 products of |q| <= 128, |xq| <= 32767 per
// lane: < 2^31).
// ------------------------------------------------------------------------------------------------
constexpr int64_t kI16Chunk = 2048;

// x [M, K] (row stride ldx) -> xq int16 [M, Kp] (Kp = K rounded up to 16; zeros past K), dx [M]
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

// int8 weights in the int16-activation GEMM (path 4 above kMaxGemvM8 rows: prefill): groups of kI8Group
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

at::Tensor int8_linear(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales, int64_t path) {
  TORCH_CHECK(x_in.dim() == 2, "int8_linear: x must be 2-D [M, K]");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, "int8_linear: x must be float32");
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2 && qweight.is_contiguous(),
              "int8_linear: qweight must be a contiguous int8 [N, K]");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 1 && scales.is_contiguous() &&
                  scales.size(0) == qweight.size(0),
              "int8_linear: scales must be a contiguous float32 [N]");
  TORCH_CHECK(x_in.device().is_cpu() && qweight.device().is_cpu(), "int8_linear: CPU tensors only");
  TORCH_CHECK(x_in.size(1) == qweight.size(1), "int8_linear: x has ", x_in.size(1), " columns, expected ",
              qweight.size(1));
  const at::Tensor x = as_float_rows(x_in);
  const int64_t M = x.size(0), N = qweight.size(0), K = qweight.size(1);
  at::Tensor y = x.new_empty({M, N});
  if (M == 0 || N == 0) return y;
  if (K == 0) return y.zero_();
  const int8_t* w = qweight.data_ptr<int8_t>();
  const float* s = scales.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  float* yp = y.data_ptr<float>();
  TORCH_CHECK(path >= 0 && path <= kPathLast, "int8_linear: unknown path ", path);
  const bool small = M <= kMaxGemvM8;
  if (path == kPathPrefill) path = use_amx(M) ? kPathAmx1 + kAmxPasses - 1 : kPathAutoI16;
  if (path >= kPathAmx1 && path <= kPathAmx3) {
    const int64_t Kp = (K + 31) / 32 * 32;
    quantchat_kernels::amx_bf16_gemm(N, K, Kp, xp, ldx, M, yp, N, static_cast<int>(path - kPathAmx1 + 1),
                                     [&](int64_t n0, int64_t rows, float* out) {
                                       for (int64_t r = 0; r < rows; ++r) {
                                         int8_dequant_rows(w, K, s, n0 + r, 1, out + r * Kp);
                                         std::fill(out + r * Kp + K, out + (r + 1) * Kp, 0.0f);
                                       }
                                     });
  } else if (path == 4 && !small) {  // prefill: the int16-activation GEMM
    const int64_t Kp = (K + kI8Group - 1) / kI8Group * kI8Group;
    i16_gemm(N, Kp, kI8Group, xp, ldx, K, M, yp, false, [&](int64_t p, int16_t* panel, float* sf, float*) {
      int8_panel_i16(w, s, N, K, Kp, p, panel, sf);
    });
  } else if (path == 3 || (path == 4 && small)) {
    const int64_t Kp = (K + 15) / 16 * 16;
    std::vector<int16_t> xq(static_cast<size_t>(M * Kp));
    std::vector<float> dx(static_cast<size_t>(M));
    prep_x_i16_rows(xp, ldx, M, K, Kp, xq.data(), dx.data());
    const int16_t* xqp = xq.data();
    const float* dxp = dx.data();
    const int64_t grain = std::max<int64_t>(4, (int64_t{32} << 10) / K);
    at::parallel_for(0, N, grain, [&](int64_t nb, int64_t ne) {
      int8_gemv_i16_rows(w, K, s, xqp, Kp, dxp, M, yp, N, nb, ne);
    });
  } else if (path == 1 || (path == 0 && small)) {
    const int64_t grain = std::max<int64_t>(4, (int64_t{32} << 10) / K);
    at::parallel_for(0, N, grain, [&](int64_t nb, int64_t ne) {
      int8_gemv_rows(w, K, s, xp, ldx, M, yp, N, nb, ne);
    });
  } else {
    const int64_t T = tile_rows(K);
    const int64_t grain = std::max<int64_t>(16, std::min<int64_t>(T, (N + 1) / 2));
    const GemmArgs ga{x, y};
    at::parallel_for(0, N, grain, [&](int64_t nb, int64_t ne) {
      const at::Tensor buf = x.new_empty({std::min(T, ne - nb) * K});
      for (int64_t n = nb; n < ne; n += T) {
        const int64_t t = std::min(T, ne - n);
        int8_dequant_rows(w, K, s, n, t, buf.data_ptr<float>());
        gemm_tile(ga, n, t, K, buf, K);
      }
    });
  }
  return y;
}

// shape functions for tracing (torch.compile / meta tensors)
at::Tensor int4_linear_meta(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                            const at::Tensor& mins, int64_t group_size, int64_t in_features, int64_t path) {
  return x.new_empty({x.size(0), packed.size(0)});
}

at::Tensor int8_linear_meta(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            int64_t path) {
  return x.new_empty({x.size(0), qweight.size(0)});
}

at::Tensor int4r8_linear_meta(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                              const at::Tensor& mins, int64_t out_features, int64_t group_size, int64_t in_features,
                              int64_t path) {
  return x.new_empty({x.size(0), out_features});
}

int64_t has_blas() { return sgemm_ != nullptr ? 1 : 0; }

#ifndef QC_VARIANT
#define QC_VARIANT "avx2"
#endif
// what this build's code paths are (quantchat inspect --cpu)
std::string isa_info() {
  std::string out = std::string("variant ") + QC_VARIANT + "; decode GEMVs: ";
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  out += "AVX-512 VNNI (vpdpbusd int4 x int8, vpdpwssd int8 x int16)";
#else
  out += "AVX2 (vpmaddubsw int4 x int8, vpmaddwd int8 x int16)";
#endif
  out += "; prefill GEMM: ";
  const char* amx = quantchat_kernels::amx_unavailable_reason();
  if (amx == nullptr) {
    out += "AMX-BF16 tiles from " + std::to_string(kAmxMinM) + " rows (" + std::to_string(kAmxPasses) +
           " bf16 passes, float32 sums), int16-activation GEMM below";
  } else {
    out += std::string("int16-activation GEMM (vpmaddwd); AMX: ") + amx;
  }
  return out;
}

}  // namespace

namespace quantchat_kernels {
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                       const at::Tensor& mins, int64_t group_size, int64_t in_features, int64_t path) {
  return ::int4_linear(x, packed, scales, mins, group_size, in_features, path);
}
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t path) {
  return ::int8_linear(x, qweight, scales, path);
}
at::Tensor int4r8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                         const at::Tensor& mins, int64_t out_features, int64_t group_size, int64_t in_features,
                         int64_t path) {
  return ::int4r8_linear(x, packed, scales, mins, out_features, group_size, in_features, path);
}
}  // namespace quantchat_kernels

// the op namespace is a macro only so that benchmark variants can be loaded side by side
#ifndef QC_NS
#define QC_NS quantchat
#endif
#define QC_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define QC_LIBRARY_IMPL(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)

QC_LIBRARY(QC_NS, m) {
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scales, Tensor mins, int group_size, int in_features, "
        "int path=0) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor qweight, Tensor scales, int path=0) -> Tensor");
  m.def("int4r8_linear(Tensor x, Tensor packed, Tensor scales, Tensor mins, int out_features, int group_size, "
        "int in_features, int path=0) -> Tensor");
  m.def("kernels_info() -> int");
  m.impl("kernels_info", &has_blas);
  m.def("isa_info() -> str");
  m.impl("isa_info", &isa_info);
}

QC_LIBRARY_IMPL(QC_NS, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int8_linear", &int8_linear);
  m.impl("int4r8_linear", &int4r8_linear);
}

QC_LIBRARY_IMPL(QC_NS, Meta, m) {
  m.impl("int4r8_linear", &int4r8_linear_meta);
  m.impl("int4_linear", &int4_linear_meta);
  m.impl("int8_linear", &int8_linear_meta);
}
