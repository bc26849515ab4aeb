// One layer, one direction of a recurrent network over a whole (possibly packed) sequence.
//
// Every sequence is handled in packed layout: `x` is [N, I] and `batch_sizes[t]` rows of it belong
// to step t, so step t works on rows [offset_t, offset_t + batch_sizes[t]) and on the first
// batch_sizes[t] rows of the state. A padded [T, B, I] input is the special case batch_sizes = B
// everywhere. The reverse direction walks t downwards, so a sequence starts at its own last step.
//
// This header is the ops' contract, shared by both devices' halves (csrc/cpu/ops_cpu.cpp and
// csrc/cuda/ops_cuda.cpp): the layer's shape, the argument checks, the packed-sequence rules and
// the half types' rule. Each half registers its own implementations of the ops (csrc/ops.cpp holds
// their schemas) under its dispatch key.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>
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
  bool peephole = false;  // LSTM with peephole weights (cells.h)
  double zoneout = 0;     // cells.h's Zoneout: the probability z, 0 for none
  bool zoneout_masks = false;  // zoneout by masks (training), else by z (eval)
  bool recurrent_dropout = false;  // cells.h's RecurrentDropout (training)
  bool layer_norm = false;         // cells.h's RowNorm of the projections (and LSTM's CellNorm)
  bool outputs_in_saved;  // half types: a float32 copy of y is kept in `saved` (y itself is rounded)
  std::vector<int64_t> batch_sizes;
  std::vector<int64_t> offsets;  // first row of each step
  int64_t rows(int64_t t) const { return batch_sizes[t]; }
  int64_t first_row(int64_t t) const { return offsets[t]; }

  // Columns of the [N, saved_cols] tensor that forward keeps for backward:
  // [cell's saved values (kSaved*H, LSTM under zoneout or layer norm one H more) | layer norm: the
  // normalized input projection x̂_x (G*H), the normalized recurrent one x̂_h (G*H), and the row's
  // statistics (kLayerNormStats) | LSTM with projection: o*tanh(c_t) (H) | half types: y (P)].
  // h_{t-1} is not among them: it is the step before's output (or h_0), which backward reads there.
  static constexpr int64_t kLayerNormStats = 4;  // 1/σ of x·W_ihᵀ's row and of the product's; ĉ_t's mean and 1/σ
  int64_t norm_col() const { return saved_per_unit * H; }
  int64_t norm_cols() const { return layer_norm ? 2 * gates * H + kLayerNormStats : 0; }
  int64_t proj_input_col() const { return saved_per_unit * H + norm_cols(); }
  int64_t outputs_col() const { return proj_input_col() + (proj ? H : 0); }
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
#ifdef __NVCC__  // LayerShape's rows() are host-only, and so is its instantiation: no device check
#pragma nv_exec_check_disable
#endif
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

// Sets s.cell, s.gates and s.saved_per_unit for the ops' cell id (CellKind), which it checks.
void describe_cell(LayerShape& s, int64_t cell);

// Fills in the steps of s (T, B, batch_sizes, offsets) from batch_sizes, checked against s.N; an
// empty batch_sizes is a padded input whose steps all have padded_batch rows (h0's).
void describe_steps(LayerShape& s, at::IntArrayRef batch_sizes, int64_t padded_batch);

// A padded layer of T steps of B rows, I inputs, H units and proj_size `proj` (0: none), as
// describe_layer gives it for real-type inputs: what the plans are asked about (bindings.cpp and the
// emulation's queries).
LayerShape padded_layer(int64_t cell, int64_t T, int64_t B, int64_t I, int64_t H, int64_t proj);

// The ops' arguments for the options torch.nn lacks, as the ops receive them (csrc/ops.cpp says
// what each is): LSTM's peephole weights, zoneout's z and masks, recurrent dropout's masks.
struct VariantArgs {
  const c10::optional<at::Tensor>& w_peephole;
  double zoneout;
  const c10::optional<at::Tensor>& zoneout_masks;
  const c10::optional<at::Tensor>& recurrent_masks;
  const c10::optional<at::Tensor>& layer_norm;
};

// The same as every step loop takes them: contiguous, in the compute type, undefined when off.
struct Variants {
  at::Tensor peephole;         // [3*H] (p_i, p_f, p_o)
  at::Tensor zoneout_masks;    // [N·H + N·P] (LSTM) or [N·H], training (LayerShape::zoneout is z)
  at::Tensor recurrent_masks;  // [B, P], per sequence and unit: 0 or 1/(1 - p), training
  // Layer norm's weights [ln_ih (G*H) | ln_hh (G*H) | LSTM: ln_c weight (H) | ln_c bias (H)]
  at::Tensor layer_norm;
};

// Validates the forward op's arguments (shapes, dtypes, devices, batch_sizes) and describes the layer.
LayerShape describe_layer(int64_t cell, const at::Tensor& x, at::IntArrayRef batch_sizes,
                          const at::Tensor& h0, const c10::optional<at::Tensor>& c0,
                          const at::Tensor& w_ih, const at::Tensor& w_hh,
                          const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
                          const c10::optional<at::Tensor>& w_hr, const VariantArgs& variants);

// h0 [B, P], LSTM's c0 [B, H] and the biases [G*H], in x's dtype and on its device.
void check_states_and_biases(const LayerShape& s, const at::Tensor& x, const at::Tensor& h0,
                             const c10::optional<at::Tensor>& c0, const c10::optional<at::Tensor>& b_ih,
                             const c10::optional<at::Tensor>& b_hh);

