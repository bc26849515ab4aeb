// The device interface (device.h) on a GPU, the host's side: the device's description from the CUDA
// runtime, cuBLAS's mixed-precision product, pinned copies; and the CUDA half's ops registered
// under the CUDA dispatch key. The launches are in device_gpu.cuh, with the kernels.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <torch/library.h>

#include <algorithm>

#include "device.h"

namespace fused_rnn {
namespace device {

int multiprocessor_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

int compute_capability(const at::Device& device) {
  const cudaDeviceProp* props = at::cuda::getDeviceProperties(device.index());
  return props->major * 10 + props->minor;
}

bool capturing_a_graph() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

at::Tensor upload(const std::vector<int64_t>& values, const at::Device& device) {
  // Pinned, so that the copy is asynchronous (the caching host allocator keeps the buffer until it
  // is done) and the host does not wait for the GPU here.
  at::Tensor host = at::empty({static_cast<int64_t>(values.size())},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(values.begin(), values.end(), host.data_ptr<int64_t>());
  return host.to(device, /*non_blocking=*/true);
}

at::Tensor product_in_float(const at::Tensor& a, const at::Tensor& b) { return at::mm(a, b, at::kFloat); }

}  // namespace device

TORCH_LIBRARY_IMPL(fused_rnn, CUDA, m) { implement_cuda_ops(m); }

}  // namespace fused_rnn
