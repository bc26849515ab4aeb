// The compiled ops `fused_rnn::layer_forward` and `fused_rnn::layer_backward`: argument checks, the
// outputs' allocation and the hand-off to the device's step loop. The CPU loops compute the input
// projection and the weight and input gradients themselves, a chunk of steps at a time; for CUDA
// they are once-per-sequence cuBLAS calls here.
#include "layer.h"

#include <torch/library.h>

namespace fused_rnn {
namespace {

using at::Tensor;
using c10::optional;

int64_t gates_of(CellKind cell) {
  switch (cell) {
    case CellKind::LSTM: return LSTMCell<float>::kGates;
    case CellKind::GRU: return GRUCell<float>::kGates;
    default: return RNNTanhCell<float>::kGates;
  }
}

int64_t saved_per_unit_of(CellKind cell) {
  switch (cell) {
    case CellKind::LSTM: return LSTMCell<float>::kSaved;
    case CellKind::GRU: return GRUCell<float>::kSaved;
    default: return RNNTanhCell<float>::kSaved;
  }
}

bool is_low_precision(const Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

// Half types compute in float32: the state (h, c), the gate math and `saved` (which backward
// reads) are float32, and y, h_n, c_n are cast back at the end. On the CPU the whole op is upcast,
// as torch.nn does there. On CUDA the big operands stay in the half type for the matrix products:
// x·W_ihᵀ on cuBLAS with float32 accumulation and output, h_{t-1}·W_hhᵀ on the tensor cores
// (csrc/cuda/step_loops.cuh). Its kernel zero-pads every tile, so no shape falls back; only a GPU
// below compute capability 8.0 takes the CPU's route. Backward's step loop runs in float32 on both
// devices; on CUDA its once-per-sequence products (dX, dW_ih, dW_hh) take half operands again.
bool compute_in_float(const Tensor& x) { return is_low_precision(x); }

// Whether x, W_ih and W_hh keep their half type (see compute_in_float).
bool half_operands_on_tensor_cores(const Tensor& x) {
#ifdef FUSED_RNN_WITH_CUDA
  return x.is_cuda() && cuda_tensor_cores_take_half_types(x.device());
#else
  (void)x;
  return false;
#endif
}

Tensor to_float(const Tensor& t) { return t.defined() ? t.to(at::kFloat) : t; }
optional<Tensor> to_float(const optional<Tensor>& t) {
  return t.has_value() && t->defined() ? optional<Tensor>(t->to(at::kFloat)) : t;
}
Tensor to_type(const Tensor& t, at::ScalarType type) { return t.defined() ? t.to(type) : t; }

Tensor contiguous_or_undefined(const optional<Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : Tensor();
}

void check_matrix(const Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "fused_rnn: ", name,
              " must have shape [", rows, ", ", cols, "], got ", t.sizes());
}

void check_same_kind(const Tensor& t, const Tensor& x, const char* name) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fused_rnn: ", name, " has dtype ", t.scalar_type(),
              " but the input has dtype ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "fused_rnn: ", name, " is on ", t.device(),
              " but the input is on ", x.device());
}

// h0 [B, P], LSTM's c0 [B, H] and the biases [G*H], in x's dtype and on its device.
void check_states_and_biases(const LayerShape& s, const Tensor& x, const Tensor& h0, const optional<Tensor>& c0,
                             const optional<Tensor>& b_ih, const optional<Tensor>& b_hh) {
  check_matrix(h0, "h0", s.B, s.P);
  check_same_kind(h0, x, "h0");
  if (s.cell == CellKind::LSTM) {
    TORCH_CHECK(c0.has_value() && c0->defined(), "fused_rnn: LSTM needs the initial cell state c0");
    check_matrix(*c0, "c0", s.B, s.H);
    check_same_kind(*c0, x, "c0");
  }
  for (const auto* b : {&b_ih, &b_hh}) {
    if (b->has_value() && (*b)->defined()) {
      TORCH_CHECK((*b)->dim() == 1 && (*b)->size(0) == s.gates * s.H, "fused_rnn: biases must have shape [",
                  s.gates * s.H, "], got ", (*b)->sizes());
      check_same_kind(**b, x, "bias");
    }
  }
}

