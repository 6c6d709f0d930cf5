// AMX-BF16 GEMM (see amx_gemm.h). Only the "amx" variant compiles the tile code (__AMX_BF16__); the
// others keep the entry points, which then say why AMX is not there.
//
// Tiles (palette 1, all 16 rows x 64 bytes): 0-3 float32 sums C[2 x 2] (32 rows of x by 32 columns of W),
// 4-5 two A tiles (16 rows of x, 32 bf16 columns each), 6-7 two B tiles (W's panel in the VNNI layout: 16
// rows of column pairs (k, k+1), 16 output columns each). Per thread: W's panel of 32 rows is made once
// (float32 rows from the caller, then bf16 in the VNNI layout: a 16 x 16 32-bit transpose per tile), then
// every 32 rows of x run against it. x is converted once per call into bf16 (and its remainder x - bf16(x)
// for 2 or 3 passes), zero padded to a multiple of 32 rows.
#include "x86/amx_gemm.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
#define QC_HAVE_AMX 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace quantchat_kernels {

#ifdef QC_HAVE_AMX
namespace {

constexpr int kArchReqXcompPerm = 0x1023;  // arch_prctl: ask for an extended state component
constexpr int kXfeatureXtiledata = 18;     // the AMX tile data state component
// tile register numbers (macros: the tile intrinsics paste them into the instruction text)
#define kTileC00 0
#define kTileC01 1
#define kTileC10 2
#define kTileC11 3
#define kTileA0 4
#define kTileA1 5
#define kTileB0 6
#define kTileB1 7
constexpr int64_t kTileRows = 16, kTileBytes = 64, kChunk = 32;  // a tile: 16 rows x 32 bf16 (k) or 16 floats
constexpr int64_t kTileElems = kTileRows * kTileBytes / 2;        // bf16 per tile (512)

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// GCC 12's _tile_loadconfig declares an 8-byte memory operand, so the rest of the 64-byte config can be
// dropped as dead stores (ldtilecfg then faults): the whole struct is the operand here
inline void load_tile_config(const TileConfig& c) { __asm__ volatile("ldtilecfg %0" ::"m"(c)); }
inline void release_tiles() { __asm__ volatile("tilerelease" ::); }

const char* amx_check() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 22)))
    return "the CPU lacks AMX-TILE / AMX-BF16 (cpuid)";
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a & (1u << 5))) return "the CPU lacks AVX512-BF16 (cpuid)";
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0)
    return "the OS refused AMX tile data (arch_prctl ARCH_REQ_XCOMP_PERM)";
  return nullptr;
}

inline __m512i bf16_pairs(__m512 v0, __m512 v1) { return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(v1, v0)); }

// 32 floats (v0: k = 0..15, v1: k = 16..31) -> bf16 pairs (32-bit element j: k = 2j low, 2j + 1 high) of
// their rounding (hi) and, when lo != nullptr, of the remainder x - float(hi) in the same order
inline __m512i split_pairs(__m512 v0, __m512 v1, __m512i* lo) {
  const __m512i h = bf16_pairs(v0, v1);
  if (lo) {
    const __m512i idx_e = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i idx_o = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    const __m512i idx_lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i idx_hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const __m512 h_even = _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));  // float(hi) at k = 2j
    const __m512 h_odd = _mm512_castsi512_ps(_mm512_and_si512(h, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
    const __m512 re = _mm512_sub_ps(_mm512_permutex2var_ps(v0, idx_e, v1), h_even);
    const __m512 ro = _mm512_sub_ps(_mm512_permutex2var_ps(v0, idx_o, v1), h_odd);
    *lo = bf16_pairs(_mm512_permutex2var_ps(re, idx_lo, ro), _mm512_permutex2var_ps(re, idx_hi, ro));
  }
  return h;
}

// r[16] rows of 16 32-bit elements -> r[j] = column j (in place)
inline void transpose16x16(__m512i r[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    b[4 * i + 0] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
  }
  // 128-bit lane L of b[4i + q] holds column 4L + q of rows 4i..4i+3
  for (int q = 0; q < 4; ++q) {
    const __m512i c0 = _mm512_shuffle_i32x4(b[q], b[4 + q], 0x88), c1 = _mm512_shuffle_i32x4(b[q], b[4 + q], 0xDD);
    const __m512i d0 = _mm512_shuffle_i32x4(b[8 + q], b[12 + q], 0x88),
                  d1 = _mm512_shuffle_i32x4(b[8 + q], b[12 + q], 0xDD);
    r[q] = _mm512_shuffle_i32x4(c0, d0, 0x88);
    r[4 + q] = _mm512_shuffle_i32x4(c1, d1, 0x88);
    r[8 + q] = _mm512_shuffle_i32x4(c0, d0, 0xDD);
    r[12 + q] = _mm512_shuffle_i32x4(c1, d1, 0xDD);
  }
}

