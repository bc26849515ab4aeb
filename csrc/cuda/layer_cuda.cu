// The CUDA entry points that layer.cpp calls (checks, the device guard, the pick of the step loop
// by dtype) and the backward step loops of csrc/cuda/step_loops.cuh, every cell, float32 and float64
// (the half types reach them as float32). The forward loops are in forward.cu, which ninja builds
// in parallel with this file.
//
// Dtypes: float (forward: on the tensor cores in TF32 when cuDNN would be), double, and (forward)
// Half/BFloat16 weights with float32 everything else; complex is rejected in layer.cpp.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/version.h>

#include <cstdlib>
#include <string>

#include "gpu_loops.cuh"
#include "loops_by_dtype.h"

namespace fused_rnn {

FUSED_RNN_DECLARE_BACKWARD_LOOP(backward_loop_cuda_float) {
  dispatch_cell<CudaCoreBackwardLoop, float>(s.cell, s, reverse, w_hh_conj, w_hr_conj, outputs, h0, c0, saved, dy, dh, dc, dgx,
                                     dgh, dh_total, fuse);
}

FUSED_RNN_DECLARE_BACKWARD_LOOP(backward_loop_cuda_double) {
  dispatch_cell<CudaCoreBackwardLoop, double>(s.cell, s, reverse, w_hh_conj, w_hr_conj, outputs, h0, c0, saved, dy, dh, dc, dgx,
                                      dgh, dh_total, fuse);
}

namespace {

// FUSED_RNN_CUDA_UNFUSED_BACKWARD=1: two launches per backward step (step_loops.cuh), read per call.
bool fused_backward_wanted() {
  const char* value = std::getenv("FUSED_RNN_CUDA_UNFUSED_BACKWARD");
  return value == nullptr || std::string(value).empty() || std::string(value) == "0";
}

// float32's recurrent product on the tensor cores in TF32 where cuDNN's RNNs would use it: while
// torch.backends.cudnn.allow_tf32 is set (its default; from torch 2.9 also
// torch.backends.cudnn.rnn.fp32_precision = "tf32"), on compute capability 8.0 and up. The input
// projection is cuBLAS's, which follows torch.backends.cuda.matmul.allow_tf32 (off by default).
// The backward stays on the CUDA cores in float32.
bool tf32_as_cudnn_would(const at::Device& device) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
  const bool allowed = at::globalContext().allowTF32CuDNN(at::Float32Op::RNN);
#else
  const bool allowed = at::globalContext().allowTF32CuDNN();
#endif
  return allowed && cuda_tensor_cores_take_half_types(device);
}

}  // namespace

void forward_loop_cuda(const LayerShape& s, bool reverse, const Tensor& gx, const Tensor& w_hh, const Tensor& b_hn,
                       const Tensor& w_hr, Tensor& y, Tensor& h, Tensor& c, Tensor& saved) {
  TORCH_CHECK(gx.is_cuda(), "fused_rnn: forward_loop_cuda needs CUDA tensors");
  TORCH_CHECK(!gx.is_complex(), "fused_rnn: complex inputs are not supported on CUDA");
  const c10::cuda::CUDAGuard guard(gx.device());
  const auto w_type = w_hh.scalar_type();
  if (w_type == at::kHalf || w_type == at::kBFloat16) {
    TORCH_CHECK(gx.scalar_type() == at::kFloat, "fused_rnn: half-type weights need a float32 gx, got ",
                gx.scalar_type());
    if (w_type == at::kHalf) {
      forward_loop_cuda_half(s, reverse, gx, w_hh, b_hn, w_hr, y, h, c, saved);
    } else {
      forward_loop_cuda_bfloat16(s, reverse, gx, w_hh, b_hn, w_hr, y, h, c, saved);
    }
    return;
  }
  TORCH_CHECK(w_type == gx.scalar_type(), "fused_rnn: weight_hh has dtype ", w_type, " but gx ", gx.scalar_type());
  if (gx.scalar_type() == at::kFloat) {
    if (tf32_as_cudnn_would(gx.device())) {
      forward_loop_cuda_tf32(s, reverse, gx, w_hh, b_hn, w_hr, y, h, c, saved);
    } else {
      forward_loop_cuda_float(s, reverse, gx, w_hh, b_hn, w_hr, y, h, c, saved);
    }
  } else if (gx.scalar_type() == at::kDouble) {
    forward_loop_cuda_double(s, reverse, gx, w_hh, b_hn, w_hr, y, h, c, saved);
  } else {
    TORCH_CHECK(false, "fused_rnn: forward_loop_cuda does not take dtype ", gx.scalar_type());
  }
}

bool cuda_tensor_cores_take_half_types(const at::Device& device) {
  return at::cuda::getDeviceProperties(device.index())->major >= 8;  // see forward_step_tensor_core_kernel
}

void backward_loop_cuda(const LayerShape& s, bool reverse, const Tensor& w_hh_conj, const Tensor& w_hr_conj,
                        const Tensor& outputs, const Tensor& h0, const Tensor& c0, const Tensor& saved,
                        const Tensor& dy, Tensor& dh, Tensor& dc, Tensor& dgx, Tensor& dgh, Tensor& dh_total) {
  TORCH_CHECK(saved.is_cuda(), "fused_rnn: backward_loop_cuda needs CUDA tensors");
  TORCH_CHECK(!saved.is_complex(), "fused_rnn: complex inputs are not supported on CUDA");
  const c10::cuda::CUDAGuard guard(saved.device());
  const bool fuse = fused_backward_wanted();
  if (saved.scalar_type() == at::kFloat) {
    backward_loop_cuda_float(s, reverse, w_hh_conj, w_hr_conj, outputs, h0, c0, saved, dy, dh, dc, dgx, dgh,
                             dh_total, fuse);
  } else if (saved.scalar_type() == at::kDouble) {
    backward_loop_cuda_double(s, reverse, w_hh_conj, w_hr_conj, outputs, h0, c0, saved, dy, dh, dc, dgx, dgh,
                              dh_total, fuse);
  } else {
    TORCH_CHECK(false, "fused_rnn: backward_loop_cuda does not take dtype ", saved.scalar_type());
  }
}

}  // namespace fused_rnn