LayerShape describe_weights(int64_t cell, const Tensor& x, at::IntArrayRef batch_sizes, const Tensor& w_ih,
                            const Tensor& w_hh, const optional<Tensor>& w_hr, int64_t padded_batch) {
  TORCH_CHECK(cell >= 0 && cell <= 3, "fused_rnn: unknown cell kind ", cell);
  LayerShape s;
  s.cell = static_cast<CellKind>(cell);
  TORCH_CHECK(x.dim() == 2, "fused_rnn: the layer input must be 2-D [rows, input_size], got ", x.dim(), "-D");
  TORCH_CHECK(x.is_floating_point() || x.is_complex(),
              "fused_rnn: the input must be a floating point or complex tensor, got ", x.scalar_type());
  TORCH_CHECK(!(x.is_complex() && s.cell == CellKind::RNN_RELU),
              "fused_rnn: nonlinearity 'relu' is not defined for complex inputs");
  TORCH_CHECK(!(x.is_complex() && x.is_cuda()),
              "fused_rnn: complex inputs are not supported on CUDA (the CUDA kernels handle float32, "
              "float64 and, computed in float32, float16/bfloat16); run complex layers on the CPU");
  s.N = x.size(0);
  s.I = x.size(1);
  s.gates = gates_of(s.cell);
  s.saved_per_unit = saved_per_unit_of(s.cell);
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) % s.gates == 0,
              "fused_rnn: weight_ih must be 2-D with a multiple of ", s.gates, " rows, got ", w_ih.sizes());
  s.H = w_ih.size(0) / s.gates;
  s.proj = w_hr.has_value() && w_hr->defined();
  s.outputs_in_saved = compute_in_float(x);
  TORCH_CHECK(!s.proj || s.cell == CellKind::LSTM, "fused_rnn: only LSTM has a projection (weight_hr)");
  s.P = s.proj ? w_hr->size(0) : s.H;
  TORCH_CHECK(!s.proj || s.P < s.H, "fused_rnn: weight_hr must have fewer rows (proj_size) than hidden_size ",
              s.H, ", got ", s.P);
  check_matrix(w_ih, "weight_ih", s.gates * s.H, s.I);
  check_matrix(w_hh, "weight_hh", s.gates * s.H, s.P);
  check_same_kind(w_ih, x, "weight_ih");
  check_same_kind(w_hh, x, "weight_hh");
  if (s.proj) {
    check_matrix(*w_hr, "weight_hr", s.P, s.H);
    check_same_kind(*w_hr, x, "weight_hr");
  }

  describe_steps(s, batch_sizes, padded_batch);
  return s;
}

}  // namespace

void describe_steps(LayerShape& s, at::IntArrayRef batch_sizes, int64_t padded_batch) {
  // An empty batch_sizes is a padded input: every step has h0's rows (the op's schema then holds
  // no per-step list, so that torch.compile keeps T and B symbolic).
  std::vector<int64_t> uniform;
  if (batch_sizes.empty() && s.N > 0) {
    TORCH_CHECK(padded_batch > 0 && s.N % padded_batch == 0, "fused_rnn: a padded input (empty batch_sizes) needs ",
                "h0's ", padded_batch, " rows to divide the input's ", s.N, " rows");
    uniform.assign(s.N / padded_batch, padded_batch);
    batch_sizes = uniform;
  }
  s.T = static_cast<int64_t>(batch_sizes.size());
  s.B = s.T > 0 ? batch_sizes[0] : 0;
  s.batch_sizes.assign(batch_sizes.begin(), batch_sizes.end());
  s.offsets.resize(s.T);
  int64_t rows = 0;
  for (int64_t t = 0; t < s.T; ++t) {
    const int64_t n = batch_sizes[t];
    TORCH_CHECK(n >= 0 && (t == 0 || n <= batch_sizes[t - 1]),
                "fused_rnn: batch_sizes must be non-negative and non-increasing, got ", batch_sizes);
    s.offsets[t] = rows;
    rows += n;
  }
  TORCH_CHECK(rows == s.N, "fused_rnn: batch_sizes sum to ", rows, " but the input has ", s.N, " rows");
}

std::vector<PreviousRun> previous_runs(const LayerShape& s, bool reverse) {
  std::vector<PreviousRun> runs;
  const auto add = [&](int64_t row, int64_t rows, int64_t source, bool from_h0) {
    if (rows == 0) return;
    PreviousRun* last = runs.empty() ? nullptr : &runs.back();
    if (last && last->from_h0 == from_h0 && last->row + last->rows == row && last->source + last->rows == source) {
      last->rows += rows;
    } else {
      runs.push_back({row, rows, source, from_h0});
    }
  };
  for (int64_t t = 0; t < s.T; ++t) {  // rows in ascending order, whichever way the layer walks
    const Predecessor before = predecessor(s, reverse, t);
    add(s.offsets[t], before.carried, before.first, false);
    add(s.offsets[t] + before.carried, s.batch_sizes[t] - before.carried, before.carried, true);
  }
  return runs;
}

