// The int8 inference path on the CPU: the op fused_rnn::quantized_layer_forward (a layer's forward
// with int8 weights) and its weights' packing, fused_rnn::quantized_pack_weight.
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
// bits and split each activation into its two 4-bit halves instead, two exact vpmaddubsw products.
// Both give the same integers, and the scaling is done element by element in a fixed order, so
// results are bitwise the same for either kernel and any number of threads
// (the int8_kernel override, csrc/overrides.h, forces a lesser kernel). W is read in panels, below.
//
// The loop is the float forward's (forward_loop.cpp): one team for the whole sequence, each thread a
// fixed share of the hidden units, x's projection a chunk of steps at a time, the gate math in
// float32 from cells.h.
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

#include "cell_units.h"
#include "layer_cpu.h"
#include "chunks.h"
#include "kernel_plan.h"
#include "team.h"

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

// The weight panels (pack_int8_panels): the rows of each gate in groups of 16 (the last group
// of a gate padded with zero rows), and k in quads of 4 (padded with zeros), one 64-byte vector
// per group and quad: panels[i][q][4r + t] = w[gate · H + 16j + r][4q + t] for group i = gate ·
// groups_per_gate + j. A product then needs no horizontal sums: a vector of 16 int32 sums, one per
// weight row, takes each activation's 4 bytes broadcast (outer products; fbgemm's packed int8 B
// interleaves 4 k per 32-bit lane too), and 16 finished sums are dequantized and stored at once.
// Against the row-major dot products this replaced (16 sums per 16 accumulators, then a tree of
// shuffles), the tiles end with 16 times the work behind them: B=8 H=1024 went from 0.9-1.1x of
// torch's int8 LSTM to 1.3-1.5x (bench/NOTES.md).
constexpr int64_t kGroupRows = kInt8GroupRows, kQuad = kInt8Quad, kPanelBytes = kInt8PanelBytes;

// Quantized activations: rows of int8_quads(K) · 4 bytes (the padding zero: it meets zero weights),
// with their scales and zero points.
struct QuantizedActivations {
  const uint8_t* q;
  const QuantizedRow* rows;
  int64_t stride;
};

// A weight matrix as the kernel reads it (no tensor calls inside the team).
struct WeightPanels {
  const int8_t* panels;
  const float* scale;      // [G*H], per row
  const int32_t* row_sum;  // [G*H]
  int64_t K4, H, groups_per_gate;
  WeightPanels(const QuantizedMatrix& w, int64_t H)
      : panels(w.panels.data_ptr<int8_t>()),
        scale(w.scale.data_ptr<float>()),
        row_sum(w.row_sum.data_ptr<int32_t>()),
        K4(w.panels.size(1)),
        H(H),
        groups_per_gate(int8_groups_per_gate(H)) {}
  // Group i's first output column (a row of W) and its number of rows (16 but at a gate's end).
  int64_t column(int64_t i) const { return i / groups_per_gate * H + i % groups_per_gate * kGroupRows; }
  int64_t rows(int64_t i) const { return std::min(kGroupRows, H - i % groups_per_gate * kGroupRows); }
  const int8_t* panel(int64_t i) const { return panels + i * K4 * kPanelBytes; }
};

// One tile: up to 2 weight groups x NB activation rows, written to out + b · ld + column.
struct PanelTile {
  const WeightPanels& w;
  const QuantizedActivations& x;
  int64_t group, b;  // the first group, the first activation row
  const float* bias; // [G*H] or null
  float* out;
  int64_t ld;
};

// One dequantized value: float(sum - zero · row sum) times both scales, plus the bias in the same
// rounding (an explicit fma, which the vector version also takes: the same bits either way).
inline float dequantize(int32_t sum, const QuantizedRow& a, int32_t row_sum, float w_scale, const float* bias) {
  const float value = static_cast<float>(sum - a.zero * row_sum), scale = a.scale * w_scale;
  return bias ? std::fma(value, scale, *bias) : value * scale;
}

