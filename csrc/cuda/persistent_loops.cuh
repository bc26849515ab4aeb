// The persistent kernels: the whole sequence of one layer and direction in one cooperative launch,
// forward and backward, with each block's slice of W_hh held in shared memory for all T steps
// (step_loops.cuh reloads it from L2 at every step, and pays a launch per step). The backward, the
// mirror image, is described in its own section below.
//
// Block k owns hidden units [k*U, (k+1)*U), U = kTileUnits / G (LSTM 8, GRU 10, RNN 32), so that its
// G*U gate columns fit one warp's 32 lanes: W_hh's slice [P][G*U] (gate_interleaved with U units a
// tile) is copied to shared memory once, padded to 32 columns and to whole 32-row k chunks with
// zeros, and each thread keeps the first kPersistentRegisterK weights of its share in registers
// too. Per step, every block reads all of h_{t-1} (the step before's rows of y, or h_0: StateRows,
// as the per-step kernels do), 4 rows at a time: it stages them in shared memory whole, multiplies
// them with the resident weights, each warp over a quarter of k, and hands the sums through shared
// memory to the threads that run the cell (csrc/cells.h) on its (row, unit) pairs, which write h_t
// into y (and `saved`, and LSTM's c in place). Then the grid waits at a grid-wide barrier before
// the next step, so that no block reads h_t before every block has written its units of it
// (cooperative groups' grid.sync(), which also makes those writes visible). Every sum runs in a
// fixed k order and every output has one writer: bitwise repeatable.
//
// All blocks must be resident at once: the loops launch cooperatively and only where they are (the
// occupancy of the kernel with its shared memory, times the SMs); the choice between these and the
// per-step kernels is persistent_wanted(), the one rule for all of them. Without a projection (its
// product between steps would need a second grid-wide pass); the forward in float32 and float64 on
// the CUDA cores, and on the tensor cores (float16, bfloat16, TF32) in its own section below; the
// backward in float32 and float64.
//
// The includer (loops.cuh) provides, besides step_loops.cuh's names, the device functions
// dynamic_shared_memory() (the block's extern __shared__ bytes) and grid_sync() (a barrier over
// the whole grid); the cooperative launch and the grid's capacity come through device.h.
#pragma once

#include <cstdlib>
#include <string>
#include <vector>

#include "step_loops.cuh"

namespace fused_rnn {
namespace {

template <int G>
constexpr int kPersistentUnits = kTileUnits / G;  // units per block: G*U gate columns in one warp
constexpr int kPersistentRows = 4;     // batch rows of a pass, which every warp multiplies
constexpr int kPersistentInFlight = 16;  // h loads a thread issues before it stores them
// The first k of each warp's share of the reduction whose weights a thread also keeps in registers
// for the whole sequence (32 registers either way): those k cost it no shared-memory load of W.
// The rest it reads from the resident slice. The sum's order is the same either way.
template <typename T>
constexpr int kPersistentRegisterK = 128 / static_cast<int>(sizeof(T));

// A persistent kernel's grid: one block per `units` hidden units.
inline int64_t persistent_blocks(int64_t H, int units) { return (H + units - 1) / units; }

// A persistent kernel's walk over the steps: the step table as predecessor() (layer.h) reads it,
// arithmetic for a padded sequence, from tables on the device for a packed one.
struct PersistentSteps {
  int64_t rows_all;            // a padded sequence: every step's rows (the tables are not read), else 0
  const int64_t* batch_sizes;  // packed: on the device, [T]
  const int64_t* offsets;      // packed: on the device, [T]
  int64_t T;
  bool reverse;

  __device__ __forceinline__ int64_t rows(int64_t t) const { return rows_all ? rows_all : batch_sizes[t]; }
  __device__ __forceinline__ int64_t first_row(int64_t t) const { return rows_all ? t * rows_all : offsets[t]; }
  __device__ __forceinline__ Predecessor before(int64_t t) const { return predecessor(*this, T, reverse, t); }
};

template <typename T, typename W = T>
struct PersistentArgs {
  const W* w_tiles;            // W_hh gate_interleaved (CUDA cores: kPersistentUnits units a tile,
                               // tensor cores: kMmaUnits), in the operand type
  const T* gx;                 // [N, G*H], the whole sequence
  const T* b_hn;               // GRU: [H] or null
  const T* h0;                 // [B, P]
  T* y;                        // [N, P]: h_t of every row (no projection: P = H)
  T* c;                        // LSTM: [B, H] in place, else null
  T* saved;                    // [N, K] or null
  const T* peephole;           // LSTM: [3*H] or null
  double zoneout;              // cells.h's Zoneout: z, and the masks of every row (Zoneout::of_row) or null
  const T* zoneout_masks;
  // Recurrent dropout (cells.h): the masks [B, P], the rows h'_t [N, P] that the cells write and
  // h'_0 [B, P], which the products take; null without
  const T* dropout_masks;
  T* product_rows;
  const T* product_h0;
  int64_t K, H, P, N;
  PersistentSteps walk;

