// The step loops on CUDA and their kernels: the same two functions as csrc/cpu/forward_loop.cpp and
// backward_loop.cpp, with the same buffers and packed-sequence semantics (step t works on rows
// [offsets[t], offsets[t] + batch_sizes[t]) of x / y / saved and on the first batch_sizes[t] rows
// of the state; reverse walks t downwards).
//
// Forward: one kernel launch per step fuses the recurrent product h_{t-1}·W_hhᵀ with the gate math
// (for small batches persistent_loops.cuh runs the whole sequence in one launch instead).
// A block owns a tile of hidden units and a tile of batch rows; it computes all G gate
// pre-activations of its units for its rows (a fixed k order, no atomics), then runs the cell from
// cells.h on each of its (row, unit) pairs. W_hh is first reordered into a gate-interleaved layout,
// [unit tiles][P][G * units per tile], so that a block's weights for one k are one contiguous row
// and a k chunk one contiguous slab, staged in shared memory with coalesced 16-byte loads.
// float32/float64 run on the CUDA cores; float16/bfloat16 W_hh on the tensor cores (ldmatrix and
// mma.sync m16n8k16, float32 accumulators, compute capability 8.0 and up), and so does float32 as
// TF32 (m16n8k8) where cuDNN would use it, with the same layout, loop and epilogue: h_{t-1} is kept
// in float32 and rounded to the operand type as it is staged for the product, and everything else
// is float32: gx (cuBLAS, half inputs, float32 accumulation and output: ops_cuda.cpp), c, the gate
// math (Cell<float>), y, h and `saved`; ops_cuda.cpp casts y, h_n and c_n back to the half type.
// A step's h_{t-1} is read where the step before wrote it (the outputs, or h_0), so the host does
// nothing between two steps' launches but fill in their arguments; the kernels' variants (rows per
// block, the reduction split across the warps) are chosen by one cost model (choose_variant).
//
// Backward (half types reach it as float32: ops_cuda.cpp upcasts), without a projection: one launch
// per step as well, the mirror image. A block owns a
// tile of units j; it computes dh_{t-1}[b, j] = Σ_m dG_t[b, m]·W_hh[m, j] (the step before in the
// walk's gate gradients, m over all G*H gate rows, a fixed order) and at once runs the cell's
// backward of step t-1 on its (row, unit) pairs, which writes dG_{t-1}. W_hh is reordered into
// column tiles, [unit tiles][G*H][units per tile], for the same contiguous slabs. After the walk
// one cuBLAS product gives dh_0. With a projection dh_{t-1} lives in P dimensions and reaches the
// cell only through W_hr (a second reduction), so that path keeps a pointwise kernel per step and
// cuBLAS products; FUSED_RNN_CUDA_UNFUSED_BACKWARD=1 takes it for every layer (to compare the two
// on a GPU, or as a fallback).
// The weight copies are rebuilt on every call (ATen copies on the current stream), never cached: an
// optimizer step or a `p.data.copy_()` between calls cannot leave them stale.
//
// Every output element is written by exactly one thread and every sum runs in a fixed order, so
// results are bitwise reproducible run to run.
//
// Included through loops.cuh by the loops' translation units (forward.cu and backward.cu; everything
// here has internal linkage, so each compiles only what it instantiates), on a GPU and in the CPU
// emulation (csrc/cuda_emulation/), which runs the same source on fibers. What only a GPU has, the
// launches and the multiprocessors among it, comes through device.h; loops.cuh also brings the CUDA
// names: dim3, uint4, __shared__, __syncthreads, __half, __nv_bfloat16 and their roundings from
// float, __float_as_uint / __uint_as_float, and the tensor-core instructions of namespace ptx
// (csrc/cuda/mma_ptx.cuh).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <type_traits>

#include "../layer.h"
#include "../overrides.h"
#include "device.h"

// `#pragma unroll` (and `unroll 4`) for the kernels' loops where nvcc compiles them for the GPU; in
// host code (nvcc's host pass, the CPU emulation) nothing, as before: GCC ignored it, with a warning.
#ifdef __CUDA_ARCH__
#define FUSED_RNN_UNROLL _Pragma("unroll")
#define FUSED_RNN_UNROLL_4 _Pragma("unroll 4")
#else
#define FUSED_RNN_UNROLL
#define FUSED_RNN_UNROLL_4
#endif

namespace fused_rnn {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------------------
// Weight layouts and tiles shared by the kernels.
// ---------------------------------------------------------------------------------------------

// W_hh [G*H, P] -> [ceil(H / units)][P][G * units]: element (tile, k, g * units + u) is
// W_hh[g*H + tile*units + u, k], zero for units past H. Always a fresh allocation (the caching
// allocator's blocks are 512-byte aligned; contiguous() could return a view of W_hh itself, at any
// offset): the kernels read it in 16-byte pieces.
Tensor gate_interleaved(const Tensor& w_hh, int64_t G, int64_t H, int64_t P, int64_t units) {
  const int64_t tiles = (H + units - 1) / units, padded_units = tiles * units;
  Tensor w = w_hh.view({G, H, P});
  if (padded_units != H) w = at::constant_pad_nd(w, {0, 0, 0, padded_units - H});  // [G, padded, P]
  Tensor out = at::empty({tiles, P, G * units}, w_hh.options());
  out.view({tiles, P, G, units}).copy_(w.view({G, tiles, units, P}).permute({1, 3, 0, 2}));
  return out;
}

// W_hh [G*H, P] -> [ceil(P / units)][G*H][units]: element (tile, m, u) is W_hh[m, tile*units + u],
// zero for columns past P. The fused backward's right operand; a fresh allocation, as above.
Tensor column_tiles(const Tensor& w_hh, int64_t P, int64_t units) {
  const int64_t GH = w_hh.size(0), tiles = (P + units - 1) / units, padded = tiles * units;
  const Tensor w = padded != P ? at::constant_pad_nd(w_hh, {0, padded - P}) : w_hh;  // [G*H, padded]
  Tensor out = at::empty({tiles, GH, units}, w_hh.options());
  out.copy_(w.view({GH, tiles, units}).permute({1, 0, 2}));
  return out;
}

// One k chunk of the operands on its way from global to shared memory, held in registers: each
// thread loads all of its pieces before it stores any, so that its loads are in flight together
// (one memory round trip per chunk instead of one per piece: a load followed at once by the store
// of its registers waits out the whole trip before the next load issues). Chunks not yet needed
// are loaded while the current one is multiplied (accumulate_tile_product).

// Rows [k0, k0 + kRows) of one block's [rows][kCols] slab of a tiled weight, 16 bytes per thread
// and load (consecutive threads read consecutive 16 bytes of one contiguous slab), stored with row
// pitch kPitch elements. Rows at or past `rows` become zeros, which add exact zeros.
template <int kRows, int kCols, int kPitch, int kThreads, typename W>
struct WeightChunk {
  static constexpr int kPerPiece = 16 / static_cast<int>(sizeof(W));
  static_assert(kCols % kPerPiece == 0 && kPitch % kPerPiece == 0, "rows must be whole 16-byte pieces");
  static constexpr int kPiecesPerRow = kCols / kPerPiece;
  static constexpr int kPieces = kRows * kPiecesPerRow;
  static constexpr int kPerThread = (kPieces + kThreads - 1) / kThreads;
  uint4 bits[kPerThread];

  __device__ __forceinline__ void load(const W* slab, int64_t k0, int64_t rows, int tid) {
    FUSED_RNN_UNROLL
    for (int i = 0; i < kPerThread; ++i) {
      const int e = tid + i * kThreads, r = e / kPiecesPerRow, piece = e % kPiecesPerRow;
      const int64_t k = k0 + r;
      bits[i] = make_uint4(0u, 0u, 0u, 0u);  // all bits zero: +0 in every floating type
      if ((kPieces % kThreads == 0 || e < kPieces) && k < rows) {
        bits[i] = *reinterpret_cast<const uint4*>(slab + k * kCols + piece * kPerPiece);
      }
    }
  }

