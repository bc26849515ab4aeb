// The int8 inference path on the CPU: the forward of a layer with int8 weights.
//
// Weights are int8 with a scale per row (symmetric: w ≈ scale[r] · q[r, k]). Activations, each row
// of x and each row of h_{t-1} at every step, are quantized to 8 bits with their own scale and
// zero point (x ≈ scale · (q - zero)): per row rather than per tensor, so that one batch row's
// range does not coarsen another's, and a sequence's results do not depend on the batch it is in.
// A product row·W_rᵀ is then an integer sum Σ q_x · q_w, minus zero · Σ_k q_w (the row sums,
// computed once per model), times the two scales.
//
// The integer sums: with AVX-512 VNNI (chosen at run time), vpdpbusd adds four u8 · s8 products
// straight into int32, 64 bytes a vector. Plain AVX2 has only vpmaddubsw, which adds two such
// products into an int16 and saturates for 8-bit activations (255 · 128 · 2 > 32767); fbgemm gives
// up a bit of the activations for it (7 bits: about twice the error, bench/NOTES.md). We keep the 8
// bits and split each activation into its two 4-bit halves instead, two exact vpmaddubsw products. Both give the same integers, and the
// scaling is done element by element in a fixed order, so results are bitwise the same for either
// kernel and any number of threads (FUSED_RNN_INT8_KERNEL=avx2|scalar forces a lesser kernel).
//
// The loop is the float forward's (layer_cpu.cpp): one team for the whole sequence, each thread a
// fixed share of the hidden units, x's projection a chunk of steps at a time, the gate math in
// float32 from cells.h.
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

#include "step_team.h"

namespace fused_rnn {
namespace {

using at::Tensor;
using cpu::Member;

constexpr int32_t kActivationMax = 255;

// One row of activations as 8-bit integers: x[k] ≈ scale · (q[k] - zero).
struct QuantizedRow {
  float scale;
  int32_t zero;
};

// NaN-propagating min and max: a NaN anywhere makes the row's scale NaN, so that the outputs
// that depend on it are NaN, as they are in float32.
inline float min_nan(float a, float b) { return (a < b || std::isnan(a)) ? a : b; }
inline float max_nan(float a, float b) { return (a > b || std::isnan(a)) ? a : b; }

// x [n] -> q [n]: the range [lo, hi] (which contains 0, so that 0 is exact) over 255 levels.
QuantizedRow quantize_row(const float* x, int64_t n, uint8_t* q) {
  using V = at::vec::Vectorized<float>;
  constexpr int64_t kW = V::size();
  float lo = 0, hi = 0;
  int64_t k = 0;
  if (n >= kW) {
    V vlo(0.f), vhi(0.f);
    for (; k + kW <= n; k += kW) {
      const V v = V::loadu(x + k);
      vlo = at::vec::minimum(vlo, v);  // these propagate NaN
      vhi = at::vec::maximum(vhi, v);
    }
    float lanes_lo[kW], lanes_hi[kW];
    vlo.store(lanes_lo);
    vhi.store(lanes_hi);
    for (int64_t l = 0; l < kW; ++l) lo = min_nan(lo, lanes_lo[l]), hi = max_nan(hi, lanes_hi[l]);
  }
  for (; k < n; ++k) lo = min_nan(lo, x[k]), hi = max_nan(hi, x[k]);
  const float range = hi - lo;
  if (!std::isfinite(range) || range == 0) {  // NaN or infinity (NaN scale), or a row of zeros
    std::memset(q, 0, n);
    return {range == 0 ? 1.f : std::numeric_limits<float>::quiet_NaN(), 0};
  }
  const float scale = range / kActivationMax, inverse = 1.f / scale;
  const int32_t zero = std::clamp(static_cast<int32_t>(std::nearbyint(-lo * inverse)), 0, kActivationMax);
  k = 0;
#if defined(__AVX2__)
  // 32 at a time: round to nearest even (as nearbyint), add the zero point, saturate to [0, 255].
  const __m256 inv = _mm256_set1_ps(inverse);
  const __m256i zp = _mm256_set1_epi32(zero);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' lane interleave
  for (; k + 32 <= n; k += 32) {
    __m256i v[4];
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8 * i), inv)), zp);
    }
    const __m256i bytes = _mm256_packus_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), _mm256_permutevar8x32_epi32(bytes, order));
  }