  // What finish_unit (step_loops.cuh) needs of step t, for a cell of G gates.
  __device__ __forceinline__ ForwardArgs<T, W> step(int64_t t, int G) const {
    const int64_t off = walk.first_row(t);
    ForwardArgs<T, W> cell;
    cell.h_prev = StateRows<T>{walk.before(t), y, h0, P};
    cell.h_product = product_rows ? StateRows<T>{walk.before(t), product_rows, product_h0, P} : cell.h_prev;
    cell.gx = gx + off * G * H;
    cell.b_hn = b_hn;
    cell.c = c;
    cell.out = y + off * P;
    cell.out_stride = P;
    cell.saved = saved ? saved + off * K : nullptr;
    cell.saved_stride = K;
    cell.peephole = peephole;
    cell.zoneout = zoneout;
    cell.zoneout_masks = zoneout_masks;
    cell.rows_all = N;
    cell.first_row = off;
    cell.dropout_masks = dropout_masks;
    cell.product_out = product_rows ? product_rows + off * P : nullptr;
    cell.n = walk.rows(t);
    cell.H = H;
    cell.P = P;
    return cell;
  }
};

// The rows of the resident slice: k rounded up to whole chunks of kTileK.
C10_HOST_DEVICE inline int64_t persistent_k(int64_t P) { return (P + kTileK - 1) / kTileK * kTileK; }

// Shared memory of a block: the resident slice [Pk][32], the pass's h rows [4][Pk] and the warps'
// partial sums [4 warps][4 rows][32].
template <typename T>
size_t persistent_shared_bytes(int64_t P) {
  const int64_t Pk = persistent_k(P);
  return static_cast<size_t>(Pk * kTileUnits + kPersistentRows * Pk + kWarps * kPersistentRows * kTileUnits) *
         sizeof(T);
}

// Per pass: the pass's 4 rows of h_{t-1} are staged whole (kPersistentInFlight loads a thread in
// flight: one L2 round trip for P up to 512); each warp multiplies all 4 rows over its quarter of
// k with the resident slice (thread tx: column tx); the quarters' partial sums meet in shared
// memory and are added in warp order by the threads that run the cell.
// __launch_bounds__(kThreads, 1): one block an SM is all that its grids need (more are resident
// where the shared memory allows: the occupancy API says), and it leaves ptxas the registers for
// the register copy of W without spills.
template <typename Cell>
__global__ void __launch_bounds__(kThreads, 1) persistent_forward_kernel(const PersistentArgs<typename Cell::scalar_t> a) {
  using T = typename Cell::scalar_t;
  constexpr int G = Cell::kGates, U = kPersistentUnits<G>, kCols = G * U, R = kPersistentRows;
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kTileUnits + tx;
  const int64_t P = a.P, H = a.H, Pk = persistent_k(P);
  const int64_t quarter = (P + kWarps - 1) / kWarps, k_begin = ty * quarter;  // the warp's share of k
  const int64_t k_end = k_begin + quarter < P ? k_begin + quarter : P;
  T* const w_s = reinterpret_cast<T*>(dynamic_shared_memory());  // [Pk][32], column g*U + u
  T* const h_s = w_s + Pk * kTileUnits;                            // [R][Pk]
  T* const part_s = h_s + R * Pk;                                  // [kWarps][R][32]

  const T* slab = a.w_tiles + static_cast<int64_t>(blockIdx.x) * P * kCols;
  for (int64_t e = tid; e < Pk * kTileUnits; e += kThreads) {
    const int64_t k = e / kTileUnits;
    const int col = static_cast<int>(e % kTileUnits);
    w_s[e] = k < P && col < kCols ? slab[k * kCols + col] : T(0);
  }  // read only after the first pass's barrier below
  constexpr int kRegK = kPersistentRegisterK<T>;
  const int64_t mine = k_end - k_begin;  // the warp's k (none for the last warps of a short P)
  T w_reg[kRegK];  // W[k_begin + i][tx] for the first kRegK of them
  FUSED_RNN_UNROLL
  for (int i = 0; i < kRegK; ++i) w_reg[i] = i < mine && tx < kCols ? slab[(k_begin + i) * kCols + tx] : T(0);

  for (int64_t step = 0; step < a.walk.T; ++step) {
    const int64_t t = a.walk.reverse ? a.walk.T - 1 - step : step;
    const ForwardArgs<T, T> cell = a.step(t, G);
    const int64_t n = cell.n;

    for (int64_t row0 = 0; row0 < n; row0 += R) {  // the same for the whole block
      stage_rows_grouped<R, kPersistentInFlight, kThreads>(h_s, static_cast<int>(Pk), cell.h_product, row0, n, 0,
                                                          static_cast<int>(Pk), P, tid,
                                                          [](T v) { return v; });
      __syncthreads();
      T acc[R] = {};
      FUSED_RNN_UNROLL
      for (int i = 0; i < kRegK; ++i) {  // k in order: first the registers' ...
        if (i < mine) {
          FUSED_RNN_UNROLL
          for (int r = 0; r < R; ++r) acc[r] += h_s[r * Pk + k_begin + i] * w_reg[i];  // one address a warp
        }
      }
      FUSED_RNN_UNROLL_4
      for (int64_t k = k_begin + kRegK; k < k_end; ++k) {  // ... then the slice's
        const T w = w_s[k * kTileUnits + tx];
        FUSED_RNN_UNROLL
        for (int r = 0; r < R; ++r) acc[r] += h_s[r * Pk + k] * w;
      }
      FUSED_RNN_UNROLL
      for (int r = 0; r < R; ++r) part_s[(ty * R + r) * kTileUnits + tx] = acc[r];
      __syncthreads();
      for (int e = tid; e < R * U; e += kThreads) {  // the cell on (row, unit) pairs
        const int r = e / U, u = e % U;
        const int64_t b = row0 + r, j = static_cast<int64_t>(blockIdx.x) * U + u;
        if (b >= n || j >= H) continue;
        T sum[G];
        FUSED_RNN_UNROLL
        for (int g = 0; g < G; ++g) {
          const int col = g * U + u;
          T total = part_s[r * kTileUnits + col];
          FUSED_RNN_UNROLL
          for (int w = 1; w < kWarps; ++w) total += part_s[(w * R + r) * kTileUnits + col];  // warp order
          sum[g] = total;
        }
        finish_unit<Cell>(cell, b, j, sum);
      }
      // No barrier here: the next pass writes h_s, which nobody reads now, and part_s only after
      // its own barrier, which every thread reaches after this cell loop.
    }
    grid_sync();  // every block's part of h_t written (and visible) before any block reads it
  }
}

// --- The persistent forward on the tensor cores: float16, bfloat16, and float32 as TF32 -----------
//
// The per-step tensor-core kernel's block (step_loops.cuh: G warps, warp g gate g of kMmaUnits = 16
// units, MmaOperand's multiply) kept for the whole sequence: its W_hh slice [Pk][G*16] (Pk: P
// rounded up to 16) in shared memory in the operand type for all T steps; per step h_{t-1} staged
// whole, 16 rows a pass, rounded to the operand type as it is staged (16 loads a thread in flight:
// rows past the batch cost no loads); each warp multiplies its gate over all of k in the per-step
// kernel's k order (so the sums, and the outputs, are bitwise those of the per-step kernel); the
// sums meet in shared memory and the cell runs in float32 on (row, unit) pairs; a grid barrier a
// step.
constexpr int kPersistentMmaRows = 16;  // one mma row tile a pass

template <typename Op, int G>
struct PersistentMmaLayout {
  using Operand = MmaOperand<Op>;
  using W = typename Operand::stored;
  static constexpr int kCols = G * kMmaUnits, kWPitch = kCols + Operand::kWPad, kSumPitch = kCols + kSumPad;
  C10_HOST_DEVICE static int64_t k_rows(int64_t P) { return (P + 15) / 16 * 16; }  // whole ldmatrix tiles
  C10_HOST_DEVICE static int64_t h_pitch(int64_t P) { return k_rows(P) + Operand::kHPad; }
  // The slice [Pk][kWPitch] and the pass's h rows [16][h_pitch] in W, then the sums [16][kSumPitch]
  // in float: 176 bytes a k for LSTM in float16 / bfloat16 (up to H = 1280 on 227 KB), 352 in TF32
  // (up to 640).
  static size_t shared_bytes(int64_t P) {
    return static_cast<size_t>(k_rows(P) * kWPitch + kPersistentMmaRows * h_pitch(P)) * sizeof(W) +
           static_cast<size_t>(kPersistentMmaRows * kSumPitch) * sizeof(float);
  }
};

template <typename Cell, typename Op>
__global__ void __launch_bounds__(32 * Cell::kGates)
    persistent_tensor_core_kernel(const PersistentArgs<float, typename MmaOperand<Op>::stored> a) {
  static_assert(std::is_same_v<typename Cell::scalar_t, float>, "the tensor cores' gate math runs in float32");
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800  // as forward_step_tensor_core_kernel
  using Layout = PersistentMmaLayout<Op, Cell::kGates>;
  using Operand = MmaOperand<Op>;
  using W = typename Operand::stored;
  constexpr int G = Cell::kGates, kBlockThreads = 32 * G, R = kPersistentMmaRows;
  constexpr int kCols = Layout::kCols, kWPitch = Layout::kWPitch, kSumPitch = Layout::kSumPitch;
  const int tid = threadIdx.x, gate = tid / 32, lane = tid % 32;
  const int64_t P = a.P, Pk = Layout::k_rows(P);
  const int h_pitch = static_cast<int>(Layout::h_pitch(P));
  W* const w_s = reinterpret_cast<W*>(dynamic_shared_memory());  // [Pk][kWPitch]
  W* const h_s = w_s + Pk * kWPitch;                               // [R][h_pitch]
  float* const sum_s = reinterpret_cast<float*>(h_s + R * h_pitch);  // [R][kSumPitch]

  const W* slab = a.w_tiles + static_cast<int64_t>(blockIdx.x) * P * kCols;
  const W zero = Operand::round(0.0f);
  for (int64_t e = tid; e < Pk * kWPitch; e += kBlockThreads) {
    const int64_t k = e / kWPitch;
    const int col = static_cast<int>(e % kWPitch);
    w_s[e] = k < P && col < kCols ? slab[k * kCols + col] : zero;
  }  // read only after the first pass's barrier below

  for (int64_t step = 0; step < a.walk.T; ++step) {
    const int64_t t = a.walk.reverse ? a.walk.T - 1 - step : step;
    const ForwardArgs<float, W> cell = a.step(t, G);
    const int64_t n = cell.n;

    for (int64_t row0 = 0; row0 < n; row0 += R) {  // the same for the whole block
      stage_rows_grouped<R, kPersistentInFlight, kBlockThreads>(h_s, h_pitch, cell.h_product, row0, n, 0,
                                                               static_cast<int>(Pk), P, tid,
                                                               [](float v) { return Operand::round(v); });
      __syncthreads();
      float acc[1][2][4] = {};
      for (int kk = 0; kk < Pk; kk += Operand::kStep) {
        Operand::template multiply<1>(acc, w_s, kWPitch, h_s, h_pitch, kk, gate * kMmaUnits, lane);
      }
      store_accumulators<1, kSumPitch>(sum_s, acc, gate * kMmaUnits, lane);
      __syncthreads();
      finish_tensor_core_tile<Cell, R, kSumPitch>(cell, sum_s, row0, static_cast<int64_t>(blockIdx.x) * kMmaUnits,
                                                  tid, kBlockThreads);
      // No barrier here: the next pass writes h_s, read before the barrier above, and sum_s only
      // after its own barrier.
    }
    grid_sync();  // every block's part of h_t written (and visible) before any block reads it
  }
#endif
}

// --- The persistent backward: the mirror image, one cooperative launch for the whole walk ---------
//
// Block k owns the same units [k*U, (k+1)*U) as in the forward. Per step of the walk (t from the
// last to the first) it computes dh_{t-1}[b, j] = sum_m dG_t'[b, m] * W_hh[m, j] for its units j
// (dG_t' = the step before in the walk, m over all G*H gate rows, written by every block), and at
// once runs the cell's backward of step t on its (row, unit) pairs (as fused_backward_step_kernel
// does), which writes its units' columns of dG_t; then a grid-wide barrier. After the walk, one more
// pass gives dh at h_0, so no product is left for the host. W_hh's columns for the block's units,
// [G*H][U], stay in shared memory for the whole walk. Warp w covers a quarter of m, and in it lane
// (sub, u) = (lane / U, lane % U) the m = sub mod S (S = 32 / U: LSTM 4 subs of 8 units, GRU 3 of
// 10 with 2 lanes idle, RNN 1 of 32), so that all 32 lanes are busy and a warp's reads of dG are S
// consecutive words (no bank conflicts). The partial sums are added subs first, then warps, in
// order: a fixed order, every output one writer.

template <int G>
constexpr int kPersistentSubs = kTileUnits / kPersistentUnits<G>;  // lanes sharing a unit, over m

// The m a warp covers: a quarter of G*H, rounded up to whole rows of S.
C10_HOST_DEVICE inline int64_t persistent_backward_quarter(int64_t GH, int subs) {
  const int64_t quarter = (GH + kWarps - 1) / kWarps;
  return (quarter + subs - 1) / subs * subs;
}

// W_hh [G*H, P] (P = H) -> [blocks][kWarps * quarter / S][32]: block k's columns [m][U] for its U
// units, S consecutive m to a row of 32 lanes: element (k, i, lane) is
// W_hh[i * S + lane / U, k * U + lane % U], zero past G*H, past H and in the lanes past S * U.
// A block's slice is one contiguous slab, copied to shared memory as it lies.
inline Tensor persistent_backward_columns(const Tensor& w_hh, int64_t G, int64_t H, int units, int subs) {
  const int64_t GH = G * H, padded_m = kWarps * persistent_backward_quarter(GH, subs);
  const int64_t blocks = persistent_blocks(H, units);
  const Tensor padded = at::constant_pad_nd(w_hh, {0, blocks * units - w_hh.size(1), 0, padded_m - GH});
  const Tensor rows =
      padded.reshape({padded_m, blocks, units}).transpose(0, 1).reshape({blocks, padded_m / subs, subs * units});
  return at::constant_pad_nd(rows, {0, kTileUnits - subs * units}).contiguous();
}

// Shared memory of a backward block: W's columns [kWarps * rows][32], the pass's dG rows
// [4][kWarps * quarter] and the partial sums [kWarps][4 rows][32].
template <typename T>
size_t persistent_backward_shared_bytes(int64_t GH, int subs) {
  const int64_t quarter = persistent_backward_quarter(GH, subs);
  return static_cast<size_t>(kWarps * quarter / subs * kTileUnits + kPersistentRows * kWarps * quarter +
                             kWarps * kPersistentRows * kTileUnits) *
         sizeof(T);
}

template <typename T>
struct PersistentBackwardArgs {
  const T* w_columns;          // persistent_backward_columns of W_hh, conjugated
  const T* dy;                 // [N, P] or null
  T* dh;                       // [B, P]: dh_n in, the gradient at h_0 out
  T* dc;                       // LSTM: [B, H], dc_n in, at c_0 out; else null
  const T* saved;              // [N, K]
  const T* outputs;            // row 0 of the forward's outputs, row stride out_stride
  int64_t out_stride;
  const T* saved_c;            // row 0 of saved at LSTM's c_t column
  const T* h0;
  const T* c0;                 // LSTM, else null
  T* dgx;                      // [N, G*H]
  T* dgh;                      // [N, G*H] (the same as dgx except for GRU)
  const T* peephole;           // LSTM: [3*H] or null
  double zoneout;              // as PersistentArgs'
  const T* zoneout_masks;
  const T* dropout_masks;      // recurrent dropout [B, P], or null (BackwardArgs::add_product_grad)
  int64_t K, H, P, N;
  PersistentSteps walk;
};

// One step of the walk on the block's units: rows [0, max(n, before)) in passes of 4, where n =
// cell.n rows run the cell's backward and `before` rows of the step before's dG (from dg_before)
// feed the product first (fused_backward_step_kernel's rules for the rows that only one of the two
// steps has). The walk's last call has n = 0: only the product, into dh at h_0.
template <typename Cell>
__device__ __forceinline__ void persistent_backward_step(const BackwardArgs<typename Cell::scalar_t>& cell,
                                                         const typename Cell::scalar_t* dg_before, int64_t before,
                                                         const typename Cell::scalar_t* w_s,
                                                         const typename Cell::scalar_t (&w_reg)[kPersistentRegisterK<typename Cell::scalar_t>],
                                                         typename Cell::scalar_t* g_s,
                                                         typename Cell::scalar_t* part_s) {
  using T = typename Cell::scalar_t;
  constexpr int G = Cell::kGates, U = kPersistentUnits<G>, S = kPersistentSubs<G>, R = kPersistentRows;
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kTileUnits + tx;
  const int64_t H = cell.H, GH = G * H, quarter = persistent_backward_quarter(GH, S), rows_w = quarter / S;
  const int pitch = static_cast<int>(kWarps * quarter);
  const int sub = tx < S * U ? tx / U : 0;  // idle lanes (GRU's last 2): inside the pass's rows, zero weights
  const T* w_lane = w_s + ty * rows_w * kTileUnits + tx;
  const T* g_lane = g_s + ty * quarter + sub;
  constexpr int kRegK = kPersistentRegisterK<T>;
  const int64_t rows = cell.n > before ? cell.n : before;
  for (int64_t row0 = 0; row0 < rows; row0 += R) {  // the same for the whole block
    const bool product = row0 < before;
    if (product) {
      stage_rows_grouped<R, kPersistentInFlight, kThreads>(g_s, pitch, DenseRows<T>{dg_before, GH}, row0, before, 0,
                                                          pitch, GH, tid, [](T v) { return v; });
      __syncthreads();
      T acc[R] = {};
      FUSED_RNN_UNROLL
      for (int i = 0; i < kRegK; ++i) {  // rows in order: first the registers' ...
        if (i < rows_w) {
          FUSED_RNN_UNROLL
          for (int r = 0; r < R; ++r) acc[r] += g_lane[r * pitch + i * S] * w_reg[i];
        }
      }
      FUSED_RNN_UNROLL_4
      for (int64_t i = kRegK; i < rows_w; ++i) {  // ... then the slice's
        const T w = w_lane[i * kTileUnits];
        FUSED_RNN_UNROLL
        for (int r = 0; r < R; ++r) acc[r] += g_lane[r * pitch + i * S] * w;
      }
      FUSED_RNN_UNROLL
      for (int r = 0; r < R; ++r) part_s[(ty * R + r) * kTileUnits + tx] = acc[r];
      __syncthreads();
    }
    for (int e = tid; e < R * U; e += kThreads) {  // the (row, unit) pairs
      const int r = e / U, u = e % U;
      const int64_t b = row0 + r, j = static_cast<int64_t>(blockIdx.x) * U + u;
      if (b >= rows || j >= H) continue;
      if (b < before) {
        T total = T(0);
        FUSED_RNN_UNROLL
        for (int w = 0; w < kWarps; ++w) {
          FUSED_RNN_UNROLL
          for (int q = 0; q < S; ++q) total += part_s[(w * R + r) * kTileUnits + q * U + u];  // subs, then warps
        }
        cell.template add_product_grad<Cell>(cell.dh + b * cell.dh_stride + j, b, j, total);  // after the direct path
      }
      if (b < cell.n) backward_unit<Cell>(cell, b, j);
    }
    // No barrier here, as in the forward: the next pass's staging writes g_s, read before the
    // barrier above, and part_s only after its own barrier.
  }
}

template <typename Cell>
__global__ void __launch_bounds__(kThreads, 1)  // as persistent_forward_kernel
    persistent_backward_kernel(const PersistentBackwardArgs<typename Cell::scalar_t> a) {
  using T = typename Cell::scalar_t;
  constexpr int G = Cell::kGates, S = kPersistentSubs<G>, R = kPersistentRows;
  const int tid = threadIdx.y * kTileUnits + threadIdx.x;
  const int64_t H = a.H, P = a.P, GH = G * H, quarter = persistent_backward_quarter(GH, S);
  const int64_t w_elems = kWarps * quarter / S * kTileUnits;
  T* const w_s = reinterpret_cast<T*>(dynamic_shared_memory());  // [kWarps * rows][32]
  T* const g_s = w_s + w_elems;                                    // [R][kWarps * quarter]
  T* const part_s = g_s + R * kWarps * quarter;                    // [kWarps][R][32]
  const T* slab = a.w_columns + static_cast<int64_t>(blockIdx.x) * w_elems;
  for (int64_t e = tid; e < w_elems; e += kThreads) w_s[e] = slab[e];  // read after the first barrier
  constexpr int kRegK = kPersistentRegisterK<T>;
  const int64_t rows_w = quarter / S;
  T w_reg[kRegK];  // the lane's first kRegK rows of the warp's slice, also in registers
  FUSED_RNN_UNROLL
  for (int i = 0; i < kRegK; ++i) {
    w_reg[i] = i < rows_w ? slab[(threadIdx.y * rows_w + i) * kTileUnits + threadIdx.x] : T(0);
  }

  BackwardArgs<T> cell;  // what backward_unit needs of a step
  cell.dh = a.dh;
  cell.dh_stride = P;
  cell.dc = a.dc;
  cell.outputs = a.outputs;
  cell.out_stride = a.out_stride;
  cell.saved_c = a.saved_c;
  cell.h0 = a.h0;
  cell.c0 = a.c0;
  cell.peephole = a.peephole;
  cell.zoneout = a.zoneout;
  cell.zoneout_masks = a.zoneout_masks;
  cell.dropout_masks = a.dropout_masks;
  cell.rows_all = a.N;
  cell.H = H;
  cell.P = P;
  cell.K = a.K;
  const T* dg_before = nullptr;  // the last step walked that had rows: its first row of dgh
  int64_t before = 0;
  for (int64_t step = 0; step < a.walk.T; ++step) {
    const int64_t t = a.walk.reverse ? step : a.walk.T - 1 - step;  // forward's order, backwards
    const int64_t n = a.walk.rows(t), off = a.walk.first_row(t);
    if (n == 0) continue;  // the same for the whole grid: nothing written, no barrier needed
    cell.dy = a.dy ? a.dy + off * P : nullptr;
    cell.saved = a.saved + off * a.K;
    cell.before = a.walk.before(t);
    cell.first_row = off;
    cell.dgx = a.dgx + off * GH;
    cell.dgh = a.dgh + off * GH;
    cell.n = n;
    persistent_backward_step<Cell>(cell, dg_before, before, w_s, w_reg, g_s, part_s);
    grid_sync();  // every block's columns of dG_t written (and visible) before any block reads them
    dg_before = a.dgh + off * GH;
    before = n;
  }
  cell.n = 0;  // dh at h_0 from the walk's last step
  if (before > 0) persistent_backward_step<Cell>(cell, dg_before, before, w_s, w_reg, g_s, part_s);
}

// Every step has all B rows (a padded sequence).
inline bool all_steps_full(const LayerShape& s) {
  return std::all_of(s.batch_sizes.begin(), s.batch_sizes.end(), [&](int64_t n) { return n == s.B; });
}

// Whether a persistent kernel (forward, on either kind of core, or backward) runs this layer, the
// one rule for all of them. It can where there is no projection and every block of the grid fits
// on the GPU at once (cooperative_capacity, with the block's shared memory). It is wanted (by
// default) while the batch is at most 8: a step is then one or two passes of 4 rows (on the
// tensor cores one of 16), a few L2 round trips for the rows, and a grid barrier of about 1.5 us,
// 2.5-6 us by the model of bench/GPU_NOTES.md, against the per-step kernels' launch and one L2
// round trip a 32-k chunk (forward 16, backward 64 at H = 512); beyond, the passes add up, and the
// per-step kernels spread the rows over more SMs.
// On an H100's 132 SMs and 227 KB a block, in float32 (float64: about half the H):
//  - forward, 144 bytes a k (LSTM): LSTM up to H = 1056 by the grid (132 blocks of 8, 154 KB
//    each); GRU up to 1320 by the grid; RNN up to 1600 by the shared memory;
//  - backward, W's columns and 4 rows of dG, 192 bytes a unit (LSTM): LSTM up to H = 1056 by the
//    grid (132 blocks of 8, 200 KB each), GRU up to 1308 and RNN up to 1600 by the shared memory;
//  - forward on the tensor cores (PersistentMmaLayout): LSTM in float16 / bfloat16 up to 1280, in
//    TF32 up to 640.
template <typename Args>
bool persistent_wanted(const LayerShape& s, void (*kernel)(Args), dim3 block, size_t shared_bytes, int64_t blocks) {
  // The cuda_persistent override (csrc/overrides.h): always where it can run, never, or the rule.
  const int64_t override_choice = override_value(Override::kCudaPersistent);
  if (override_choice == kPersistentNever || s.proj || s.H == 0 || s.T == 0 || s.B == 0) return false;
  if (!all_steps_full(s) && device::capturing_a_graph()) return false;  // its step tables' copy cannot be captured
  const bool fits = blocks <= device::cooperative_capacity(kernel, block, shared_bytes);
  return fits && (override_choice == kPersistentAlways || s.B <= 8);
}

template <typename Cell>
bool persistent_forward_wanted(const LayerShape& s) {
  return persistent_wanted(s, &persistent_forward_kernel<Cell>, dim3(kTileUnits, kWarps),
                           persistent_shared_bytes<typename Cell::scalar_t>(s.P),
                           persistent_blocks(s.H, kPersistentUnits<Cell::kGates>));
}

template <typename Cell, typename Op>
bool persistent_tensor_core_wanted(const LayerShape& s) {
  return persistent_wanted(s, &persistent_tensor_core_kernel<Cell, Op>, dim3(32 * Cell::kGates),
                           PersistentMmaLayout<Op, Cell::kGates>::shared_bytes(s.P), persistent_blocks(s.H, kMmaUnits));
}

template <typename Cell>
bool persistent_backward_wanted(const LayerShape& s) {
  return persistent_wanted(
      s, &persistent_backward_kernel<Cell>, dim3(kTileUnits, kWarps),
      persistent_backward_shared_bytes<typename Cell::scalar_t>(s.gates * s.H, kPersistentSubs<Cell::kGates>),
      persistent_blocks(s.H, kPersistentUnits<Cell::kGates>));
}

// A packed sequence's step tables on the device ([2T]: the batch sizes, then the offsets), or
// undefined for a padded one, whose rows and offsets are arithmetic. Not while a graph is being
// captured.
Tensor device_step_tables(const LayerShape& s, const at::Device& device) {
  if (all_steps_full(s)) return Tensor();
  std::vector<int64_t> tables(s.batch_sizes);
  tables.insert(tables.end(), s.offsets.begin(), s.offsets.end());
  return device::upload(tables, device);
}

// The kernels' walk over the layer's steps, reading `tables` (device_step_tables) if defined.
PersistentSteps persistent_steps(const LayerShape& s, bool reverse, const Tensor& tables) {
  PersistentSteps walk;
  walk.rows_all = tables.defined() ? 0 : s.B;
  walk.batch_sizes = tables.defined() ? tables.const_data_ptr<int64_t>() : nullptr;
  walk.offsets = tables.defined() ? walk.batch_sizes + s.T : nullptr;
  walk.T = s.T;
  walk.reverse = reverse;
  return walk;
}

// Op: how W_hh is multiplied, as for ForwardLoop (step_loops.cuh): the cell's own type on the CUDA
// cores, a half type or Tf32 (the cell in float) on the tensor cores.
template <typename Cell, typename Op = typename Cell::scalar_t>
struct PersistentForwardLoop {
  using T = typename Cell::scalar_t;
  using W = typename StoredWeight<Op, T>::type;
  static constexpr bool kTensorCores = !std::is_same_v<Op, T>;
  static constexpr int kUnits = kTensorCores ? kMmaUnits : kPersistentUnits<Cell::kGates>;

