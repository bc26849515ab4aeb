// float32 products on AMX where the CPU has it (Intel since Sapphire Rapids), at float32's
// accuracy: the forward's x·W_ihᵀ and its steps' h·W_hhᵀ, the backward's dG·W_hh and dX = dG·W_ih
// (amx_split.h). The CPU's grant of the AMX state is asked for in cpu_features.h.
//
// AMX multiplies bfloat16 (8 significant bits) into float32 sums. A float32 splits exactly into
// three bfloat16s, x = hi + mid + lo, and a product a·b keeps float32's accuracy as the six
// largest of its nine partial products (hi·hi, hi·mid, mid·hi, hi·lo, mid·mid, lo·hi: each exact
// in float32; the three left out are below 2^-24 relative): bench/amx_probe.cpp checks the error
// against float64. Six TDPBF16PS per 16 x 16 x 32 block still do more float32-equivalent work per
// cycle than two AVX-512 FMA units (bench/NOTES.md has the figures).
//
// Each output is one fixed sequence of tile products over k, whichever thread or block computes
// it: reproducible, and the same bits for any number of threads. Not the AVX-512 tiles' bits;
// the float_kernel override asks for those (tests run both). TDPBF16PS treats subnormal
// bfloat16s as zero: inputs below 2^-126 in magnitude count as zero, and floats below about
// 2^-110 lose their lo part.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "wide_float.h"

#if defined(__x86_64__) && defined(__linux__)  // AMX needs the kernel's grant (arch_prctl)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fused_rnn {
namespace cpu {

// Split operands, in AMX tiles. A tile is 16 rows of 64 bytes: 16 rows x 32 k of bfloat16 for
// the left factor (A), 16 pairs of k x 16 columns for the right one (B, "VNNI" order: the two k of
// a pair side by side). Per 16 rows (or columns) and 32 k, the hi, mid and lo tiles lie side by
// side (3 x 512 bfloat16), k blocks one after the other: a group of 16 rows holds 48·Kp.
constexpr int64_t kAmxTile = 16, kAmxDepth = 32, kAmxPlane = 512, kAmxBlock = 3 * kAmxPlane;

inline int64_t amx_depth(int64_t K) { return (K + kAmxDepth - 1) / kAmxDepth * kAmxDepth; }
inline int64_t amx_tiles(int64_t n) { return (n + kAmxTile - 1) / kAmxTile; }
// bfloat16s in one group of 16 rows (or columns) of K split values.
inline int64_t amx_group_size(int64_t K) { return kAmxTile * 3 * amx_depth(K); }

#if defined(__x86_64__) && defined(__linux__)

// Whether this CPU has AMX-BF16 and AVX512-BF16 and the kernel grants this process the AMX state
// (Linux 5.16+, arch_prctl). Asks once; cpu_features.h (and bench/amx_probe.cpp) call it.
inline bool amx_granted() {
  static const bool granted = [] {
    if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bf16") ||
        !__builtin_cpu_supports("amx-bf16") || !__builtin_cpu_supports("amx-tile")) {
      return false;
    }
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
}

#define FUSED_RNN_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bf16,avx512bw")))

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ == 12  // PR 105593: see wide_float.h
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
// bfloat16 as float (exact).
FUSED_RNN_AMX inline __m512 amx_widen(__m256bh b) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(b)), 16));
}

// 16 floats into their bfloat16 hi, mid and lo, each the rounded remainder of the ones before.
FUSED_RNN_AMX inline void amx_split16(__m512 x, __m256i planes[3]) {
  const __m256bh hi = _mm512_cvtneps_pbh(x);
  const __m512 rest = _mm512_sub_ps(x, amx_widen(hi));
  const __m256bh mid = _mm512_cvtneps_pbh(rest);
  const __m256bh lo = _mm512_cvtneps_pbh(_mm512_sub_ps(rest, amx_widen(mid)));
  planes[0] = reinterpret_cast<__m256i>(hi);
  planes[1] = reinterpret_cast<__m256i>(mid);
  planes[2] = reinterpret_cast<__m256i>(lo);
}