#endif
  for (; k < n; ++k) {
    q[k] = static_cast<uint8_t>(
        std::clamp(static_cast<int32_t>(std::nearbyint(x[k] * inverse)) + zero, 0, kActivationMax));
  }
  return {scale, zero};
}

// sums[b * R + r] = Σ_k a[b][k] · w[r * ld + k] over k < K, for R weight rows and NB activation
// rows: every weight vector loaded once for all NB rows.
template <int R, int NB>
void dot_block_scalar(const int8_t* w, int64_t ld, const uint8_t* const* a, int64_t K, int64_t k0, int32_t* sums) {
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < R; ++r) {
      int32_t s = 0;
      for (int64_t k = k0; k < K; ++k) s += int32_t{a[b][k]} * int32_t{w[r * ld + k]};
      sums[b * R + r] += s;
    }
}

#if defined(__AVX2__)
inline int32_t lane_sum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_hadd_epi32(s, s);
  s = _mm_hadd_epi32(s, s);
  return _mm_cvtsi128_si32(s);
}

template <int R, int NB>
void dot_block_avx2(const int8_t* w, int64_t ld, const uint8_t* const* a, int64_t K, int32_t* sums) {
  // a = 16 · high + low, each half in [0, 15]: a pair of products stays within ±3840 in int16.
  const __m256i ones = _mm256_set1_epi16(1), sixteen = _mm256_set1_epi16(16), nibble = _mm256_set1_epi8(0x0F);
  __m256i acc[NB][R];
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < R; ++r) acc[b][r] = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m256i wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * ld + k));
    for (int b = 0; b < NB; ++b) {
      const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[b] + k));
      const __m256i low = _mm256_and_si256(av, nibble), high = _mm256_and_si256(_mm256_srli_epi16(av, 4), nibble);
      for (int r = 0; r < R; ++r) {
        const __m256i l = _mm256_madd_epi16(_mm256_maddubs_epi16(low, wv[r]), ones);
        const __m256i h = _mm256_madd_epi16(_mm256_maddubs_epi16(high, wv[r]), sixteen);
        acc[b][r] = _mm256_add_epi32(acc[b][r], _mm256_add_epi32(l, h));
      }
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < R; ++r) sums[b * R + r] = lane_sum(acc[b][r]);
  dot_block_scalar<R, NB>(w, ld, a, K, k, sums);
}

// 64 bytes a vector; the last partial vector of a row through masked loads (zeros past K, which
// add nothing), so no scalar tail. Only there: masked loads in the main loop halve its speed.
#define FUSED_RNN_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))
template <int R, int NB, bool kMasked>
FUSED_RNN_VNNI inline void vnni_accumulate(__m512i (&acc)[NB][R], const int8_t* w, int64_t ld,
                                           const uint8_t* const* a, int64_t k, __mmask64 mask) {
  __m512i wv[R];
  for (int r = 0; r < R; ++r) {
    wv[r] = kMasked ? _mm512_maskz_loadu_epi8(mask, w + r * ld + k) : _mm512_loadu_si512(w + r * ld + k);
  }
  for (int b = 0; b < NB; ++b) {
    const __m512i av = kMasked ? _mm512_maskz_loadu_epi8(mask, a[b] + k) : _mm512_loadu_si512(a[b] + k);
    for (int r = 0; r < R; ++r) acc[b][r] = _mm512_dpbusd_epi32(acc[b][r], av, wv[r]);
  }
}

// [a0 + a1, a2 + a3, b0 + b1, b2 + b3] of the 128-bit lanes of a and b.
FUSED_RNN_VNNI inline __m512i vnni_fold(__m512i a, __m512i b) {
  return _mm512_add_epi32(_mm512_shuffle_i32x4(a, b, 0x88), _mm512_shuffle_i32x4(a, b, 0xDD));
}

