// The step loops on CUDA: the same two functions as csrc/cpu/layer_cpu.cpp, with the same buffers
// and packed-sequence semantics (step t works on rows [offsets[t], offsets[t] + batch_sizes[t]) of
// x / y / saved and on the first batch_sizes[t] rows of the state; reverse walks t downwards).
//
// Forward: one kernel launch per step fuses the recurrent product h_{t-1}·W_hhᵀ with the gate math.
// A block owns a tile of kTileUnits hidden units and a tile of batch rows; it computes all G gate
// pre-activations of its units for its rows (h_{t-1} and W_hh tiles staged in shared memory, a fixed
// k order, no atomics), then each thread runs the cell from cells.h on its (row, unit) pairs.
// Backward: per step one kernel runs the cell backward over (row, unit), then dh_{t-1} = dG_h·W_hh
// through cuBLAS (at::mm_out / at::addmm_out), exactly as the CPU loop.
//
// Every output element is written by exactly one thread and every sum runs in a fixed order, so
// results are bitwise reproducible run to run.
//
// Dtypes: float and double. Half/BFloat16 reach this file as float32 (layer.cpp upcasts); complex is
// rejected in layer.cpp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <limits>

#include "../layer.h"

namespace fused_rnn {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------------------
// Forward: fused recurrent GEMM + cell, one launch per step.
//
// Block: dim3(kTileUnits, kWarps) threads. threadIdx.x = unit within the tile (one warp spans the
// tile's 32 units, so gate loads from shared memory are conflict-free and global writes coalesce);
// threadIdx.y = warp, which owns kRows consecutive batch rows (kRows accumulators per gate per thread).
// Grid: dim3(ceil(n / (kWarps*kRows)), ceil(H / kTileUnits)): x over row tiles, y over unit tiles.
// Shared memory per block (static): w_s[kTileK][G*kTileUnits + 1] and h_s[kWarps*kRows][kTileK].
//   float, LSTM, kRows=4: 16.5 KB + 2 KB; double: 33 KB + 4 KB (under the 48 KB static limit).
// ---------------------------------------------------------------------------------------------
constexpr int kTileUnits = 32;  // hidden units per block (= warp size)
constexpr int kWarps = 4;       // warps per block
constexpr int kThreads = kTileUnits * kWarps;
constexpr int kTileK = 32;      // reduction chunk staged in shared memory per iteration

template <typename T>
struct ForwardArgs {
  const T* w_hh;    // [G*H, P], torch.nn layout
  const T* h;       // state h_{t-1}, [B, P] (rows [0, n) are this step's)
  const T* gx;      // this step's first row of gx, rows of G*H
  const T* b_hn;    // GRU: [H] or null
  T* gh;            // scratch [B, G*H]: each thread stores its gate sums here and reads them back
  T* c;             // LSTM: [B, H] in place, else null
  T* out;           // where the cell writes h_t for row 0 of the step (y, saved proj column, scratch)
  int64_t out_stride;
  T* saved;         // this step's first row of saved, or null
  int64_t saved_stride;
  int64_t n, H, P, hprev_col;
};

template <typename Cell, int kRows>
__global__ void __launch_bounds__(kThreads) forward_step_kernel(const ForwardArgs<typename Cell::scalar_t> a) {
  using T = typename Cell::scalar_t;
  constexpr int G = Cell::kGates;
  constexpr int kTileRows = kWarps * kRows;
  constexpr int kWCols = G * kTileUnits;  // tile row r = g * kTileUnits + unit

  // +1 column: the transposing stores below (consecutive threads walk k) hit distinct banks.
  __shared__ T w_s[kTileK][kWCols + 1];
  __shared__ T h_s[kTileRows][kTileK];

  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * kTileUnits + tx;
  const int64_t H = a.H, P = a.P, n = a.n, GH = G * H;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int64_t unit0 = static_cast<int64_t>(blockIdx.y) * kTileUnits;

  T acc[kRows][G];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int g = 0; g < G; ++g) acc[r][g] = T(0);
  }

  for (int64_t k0 = 0; k0 < P; k0 += kTileK) {
    // W_hh tile: rows g*H + unit0 + u for every gate g, columns [k0, k0 + kTileK); global reads run
    // along k (coalesced), the shared copy is transposed so that the inner loop reads along units.
    for (int e = tid; e < kWCols * kTileK; e += kThreads) {
      const int r = e / kTileK, kk = e % kTileK;
      const int g = r / kTileUnits, u = r % kTileUnits;
      const int64_t j = unit0 + u, k = k0 + kk;
      w_s[kk][r] = (j < H && k < P) ? a.w_hh[(static_cast<int64_t>(g) * H + j) * P + k] : T(0);
    }
    for (int e = tid; e < kTileRows * kTileK; e += kThreads) {
      const int rr = e / kTileK, kk = e % kTileK;
      const int64_t b = row0 + rr, k = k0 + kk;
      h_s[rr][kk] = (b < n && k < P) ? a.h[b * P + k] : T(0);
    }
    __syncthreads();
    // Padding beyond P is 0 in both tiles, so it adds exact zeros; the k order is fixed.
#pragma unroll 4
    for (int kk = 0; kk < kTileK; ++kk) {
      T w[G];
#pragma unroll
      for (int g = 0; g < G; ++g) w[g] = w_s[kk][g * kTileUnits + tx];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const T hv = h_s[ty * kRows + r][kk];  // the same address across the warp: a broadcast
#pragma unroll
        for (int g = 0; g < G; ++g) acc[r][g] += hv * w[g];
      }
    }
    __syncthreads();
  }

  // Epilogue: the cell math of cells.h on (row, unit). The gate sums go through this row's `gh`
  // scratch row, which the same thread reads back at once (io.gh[g*H + j]); no other thread touches
  // those elements, so no synchronisation is needed.
  const int64_t j = unit0 + tx;
  if (j >= H) return;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t b = row0 + ty * kRows + r;
    if (b >= n) break;
    T* gh_row = a.gh + b * GH;
