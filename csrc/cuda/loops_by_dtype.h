// The step loops of step_loops.cuh and persistent_loops.cuh for one dtype each, defined in forward.cu
// and backward.cu: ops_cuda.cpp picks one by dtype. The arguments:
//   gx       [N, G*H]  x·W_ihᵀ plus the folded biases
//   w_hh     [G*H, P]  in gx's type, or float16 / bfloat16 (the tensor cores) with everything else float32
//   b_hn     [H]       GRU's n-gate hidden bias, or undefined
//   variants the operands of the options torch.nn lacks (layer.h), undefined when off (both loops)
//   y        [N, P]    output, written
//   h, c     [B, P], [B, H]  state: initial in, final out (c undefined unless LSTM)
//   saved    [N, saved_cols] written when defined (a gradient is wanted)
// and backward's
//   w_hh_conj, w_hr_conj  conj of the weights (the weights themselves: CUDA takes no complex types)
//   outputs  [N, P] the forward's outputs, h_t of every row (a view with row stride >= P)
//   h0, c0   [B, P], [B, H] the initial state (c0 undefined unless LSTM)
//   dy       [N, P] or undefined
//   dh, dc   [B, P], [B, H]  gradient at h_n, c_n in; at h_0, c_0 out
//   dgx, dgh [N, G*H] the gate gradients, written (dgh: GRU's recurrent side, else the same as dgx)
//   dh_total [N, P] written with the full gradient at each h_t when the LSTM has a projection
//   fuse     one launch per step where the shape allows (the plan's fused_backward)
// and both loops' `persistent`: the plan's (cuda_plan.h), one cooperative launch for the sequence.
#pragma once

#include <ATen/ATen.h>

#include "../layer.h"
#include "cuda_plan.h"

namespace fused_rnn {

#define FUSED_RNN_DECLARE_FORWARD_LOOP(name)                                                                    \
  void name(const LayerShape& s, bool reverse, const at::Tensor& gx, const at::Tensor& w_hh,                   \
            const at::Tensor& b_hn, const at::Tensor& w_hr, const Variants& variants, at::Tensor& y,           \
            at::Tensor& h, at::Tensor& c, at::Tensor& saved, bool persistent)
#define FUSED_RNN_DECLARE_BACKWARD_LOOP(name)                                                                   \
  void name(const LayerShape& s, bool reverse, const at::Tensor& w_hh_conj, const at::Tensor& w_hr_conj,       \
            const Variants& variants, const at::Tensor& outputs, const at::Tensor& h0, const at::Tensor& c0,   \
            const at::Tensor& saved, const at::Tensor& dy, at::Tensor& dh, at::Tensor& dc, at::Tensor& dgx,    \
            at::Tensor& dgh, at::Tensor& dh_total, bool fuse, bool persistent)

FUSED_RNN_DECLARE_FORWARD_LOOP(forward_loop_cuda_float);
FUSED_RNN_DECLARE_FORWARD_LOOP(forward_loop_cuda_double);
FUSED_RNN_DECLARE_FORWARD_LOOP(forward_loop_cuda_half);      // float16 W_hh, tensor cores
FUSED_RNN_DECLARE_FORWARD_LOOP(forward_loop_cuda_bfloat16);  // bfloat16 W_hh, tensor cores
FUSED_RNN_DECLARE_FORWARD_LOOP(forward_loop_cuda_tf32);      // float32 W_hh, tensor cores in TF32
FUSED_RNN_DECLARE_BACKWARD_LOOP(backward_loop_cuda_float);
FUSED_RNN_DECLARE_BACKWARD_LOOP(backward_loop_cuda_double);

// Whether the persistent kernel can and should run the layer (persistent_loops.cuh's rule, the
// cuda_persistent override and the GPU's room for its grid): plan_cuda's question, answered where
// the kernels are (forward.cu, backward.cu; the backward's only for the fused backward).
bool persistent_forward_chosen(cuda::Recurrent recurrent, const LayerShape& s);
bool persistent_backward_chosen(cuda::Recurrent recurrent, const LayerShape& s);

}  // namespace fused_rnn