// The lane sums of 16 accumulators x[0..15], as one vector: element i is Σ x[i]. A tree of 45
// shuffles and adds, where 16 separate reductions would take some 160 instructions, as many as
// the products of a short row.
FUSED_RNN_VNNI inline __m512i vnni_sum16(const __m512i* x) {
  __m512i pairs[8], quads[4];
  for (int i = 0; i < 8; ++i) {  // 128-bit lane l: partial sums of x[2i], x[2i+1], interleaved
    pairs[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(x[2 * i], x[2 * i + 1]),
                                _mm512_unpackhi_epi32(x[2 * i], x[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {  // lane l: partial sums of x[4i .. 4i+3], in order; then the lanes
    quads[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(pairs[2 * i], pairs[2 * i + 1]),
                                _mm512_unpackhi_epi64(pairs[2 * i], pairs[2 * i + 1]));
  }
  return vnni_fold(vnni_fold(quads[0], quads[1]), vnni_fold(quads[2], quads[3]));
}

// acc += the u8 · s8 products of x and w, four by four, in place. GCC 12 compiles the intrinsic
// (_mm512_dpbusd_epi32) into a vpdpbusd into a fresh register and a copy back, and with 16
// accumulators runs out of registers: in the 2 x 8 tile it spilled two and loaded each activation
// vector twice (perf annotate). The instruction accumulates in place; saying so in asm gives a
// loop of 10 loads and 16 vpdpbusd, 20-25% faster with W from L3 (microbenchmark, K = 1024).
FUSED_RNN_VNNI inline void vnni_dot_add(__m512i& acc, __m512i x, __m512i w) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w));
}

// The 16-accumulator tiles (R x NB = 2 x 8, 4 x 4, 8 x 2), written out: with the accumulators in
// an array, GCC 12 keeps them in memory or copies each through a scratch register around every
// vpdpbusd, which made the kernel 40% slower or worse (measured at K = 1024 on the 2-core CPU).
// The macros spell out what dot_block_vnni's loops say: c<b><r> accumulates activation row b times
// weight row r.
#define FUSED_RNN_ZERO(b, r) __m512i c##b##r = _mm512_setzero_si512();
#define FUSED_RNN_WEIGHT(LOAD, r) const __m512i v##r = LOAD(w + r * ld + k);
#define FUSED_RNN_DP(b, r) vnni_dot_add(c##b##r, x, v##r);
#define FUSED_RNN_ROW(LOAD, b, PRODUCTS) \
  {                                      \
    const __m512i x = LOAD(a[b] + k);    \
    PRODUCTS(b)                          \
  }
#define FUSED_RNN_DP2(b) FUSED_RNN_DP(b, 0) FUSED_RNN_DP(b, 1)
#define FUSED_RNN_DP4(b) FUSED_RNN_DP2(b) FUSED_RNN_DP(b, 2) FUSED_RNN_DP(b, 3)
#define FUSED_RNN_DP8(b) FUSED_RNN_DP4(b) FUSED_RNN_DP(b, 4) FUSED_RNN_DP(b, 5) FUSED_RNN_DP(b, 6) FUSED_RNN_DP(b, 7)
// The body: full vectors, the next tile's weight rows prefetched a row's length ahead (once W
// outgrows L2, at H = 1024, it comes from L3 at every step, and a tile's loads are too few for the
// hardware prefetcher to ramp up), then the masked last vector, then one tree reduction.
#define FUSED_RNN_TILE(R, ZEROS, WEIGHTS, ROWS, ...)                                               \
  ZEROS int64_t k = 0;                                                                            \
  for (; k + 64 <= K; k += 64) {                                                                  \
    for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + (R + r) * ld + k), \
                                             _MM_HINT_T0);                                        \
    WEIGHTS(_mm512_loadu_si512) ROWS(_mm512_loadu_si512)                                          \
  }                                                                                               \
  if (k < K) {                                                                                    \
    const __mmask64 mask = (__mmask64{1} << (K - k)) - 1;                                         \
    const auto masked = [mask](const void* p) FUSED_RNN_VNNI { return _mm512_maskz_loadu_epi8(mask, p); }; \
    WEIGHTS(masked) ROWS(masked)                                                                  \
  }                                                                                               \
  const __m512i all[16] = {__VA_ARGS__};                                                          \
  _mm512_storeu_si512(sums, vnni_sum16(all));