#pragma unroll
    for (int g = 0; g < G; ++g) gh_row[g * H + j] = acc[r][g];
    T* saved_row = a.saved ? a.saved + b * a.saved_stride : nullptr;
    const T* h_row = a.h + b * P;
    if (saved_row) {  // h_{t-1}, before the state moves on (P <= H, but do not rely on it)
      for (int64_t p = j; p < P; p += H) saved_row[a.hprev_col + p] = h_row[p];
    }
    StepForward<T> io{a.gx + b * GH, gh_row, a.b_hn, h_row, a.c ? a.c + b * H : nullptr,
                      a.out + b * a.out_stride, saved_row};
    Cell::forward(io, H, j);
  }
}

template <typename Cell, int kRows>
void launch_forward_step(const ForwardArgs<typename Cell::scalar_t>& a, cudaStream_t stream) {
  constexpr int kTileRows = kWarps * kRows;
  const int64_t row_tiles = (a.n + kTileRows - 1) / kTileRows;
  const int64_t unit_tiles = (a.H + kTileUnits - 1) / kTileUnits;
  TORCH_CHECK(row_tiles <= std::numeric_limits<int>::max() && unit_tiles <= 65535,
              "fused_rnn: step too large for the CUDA kernel's grid (rows ", a.n, ", hidden ", a.H, ")");
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(unit_tiles));
  const dim3 block(kTileUnits, kWarps);
  forward_step_kernel<Cell, kRows><<<grid, block, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Cell>
struct ForwardLoop {
  using T = typename Cell::scalar_t;