  static void run(const LayerShape& s, bool reverse, const Tensor& gx, const Tensor& w_hh, const Tensor& b_hn,
                  const Variants& variants, Tensor& y, Tensor& h, Tensor& c, Tensor& saved) {
    const int64_t H = s.H, P = s.P;
    const DroppedProducts<T> dropped = DroppedProducts<T>::of(s, h, variants);
    const Tensor w_tiles = gate_interleaved(w_hh, s.gates, H, P, kUnits);  // in W_hh's type: the operand's
    const Tensor tables = device_step_tables(s, gx.device());
    PersistentArgs<T, W> a;
    a.w_tiles = static_cast<const W*>(w_tiles.const_data_ptr());
    a.gx = gx.const_data_ptr<T>();
    a.b_hn = b_hn.defined() ? b_hn.const_data_ptr<T>() : nullptr;
    a.h0 = h.const_data_ptr<T>();  // h holds h_0 until copy_final_state, after the kernel
    a.y = y.data_ptr<T>();
    a.c = c.defined() ? c.data_ptr<T>() : nullptr;
    a.saved = saved.defined() ? saved.data_ptr<T>() : nullptr;
    a.peephole = variants.peephole.defined() ? variants.peephole.const_data_ptr<T>() : nullptr;
    a.zoneout = s.zoneout;
    a.zoneout_masks = variants.zoneout_masks.defined() ? variants.zoneout_masks.const_data_ptr<T>() : nullptr;
    a.dropout_masks = s.recurrent_dropout ? variants.recurrent_masks.const_data_ptr<T>() : nullptr;
    a.product_rows = s.recurrent_dropout ? dropped.rows.template data_ptr<T>() : nullptr;
    a.product_h0 = s.recurrent_dropout ? dropped.h0.template const_data_ptr<T>() : nullptr;
    a.N = s.N;
    a.K = saved.defined() ? s.saved_cols() : 0;
    a.H = H;
    a.P = P;
    a.walk = persistent_steps(s, reverse, tables);
    const dim3 grid(static_cast<unsigned>(persistent_blocks(H, kUnits)));
    if constexpr (kTensorCores) {
      device::launch_cooperative(&persistent_tensor_core_kernel<Cell, Op>, grid, dim3(32 * Cell::kGates),
                         PersistentMmaLayout<Op, Cell::kGates>::shared_bytes(P), a);
    } else {
      device::launch_cooperative(&persistent_forward_kernel<Cell>, grid, dim3(kTileUnits, kWarps),
                         persistent_shared_bytes<T>(P), a);
    }
    copy_final_state(s, reverse, y, h);
  }
};

// float32 and float64 forward: the persistent kernel where the plan says (persistent_forward_wanted),
// else a launch per step.
template <typename Cell>
struct CudaCoreForwardLoop {
  static void run(const LayerShape& s, bool reverse, const Tensor& gx, const Tensor& w_hh, const Tensor& b_hn,
                  const Tensor& w_hr, const Variants& variants, Tensor& y, Tensor& h, Tensor& c, Tensor& saved,
                  bool persistent) {
    if (persistent) {
      PersistentForwardLoop<Cell>::run(s, reverse, gx, w_hh, b_hn, variants, y, h, c, saved);
    } else {
      StepForwardLoop<Cell>::run(s, reverse, gx, w_hh, b_hn, w_hr, variants, y, h, c, saved);
    }
  }
};

// float16 and bfloat16 W_hh, and float32 as TF32, on the tensor cores: the persistent kernel where
// the plan says (persistent_tensor_core_wanted), else a launch per step.
template <typename Cell, typename Op>
struct TensorCoreForwardLoop {
  static void run(const LayerShape& s, bool reverse, const Tensor& gx, const Tensor& w_hh, const Tensor& b_hn,
                  const Tensor& w_hr, const Variants& variants, Tensor& y, Tensor& h, Tensor& c, Tensor& saved,
                  bool persistent) {
    if (persistent) {
      PersistentForwardLoop<Cell, Op>::run(s, reverse, gx, w_hh, b_hn, variants, y, h, c, saved);
    } else {
      ForwardLoop<Cell, Op>::run(s, reverse, gx, w_hh, b_hn, w_hr, variants, y, h, c, saved);
    }
  }
};
template <typename Cell>
using HalfTensorCoreForwardLoop = TensorCoreForwardLoop<Cell, __half>;
template <typename Cell>
using BFloat16TensorCoreForwardLoop = TensorCoreForwardLoop<Cell, __nv_bfloat16>;
template <typename Cell>
using Tf32TensorCoreForwardLoop = TensorCoreForwardLoop<Cell, Tf32>;

template <typename Cell>
struct PersistentBackwardLoop {
  using T = typename Cell::scalar_t;