FUSED_RNN_VNNI void dot_tile_2x8_vnni(const int8_t* w, int64_t ld, const uint8_t* const* a, int64_t K,
                                      int32_t* sums) {
#define ZEROS FUSED_RNN_ZERO(0, 0) FUSED_RNN_ZERO(0, 1) FUSED_RNN_ZERO(1, 0) FUSED_RNN_ZERO(1, 1) \
  FUSED_RNN_ZERO(2, 0) FUSED_RNN_ZERO(2, 1) FUSED_RNN_ZERO(3, 0) FUSED_RNN_ZERO(3, 1)             \
  FUSED_RNN_ZERO(4, 0) FUSED_RNN_ZERO(4, 1) FUSED_RNN_ZERO(5, 0) FUSED_RNN_ZERO(5, 1)             \
  FUSED_RNN_ZERO(6, 0) FUSED_RNN_ZERO(6, 1) FUSED_RNN_ZERO(7, 0) FUSED_RNN_ZERO(7, 1)
#define WEIGHTS(L) FUSED_RNN_WEIGHT(L, 0) FUSED_RNN_WEIGHT(L, 1)
#define ROWS(L) FUSED_RNN_ROW(L, 0, FUSED_RNN_DP2) FUSED_RNN_ROW(L, 1, FUSED_RNN_DP2) FUSED_RNN_ROW(L, 2, FUSED_RNN_DP2) \
  FUSED_RNN_ROW(L, 3, FUSED_RNN_DP2) FUSED_RNN_ROW(L, 4, FUSED_RNN_DP2) FUSED_RNN_ROW(L, 5, FUSED_RNN_DP2)            \
  FUSED_RNN_ROW(L, 6, FUSED_RNN_DP2) FUSED_RNN_ROW(L, 7, FUSED_RNN_DP2)
  FUSED_RNN_TILE(2, ZEROS, WEIGHTS, ROWS, c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51, c60, c61, c70,
                 c71)
#undef ZEROS
#undef WEIGHTS
#undef ROWS
}

FUSED_RNN_VNNI void dot_tile_4x4_vnni(const int8_t* w, int64_t ld, const uint8_t* const* a, int64_t K,
                                      int32_t* sums) {
#define ZEROS_OF(b) FUSED_RNN_ZERO(b, 0) FUSED_RNN_ZERO(b, 1) FUSED_RNN_ZERO(b, 2) FUSED_RNN_ZERO(b, 3)
#define ZEROS ZEROS_OF(0) ZEROS_OF(1) ZEROS_OF(2) ZEROS_OF(3)
#define WEIGHTS(L) FUSED_RNN_WEIGHT(L, 0) FUSED_RNN_WEIGHT(L, 1) FUSED_RNN_WEIGHT(L, 2) FUSED_RNN_WEIGHT(L, 3)
#define ROWS(L) FUSED_RNN_ROW(L, 0, FUSED_RNN_DP4) FUSED_RNN_ROW(L, 1, FUSED_RNN_DP4) FUSED_RNN_ROW(L, 2, FUSED_RNN_DP4) \
  FUSED_RNN_ROW(L, 3, FUSED_RNN_DP4)
  FUSED_RNN_TILE(4, ZEROS, WEIGHTS, ROWS, c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32,
                 c33)
#undef ZEROS_OF
#undef ZEROS
#undef WEIGHTS
#undef ROWS
}

FUSED_RNN_VNNI void dot_tile_8x2_vnni(const int8_t* w, int64_t ld, const uint8_t* const* a, int64_t K,
                                      int32_t* sums) {
#define ZEROS_OF(b) FUSED_RNN_ZERO(b, 0) FUSED_RNN_ZERO(b, 1) FUSED_RNN_ZERO(b, 2) FUSED_RNN_ZERO(b, 3) \
  FUSED_RNN_ZERO(b, 4) FUSED_RNN_ZERO(b, 5) FUSED_RNN_ZERO(b, 6) FUSED_RNN_ZERO(b, 7)
#define ZEROS ZEROS_OF(0) ZEROS_OF(1)
#define WEIGHTS(L) FUSED_RNN_WEIGHT(L, 0) FUSED_RNN_WEIGHT(L, 1) FUSED_RNN_WEIGHT(L, 2) FUSED_RNN_WEIGHT(L, 3) \
  FUSED_RNN_WEIGHT(L, 4) FUSED_RNN_WEIGHT(L, 5) FUSED_RNN_WEIGHT(L, 6) FUSED_RNN_WEIGHT(L, 7)
#define ROWS(L) FUSED_RNN_ROW(L, 0, FUSED_RNN_DP8) FUSED_RNN_ROW(L, 1, FUSED_RNN_DP8)
  FUSED_RNN_TILE(8, ZEROS, WEIGHTS, ROWS, c00, c01, c02, c03, c04, c05, c06, c07, c10, c11, c12, c13, c14, c15, c16,
                 c17)
#undef ZEROS_OF
#undef ZEROS
#undef WEIGHTS
#undef ROWS
}
#undef FUSED_RNN_TILE
#undef FUSED_RNN_DP8
#undef FUSED_RNN_DP4
#undef FUSED_RNN_DP2
#undef FUSED_RNN_ROW
#undef FUSED_RNN_DP
#undef FUSED_RNN_WEIGHT
#undef FUSED_RNN_ZERO

