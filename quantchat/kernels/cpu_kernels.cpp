// Weight-only int4 / int8 linear kernels for x86-64 CPUs: AVX2 + FMA everywhere, AVX-512 VNNI decode GEMVs
// and the AMX-BF16 prefill GEMM (x86/amx_gemm.cpp) in the variants built for CPUs that have them.
//
// Built at first use by quantchat/kernels/cpu.py, once per CPU variant (avx2: -mavx2 -mfma -mf16c;
// avx512_vnni: + -mavx512{f,bw,vl,dq,vnni}; amx: + -mavx512bf16 -mamx-{tile,int8,bf16}), each into its own
// library with its ops in its own namespace (QC_NS = quantchat_<variant>):
//   torch.ops.quantchat_<variant>.int4_linear(x, packed, scales, mins, group_size, in_features, path=kPathAuto)
//   torch.ops.quantchat_<variant>.int8_linear(x, qweight, scales, path=kPathAuto)
// The code a variant adds is chosen at compile time (QC_VNNI: x86/common.h; QC_HAVE_AMX: x86/amx_gemm.cpp)
// next to the AVX2 code it replaces, which stays the reference (and gives the same integer sums).
//
// This file: the ops (each path to its kernel), their shape functions and the registration. The
// kernels, one file per concern, in x86/ (one translation unit with this file, included in this order):
//   common.h    tile sizes, the sgemm tile call, argument checks
//   int4.h      int4, portable layout: float / int16-activation GEMVs, dequantized tiles
//   int4_r8.h   int4, rows interleaved by 8: the int8-activation decode GEMV, the exact small-M kernel, tiles
//   gemm_i16.h  the int16-activation GEMM (prefill without AMX) and its int4 panels
//   int8.h      int8: GEMVs (the LM head), tiles, int8 panels for the int16 GEMM
//   amx_gemm.*  the AMX-BF16 GEMM (its own translation unit)
//
// The paths (kPath*, kR8*) come from quantchat_defs.h, generated from quantchat/kernels/defs.py at build
// time (what each one does: there): kPathAuto = float GEMV for M <= 12, dequantized tiles + sgemm above;
// kPathGemv / kPathTiled force one; kPathGemvI16 = GEMV with int16 activations; kPathAutoI16 = that up to
// 12 rows (int4: tiles above, int8: the int16-activation GEMM above); kPathAmx1-3 = the AMX-BF16 GEMM with
// 1-3 bf16 passes; kPathPrefill = AMX from kAmxMinM rows where this build and the OS allow it, else
// kPathAutoI16 (int8) / kPathAuto (int4).
//
// Threads: at::parallel_for over output rows (torch's OpenMP pool, torch.get_num_threads()).
// Inside the parallel region MKL's sgemm runs single-threaded (OpenMP nesting is off).

// Only the core Tensor class, the parallel-for and the op registry (the first build's time is mostly
// spent parsing torch headers); Tensor methods (new_empty, addmm_) cover the rest.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "cpu_kernels.h"
#include "quantchat_defs.h"
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

#include "x86/common.h"
#include "x86/int4.h"
#include "x86/int4_r8.h"
#include "x86/gemm_i16.h"
#include "x86/int8.h"

namespace {

// ---- the ops: each path to its kernel (x86/*.h) ---------------------------------------------

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
  enum class Mode { kTiled, kGemv, kGemvI16, kAmx };
  using enum Mode;
  Mode mode;
  int passes = kAmxPasses;
  // prefill: AMX where there, else float activations as before (the r8 layout has the int16 GEMM)
  if (path == kPathPrefill) path = use_amx(M) && Kp % 32 == 0 ? kPathAmx1 + kAmxPasses - 1 : kPathAuto;
  switch (path) {
    case kPathAmx1:
    case kPathAmx2:
    case kPathAmx3:
      mode = Kp % 32 == 0 ? kAmx : kTiled;
      passes = static_cast<int>(path - kPathAmx1 + 1);
      break;
    case kPathAuto: mode = small && f_ok ? kGemv : kTiled; break;
    case kPathGemv: mode = f_ok ? kGemv : kTiled; break;
    case kPathTiled: mode = kTiled; break;
    case kPathGemvI16: mode = i_ok ? kGemvI16 : (f_ok ? kGemv : kTiled); break;
    case kPathAutoI16: mode = !small_i16 ? kTiled : (i_ok ? kGemvI16 : (f_ok ? kGemv : kTiled)); break;
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

at::Tensor int4r8_linear(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scales,
                         const at::Tensor& mins, int64_t out_features, int64_t group_size, int64_t in_features,
                         int64_t path) {
  check_int4_args("int4r8_linear", x_in, packed, scales, mins, group_size, 32, in_features);
  const int64_t N8 = packed.size(0), Kp = packed.size(1) * 2, G = scales.size(1);
  TORCH_CHECK(N8 % 8 == 0, "int4r8_linear: rows must be a multiple of 8 (padded)");
  TORCH_CHECK(out_features > N8 - 8 && out_features <= N8, "int4r8_linear: out_features inconsistent with rows");
  TORCH_CHECK(path >= 0 && path <= kR8Last, "int4r8_linear: unknown path ", path);
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
  } else if (path == kR8ExactSmall || M <= kR8SmallMaxM) {
    int4r8_exact_small(q, x.data_ptr<float>(), x.stride(0), M, y.data_ptr<float>());
  } else {
    int4r8_tiled(q, x, y);
  }
  return y;
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
  const Int8 q{qweight.data_ptr<int8_t>(), scales.data_ptr<float>(), N, K};
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
                                       int8_dequant_rows_padded(q, n0, rows, Kp, out);
                                     });
  } else if (path == kPathAutoI16 && !small) {  // prefill without AMX: the int16-activation GEMM
    int8_i16_gemm(q, xp, ldx, M, yp);
  } else if (path == kPathGemvI16 || (path == kPathAutoI16 && small)) {
    int8_gemv_i16(q, xp, ldx, M, yp);
  } else if (path == kPathGemv || (path == kPathAuto && small)) {
    int8_gemv(q, xp, ldx, M, yp);
  } else {
    int8_tiled(q, x, y);
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
#ifdef QC_VNNI
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
  // the default paths: kPathAuto, kR8Exact
  static_assert(kPathAuto == 0 && kR8Exact == 0, "the schemas' default path=0");
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
