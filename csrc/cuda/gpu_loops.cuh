// The GPU includer of step_loops.cuh, shared by the translation units of csrc/cuda/: the CUDA
// headers, step_loops.cuh itself, and the names it asks its includer for (launch() on the current
// stream, multiprocessor_count(), forced_rows_per_block()). The kernels are instantiated in two
// translation units that ninja compiles in parallel: forward.cu, and layer_cuda.cu (the backward
// and the entry points).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdlib>

#include "step_loops.cuh"

namespace fused_rnn {
namespace {

template <typename Args>
void launch(void (*kernel)(Args), dim3 grid, dim3 block, const Args& args) {
  kernel<<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int multiprocessor_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

int forced_rows_per_block() {  // read per call, so that a benchmark can switch it between runs
  const char* value = std::getenv("FUSED_RNN_CUDA_ROWS_PER_BLOCK");
  return value == nullptr ? 0 : std::atoi(value);
}

}  // namespace
}  // namespace fused_rnn