template <int R, int NB>
FUSED_RNN_VNNI void dot_block_vnni(const int8_t* w, int64_t ld, const uint8_t* const* a, int64_t K, int32_t* sums) {
  __m512i acc[NB][R];
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < R; ++r) acc[b][r] = _mm512_setzero_si512();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + (R + r) * ld + k), _MM_HINT_T0);
    vnni_accumulate<R, NB, false>(acc, w, ld, a, k, 0);
  }
  if (k < K) vnni_accumulate<R, NB, true>(acc, w, ld, a, k, (__mmask64{1} << (K - k)) - 1);
  if constexpr (R * NB == 16) {
    _mm512_storeu_si512(sums, vnni_sum16(&acc[0][0]));
  } else {
    for (int b = 0; b < NB; ++b)
      for (int r = 0; r < R; ++r) sums[b * R + r] = _mm512_reduce_add_epi32(acc[b][r]);
  }
}

// Dequantizes a tile of 16 sums (element i = b * R + r) as dequantize() does, 16 at a time.
template <int R, int NB>
FUSED_RNN_VNNI void dequantize16_vnni(const int32_t* sums, const QuantizedRow* rows, const int32_t* row_sum,
                                     const float* w_scale, const float* bias, float* values) {
  static_assert(R * NB == 16 && sizeof(QuantizedRow) == 8, "16 sums; rows as (scale, zero) pairs");
  alignas(64) int32_t scale_index[16], zero_index[16], weight_index[16];
  for (int i = 0; i < 16; ++i) scale_index[i] = 2 * (i / R), zero_index[i] = 2 * (i / R) + 1, weight_index[i] = i % R;
  const __m512i pairs = _mm512_maskz_loadu_epi32(static_cast<__mmask16>((1u << (2 * NB)) - 1), rows);
  const __m512i weight_lanes = _mm512_load_si512(weight_index);
  const __m512 row_scale = _mm512_castsi512_ps(_mm512_permutexvar_epi32(_mm512_load_si512(scale_index), pairs));
  const __m512i zero = _mm512_permutexvar_epi32(_mm512_load_si512(zero_index), pairs);
  const __mmask16 first_r = static_cast<__mmask16>((1u << R) - 1);
  const __m512i sums_w = _mm512_permutexvar_epi32(weight_lanes, _mm512_maskz_loadu_epi32(first_r, row_sum));
  const __m512 scale_w = _mm512_permutexvar_ps(weight_lanes, _mm512_maskz_loadu_ps(first_r, w_scale));
  const __m512 value = _mm512_cvtepi32_ps(
      _mm512_sub_epi32(_mm512_loadu_si512(sums), _mm512_mullo_epi32(zero, sums_w)));
  const __m512 scale = _mm512_mul_ps(row_scale, scale_w);
  _mm512_storeu_ps(values, bias ? _mm512_fmadd_ps(value, scale, _mm512_permutexvar_ps(
                                                                    weight_lanes, _mm512_maskz_loadu_ps(first_r, bias)))
                                : _mm512_mul_ps(value, scale));
}
#undef FUSED_RNN_VNNI

#endif

// The integer kernel: the best the CPU has, or a lesser one named by FUSED_RNN_INT8_KERNEL
// (avx2, scalar: for tests, which check that all give the same bits). Chosen once.
enum class Int8Kernel { kScalar, kAvx2, kVnni };