// The sums of NB rows x one group's 16 rows, as sums[b][r], dequantized into the tile's output.
template <int NB>
void store_sums(const PanelTile& t, int64_t i, const int32_t (&sums)[NB][kGroupRows]) {
  const int64_t col = t.w.column(i), rows = t.w.rows(i);
  for (int b = 0; b < NB; ++b)
    for (int64_t r = 0; r < rows; ++r) {
      t.out[(t.b + b) * t.ld + col + r] = dequantize(sums[b][r], t.x.rows[t.b + b], t.w.row_sum[col + r],
                                                     t.w.scale[col + r], t.bias ? t.bias + col + r : nullptr);
    }
}

inline int32_t quad_of(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <int NB>
void panel_sums_scalar(const PanelTile& t, int64_t i, int32_t (&sums)[NB][kGroupRows]) {
  const int8_t* w = t.w.panel(i);
  for (int b = 0; b < NB; ++b) {
    const uint8_t* a = t.x.q + (t.b + b) * t.x.stride;
    for (int64_t r = 0; r < kGroupRows; ++r) {
      int32_t s = 0;
      for (int64_t k = 0; k < t.w.K4 * kQuad; ++k) {
        s += int32_t{a[k]} * int32_t{w[k / kQuad * kPanelBytes + r * kQuad + k % kQuad]};
      }
      sums[b][r] = s;
    }
  }
}

#if defined(__AVX2__)
// A group's 64 bytes as two halves (rows 0-7, 8-15) against each activation's 4 bytes broadcast,
// those split into 4-bit halves (a = 16 · high + low, each in [0, 15]): a pair of products stays
// within ±3840 in int16, where 8-bit activations would saturate vpmaddubsw.
template <int NB>
void panel_sums_avx2(const PanelTile& t, int64_t i, int32_t (&sums)[NB][kGroupRows]) {
  const __m256i ones = _mm256_set1_epi16(1), sixteen = _mm256_set1_epi16(16), nibble = _mm256_set1_epi8(0x0F);
  const int8_t* w = t.w.panel(i);
  __m256i acc[NB][2];
  for (int b = 0; b < NB; ++b) acc[b][0] = acc[b][1] = _mm256_setzero_si256();
  for (int64_t q = 0; q < t.w.K4; ++q) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + q * kPanelBytes));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + q * kPanelBytes + 32));
    for (int b = 0; b < NB; ++b) {
      const __m256i a = _mm256_set1_epi32(quad_of(t.x.q + (t.b + b) * t.x.stride + q * kQuad));
      const __m256i low = _mm256_and_si256(a, nibble), high = _mm256_and_si256(_mm256_srli_epi16(a, 4), nibble);
      const auto products = [&](__m256i wv) {
        return _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(low, wv), ones),
                                _mm256_madd_epi16(_mm256_maddubs_epi16(high, wv), sixteen));
      };
      acc[b][0] = _mm256_add_epi32(acc[b][0], products(w0));
      acc[b][1] = _mm256_add_epi32(acc[b][1], products(w1));
    }
  }
  for (int b = 0; b < NB; ++b) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(sums[b]), acc[b][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(sums[b] + 8), acc[b][1]);
  }
}

#define FUSED_RNN_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))

// acc += the u8 · s8 products of x and w, four by four, in place. GCC 12 compiles the intrinsic
// (_mm512_dpbusd_epi32) into a vpdpbusd into a fresh register and a copy back, and with 16
// accumulators runs out of registers (it spilled two and loaded operands twice, perf annotate);
// the instruction accumulates in place, and saying so in asm keeps the loop to its loads and
// vpdpbusd (20-25% faster, microbenchmark at K = 1024).
FUSED_RNN_VNNI inline void vnni_dot_add(__m512i& acc, __m512i x, __m512i w) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w));
}

// What a group's 16 outputs need besides the sums, loaded once per tile: where they go, which
// exist, and their row sums, scales and biases. store_vnni then dequantizes one activation row's
// 16 sums as dequantize() does, 16 at a time.
struct GroupVectors {
  int64_t col;
  __mmask16 mask;
  __m512i row_sum;
  __m512 scale, bias;
};