  __device__ __forceinline__ void store(W* dst, int tid) const {
    FUSED_RNN_UNROLL
    for (int i = 0; i < kPerThread; ++i) {
      const int e = tid + i * kThreads, r = e / kPiecesPerRow, piece = e % kPiecesPerRow;
      if (kPieces % kThreads == 0 || e < kPieces) {
        *reinterpret_cast<uint4*>(dst + r * kPitch + piece * kPerPiece) = bits[i];
      }
    }
  }
};

// Where the rows of a product's left operand lie: row r is at rows_of(r).
// DenseRows: a row-major matrix (the fused backward's dG of the step before).
template <typename T>
struct DenseRows {
  const T* data;
  int64_t ld;
  __device__ __forceinline__ const T* operator()(int64_t r) const { return data + r * ld; }
};

// StateRows: h_{t-1} of a forward step's rows, where the step before wrote it (its rows of the
// outputs y) or h_0 (Predecessor::row in layer.h). Reading the state there spares every step a copy
// of y into the state; the final state is copied once, after the walk.
template <typename T>
struct StateRows {
  Predecessor before;
  const T* outputs;  // row 0 of y, [N, P]
  const T* h0;       // [B, P]
  int64_t P;
  __device__ __forceinline__ const T* operator()(int64_t b) const { return before.row(b, outputs, P, h0, P); }
};

// The [kRows][kCols] tile at (row0, col0) of a [rows, cols] matrix whose row r lies at
// rows_of(r), one element per thread and load, zeros past its edges (which add exact zeros to the
// products).
template <int kRows, int kCols, int kThreads, typename T>
struct MatrixChunk {
  static constexpr int kElems = kRows * kCols;
  static constexpr int kPerThread = (kElems + kThreads - 1) / kThreads;
  T values[kPerThread];

  template <typename Rows>
  __device__ __forceinline__ void load(const Rows& rows_of, int64_t row0, int64_t rows, int64_t col0, int64_t cols,
                                       int tid) {
    FUSED_RNN_UNROLL
    for (int i = 0; i < kPerThread; ++i) {
      const int e = tid + i * kThreads;
      const int64_t row = row0 + e / kCols, col = col0 + e % kCols;
      values[i] = T(0);
      if ((kElems % kThreads == 0 || e < kElems) && row < rows && col < cols) values[i] = rows_of(row)[col];
    }
  }

  __device__ __forceinline__ void store(T* dst, int tid) const {
    FUSED_RNN_UNROLL
    for (int i = 0; i < kPerThread; ++i) {
      const int e = tid + i * kThreads;
      if (kElems % kThreads == 0 || e < kElems) dst[e] = values[i];
    }
  }
};

// Rows [row0, row0 + kRows) and columns [col0, col0 + cols) of a [rows, width] matrix whose row r
// lies at rows_of(r), through convert() into dst with row pitch `pitch`; zeros past `rows` and
// `width`. For tiles too large to hold in registers whole (MatrixChunk): kGroup loads a thread are
// in flight before their stores, one memory round trip per kThreads * kGroup elements.
template <int kRows, int kGroup, int kThreads, typename Rows, typename Dst, typename Convert>
__device__ __forceinline__ void stage_rows_grouped(Dst* dst, int pitch, const Rows& rows_of, int64_t row0,
                                                   int64_t rows, int64_t col0, int cols, int64_t width, int tid,
                                                   const Convert& convert) {
  using T = std::remove_cv_t<std::remove_reference_t<decltype(rows_of(0)[0])>>;
  const int elems = kRows * cols;  // a shared-memory tile's, so an int
  for (int e0 = tid; e0 < elems; e0 += kThreads * kGroup) {
    T v[kGroup];
    FUSED_RNN_UNROLL
    for (int i = 0; i < kGroup; ++i) {
      const int e = e0 + i * kThreads;
      const int64_t b = row0 + e / cols, k = col0 + e % cols;
      v[i] = e < elems && b < rows && k < width ? rows_of(b)[k] : T(0);
    }
    FUSED_RNN_UNROLL
    for (int i = 0; i < kGroup; ++i) {
      const int e = e0 + i * kThreads;
      if (e < elems) dst[(e / cols) * pitch + e % cols] = convert(v[i]);
    }
  }
}

// Grid: x over row tiles, y over unit tiles.
dim3 step_grid(int64_t n, int64_t H, int rows_per_block, int units_per_block) {
  const int64_t row_tiles = (n + rows_per_block - 1) / rows_per_block;
  const int64_t unit_tiles = (H + units_per_block - 1) / units_per_block;
  TORCH_CHECK(row_tiles <= std::numeric_limits<int>::max() && unit_tiles <= 65535,
              "fused_rnn: step too large for the CUDA kernel's grid (rows ", n, ", hidden ", H, ")");
  return dim3(static_cast<unsigned>(row_tiles), static_cast<unsigned>(unit_tiles));
}

// ---------------------------------------------------------------------------------------------
// The choice of a kernel's variant: the one place that says which runs, by a cost model.
// ---------------------------------------------------------------------------------------------

// A step kernel's variant as the model sees it: rows of the batch per block, the k staged per
// chunk, and the instructions each warp issues per chunk (the block's warps issue side by side, one
// per SM sub-partition).
struct VariantCost {
  int rows_per_block;
  int k_per_chunk;
  double issue_per_chunk;
};

// One step's product as the model sees it: n rows, H units in tiles of `units` (a block's slab of
// the tiled weight has slab_cols columns), reduction length K, bytes per weight and per left
// element.
struct StepShape {
  int64_t n, H;
  int units;
  int64_t K, slab_cols;
  int weight_bytes, left_bytes;
};

// Hopper-class constants of the model (H100 / H200), not measurements: L2 delivers about 5.5 TB/s
// at 1.8 GHz to the whole chip and about 64 bytes per cycle to one SM, and a load that hits in L2
// takes about 500 cycles to return. The first GPU run checks them (bench/GPU_NOTES.md).
constexpr double kL2BytesPerCycle = 3000.0;
constexpr double kSmL2BytesPerCycle = 64.0;
constexpr double kL2LatencyCycles = 500.0;

// Modelled cycles of one step, and of its whole grid's bytes at L2's bandwidth. Each block stages its
// unit tile's whole weight slab, so the weights cross from L2 once per row tile; an SM runs its
// share of the blocks one chunk after another, each chunk as long as the longest of its warps'
// instruction issue, its bytes at the SM's share of L2, and one L2 round trip (the next chunk's
// loads are in flight during the current one's products, no further ahead); the step lasts as long
// as the busiest SM, or as the whole grid's bytes at L2's bandwidth if that is longer.
struct ModelledStep {
  double cycles, l2_cycles;
};
ModelledStep modelled_step(const VariantCost& v, const StepShape& s, int sms) {
  const int64_t row_tiles = (s.n + v.rows_per_block - 1) / v.rows_per_block;
  const int64_t blocks = row_tiles * ((s.H + s.units - 1) / s.units);
  const int64_t chunks = std::max<int64_t>(1, (s.K + v.k_per_chunk - 1) / v.k_per_chunk);
  const double chunk_bytes = static_cast<double>(v.k_per_chunk) *
                             (static_cast<double>(s.slab_cols) * s.weight_bytes + v.rows_per_block * s.left_bytes);
  const double per_chunk = std::max({v.issue_per_chunk, chunk_bytes / kSmL2BytesPerCycle, kL2LatencyCycles});
  const double busiest_sm = static_cast<double>((blocks + sms - 1) / sms) * chunks * per_chunk;
  const double whole_grid = static_cast<double>(blocks) * chunks * chunk_bytes / kL2BytesPerCycle;
  return {std::max(busiest_sm, whole_grid), whole_grid};
}

// The index of the variant that runs: the forced one, else the fastest in the model; of equally
// fast ones (latency-bound small steps), the one that moves the fewest bytes from L2.
template <int kVariants>
int choose_variant(const VariantCost (&costs)[kVariants], const StepShape& shape, int sms) {
  // The cuda_rows_per_block override (csrc/overrides.h): that variant where the kernel has one.
  const int64_t forced = override_value(Override::kCudaRowsPerBlock);
  for (int v = 0; v < kVariants; ++v) {
    if (forced > 0 && costs[v].rows_per_block == forced) return v;
  }
  int best = 0;
  ModelledStep best_step = modelled_step(costs[0], shape, sms);
  for (int v = 1; v < kVariants; ++v) {
    const ModelledStep step = modelled_step(costs[v], shape, sms);
    if (step.cycles < best_step.cycles || (step.cycles == best_step.cycles && step.l2_cycles < best_step.l2_cycles)) {
      best = v;
      best_step = step;
    }
  }
  return best;
}

// ---------------------------------------------------------------------------------------------
// The CUDA-core product shared by the forward and the fused backward.
// ---------------------------------------------------------------------------------------------

// The CUDA-core kernels' block: dim3(kTileUnits, kWarps) threads. threadIdx.x = unit within the
// tile (one warp spans the tile's 32 units, so weight loads from shared memory are conflict-free and
// global writes coalesce); threadIdx.y = warp.
constexpr int kTileUnits = 32;  // hidden units per block (= warp size)
constexpr int kWarps = 4;       // warps per block
constexpr int kThreads = kTileUnits * kWarps;
constexpr int kTileK = 32;      // reduction chunk staged in shared memory per iteration

// How a block's warps share its product.
//  kSplit = 1: the block has kWarps*kRows rows; warp ty owns rows [ty*kRows, (ty+1)*kRows) and
//    all of every k chunk.
//  kSplit = kWarps: the block has kRows rows; every warp multiplies all of them over its quarter
//    of each k chunk, and the quarters' partial sums are then added in warp order (a fixed order,
//    no atomics). For small batches: with rows of their own, 3 of the 4 warps would multiply
//    padding at B = 1, and each would issue four times the shared loads per k.
template <int kRows, int kSplit>
struct WarpRows {
  static_assert(kSplit == 1 || (kSplit == kWarps && kRows <= kWarps), "split across all warps, one row each after");
  static constexpr int kBlockRows = kSplit == 1 ? kWarps * kRows : kRows;
  static constexpr int kKPerWarp = kTileK / kSplit;
  // After accumulate_tile_product, thread (tx, ty) holds the complete sums of `count(ty)` rows of
  // the block from row `first(ty)`, in acc[0 .. count).
  __device__ __forceinline__ static int first(int ty) { return kSplit == 1 ? ty * kRows : ty; }
  __device__ __forceinline__ static int count(int ty) { return kSplit == 1 ? kRows : (ty < kRows ? 1 : 0); }
  // The model's view: per k a warp loads kG weights and its rows' left values, and does kG*kRows FMAs.
  static constexpr VariantCost cost(int kG) {
    return {kBlockRows, kTileK, static_cast<double>(kKPerWarp) * (kG + kRows + kG * kRows)};
  }
};

// The product behind both CUDA-core kernels: acc[r][g] += Σ_k left[row, k] · W[k, g*kTileUnits + tx]
// for k in [0, K), over a block's slab of a tiled weight ([K][kG*kTileUnits], 16-byte aligned) and
// rows [row0, row0 + kBlockRows) ∩ [0, rows) of the left operand (row r at left(r)); on return
// acc holds the complete sums of the thread's rows (WarpRows). Each k chunk is staged in shared
// memory (w_s: [kTileK][kG*kTileUnits], l_s: [kBlockRows][kTileK], declared by the kernel);
// padding past K and past `rows` is 0 in both tiles, so it adds exact zeros, and the k order is
// fixed. Every thread of the block must call it (it holds barriers).
// Double buffered through registers: chunk k0 + kTileK is loaded while chunk k0 is multiplied, so
// the memory latency of all but the first chunk hides behind arithmetic.
template <int kG, int kRows, int kSplit, typename T, typename Rows>
__device__ __forceinline__ void accumulate_tile_product(T (&acc)[kRows][kG], T* w_s, T* l_s, const T* slab,
                                                        const Rows& left, int64_t row0, int64_t rows, int64_t K) {
  using Tile = WarpRows<kRows, kSplit>;
  constexpr int kTileRows = Tile::kBlockRows, kWCols = kG * kTileUnits;
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kTileUnits + tx;
  const int l0 = kSplit == 1 ? ty * kRows : 0;             // the warp's first row of the tile
  const int kk0 = kSplit == 1 ? 0 : ty * Tile::kKPerWarp;  // and first k of each chunk
  WeightChunk<kTileK, kWCols, kWCols, kThreads, T> w_next;
  MatrixChunk<kTileRows, kTileK, kThreads, T> l_next;
  w_next.load(slab, 0, K, tid);
  l_next.load(left, row0, rows, 0, K, tid);
  for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
    w_next.store(w_s, tid);
    l_next.store(l_s, tid);
    __syncthreads();
    if (k0 + kTileK < K) {  // the same for the whole block
      w_next.load(slab, k0 + kTileK, K, tid);
      l_next.load(left, row0, rows, k0 + kTileK, K, tid);
    }
    FUSED_RNN_UNROLL_4
    for (int kk = kk0; kk < kk0 + Tile::kKPerWarp; ++kk) {
      T w[kG];
      FUSED_RNN_UNROLL
      for (int g = 0; g < kG; ++g) w[g] = w_s[kk * kWCols + g * kTileUnits + tx];
      FUSED_RNN_UNROLL
      for (int r = 0; r < kRows; ++r) {
        const T lv = l_s[(l0 + r) * kTileK + kk];  // the same address across the warp: a broadcast
        FUSED_RNN_UNROLL
        for (int g = 0; g < kG; ++g) acc[r][g] += lv * w[g];
      }
    }
    __syncthreads();  // before the next chunk overwrites the tiles
  }
  if constexpr (kSplit > 1) {
    // The warps' partial sums meet in w_s (free after the loop's last barrier); warp ty adds up
    // row ty's, in warp order.
    static_assert(kWarps * kRows * kG * kTileUnits <= kTileK * kWCols, "the partial sums fit in w_s");
    const auto partial = [&](int warp, int r, int g) -> T& { return w_s[((warp * kRows + r) * kG + g) * kTileUnits + tx]; };
    FUSED_RNN_UNROLL
    for (int r = 0; r < kRows; ++r) {
      FUSED_RNN_UNROLL
      for (int g = 0; g < kG; ++g) partial(ty, r, g) = acc[r][g];
    }
    __syncthreads();
    if (ty < kRows) {
      FUSED_RNN_UNROLL
      for (int g = 0; g < kG; ++g) {
        T total = partial(0, ty, g);
        FUSED_RNN_UNROLL
        for (int warp = 1; warp < kWarps; ++warp) total += partial(warp, ty, g);
        acc[0][g] = total;
      }
    }
  }
}