Int8Kernel int8_kernel() {
  static const Int8Kernel kernel = [] {
    const char* asked = std::getenv("FUSED_RNN_INT8_KERNEL");
    const std::string name = asked ? asked : "";
#if defined(__AVX2__)
    if (name == "scalar") return Int8Kernel::kScalar;
    if (name != "avx2" && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw")) {
      return Int8Kernel::kVnni;
    }
    return Int8Kernel::kAvx2;
#else
    return Int8Kernel::kScalar;
#endif
  }();
  return kernel;
}

// One tile: sums[b * R + r] for NB activation rows and R weight rows, by the chosen kernel.
template <int R, int NB>
void dot_block(Int8Kernel kernel, const int8_t* w, int64_t ld, const uint8_t* const* a, int64_t K, int32_t* sums) {
#if defined(__AVX2__)
  if (kernel == Int8Kernel::kVnni) {
    if constexpr (R == 2 && NB == 8) return dot_tile_2x8_vnni(w, ld, a, K, sums);
    if constexpr (R == 4 && NB == 4) return dot_tile_4x4_vnni(w, ld, a, K, sums);
    if constexpr (R == 8 && NB == 2) return dot_tile_8x2_vnni(w, ld, a, K, sums);
    return dot_block_vnni<R, NB>(w, ld, a, K, sums);
  }
  if (kernel == Int8Kernel::kAvx2) return dot_block_avx2<R, NB>(w, ld, a, K, sums);
#endif
  for (int i = 0; i < R * NB; ++i) sums[i] = 0;
  dot_block_scalar<R, NB>(w, ld, a, K, 0, sums);
}

// Activations already quantized: rows [0, n) of q (row stride K) with their scales and zeros.
struct QuantizedActivations {
  const uint8_t* q;
  const QuantizedRow* rows;
  int64_t K;
};

// A QuantizedMatrix's data, read inside the team (no tensor calls there).
struct WeightRows {
  const int8_t* q;
  const float* scale;
  const int32_t* row_sum;
  explicit WeightRows(const QuantizedMatrix& w)
      : q(w.q.data_ptr<int8_t>()), scale(w.scale.data_ptr<float>()), row_sum(w.row_sum.data_ptr<int32_t>()) {}
};

// Tiles of R weight rows × NB activation rows: R · NB accumulators, R weight vectors and one
// activation vector in registers. AVX-512 code has 32 vector registers, AVX2 16 (and needs three
// more for the 4-bit halves).
//
// How a product walks its operands. The recurrent one has few activation rows (the batch) and
// reads W from L2 or beyond once per step: each group of up to 8 rows streams W once, in tiles
// that reuse each weight vector for all of them. The input projection has many rows (a chunk of
// steps): a block of W stays in L1 while all rows stream past it.
enum class Walk { kRecurrent, kProjection };

// One dequantized value: float(sum - zero · row sum) times both scales, plus the bias in the same
// rounding (an explicit fma, which the vector version also takes: the same bits either way).
inline float dequantize(int32_t sum, const QuantizedRow& a, int32_t row_sum, float w_scale, const float* bias) {
  const float value = static_cast<float>(sum - a.zero * row_sum), scale = a.scale * w_scale;
  return bias ? std::fma(value, scale, *bias) : value * scale;
}

template <typename OutFn>
struct ProductTiles {
  const QuantizedActivations& x;
  const WeightRows& w;
  Int8Kernel kernel;
  int64_t first;      // out(b)[0] is weight row `first`
  const float* bias;  // [rows of w] or null
  const OutFn& out;