// Rows rows[0..n) (n <= 16, K values each) of a left factor into one group of A tiles at out;
// rows n..15 and k past K are zeros.
FUSED_RNN_AMX inline void amx_split_rows(const float* const* rows, int64_t n, int64_t K, uint16_t* out) {
  const int64_t Kp = amx_depth(K);
  for (int64_t m = 0; m < kAmxTile; ++m)
    for (int64_t k = 0; k < Kp; k += 16) {
      const int64_t left = m < n ? std::clamp<int64_t>(K - k, 0, 16) : 0;
      const __m512 x = left > 0 ? _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << left) - 1), rows[m] + k)
                                : _mm512_setzero_ps();
      __m256i planes[3];
      amx_split16(x, planes);
      uint16_t* at = out + k / kAmxDepth * kAmxBlock + m * kAmxDepth + k % kAmxDepth;
      for (int p = 0; p < 3; ++p) _mm256_storeu_si256(reinterpret_cast<__m256i*>(at + p * kAmxPlane), planes[p]);
    }
}

// Rows [0, n) (n <= 16) of w [n, K], row stride ldw, as the columns of one group of B tiles at
// out (the product's right factor is wᵀ); columns n..15 and k past K are zeros. Per 32 k, each
// row's pairs of k are 16 32-bit values: a 16 x 16 transpose of them is the VNNI tile.
FUSED_RNN_AMX inline void amx_split_columns(const float* w, int64_t ldw, int64_t n, int64_t K, uint16_t* out) {
  const int64_t Kp = amx_depth(K);
  for (int64_t k0 = 0; k0 < Kp; k0 += kAmxDepth) {
    alignas(64) uint32_t pairs[3][kAmxTile][kAmxTile];  // [plane][column][pair of k]
    for (int64_t j = 0; j < kAmxTile; ++j)
      for (int64_t half = 0; half < 2; ++half) {
        const int64_t k = k0 + half * 16, left = j < n ? std::clamp<int64_t>(K - k, 0, 16) : 0;
        __m256i planes[3];
        amx_split16(left > 0 ? _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << left) - 1), w + j * ldw + k)
                             : _mm512_setzero_ps(),
                    planes);
        for (int p = 0; p < 3; ++p) _mm256_store_si256(reinterpret_cast<__m256i*>(&pairs[p][j][half * 8]), planes[p]);
      }
    // wide_transpose_rows moves the 32-bit values as floats, bits unchanged (no arithmetic).
    uint16_t* block = out + k0 / kAmxDepth * kAmxBlock;
    for (int p = 0; p < 3; ++p) {
      const float* rows[kAmxTile];
      for (int j = 0; j < kAmxTile; ++j) rows[j] = reinterpret_cast<const float*>(pairs[p][j]);
      wide_transpose_rows(rows, kAmxTile, kAmxTile, reinterpret_cast<float*>(block + p * kAmxPlane), kAmxTile);
    }
  }
}

// Columns [0, n) (n <= 16) of w [K, ·], row stride ldw (column j's k at w[k·ldw + j]), into one
// group of B tiles at out: the right factor as it is (out = rows · w). Columns n..15 and k past K
// are zeros. A pair of k is two rows: their split values interleaved, 16 bits each.
FUSED_RNN_AMX inline void amx_split_kmajor(const float* w, int64_t ldw, int64_t K, int64_t n, uint16_t* out) {
  const int64_t Kp = amx_depth(K);
  const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
  for (int64_t k0 = 0; k0 < Kp; k0 += kAmxDepth) {
    uint16_t* block = out + k0 / kAmxDepth * kAmxBlock;
    for (int64_t pair = 0; pair < kAmxTile; ++pair) {
      const int64_t k = k0 + 2 * pair;
      __m256i even[3], odd[3];
      amx_split16(k < K ? _mm512_maskz_loadu_ps(mask, w + k * ldw) : _mm512_setzero_ps(), even);
      amx_split16(k + 1 < K ? _mm512_maskz_loadu_ps(mask, w + (k + 1) * ldw) : _mm512_setzero_ps(), odd);
      for (int p = 0; p < 3; ++p) {
        const __m512i v = _mm512_or_si512(_mm512_cvtepu16_epi32(even[p]), _mm512_slli_epi32(_mm512_cvtepu16_epi32(odd[p]), 16));
        _mm512_storeu_si512(block + p * kAmxPlane + pair * kAmxDepth, v);
      }
    }
  }
}
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ == 12
#pragma GCC diagnostic pop
#endif

