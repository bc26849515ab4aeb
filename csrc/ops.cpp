// The compiled ops' schemas, torch.ops.fused_rnn.*. Each device's half registers its own
// implementations under its dispatch key: csrc/cpu/ops_cpu.cpp (CPU, and the int8 op in
// csrc/cpu/quantized_cpu.cpp), csrc/cuda/ops_cuda.cpp (CUDA). fused_rnn/_ops.py gives them their
// shapes for tracing (register_fake), fused_rnn/functional.py their autograd.
#include <torch/library.h>

// batch_sizes: rows per step in packed layout (non-increasing), or empty for a padded input, whose
// steps all have h0's rows. w_peephole: an LSTM's peephole weights [3*H] in the order (i, f, o)
// (cells.h), or None for torch.nn's LSTM. zoneout: the probability z of keeping a unit's previous
// state (cells.h's Zoneout), 0 for none; zoneout_masks [N·H + N·P] for LSTM (c_t's [N, H], then h_t's
// [N, P]) or [N·H] for GRU and RNN, 1 where a unit keeps its previous state (training), or None for
// the expectation z (eval). recurrent_masks [B, P]: recurrent dropout's mask of each sequence, 0 or
// 1/(1 - p) per unit, which scales h_{t-1} where the recurrent product takes it (cells.h's
// RecurrentDropout; training), or None. layer_norm: the weights of a layer-normalized cell, [ln_ih (G·H)
// | ln_hh (G·H) | LSTM: ln_c weight (H) | ln_c bias (H)] (cells.h's RowNorm and CellNorm), or None.
// The backward's gradients are undefined where not applicable.
TORCH_LIBRARY(fused_rnn, m) {
  m.def(
      "layer_forward(int cell, Tensor x, int[] batch_sizes, bool reverse, Tensor h0, Tensor? c0, "
      "Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, bool need_saved, "
      "Tensor? w_peephole=None, float zoneout=0., Tensor? zoneout_masks=None, Tensor? recurrent_masks=None, "
      "Tensor? layer_norm=None) -> (Tensor y, Tensor h_n, Tensor c_n, Tensor saved)");
  m.def(
      "layer_backward(int cell, Tensor x, int[] batch_sizes, bool reverse, Tensor h0, Tensor? c0, "
      "Tensor w_ih, Tensor w_hh, Tensor? w_hr, bool has_bias, Tensor y, Tensor saved, Tensor? grad_y, "
      "Tensor? grad_h_n, Tensor? grad_c_n, bool need_input_grad, Tensor? w_peephole=None, float zoneout=0., "
      "Tensor? zoneout_masks=None, Tensor? recurrent_masks=None, Tensor? layer_norm=None) "
      "-> (Tensor grad_x, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, "
      "Tensor grad_b_ih, Tensor grad_b_hh, Tensor grad_w_hr, Tensor grad_w_peephole, Tensor grad_layer_norm)");
  m.def(
      "quantized_layer_forward(int cell, Tensor x, int[] batch_sizes, bool reverse, Tensor h0, Tensor? c0, "
      "Tensor w_ih, Tensor w_ih_scale, Tensor w_ih_row_sum, Tensor w_hh, Tensor w_hh_scale, "
      "Tensor w_hh_row_sum, Tensor? b_ih, Tensor? b_hh) -> (Tensor y, Tensor h_n, Tensor c_n)");
  m.def("quantized_pack_weight(Tensor weight, int gates) -> Tensor");
}
