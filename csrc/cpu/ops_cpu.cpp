// The CPU half of the ops fused_rnn::layer_forward and fused_rnn::layer_backward: after the
// contract's checks (layer.h), the outputs' allocation, the call's kernel plan (kernel_plan.h) and
// the step loops (forward_loop.cpp, backward_loop.cpp), which compute the input projection and the
// weight and input gradients themselves, a chunk of steps at a time. Half types are upcast: the whole op runs in float32, as torch.nn does on the CPU.
#include <torch/library.h>

#include "layer_cpu.h"

namespace fused_rnn {
namespace {

using at::Tensor;
using c10::optional;

LayerOutputs layer_forward(int64_t cell, const Tensor& x, at::IntArrayRef batch_sizes, bool reverse, const Tensor& h0,
                           const optional<Tensor>& c0, const Tensor& w_ih, const Tensor& w_hh,
                           const optional<Tensor>& b_ih, const optional<Tensor>& b_hh, const optional<Tensor>& w_hr,
                           bool need_saved, const optional<Tensor>& w_peephole, double zoneout,
                           const optional<Tensor>& zoneout_masks, const optional<Tensor>& recurrent_masks,
                           const optional<Tensor>& layer_norm) {
  const VariantArgs variants{w_peephole, zoneout, zoneout_masks, recurrent_masks, layer_norm};
  // Checked in the caller's dtypes, so that a mismatch is reported as such.
  const LayerShape s = describe_layer(cell, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, variants);
  ForwardOperands op = forward_operands(s, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, variants, compute_type(x));
  const auto opts = op.h.options();
  Tensor y = empty_large({s.N, s.P}, opts);
  Tensor saved = need_saved ? empty_large({s.N, s.saved_cols()}, opts) : Tensor();
  const cpu::CpuPlan plan = cpu::plan_cpu(cpu::Pass::kForward, s, op.x.scalar_type());
  forward_loop_cpu(plan, s, reverse, op.x, op.w_ih, op.bias, op.w_hh, op.b_hn, op.w_hr, op.variants, y, op.h, op.c,
                   saved);
  return forward_outputs(s, x.scalar_type(), y, op, saved);
}

LayerGradients layer_backward(int64_t cell, const Tensor& x, at::IntArrayRef batch_sizes, bool reverse,
                              const Tensor& h0, const optional<Tensor>& c0, const Tensor& w_ih, const Tensor& w_hh,
                              const optional<Tensor>& w_hr, bool has_bias, const Tensor& y, const Tensor& saved,
                              const optional<Tensor>& dy, const optional<Tensor>& dh_n,
                              const optional<Tensor>& dc_n, bool need_input_grad, const optional<Tensor>& w_peephole,
                              double zoneout, const optional<Tensor>& zoneout_masks,
                              const optional<Tensor>& recurrent_masks, const optional<Tensor>& layer_norm) {
  const VariantArgs variants{w_peephole, zoneout, zoneout_masks, recurrent_masks, layer_norm};
  const LayerShape s =
      describe_layer_backward(cell, x, batch_sizes, h0, c0, w_ih, w_hh, w_hr, y, saved, dy, dh_n, dc_n, variants);
  BackwardOperands op = backward_operands(s, x, h0, c0, w_ih, w_hh, w_hr, variants, y, saved, dy, dh_n, dc_n);
  const auto opts = op.x.options();
  const int64_t GH = s.gates * s.H;
  LayerGrads g;
  g.dx = need_input_grad ? empty_large({s.N, s.I}, opts) : Tensor();
  const cpu::CpuPlan plan = cpu::plan_cpu(cpu::Pass::kBackward, s, op.x.scalar_type(), need_input_grad);
  // From the block cache like the outputs: a chain of cell calls frees and asks for these every
  // step, and fresh pages cost more than the step's products (bench/NOTES.md). The AVX-512 tiles
  // write the first chunk's dW whole (backward_loop.cpp: weight_grads); there is a chunk when there
  // is a step. Elsewhere dW is summed onto zeros.
  const bool dw_written_whole = plan.weight_grads == cpu::Kernel::kAvx512Tiles && s.T > 0;
  g.dw_ih = empty_large({GH, s.I}, opts);
  g.dw_hh = empty_large({GH, s.P}, opts);
  if (!dw_written_whole) {
    g.dw_ih.zero_();
    g.dw_hh.zero_();
  }
  if (has_bias) {
    g.db_ih = at::zeros({GH}, opts);
    g.db_hh = at::zeros({GH}, opts);
  }
  if (s.peephole) g.d_peephole = at::zeros({3 * s.H}, opts);
  if (s.layer_norm) g.d_layer_norm = at::zeros_like(op.variants.layer_norm);
  Tensor dh_total = s.proj ? empty_large({s.N, s.P}, opts) : Tensor();
  // resolve_conj makes a real copy for complex types and is free for real ones.
  const Tensor w_hh_conj = op.w_hh.conj().resolve_conj();
  const Tensor w_proj_conj = s.proj ? op.w_hr.conj().resolve_conj() : Tensor();
  backward_loop_cpu(plan, s, reverse, op, w_hh_conj, w_proj_conj, dh_total, g);
  // Both biases add to the same pre-activations, except GRU's b_hn (scaled by r): same gradient.
  if (has_bias && s.cell != CellKind::GRU) g.db_hh.copy_(g.db_ih);
  Tensor dw_hr;
  if (s.proj) dw_hr = at::mm(dh_total.t(), op.saved.narrow(1, s.proj_input_col(), s.H).conj());
  return gradients_as({g.dx, op.dh, op.dc, g.dw_ih, g.dw_hh, g.db_ih, g.db_hh, dw_hr, g.d_peephole, g.d_layer_norm},
                      x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_rnn, CPU, m) {
  m.impl("layer_forward", &layer_forward);
  m.impl("layer_backward", &layer_backward);
}

}  // namespace fused_rnn