LayerShape describe_layer(int64_t cell, const Tensor& x, at::IntArrayRef batch_sizes, const Tensor& h0,
                          const optional<Tensor>& c0, const Tensor& w_ih, const Tensor& w_hh,
                          const optional<Tensor>& b_ih, const optional<Tensor>& b_hh,
                          const optional<Tensor>& w_hr) {
  LayerShape s = describe_weights(cell, x, batch_sizes, w_ih, w_hh, w_hr, h0.dim() == 2 ? h0.size(0) : 0);
  check_states_and_biases(s, x, h0, c0, b_ih, b_hh);
  return s;
}

namespace {

// The biases that only add to x·W_ihᵀ, summed: both, except GRU's b_hn (it is scaled by r).
Tensor folded_bias(const LayerShape& s, const Tensor& b_ih, const Tensor& b_hh) {
  Tensor bias;
  if (b_ih.defined()) bias = b_ih.clone();
  if (b_hh.defined()) {
    const int64_t additive = s.cell == CellKind::GRU ? 2 * s.H : s.gates * s.H;
    if (!bias.defined()) bias = at::zeros({s.gates * s.H}, b_hh.options());
    bias.narrow(0, 0, additive).add_(b_hh.narrow(0, 0, additive));
  }
  return bias;
}

#ifdef FUSED_RNN_WITH_CUDA
// Gx = x·W_ihᵀ + the folded bias (in the compute type); half operands accumulate and come out in
// float32.
Tensor input_projection(const Tensor& x, const Tensor& w_ih, const Tensor& bias) {
  if (is_low_precision(x)) {
    Tensor gx = at::mm(x, w_ih.t(), at::kFloat);
    return bias.defined() ? gx.add_(bias) : gx;
  }
  return bias.defined() ? at::addmm(bias, x, w_ih.t()) : at::mm(x, w_ih.t());
}

// h_{t-1} of every row, [N, P], copied from the outputs and h_0 run by run (device to device, so
// that a CUDA graph can capture it): the right factor of dW_hh in one GEMM.
Tensor previous_outputs(const LayerShape& s, bool reverse, const Tensor& outputs, const Tensor& h0) {
  Tensor h_prev = at::empty({s.N, s.P}, outputs.options());
  for (const PreviousRun& run : previous_runs(s, reverse)) {
    h_prev.narrow(0, run.row, run.rows).copy_((run.from_h0 ? h0 : outputs).narrow(0, run.source, run.rows));
  }
  return h_prev;
}
#endif

// The forward op once its arguments are checked. x, w_ih and w_hh are the matrix products'
// operands (a half type on the tensor-core path); h0, c0, the biases and w_hr are in the type the
// op computes in, which y, h_n, c_n and `saved` come out in.
std::tuple<Tensor, Tensor, Tensor, Tensor> forward_checked(
    const LayerShape& s, bool reverse, const Tensor& x_in, const Tensor& h0, const optional<Tensor>& c0,
    const Tensor& w_ih_in, const Tensor& w_hh_in, const optional<Tensor>& b_ih, const optional<Tensor>& b_hh,
    const optional<Tensor>& w_hr, bool need_saved) {
  const Tensor x = x_in.contiguous();
  const Tensor w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous();
  const Tensor bias_ih = contiguous_or_undefined(b_ih), bias_hh = contiguous_or_undefined(b_hh);
  const Tensor w_proj = contiguous_or_undefined(w_hr);
  const auto opts = h0.options();

  const Tensor bias = folded_bias(s, bias_ih, bias_hh);
  const Tensor b_hn = s.cell == CellKind::GRU && bias_hh.defined() ? bias_hh.narrow(0, 2 * s.H, s.H) : Tensor();
  Tensor y = empty_large({s.N, s.P}, opts);
  Tensor h = h0.contiguous().clone();
  Tensor c = s.cell == CellKind::LSTM ? c0->contiguous().clone() : Tensor();
  Tensor saved = need_saved ? empty_large({s.N, s.saved_cols()}, opts) : Tensor();

  if (x.is_cuda()) {
#ifdef FUSED_RNN_WITH_CUDA
    forward_loop_cuda(s, reverse, input_projection(x, w_ih, bias), w_hh, b_hn, w_proj, y, h, c, saved);
#else
    TORCH_CHECK(false, "fused_rnn was built without CUDA");
#endif
  } else {
    forward_loop_cpu(s, reverse, x, w_ih, bias, w_hh, b_hn, w_proj, y, h, c, saved);
  }
  if (saved.defined() && s.outputs_in_saved) saved.narrow(1, s.outputs_col(), s.P).copy_(y);
  if (!c.defined()) c = at::empty({0}, opts);
  if (!saved.defined()) saved = at::empty({0}, opts);
  return {y, h, c, saved};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_forward(
    int64_t cell, const Tensor& x, at::IntArrayRef batch_sizes, bool reverse, const Tensor& h0,
    const optional<Tensor>& c0, const Tensor& w_ih, const Tensor& w_hh, const optional<Tensor>& b_ih,
    const optional<Tensor>& b_hh, const optional<Tensor>& w_hr, bool need_saved) {
  // Checked in the caller's dtypes, so that a mismatch is reported as such.
  const LayerShape s = describe_layer(cell, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr);
  if (!compute_in_float(x)) return forward_checked(s, reverse, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, need_saved);
  const bool keep_half = half_operands_on_tensor_cores(x);
  const auto operand = [&](const Tensor& t) { return keep_half ? t : to_float(t); };
  auto [y, h, c, saved] = forward_checked(s, reverse, operand(x), to_float(h0), to_float(c0), operand(w_ih),
                                          operand(w_hh), to_float(b_ih), to_float(b_hh), to_float(w_hr), need_saved);
  const auto type = x.scalar_type();
  return {y.to(type), h.to(type), c.to(type), saved};  // saved stays in float32 for backward
}

using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// The backward op once its arguments are checked, in the type it computes in (x, the weights, the
// state and the incoming gradients; `saved` already is). product_type: the operands' type for the
// CUDA path's once-per-sequence products (a half type on the tensor cores, else x's).
Grads backward_checked(const LayerShape& s, bool reverse, const Tensor& x_in, const Tensor& h0_in,
                       const optional<Tensor>& c0_in, const Tensor& w_ih_in, const Tensor& w_hh_in,
                       const optional<Tensor>& w_hr, bool has_bias, const Tensor& y, const Tensor& saved_in,
                       const optional<Tensor>& dy_in, const optional<Tensor>& dh_n, const optional<Tensor>& dc_n,
                       bool need_input_grad, at::ScalarType product_type) {
  const Tensor x = x_in.contiguous(), saved = saved_in.contiguous();
  const Tensor w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous();
  const Tensor w_proj = contiguous_or_undefined(w_hr);
  const Tensor h0 = h0_in.contiguous(), c0 = contiguous_or_undefined(c0_in);
  // h_t of every row, where backward reads h_{t-1}: y, or its float32 copy for half types.
  const Tensor outputs = s.outputs_in_saved ? saved.narrow(1, s.outputs_col(), s.P) : y.contiguous();
  const auto opts = x.options();

  const Tensor dy = contiguous_or_undefined(dy_in);
  Tensor dh = dh_n.has_value() && dh_n->defined() ? dh_n->contiguous().clone() : at::zeros({s.B, s.P}, opts);
  Tensor dc;
  if (s.cell == CellKind::LSTM) {
    dc = dc_n.has_value() && dc_n->defined() ? dc_n->contiguous().clone() : at::zeros({s.B, s.H}, opts);
  }
  const int64_t GH = s.gates * s.H;
  LayerGrads g;
  g.dx = need_input_grad ? empty_large({s.N, s.I}, opts) : Tensor();
  g.dw_ih = at::zeros({GH, s.I}, opts);
  g.dw_hh = at::zeros({GH, s.P}, opts);
  if (has_bias) {
    g.db_ih = at::zeros({GH}, opts);
    g.db_hh = at::zeros({GH}, opts);
  }
  Tensor dh_total = s.proj ? empty_large({s.N, s.P}, opts) : Tensor();
  // resolve_conj makes a real copy for complex types and is free for real ones.
  const Tensor w_hh_conj = w_hh.conj().resolve_conj();
  const Tensor w_proj_conj = s.proj ? w_proj.conj().resolve_conj() : Tensor();

  if (x.is_cuda()) {
#ifdef FUSED_RNN_WITH_CUDA
    Tensor dgx = at::empty({s.N, GH}, opts);
    Tensor dgh = s.cell == CellKind::GRU ? at::empty({s.N, GH}, opts) : dgx;
    backward_loop_cuda(s, reverse, w_hh_conj, w_proj_conj, outputs, h0, c0, saved, dy, dh, dc, dgx, dgh, dh_total);
    // The once-per-sequence GEMMs and sums; plain reductions, so results are reproducible.
    const Tensor h_prev = previous_outputs(s, reverse, outputs, h0);
    if (product_type == x.scalar_type()) {
      if (need_input_grad) at::mm_out(g.dx, dgx, w_ih.conj());
      at::mm_out(g.dw_ih, dgx.t(), x.conj());
      at::mm_out(g.dw_hh, dgh.t(), h_prev.conj());
    } else {
      // Half types, as the forward's products: half operands on the tensor cores, float32
      // accumulation; the results come out rounded to the half type, which they are returned in
      // anyway. The gate gradients lose their float32 precision here only.
      const auto operand = [&](const Tensor& t) { return t.to(product_type); };
      const Tensor dgx_op = operand(dgx), dgh_op = s.cell == CellKind::GRU ? operand(dgh) : dgx_op;
      if (need_input_grad) g.dx.copy_(at::mm(dgx_op, operand(w_ih)));
      g.dw_ih.copy_(at::mm(dgx_op.t(), operand(x)));
      g.dw_hh.copy_(at::mm(dgh_op.t(), operand(h_prev)));
    }
    if (has_bias) {
      at::sum_out(g.db_ih, dgx, 0);
      if (s.cell == CellKind::GRU) at::sum_out(g.db_hh, dgh, 0);
    }
#else
    TORCH_CHECK(false, "fused_rnn was built without CUDA");
#endif
  } else {
    backward_loop_cpu(s, reverse, x, w_ih, w_hh_conj, w_proj_conj, outputs, h0, c0, saved, dy, dh, dc, dh_total, g);
  }
  // Both biases add to the same pre-activations, except GRU's b_hn (scaled by r): same gradient.
  if (has_bias && s.cell != CellKind::GRU) g.db_hh.copy_(g.db_ih);
  Tensor dw_hr;
  if (s.proj) dw_hr = at::mm(dh_total.t(), saved.narrow(1, s.proj_input_col(), s.H).conj());
  return {g.dx, dh, dc, g.dw_ih, g.dw_hh, g.db_ih, g.db_hh, dw_hr};
}

Grads layer_backward(int64_t cell, const Tensor& x, at::IntArrayRef batch_sizes, bool reverse, const Tensor& h0,
                     const optional<Tensor>& c0, const Tensor& w_ih, const Tensor& w_hh, const optional<Tensor>& w_hr,
                     bool has_bias, const Tensor& y, const Tensor& saved, const optional<Tensor>& dy,
                     const optional<Tensor>& dh_n, const optional<Tensor>& dc_n, bool need_input_grad) {
  // Checked in the caller's dtypes, as forward: the same shape, hence the same layout of `saved`.
  const LayerShape s = describe_layer(cell, x, batch_sizes, h0, c0, w_ih, w_hh, optional<Tensor>(),
                                      optional<Tensor>(), w_hr);
  check_matrix(y, "y", s.N, s.P);
  check_same_kind(y, x, "y");
  check_matrix(saved, "saved", s.N, s.saved_cols());
  TORCH_CHECK(saved.scalar_type() == (compute_in_float(x) ? at::kFloat : x.scalar_type()) &&
                  saved.device() == x.device(),
              "fused_rnn: saved must be what layer_forward returned for this input, got dtype ",
              saved.scalar_type(), " on ", saved.device());
  const auto check_grad = [&](const optional<Tensor>& grad, const char* name, int64_t rows, int64_t cols) {
    if (grad.has_value() && grad->defined()) {
      check_matrix(*grad, name, rows, cols);
      check_same_kind(*grad, x, name);
    }
  };
  check_grad(dy, "grad_y", s.N, s.P);
  check_grad(dh_n, "grad_h_n", s.B, s.P);
  if (s.cell == CellKind::LSTM) check_grad(dc_n, "grad_c_n", s.B, s.H);
  const auto type = x.scalar_type();
  if (!compute_in_float(x)) {
    return backward_checked(s, reverse, x, h0, c0, w_ih, w_hh, w_hr, has_bias, y, saved, dy, dh_n, dc_n,
                            need_input_grad, type);
  }
  Grads g = backward_checked(s, reverse, to_float(x), to_float(h0), to_float(c0), to_float(w_ih), to_float(w_hh),
                             to_float(w_hr), has_bias, y, saved, to_float(dy), to_float(dh_n), to_float(dc_n),
                             need_input_grad, half_operands_on_tensor_cores(x) ? type : at::kFloat);
  auto& [dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh, dw_hr] = g;
  return {to_type(dx, type), to_type(dh, type), to_type(dc, type), to_type(dw_ih, type),
          to_type(dw_hh, type), to_type(db_ih, type), to_type(db_hh, type), to_type(dw_hr, type)};
}

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
  TORCH_CHECK(cell >= 0 && cell <= 3, "fused_rnn: unknown cell kind ", cell);
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "fused_rnn: the int8 layer takes a 2-D float32 CPU input, got a ", x_in.dim(), "-D ",
              x_in.scalar_type(), " tensor on ", x_in.device());
  LayerShape s;
  s.cell = static_cast<CellKind>(cell);
  s.N = x_in.size(0);
  s.I = x_in.size(1);
  s.gates = gates_of(s.cell);
  s.saved_per_unit = saved_per_unit_of(s.cell);
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