// The CUDA-core kernels' variants (kRows, kSplit), in this order in every list of them: 16 rows
// per block, for batches that fill the GPU with them; and the two split ones for small batches.
template <int kG>
constexpr VariantCost kCudaCoreCosts[3] = {WarpRows<4, 1>::cost(kG), WarpRows<4, kWarps>::cost(kG),
                                           WarpRows<1, kWarps>::cost(kG)};

// ---------------------------------------------------------------------------------------------
// Forward: fused recurrent GEMM + cell, one launch per step.
// ---------------------------------------------------------------------------------------------

template <typename T, typename W>
struct ForwardArgs {
  const W* w_tiles; // W_hh gate-interleaved (gate_interleaved), in T or, on the tensor cores, a half type
  StateRows<T> h_prev;  // where row b's h_{t-1} lies: the step before's outputs, or h_0
  StateRows<T> h_product;  // what the product takes: h_prev, or h'_{t-1} under recurrent dropout
  const T* gx;      // this step's first row of gx, rows of G*H
  const T* b_hn;    // GRU: [H] or null
  T* c;             // LSTM: [B, H] in place, else null
  T* out;           // where the cell writes h_t for row 0 of the step (y, saved proj column, scratch)
  int64_t out_stride;
  T* saved;         // this step's first row of saved, or null
  int64_t saved_stride;
  const T* peephole;  // LSTM: [3*H] or null
  // Zoneout (cells.h): z, and the masks of the whole sequence (Zoneout::of_row) or null; the step's
  // first row in them
  double zoneout;
  const T* zoneout_masks;
  int64_t rows_all, first_row;
  // Recurrent dropout (cells.h): the masks [B, P], and where the cell writes h'_t for row 0 of the
  // step (row stride P); null without, or where a projection follows the cell
  const T* dropout_masks;
  T* product_out;
  int64_t n, H, P;

  __host__ __device__ RecurrentDropout<T> dropout(int64_t b) const {
    return product_out ? RecurrentDropout<T>{dropout_masks + b * P, product_out + b * P} : RecurrentDropout<T>{};
  }
};

// Recurrent dropout's buffers for a forward walk: the rows h'_t that the cells write [N, P], and
// h'_0 = h_0 ⊙ m [B, P]; undefined without. product_rows(): where a step's product reads h'_{t-1}.
template <typename T>
struct DroppedProducts {
  Tensor rows, h0;

  static DroppedProducts of(const LayerShape& s, const Tensor& h0, const Variants& v) {
    if (!s.recurrent_dropout) return {};
    return {at::empty({s.N, s.P}, h0.options()), h0 * v.recurrent_masks};
  }
  StateRows<T> product_rows(Predecessor before, const StateRows<T>& h_prev) const {
    return rows.defined() ? StateRows<T>{before, rows.const_data_ptr<T>(), h0.const_data_ptr<T>(), h_prev.P} : h_prev;
  }
};