struct AmxTileConfig {  // palette 1: eight tiles of 16 rows x 64 bytes
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
  AmxTileConfig() {
    for (int t = 0; t < 8; ++t) bytes_per_row[t] = 64, rows[t] = 16;
  }
};

// c[32 x 32] (row stride 32) = RT groups of A tiles (a, the second at a + a_next) times CT groups
// of B tiles (b[0], b[1]) over Kp: tiles 0-3 the sums, 4-5 A, 6-7 B. The six products per 32 k go
// from the smallest to the largest, each changing one operand, so that 14 tile loads serve 24
// TDPBF16PS (2 x 2).
// With `resume`, the sums start from c instead of zero.
template <int RT, int CT>
FUSED_RNN_AMX __attribute__((noinline)) void amx_block(const uint16_t* a, int64_t a_next, const uint16_t* const* b,
                                                       int64_t b_shift, int64_t Kp, bool resume, float* c) {
  if (resume) {
    _tile_loadd(0, c, 32 * sizeof(float));
    if constexpr (CT > 1) _tile_loadd(1, c + 16, 32 * sizeof(float));
    if constexpr (RT > 1) _tile_loadd(2, c + 16 * 32, 32 * sizeof(float));
    if constexpr (RT > 1 && CT > 1) _tile_loadd(3, c + 16 * 32 + 16, 32 * sizeof(float));
  } else {
    _tile_zero(0);
    if constexpr (CT > 1) _tile_zero(1);
    if constexpr (RT > 1) _tile_zero(2);
    if constexpr (RT > 1 && CT > 1) _tile_zero(3);
  }
  const uint16_t* b0 = b[0] + b_shift;
  const uint16_t* b1 = CT > 1 ? b[1] + b_shift : nullptr;
  for (int64_t k = 0; k < Kp; k += kAmxDepth) {
    const int64_t at = k / kAmxDepth * kAmxBlock;
    const auto load_a = [&](int p) {
      _tile_loadd(4, a + at + p * kAmxPlane, 64);
      if constexpr (RT > 1) _tile_loadd(5, a + a_next + at + p * kAmxPlane, 64);
    };
    const auto load_b = [&](int p) {
      _tile_loadd(6, b0 + at + p * kAmxPlane, 64);
      if constexpr (CT > 1) _tile_loadd(7, b1 + at + p * kAmxPlane, 64);
    };
    const auto products = [&] {
      _tile_dpbf16ps(0, 4, 6);
      if constexpr (CT > 1) _tile_dpbf16ps(1, 4, 7);
      if constexpr (RT > 1) _tile_dpbf16ps(2, 5, 6);
      if constexpr (RT > 1 && CT > 1) _tile_dpbf16ps(3, 5, 7);
    };
    load_b(0), load_a(2), products();  // lo·hi
    load_a(1), products();             // mid·hi
    load_b(1), products();             // mid·mid
    load_a(0), products();             // hi·mid
    load_b(2), products();             // hi·lo
    load_b(0), products();             // hi·hi
  }
  _tile_stored(0, c, 32 * sizeof(float));
  if constexpr (CT > 1) _tile_stored(1, c + 16, 32 * sizeof(float));
  if constexpr (RT > 1) _tile_stored(2, c + 16 * 32, 32 * sizeof(float));
  if constexpr (RT > 1 && CT > 1) _tile_stored(3, c + 16 * 32 + 16, 32 * sizeof(float));
}