// float rows [32][Kp] -> B tiles: hi (and lo = w - hi when lo != nullptr), per chunk of 32 k two tiles
// [16 pair rows][16 columns][2]
void panel_to_vnni(const float* rows, int64_t Kp, uint16_t* hi, uint16_t* lo) {
  __m512i h[16], l[16];
  for (int64_t c = 0; c < Kp / kChunk; ++c) {
    for (int t = 0; t < 2; ++t) {
      for (int r = 0; r < 16; ++r) {
        const float* src = rows + (t * 16 + r) * Kp + c * kChunk;
        const __m512 v0 = _mm512_loadu_ps(src), v1 = _mm512_loadu_ps(src + 16);
        h[r] = split_pairs(v0, v1, lo ? &l[r] : nullptr);
      }
      transpose16x16(h);
      uint16_t* dh = hi + (c * 2 + t) * kTileElems;
      for (int j = 0; j < 16; ++j) _mm512_storeu_si512(dh + j * 32, h[j]);
      if (lo) {
        transpose16x16(l);
        uint16_t* dl = lo + (c * 2 + t) * kTileElems;
        for (int j = 0; j < 16; ++j) _mm512_storeu_si512(dl + j * 32, l[j]);
      }
    }
  }
}

// x [M, K] -> xh (and xl = x - xh) bf16 [Mp, Kp], zero padded
void convert_x(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t Mp, int64_t Kp, uint16_t* xh,
               uint16_t* xl) {
  at::parallel_for(0, Mp, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* xr = x + m * ldx;
      for (int64_t k = 0; k < Kp; k += kChunk) {
        __m512 v0 = _mm512_setzero_ps(), v1 = _mm512_setzero_ps();
        if (m < M) {
          const int64_t n0 = std::clamp<int64_t>(K - k, 0, 16), n1 = std::clamp<int64_t>(K - k - 16, 0, 16);
          v0 = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n0) - 1), xr + k);
          v1 = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n1) - 1), xr + k + 16);
        }
        __m512i l;
        _mm512_storeu_si512(xh + m * Kp + k, split_pairs(v0, v1, xl ? &l : nullptr));
        if (xl) _mm512_storeu_si512(xl + m * Kp + k, l);
      }
    }
  });
}

// the 2 x 2 block product of the loaded tiles: C_ij += A_i B_j
inline void dot_2x2() {
  _tile_dpbf16ps(kTileC00, kTileA0, kTileB0);
  _tile_dpbf16ps(kTileC01, kTileA0, kTileB1);
  _tile_dpbf16ps(kTileC10, kTileA1, kTileB0);
  _tile_dpbf16ps(kTileC11, kTileA1, kTileB1);
}

// A tiles: rows r and r + 16 of x (row stride Kp bf16), columns of chunk c; B tiles: the panel's chunk c
inline void load_a(const uint16_t* x, int64_t Kp, int64_t c) {
  _tile_loadd(kTileA0, x + c * kChunk, Kp * 2);
  _tile_loadd(kTileA1, x + 16 * Kp + c * kChunk, Kp * 2);
}
inline void load_b(const uint16_t* panel, int64_t c) {
  _tile_loadd(kTileB0, panel + (c * 2) * kTileElems, kTileBytes);
  _tile_loadd(kTileB1, panel + (c * 2 + 1) * kTileElems, kTileBytes);
}

// C[2 x 2] = sum over chunks of A (rows m0.., m0 + 16..) x B (the panel's two tiles), passes as above:
// xh wh, then xl wh (B kept), then xh wl
template <int Passes>
inline void panel_times_rows(const uint16_t* xh, const uint16_t* xl, int64_t Kp, int64_t m0, const uint16_t* ph,
                             const uint16_t* pl) {
  const uint16_t* ah = xh + m0 * Kp;
  const uint16_t* al = xl ? xl + m0 * Kp : nullptr;
  _tile_zero(kTileC00);
  _tile_zero(kTileC01);
  _tile_zero(kTileC10);
  _tile_zero(kTileC11);
  for (int64_t c = 0; c < Kp / kChunk; ++c) {
    load_b(ph, c);
    load_a(ah, Kp, c);
    dot_2x2();
    if constexpr (Passes >= 2) {
      load_a(al, Kp, c);
      dot_2x2();
    }
    if constexpr (Passes >= 3) {
      load_b(pl, c);
      load_a(ah, Kp, c);
      dot_2x2();
    }
  }
}

}  // namespace