FUSED_RNN_VNNI inline GroupVectors group_vectors(const PanelTile& t, int64_t i) {
  const int64_t col = t.w.column(i);
  const __mmask16 mask = static_cast<__mmask16>((1u << t.w.rows(i)) - 1);
  return {col, mask, _mm512_maskz_loadu_epi32(mask, t.w.row_sum + col), _mm512_maskz_loadu_ps(mask, t.w.scale + col),
          t.bias ? _mm512_maskz_loadu_ps(mask, t.bias + col) : _mm512_setzero_ps()};
}

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ == 12  // PR 105593: see wide_float.h
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
FUSED_RNN_VNNI inline void store_vnni(const PanelTile& t, const GroupVectors& g, int64_t b, __m512i sum) {
  const QuantizedRow& a = t.x.rows[t.b + b];
  const __m512i zero_sums = _mm512_mullo_epi32(_mm512_set1_epi32(a.zero), g.row_sum);
  const __m512 value = _mm512_cvtepi32_ps(_mm512_sub_epi32(sum, zero_sums));
  const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(a.scale), g.scale);
  _mm512_mask_storeu_ps(t.out + (t.b + b) * t.ld + g.col, g.mask,
                        t.bias ? _mm512_fmadd_ps(value, scale, g.bias) : _mm512_mul_ps(value, scale));
}
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ == 12
#pragma GCC diagnostic pop
#endif

// The VNNI tiles, GROUPS(F, b) x ROWS(F) written out: with the accumulators in an array, GCC 12
// keeps them in memory or copies each around every vpdpbusd (2-3x slower, measured). c<g><b>
// accumulates group g times activation row b; v<g> is group g's vector for quad q, x row b's
// 4 bytes broadcast.
#define FUSED_RNN_ZERO(g, b) __m512i c##g##b = _mm512_setzero_si512();
#define FUSED_RNN_LOAD(g, b) const __m512i v##g = _mm512_loadu_si512(w##g + q * kPanelBytes);
#define FUSED_RNN_DOT(g, b) vnni_dot_add(c##g##b, x, v##g);
#define FUSED_RNN_PANEL(g, b) const int8_t* w##g = t.w.panel(t.group + g);
#define FUSED_RNN_VECTORS(g, b) const GroupVectors s##g = group_vectors(t, t.group + g);
#define FUSED_RNN_STORE(g, b) store_vnni(t, s##g, b, c##g##b);
#define FUSED_RNN_ZERO_ROW(b) GROUPS(FUSED_RNN_ZERO, b)
#define FUSED_RNN_DOT_ROW(b)                                                  \
  {                                                                           \
    const __m512i x = _mm512_set1_epi32(quad_of(a + b * t.x.stride + q * kQuad)); \
    GROUPS(FUSED_RNN_DOT, b)                                                  \
  }
#define FUSED_RNN_STORE_ROW(b) GROUPS(FUSED_RNN_STORE, b)
#define FUSED_RNN_TILE(NAME)                                 \
  FUSED_RNN_VNNI void NAME(const PanelTile& t) {              \
    GROUPS(FUSED_RNN_PANEL, 0)                                \
    const uint8_t* a = t.x.q + t.b * t.x.stride;              \
    ROWS(FUSED_RNN_ZERO_ROW)                                  \
    for (int64_t q = 0; q < t.w.K4; ++q) {                    \
      GROUPS(FUSED_RNN_LOAD, 0)                               \
      ROWS(FUSED_RNN_DOT_ROW)                                 \
    }                                                         \
    GROUPS(FUSED_RNN_VECTORS, 0)                              \
    ROWS(FUSED_RNN_STORE_ROW)                                 \
  }