  const Tensor bias_ih = contiguous_or_undefined(b_ih), bias_hh = contiguous_or_undefined(b_hh);
  const Tensor bias = folded_bias(s, bias_ih, bias_hh);
  const Tensor b_hn = s.cell == CellKind::GRU && bias_hh.defined() ? bias_hh.narrow(0, 2 * s.H, s.H) : Tensor();
  Tensor y = empty_large({s.N, s.H}, x_in.options());
  Tensor h = h0.contiguous().clone();
  Tensor c = s.cell == CellKind::LSTM ? c0->contiguous().clone() : Tensor();
  quantized_forward_loop_cpu(s, reverse, x_in.contiguous(), input_weights, recurrent_weights, bias, b_hn, y, h, c);
  if (!c.defined()) c = at::empty({0}, x_in.options());
  return {y, h, c};
}

}  // namespace

// batch_sizes: rows per step in packed layout (non-increasing), or empty for a padded input, whose
// steps all have h0's rows.
TORCH_LIBRARY(fused_rnn, m) {
  m.def(
      "layer_forward(int cell, Tensor x, int[] batch_sizes, bool reverse, Tensor h0, Tensor? c0, "
      "Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, bool need_saved) "
      "-> (Tensor y, Tensor h_n, Tensor c_n, Tensor saved)");
  m.def(
      "layer_backward(int cell, Tensor x, int[] batch_sizes, bool reverse, Tensor h0, Tensor? c0, "
      "Tensor w_ih, Tensor w_hh, Tensor? w_hr, bool has_bias, Tensor y, Tensor saved, Tensor? grad_y, "
      "Tensor? grad_h_n, Tensor? grad_c_n, bool need_input_grad) "
      "-> (Tensor grad_x, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, "
      "Tensor grad_b_ih, Tensor grad_b_hh, Tensor grad_w_hr)");  // undefined where not applicable
  m.def(
      "quantized_layer_forward(int cell, Tensor x, int[] batch_sizes, bool reverse, Tensor h0, Tensor? c0, "
      "Tensor w_ih, Tensor w_ih_scale, Tensor w_ih_row_sum, Tensor w_hh, Tensor w_hh_scale, "
      "Tensor w_hh_row_sum, Tensor? b_ih, Tensor? b_hh) -> (Tensor y, Tensor h_n, Tensor c_n)");
  m.def("quantized_pack_weight(Tensor weight, int gates) -> Tensor");
}

TORCH_LIBRARY_IMPL(fused_rnn, CPU, m) {
  m.impl("layer_forward", &layer_forward);
  m.impl("layer_backward", &layer_backward);
  m.impl("quantized_layer_forward", &quantized_layer_forward);
  m.impl("quantized_pack_weight", &quantized_pack_weight);
}

#ifdef FUSED_RNN_WITH_CUDA
TORCH_LIBRARY_IMPL(fused_rnn, CUDA, m) {
  m.impl("layer_forward", &layer_forward);
  m.impl("layer_backward", &layer_backward);
}
#endif

}  // namespace fused_rnn