// The epilogue for row b, unit j, given its G gate sums, which stay in the thread's registers
// (UnitGateSums, cells.h).
template <typename Cell, typename W>
__device__ __forceinline__ void finish_unit(const ForwardArgs<typename Cell::scalar_t, W>& a, int64_t b, int64_t j,
                                            const typename Cell::scalar_t (&sum)[Cell::kGates]) {
  using T = typename Cell::scalar_t;
  using Sums = UnitGateSums<T, Cell::kGates>;
  const int64_t H = a.H, GH = Cell::kGates * H;
  Sums own;
  FUSED_RNN_UNROLL
  for (int g = 0; g < Cell::kGates; ++g) own.value[g] = sum[g];
  StepForward<T, Sums> io{a.gx + b * GH, own, a.b_hn, a.h_prev(b), a.c ? a.c + b * H : nullptr,
                          a.out + b * a.out_stride, a.saved ? a.saved + b * a.saved_stride : nullptr, a.peephole,
                          Zoneout<T>::of_row(a.zoneout, a.zoneout_masks, Cell::kHasCellState, a.rows_all, H, a.P,
                                             a.first_row + b),
                          a.dropout(b)};
  Cell::forward(io, H, j);
}

// float32/float64: each thread keeps kRows accumulators per gate; its warp's rows as WarpRows
// says. Shared memory per block (static): w_s[kTileK][G*kTileUnits] and h_s[rows][kTileK].
//   float, LSTM, 16 rows: 16 KB + 2 KB; double: 32 KB + 4 KB (under the 48 KB static limit).
template <typename Cell, int kRows, int kSplit>
__global__ void __launch_bounds__(kThreads)
    forward_step_kernel(const ForwardArgs<typename Cell::scalar_t, typename Cell::scalar_t> a) {
  using T = typename Cell::scalar_t;
  using Tile = WarpRows<kRows, kSplit>;
  constexpr int G = Cell::kGates;
  constexpr int kTileRows = Tile::kBlockRows;
  constexpr int kWCols = G * kTileUnits;  // tile row r = g * kTileUnits + unit

  // Rows are written as they lie in global memory (no transpose), so they need no padding; the
  // 16-byte stores need 16-byte alignment.
  __shared__ __align__(16) T w_s[kTileK][kWCols];
  __shared__ T h_s[kTileRows][kTileK];

  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t P = a.P, n = a.n;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int64_t unit0 = static_cast<int64_t>(blockIdx.y) * kTileUnits;
  const T* slab = a.w_tiles + static_cast<int64_t>(blockIdx.y) * P * kWCols;

  T acc[kRows][G];
  FUSED_RNN_UNROLL
  for (int r = 0; r < kRows; ++r) {
    FUSED_RNN_UNROLL
    for (int g = 0; g < G; ++g) acc[r][g] = T(0);
  }
  accumulate_tile_product<G, kRows, kSplit>(acc, &w_s[0][0], &h_s[0][0], slab, a.h_product, row0, n, P);

  const int64_t j = unit0 + tx;
  if (j >= a.H) return;
  FUSED_RNN_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const int64_t b = row0 + Tile::first(ty) + r;
    if (r >= Tile::count(ty) || b >= n) break;
    finish_unit<Cell>(a, b, j, acc[r]);
  }
}

// The step's product for the cost model: n rows, H units, P = K, the gate-interleaved slab.
template <typename Cell, typename W>
StepShape forward_step_shape(const ForwardArgs<typename Cell::scalar_t, W>& a, int units) {
  return {a.n, a.H, units, a.P, Cell::kGates * units, static_cast<int>(sizeof(W)),
          static_cast<int>(sizeof(typename Cell::scalar_t))};
}

template <typename Cell>
int cuda_core_forward_variant(const ForwardArgs<typename Cell::scalar_t, typename Cell::scalar_t>& a, int sms) {
  return choose_variant(kCudaCoreCosts<Cell::kGates>, forward_step_shape<Cell>(a, kTileUnits), sms);
}

template <typename Cell>
void launch_cuda_core_step(const ForwardArgs<typename Cell::scalar_t, typename Cell::scalar_t>& a, int sms) {
  using Kernel = void (*)(ForwardArgs<typename Cell::scalar_t, typename Cell::scalar_t>);
  constexpr Kernel kernels[] = {&forward_step_kernel<Cell, 4, 1>, &forward_step_kernel<Cell, 4, kWarps>,
                                &forward_step_kernel<Cell, 1, kWarps>};  // as kCudaCoreCosts
  const int v = cuda_core_forward_variant<Cell>(a, sms);
  device::launch(kernels[v], step_grid(a.n, a.H, kCudaCoreCosts<Cell::kGates>[v].rows_per_block, kTileUnits),
         dim3(kTileUnits, kWarps), a);
}

// --- float16, bfloat16 and TF32 on the tensor cores ---------------------------------------------
//
// Block: G warps; warp g computes gate g of the block's kMmaUnits units for kRowTiles * 16 batch
// rows, as kRowTiles x 2 float32 accumulator tiles of 16 rows x 8 units (mma.sync, mma_ptx.cuh).
// Per k chunk the block stages, in shared memory, the W_hh slab [kChunk][G*kMmaUnits] (the B operand:
// element (k, column)) and h_{t-1} [rows][kChunk] (the A operand, rounded to the operand type),
// zero-padded past n, P and H, so any n, H and P work. Then the accumulators go to shared memory and
// each thread runs the float32 epilogue on (row, unit) pairs.
// The sums reuse the staging buffers' memory (they are written after the last chunk's barrier).
// Shared memory, LSTM, kRowTiles=4: 9 KB (W) + 9 KB (h) for the 16-bit types, 18 + 17 KB for TF32
// (64-wide chunks for both: the same k, so the same L2 round trips per step), under the 48 KB
// static limit.
constexpr int kMmaUnits = 16;  // hidden units per block: two 8-unit mma tiles per gate
constexpr int kSumPad = 4;     // elements of padding per shared row of float sums (16 bytes)

// float32 W_hh on the tensor cores as TF32 (float32's range, a 10-bit mantissa, float32 sums): what
// cuDNN's RNNs do while torch.backends.cudnn.allow_tf32 is set (its default); ops_cuda.cpp follows
// the flag.
struct Tf32 {};

// Each operand type's multiply(): acc[m][u] += Σ_k h[m*16 + row, kk + k]·W[kk + k, col0 + u*8 + unit]
// over one fragment step, the tensor cores' part of the kernels (the per-step one here, the
// persistent one in persistent_loops.cuh), from shared rows kWPitch and kHPitch elements apart.
// Every lane of the warp calls it.
// float16 and bfloat16: both operands through ldmatrix (four 8x8 tiles per instruction: A's 16x16,
// and with .trans W's 16 k x 16 units, k-major as mma.sync's B wants it), 16 k per mma. Shared rows
// are padded by 16 bytes: every ldmatrix row stays 16-byte aligned, and the 8 rows of one 8x8 tile
// (144 bytes apart) fall into 8 different 16-byte bank groups.
template <typename W>
struct SixteenBitOperand {
  using stored = W;
  static constexpr int kStep = 16, kChunk = 64, kWPad = 8, kHPad = 8;
  // Issue per fragment step, for the cost model: W's ldmatrix; per row tile, A's and two mma.
  static constexpr double kWeightIssue = 1.0, kTileIssue = 3.0;

  template <int kRowTiles>
  __device__ __forceinline__ static void multiply(float (&acc)[kRowTiles][2][4], const W* w_s, int kWPitch,
                                                  const W* h_s, int kHPitch, int kk, int col0, int lane) {
    // ldmatrix x4: lane l gives row l % 8 of tile l / 8; tiles 0..3 are (rows, columns) +0/+0,
    // +8/+0, +0/+8, +8/+8 of the 16x16 operand.
    const int row = lane & 15, col = (lane >> 4) * 8;
    uint32_t w[4];  // units col0 .. +7: w[0], w[1]; units col0+8 .. +15: w[2], w[3]
    ptx::ldmatrix_x4_trans(w, w_s + (kk + row) * kWPitch + col0 + col);
    FUSED_RNN_UNROLL
    for (int m = 0; m < kRowTiles; ++m) {
      uint32_t h[4];
      ptx::ldmatrix_x4(h, h_s + (m * 16 + row) * kHPitch + kk + col);
      ptx::mma_m16n8k16<W>(acc[m][0], h, w[0], w[1]);
      ptx::mma_m16n8k16<W>(acc[m][1], h, w[2], w[3]);
    }
  }
};

