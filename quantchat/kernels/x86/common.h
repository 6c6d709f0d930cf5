// Shared by the linear kernels: tile sizes, the prefill paths' AMX threshold, the sgemm tile call, argument checks.
//
// A part of the kernels' translation unit: cpu_kernels.cpp includes the parts in this order (common.h first).
// The helpers stay in an anonymous namespace: one library per CPU variant, nothing exported from here.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include "cpu_kernels.h"
#include "quantchat_defs.h"  // the paths (kPath*, kR8*): generated from quantchat/kernels/defs.py
#include "x86/amx_gemm.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// the AVX-512 VNNI forms of the decode GEMVs and the int16 GEMM, next to the AVX2 code they replace
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define QC_VNNI 1
#endif

namespace {

using quantchat_kernels::dot;
using quantchat_kernels::hsum;

// auto path: GEMV for M <= these, dequantized tiles + sgemm above (measured crossovers, 1 thread)
constexpr int64_t kMaxGemvM = 12;     // int4, float GEMV
constexpr int64_t kMaxGemvI16M = 12;  // int4, int16-activation GEMV (kPathAutoI16)

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

}  // namespace