  template <int R, int NB>
  void tile(int64_t b, int64_t r) const {
    const uint8_t* a[NB];
    for (int i = 0; i < NB; ++i) a[i] = x.q + (b + i) * x.K;
    int32_t sums[NB * R];
    dot_block<R, NB>(kernel, w.q + r * x.K, x.K, a, x.K, sums);
#if defined(__AVX2__)
    if constexpr (R * NB == 16) {
      if (kernel == Int8Kernel::kVnni) {
        float values[16];
        dequantize16_vnni<R, NB>(sums, x.rows + b, w.row_sum + r, w.scale + r, bias ? bias + r : nullptr, values);
        for (int i = 0; i < NB; ++i) std::memcpy(out(b + i) + (r - first), values + i * R, R * sizeof(float));
        return;
      }
    }
#endif
    for (int i = 0; i < NB; ++i)
      for (int j = 0; j < R; ++j) {
        out(b + i)[r + j - first] =
            dequantize(sums[i * R + j], x.rows[b + i], w.row_sum[r + j], w.scale[r + j], bias ? bias + r + j : nullptr);
      }
  }
  // Weight rows [first, last) for activation rows [b, b + NB): R at a time, then one by one.
  template <int R, int NB>
  void rows(int64_t b, int64_t first, int64_t last) const {
    int64_t r = first;
    for (; r + R <= last; r += R) tile<R, NB>(b, r);
    for (; r < last; ++r) tile<1, NB>(b, r);
  }
  // Activation rows [b, b + n) for weight row block [r, r + R): NB at a time, then halves.
  template <int R, int NB>
  void columns(int64_t b, int64_t n, int64_t r) const {
    int64_t i = 0;
    for (; i + NB <= n; i += NB) tile<R, NB>(b + i, r);
    if constexpr (NB > 1) {
      if (i < n) columns<R, NB / 2>(b + i, n - i, r);
    }
  }
};

// out(b)[c] = x_b · w_{first + c} for activation rows b < n and weight rows c in [0, count),
// dequantized (plus bias[first + c] when given).
template <typename OutFn>
void quantized_product(Int8Kernel kernel, Walk walk, const QuantizedActivations& x, int64_t n, const WeightRows& w,
                       int64_t first, int64_t count, const float* bias, const OutFn& out) {
  const ProductTiles<OutFn> tiles{x, w, kernel, first, bias, out};
  const int64_t last = first + count;
  const bool wide = kernel == Int8Kernel::kVnni;
  if (walk == Walk::kProjection) {  // tiles of 2 x 8 (AVX2: 4 x 2)
    int64_t r = first;
    if (wide) {
      for (; r + 2 <= last; r += 2) tiles.template columns<2, 8>(0, n, r);
      for (; r < last; ++r) tiles.template columns<1, 8>(0, n, r);
    } else {
      for (; r + 4 <= last; r += 4) tiles.template columns<4, 2>(0, n, r);
      for (; r < last; ++r) tiles.template columns<1, 2>(0, n, r);
    }
    return;
  }
  int64_t b = 0;
  if (wide) {  // 16 accumulators where the rows allow: 8 x 2, 4 x 4, 2 x 8, and 1 x 8
    for (; b + 8 <= n; b += 8) tiles.template rows<2, 8>(b, first, last);
    if (b + 4 <= n) tiles.template rows<4, 4>(b, first, last), b += 4;
    if (b + 2 <= n) tiles.template rows<8, 2>(b, first, last), b += 2;
    if (b < n) tiles.template rows<8, 1>(b, first, last);
  } else {  // 8: 2 x 4, then 1 x 4
    for (; b + 2 <= n; b += 2) tiles.template rows<4, 2>(b, first, last);
    if (b < n) tiles.template rows<4, 1>(b, first, last);
  }
}

template <typename Cell>
struct QuantizedForwardLoop {
  static constexpr int64_t W = KernelMath<float>::kWidth;
  static constexpr int G = Cell::kGates;