// The tensor cores' operands by W_hh's type: how W is stored (in global and shared memory), the k of
// one fragment step and of one staged chunk, the padding of shared rows, and the rounding of h_{t-1}
// as it is staged.
template <typename Op>
struct MmaOperand;
template <>
struct MmaOperand<__half> : SixteenBitOperand<__half> {
  __device__ __forceinline__ static stored round(float v) { return __float2half_rn(v); }
};
template <>
struct MmaOperand<__nv_bfloat16> : SixteenBitOperand<__nv_bfloat16> {
  __device__ __forceinline__ static stored round(float v) { return __float2bfloat16_rn(v); }
};

// TF32: 32-bit values, which ldmatrix does not split the way mma.sync's m16n8k8 wants, so each lane
// loads its four A and four W values itself. h is rounded as it is staged; W is rounded here, as it
// is loaded (W_hh itself stays float32). Padding: 8 floats a W row (its 4 k rows x 8 units of one
// load are 32 different banks), 4 an h row (8 rows x 4 k).
template <>
struct MmaOperand<Tf32> {
  using stored = float;
  static constexpr int kStep = 8, kChunk = 64, kWPad = 8, kHPad = 4;
  static constexpr double kWeightIssue = 8.0, kTileIssue = 6.0;  // 4 loads + 4 roundings; 4 loads + 2 mma
  __device__ __forceinline__ static stored round(float v) { return __uint_as_float(ptx::to_tf32(v)); }

  template <int kRowTiles>
  __device__ __forceinline__ static void multiply(float (&acc)[kRowTiles][2][4], const float* w_s, int kWPitch,
                                                  const float* h_s, int kHPitch, int kk, int col0, int lane) {
    const int g = lane >> 2, t = lane & 3;
    uint32_t w[2][2];  // per 8-unit tile: W[t][g], W[t+4][g]
    FUSED_RNN_UNROLL
    for (int u = 0; u < 2; ++u) {
      const float* column = w_s + (kk + t) * kWPitch + col0 + u * 8 + g;
      w[u][0] = ptx::to_tf32(column[0]);
      w[u][1] = ptx::to_tf32(column[4 * kWPitch]);
    }
    FUSED_RNN_UNROLL
    for (int m = 0; m < kRowTiles; ++m) {
      const float* a = h_s + (m * 16 + g) * kHPitch + kk + t;  // A[g][t], A[g+8][t], A[g][t+4], A[g+8][t+4]
      const uint32_t h[4] = {__float_as_uint(a[0]), __float_as_uint(a[8 * kHPitch]), __float_as_uint(a[4]),
                             __float_as_uint(a[8 * kHPitch + 4])};
      ptx::mma_m16n8k8_tf32(acc[m][0], h, w[0][0], w[0][1]);
      ptx::mma_m16n8k8_tf32(acc[m][1], h, w[1][0], w[1][1]);
    }
  }
};

// The accumulator tiles of one warp to shared memory, [rows][kSumPitch] floats from column col0:
// lane (g, t) holds rows g and g+8, units 2t and 2t+1 of each 16 x 8 tile.
template <int kRowTiles, int kSumPitch>
__device__ __forceinline__ void store_accumulators(float* sum_s, const float (&acc)[kRowTiles][2][4], int col0,
                                                   int lane) {
  const int g = lane >> 2, t = lane & 3;
  FUSED_RNN_UNROLL
  for (int m = 0; m < kRowTiles; ++m) {
    FUSED_RNN_UNROLL
    for (int u = 0; u < 2; ++u) {
      FUSED_RNN_UNROLL
      for (int i = 0; i < 4; ++i) {
        sum_s[(m * 16 + g + 8 * (i / 2)) * kSumPitch + col0 + u * 8 + 2 * t + i % 2] = acc[m][u][i];
      }
    }
  }
}

// The float32 cell on a tile's (row, unit) pairs, rows [row0, row0 + kRows) and units
// [unit0, unit0 + kMmaUnits), from its gate sums in shared memory (column g * kMmaUnits + unit).
template <typename Cell, int kRows, int kSumPitch, typename W>
__device__ __forceinline__ void finish_tensor_core_tile(const ForwardArgs<float, W>& a, const float* sum_s,
                                                        int64_t row0, int64_t unit0, int tid, int threads) {
  constexpr int G = Cell::kGates;
  for (int e = tid; e < kRows * kMmaUnits; e += threads) {
    const int r = e / kMmaUnits, u = e % kMmaUnits;
    const int64_t b = row0 + r, j = unit0 + u;
    if (b >= a.n || j >= a.H) continue;
    float sum[G];
    FUSED_RNN_UNROLL
    for (int g = 0; g < G; ++g) sum[g] = sum_s[r * kSumPitch + g * kMmaUnits + u];
    finish_unit<Cell>(a, b, j, sum);
  }
}

template <typename Cell, typename Op, int kRowTiles>
__global__ void __launch_bounds__(32 * Cell::kGates)
    forward_step_tensor_core_kernel(const ForwardArgs<float, typename MmaOperand<Op>::stored> a) {
  static_assert(std::is_same_v<typename Cell::scalar_t, float>, "the tensor cores' gate math runs in float32");
// mma.sync with float16, bfloat16 and TF32 needs compute capability 8.0; the host launches this only
// there (tensor_cores_take_half_types in ops_cuda.cpp), so older targets compile an empty body.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using Operand = MmaOperand<Op>;
  using W = typename Operand::stored;
  constexpr int G = Cell::kGates;
  constexpr int kBlockThreads = 32 * G;
  constexpr int kRows = 16 * kRowTiles;
  constexpr int kCols = G * kMmaUnits;  // column g * kMmaUnits + unit
  constexpr int kChunk = Operand::kChunk, kStep = Operand::kStep;
  constexpr int kWPitch = kCols + Operand::kWPad, kHPitch = kChunk + Operand::kHPad, kSumPitch = kCols + kSumPad;

  constexpr int kWBytes = kChunk * kWPitch * static_cast<int>(sizeof(W));
  constexpr int kStagingBytes = kWBytes + kRows * kHPitch * static_cast<int>(sizeof(W));
  constexpr int kSumBytes = kRows * kSumPitch * static_cast<int>(sizeof(float));
  static_assert(kWBytes % 16 == 0, "h's rows start 16-byte aligned");
  __shared__ __align__(16) unsigned char shared[kStagingBytes > kSumBytes ? kStagingBytes : kSumBytes];
  W* const w_s = reinterpret_cast<W*>(shared);
  W* const h_s = reinterpret_cast<W*>(shared + kWBytes);
  float* const sum_s = reinterpret_cast<float*>(shared);  // after the last chunk

  const int tid = threadIdx.x, gate = tid / 32, lane = tid % 32;
  const int64_t P = a.P, n = a.n;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t unit0 = static_cast<int64_t>(blockIdx.y) * kMmaUnits;
  const W* slab = a.w_tiles + static_cast<int64_t>(blockIdx.y) * P * kCols;

  float acc[kRowTiles][2][4] = {};
  for (int64_t k0 = 0; k0 < P; k0 += kChunk) {
    WeightChunk<kChunk, kCols, kWPitch, kBlockThreads, W> w_chunk;
    w_chunk.load(slab, k0, P, tid);  // every load of the chunk in flight before the first store
    w_chunk.store(w_s, tid);
    // h, rounded to the operand type as it is staged, 8 loads a thread in flight (a whole chunk's
    // would take 128 registers a thread in the 32-thread Elman kernels).
    stage_rows_grouped<kRows, 8, kBlockThreads>(h_s, kHPitch, a.h_product, row0, n, k0, kChunk, P, tid,
                                                [](float v) { return Operand::round(v); });
    __syncthreads();
    // Zero padding past P in both operands adds exact zeros; the k order is fixed.
    FUSED_RNN_UNROLL
    for (int kk = 0; kk < kChunk; kk += kStep) {
      Operand::template multiply<kRowTiles>(acc, w_s, kWPitch, h_s, kHPitch, kk, gate * kMmaUnits, lane);
    }
    __syncthreads();  // before the next chunk overwrites the tiles
  }

  store_accumulators<kRowTiles, kSumPitch>(sum_s, acc, gate * kMmaUnits, lane);
  __syncthreads();
  finish_tensor_core_tile<Cell, kRows, kSumPitch>(a, sum_s, row0, unit0, tid, kBlockThreads);
#endif
}

// The model's view of the two variants (kRowTiles 4 and 1): per fragment step a warp issues the
// operand type's weight and per-tile instructions (MmaOperand); staging the h chunk costs each
// thread about 4 instructions (load, convert, store, index) per element.
template <typename Op, int kGates, int kRowTiles>
constexpr VariantCost tensor_core_cost() {
  using Operand = MmaOperand<Op>;
  constexpr int kSteps = Operand::kChunk / Operand::kStep;
  return {16 * kRowTiles, Operand::kChunk,
          kSteps * (Operand::kWeightIssue + Operand::kTileIssue * kRowTiles) +
              4.0 * (16 * kRowTiles * Operand::kChunk) / (32 * kGates)};
}
template <typename Op, int kGates>
constexpr VariantCost kTensorCoreCosts[2] = {tensor_core_cost<Op, kGates, 4>(), tensor_core_cost<Op, kGates, 1>()};