#define ROWS8(F) F(0) F(1) F(2) F(3) F(4) F(5) F(6) F(7)
#define ROWS4(F) F(0) F(1) F(2) F(3)
#define ROWS2(F) F(0) F(1)
#define ROWS1(F) F(0)
#define GROUPS(F, b) F(0, b) F(1, b)
#define ROWS ROWS8
FUSED_RNN_TILE(vnni_tile_2x8)
#undef ROWS
#define ROWS ROWS4
FUSED_RNN_TILE(vnni_tile_2x4)
#undef ROWS
#define ROWS ROWS2
FUSED_RNN_TILE(vnni_tile_2x2)
#undef ROWS
#define ROWS ROWS1
FUSED_RNN_TILE(vnni_tile_2x1)
#undef ROWS
#undef GROUPS
#define GROUPS(F, b) F(0, b)
#define ROWS ROWS8
FUSED_RNN_TILE(vnni_tile_1x8)
#undef ROWS
#define ROWS ROWS4
FUSED_RNN_TILE(vnni_tile_1x4)
#undef ROWS
#define ROWS ROWS2
FUSED_RNN_TILE(vnni_tile_1x2)
#undef ROWS
#define ROWS ROWS1
FUSED_RNN_TILE(vnni_tile_1x1)
#undef ROWS
#undef GROUPS
#undef ROWS8
#undef ROWS4
#undef ROWS2
#undef ROWS1
#undef FUSED_RNN_TILE
#undef FUSED_RNN_STORE_ROW
#undef FUSED_RNN_DOT_ROW
#undef FUSED_RNN_ZERO_ROW
#undef FUSED_RNN_STORE
#undef FUSED_RNN_VECTORS
#undef FUSED_RNN_PANEL
#undef FUSED_RNN_DOT
#undef FUSED_RNN_LOAD
#undef FUSED_RNN_ZERO
#undef FUSED_RNN_VNNI
#endif

// The integer kernel is the plan's (kernel_plan.h: the best the CPU has, or the int8_kernel
// override's): all give the same bits.
using Int8Kernel = cpu::Kernel;

// G groups (1 or 2) x NB activation rows from t.group and t.b, by the chosen kernel.
template <int NB>
void panel_tile(Int8Kernel kernel, int64_t G, const PanelTile& t) {
#if defined(__AVX2__)
  if (kernel == Int8Kernel::kInt8Vnni) {
    if constexpr (NB == 8) return G == 2 ? vnni_tile_2x8(t) : vnni_tile_1x8(t);
    if constexpr (NB == 4) return G == 2 ? vnni_tile_2x4(t) : vnni_tile_1x4(t);
    if constexpr (NB == 2) return G == 2 ? vnni_tile_2x2(t) : vnni_tile_1x2(t);
    if constexpr (NB == 1) return G == 2 ? vnni_tile_2x1(t) : vnni_tile_1x1(t);
  }
#endif
  for (int64_t g = 0; g < G; ++g) {
    int32_t sums[NB][kGroupRows];
#if defined(__AVX2__)
    if (kernel == Int8Kernel::kInt8Avx2) {
      panel_sums_avx2<NB>(t, t.group + g, sums);
    } else
#endif
    {
      panel_sums_scalar<NB>(t, t.group + g, sums);
    }
    store_sums<NB>(t, t.group + g, sums);
  }
}

// out[b · ld + column] = x_b · w_column (dequantized, plus bias[column] when given) for activation
// rows b < n and the columns of weight groups [first, last). Two groups at a time (32 KB of
// panels at K = 1024, which stay in L1/L2 while the rows stream past: W is read once per call
// whatever n is), the rows 8 at a time, then 4, 2, 1.
void quantized_product(Int8Kernel kernel, const QuantizedActivations& x, int64_t n, const WeightPanels& w,
                       int64_t first, int64_t last, const float* bias, float* out, int64_t ld) {
  for (int64_t i = first; i < last; i += 2) {
    const int64_t G = std::min<int64_t>(2, last - i);
    int64_t b = 0;
    for (; b + 8 <= n; b += 8) panel_tile<8>(kernel, G, {w, x, i, b, bias, out, ld});
    if (b + 4 <= n) panel_tile<4>(kernel, G, {w, x, i, b, bias, out, ld}), b += 4;
    if (b + 2 <= n) panel_tile<2>(kernel, G, {w, x, i, b, bias, out, ld}), b += 2;
    if (b < n) panel_tile<1>(kernel, G, {w, x, i, b, bias, out, ld});
  }
}

}  // namespace

