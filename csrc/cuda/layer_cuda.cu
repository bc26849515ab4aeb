// The GPU side of csrc/cuda/step_loops.cuh (the step loops and their kernels, described there):
// kernel launches on the current stream, and the entry points that layer.cpp calls.
//
// Dtypes: float, double, and (forward) Half/BFloat16 weights with float32 everything else; complex
// is rejected in layer.cpp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdlib>
#include <string>

#include "step_loops.cuh"

namespace fused_rnn {
namespace {

template <typename Args>
void launch(void (*kernel)(Args), dim3 grid, dim3 block, const Args& args) {
  kernel<<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int multiprocessor_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// FUSED_RNN_CUDA_UNFUSED_BACKWARD=1: two launches per backward step (step_loops.cuh), read per call.
bool fused_backward_wanted() {
  const char* value = std::getenv("FUSED_RNN_CUDA_UNFUSED_BACKWARD");
  return value == nullptr || std::string(value).empty() || std::string(value) == "0";
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
      dispatch_cell<HalfTensorCoreForwardLoop, float>(s.cell, s, reverse, gx, w_hh, b_hn, w_hr, y, h, c, saved);
    } else {
      dispatch_cell<BFloat16TensorCoreForwardLoop, float>(s.cell, s, reverse, gx, w_hh, b_hn, w_hr, y, h, c,
                                                          saved);
    }
    return;
  }
  TORCH_CHECK(w_type == gx.scalar_type(), "fused_rnn: weight_hh has dtype ", w_type, " but gx ", gx.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(gx.scalar_type(), "fused_rnn_forward_cuda", [&] {
    dispatch_cell<CudaCoreForwardLoop, scalar_t>(s.cell, s, reverse, gx, w_hh, b_hn, w_hr, y, h, c, saved);
  });
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
  AT_DISPATCH_FLOATING_TYPES(saved.scalar_type(), "fused_rnn_backward_cuda", [&] {
    dispatch_cell<BackwardLoop, scalar_t>(s.cell, s, reverse, w_hh_conj, w_hr_conj, outputs, h0, c0, saved, dy, dh,
                                          dc, dgx, dgh, dh_total, fused_backward_wanted());
  });
}

}  // namespace fused_rnn
