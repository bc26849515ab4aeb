// The step loops on the CPU.
//
// The recurrent weights are packed once per call into panels that a register-blocked kernel
// streams: for a block of Width hidden units (8 floats with AVX2), all G gates' weights side by
// side for each k. A sequence runs in one parallel region (a Team): each thread keeps a range of
// unit blocks for every step. Per step it computes h_{t-1}·W_hhᵀ for all gates of a block and runs
// the cells.h math on it while it is in cache, Width units at a time; a barrier ends the step.
// x·W_ihᵀ is computed in chunks of steps, each thread one GEMM for its share of the columns.
// float32 on a CPU with AVX-512 takes wide_float.h's 16-float tiles for the steps and x·W_ihᵀ,
// and on AMD for the gradients' products too (instead of BLAS, see wide_chunk_products); with
// AMX-BF16 as well, x·W_ihᵀ, dX and the steps' products of batches from 16 rows (forward and
// backward) take amx_float.h's split bfloat16 tiles (AmxSplit below); other types and CPUs the
// AVX2 tiles and BLAS.
// Backward has the same shape: a thread first propagates the previous step's gate gradients to its
// block of dh (dG·W_hh, restricted to those columns), then runs the cell backward on the block.
// Once a chunk of steps is done, each thread adds its share of the rows of dW_ih, dW_hh and the
// bias gradients (BLAS on the chunk's gate gradients while they are in cache) and computes its
// share of the chunk's rows of dX. h_{t-1} is read from the outputs (or h_0), c_{t-1} from the
// step before's saved c_t (or c_0): neither is saved twice. A projection (LSTM proj_size) needs
// every unit first, so it takes one more barrier per step, and BLAS.
//
// Blocks are aligned to the vector width, so which units take the scalar tail does not depend on
// the number of threads; nothing is accumulated across threads, and chunks are added in a fixed
// order: results are reproducible. Between thread counts they are the same as long as BLAS gives
// an element the same bits whatever share of rows or columns a call covers, which MKL does for the
// weight and input gradients (tests/test_cpu_blocking.py checks it) but not always for the
// projection, whose last bits can differ. The AVX-512 tiles compute each element as one chain
// over k, the AMX product as one fixed sequence of tile products: the same whichever thread
// computes it.
#include <ATen/Dispatch.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <type_traits>
#include <vector>

#include "amx_float.h"
#include "step_team.h"
#include "wide_float.h"

// The Fortran BLAS that torch's CPU build carries (MKL or OpenBLAS), when it exports it. Declared
// weak: where it is missing the pointers are null and gemm_rows() falls back to at::mm_out.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace fused_rnn {
namespace {

using at::Tensor;
using cpu::cell_units;
using cpu::chunk_rows;
using cpu::for_each_piece;
using cpu::gemm_piece;
using cpu::kGemmRowPiece;
using cpu::Member;
using cpu::next_chunk;
using cpu::StepChunk;
using cpu::Team;

// A row-major matrix operand: element (r, c) at data[r * ld + c], or at data[c * ld + r] when
// transposed; conj for the complex fallback (real types ignore it).
template <typename T>
struct MatrixRef {
  const T* data;
  int64_t ld;
  bool transposed = false;
  bool conj = false;
};

// Row-major C[m, n] (+)= op(A)[m, k] · op(B)[k, n], with ldc the row stride of C. BLAS is
// column-major, so it computes Cᵀ = op(B)ᵀ · op(A)ᵀ.
template <typename T>
void gemm_rows(int64_t m, int64_t n, int64_t k, MatrixRef<T> a, MatrixRef<T> b, bool accumulate, T* c,
               int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // an empty sum (input_size 0, or no rows); BLAS would refuse the zero leading dimensions
    if (!accumulate) {
      for (int64_t r = 0; r < m; ++r) std::fill(c + r * ldc, c + r * ldc + n, T(0));
    }
    return;
  }
  const bool fits = std::max({m, n, k, a.ld, b.ld, ldc}) <= INT_MAX;
  const char trans_b = b.transposed ? 'T' : 'N', trans_a = a.transposed ? 'T' : 'N';
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int LDA = static_cast<int>(b.ld), LDB = static_cast<int>(a.ld), LDC = static_cast<int>(ldc);
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ && fits) {
      const float one = 1, beta = accumulate ? 1 : 0;
      sgemm_(&trans_b, &trans_a, &M, &N, &K, &one, b.data, &LDA, a.data, &LDB, &beta, c, &LDC);
      return;
    }
  } else if constexpr (std::is_same_v<T, double>) {
    if (dgemm_ && fits) {
      const double one = 1, beta = accumulate ? 1 : 0;
      dgemm_(&trans_b, &trans_a, &M, &N, &K, &one, b.data, &LDA, a.data, &LDB, &beta, c, &LDC);
      return;
    }
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const auto view = [&](MatrixRef<T> x, int64_t rows, int64_t cols) {
    Tensor t = x.transposed ? at::from_blob(const_cast<T*>(x.data), {cols, rows}, {x.ld, 1}, opts).t()
                            : at::from_blob(const_cast<T*>(x.data), {rows, cols}, {x.ld, 1}, opts);
    return x.conj ? t.conj() : t;
  };
  Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  if (accumulate) {
    C.addmm_(view(a, m, k), view(b, k, n));
  } else {
    at::mm_out(C, view(a, m, k), view(b, k, n));
  }
}


// Weights in the kernel's order. A panel block covers C vectors of `width` output columns for
// each of G gates (G = 1 for dG·W_hh); for each k, its G*C groups of `width` weights lie side by
// side, so the kernel streams one block with unit stride. Columns past the end are zero. The width
// is the AVX2 tile's vector (kWidth) or, for float with AVX-512, wide_float.h's 16.
// rows_product tells the kernels apart by the panels' width.
static_assert(KernelMath<float>::kWidth != cpu::kWideWidth, "AVX2 and AVX-512 panels must differ in width");

template <typename T>
struct Panels {
  static constexpr int64_t kWidth = KernelMath<T>::kWidth;
  Tensor storage;  // undefined for panels packed into memory of the caller's (columns_in)
  T* data = nullptr;
  int64_t K = 0, G = 1, C = 1, cols = 0, blocks = 0, width = kWidth;
  int64_t block_rows = 0;  // the k a block has room for: K, or columns_in's capacity

  int64_t groups() const { return G * C; }
  int64_t block_size() const { return block_rows * groups() * width; }  // in elements
  const T* block(int64_t u) const { return data + u * block_size(); }
  int64_t first_column(int64_t u, int64_t c) const { return (u * C + c) * width; }
  // How many of the `width` columns of vector c of block u exist (0 past the end).
  int64_t lanes(int64_t u, int64_t c) const { return std::clamp<int64_t>(cols - first_column(u, c), 0, width); }

