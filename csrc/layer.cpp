// The ops' contract (layer.h): the argument checks that both devices' halves run first, the
// description of the layer they work on, and the packed-sequence and bias rules they share.
#include "layer.h"

#include <ATen/Dispatch.h>

namespace fused_rnn {
namespace {

using at::Tensor;
using c10::optional;

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

LayerShape describe_weights(int64_t cell, const Tensor& x, at::IntArrayRef batch_sizes, const Tensor& w_ih,
                            const Tensor& w_hh, const optional<Tensor>& w_hr, int64_t padded_batch) {
  LayerShape s;
  describe_cell(s, cell);
  TORCH_CHECK(x.dim() == 2, "fused_rnn: the layer input must be 2-D [rows, input_size], got ", x.dim(), "-D");
  TORCH_CHECK(x.is_floating_point() || x.is_complex(),
              "fused_rnn: the input must be a floating point or complex tensor, got ", x.scalar_type());
  TORCH_CHECK(!(x.is_complex() && s.cell == CellKind::RNN_RELU),
              "fused_rnn: nonlinearity 'relu' is not defined for complex inputs");
  s.N = x.size(0);
  s.I = x.size(1);
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) % s.gates == 0,
              "fused_rnn: weight_ih must be 2-D with a multiple of ", s.gates, " rows, got ", w_ih.sizes());
  s.H = w_ih.size(0) / s.gates;
  s.proj = w_hr.has_value() && w_hr->defined();
  s.outputs_in_saved = computes_in_float(x);
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

void describe_cell(LayerShape& s, int64_t cell) {
  TORCH_CHECK(cell >= 0 && cell <= 3, "fused_rnn: unknown cell kind ", cell);
  s.cell = static_cast<CellKind>(cell);
  switch (s.cell) {
    case CellKind::LSTM: s.gates = LSTMCell<float>::kGates, s.saved_per_unit = LSTMCell<float>::kSaved; break;
    case CellKind::GRU: s.gates = GRUCell<float>::kGates, s.saved_per_unit = GRUCell<float>::kSaved; break;
    default: s.gates = RNNTanhCell<float>::kGates, s.saved_per_unit = RNNTanhCell<float>::kSaved; break;
  }
}

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

LayerShape padded_layer(int64_t cell, int64_t T, int64_t B, int64_t I, int64_t H, int64_t proj) {
  TORCH_CHECK_VALUE(T >= 1 && T <= 100000 && B >= 1 && I >= 0 && H >= 1 && proj >= 0 && proj < H,
                    "fused_rnn: a plan needs 1 to 100000 steps, a batch and a hidden size of at least 1, an input ",
                    "size of at least 0 and a proj_size below the hidden size");
  LayerShape s;
  describe_cell(s, cell);
  s.N = T * B, s.I = I, s.H = H, s.P = proj ? proj : H, s.proj = proj > 0;
  s.outputs_in_saved = false;
  describe_steps(s, {}, B);
  return s;
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
                          const optional<Tensor>& w_hr, const VariantArgs& variants) {
  LayerShape s = describe_weights(cell, x, batch_sizes, w_ih, w_hh, w_hr, h0.dim() == 2 ? h0.size(0) : 0);
  check_states_and_biases(s, x, h0, c0, b_ih, b_hh);
  const auto& [w_peephole, zoneout, zoneout_masks, recurrent_masks, layer_norm] = variants;
  s.peephole = w_peephole.has_value() && w_peephole->defined();
  if (s.peephole) {
    TORCH_CHECK(s.cell == CellKind::LSTM, "fused_rnn: only LSTM has peephole weights");
    TORCH_CHECK(w_peephole->dim() == 1 && w_peephole->size(0) == 3 * s.H,
                "fused_rnn: weight_peephole must have shape [", 3 * s.H, "] (i, f, o), got ", w_peephole->sizes());
    check_same_kind(*w_peephole, x, "weight_peephole");
  }
  TORCH_CHECK(zoneout >= 0 && zoneout <= 1, "fused_rnn: zoneout must be a probability in [0, 1], got ", zoneout);
  s.zoneout = zoneout;
  s.zoneout_masks = zoneout_masks.has_value() && zoneout_masks->defined();
  TORCH_CHECK(!s.zoneout_masks || zoneout > 0, "fused_rnn: zoneout_masks are given but zoneout is 0");
  s.layer_norm = layer_norm.has_value() && layer_norm->defined();
  if (s.layer_norm) {
    const int64_t count = 2 * s.gates * s.H + (s.cell == CellKind::LSTM ? 2 * s.H : 0);
    TORCH_CHECK(layer_norm->dim() == 1 && layer_norm->size(0) == count, "fused_rnn: layer_norm must have shape [",
                count, "] (ln_ih and ln_hh weights of G·H",
                s.cell == CellKind::LSTM ? ", ln_c's weight and bias of H" : "", "), got ", layer_norm->sizes());
    check_same_kind(*layer_norm, x, "layer_norm");
    TORCH_CHECK_NOT_IMPLEMENTED(!x.is_complex(), "fused_rnn: layer norm is not defined for complex inputs (as "
                                                 "torch.nn.functional.layer_norm)");
  }
  if ((zoneout > 0 || s.layer_norm) && s.cell == CellKind::LSTM) {
    s.saved_per_unit = LSTMCell<float>::kSaved + 1;  // and ĉ_t (LSTMCell::kOwnStateSlot)
  }
  if (s.zoneout_masks) {  // cells.h's Zoneout::of_row: LSTM's c_t's [N, H], then h_t's [N, P]
    const int64_t count = (s.cell == CellKind::LSTM ? s.N * s.H : 0) + s.N * s.P;
    TORCH_CHECK(zoneout_masks->dim() == 1 && zoneout_masks->size(0) == count,
                "fused_rnn: zoneout_masks must have shape [", count, "] (",
                s.cell == CellKind::LSTM ? "N·H masks of c_t, then " : "", "N·P of h_t), got ",
                zoneout_masks->sizes());
    check_same_kind(*zoneout_masks, x, "zoneout_masks");
  }
  s.recurrent_dropout = recurrent_masks.has_value() && recurrent_masks->defined();
  if (s.recurrent_dropout) {
    check_matrix(*recurrent_masks, "recurrent_masks", s.B, s.P);
    check_same_kind(*recurrent_masks, x, "recurrent_masks");
  }
  return s;
}

LayerShape describe_layer_backward(int64_t cell, const Tensor& x, at::IntArrayRef batch_sizes, const Tensor& h0,
                                   const optional<Tensor>& c0, const Tensor& w_ih, const Tensor& w_hh,
                                   const optional<Tensor>& w_hr, const Tensor& y, const Tensor& saved,
                                   const optional<Tensor>& dy, const optional<Tensor>& dh_n,
                                   const optional<Tensor>& dc_n, const VariantArgs& variants) {
  // Checked in the caller's dtypes, as forward: the same shape, hence the same layout of `saved`.
  const LayerShape s =
      describe_layer(cell, x, batch_sizes, h0, c0, w_ih, w_hh, optional<Tensor>(), optional<Tensor>(), w_hr, variants);
  check_matrix(y, "y", s.N, s.P);
  check_same_kind(y, x, "y");
  check_matrix(saved, "saved", s.N, s.saved_cols());
  TORCH_CHECK(saved.scalar_type() == compute_type(x) &&
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
  return s;
}

LayerGradients gradients_as(const LayerGradients& grads, at::ScalarType type) {
  const auto& [dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh, dw_hr, dw_peephole, d_layer_norm] = grads;
  return {to_type(dx, type),    to_type(dh, type),    to_type(dc, type),    to_type(dw_ih, type),
          to_type(dw_hh, type), to_type(db_ih, type), to_type(db_hh, type), to_type(dw_hr, type),
          to_type(dw_peephole, type), to_type(d_layer_norm, type)};
}

Tensor folded_bias(const LayerShape& s, const Tensor& b_ih, const Tensor& b_hh) {
  const int64_t additive = s.cell == CellKind::GRU ? 2 * s.H : s.gates * s.H;
  if (b_ih.defined() && b_hh.defined() && b_ih.is_cpu() && b_ih.is_contiguous() && b_hh.is_contiguous()) {
    // One pass, no dispatcher call but the allocation: a cell's step pays this at every call, and
    // clone + add_ took more than a small step's products. Each element is the same one addition.
    Tensor bias = at::empty_like(b_ih);
    AT_DISPATCH_FLOATING_AND_COMPLEX_TYPES(bias.scalar_type(), "fused_rnn_folded_bias", [&] {
      const scalar_t* a = b_ih.data_ptr<scalar_t>();
      const scalar_t* b = b_hh.data_ptr<scalar_t>();
      scalar_t* out = bias.data_ptr<scalar_t>();
      const int64_t n = bias.numel();
      for (int64_t i = 0; i < n; ++i) out[i] = i < additive ? a[i] + b[i] : a[i];
    });
    return bias;
  }
  Tensor bias;
  if (b_ih.defined()) bias = b_ih.clone();
  if (b_hh.defined()) {
    if (!bias.defined()) bias = at::zeros({s.gates * s.H}, b_hh.options());
    bias.narrow(0, 0, additive).add_(b_hh.narrow(0, 0, additive));
  }
  return bias;
}

Tensor gru_hidden_bias_n(const LayerShape& s, const Tensor& b_hh) {
  return s.cell == CellKind::GRU && b_hh.defined() ? b_hh.narrow(0, 2 * s.H, s.H) : Tensor();
}

namespace {

Variants variant_operands(const VariantArgs& v, at::ScalarType type) {
  return {contiguous_as(v.w_peephole, type), contiguous_as(v.zoneout_masks, type),
          contiguous_as(v.recurrent_masks, type), contiguous_as(v.layer_norm, type)};
}

// per_sequence [B, cols] -> [N, cols]: row r of the packed layout gets its sequence's row (step t's
// rows are sequences 0 .. batch_sizes[t] - 1).
Tensor sequence_rows(const LayerShape& s, const Tensor& per_sequence) {
  if (s.T == 0) return per_sequence.new_empty({0, per_sequence.size(1)});
  if (s.batch_sizes.back() == s.B) return per_sequence.repeat({s.T, 1});  // padded: every step has all rows
  std::vector<Tensor> steps;
  steps.reserve(s.T);
  for (int64_t t = 0; t < s.T; ++t) steps.push_back(per_sequence.narrow(0, 0, s.batch_sizes[t]));
  return at::cat(steps);
}

}  // namespace

ForwardOperands forward_operands(const LayerShape& s, const Tensor& x, const Tensor& h0, const optional<Tensor>& c0,
                                 const Tensor& w_ih, const Tensor& w_hh, const optional<Tensor>& b_ih,
                                 const optional<Tensor>& b_hh, const optional<Tensor>& w_hr,
                                 const VariantArgs& variants, at::ScalarType operand_type) {
  const at::ScalarType type = compute_type(x);
  ForwardOperands op;
  op.x = contiguous_as(x, operand_type), op.w_ih = contiguous_as(w_ih, operand_type);
  op.w_hh = contiguous_as(w_hh, operand_type);
  const Tensor bias_hh = contiguous_as(b_hh, type);
  op.bias = folded_bias(s, contiguous_as(b_ih, type), bias_hh);
  op.b_hn = gru_hidden_bias_n(s, bias_hh);
  op.w_hr = contiguous_as(w_hr, type);
  op.variants = variant_operands(variants, type);
  op.h = contiguous_as(h0, type).clone();
  if (s.cell == CellKind::LSTM) op.c = contiguous_as(c0, type).clone();
  return op;
}

LayerOutputs forward_outputs(const LayerShape& s, at::ScalarType type, const Tensor& y, const ForwardOperands& op,
                             const Tensor& saved) {
  if (saved.defined() && s.outputs_in_saved) saved.narrow(1, s.outputs_col(), s.P).copy_(y);
  const Tensor none = at::empty({0}, y.options());
  // saved stays in the compute type, for backward.
  return {y.to(type), op.h.to(type), op.c.defined() ? op.c.to(type) : none.to(type), saved.defined() ? saved : none};
}

BackwardOperands backward_operands(const LayerShape& s, const Tensor& x, const Tensor& h0, const optional<Tensor>& c0,
                                   const Tensor& w_ih, const Tensor& w_hh, const optional<Tensor>& w_hr,
                                   const VariantArgs& variants, const Tensor& y, const Tensor& saved,
                                   const optional<Tensor>& dy, const optional<Tensor>& dh_n,
                                   const optional<Tensor>& dc_n) {
  const at::ScalarType type = compute_type(x);
  BackwardOperands op;
  op.x = contiguous_as(x, type), op.saved = saved.contiguous();
  op.w_ih = contiguous_as(w_ih, type), op.w_hh = contiguous_as(w_hh, type), op.w_hr = contiguous_as(w_hr, type);
  op.variants = variant_operands(variants, type);
  op.h0 = contiguous_as(h0, type), op.c0 = contiguous_as(c0, type);
  op.outputs = s.outputs_in_saved ? op.saved.narrow(1, s.outputs_col(), s.P) : y.contiguous();
  op.product_outputs = op.outputs, op.product_h0 = op.h0;
  if (s.recurrent_dropout) {
    const Tensor& masks = op.variants.recurrent_masks;
    op.product_outputs = op.outputs * sequence_rows(s, masks);
    op.product_h0 = op.h0 * masks;
  }
  op.dy = contiguous_as(dy, type);
  const auto given_or_zeros = [&](const optional<Tensor>& grad, int64_t cols) {
    return grad.has_value() && grad->defined() ? contiguous_as(grad, type).clone()
                                               : at::zeros({s.B, cols}, op.x.options());
  };
  op.dh = given_or_zeros(dh_n, s.P);
  if (s.cell == CellKind::LSTM) op.dc = given_or_zeros(dc_n, s.H);
  return op;
}

}  // namespace fused_rnn
