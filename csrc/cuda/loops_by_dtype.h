// The step loops of csrc/cuda/step_loops.cuh for one dtype each, defined in forward.cu and
// layer_cuda.cu: the entry points in layer_cuda.cu pick one by dtype. Arguments as forward_loop_cuda's
// and backward_loop_cuda's (csrc/layer.h); the half types' forward takes float32 gx, y, h, c, saved.
#pragma once

#include <ATen/ATen.h>

#include "../layer.h"

namespace fused_rnn {

#define FUSED_RNN_DECLARE_FORWARD_LOOP(name)                                                                    \
  void name(const LayerShape& s, bool reverse, const at::Tensor& gx, const at::Tensor& w_hh,                   \
            const at::Tensor& b_hn, const at::Tensor& w_hr, at::Tensor& y, at::Tensor& h, at::Tensor& c,       \
            at::Tensor& saved)
#define FUSED_RNN_DECLARE_BACKWARD_LOOP(name)                                                                   \
  void name(const LayerShape& s, bool reverse, const at::Tensor& w_hh_conj, const at::Tensor& w_hr_conj,       \
            const at::Tensor& outputs, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& saved,    \
            const at::Tensor& dy, at::Tensor& dh, at::Tensor& dc, at::Tensor& dgx, at::Tensor& dgh,            \
            at::Tensor& dh_total, bool fuse)

FUSED_RNN_DECLARE_FORWARD_LOOP(forward_loop_cuda_float);
FUSED_RNN_DECLARE_FORWARD_LOOP(forward_loop_cuda_double);
FUSED_RNN_DECLARE_FORWARD_LOOP(forward_loop_cuda_half);      // float16 W_hh, tensor cores
FUSED_RNN_DECLARE_FORWARD_LOOP(forward_loop_cuda_bfloat16);  // bfloat16 W_hh, tensor cores
FUSED_RNN_DECLARE_FORWARD_LOOP(forward_loop_cuda_tf32);      // float32 W_hh, tensor cores in TF32
FUSED_RNN_DECLARE_BACKWARD_LOOP(backward_loop_cuda_float);
FUSED_RNN_DECLARE_BACKWARD_LOOP(backward_loop_cuda_double);

}  // namespace fused_rnn