  // Column j of gate g is row g*cols + j of w [G*cols, K]: for the forward product h·W_hhᵀ.
  static Panels of_rows(const Tensor& w, int64_t G, int64_t C, int64_t cols, int64_t width = kWidth) {
    Panels p = make(w, w.size(1), G, C, cols, width);
    const T* src = w.data_ptr<T>();
    T* dst = p.storage.template data_ptr<T>();
    p.for_each_block([&](int64_t u) {
      if constexpr (std::is_same_v<T, float>) {
        if (width == cpu::kWideWidth) {
          for (int64_t g = 0; g < G; ++g)
            for (int64_t c = 0; c < C; ++c) {
              const float* rows[cpu::kWideWidth];
              for (int64_t l = 0; l < p.lanes(u, c); ++l) rows[l] = src + (g * cols + p.first_column(u, c) + l) * p.K;
              cpu::wide_transpose_rows(rows, p.lanes(u, c), p.K, dst + (u * p.K * p.groups() + g * C + c) * width,
                                       p.groups() * width);
            }
          return;
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t c = 0; c < C; ++c)
          for (int64_t l = 0; l < width; ++l) {
            T* out = dst + (u * p.K * p.groups() + g * C + c) * width + l;
            if (l < p.lanes(u, c)) {
              const T* row = src + (g * cols + p.first_column(u, c) + l) * p.K;
              for (int64_t k = 0; k < p.K; ++k) out[k * p.groups() * width] = row[k];
            } else {
              for (int64_t k = 0; k < p.K; ++k) out[k * p.groups() * width] = T(0);
            }
          }
    });
    return p;
  }

  // Column j is column j of w [K, cols]: for the backward product dG·W_hh.
  static Panels of_columns(const Tensor& w, int64_t C, int64_t width = kWidth) {
    Panels p = make(w, w.size(0), 1, C, w.size(1), width);
    p.for_each_block([&](int64_t u) { p.pack_rows(u, w.data_ptr<T>(), p.cols, 0, p.K); });
    return p;
  }

  // Room for the panels of a [K, cols] matrix in dst, which holds columns_size(capacity, ...)
  // floats (K <= capacity), filled by pack_rows: inside a team, each thread packs the blocks it is
  // given. A block's place does not depend on K, so that blocks never overlap from one use to the next.
  static Panels columns_in(T* dst, int64_t capacity, int64_t K, int64_t cols, int64_t C, int64_t width) {
    Panels p = shaped(K, 1, C, cols, width, capacity);
    p.data = dst;
    return p;
  }
  // The blocks' shape alone, with no weights packed: for a loop that reads the weights as they are.
  static Panels geometry(int64_t K, int64_t G, int64_t C, int64_t cols, int64_t width) {
    return shaped(K, G, C, cols, width, K);
  }
  static int64_t columns_size(int64_t K, int64_t cols, int64_t C, int64_t width) {
    return block_count(cols, C, width) * K * C * width;
  }

  // Rows [k0, k0 + n) of the matrix into block u, from src [n, cols] with row stride ld.
  void pack_rows(int64_t u, const T* src, int64_t ld, int64_t k0, int64_t n) const {
    for (int64_t k = 0; k < n; ++k)
      for (int64_t c = 0; c < C; ++c) {
        T* out = data + ((u * block_rows + k0 + k) * C + c) * width;
        const int64_t m = lanes(u, c);
        if (m > 0) std::memcpy(out, src + k * ld + first_column(u, c), m * sizeof(T));
        std::fill(out + m, out + width, T(0));
      }
  }

 private:
  // Packing is a copy of the weights: worth both threads once a block holds enough of them.
  template <typename F>
  void for_each_block(const F& pack_block) const {
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K * groups() * width));
    at::parallel_for(0, blocks, grain, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) pack_block(u);
    });
  }

  static int64_t block_count(int64_t cols, int64_t C, int64_t width) { return (cols + C * width - 1) / (C * width); }

  // The shape without memory: blocks of C vectors of `width` columns for G gates, room for block_rows k each.
  static Panels shaped(int64_t K, int64_t G, int64_t C, int64_t cols, int64_t width, int64_t block_rows) {
    Panels p;
    p.K = K;
    p.G = G;
    p.C = C;
    p.cols = cols;
    p.width = width;
    p.block_rows = block_rows;
    p.blocks = block_count(cols, C, width);
    return p;
  }

  static Panels make(const Tensor& w, int64_t K, int64_t G, int64_t C, int64_t cols, int64_t width) {
    Panels p = shaped(K, G, C, cols, width, K);
    // Every element is written by the packing (zeros included): no zero fill first, and the block
    // cache's memory, already mapped.
    p.storage = empty_large({std::max<int64_t>(1, p.blocks * K * p.groups() * width)}, w.options());
    p.data = p.storage.template data_ptr<T>();
    return p;
  }
};

// Weights split into AMX tiles (amx_float.h), and room for up to max_rows split rows of the left
// factor. Group q holds 16 output columns, which lie at offset[q] of a row of out: for
// out = rows · Wᵀ with W [G*cols, K] (of_rows: group g·units + v, units = amx_tiles(cols), holds
// W's rows g·cols + 16v .. + 16, the layout of x·W_ihᵀ's and h·W_hhᵀ's buffers), or out = rows · W
// with W [K, cols] (of_columns: group v holds columns 16v .. + 16; dX = dG·W_ih, dh = dG·W_hh).
struct AmxSplit {
  Tensor weights, rows;
  int64_t K = 0, group = 0;
  std::vector<const uint16_t*> b;
  std::vector<int64_t> offset, lanes;
  std::vector<const float*> bias;

  AmxSplit() = default;
  static AmxSplit of_rows(const Tensor& w, int64_t G, int64_t cols, int64_t max_rows, const float* bias_p) {
    AmxSplit split(w.size(1), G * cpu::amx_tiles(cols), max_rows, w);
    const int64_t units = cpu::amx_tiles(cols);
    for (int64_t q = 0; q < split.groups(); ++q) {
      split.offset[q] = q / units * cols + q % units * cpu::kAmxTile;
      split.lanes[q] = std::min(cpu::kAmxTile, cols - q % units * cpu::kAmxTile);
      split.bias[q] = bias_p ? bias_p + split.offset[q] : nullptr;
    }
    const float* src = w.data_ptr<float>();
    split.split_groups([&](int64_t q, uint16_t* dst) {
      cpu::amx_split_columns(src + split.offset[q] * split.K, split.K, split.lanes[q], split.K, dst);
    });
    return split;
  }
  static AmxSplit of_columns(const Tensor& w, int64_t max_rows) {
    const int64_t cols = w.size(1);
    AmxSplit split(w.size(0), cpu::amx_tiles(cols), max_rows, w);
    for (int64_t q = 0; q < split.groups(); ++q) {
      split.offset[q] = q * cpu::kAmxTile;
      split.lanes[q] = std::min(cpu::kAmxTile, cols - q * cpu::kAmxTile);
    }
    const float* src = w.data_ptr<float>();
    split.split_groups([&](int64_t q, uint16_t* dst) {
      cpu::amx_split_kmajor(src + split.offset[q], cols, split.K, split.lanes[q], dst);
    });
    return split;
  }

  int64_t groups() const { return static_cast<int64_t>(b.size()); }
  uint16_t* split() const { return reinterpret_cast<uint16_t*>(rows.data_ptr<int16_t>()); }