  static void run(const LayerShape& s, bool reverse, const Tensor& gx, const Tensor& w_hh, const Tensor& b_hn,
                  const Tensor& w_hr, Tensor& y, Tensor& h, Tensor& c, Tensor& saved) {
    const int64_t H = s.H, P = s.P, GH = s.gates * H;
    const int64_t K = saved.defined() ? s.saved_cols() : 0;
    if (s.T == 0 || s.B == 0) return;
    Tensor gh = at::empty({s.B, GH}, gx.options());
    // The LSTM's o*tanh(c_t) before the projection: kept in `saved` when training, else here.
    Tensor proj_input = s.proj && !saved.defined() ? at::empty({s.B, H}, gx.options()) : Tensor();
    const Tensor w_hr_t = s.proj ? w_hr.t() : Tensor();
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;

    const T* gx_p = gx.data_ptr<T>();
    T* gh_p = gh.data_ptr<T>();
    const T* b_hn_p = b_hn.defined() ? b_hn.data_ptr<T>() : nullptr;
    const T* w_hh_p = w_hh.data_ptr<T>();
    T* y_p = y.data_ptr<T>();
    T* h_p = h.data_ptr<T>();
    T* c_p = c.defined() ? c.data_ptr<T>() : nullptr;
    T* saved_p = saved.defined() ? saved.data_ptr<T>() : nullptr;

    for (int64_t step = 0; step < s.T; ++step) {
      const int64_t t = reverse ? s.T - 1 - step : step;
      const int64_t n = s.batch_sizes[t], off = s.offsets[t];
      if (n == 0) continue;

      if (H > 0) {
        ForwardArgs<T> a;
        a.w_hh = w_hh_p;
        a.h = h_p;
        a.gx = gx_p + off * GH;
        a.b_hn = b_hn_p;
        a.gh = gh_p;
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
        a.n = n;
        a.H = H;
        a.P = P;
        a.hprev_col = s.hprev_col();
        // Four rows per thread reuse each W_hh element four times; fall back to one row per thread
        // when that would leave SMs idle (small batches).
        const int64_t unit_tiles = (H + kTileUnits - 1) / kTileUnits;
        const int64_t blocks_wide = unit_tiles * ((n + kWarps * 4 - 1) / (kWarps * 4));
        if (blocks_wide >= sms) {
          launch_forward_step<Cell, 4>(a, stream);
        } else {
          launch_forward_step<Cell, 1>(a, stream);
        }
      }

      Tensor y_rows = y.narrow(0, off, n);
      if (s.proj) {
        const Tensor r = saved_p ? saved.narrow(0, off, n).narrow(1, s.proj_input_col(), H)
                                 : proj_input.narrow(0, 0, n);
        at::mm_out(y_rows, r, w_hr_t);
      }
      // The state moves on only after the step's kernel has read all of h_{t-1} (stream order).
      h.narrow(0, 0, n).copy_(y_rows);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Backward: the cell backward over (row, unit), one thread per element (grid-stride), then cuBLAS.
// ---------------------------------------------------------------------------------------------
constexpr int kBackwardThreads = 256;

template <typename T>
struct BackwardArgs {
  const T* dy;       // this step's first row of dy ([P] rows), or null
  T* dh;             // gradient at h_t for row 0 (state dh, or d_proj_input with a projection)
  int64_t dh_stride;
  T* dc;             // LSTM: [B, H] in place, else null
  const T* saved;    // this step's first row of saved
  T* dgx;            // this step's first row of dgx
  T* dgh;            // this step's first row of dgh (the same as dgx except for GRU)
  int64_t n, H, P, K, hprev_col;
};

template <typename Cell>
__global__ void __launch_bounds__(kBackwardThreads) backward_step_kernel(const BackwardArgs<typename Cell::scalar_t> a) {
  using T = typename Cell::scalar_t;
  const int64_t H = a.H, GH = Cell::kGates * H;
  const int64_t total = a.n * H;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t b = idx / H, j = idx % H;
    const T* saved_row = a.saved + b * a.K;
    StepBackward<T> io{a.dy ? a.dy + b * a.P : nullptr, a.dh + b * a.dh_stride, a.dc ? a.dc + b * H : nullptr,
                       saved_row, saved_row + a.hprev_col, a.dgx + b * GH, a.dgh + b * GH};
    Cell::backward(io, H, j);
  }
}

template <typename Cell>
struct BackwardLoop {
  using T = typename Cell::scalar_t;

  static void run(const LayerShape& s, bool reverse, const Tensor& w_hh_conj, const Tensor& w_hr_conj,
                  const Tensor& saved, const Tensor& dy, Tensor& dh, Tensor& dc, Tensor& dgx, Tensor& dgh,
                  Tensor& dh_total) {
    const int64_t H = s.H, P = s.P, GH = s.gates * H, K = s.saved_cols();
    if (s.T == 0 || s.B == 0) return;
    Tensor d_proj_input = s.proj ? at::empty({s.B, H}, dh.options()) : Tensor();
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;

    const T* saved_p = saved.data_ptr<T>();
    const T* dy_p = dy.defined() ? dy.data_ptr<T>() : nullptr;
    T* dh_p = dh.data_ptr<T>();
    T* dc_p = dc.defined() ? dc.data_ptr<T>() : nullptr;
    T* dgx_p = dgx.data_ptr<T>();
    T* dgh_p = dgh.data_ptr<T>();

    for (int64_t step = 0; step < s.T; ++step) {
      const int64_t t = reverse ? step : s.T - 1 - step;  // forward's order, backwards
      const int64_t n = s.batch_sizes[t], off = s.offsets[t];
      if (n == 0) continue;
      Tensor dh_rows = dh.narrow(0, 0, n);

      // With a projection, the gradient at h_t is mapped back through W_hr first.
      const T* step_dy = dy_p ? dy_p + off * P : nullptr;
      T* cell_dh = dh_p;
      int64_t cell_dh_stride = P;
      if (s.proj) {
        Tensor total = dh_total.narrow(0, off, n);
        if (dy.defined()) {
          at::add_out(total, dh_rows, dy.narrow(0, off, n));
        } else {
          total.copy_(dh_rows);
        }
        Tensor d_proj_rows = d_proj_input.narrow(0, 0, n);
        at::mm_out(d_proj_rows, total, w_hr_conj);
        step_dy = nullptr;
        cell_dh = d_proj_input.data_ptr<T>();
        cell_dh_stride = H;
      }

      if (H > 0) {
        BackwardArgs<T> a;
        a.dy = step_dy;
        a.dh = cell_dh;
        a.dh_stride = cell_dh_stride;
        a.dc = dc_p;
        a.saved = saved_p + off * K;
        a.dgx = dgx_p + off * GH;
        a.dgh = dgh_p + off * GH;
        a.n = n;
        a.H = H;
        a.P = P;
        a.K = K;
        a.hprev_col = s.hprev_col();
        const int64_t total = n * H;
        const int64_t blocks = std::min<int64_t>((total + kBackwardThreads - 1) / kBackwardThreads,
                                                 static_cast<int64_t>(sms) * 32);
        backward_step_kernel<Cell><<<static_cast<unsigned>(blocks), kBackwardThreads, 0, stream>>>(a);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }

      // dL/dh_{t-1} += dG_h · W_hh (GRU already wrote its direct z-path into dh).
      const Tensor dg_rows = dgh.narrow(0, off, n);
      if (Cell::kSeparateRecurrentGrad) {
        at::addmm_out(dh_rows, dh_rows, dg_rows, w_hh_conj);
      } else {
        at::mm_out(dh_rows, dg_rows, w_hh_conj);
      }
    }
  }
};

}  // namespace

void forward_loop_cuda(const LayerShape& s, bool reverse, const Tensor& gx, const Tensor& w_hh, const Tensor& b_hn,
                       const Tensor& w_hr, Tensor& y, Tensor& h, Tensor& c, Tensor& saved) {
  TORCH_CHECK(gx.is_cuda(), "fused_rnn: forward_loop_cuda needs CUDA tensors");
  TORCH_CHECK(!gx.is_complex(), "fused_rnn: complex inputs are not supported on CUDA");
  const c10::cuda::CUDAGuard guard(gx.device());
  AT_DISPATCH_FLOATING_TYPES(gx.scalar_type(), "fused_rnn_forward_cuda", [&] {
    dispatch_cell<ForwardLoop, scalar_t>(s.cell, s, reverse, gx, w_hh, b_hn, w_hr, y, h, c, saved);
  });
}

void backward_loop_cuda(const LayerShape& s, bool reverse, const Tensor& w_hh_conj, const Tensor& w_hr_conj,
                        const Tensor& saved, const Tensor& dy, Tensor& dh, Tensor& dc, Tensor& dgx, Tensor& dgh,
                        Tensor& dh_total) {
  TORCH_CHECK(saved.is_cuda(), "fused_rnn: backward_loop_cuda needs CUDA tensors");
  TORCH_CHECK(!saved.is_complex(), "fused_rnn: complex inputs are not supported on CUDA");
  const c10::cuda::CUDAGuard guard(saved.device());
  AT_DISPATCH_FLOATING_TYPES(saved.scalar_type(), "fused_rnn_backward_cuda", [&] {
    dispatch_cell<BackwardLoop, scalar_t>(s.cell, s, reverse, w_hh_conj, w_hr_conj, saved, dy, dh, dc, dgx, dgh,
                                          dh_total);
  });
}

}  // namespace fused_rnn
