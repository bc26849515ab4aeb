// One layer, one direction of a recurrent network over a whole (possibly packed) sequence.
//
// Every sequence is handled in packed layout: `x` is [N, I] and `batch_sizes[t]` rows of it belong
// to step t, so step t works on rows [offset_t, offset_t + batch_sizes[t]) and on the first
// batch_sizes[t] rows of the state. A padded [T, B, I] input is the special case batch_sizes = B
// everywhere. The reverse direction walks t downwards, so a sequence starts at its own last step.
//
// This header is what the device-independent op code (layer.cpp) needs from the device loops.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "cells.h"

namespace fused_rnn {

struct LayerShape {
  CellKind cell;
  int64_t N;       // rows of x (sum of batch_sizes)
  int64_t T;       // steps
  int64_t B;       // batch (batch_sizes[0])
  int64_t I;       // input features
  int64_t H;       // hidden units
  int64_t P;       // output features: proj_size, or H without projection
  int64_t gates;   // G: gate blocks in W_ih / W_hh
  int64_t saved_per_unit;  // the cell's kSaved
  bool proj;       // LSTM with proj_size
  bool outputs_in_saved;  // half types: a float32 copy of y is kept in `saved` (y itself is rounded)
  std::vector<int64_t> batch_sizes;
  std::vector<int64_t> offsets;  // first row of each step
  int64_t rows(int64_t t) const { return batch_sizes[t]; }
  int64_t first_row(int64_t t) const { return offsets[t]; }

  // Columns of the [N, saved_cols] tensor that forward keeps for backward:
  // [cell's saved values (kSaved*H) | LSTM with projection: o*tanh(c_t) (H) | half types: y (P)].
  // h_{t-1} is not among them: it is the step before's output (or h_0), which backward reads there.
  int64_t proj_input_col() const { return saved_per_unit * H; }
  int64_t outputs_col() const { return saved_per_unit * H + (proj ? H : 0); }
  int64_t saved_cols() const { return outputs_col() + (outputs_in_saved ? P : 0); }
  int64_t cell_state_col() const { return LSTMCell<float>::kCellStateSlot * H; }  // LSTM's c_t
};

// Where a step's h_{t-1} and c_{t-1} come from: its rows [0, carried) continue the sequences of
// the step before in the walk, whose rows start at row `first`; rows [carried, n) start from h_0
// and c_0 (the first step; in the reverse direction of a packed sequence, the rows whose sequences
// begin at this step).
struct Predecessor {
  int64_t carried, first;