  static void run(const LayerShape& s, bool reverse, const Tensor& x, const QuantizedMatrix& w_ih,
                  const QuantizedMatrix& w_hh, const Tensor& bias, const Tensor& b_hn, Tensor& y, Tensor& h,
                  Tensor& c) {
    const int64_t H = s.H, I = s.I, GH = G * H;
    const int64_t chunk_cap = cpu::chunk_rows(s, GH), chunk_max = std::min(s.N, chunk_cap);
    const cpu::Team team(2.0 * s.B * GH * (H + I));
    Tensor gx_buffer = empty_large({chunk_max, GH}, y.options());
    Tensor gh = at::empty({s.B, GH}, y.options());
    // Quantized activations: the chunk's x rows (shared), and each thread's own copy of h_{t-1}
    // (every thread needs all of it; quantizing it twice is cheaper than a second barrier).
    Tensor qx = at::empty({chunk_max, I}, at::kByte);
    Tensor qh = at::empty({team.threads, s.B, H}, at::kByte);
    std::vector<QuantizedRow> x_rows(chunk_max), h_rows(team.threads * s.B);

    const float* x_p = x.data_ptr<float>();
    const float* bias_p = bias.defined() ? bias.data_ptr<float>() : nullptr;
    const float* b_hn_p = b_hn.defined() ? b_hn.data_ptr<float>() : nullptr;
    const WeightRows input_weights(w_ih), recurrent_weights(w_hh);
    const Int8Kernel kernel = int8_kernel();
    float* gx_p = gx_buffer.data_ptr<float>();
    float* gh_p = gh.data_ptr<float>();
    float* y_p = y.data_ptr<float>();
    float* h_p = h.data_ptr<float>();  // h_0 until the end, when it becomes h_n
    float* c_p = c.defined() ? c.data_ptr<float>() : nullptr;
    uint8_t* qx_p = qx.data_ptr<uint8_t>();

    team.run([&](const Member& me) {
      const auto [u0, u1] = me.share(H, W);  // this thread's hidden units, whole vectors
      uint8_t* my_qh = qh.data_ptr<uint8_t>() + me.index * s.B * H;
      QuantizedRow* my_h_rows = h_rows.data() + me.index * s.B;
      for (int64_t step = 0; step < s.T;) {
        const cpu::StepChunk chunk = cpu::next_chunk(s, reverse, step, chunk_cap);
        // x·W_ihᵀ + bias for the chunk: its rows quantized by all threads, then each thread's
        // share of the G*H columns. The previous chunk ended with a barrier, so nobody still
        // reads the buffers.
        const auto [r0, r1] = me.share(chunk.rows);
        for (int64_t r = r0; r < r1; ++r) {
          x_rows[r] = quantize_row(x_p + (chunk.row0 + r) * I, I, qx_p + r * I);
        }
        me.barrier();
        const auto [c0, c1] = me.share(GH, cpu::kGemmRowAlignment);
        quantized_product(kernel, Walk::kProjection, {qx_p, x_rows.data(), I}, chunk.rows, input_weights, c0,
                          c1 - c0, bias_p,
                          [&](int64_t r) { return gx_p + r * GH + c0; });
        me.barrier();

        for (; step < chunk.end; ++step) {
          const int64_t t = reverse ? s.T - 1 - step : step;
          const int64_t n = s.batch_sizes[t], off = s.offsets[t];
          if (n == 0) continue;
          const Predecessor before = predecessor(s, reverse, t);
          const auto h_prev_row = [&](int64_t b) { return before.row<float>(b, y_p, H, h_p, H); };
          if (u1 > u0) {
            for (int64_t b = 0; b < n; ++b) my_h_rows[b] = quantize_row(h_prev_row(b), H, my_qh + b * H);
            for (int64_t g = 0; g < G; ++g) {
              quantized_product(kernel, Walk::kRecurrent, {my_qh, my_h_rows, H}, n, recurrent_weights, g * H + u0,
                                u1 - u0, nullptr,
                                [&](int64_t b) { return gh_p + b * GH + g * H + u0; });
            }
            for (int64_t j = u0; j < u1; j += W) {
              const int64_t lanes = std::min(W, u1 - j);
              for (int64_t b = 0; b < n; ++b) {
                const StepForward<float> io{gx_p + (off - chunk.row0 + b) * GH, gh_p + b * GH, b_hn_p,
                                            h_prev_row(b), c_p ? c_p + b * H : nullptr, y_p + (off + b) * H,
                                            nullptr};
                cpu::cell_units<Cell, true>(io, H, j, lanes);
              }
            }
          }
          me.barrier();  // h_t complete before anyone reads it at step t+1
        }
      }
    });

    for (const FinalRun& run : final_runs(s, reverse)) {  // h_n
      std::memcpy(h_p + run.row * H, y_p + run.source * H, run.rows * H * sizeof(float));
    }
  }
};

}  // namespace

void quantized_forward_loop_cpu(const LayerShape& s, bool reverse, const Tensor& x, const QuantizedMatrix& w_ih,
                                const QuantizedMatrix& w_hh, const Tensor& bias, const Tensor& b_hn, Tensor& y,
                                Tensor& h, Tensor& c) {
  dispatch_cell<QuantizedForwardLoop, float>(s.cell, s, reverse, x, w_ih, w_hh, bias, b_hn, y, h, c);
}

}  // namespace fused_rnn