  static void run(const LayerShape& s, bool reverse, const Tensor& w_hh_conj, const Variants& variants,
                  const Tensor& outputs, const Tensor& h0, const Tensor& c0, const Tensor& saved, const Tensor& dy,
                  Tensor& dh, Tensor& dc, Tensor& dgx, Tensor& dgh) {
    constexpr int G = Cell::kGates;
    const Tensor w_columns = persistent_backward_columns(w_hh_conj, G, s.H, kPersistentUnits<G>, kPersistentSubs<G>);
    const Tensor tables = device_step_tables(s, saved.device());
    PersistentBackwardArgs<T> a;
    a.w_columns = w_columns.const_data_ptr<T>();
    a.dy = dy.defined() ? dy.const_data_ptr<T>() : nullptr;
    a.dh = dh.data_ptr<T>();
    a.dc = dc.defined() ? dc.data_ptr<T>() : nullptr;
    a.saved = saved.const_data_ptr<T>();
    a.outputs = outputs.const_data_ptr<T>();
    a.out_stride = outputs.stride(0);
    a.saved_c = saved.const_data_ptr<T>() + s.cell_state_col();
    a.h0 = h0.const_data_ptr<T>();
    a.c0 = c0.defined() ? c0.const_data_ptr<T>() : nullptr;
    a.dgx = dgx.data_ptr<T>();
    a.dgh = dgh.data_ptr<T>();
    a.peephole = variants.peephole.defined() ? variants.peephole.const_data_ptr<T>() : nullptr;
    a.zoneout = s.zoneout;
    a.zoneout_masks = variants.zoneout_masks.defined() ? variants.zoneout_masks.const_data_ptr<T>() : nullptr;
    a.dropout_masks = s.recurrent_dropout ? variants.recurrent_masks.const_data_ptr<T>() : nullptr;
    a.N = s.N;
    a.K = s.saved_cols();
    a.H = s.H;
    a.P = s.P;
    a.walk = persistent_steps(s, reverse, tables);
    device::launch_cooperative(&persistent_backward_kernel<Cell>,
                       dim3(static_cast<unsigned>(persistent_blocks(s.H, kPersistentUnits<G>))),
                       dim3(kTileUnits, kWarps),
                       persistent_backward_shared_bytes<T>(s.gates * s.H, kPersistentSubs<G>), a);
  }
};

// float32 and float64 backward (the half types reach it as float32): the persistent kernel where
// the plan says (the fused backward and persistent_backward_wanted), else BackwardLoop's launches
// per step.
template <typename Cell>
struct CudaCoreBackwardLoop {
  static void run(const LayerShape& s, bool reverse, const Tensor& w_hh_conj, const Tensor& w_hr_conj,
                  const Variants& variants, const Tensor& outputs, const Tensor& h0, const Tensor& c0,
                  const Tensor& saved, const Tensor& dy, Tensor& dh, Tensor& dc, Tensor& dgx, Tensor& dgh,
                  Tensor& dh_total, bool fuse, bool persistent) {
    if (persistent) {
      PersistentBackwardLoop<Cell>::run(s, reverse, w_hh_conj, variants, outputs, h0, c0, saved, dy, dh, dc, dgx,
                                        dgh);
    } else {
      BackwardLoop<Cell>::run(s, reverse, w_hh_conj, w_hr_conj, variants, outputs, h0, c0, saved, dy, dh, dc, dgx,
                              dgh, dh_total, fuse);
    }
  }
};

}  // namespace
}  // namespace fused_rnn