  // Where row b of the step finds h_{t-1} (or c_{t-1}): row first + b of `before` (the outputs, or
  // LSTM's saved c_t; row stride before_ld), or row b of `initial` (h_0 or c_0). The one place
  // that says so, for the CPU loops and the CUDA kernels alike.
  template <typename T>
  C10_HOST_DEVICE const T* row(int64_t b, const T* before, int64_t before_ld, const T* initial,
                               int64_t initial_ld) const {
    return b < carried ? before + (first + b) * before_ld : initial + b * initial_ld;
  }
};
// Of step t of T, from a table of steps: anything with rows(t) (batch_sizes[t]) and first_row(t)
// (offsets[t]): LayerShape on the host, PersistentSteps (persistent_loops.cuh) on the device.
template <typename Steps>
C10_HOST_DEVICE Predecessor predecessor(const Steps& steps, int64_t T, bool reverse, int64_t t) {
  const int64_t before = reverse ? t + 1 : t - 1;
  if (before < 0 || before >= T) return {0, 0};
  const int64_t n = steps.rows(t), n_before = steps.rows(before);
  return {n < n_before ? n : n_before, steps.first_row(before)};
}
inline Predecessor predecessor(const LayerShape& s, bool reverse, int64_t t) { return predecessor(s, s.T, reverse, t); }

// Where h_n lies: rows [row, row + rows) of the final state are rows [source, source + rows) of
// the outputs, their sequences' last step in the walk (the rows of step t that the next step in
// the walk no longer has; every row at the walk's last step). One run for a padded sequence; for
// a packed one, one per step where the batch shrinks (forward direction).
struct FinalRun {
  int64_t row, rows, source;
};
inline std::vector<FinalRun> final_runs(const LayerShape& s, bool reverse) {
  std::vector<FinalRun> runs;
  for (int64_t step = 0; step < s.T; ++step) {
    const int64_t t = reverse ? s.T - 1 - step : step;
    const int64_t n = s.batch_sizes[t];
    const int64_t next = step + 1 < s.T ? s.batch_sizes[reverse ? t - 1 : t + 1] : 0;
    if (next < n) runs.push_back({next, n - next, s.offsets[t] + next});
  }
  return runs;
}

// Rows whose h_{t-1} lie in one block: rows [row, row + rows) of the packed sequence take theirs
// from rows [source, source + rows) of the outputs, or of h_0 when from_h0. previous_runs() lists
// them in the order of the rows, each as long as it can be: a padded sequence is two runs (its
// first step's rows from h_0, the others from the outputs one step away); a packed one breaks
// where the batch size changes. They depend on the shape alone, so sums over them are reproducible.
struct PreviousRun {
  int64_t row, rows, source;
  bool from_h0;
};
std::vector<PreviousRun> previous_runs(const LayerShape& s, bool reverse);

// at::empty, for the large per-call tensors (outputs, saved values, chunk buffers, input
// gradients). On the CPU their memory comes from a cache of freed blocks, which spares each call
// the page faults of fresh memory (csrc/cpu/block_cache.cpp).
at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options);
// The bytes of free blocks the cache holds, and giving them all back (fused_rnn.empty_cache()).
size_t cpu_cache_bytes();
void empty_cpu_cache();
// Which kernel the CPU's float32 matrix products take: "AVX-512" (csrc/cpu/wide_float.h) or
// "AVX2" (block_product and BLAS; also where FUSED_RNN_FLOAT_KERNEL=avx2 asks for it).
const char* cpu_float_kernel();
// What the float32 forward's x·W_ihᵀ takes (batches of two and more): "AMX" (csrc/cpu/amx_float.h,
// on a CPU with AMX-BF16 unless FUSED_RNN_FLOAT_KERNEL=avx512 or avx2; then also the backward's
// dX, and the steps' products of batches from 16 rows), "tiles" (wide_float.h) or "BLAS" (with
// the AVX2 kernel).
const char* cpu_input_projection();
// What the float32 backward's weight gradients (dW) take with the AVX-512 kernel: "tiles"
// (wide_float.h) or "BLAS" (on Intel, or where FUSED_RNN_CHUNK_GEMM=blas asks for it). dX takes
// the tiles with AVX-512 either way.
const char* cpu_gradient_gemm();

// Fills in the steps of s (T, B, batch_sizes, offsets) from batch_sizes, checked against s.N; an
// empty batch_sizes is a padded input whose steps all have padded_batch rows (h0's).
void describe_steps(LayerShape& s, at::IntArrayRef batch_sizes, int64_t padded_batch);

// Validates the op's arguments (shapes, dtypes, devices, batch_sizes) and describes the layer.
LayerShape describe_layer(int64_t cell, const at::Tensor& x, at::IntArrayRef batch_sizes,
                          const at::Tensor& h0, const c10::optional<at::Tensor>& c0,
                          const at::Tensor& w_ih, const at::Tensor& w_hh,
                          const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
                          const c10::optional<at::Tensor>& w_hr);

// The step loops, one per device. All tensors are contiguous except the documented views.
//   gx     [N, G*H]  x·W_ihᵀ plus the folded biases (CUDA); the CPU loop computes it a chunk of
//                    steps at a time from x [N, I], w_ih [G*H, I] and the folded bias [G*H] (or
//                    undefined)
//   b_hn   [H]       GRU's n-gate hidden bias, or undefined
//   y      [N, P]    output, written
//   h, c   [B, P], [B, H]  state: initial in, final out (c undefined unless LSTM)
//   saved  [N, saved_cols] written when defined (a gradient is wanted)
void forward_loop_cpu(const LayerShape& s, bool reverse, const at::Tensor& x, const at::Tensor& w_ih,
                      const at::Tensor& bias, const at::Tensor& w_hh, const at::Tensor& b_hn,
                      const at::Tensor& w_hr, at::Tensor& y, at::Tensor& h, at::Tensor& c, at::Tensor& saved);

// One int8 weight matrix of the quantized inference path, w [G*H, K] with a scale per row
// (w ≈ scale[r] · q[r, k]): q laid out in panels by pack_int8_panels, the scales, and the row
// sums of q (int32), which take the activations' zero point back out of the integer products.
struct QuantizedMatrix {
  at::Tensor panels, scale, row_sum;
};

