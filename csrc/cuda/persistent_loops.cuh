// The persistent forward: the whole sequence of one layer and direction in one cooperative launch,
// with each block's slice of W_hh held in shared memory for all T steps (step_loops.cuh reloads it
// from L2 at every step, and pays a launch per step).
//
// Block k owns hidden units [k*U, (k+1)*U), U = kTileUnits / G (LSTM 8, GRU 10, RNN 32), so that its
// G*U gate columns fit one warp's 32 lanes: W_hh's slice [P][G*U] (gate_interleaved with U units a
// tile) is copied to shared memory once, padded to 32 columns and to whole 32-row k chunks with
// zeros. Per step, every block reads all of h_{t-1} (the step before's rows of y, or h_0:
// StateRows, as the per-step kernels do), 4 rows at a time: it stages them in shared memory whole,
// multiplies them with the resident slice, each warp over a quarter of k, and hands the sums
// through shared memory to the threads that run the cell (csrc/cells.h) on its (row, unit) pairs,
// which write h_t into y (and `saved`, and LSTM's c in place). Then the grid
// waits at a grid-wide barrier before the next step, so that no block reads h_t before every block
// has written its units of it (cooperative groups' grid.sync(), which also makes those writes
// visible). Every sum runs in a fixed k order and every output has one writer: bitwise repeatable.
//
// All blocks must be resident at once: the loop launches cooperatively and only where
// persistent_fits() says they are (the occupancy of this kernel with its shared memory, times the
// SMs); the choice between this and the per-step kernels is persistent_wanted(), the one place
// that makes it. Without a projection (its product between steps would need a second grid-wide
// pass), float32 and float64 on the CUDA cores.
//
// The includer provides, besides step_loops.cuh's names, the device functions
// dynamic_shared_memory() (the block's extern __shared__ bytes) and grid_sync() (a barrier over
// the whole grid) before it includes this file, and defines launch_cooperative(),
// cooperative_capacity() (how many blocks of a kernel with this much dynamic shared memory can be
// resident at once) and capturing_a_graph(), declared below.
#pragma once

#include <cstdlib>
#include <string>

#include "step_loops.cuh"

namespace fused_rnn {
namespace {

template <typename Args>
void launch_cooperative(void (*kernel)(Args), dim3 grid, dim3 block, size_t shared_bytes, const Args& args);
bool capturing_a_graph();  // whether the current stream is being captured into a CUDA graph
template <typename Args>
int64_t cooperative_capacity(void (*kernel)(Args), dim3 block, size_t shared_bytes);

template <int G>
constexpr int kPersistentUnits = kTileUnits / G;  // units per block: G*U gate columns in one warp
constexpr int kPersistentRows = 4;     // batch rows of a pass, which every warp multiplies
constexpr int kPersistentInFlight = 16;  // h loads a thread issues before it stores them

template <typename T>
struct PersistentArgs {
  const T* w_tiles;            // W_hh gate_interleaved with kPersistentUnits units a tile
  const T* gx;                 // [N, G*H], the whole sequence
  const T* b_hn;               // GRU: [H] or null
  const T* h0;                 // [B, P]
  T* y;                        // [N, P]: h_t of every row (no projection: P = H)
  T* c;                        // LSTM: [B, H] in place, else null
  T* saved;                    // [N, K] or null
  int64_t K;
  int64_t rows_all;            // a padded sequence: every step's rows (the tables are not read), else 0
  const int64_t* batch_sizes;  // packed: on the device, [T]
  const int64_t* offsets;      // packed: on the device, [T]
  int64_t steps, H, P;         // steps = T
  bool reverse;