const char* amx_unavailable_reason() {
  static const char* reason = amx_check();
  return reason;
}

void amx_bf16_gemm(int64_t N, int64_t K, int64_t Kp, const float* x, int64_t ldx, int64_t M, float* y,
                   int64_t ldy, int passes, const PanelRows& make_rows) {
  const char* why = amx_unavailable_reason();
  TORCH_CHECK(why == nullptr, "AMX GEMM: ", why ? why : "");
  TORCH_CHECK(Kp % kChunk == 0 && Kp >= K, "AMX GEMM: Kp must be a multiple of 32, >= K");
  TORCH_CHECK(passes >= 1 && passes <= 3, "AMX GEMM: passes must be 1, 2 or 3");
  if (M == 0 || N == 0) return;
  const int64_t Mp = (M + 31) / 32 * 32;
  std::vector<uint16_t> xh(static_cast<size_t>(Mp * Kp)), xl(passes >= 2 ? static_cast<size_t>(Mp * Kp) : 0);
  convert_x(x, ldx, M, K, Mp, Kp, xh.data(), passes >= 2 ? xl.data() : nullptr);
  const int64_t panels = (N + kAmxPanelRows - 1) / kAmxPanelRows;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> rows(static_cast<size_t>(kAmxPanelRows * Kp));
    std::vector<uint16_t> ph(static_cast<size_t>(2 * Kp * 16)), pl(passes >= 3 ? ph.size() : 0);
    alignas(64) float scratch[32 * 32];
    TileConfig cfg;
    for (int i = 0; i < 8; ++i) cfg.rows[i] = kTileRows, cfg.colsb[i] = kTileBytes;
    load_tile_config(cfg);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kAmxPanelRows, nr = std::min<int64_t>(kAmxPanelRows, N - n0);
      make_rows(n0, nr, rows.data());
      std::fill(rows.begin() + nr * Kp, rows.end(), 0.0f);
      panel_to_vnni(rows.data(), Kp, ph.data(), passes >= 3 ? pl.data() : nullptr);
      for (int64_t m0 = 0; m0 < Mp; m0 += 32) {
        switch (passes) {
          case 1: panel_times_rows<1>(xh.data(), nullptr, Kp, m0, ph.data(), nullptr); break;
          case 2: panel_times_rows<2>(xh.data(), xl.data(), Kp, m0, ph.data(), nullptr); break;
          default: panel_times_rows<3>(xh.data(), xl.data(), Kp, m0, ph.data(), pl.data()); break;
        }
        const int64_t mr = std::min<int64_t>(32, M - m0);
        if (mr == 32 && nr == 32) {
          float* yb = y + m0 * ldy + n0;
          _tile_stored(kTileC00, yb, ldy * 4);
          _tile_stored(kTileC01, yb + 16, ldy * 4);
          _tile_stored(kTileC10, yb + 16 * ldy, ldy * 4);
          _tile_stored(kTileC11, yb + 16 * ldy + 16, ldy * 4);
        } else {
          _tile_stored(kTileC00, scratch, 128);
          _tile_stored(kTileC01, scratch + 16, 128);
          _tile_stored(kTileC10, scratch + 16 * 32, 128);
          _tile_stored(kTileC11, scratch + 16 * 32 + 16, 128);
          for (int64_t m = 0; m < mr; ++m) std::memcpy(y + (m0 + m) * ldy + n0, scratch + m * 32, nr * 4);
        }
      }
    }
    release_tiles();
  });
}

#else  // no AMX in this build

const char* amx_unavailable_reason() { return "this kernel variant is built without AMX (the amx variant has it)"; }

void amx_bf16_gemm(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, float*, int64_t, int,
                   const PanelRows&) {
  TORCH_CHECK(false, "AMX GEMM: ", amx_unavailable_reason());
}

#endif

}  // namespace quantchat_kernels