// For q < groups: out[r·ldo + offset[q] + l] (+)= bias[q][l] + Σ_k a(r, k)·b_q(l, k), r < rows,
// l < lanes[q], over K values of k. `a` holds split rows (groups of A tiles a_group apart), b[q] +
// b_shift a group of split columns, both at the range's first k (a multiple of 32); bias null for
// none, or null per group. With `accumulate` the sums start from out (a product over k in ranges:
// the same bits whatever the threads). Pairs of groups outside, rows inside: a pair's B tiles stay
// in L1 and L2 while every row passes.
FUSED_RNN_AMX inline void amx_product(const uint16_t* a, int64_t a_group, int64_t rows, const uint16_t* const* b,
                                      int64_t b_shift, const int64_t* offset, const int64_t* lanes, int64_t groups,
                                      int64_t K, const float* const* bias, bool accumulate, float* out, int64_t ldo) {
  const AmxTileConfig config;
  _tile_loadconfig(&config);
  const int64_t Kp = amx_depth(K);
  alignas(64) float c[32 * 32];
  for (int64_t q0 = 0; q0 < groups; q0 += 2) {
    const int width = q0 + 1 < groups ? 2 : 1;
    for (int64_t r0 = 0; r0 < rows; r0 += 32) {
      const int64_t nr = std::min<int64_t>(32, rows - r0);
      const uint16_t* a0 = a + r0 / kAmxTile * a_group;
      if (accumulate) {  // the block's sums so far into c (zeros outside the output)
        for (int h = 0; h < width; ++h) {
          const __mmask16 mask = static_cast<__mmask16>((1u << std::max<int64_t>(0, lanes[q0 + h])) - 1);
          for (int64_t r = 0; r < 32; ++r) {
            _mm512_store_ps(c + r * 32 + h * 16,
                            r < nr ? _mm512_maskz_loadu_ps(mask, out + (r0 + r) * ldo + offset[q0 + h]) : _mm512_setzero_ps());
          }
        }
      }
      if (nr > 16 && width == 2) amx_block<2, 2>(a0, a_group, b + q0, b_shift, Kp, accumulate, c);
      else if (nr > 16) amx_block<2, 1>(a0, a_group, b + q0, b_shift, Kp, accumulate, c);
      else if (width == 2) amx_block<1, 2>(a0, a_group, b + q0, b_shift, Kp, accumulate, c);
      else amx_block<1, 1>(a0, a_group, b + q0, b_shift, Kp, accumulate, c);
      for (int h = 0; h < width; ++h) {
        const int64_t q = q0 + h;
        if (lanes[q] <= 0) continue;
        const __mmask16 mask = static_cast<__mmask16>((1u << lanes[q]) - 1);
        const __m512 start = bias && bias[q] ? _mm512_maskz_loadu_ps(mask, bias[q]) : _mm512_setzero_ps();
        for (int64_t r = 0; r < nr; ++r) {
          _mm512_mask_storeu_ps(out + (r0 + r) * ldo + offset[q], mask,
                                _mm512_add_ps(start, _mm512_load_ps(c + r * 32 + h * 16)));
        }
      }
    }
  }
  _tile_release();
}

#undef FUSED_RNN_AMX

#else  // not x86-64 Linux
inline bool amx_granted() { return false; }
inline void amx_split_rows(const float* const*, int64_t, int64_t, uint16_t*) { __builtin_trap(); }
inline void amx_split_columns(const float*, int64_t, int64_t, int64_t, uint16_t*) { __builtin_trap(); }
inline void amx_split_kmajor(const float*, int64_t, int64_t, int64_t, uint16_t*) { __builtin_trap(); }
inline void amx_product(const uint16_t*, int64_t, int64_t, const uint16_t* const*, int64_t, const int64_t*,
                        const int64_t*, int64_t, int64_t, const float* const*, bool, float*, int64_t) {
  __builtin_trap();
}
#endif

}  // namespace cpu
}  // namespace fused_rnn