  // The step table, as predecessor() (layer.h) reads it.
  __device__ __forceinline__ int64_t rows(int64_t t) const { return rows_all ? rows_all : batch_sizes[t]; }
  __device__ __forceinline__ int64_t first_row(int64_t t) const { return rows_all ? t * rows_all : offsets[t]; }
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
template <typename Cell>
__global__ void __launch_bounds__(kThreads) persistent_forward_kernel(const PersistentArgs<typename Cell::scalar_t> a) {
  using T = typename Cell::scalar_t;
  constexpr int G = Cell::kGates, U = kPersistentUnits<G>, kCols = G * U, R = kPersistentRows;
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kTileUnits + tx;
  const int64_t P = a.P, H = a.H, GH = G * H, Pk = persistent_k(P);
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

  for (int64_t step = 0; step < a.steps; ++step) {
    const int64_t t = a.reverse ? a.steps - 1 - step : step;
    const int64_t n = a.rows(t), off = a.first_row(t);
    ForwardArgs<T, T> cell;  // what finish_unit needs of this step
    cell.h_prev = StateRows<T>{predecessor(a, a.steps, a.reverse, t), a.y, a.h0, P};
    cell.gx = a.gx + off * GH;
    cell.b_hn = a.b_hn;
    cell.c = a.c;
    cell.out = a.y + off * P;
    cell.out_stride = P;
    cell.saved = a.saved ? a.saved + off * a.K : nullptr;
    cell.saved_stride = a.K;
    cell.n = n;
    cell.H = H;
    cell.P = P;

    for (int64_t row0 = 0; row0 < n; row0 += R) {  // the same for the whole block
      stage_rows_grouped<R, kPersistentInFlight, kThreads>(h_s, static_cast<int>(Pk), cell.h_prev, row0, n, 0,
                                                          static_cast<int>(Pk), P, tid,
                                                          [](T v) { return v; });
      __syncthreads();
      T acc[R] = {};
#pragma unroll 4
      for (int64_t k = k_begin; k < k_end; ++k) {
        const T w = w_s[k * kTileUnits + tx];
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r] += h_s[r * Pk + k] * w;  // the same address across the warp
      }
#pragma unroll
      for (int r = 0; r < R; ++r) part_s[(ty * R + r) * kTileUnits + tx] = acc[r];
      __syncthreads();
      for (int e = tid; e < R * U; e += kThreads) {  // the cell on (row, unit) pairs
        const int r = e / U, u = e % U;
        const int64_t b = row0 + r, j = static_cast<int64_t>(blockIdx.x) * U + u;
        if (b >= n || j >= H) continue;
        T sum[G];
#pragma unroll
        for (int g = 0; g < G; ++g) {
          const int col = g * U + u;
          T total = part_s[r * kTileUnits + col];
#pragma unroll
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

// FUSED_RNN_CUDA_PERSISTENT: "1" takes the persistent forward wherever it can run, "0" never;
// unset, the rule below. Read per call, for A/B runs.
int persistent_override() {
  const char* value = std::getenv("FUSED_RNN_CUDA_PERSISTENT");
  if (value == nullptr || std::string(value).empty()) return -1;
  return std::string(value) == "0" ? 0 : 1;
}

// Every step has all B rows (a padded sequence).
inline bool all_steps_full(const LayerShape& s) {
  return std::all_of(s.batch_sizes.begin(), s.batch_sizes.end(), [&](int64_t n) { return n == s.B; });
}

template <typename Cell>
int64_t persistent_blocks(int64_t H) {
  return (H + kPersistentUnits<Cell::kGates> - 1) / kPersistentUnits<Cell::kGates>;
}

// Whether the persistent forward runs this layer. It can where there is no projection and every
// block of the grid fits on the GPU at once (cooperative_capacity, with the block's shared memory,
// 144 bytes a k in float32: on an H100's 132 SMs and 227 KB a block, LSTM up to H = 1024, where 128
// blocks hold 146 KB each; GRU up to 1320 by the grid; RNN up to about 1600 by the shared memory;
// float64 about half those P). It is wanted (by default) while the batch is at most 8: a step is
// then one or two passes of 4 rows (an L2 round trip for h, a quarter of P per warp) and a grid
// barrier of about 1.5 µs, 2.5-4 µs by the model of bench/GPU_NOTES.md, against the per-step
// kernels' 16 L2 round trips and a launch (about 5 µs); beyond, the passes add up, and the per-step
// kernels spread the rows over more SMs.
template <typename Cell>
bool persistent_wanted(const LayerShape& s) {
  const int override_choice = persistent_override();
  if (override_choice == 0 || s.proj || s.H == 0 || s.T == 0 || s.B == 0) return false;
  if (!all_steps_full(s) && capturing_a_graph()) return false;  // its step tables' copy cannot be captured
  const size_t shared = persistent_shared_bytes<typename Cell::scalar_t>(s.P);
  const bool fits =
      persistent_blocks<Cell>(s.H) <= cooperative_capacity(&persistent_forward_kernel<Cell>, dim3(kTileUnits, kWarps), shared);
  return fits && (override_choice == 1 || s.B <= 8);
}

template <typename Cell>
struct PersistentForwardLoop {
  using T = typename Cell::scalar_t;

  static void run(const LayerShape& s, bool reverse, const Tensor& gx, const Tensor& w_hh, const Tensor& b_hn,
                  Tensor& y, Tensor& h, Tensor& c, Tensor& saved) {
    const int64_t H = s.H, P = s.P;
    const Tensor w_tiles = gate_interleaved(w_hh, s.gates, H, P, kPersistentUnits<Cell::kGates>);
    const bool padded = all_steps_full(s);
    Tensor steps;  // a packed sequence's tables, copied to the device (not while capturing a graph)
    if (!padded) {
      steps = at::empty({2, s.T}, at::TensorOptions().dtype(at::kLong));
      std::copy(s.batch_sizes.begin(), s.batch_sizes.end(), steps.data_ptr<int64_t>());
      std::copy(s.offsets.begin(), s.offsets.end(), steps.data_ptr<int64_t>() + s.T);
      steps = steps.to(gx.device());
    }
    PersistentArgs<T> a;
    a.w_tiles = w_tiles.const_data_ptr<T>();
    a.gx = gx.const_data_ptr<T>();
    a.b_hn = b_hn.defined() ? b_hn.const_data_ptr<T>() : nullptr;
    a.h0 = h.const_data_ptr<T>();  // h holds h_0 until copy_final_state, after the kernel
    a.y = y.data_ptr<T>();
    a.c = c.defined() ? c.data_ptr<T>() : nullptr;
    a.saved = saved.defined() ? saved.data_ptr<T>() : nullptr;
    a.K = saved.defined() ? s.saved_cols() : 0;
    a.rows_all = padded ? s.B : 0;
    a.batch_sizes = padded ? nullptr : steps.const_data_ptr<int64_t>();
    a.offsets = padded ? nullptr : a.batch_sizes + s.T;
    a.steps = s.T;
    a.H = H;
    a.P = P;
    a.reverse = reverse;
    launch_cooperative(&persistent_forward_kernel<Cell>, dim3(static_cast<unsigned>(persistent_blocks<Cell>(H))),
                       dim3(kTileUnits, kWarps), persistent_shared_bytes<T>(P), a);
    copy_final_state(s, reverse, y, h);
  }
};

// float32 and float64 forward: the persistent kernel where persistent_wanted says, else a launch
// per step.
template <typename Cell>
struct CudaCoreForwardLoop {
  static void run(const LayerShape& s, bool reverse, const Tensor& gx, const Tensor& w_hh, const Tensor& b_hn,
                  const Tensor& w_hr, Tensor& y, Tensor& h, Tensor& c, Tensor& saved) {
    if (persistent_wanted<Cell>(s)) {
      PersistentForwardLoop<Cell>::run(s, reverse, gx, w_hh, b_hn, y, h, c, saved);
    } else {
      StepForwardLoop<Cell>::run(s, reverse, gx, w_hh, b_hn, w_hr, y, h, c, saved);
    }
  }
};

}  // namespace
}  // namespace fused_rnn