  // Rows [r0, r1) of the left factor (r0 a multiple of 16), row(r) giving row r: into their 16-row
  // groups, or with a team each thread its share of the groups of [0, r1).
  template <typename RowFn>
  void split_rows(int64_t r0, int64_t r1, const RowFn& row) const {
    if constexpr (std::is_convertible_v<decltype(row(0)), const float*>) {  // float only
      for (int64_t g = r0 / cpu::kAmxTile; g * cpu::kAmxTile < r1; ++g) {
        const float* in[cpu::kAmxTile];
        const int64_t m = std::min(cpu::kAmxTile, r1 - g * cpu::kAmxTile);
        for (int64_t r = 0; r < m; ++r) in[r] = row(g * cpu::kAmxTile + r);
        cpu::amx_split_rows(in, m, K, split() + g * group);
      }
    }
  }
  template <typename RowFn>
  void split_rows(const Member& me, int64_t n, const RowFn& row) const {
    const auto [r0, r1] = me.share(n, cpu::kAmxTile);
    split_rows(r0, r1, row);
  }

  // out (row stride ldo) for split rows [r0, r0 + n) (r0 a multiple of 32) and groups [q0, q1),
  // over k in [k0, k1) (k0 a multiple of 32; k1 = -1: K) and from out's values with `accumulate`
  // (bias with the first range only).
  template <typename T>
  void product(int64_t r0, int64_t n, int64_t q0, int64_t q1, T* out, int64_t ldo, int64_t k0 = 0, int64_t k1 = -1,
               bool accumulate = false) const {
    if constexpr (std::is_same_v<T, float>) {
      const int64_t shift = k0 / cpu::kAmxDepth * cpu::kAmxBlock;
      cpu::amx_product(split() + r0 / cpu::kAmxTile * group + shift, group, n, b.data() + q0, shift, offset.data() + q0,
                       lanes.data() + q0, q1 - q0, (k1 < 0 ? K : k1) - k0, k0 == 0 ? bias.data() + q0 : nullptr,
                       accumulate, out, ldo);
    }
  }
  // Rows [0, n), all of k, for the listed groups (at most 8).
  template <typename T>
  void product(int64_t n, const int64_t* listed, int64_t count, T* out, int64_t ldo) const {
    if constexpr (std::is_same_v<T, float>) {
      const uint16_t* listed_b[8];
      int64_t listed_offset[8], listed_lanes[8];
      const float* listed_bias[8];
      for (int64_t i = 0; i < count; ++i) {
        const int64_t q = listed[i];
        listed_b[i] = b[q], listed_offset[i] = offset[q], listed_lanes[i] = lanes[q], listed_bias[i] = bias[q];
      }
      cpu::amx_product(split(), group, n, listed_b, 0, listed_offset, listed_lanes, count, K, listed_bias, false, out,
                       ldo);
    }
  }

 private:
  AmxSplit(int64_t K_, int64_t count, int64_t max_rows, const Tensor& w)
      : K(K_), group(cpu::amx_group_size(K_)), b(count), offset(count), lanes(count), bias(count, nullptr) {
    const auto options = w.options().dtype(at::kShort);
    weights = empty_large({std::max<int64_t>(1, count * group)}, options);
    rows = empty_large({std::max<int64_t>(1, cpu::amx_tiles(max_rows) * group)}, options);
    for (int64_t q = 0; q < count; ++q) b[q] = reinterpret_cast<const uint16_t*>(weights.data_ptr<int16_t>()) + q * group;
  }
  // split(q, dst) for every group, on all threads.
  template <typename F>
  void split_groups(const F& split_group) const {
    auto* dst = reinterpret_cast<uint16_t*>(weights.data_ptr<int16_t>());
    at::parallel_for(0, groups(), 4, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) split_group(q, dst + q * group);
    });
  }
};

// About 12 accumulators fit AVX2's 16 vector registers next to the weights: 3 or 4 groups per block.
template <int G>
constexpr int kVectorsPerGate = G >= 3 ? 1 : (G == 2 ? 2 : 3);
template <int NG>
constexpr int kRowsPerBlock = NG >= 12 ? 1 : 12 / NG;