template <typename Cell, typename Op>
int tensor_core_forward_variant(const ForwardArgs<float, typename MmaOperand<Op>::stored>& a, int sms) {
  return choose_variant(kTensorCoreCosts<Op, Cell::kGates>, forward_step_shape<Cell>(a, kMmaUnits), sms);
}

template <typename Cell, typename Op>
void launch_tensor_core_step(const ForwardArgs<float, typename MmaOperand<Op>::stored>& a, int sms) {
  using Kernel = void (*)(ForwardArgs<float, typename MmaOperand<Op>::stored>);
  constexpr Kernel kernels[] = {&forward_step_tensor_core_kernel<Cell, Op, 4>,
                                &forward_step_tensor_core_kernel<Cell, Op, 1>};  // as kTensorCoreCosts
  const int v = tensor_core_forward_variant<Cell, Op>(a, sms);
  device::launch(kernels[v], step_grid(a.n, a.H, kTensorCoreCosts<Op, Cell::kGates>[v].rows_per_block, kMmaUnits),
         dim3(32 * Cell::kGates), a);
}

// h_n from the outputs, run by run (final_runs, layer.h): one copy for a padded sequence. c_n is
// already in place: the kernels update c row by row and leave the rows of ended sequences alone.
inline void copy_final_state(const LayerShape& s, bool reverse, const Tensor& y, Tensor& h) {
  for (const FinalRun& run : final_runs(s, reverse)) {
    h.narrow(0, run.row, run.rows).copy_(y.narrow(0, run.source, run.rows));
  }
}

// The type W_hh is stored in for the loop's kernel: the cell's own (CUDA cores), else MmaOperand's.
template <typename Op, typename T>
struct StoredWeight {
  using type = typename MmaOperand<Op>::stored;
};
template <typename T>
struct StoredWeight<T, T> {
  using type = T;
};

// Zoneout where a projection follows the cell (cells.h's Zoneout: mixes_h false), on the host: the
// keep of the projected rows [off, off + n) of the step (their masks, after the N·H of c_t, or z), in
// `like`'s type and device.
inline Tensor projected_keep(const LayerShape& s, const Variants& v, int64_t off, int64_t n, const Tensor& like) {
  if (!v.zoneout_masks.defined()) return at::full({}, s.zoneout, like.options());
  return v.zoneout_masks.narrow(0, s.N * s.H + off * s.P, n * s.P).view({n, s.P});
}
// m h_{t-1} + (1 - m) ĥ_t of the projected rows.
inline Tensor projected_zoneout_mix(const LayerShape& s, const Variants& v, int64_t off, int64_t n,
                                    const Tensor& h_prev, const Tensor& own) {
  const Tensor keep = projected_keep(s, v, off, n, own);
  return keep * h_prev + (1 - keep) * own;
}

// Op: how W_hh is multiplied. The cell's own type: the CUDA-core kernel. A half type or Tf32 (the
// cell in float): the tensor-core kernel, W_hh in the half type or in float32.
template <typename Cell, typename Op>
struct ForwardLoop {
  using T = typename Cell::scalar_t;
  static constexpr bool kTensorCores = !std::is_same_v<Op, T>;
  static constexpr int kUnitsPerBlock = kTensorCores ? kMmaUnits : kTileUnits;
  using W = typename StoredWeight<Op, T>::type;

  static void run(const LayerShape& s, bool reverse, const Tensor& gx, const Tensor& w_hh, const Tensor& b_hn,
                  const Tensor& w_hr, const Variants& variants, Tensor& y, Tensor& h, Tensor& c, Tensor& saved) {
    const int64_t H = s.H, P = s.P, GH = s.gates * H;
    const int64_t K = saved.defined() ? s.saved_cols() : 0;
    if (s.T == 0 || s.B == 0) return;
    // The LSTM's o*tanh(c_t) before the projection: kept in `saved` when training, else here.
    Tensor proj_input = s.proj && !saved.defined() ? at::empty({s.B, H}, gx.options()) : Tensor();
    const Tensor w_hr_t = s.proj ? w_hr.t() : Tensor();
    const Tensor w_tiles = gate_interleaved(w_hh, s.gates, H, P, kUnitsPerBlock);
    const int sms = device::multiprocessor_count();

    const T* gx_p = gx.data_ptr<T>();
    const T* b_hn_p = b_hn.defined() ? b_hn.data_ptr<T>() : nullptr;
    const W* w_tiles_p = static_cast<const W*>(w_tiles.const_data_ptr());
    TORCH_INTERNAL_ASSERT(reinterpret_cast<uintptr_t>(w_tiles_p) % 16 == 0, "fused_rnn: W_hh tiles misaligned");
    T* y_p = y.data_ptr<T>();
    const T* h0_p = h.data_ptr<T>();  // h holds h_0 until the walk is over
    T* c_p = c.defined() ? c.data_ptr<T>() : nullptr;
    T* saved_p = saved.defined() ? saved.data_ptr<T>() : nullptr;
    const DroppedProducts<T> dropped = DroppedProducts<T>::of(s, h, variants);

    for (int64_t step = 0; step < s.T; ++step) {
      const int64_t t = reverse ? s.T - 1 - step : step;
      const int64_t n = s.batch_sizes[t], off = s.offsets[t];
      if (n == 0) continue;

      if (H > 0) {
        ForwardArgs<T, W> a;
        a.w_tiles = w_tiles_p;
        a.h_prev = StateRows<T>{predecessor(s, reverse, t), y_p, h0_p, P};
        a.h_product = dropped.product_rows(predecessor(s, reverse, t), a.h_prev);
        a.gx = gx_p + off * GH;
        a.b_hn = b_hn_p;
        a.c = c_p;
        if (!s.proj) {
          a.out = y_p + off * P;
          a.out_stride = P;
        } else if (saved_p) {
          a.out = saved_p + off * K + s.proj_input_col();
          a.out_stride = K;
        } else {
          a.out = proj_input.data_ptr<T>();
          a.out_stride = H;
        }
        a.saved = saved_p ? saved_p + off * K : nullptr;
        a.saved_stride = K;
        a.peephole = variants.peephole.defined() ? variants.peephole.const_data_ptr<T>() : nullptr;
        a.zoneout = s.zoneout;
        a.zoneout_masks = variants.zoneout_masks.defined() ? variants.zoneout_masks.const_data_ptr<T>() : nullptr;
        a.rows_all = s.N;
        a.first_row = off;
        a.dropout_masks = s.recurrent_dropout ? variants.recurrent_masks.const_data_ptr<T>() : nullptr;
        a.product_out = s.recurrent_dropout && !s.proj ? dropped.rows.template data_ptr<T>() + off * P : nullptr;
        a.n = n;
        a.H = H;
        a.P = P;
        if constexpr (kTensorCores) {
          launch_tensor_core_step<Cell, Op>(a, sms);
        } else {
          launch_cuda_core_step<Cell>(a, sms);
        }
      }

      if (s.proj) {
        Tensor y_rows = y.narrow(0, off, n);
        const Tensor r = saved_p ? saved.narrow(0, off, n).narrow(1, s.proj_input_col(), H)
                                 : proj_input.narrow(0, 0, n);
        at::mm_out(y_rows, r, w_hr_t);
        if (s.zoneout > 0) {  // h_t = m h_{t-1} + (1 - m) ĥ_t of the projected rows (cells.h's Zoneout)
          const Predecessor before = predecessor(s, reverse, t);
          const Tensor h_prev = at::cat({y.narrow(0, before.first, before.carried),
                                         h.narrow(0, before.carried, n - before.carried)});
          y_rows.copy_(projected_zoneout_mix(s, variants, off, n, h_prev, y_rows));
        }
        if (s.recurrent_dropout) {  // h'_t of the projected rows
          Tensor product_rows = dropped.rows.narrow(0, off, n);
          at::mul_out(product_rows, y_rows, variants.recurrent_masks.narrow(0, 0, n));
        }
      }
    }
    copy_final_state(s, reverse, y, h);
  }
};

template <typename Cell>
using StepForwardLoop = ForwardLoop<Cell, typename Cell::scalar_t>;  // the CUDA cores, a launch per step
// The tensor cores' loops, a launch per step, are ForwardLoop<Cell, Op> for Op = __half,
// __nv_bfloat16, Tf32; persistent_loops.cuh's TensorCoreForwardLoop chooses between them and the
// persistent kernel.