// q [G*H, K] int8 -> panels [G·⌈H/16⌉, ⌈K/4⌉, 64] int8: each gate's rows in groups of 16 and k in
// quads, panels[i][j][4r + t] = q[g·H + 16m + r][4j + t] for group i = g·⌈H/16⌉ + m, zero past H
// or K (quantized_cpu.cpp says why).
at::Tensor pack_int8_panels(const at::Tensor& q, int64_t gates);
constexpr int64_t kInt8GroupRows = 16, kInt8Quad = 4, kInt8PanelBytes = kInt8GroupRows * kInt8Quad;
inline int64_t int8_groups_per_gate(int64_t H) { return (H + kInt8GroupRows - 1) / kInt8GroupRows; }
inline int64_t int8_quads(int64_t K) { return (K + kInt8Quad - 1) / kInt8Quad; }

// The forward of the int8 inference path (csrc/cpu/quantized_cpu.cpp): x [N, I] and every
// activation quantized row by row to 8 bits, int32 sums, the gate math in float32. bias is the
// folded bias [G*H] (or undefined), b_hn GRU's n-gate hidden bias; y, h, c as forward_loop_cpu's.
void quantized_forward_loop_cpu(const LayerShape& s, bool reverse, const at::Tensor& x, const QuantizedMatrix& w_ih,
                                const QuantizedMatrix& w_hh, const at::Tensor& bias, const at::Tensor& b_hn,
                                at::Tensor& y, at::Tensor& h, at::Tensor& c);

// The gradients of a layer's input and weights, allocated by the caller: dx empty (undefined when
// not wanted), the rest zero, so that a loop may add to them.
struct LayerGrads {
  at::Tensor dx;            // [N, I]
  at::Tensor dw_ih, dw_hh;  // [G*H, I], [G*H, P]
  at::Tensor db_ih, db_hh;  // [G*H]; undefined without biases; db_hh written by the loops for GRU only
};

//   w_hh_conj, w_hr_conj  conj of the weights (the same tensors for real types)
//   outputs  [N, P] the forward's outputs, h_t of every row (a view with row stride ≥ P)
//   h0, c0   [B, P], [B, H] the initial state (c0 undefined unless LSTM)
//   dy       [N, P] or undefined
//   dh, dc   [B, P], [B, H]  gradient at h_n, c_n in; at h_0, c_0 out
//   dh_total [N, P] written with the full gradient at each h_t when the LSTM has a projection
// The CPU loop also delivers `grads`, from x [N, I] and w_ih [G*H, I]: it multiplies the gate
// gradients out a chunk of steps at a time, while they are in cache.
void backward_loop_cpu(const LayerShape& s, bool reverse, const at::Tensor& x, const at::Tensor& w_ih,
                       const at::Tensor& w_hh_conj, const at::Tensor& w_hr_conj, const at::Tensor& outputs,
                       const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& saved, const at::Tensor& dy,
                       at::Tensor& dh, at::Tensor& dc, at::Tensor& dh_total, LayerGrads& grads);

#ifdef FUSED_RNN_WITH_CUDA
// Whether forward_loop_cuda takes W_hh in float16/bfloat16 on this device (its tensor-core kernel
// needs compute capability 8.0).
bool cuda_tensor_cores_take_half_types(const at::Device& device);

// As forward_loop_cpu with gx precomputed; w_hh is in gx's dtype, or float16/bfloat16 with every
// other tensor float32 (the tensor-core kernel).
void forward_loop_cuda(const LayerShape& s, bool reverse, const at::Tensor& gx, const at::Tensor& w_hh,
                       const at::Tensor& b_hn, const at::Tensor& w_hr, at::Tensor& y, at::Tensor& h,
                       at::Tensor& c, at::Tensor& saved);
// The CUDA loop writes the gate gradients instead: dgx [N, G*H], and dgh [N, G*H] for GRU (else the
// same tensor as dgx); the op multiplies them out after the loop, with cuBLAS.
void backward_loop_cuda(const LayerShape& s, bool reverse, const at::Tensor& w_hh_conj,
                        const at::Tensor& w_hr_conj, const at::Tensor& outputs, const at::Tensor& h0,
                        const at::Tensor& c0, const at::Tensor& saved, const at::Tensor& dy,
                        at::Tensor& dh, at::Tensor& dc, at::Tensor& dgx, at::Tensor& dgh,
                        at::Tensor& dh_total);
#endif

}  // namespace fused_rnn
