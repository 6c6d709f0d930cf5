// AMX-BF16 GEMM for prefill-sized matrices (x86/amx_gemm.cpp): y = x W^T with W made panel by panel from
// any weight format (the caller dequantizes 32 rows at a time into float32), in bfloat16 tiles with float32
// sums. Compiled into every variant; only the "amx" variant (-mamx-tile -mamx-bf16 -mavx512bf16) has the
// code, the others report why not.
#pragma once

#include <cstdint>
#include <functional>

namespace quantchat_kernels {

// rows of W per panel (two 16-column B tiles)
constexpr int64_t kAmxPanelRows = 32;

// nullptr when AMX tiles can be used in this process (this build has them, the CPU has AMX-BF16 and the
// kernel granted the tile data permission: arch_prctl(ARCH_REQ_XCOMP_PERM), asked once), else why not
const char* amx_unavailable_reason();

// make_rows(n0, rows, out): W's rows [n0, n0 + rows) (rows <= kAmxPanelRows) as float32 into out
// [rows][Kp] (columns past K zero); rows past them in out may be written too (they are ignored).
using PanelRows = std::function<void(int64_t n0, int64_t rows, float* out)>;

// y [M, N] (row stride ldy) = x [M, K] (row stride ldx) W^T, W [N, Kp] given by make_rows (Kp: a multiple
// of 32, >= K). passes: how many bfloat16 products stand for each float product:
//   1: bf16(x) bf16(w)
//   2: (bf16(x) + bf16(x - bf16(x))) bf16(w): x to ~16 significant bits
//   3: the 2-pass sum + bf16(x) bf16(w - bf16(w)): x and w to ~16 bits (about float32's accuracy)
// Sums are float32 (in the tiles). Threads: at::parallel_for over panels.
void amx_bf16_gemm(int64_t N, int64_t K, int64_t Kp, const float* x, int64_t ldx, int64_t M, float* y,
                   int64_t ldy, int passes, const PanelRows& make_rows);

}  // namespace quantchat_kernels