// ---------------------------------------------------------------------------------------------
// Backward.
// ---------------------------------------------------------------------------------------------

// One step's cell backward.
template <typename T>
struct BackwardArgs {
  const T* dy;       // this step's first row of dy ([P] rows), or null
  T* dh;             // gradient at h_t for row 0 (state dh, or d_proj_input with a projection)
  int64_t dh_stride;
  T* dc;             // LSTM: [B, H] in place, else null
  const T* saved;    // this step's first row of saved
  // h_{t-1} and c_{t-1} of a row (Predecessor::row in layer.h): the step before's outputs and
  // saved c_t, or h0 [B, P] and c0 [B, H].
  Predecessor before;
  const T* outputs;  // row 0 of the outputs, row stride out_stride
  int64_t out_stride;
  const T* saved_c;  // row 0 of saved at LSTM's c_t column (row stride K)
  const T* h0;
  const T* c0;       // LSTM, else null
  T* dgx;            // this step's first row of dgx
  T* dgh;            // this step's first row of dgh (the same as dgx except for GRU)
  const T* peephole;  // LSTM: [3*H] or null (their gradient is summed from dgx after the walk)
  double zoneout;     // as ForwardArgs'; under zoneout every cell leaves a direct part of dh_{t-1} in dh
  const T* zoneout_masks;
  int64_t rows_all, first_row;
  const T* dropout_masks;  // recurrent dropout [B, P]: the product's part of dh is m ⊙ (dG·W_hh); or null
  int64_t n, H, P, K;

  // dh[b, j] from the product's part of it (cells.h's RecurrentDropout; after the cell's direct part)
  template <typename Cell>
  __host__ __device__ void add_product_grad(T* dh, int64_t b, int64_t j, T product) const {
    const T mask = dropout_masks ? dropout_masks[b * P + j] : T(1);  // x·1 is x: the plain bits
    *dh = direct_dh<Cell>() ? *dh + product * mask : product * mask;
  }

  // Whether the cell leaves the direct part of dL/dh_{t-1} in dh for the product to add to.
  template <typename Cell>
  __host__ __device__ bool direct_dh() const { return Cell::kSeparateRecurrentGrad || zoneout > 0; }
};

// The cell's backward for row b, unit j of the step.
template <typename Cell>
__device__ __forceinline__ void backward_unit(const BackwardArgs<typename Cell::scalar_t>& a, int64_t b, int64_t j) {
  using T = typename Cell::scalar_t;
  const int64_t H = a.H, GH = Cell::kGates * H;
  const T* h_prev = a.before.row(b, a.outputs, a.out_stride, a.h0, a.P);
  const T* c_prev = a.c0 ? a.before.row(b, a.saved_c, a.K, a.c0, H) : nullptr;
  StepBackward<T> io{a.dy ? a.dy + b * a.P : nullptr, a.dh + b * a.dh_stride, a.dc ? a.dc + b * H : nullptr,
                     a.saved + b * a.K, h_prev, c_prev, a.dgx + b * GH, a.dgh + b * GH, a.peephole, nullptr,
                     Zoneout<T>::of_row(a.zoneout, a.zoneout_masks, Cell::kHasCellState, a.rows_all, H, a.P,
                                        a.first_row + b)};
  Cell::backward(io, H, j);
}

// --- unfused (with a projection, or on request): the cell backward over (row, unit), one thread per
// element (grid-stride); the products around it are cuBLAS calls in the loop.
constexpr int kBackwardThreads = 256;

template <typename Cell>
__global__ void __launch_bounds__(kBackwardThreads) backward_step_kernel(const BackwardArgs<typename Cell::scalar_t> a) {
  const int64_t H = a.H, total = a.n * H;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    backward_unit<Cell>(a, idx / H, idx % H);
  }
}

// --- without a projection: dh propagation fused with the cell backward, one launch per step.
template <typename T>
struct FusedBackwardArgs {
  const T* w_tiles;      // W_hh in column tiles (column_tiles), conjugated
  const T* dg_before;    // the step before in the walk: its first row of dgh, [rows_before, G*H]
  int64_t rows_before;   // its rows; 0 at the walk's first step (dh is then the state's, dh_n)
  BackwardArgs<T> cell;  // this step: dh is the [B, H] state, which the kernel also writes
};

// Block: as the forward kernel, threadIdx.x = unit, the warps' rows as WarpRows says. The grid
// covers the rows of both steps, max(n, rows_before):
//  - b < rows_before: dh[b, j] = Σ_m dG_before[b, m]·W_hh[m, j] (+ for GRU the direct z-path that
//    the step before's cell backward left in dh[b, j]);
//  - b >= rows_before (a longer step, forward direction of a packed sequence): dh[b, j] is still
//    the state's dh_n of a sequence that ends here;
//  - b < n: the cell backward of this step reads dh[b, j] (and writes GRU's direct path there);
//    rows in [n, rows_before) (reverse direction: sequences that began at the step before) keep
//    dh[b, j] as their gradient at h_0.
// Shared memory per block: w_s[kTileK][kTileUnits] and g_s[rows][kTileK]: 4 + 2 KB in float with
// 16 rows, twice that in double.
template <typename Cell, int kRows, int kSplit>
__global__ void __launch_bounds__(kThreads)
    fused_backward_step_kernel(const FusedBackwardArgs<typename Cell::scalar_t> a) {
  using T = typename Cell::scalar_t;
  using Tile = WarpRows<kRows, kSplit>;
  constexpr int kTileRows = Tile::kBlockRows;
  __shared__ __align__(16) T w_s[kTileK][kTileUnits];
  __shared__ T g_s[kTileRows][kTileK];

  const BackwardArgs<T>& cell = a.cell;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t H = cell.H, GH = Cell::kGates * H, before = a.rows_before;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int64_t unit0 = static_cast<int64_t>(blockIdx.y) * kTileUnits;
  const T* slab = a.w_tiles + static_cast<int64_t>(blockIdx.y) * GH * kTileUnits;

  T acc[kRows][1];  // one "gate": the block's columns of dh
  FUSED_RNN_UNROLL
  for (int r = 0; r < kRows; ++r) acc[r][0] = T(0);
  if (row0 < before) {  // the same for every thread of the block, so all of them reach the barriers
    accumulate_tile_product<1, kRows, kSplit>(acc, &w_s[0][0], &g_s[0][0], slab, DenseRows<T>{a.dg_before, GH}, row0,
                                              before, GH);
  }

  const int64_t j = unit0 + tx, rows = cell.n > before ? cell.n : before;
  if (j >= H) return;
  FUSED_RNN_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const int64_t b = row0 + Tile::first(ty) + r;
    if (r >= Tile::count(ty) || b >= rows) break;
    T* dh = cell.dh + b * cell.dh_stride + j;
    if (b < before) cell.template add_product_grad<Cell>(dh, b, j, acc[r][0]);
    if (b < cell.n) backward_unit<Cell>(cell, b, j);
  }
}

// The product for the cost model: the rows of both steps, the block's columns of W_hh over K = G*H.
template <typename Cell>
int fused_backward_variant(const FusedBackwardArgs<typename Cell::scalar_t>& a, int sms) {
  const int bytes = static_cast<int>(sizeof(typename Cell::scalar_t));
  const StepShape shape{std::max(a.cell.n, a.rows_before), a.cell.H, kTileUnits, Cell::kGates * a.cell.H, kTileUnits,
                        bytes, bytes};
  return choose_variant(kCudaCoreCosts<1>, shape, sms);
}

template <typename Cell>
void launch_fused_backward_step(const FusedBackwardArgs<typename Cell::scalar_t>& a, int sms) {
  using Kernel = void (*)(FusedBackwardArgs<typename Cell::scalar_t>);
  constexpr Kernel kernels[] = {&fused_backward_step_kernel<Cell, 4, 1>, &fused_backward_step_kernel<Cell, 4, kWarps>,
                                &fused_backward_step_kernel<Cell, 1, kWarps>};  // as kCudaCoreCosts
  const int v = fused_backward_variant<Cell>(a, sms);
  device::launch(kernels[v], step_grid(std::max(a.cell.n, a.rows_before), a.cell.H, kCudaCoreCosts<1>[v].rows_per_block,
                               kTileUnits),
         dim3(kTileUnits, kWarps), a);
}

template <typename Cell>
struct BackwardLoop {
  using T = typename Cell::scalar_t;