// For MR rows and the NG = G*C groups of one panel block, in registers:
// out[r] + offset[q] (lanes[q] values) (+)= Σ_k rows[r][k] · panel[k][q].
// Kept out of line (one call per row block and k chunk, so the call is cheap): profiles then show
// the matrix product apart from the gate math.
template <typename T, int MR, int NG>
__attribute__((noinline)) void block_product(const T* const* rows, int64_t K, const T* panel, T* const* out,
                                             const int64_t* offset, const int64_t* lanes, bool accumulate) {
  using M = KernelMath<T>;
  using V = typename M::V;
  constexpr int64_t W = M::kWidth;
  V acc[MR][NG];
  for (int r = 0; r < MR; ++r)
    for (int q = 0; q < NG; ++q) acc[r][q] = M::broadcast(T(0));
  for (int64_t k = 0; k < K; ++k) {
    V w[NG];
    for (int q = 0; q < NG; ++q) w[q] = M::load(panel + (k * NG + q) * W);
    for (int r = 0; r < MR; ++r) {
      const V a = M::broadcast(rows[r][k]);
      for (int q = 0; q < NG; ++q) acc[r][q] = M::fmadd(a, w[q], acc[r][q]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int q = 0; q < NG; ++q) {
      if (lanes[q] == 0) continue;
      T* dst = out[r] + offset[q];
      M::store_n(dst, accumulate ? acc[r][q] + M::load_n(dst, lanes[q]) : acc[r][q], lanes[q]);
    }
}

// One pass over k in [k0, k0 + depth) for rows [0, n): kRowsPerBlock rows at a time, then the rest.
template <typename T, int NG, int MR = kRowsPerBlock<NG>, typename RowFn, typename OutFn>
void row_blocks(int64_t n, const RowFn& row, const OutFn& out, int64_t k0, int64_t depth, const T* panel_chunk,
                const int64_t* offset, const int64_t* lanes, bool accumulate) {
  int64_t r0 = 0;
  for (; r0 + MR <= n; r0 += MR) {
    const T* in[MR];
    T* dst[MR];
    for (int r = 0; r < MR; ++r) in[r] = row(r0 + r) + k0, dst[r] = out(r0 + r);
    block_product<T, MR, NG>(in, depth, panel_chunk, dst, offset, lanes, accumulate);
  }
  if constexpr (MR > 1) {
    if (r0 < n) {
      row_blocks<T, NG, MR - 1>(n - r0, [&](int64_t r) { return row(r0 + r); }, [&](int64_t r) { return out(r0 + r); },
                                k0, depth, panel_chunk, offset, lanes, accumulate);
    }
  }
}

// Rows [0, n) times panel block u. row(r) gives row r of the left factor, out(r) where row r of
// block u's output starts; within it, gate g's vector c lies at g*gate_stride + c*width. On
// AVX-512 panels (float), wide_rows_product over all of k, each output starting from `bias` (laid
// out as the output, or null). Else block_product: k is walked in chunks that keep a chunk of the
// panel (16 KB) in L1 while every row block uses it, the partial sums added chunk after chunk in a
// fixed order (no bias there).
template <typename T, int NG, typename RowFn, typename OutFn>
void rows_product(const Panels<T>& panels, int64_t u, int64_t n, const RowFn& row, const OutFn& out,
                  int64_t gate_stride, bool accumulate, const T* bias = nullptr, int64_t a_stride = 0) {
  constexpr int64_t W = Panels<T>::kWidth;
  constexpr int64_t kDepth = std::max<int64_t>(16, 16384 / (NG * W * sizeof(T)));
  constexpr int kMaxGroups = std::max(NG, cpu::kWideMaxVectors);
  int64_t offset[kMaxGroups], lanes[kMaxGroups];
  for (int64_t g = 0; g < panels.G; ++g)
    for (int64_t c = 0; c < panels.C; ++c) {
      offset[g * panels.C + c] = g * gate_stride + c * panels.width;
      lanes[g * panels.C + c] = panels.lanes(u, c);
    }
  const T* panel = panels.block(u);
  if constexpr (std::is_same_v<T, float>) {
    if (panels.width == cpu::kWideWidth) {
      const float* init[kMaxGroups];
      for (int64_t q = 0; q < panels.groups() && bias; ++q) init[q] = bias + panels.first_column(u, 0) + offset[q];
      cpu::wide_rows_product(panel, panels.K, static_cast<int>(panels.groups()), n, row, out, offset, lanes,
                             bias ? init : nullptr, accumulate, a_stride);
      return;
    }
  }
  for (int64_t k0 = 0; k0 < panels.K; k0 += kDepth) {
    row_blocks<T, NG>(n, row, out, k0, std::min(kDepth, panels.K - k0), panel + k0 * NG * W, offset, lanes,
                      accumulate || k0 > 0);
  }
}

// Whether T's products take wide_float.h's AVX-512 tiles (float on a CPU with AVX-512).
template <typename T>
bool wide_panels() {
  if constexpr (std::is_same_v<T, float>) {
    return cpu::wide_float_kernels();
  } else {
    return false;
  }
}

// Whether T's products may take amx_float.h's AMX product (float on a CPU with AMX-BF16).
template <typename T>
bool amx_projection() {
  if constexpr (std::is_same_v<T, float>) {
    return cpu::wide_float_kernels() && cpu::amx_float_kernels();
  } else {
    return false;
  }
}

// From how many rows a step's h·W_hhᵀ takes AMX (FUSED_RNN_AMX_STEP_ROWS, for measurements).
inline int64_t amx_step_rows() {
  static const int64_t rows = [] {
    const char* asked = std::getenv("FUSED_RNN_AMX_STEP_ROWS");
    return asked ? std::atoll(asked) : int64_t{16};
  }();
  return rows;
}

// The k of a range of the backward's AMX products (see BackwardLoop).
// (LSTM T50 B256 H1024 backward on the Xeon VM: 1730 ms at 512 and 1024, 1810-1870 at 256,
// 1820-1890 with all of k at once; 1850-1950 without AMX in the backward.)
constexpr int64_t kAmxRange = 512;

// Rows of x per pass of the input projection: about 384 KB of them, which stay in L2 while the
// thread's panels of W_ih stream past.
inline int64_t projection_rows(int64_t I) { return std::max<int64_t>(6, 98304 / std::max<int64_t>(1, I) / 6 * 6); }

// How far ahead the gate math asks for its rows of x's projection.
constexpr int64_t kPrefetchRows = 3;

template <typename Cell>
struct ForwardLoop {
  using T = typename Cell::scalar_t;
  static constexpr int64_t W = KernelMath<T>::kWidth;
  static constexpr int G = Cell::kGates, C = kVectorsPerGate<G>;

  static void run(const LayerShape& s, bool reverse, const Tensor& x, const Tensor& w_ih, const Tensor& bias,
                  const Tensor& w_hh, const Tensor& b_hn, const Tensor& w_hr, Tensor& y, Tensor& h, Tensor& c,
                  Tensor& saved) {
    const int64_t H = s.H, P = s.P, GH = G * H;
    const int64_t K = saved.defined() ? s.saved_cols() : 0;
    const bool wide = wide_panels<T>();
    // A batch of one reads each weight once a step: dot products on W_hh's rows as they are, with
    // no panels, whose packing (16 MB at H = 1024) costs as much as 4 steps (bench/NOTES.md).
    const bool row_dots = wide && s.B == 1;
    // With AVX-512, x·W_ihᵀ takes the same tiles, on panels of W_ih's G*H rows, instead of BLAS.
    // Also BLAS at a batch of one where its kernels are as fast (Intel, see wide_chunk_products):
    // MKL does not pack W_ih the way the tiles must (1.3-1.6 ms a call at H = 1024).
    const bool wide_projection = wide && (!row_dots || cpu::wide_chunk_products());
    // With AMX, x·W_ihᵀ on split bfloat16 tiles instead (amx_float.h), and the steps' h·W_hhᵀ too
    // from amx_step_rows() rows: below, a tile of 16 rows is mostly padding, and the 6 bytes a
    // weight of the split W_hh stream from memory where the panels' 4 did.
    const bool amx = wide_projection && s.I > 0 && amx_projection<T>();
    const bool amx_steps = wide && !row_dots && s.B >= amx_step_rows() && amx_projection<T>();
    const Panels<T> panels =
        row_dots || amx_steps ? Panels<T>::geometry(P, G, cpu::wide_vectors_per_gate(G, H), H, cpu::kWideWidth)
        : wide                ? Panels<T>::of_rows(w_hh, G, cpu::wide_vectors_per_gate(G, H), H, cpu::kWideWidth)
                              : Panels<T>::of_rows(w_hh, G, C, H);
    const T* w_hh_p = w_hh.data_ptr<T>();
    const Panels<T> input_panels =
        wide_projection && !amx ? Panels<T>::of_rows(w_ih, 1, cpu::wide_vectors_per_gate(1, GH), GH, cpu::kWideWidth) : Panels<T>();
    const int64_t input_rows = projection_rows(s.I);
    // x·W_ihᵀ + bias, a chunk of steps at a time (see kChunkElements).
    const int64_t chunk_cap = chunk_rows(s, GH);
    // W_ih (and W_hh) split once per call; each chunk's x (each step's h_{t-1}) split by all
    // threads before any multiplies.
    const AmxSplit x_split =
        amx ? AmxSplit::of_rows(w_ih, 1, GH, std::min(s.N, chunk_cap), bias.defined() ? bias.data_ptr<float>() : nullptr)
            : AmxSplit();
    const AmxSplit h_split = amx_steps ? AmxSplit::of_rows(w_hh, G, H, s.B, nullptr) : AmxSplit();
    // Rows per pass of the AMX product: whole 32-row blocks, about input_rows.
    const int64_t amx_rows = std::max<int64_t>(32, input_rows / 32 * 32);
    Tensor gx_buffer = empty_large({std::min(s.N, chunk_cap), GH}, x.options());
    Tensor gh = at::empty({s.B, GH}, x.options());
    // The LSTM's o*tanh(c_t) before the projection: kept in `saved` when training, else here.
    Tensor proj_buffer = s.proj && !saved.defined() ? at::empty({s.B, H}, x.options()) : Tensor();

    const T* x_p = x.data_ptr<T>();
    const T* w_ih_p = w_ih.data_ptr<T>();
    const T* bias_p = bias.defined() ? bias.data_ptr<T>() : nullptr;
    const T* w_hr_p = s.proj ? w_hr.data_ptr<T>() : nullptr;
    const T* b_hn_p = b_hn.defined() ? b_hn.data_ptr<T>() : nullptr;
    T* gx_buffer_p = gx_buffer.data_ptr<T>();
    T* gh_p = gh.data_ptr<T>();
    T* y_p = y.data_ptr<T>();
    T* h_p = h.data_ptr<T>();  // h_0 until the end, when it becomes h_n
    T* c_p = c.defined() ? c.data_ptr<T>() : nullptr;
    T* saved_p = saved.defined() ? saved.data_ptr<T>() : nullptr;
    T* proj_buffer_p = proj_buffer.defined() ? proj_buffer.data_ptr<T>() : nullptr;

    Team(2.0 * s.B * GH * (P + s.I)).run([&](const Member& me) {
      const auto [u0, u1] = me.share(panels.blocks);  // this thread's blocks of hidden units
      const auto [p0, p1] = me.share(P);               // and output features of the projection
      for (int64_t step = 0; step < s.T;) {
        const StepChunk chunk = next_chunk(s, reverse, step, chunk_cap);
        const int64_t row0 = chunk.row0, rows = chunk.rows;
        // x·W_ihᵀ + bias for the chunk: one GEMM per thread over its share of the G*H columns, so
        // that BLAS packs the chunk's x once. The previous chunk's last step ended with a barrier,
        // so nobody still reads the buffer; a barrier after it, as a thread's steps read every gate
        // of its units.
        if (amx) {
          x_split.split_rows(me, rows, [&](int64_t r) { return x_p + (row0 + r) * s.I; });
          me.barrier();  // every row split before anyone multiplies
          const auto [q0, q1] = me.share(x_split.groups(), 2);
          for (int64_t r0 = 0; r0 < rows && q0 < q1; r0 += amx_rows) {
            x_split.product(r0, std::min(amx_rows, rows - r0), q0, q1, gx_buffer_p + r0 * GH, GH);
          }
        } else if (wide_projection) {
          const auto [b0, b1] = me.share(input_panels.blocks);
          for (int64_t r0 = 0; r0 < rows; r0 += input_rows) {
            for (int64_t u = b0; u < b1; ++u) {
              const int64_t j0 = input_panels.first_column(u, 0);
              rows_product<T, G * C>(input_panels, u, std::min(input_rows, rows - r0),
                                     [&](int64_t r) { return x_p + (row0 + r0 + r) * s.I; },
                                     [&](int64_t r) { return gx_buffer_p + (r0 + r) * GH + j0; }, 0, false, bias_p);
            }
          }
        } else {
          const int64_t piece = gemm_piece(GH);
          const auto [c0, c1] = me.share(GH, piece);
          for_each_piece(c0, c1, piece, [&](int64_t j0, int64_t j1) {
            if (bias_p) {
              for (int64_t r = 0; r < rows; ++r) std::memcpy(gx_buffer_p + r * GH + j0, bias_p + j0, (j1 - j0) * sizeof(T));
            }
            gemm_rows<T>(rows, j1 - j0, s.I, {x_p + row0 * s.I, s.I}, {w_ih_p + j0 * s.I, s.I, true}, bias_p != nullptr,
                         gx_buffer_p + j0, GH);
          });
        }
        me.barrier();

        for (; step < chunk.end; ++step) {
          const int64_t t = reverse ? s.T - 1 - step : step;
          const int64_t n = s.batch_sizes[t], off = s.offsets[t];
          if (n == 0) continue;
          // h_{t-1}: the step before's output, or h_0, which h keeps until the end.
          const Predecessor before = predecessor(s, reverse, t);
          const auto h_prev_row = [&](int64_t b) { return before.row<T>(b, y_p, P, h_p, P); };
          T* proj_in = s.proj ? (saved_p ? saved_p + off * K + s.proj_input_col() : proj_buffer_p) : nullptr;
          const int64_t proj_in_stride = saved_p ? K : H;

          if (amx_steps) {
            h_split.split_rows(me, n, h_prev_row);
            me.barrier();  // every row of h_{t-1} split before anyone multiplies
          }
          for (int64_t u = u0; u < u1; ++u) {
            const int64_t j0 = panels.first_column(u, 0);
            if (amx_steps) {  // gate g's vector c of block u: group g·units + j0/16 + c of the split W_hh
              int64_t listed[8], count = 0;
              for (int g = 0; g < G; ++g)
                for (int64_t c = 0; c < panels.C && panels.lanes(u, c) > 0; ++c) {
                  listed[count++] = g * cpu::amx_tiles(H) + j0 / cpu::kAmxTile + c;
                }
              h_split.product(n, listed, count, gh_p, GH);
            } else if (row_dots) {  // n = 1
              if constexpr (std::is_same_v<T, float>) {
                const int64_t units = std::min(panels.C * panels.width, H - j0);
                for (int g = 0; g < G; ++g) {
                  cpu::wide_row_dots(w_hh_p + (g * H + j0) * P, P, P, h_prev_row(0), units, gh_p + g * H + j0);
                }
              }
            } else {
              rows_product<T, G * C>(panels, u, n, h_prev_row, [&](int64_t b) { return gh_p + b * GH + j0; }, H,
                                     false);
            }
            for (int64_t v = 0; v < panels.C; ++v) {
              const int64_t j = panels.first_column(u, v), lanes = panels.lanes(u, v);
              for (int64_t b = 0; b < n && lanes > 0; ++b) {
                // The rows of x's projection are 4·G·H bytes apart, which the hardware prefetcher
                // does not follow: ask for the gates of a row a few rows ahead.
                if (b + kPrefetchRows < n) {
                  for (int g = 0; g < G; ++g) __builtin_prefetch(gx_buffer_p + (off - row0 + b + kPrefetchRows) * GH + g * H + j);
                }
                const T* h_prev = h_prev_row(b);
                T* saved_row = saved_p ? saved_p + (off + b) * K : nullptr;
                T* out_row = s.proj ? proj_in + b * proj_in_stride : y_p + (off + b) * P;
                const StepForward<T> io{gx_buffer_p + (off - row0 + b) * GH, gh_p + b * GH, b_hn_p, h_prev,
                                        c_p ? c_p + b * H : nullptr, out_row, saved_row};
                cell_units<Cell, true>(io, H, j, lanes);
              }
            }
          }
          if (s.proj) {  // y_t = (o*tanh c_t) · W_hrᵀ once every unit is done, by output features
            me.barrier();
            gemm_rows<T>(n, p1 - p0, H, {proj_in, proj_in_stride}, {w_hr_p + p0 * H, H, true}, false, y_p + off * P + p0,
                         P);
          }
          me.barrier();  // h_t complete before anyone starts step t+1
        }
      }
    });

    for (const FinalRun& run : final_runs(s, reverse)) {  // h_n
      std::memcpy(h_p + run.row * P, y_p + run.source * P, run.rows * P * sizeof(T));
    }
  }
};

template <typename Cell>
struct BackwardLoop {
  using T = typename Cell::scalar_t;
  static constexpr int64_t W = KernelMath<T>::kWidth;
  static constexpr int C = kVectorsPerGate<1>;

  static void run(const LayerShape& s, bool reverse, const Tensor& x, const Tensor& w_ih, const Tensor& w_hh_conj,
                  const Tensor& w_hr_conj, const Tensor& outputs, const Tensor& h0, const Tensor& c0,
                  const Tensor& saved, const Tensor& dy, Tensor& dh, Tensor& dc, Tensor& dh_total,
                  LayerGrads& grads) {
    const int64_t H = s.H, P = s.P, I = s.I, GH = s.gates * H, K = s.saved_cols();
    // With AMX, dG·W_hh takes split tiles from amx_step_rows() rows, as the forward's steps do,
    // and dX = dG·W_ih too; both over k in ranges of kAmxRange, so that the rows' part of a range
    // stays in L2 while the weights pass: a split row of dG is 6 bytes a k, 24 KB at G·H = 4096,
    // 3 KB a range (768 KB for 256 rows).
    const bool amx_steps = wide_panels<T>() && s.B >= amx_step_rows() && amx_projection<T>();
    const Panels<T> panels =  // blocks of dh's P columns
        amx_steps          ? Panels<T>::geometry(GH, 1, cpu::wide_vectors_per_gate(1, P), P, cpu::kWideWidth)
        : wide_panels<T>() ? Panels<T>::of_columns(w_hh_conj, cpu::wide_vectors_per_gate(1, P), cpu::kWideWidth)
                           : Panels<T>::of_columns(w_hh_conj, C);
    Tensor d_proj_input = s.proj ? at::empty({s.B, H}, dh.options()) : Tensor();
    // The gate gradients, a chunk of steps at a time (see kChunkElements), in two buffers taken in
    // turn: a chunk's first step still propagates the last step of the chunk before. A buffer is
    // written again two chunks later, past the step barriers of the chunk between, so every thread
    // has finished its dX rows from it by then.
    const int64_t chunk_cap = chunk_rows(s, GH), buffer_rows = std::min(s.N, chunk_cap);
    Tensor dgx_buffers = empty_large({2, buffer_rows, GH}, dh.options());
    Tensor dgh_buffers = Cell::kSeparateRecurrentGrad ? empty_large({2, buffer_rows, GH}, dh.options()) : dgx_buffers;
    // With AVX-512, dX = dG·W_ih takes the same tiles as the steps, on panels of W_ih's columns
    // (on the Xeon VM 5-7% faster backward than MKL at B = 256, the same at B = 8-64); and where
    // wide_chunk_products() says so (not on Intel, whose MKL is faster there), dW (+)= dGᵀ·X too,
    // on panels of each chunk's x and h_{t-1}, which each thread packs for its own columns.
    // W_ih's panels only where dX is asked for (not for a first layer whose input needs no
    // gradient: 16 MB packed for nothing at H = 1024).
    const bool amx_dx = grads.dx.defined() && I > 0 && wide_panels<T>() && amx_projection<T>();
    const bool wide_dx = wide_panels<T>() && grads.dx.defined() && !amx_dx;
    const bool wide = wide_panels<T>() && cpu::wide_chunk_products();
    const int64_t x_groups = cpu::wide_vectors_per_gate(1, I), h_groups = cpu::wide_vectors_per_gate(1, P);
    const Panels<T> input_panels = wide_dx ? Panels<T>::of_columns(w_ih, x_groups, cpu::kWideWidth) : Panels<T>();
    const AmxSplit dh_split = amx_steps ? AmxSplit::of_columns(w_hh_conj, s.B) : AmxSplit();
    const AmxSplit dx_split = amx_dx ? AmxSplit::of_columns(w_ih, buffer_rows) : AmxSplit();
    const int64_t x_panels_size = Panels<T>::columns_size(buffer_rows, I, x_groups, cpu::kWideWidth);
    const int64_t h_panels_size = Panels<T>::columns_size(buffer_rows, P, h_groups, cpu::kWideWidth);
    Tensor chunk_panels = wide ? empty_large({std::max<int64_t>(1, x_panels_size + h_panels_size)}, dh.options()) : Tensor();
    T* x_panels_p = wide ? chunk_panels.data_ptr<T>() : nullptr;
    T* h_panels_p = wide ? x_panels_p + x_panels_size : nullptr;
    const int64_t strip_columns = std::min(cpu::kWideWidth, GH);  // no wider than dG itself
    Tensor strips = wide ? empty_large({std::max<int64_t>(1, at::get_num_threads()) * buffer_rows * strip_columns}, dh.options())
                         : Tensor();
    T* strips_p = wide ? strips.data_ptr<T>() : nullptr;
    // Rows of dG a pass of dX takes: the thread's whole share where a panel block of W_ih (G*H k
    // by 64 columns, 1 MB at H = 1024) fits in half of L2, so that every row tile reads it from
    // there (GRU T50 B256 H1024 training: 5% faster than 24-row passes on the Xeon's 2 MB L2);
    // else about 384 KB of rows, which stay in L2 while the panels stream past (Zen 4's 1 MB).
    const int64_t dx_block_bytes = input_panels.block_size() * static_cast<int64_t>(sizeof(T));
    const int64_t dx_rows = 2 * dx_block_bytes <= cpu::l2_cache_bytes() ? buffer_rows : projection_rows(GH);

    const T* x_p = x.data_ptr<T>();
    const T* w_ih_p = w_ih.data_ptr<T>();
    const T* saved_p = saved.data_ptr<T>();
    const T* out_p = outputs.data_ptr<T>();
    const int64_t out_ld = outputs.stride(0);
    const T* h0_p = h0.data_ptr<T>();
    const T* c0_p = c0.defined() ? c0.data_ptr<T>() : nullptr;
    const std::vector<PreviousRun> runs = previous_runs(s, reverse);  // for dW_hh
    const T* dy_p = dy.defined() ? dy.data_ptr<T>() : nullptr;
    const T* w_hr_p = s.proj ? w_hr_conj.data_ptr<T>() : nullptr;
    T* dh_p = dh.data_ptr<T>();
    T* dc_p = dc.defined() ? dc.data_ptr<T>() : nullptr;
    T* dgx_buffers_p = dgx_buffers.data_ptr<T>();
    T* dgh_buffers_p = dgh_buffers.data_ptr<T>();
    T* dh_total_p = s.proj ? dh_total.data_ptr<T>() : nullptr;
    T* d_proj_p = s.proj ? d_proj_input.data_ptr<T>() : nullptr;
    T* dx_p = grads.dx.defined() ? grads.dx.data_ptr<T>() : nullptr;
    T* dw_ih_p = grads.dw_ih.data_ptr<T>();
    T* dw_hh_p = grads.dw_hh.data_ptr<T>();
    T* db_ih_p = grads.db_ih.defined() ? grads.db_ih.data_ptr<T>() : nullptr;
    T* db_hh_p = grads.db_hh.defined() && Cell::kSeparateRecurrentGrad ? grads.db_hh.data_ptr<T>() : nullptr;

    // f(lo, hi, h_prev, ld) for each part [lo, hi) of a run of h_{t-1} that lies in the chunk's rows:
    // h_prev is row lo's h_{t-1} (from h_0 or the outputs), ld its row stride.
    const auto previous_runs_in = [&](const StepChunk& chunk, const auto& f) {
      for (const PreviousRun& run : runs) {
        const int64_t lo = std::max(run.row, chunk.row0), hi = std::min(run.row + run.rows, chunk.row0 + chunk.rows);
        if (lo >= hi) continue;
        const int64_t source = run.source + lo - run.row;
        f(lo, hi, run.from_h0 ? h0_p + source * P : out_p + source * out_ld, run.from_h0 ? P : out_ld);
      }
    };
    Team(2.0 * s.B * GH * (2 * P + 2 * I)).run([&](const Member& me) {
      const auto [u0, u1] = me.share(panels.blocks);  // this thread's columns of dh (blocks of P)
      const auto [v0, v1] = me.share((H + W - 1) / W);  // with a projection: its hidden units, in vectors
      const T* pending_dg = nullptr;  // the gate gradients of the step before, and their rows
      int64_t pending_rows = 0;
      // dL/dh_{t-1} (+)= dG_t · W_hh on the columns of block u, for the step whose gate gradients
      // are pending (GRU's cell has already written its direct z-path into dh: accumulate).
      const auto propagate = [&](int64_t u) {
        if (amx_steps) return;  // propagate_amx did it
        const int64_t j0 = panels.first_column(u, 0);
        rows_product<T, C>(panels, u, pending_rows, [&](int64_t r) { return pending_dg + r * GH; },
                           [&](int64_t r) { return dh_p + r * P + j0; }, 0, Cell::kSeparateRecurrentGrad);
      };
      // The same on AMX for all of this thread's blocks at once: the pending rows split by the
      // team, then k in ranges.
      const auto propagate_amx = [&] {
        if (!amx_steps || pending_rows == 0) return;
        dh_split.split_rows(me, pending_rows, [&](int64_t r) { return pending_dg + r * GH; });
        me.barrier();  // every row split before anyone multiplies
        const int64_t q0 = panels.first_column(u0, 0) / cpu::kAmxTile;
        const int64_t q1 = std::min(dh_split.groups(), panels.first_column(u1, 0) / cpu::kAmxTile);
        for (int64_t k0 = 0; k0 < GH && q0 < q1; k0 += kAmxRange) {
          dh_split.product(0, pending_rows, q0, q1, dh_p, P, k0, std::min(GH, k0 + kAmxRange),
                           k0 > 0 || Cell::kSeparateRecurrentGrad);
        }
      };
      // What a chunk's gate gradients contribute once complete (after its last step's barrier):
      // this thread's share of the rows of dW_ih, dW_hh and the bias gradients, added chunk after
      // chunk, each a single GEMM (per run of h_{t-1} for dW_hh) so that BLAS packs the chunk's x
      // once; and its share of the chunk's rows of dx = dG·W_ih.
      // The same on wide panels. dW (+)= dGᵀ·X: the chunk's x and h_{t-1} packed into panels (each
      // thread a share of the blocks, then a barrier); each thread its share of dG's columns, 16 at
      // a time copied into a strip whose k lie 16 floats apart (dG's are 4·G·H bytes apart, too far
      // for the tiles' broadcasts), times every block. dX by rows, on the panels of W_ih.
      const auto wide_chunk_products = [&](const StepChunk& chunk, const T* dgx_chunk, const T* dgh_chunk) {
        const Panels<T> xs = Panels<T>::columns_in(x_panels_p, buffer_rows, chunk.rows, I, x_groups, cpu::kWideWidth);
        const Panels<T> hs = Panels<T>::columns_in(h_panels_p, buffer_rows, chunk.rows, P, h_groups, cpu::kWideWidth);
        me.barrier();  // everyone is done with the chunk before's panels (its steps may all have been empty)
        {
          const auto [u0, u1] = me.share(xs.blocks);
          for (int64_t u = u0; u < u1; ++u) xs.pack_rows(u, x_p + chunk.row0 * I, I, 0, chunk.rows);
        }
        const auto [h0_block, h1_block] = me.share(hs.blocks);
        previous_runs_in(chunk, [&](int64_t lo, int64_t hi, const T* h_prev, int64_t ld) {
          for (int64_t v = h0_block; v < h1_block; ++v) hs.pack_rows(v, h_prev, ld, lo - chunk.row0, hi - lo);
        });
        me.barrier();
        T* strip = strips_p + me.index * buffer_rows * strip_columns;
        const auto copy_strip = [&](const T* dg, int64_t j0, int64_t n) {
          for (int64_t k = 0; k < chunk.rows; ++k) {
            std::memcpy(strip + k * strip_columns, dg + k * GH + j0, n * sizeof(T));
          }
        };
        const auto strip_times = [&](const Panels<T>& panels, int64_t j0, int64_t n, T* dw, int64_t ld) {
          for (int64_t u = 0; u < panels.blocks; ++u) {
            T* out = dw + j0 * ld + panels.first_column(u, 0);
            rows_product<T, C>(panels, u, n, [&](int64_t r) { return strip + r; }, [&](int64_t r) { return out + r * ld; },
                               0, true, nullptr, strip_columns);
          }
        };
        const auto [g0, g1] = me.share(GH, strip_columns);
        for (int64_t j0 = g0; j0 < g1; j0 += strip_columns) {
          const int64_t n = std::min(strip_columns, g1 - j0);
          copy_strip(dgx_chunk, j0, n);
          strip_times(xs, j0, n, dw_ih_p, I);
          if (dgh_chunk != dgx_chunk) copy_strip(dgh_chunk, j0, n);
          strip_times(hs, j0, n, dw_hh_p, P);
        }
      };
      const auto chunk_products = [&](const StepChunk& chunk, const T* dgx_chunk, const T* dgh_chunk) {
        const int64_t piece = gemm_piece(GH);
        const auto [g0, g1] = me.share(GH, piece);
        if (wide) {
          wide_chunk_products(chunk, dgx_chunk, dgh_chunk);
        } else {
          for_each_piece(g0, g1, piece, [&](int64_t j0, int64_t j1) {
            gemm_rows<T>(j1 - j0, I, chunk.rows, {dgx_chunk + j0, GH, true}, {x_p + chunk.row0 * I, I, false, true},
                         true, dw_ih_p + j0 * I, I);
            previous_runs_in(chunk, [&](int64_t lo, int64_t hi, const T* h_prev, int64_t ld) {
              gemm_rows<T>(j1 - j0, P, hi - lo, {dgh_chunk + (lo - chunk.row0) * GH + j0, GH, true},
                           {h_prev, ld, false, true}, true, dw_hh_p + j0 * P, P);
            });
          });
        }
        for (int64_t r = 0; r < chunk.rows && db_ih_p; ++r) {
          for (int64_t j = g0; j < g1; ++j) db_ih_p[j] += dgx_chunk[r * GH + j];
        }
        for (int64_t r = 0; r < chunk.rows && db_hh_p; ++r) {
          for (int64_t j = g0; j < g1; ++j) db_hh_p[j] += dgh_chunk[r * GH + j];
        }
        if (dx_p && amx_dx) {  // this thread's rows of dG, split, times W_ih over k in ranges
          const auto [r0, r1] = me.share(chunk.rows, 2 * cpu::kAmxTile);
          dx_split.split_rows(r0, r1, [&](int64_t r) { return dgx_chunk + r * GH; });
          for (int64_t k0 = 0; k0 < GH && r0 < r1; k0 += kAmxRange) {
            dx_split.product(r0, r1 - r0, 0, dx_split.groups(), dx_p + (chunk.row0 + r0) * I, I, k0,
                             std::min(GH, k0 + kAmxRange), k0 > 0);
          }
        } else if (dx_p && wide_dx) {
          const auto [r0, r1] = me.share(chunk.rows);
          for (int64_t q0 = r0; q0 < r1; q0 += dx_rows) {
            for (int64_t u = 0; u < input_panels.blocks; ++u) {
              T* dx_rows_p = dx_p + (chunk.row0 + q0) * I + input_panels.first_column(u, 0);
              rows_product<T, C>(input_panels, u, std::min(dx_rows, r1 - q0), [&](int64_t r) { return dgx_chunk + (q0 + r) * GH; },
                                 [&](int64_t r) { return dx_rows_p + r * I; }, 0, false);
            }
          }
        } else if (dx_p) {
          const auto [r0, r1] = me.share(chunk.rows, kGemmRowPiece);
          for_each_piece(r0, r1, kGemmRowPiece, [&](int64_t q0, int64_t q1) {
            gemm_rows<T>(q1 - q0, I, GH, {dgx_chunk + q0 * GH, GH}, {w_ih_p, I, false, true}, false,
                         dx_p + (chunk.row0 + q0) * I, I);
          });
        }
      };

      for (int64_t step = 0, chunk_index = 0; step < s.T; ++chunk_index) {
        const StepChunk chunk = next_chunk(s, !reverse, step, chunk_cap);  // forward's order, backwards
        T* dgx_chunk = dgx_buffers_p + (chunk_index % 2) * buffer_rows * GH;
        T* dgh_chunk = dgh_buffers_p + (chunk_index % 2) * buffer_rows * GH;
        for (; step < chunk.end; ++step) {
          const int64_t t = reverse ? step : s.T - 1 - step;
          const int64_t n = s.batch_sizes[t], off = s.offsets[t];
          if (n == 0) continue;
          const int64_t first = off - chunk.row0;  // the step's first row in the chunk buffers
          const Predecessor before = predecessor(s, reverse, t);
          // The cell backward on rows [0, n), units [j, j + lanes), the gradient at h_t read from cell_dh.
          const auto cell_rows = [&](int64_t j, int64_t lanes, const T* step_dy, T* cell_dh, int64_t dh_stride) {
            for (int64_t b = 0; b < n && lanes > 0; ++b) {
              const T* h_prev = before.row(b, out_p, out_ld, h0_p, P);
              const T* c_prev = c0_p ? before.row(b, saved_p + s.cell_state_col(), K, c0_p, H) : nullptr;
              const StepBackward<T> io{step_dy ? step_dy + b * P : nullptr, cell_dh + b * dh_stride,
                                       dc_p ? dc_p + b * H : nullptr, saved_p + (off + b) * K, h_prev, c_prev,
                                       dgx_chunk + (first + b) * GH, dgh_chunk + (first + b) * GH};
              cell_units<Cell, false>(io, H, j, lanes);
            }
          };

          propagate_amx();
          if (!s.proj) {  // dh's columns are the hidden units: finish dh on a block, then the cell on it
            for (int64_t u = u0; u < u1; ++u) {
              propagate(u);
              for (int64_t v = 0; v < panels.C; ++v) {
                cell_rows(panels.first_column(u, v), panels.lanes(u, v), dy_p ? dy_p + off * P : nullptr, dh_p, P);
              }
            }
          } else {  // dh over output features first; the projection's backward needs all of them
            for (int64_t u = u0; u < u1; ++u) {
              propagate(u);
              const int64_t p_begin = panels.first_column(u, 0), p_end = std::min(P, panels.first_column(u + 1, 0));
              for (int64_t b = 0; b < n; ++b) {  // the full gradient at h_t, kept for dW_hr
                T* total = dh_total_p + (off + b) * P;
                for (int64_t p = p_begin; p < p_end; ++p) {
                  total[p] = dh_p[b * P + p] + (dy_p ? dy_p[(off + b) * P + p] : T(0));
                }
              }
            }
            me.barrier();
            const int64_t j0 = std::min(H, v0 * W), j1 = std::min(H, v1 * W);
            gemm_rows<T>(n, j1 - j0, P, {dh_total_p + off * P, P}, {w_hr_p + j0, H}, false, d_proj_p + j0, H);
            for (int64_t v = v0; v < v1; ++v) cell_rows(v * W, std::min(W, H - v * W), nullptr, d_proj_p, H);
          }
          me.barrier();  // dG_t complete before anyone propagates it
          pending_dg = dgh_chunk + first * GH;
          pending_rows = n;
        }
        chunk_products(chunk, dgx_chunk, dgh_chunk);
      }
      propagate_amx();  // the first step's gate gradients reach h_0
      for (int64_t u = u0; u < u1; ++u) propagate(u);
    });
  }
};

}  // namespace

const char* cpu_float_kernel() {
#ifdef CPU_CAPABILITY_AVX2
  return cpu::wide_float_kernels() ? "AVX-512" : "AVX2";
#else
  return cpu::wide_float_kernels() ? "AVX-512" : "portable (scalar at::vec)";
#endif
}

const char* cpu_input_projection() {
  return amx_projection<float>() ? "AMX" : cpu::wide_float_kernels() ? "tiles" : "BLAS";
}

const char* cpu_gradient_gemm() { return cpu::wide_float_kernels() && cpu::wide_chunk_products() ? "tiles" : "BLAS"; }

void forward_loop_cpu(const LayerShape& s, bool reverse, const Tensor& x, const Tensor& w_ih, const Tensor& bias,
                      const Tensor& w_hh, const Tensor& b_hn, const Tensor& w_hr, Tensor& y, Tensor& h, Tensor& c,
                      Tensor& saved) {
  AT_DISPATCH_FLOATING_AND_COMPLEX_TYPES(x.scalar_type(), "fused_rnn_forward_cpu", [&] {
    dispatch_cell<ForwardLoop, scalar_t>(s.cell, s, reverse, x, w_ih, bias, w_hh, b_hn, w_hr, y, h, c, saved);
  });
}

void backward_loop_cpu(const LayerShape& s, bool reverse, const Tensor& x, const Tensor& w_ih,
                       const Tensor& w_hh_conj, const Tensor& w_hr_conj, const Tensor& outputs, const Tensor& h0,
                       const Tensor& c0, const Tensor& saved, const Tensor& dy, Tensor& dh, Tensor& dc,
                       Tensor& dh_total, LayerGrads& grads) {
  AT_DISPATCH_FLOATING_AND_COMPLEX_TYPES(saved.scalar_type(), "fused_rnn_backward_cpu", [&] {
    dispatch_cell<BackwardLoop, scalar_t>(s.cell, s, reverse, x, w_ih, w_hh_conj, w_hr_conj, outputs, h0, c0, saved,
                                          dy, dh, dc, dh_total, grads);
  });
}

}  // namespace fused_rnn