// The same for the backward op, which also takes the forward's y and `saved` and the gradients at
// y, h_n and c_n: the same shape, hence the same layout of `saved`.
LayerShape describe_layer_backward(int64_t cell, const at::Tensor& x, at::IntArrayRef batch_sizes,
                                   const at::Tensor& h0, const c10::optional<at::Tensor>& c0,
                                   const at::Tensor& w_ih, const at::Tensor& w_hh,
                                   const c10::optional<at::Tensor>& w_hr, const at::Tensor& y,
                                   const at::Tensor& saved, const c10::optional<at::Tensor>& dy,
                                   const c10::optional<at::Tensor>& dh_n, const c10::optional<at::Tensor>& dc_n,
                                   const VariantArgs& variants);

// The ops' results, as their schemas (csrc/ops.cpp) list them.
using LayerOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;  // y, h_n, c_n, saved
// grad of x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_peephole, layer_norm: undefined where not applicable
using LayerGradients = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                  at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Half types (float16, bfloat16) compute in float32: the state (h, c), the gate math and `saved`
// (which backward reads) are float32, and y, h_n, c_n and the gradients are cast back at the end.
// How the matrix products treat them is each device's choice (the CPU upcasts everything; CUDA
// multiplies the half operands on the tensor cores).
inline bool computes_in_float(const at::Tensor& x) {
  return x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
}
// The type an op with input x computes in.
inline at::ScalarType compute_type(const at::Tensor& x) { return computes_in_float(x) ? at::kFloat : x.scalar_type(); }
inline at::Tensor to_type(const at::Tensor& t, at::ScalarType type) { return t.defined() ? t.to(type) : t; }
// t contiguous in `type` (the tensor itself where it already is), or undefined.
inline at::Tensor contiguous_as(const c10::optional<at::Tensor>& t, at::ScalarType type) {
  return t.has_value() && t->defined() ? t->to(type).contiguous() : at::Tensor();
}

// The forward's operands as both halves' loops take them, contiguous: x, w_ih and w_hh in
// operand_type (the matrix products' operands: the compute type, or a half type that the device
// multiplies itself), the rest in the compute type; the folded bias and GRU's b_hn (folded_bias,
// gru_hidden_bias_n); h and c fresh copies of h0 and c0 (c undefined unless LSTM), which the loops
// turn into h_n and c_n; the variants' operands.
struct ForwardOperands {
  at::Tensor x, w_ih, w_hh, bias, b_hn, w_hr, h, c;
  Variants variants;
};
ForwardOperands forward_operands(const LayerShape& s, const at::Tensor& x, const at::Tensor& h0,
                                 const c10::optional<at::Tensor>& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                 const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
                                 const c10::optional<at::Tensor>& w_hr, const VariantArgs& variants,
                                 at::ScalarType operand_type);
// The forward's results from what the loop wrote (y, op.h, op.c, saved, in the compute type): half
// types keep a float32 copy of y in `saved`; y, h_n and c_n in x's type `type`; empty placeholders
// for the absent c_n and saved.
LayerOutputs forward_outputs(const LayerShape& s, at::ScalarType type, const at::Tensor& y,
                             const ForwardOperands& op, const at::Tensor& saved);

// The backward's operands likewise, all in the compute type: `outputs` the rows of h_t, where
// backward reads h_{t-1} (y, or for half types its float32 copy in `saved`, a view with saved's row
// stride); dy undefined if not given; dh and dc the gradients at h_n and c_n as fresh tensors (zeros
// where not given; dc undefined unless LSTM), which the loops turn into those at h_0 and c_0.
// product_outputs and product_h0: what the recurrent products took, h'_t = h_t ⊙ m under recurrent
// dropout (the rows of outputs and h0 times their sequences' masks: dW_hh's right factor), else
// outputs and h0 themselves.
struct BackwardOperands {
  at::Tensor x, h0, c0, w_ih, w_hh, w_hr, saved, outputs, dy, dh, dc, product_outputs, product_h0;
  Variants variants;
};
BackwardOperands backward_operands(const LayerShape& s, const at::Tensor& x, const at::Tensor& h0,
                                   const c10::optional<at::Tensor>& c0, const at::Tensor& w_ih,
                                   const at::Tensor& w_hh, const c10::optional<at::Tensor>& w_hr,
                                   const VariantArgs& variants, const at::Tensor& y,
                                   const at::Tensor& saved, const c10::optional<at::Tensor>& dy,
                                   const c10::optional<at::Tensor>& dh_n, const c10::optional<at::Tensor>& dc_n);
// Each of the 9 gradients cast to `type` (x's: the half types' results are computed in float32).
LayerGradients gradients_as(const LayerGradients& grads, at::ScalarType type);

// The biases that only add to x·W_ihᵀ, summed: both, except GRU's b_hn (it is scaled by r), or
// undefined without biases. And GRU's b_hn [H] (a view of b_hh), undefined for the other cells.
at::Tensor folded_bias(const LayerShape& s, const at::Tensor& b_ih, const at::Tensor& b_hh);
at::Tensor gru_hidden_bias_n(const LayerShape& s, const at::Tensor& b_hh);

}  // namespace fused_rnn