  // fuse: one launch per step where the shape allows (no projection); else the cell backward and
  // cuBLAS's dh product as two launches per step.
  static void run(const LayerShape& s, bool reverse, const Tensor& w_hh_conj, const Tensor& w_hr_conj,
                  const Variants& variants, const Tensor& outputs, const Tensor& h0, const Tensor& c0,
                  const Tensor& saved, const Tensor& dy, Tensor& dh, Tensor& dc, Tensor& dgx, Tensor& dgh,
                  Tensor& dh_total, bool fuse) {
    if (s.T == 0 || s.B == 0 || s.H == 0) return;  // H = 0: every gradient is empty or stays as it is
    if (fuse && !s.proj) {
      run_fused(s, reverse, w_hh_conj, variants, outputs, h0, c0, saved, dy, dh, dc, dgx, dgh);
    } else {
      run_unfused(s, reverse, w_hh_conj, w_hr_conj, variants, outputs, h0, c0, saved, dy, dh, dc, dgx, dgh, dh_total);
    }
  }

  // The cell backward's arguments for step t (n rows from row `off`), reading the gradient at h_t
  // from `cell_dh` (row stride cell_dh_stride) plus `step_dy` when given.
  static BackwardArgs<T> cell_args(const LayerShape& s, bool reverse, int64_t t, const Variants& variants,
                                   const Tensor& outputs, const Tensor& h0, const Tensor& c0, const Tensor& saved,
                                   const T* step_dy, T* cell_dh, int64_t cell_dh_stride, Tensor& dc, Tensor& dgx,
                                   Tensor& dgh) {
    const int64_t off = s.offsets[t], GH = s.gates * s.H, K = s.saved_cols();
    const T* saved_p = saved.data_ptr<T>();
    BackwardArgs<T> a;
    a.dy = step_dy;
    a.dh = cell_dh;
    a.dh_stride = cell_dh_stride;
    a.dc = dc.defined() ? dc.data_ptr<T>() : nullptr;
    a.saved = saved_p + off * K;
    a.before = predecessor(s, reverse, t);
    a.outputs = outputs.data_ptr<T>();
    a.out_stride = outputs.stride(0);
    a.saved_c = saved_p + s.cell_state_col();
    a.h0 = h0.data_ptr<T>();
    a.c0 = c0.defined() ? c0.data_ptr<T>() : nullptr;
    a.dgx = dgx.data_ptr<T>() + off * GH;
    a.dgh = dgh.data_ptr<T>() + off * GH;
    a.peephole = variants.peephole.defined() ? variants.peephole.const_data_ptr<T>() : nullptr;
    a.zoneout = s.zoneout;
    a.zoneout_masks = variants.zoneout_masks.defined() ? variants.zoneout_masks.const_data_ptr<T>() : nullptr;
    a.rows_all = s.N;
    a.first_row = off;
    a.dropout_masks = s.recurrent_dropout ? variants.recurrent_masks.const_data_ptr<T>() : nullptr;
    a.n = s.batch_sizes[t];
    a.H = s.H;
    a.P = s.P;
    a.K = K;
    return a;
  }

  // dh[0:n) = dG_h·W_hh of the n rows from row `off` (GRU, zoneout: added to the direct path already
  // in dh), times the masks under recurrent dropout (add_product_grad's rule).
  static void propagate(const LayerShape& s, const Variants& variants, const Tensor& w_hh_conj, const Tensor& dgh,
                        int64_t off, int64_t n, Tensor& dh) {
    Tensor dh_rows = dh.narrow(0, 0, n);
    const Tensor dg_rows = dgh.narrow(0, off, n);
    if (s.recurrent_dropout) {
      const Tensor product = at::mm(dg_rows, w_hh_conj).mul_(variants.recurrent_masks.narrow(0, 0, n));
      if (Cell::kSeparateRecurrentGrad || s.zoneout > 0) {
        dh_rows.add_(product);
      } else {
        dh_rows.copy_(product);
      }
    } else if (Cell::kSeparateRecurrentGrad || s.zoneout > 0) {
      at::addmm_out(dh_rows, dh_rows, dg_rows, w_hh_conj);
    } else {
      at::mm_out(dh_rows, dg_rows, w_hh_conj);
    }
  }

  static void run_fused(const LayerShape& s, bool reverse, const Tensor& w_hh_conj, const Variants& variants,
                        const Tensor& outputs, const Tensor& h0, const Tensor& c0, const Tensor& saved,
                        const Tensor& dy, Tensor& dh, Tensor& dc, Tensor& dgx, Tensor& dgh) {
    const int64_t GH = s.gates * s.H, P = s.P;
    const Tensor w_tiles = column_tiles(w_hh_conj, P, kTileUnits);
    TORCH_INTERNAL_ASSERT(reinterpret_cast<uintptr_t>(w_tiles.const_data_ptr()) % 16 == 0,
                          "fused_rnn: W_hh tiles misaligned");
    const int sms = device::multiprocessor_count();
    const T* dy_p = dy.defined() ? dy.data_ptr<T>() : nullptr;
    int64_t rows_before = 0, off_before = 0;  // the last step walked that had rows
    for (int64_t step = 0; step < s.T; ++step) {
      const int64_t t = reverse ? step : s.T - 1 - step;  // forward's order, backwards
      const int64_t n = s.batch_sizes[t], off = s.offsets[t];
      if (n == 0) continue;
      FusedBackwardArgs<T> a;
      a.w_tiles = w_tiles.const_data_ptr<T>();
      a.dg_before = rows_before > 0 ? dgh.const_data_ptr<T>() + off_before * GH : nullptr;
      a.rows_before = rows_before;
      a.cell = cell_args(s, reverse, t, variants, outputs, h0, c0, saved, dy_p ? dy_p + off * P : nullptr,
                         dh.data_ptr<T>(), P, dc, dgx, dgh);
      launch_fused_backward_step<Cell>(a, sms);
      rows_before = n;
      off_before = off;
    }
    if (rows_before > 0) propagate(s, variants, w_hh_conj, dgh, off_before, rows_before, dh);  // to h_0
  }

  static void run_unfused(const LayerShape& s, bool reverse, const Tensor& w_hh_conj, const Tensor& w_hr_conj,
                          const Variants& variants, const Tensor& outputs, const Tensor& h0, const Tensor& c0,
                          const Tensor& saved, const Tensor& dy, Tensor& dh, Tensor& dc, Tensor& dgx, Tensor& dgh,
                          Tensor& dh_total) {
    const int64_t H = s.H, P = s.P;
    Tensor d_proj_input = s.proj ? at::empty({s.B, H}, dh.options()) : Tensor();
    const T* dy_p = dy.defined() ? dy.data_ptr<T>() : nullptr;
    const int sms = device::multiprocessor_count();
    for (int64_t step = 0; step < s.T; ++step) {
      const int64_t t = reverse ? step : s.T - 1 - step;
      const int64_t n = s.batch_sizes[t], off = s.offsets[t];
      if (n == 0) continue;
      const T* step_dy = dy_p ? dy_p + off * P : nullptr;
      T* cell_dh = dh.data_ptr<T>();
      int64_t cell_dh_stride = P;
      if (s.proj) {  // the gradient at h_t is mapped back through W_hr first
        Tensor total = dh_total.narrow(0, off, n);
        if (dy.defined()) {
          at::add_out(total, dh.narrow(0, 0, n), dy.narrow(0, off, n));
        } else {
          total.copy_(dh.narrow(0, 0, n));
        }
        if (s.zoneout > 0) {  // of dL/dh_t, m passes straight to h_{t-1} (the direct part), 1 - m to ĥ_t
          const Tensor keep = projected_keep(s, variants, off, n, total);
          dh.narrow(0, 0, n).copy_(keep * total);
          total.mul_(1 - keep);
        }
        Tensor d_proj_rows = d_proj_input.narrow(0, 0, n);
        at::mm_out(d_proj_rows, total, w_hr_conj);
        step_dy = nullptr;
        cell_dh = d_proj_input.data_ptr<T>();
        cell_dh_stride = H;
      }
      const BackwardArgs<T> a =
          cell_args(s, reverse, t, variants, outputs, h0, c0, saved, step_dy, cell_dh, cell_dh_stride, dc, dgx, dgh);
      const int64_t blocks = std::min<int64_t>((n * H + kBackwardThreads - 1) / kBackwardThreads,
                                               static_cast<int64_t>(sms) * 32);
      device::launch(&backward_step_kernel<Cell>, dim3(static_cast<unsigned>(blocks)), dim3(kBackwardThreads), a);
      propagate(s, variants, w_hh_conj, dgh, off, n, dh);  // dL/dh_{t-1}
    }
  }
};

}  // namespace
}  // namespace fused_rnn