at::Tensor pack_int8_panels(const at::Tensor& weight, int64_t gates) {
  const Tensor q = weight.contiguous();
  const int64_t H = q.size(0) / gates, K = q.size(1), per_gate = int8_groups_per_gate(H), K4 = int8_quads(K);
  Tensor panels = at::zeros({gates * per_gate, K4, kPanelBytes}, q.options());
  const int8_t* src = q.data_ptr<int8_t>();
  int8_t* dst = panels.data_ptr<int8_t>();
  for (int64_t g = 0; g < gates; ++g)
    for (int64_t u = 0; u < H; ++u) {
      int8_t* group = dst + (g * per_gate + u / kGroupRows) * K4 * kPanelBytes + u % kGroupRows * kQuad;
      const int8_t* row = src + (g * H + u) * K;
      for (int64_t k = 0; k < K; ++k) group[k / kQuad * kPanelBytes + k % kQuad] = row[k];
    }
  return panels;
}

namespace {

template <typename Cell>
struct QuantizedForwardLoop {
  static constexpr int64_t W = KernelMath<float>::kWidth;
  static constexpr int G = Cell::kGates;

  static void run(const cpu::CpuPlan& plan, const LayerShape& s, bool reverse, const Tensor& x, const QuantizedMatrix& w_ih,
                  const QuantizedMatrix& w_hh, const Tensor& bias, const Tensor& b_hn, Tensor& y, Tensor& h,
                  Tensor& c) {
    const int64_t H = s.H, I = s.I, GH = G * H;
    const int64_t chunk_cap = cpu::chunk_rows(s, GH), chunk_max = std::min(s.N, chunk_cap);
    const cpu::Team team(2.0 * s.B * GH * (H + I));
    Tensor gx_buffer = empty_large({chunk_max, GH}, y.options());
    Tensor gh = at::empty({s.B, GH}, y.options());
    // Quantized activations: the chunk's x rows (shared), and each thread's own copy of h_{t-1}
    // (every thread needs all of it; quantizing it twice is cheaper than a second barrier). Rows
    // padded to whole quads, the padding zero.
    const int64_t x_stride = int8_quads(I) * kQuad, h_stride = int8_quads(H) * kQuad;
    Tensor qx = at::zeros({chunk_max, x_stride}, at::kByte);
    Tensor qh = at::zeros({team.threads, s.B, h_stride}, at::kByte);
    std::vector<QuantizedRow> x_rows(chunk_max), h_rows(team.threads * s.B);

    const float* x_p = x.data_ptr<float>();
    const float* bias_p = bias.defined() ? bias.data_ptr<float>() : nullptr;
    const float* b_hn_p = b_hn.defined() ? b_hn.data_ptr<float>() : nullptr;
    const WeightPanels input_weights(w_ih, H), recurrent_weights(w_hh, H);
    const int64_t per_gate = recurrent_weights.groups_per_gate;  // both matrices' groups: G*H rows
    const Int8Kernel kernel = plan.steps;
    float* gx_p = gx_buffer.data_ptr<float>();
    float* gh_p = gh.data_ptr<float>();
    float* y_p = y.data_ptr<float>();
    float* h_p = h.data_ptr<float>();  // h_0 until the end, when it becomes h_n
    float* c_p = c.defined() ? c.data_ptr<float>() : nullptr;
    uint8_t* qx_p = qx.data_ptr<uint8_t>();

    team.run([&](const Member& me) {
      const auto [u0, u1] = me.share(H, kGroupRows);  // this thread's hidden units, whole groups
      const int64_t my_first = u0 / kGroupRows, my_last = (u1 + kGroupRows - 1) / kGroupRows;
      uint8_t* my_qh = qh.data_ptr<uint8_t>() + me.index * s.B * h_stride;
      QuantizedRow* my_h_rows = h_rows.data() + me.index * s.B;
      for (int64_t step = 0; step < s.T;) {
        const cpu::StepChunk chunk = cpu::next_chunk(s, reverse, step, chunk_cap);
        // x·W_ihᵀ + bias for the chunk: its rows quantized by all threads, then each thread's
        // share of the weight groups (the G*H columns, 16 at a time). The previous chunk ended with
        // a barrier, so nobody still reads the buffers.
        const auto [r0, r1] = me.share(chunk.rows);
        for (int64_t r = r0; r < r1; ++r) {
          x_rows[r] = quantize_row(x_p + (chunk.row0 + r) * I, I, qx_p + r * x_stride);
        }
        me.barrier();
        const auto [g0, g1] = me.share(G * per_gate);  // weight groups, whole gates or not
        quantized_product(kernel, {qx_p, x_rows.data(), x_stride}, chunk.rows, input_weights, g0, g1, bias_p, gx_p,
                          GH);
        me.barrier();

        for (; step < chunk.end; ++step) {
          const int64_t t = reverse ? s.T - 1 - step : step;
          const int64_t n = s.batch_sizes[t], off = s.offsets[t];
          if (n == 0) continue;
          const Predecessor before = predecessor(s, reverse, t);
          const auto h_prev_row = [&](int64_t b) { return before.row<float>(b, y_p, H, h_p, H); };
          if (u1 > u0) {
            for (int64_t b = 0; b < n; ++b) my_h_rows[b] = quantize_row(h_prev_row(b), H, my_qh + b * h_stride);
            for (int64_t g = 0; g < G; ++g) {
              quantized_product(kernel, {my_qh, my_h_rows, h_stride}, n, recurrent_weights, g * per_gate + my_first,
                                g * per_gate + my_last, nullptr, gh_p, GH);
            }
            for (int64_t j = u0; j < u1; j += W) {
              const int64_t lanes = std::min(W, u1 - j);
              for (int64_t b = 0; b < n; ++b) {
                const StepForward<float> io{gx_p + (off - chunk.row0 + b) * GH, gh_p + b * GH, b_hn_p,
                                            h_prev_row(b), c_p ? c_p + b * H : nullptr, y_p + (off + b) * H,
                                            nullptr};
                cpu::cell_units<Cell, true>(io, H, j, lanes, plan.wide_cells);
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

void quantized_forward_loop_cpu(const cpu::CpuPlan& plan, const LayerShape& s, bool reverse, const Tensor& x,
                                const QuantizedMatrix& w_ih, const QuantizedMatrix& w_hh, const Tensor& bias,
                                const Tensor& b_hn, Tensor& y, Tensor& h, Tensor& c) {
  dispatch_cell<QuantizedForwardLoop, float>(s.cell, plan, s, reverse, x, w_ih, w_hh, bias, b_hn, y, h, c);
}

namespace {

using c10::optional;

// The int8 path's weights in the kernel's layout (pack_int8_panels), once per model.
Tensor quantized_pack_weight(const Tensor& weight, int64_t gates) {
  TORCH_CHECK(gates >= 1 && weight.dim() == 2 && weight.size(0) % gates == 0 && weight.scalar_type() == at::kChar &&
                  weight.device().is_cpu(),
              "fused_rnn: quantized_pack_weight takes a 2-D int8 CPU weight with a multiple of ", gates,
              " rows, got a ", weight.dim(), "-D ", weight.scalar_type(), " tensor of shape ", weight.sizes(), " on ",
              weight.device());
  return pack_int8_panels(weight, gates);
}

// The int8 inference path's op (CPU): float32 input and state, int8 weight panels with their
// per-row scales and row sums, float32 biases; no gradient.
std::tuple<Tensor, Tensor, Tensor> quantized_layer_forward(
    int64_t cell, const Tensor& x_in, at::IntArrayRef batch_sizes, bool reverse, const Tensor& h0,
    const optional<Tensor>& c0, const Tensor& w_ih, const Tensor& w_ih_scale, const Tensor& w_ih_row_sum,
    const Tensor& w_hh, const Tensor& w_hh_scale, const Tensor& w_hh_row_sum, const optional<Tensor>& b_ih,
    const optional<Tensor>& b_hh) {
  LayerShape s;
  describe_cell(s, cell);
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "fused_rnn: the int8 layer takes a 2-D float32 CPU input, got a ", x_in.dim(), "-D ",
              x_in.scalar_type(), " tensor on ", x_in.device());
  s.N = x_in.size(0);
  s.I = x_in.size(1);
  TORCH_CHECK(w_ih_scale.dim() == 1 && w_ih_scale.size(0) % s.gates == 0,
              "fused_rnn: weight_ih's scales must be 1-D with a multiple of ", s.gates, " rows, got ",
              w_ih_scale.sizes());
  s.H = s.P = w_ih_scale.size(0) / s.gates;
  s.proj = false;
  s.outputs_in_saved = false;
  // Within int32: a product is at most 255 · 128, so a row's sum and its zero-point correction each
  // stay below 2^30 for up to 2^15 terms, and so does their difference.
  TORCH_CHECK(std::max(s.I, s.H) <= (int64_t{1} << 15), "fused_rnn: the int8 layer takes at most 32768 ",
              "input features and hidden units (its int32 sums would overflow), got ", s.I, " and ", s.H);
  const auto check_weights = [&](const Tensor& panels, const Tensor& scale, const Tensor& row_sum, const char* name,
                                 int64_t cols) {
    const int64_t groups = s.gates * int8_groups_per_gate(s.H), quads = int8_quads(cols);
    TORCH_CHECK(panels.dim() == 3 && panels.size(0) == groups && panels.size(1) == quads &&
                    panels.size(2) == kInt8PanelBytes && panels.scalar_type() == at::kChar && panels.device().is_cpu(),
                "fused_rnn: ", name, " must be int8 CPU panels of shape [", groups, ", ", quads, ", ",
                kInt8PanelBytes, "] (fused_rnn::quantized_pack_weight), got ", panels.scalar_type(), " ",
                panels.sizes(), " on ", panels.device());
    TORCH_CHECK(scale.dim() == 1 && scale.size(0) == s.gates * s.H && scale.scalar_type() == at::kFloat &&
                    row_sum.dim() == 1 && row_sum.size(0) == s.gates * s.H && row_sum.scalar_type() == at::kInt &&
                    scale.device().is_cpu() && row_sum.device().is_cpu(),
                "fused_rnn: ", name, " needs float32 scales and int32 row sums of shape [", s.gates * s.H,
                "] on the CPU, got ", scale.scalar_type(), " ", scale.sizes(), " and ", row_sum.scalar_type(), " ",
                row_sum.sizes());
    return QuantizedMatrix{panels.contiguous(), scale.contiguous(), row_sum.contiguous()};
  };
  const QuantizedMatrix input_weights = check_weights(w_ih, w_ih_scale, w_ih_row_sum, "weight_ih", s.I);
  const QuantizedMatrix recurrent_weights = check_weights(w_hh, w_hh_scale, w_hh_row_sum, "weight_hh", s.H);
  describe_steps(s, batch_sizes, h0.dim() == 2 ? h0.size(0) : 0);
  check_states_and_biases(s, x_in, h0, c0, b_ih, b_hh);

  const Tensor bias_ih = contiguous_as(b_ih, at::kFloat), bias_hh = contiguous_as(b_hh, at::kFloat);
  const Tensor bias = folded_bias(s, bias_ih, bias_hh);
  const Tensor b_hn = gru_hidden_bias_n(s, bias_hh);
  Tensor y = empty_large({s.N, s.H}, x_in.options());
  Tensor h = h0.contiguous().clone();
  Tensor c = s.cell == CellKind::LSTM ? c0->contiguous().clone() : Tensor();
  const cpu::CpuPlan plan = cpu::plan_cpu(cpu::Pass::kInt8Forward, s, at::kFloat);
  quantized_forward_loop_cpu(plan, s, reverse, x_in.contiguous(), input_weights, recurrent_weights, bias, b_hn, y, h, c);
  if (!c.defined()) c = at::empty({0}, x_in.options());
  return {y, h, c};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_rnn, CPU, m) {
  m.impl("quantized_layer_forward", &quantized_layer_forward);
  m.impl("quantized_pack_weight", &quantized_pack_weight);
}

}  // namespace fused_rnn
