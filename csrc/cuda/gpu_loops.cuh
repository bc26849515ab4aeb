// The GPU includer of step_loops.cuh and persistent_loops.cuh, shared by the translation units of
// csrc/cuda/: the CUDA headers, the PTX instructions (mma_ptx.cuh), the two files, and the names
// they ask their includer for (launch() on the current stream, multiprocessor_count(),
// forced_rows_per_block(); dynamic_shared_memory(), grid_sync(), launch_cooperative(),
// cooperative_capacity()).
// The kernels are instantiated in two translation units that ninja compiles in parallel:
// forward.cu, and layer_cuda.cu (the backward and the entry points).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAException.h>
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdlib>

#include "mma_ptx.cuh"

// What persistent_loops.cuh asks of its includer on the device.
__device__ __forceinline__ unsigned char* dynamic_shared_memory() {
  extern __shared__ __align__(16) unsigned char dynamic_shared_bytes[];
  return dynamic_shared_bytes;
}
// The CUDA programming guide: once grid.sync() returns, every thread of the grid has reached it and
// the memory operations made before it are visible to all of them.
__device__ __forceinline__ void grid_sync() { cooperative_groups::this_grid().sync(); }

#include "persistent_loops.cuh"  // and step_loops.cuh

namespace fused_rnn {
namespace {

template <typename Args>
void launch(void (*kernel)(Args), dim3 grid, dim3 block, const Args& args) {
  kernel<<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int multiprocessor_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Lets `kernel` take as much dynamic shared memory as a block can have (less its static shared
// memory): always the same value, so that host threads launching it with different sizes at once
// cannot lower the limit under one another's launch.
template <typename Args>
void allow_all_shared_bytes(void (*kernel)(Args)) {
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, reinterpret_cast<const void*>(kernel)));
  const size_t most = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin - attributes.sharedSizeBytes;
  C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(most)));
}

template <typename Args>
void launch_cooperative(void (*kernel)(Args), dim3 grid, dim3 block, size_t shared_bytes, const Args& args) {
  allow_all_shared_bytes(kernel);
  void* params[] = {const_cast<Args*>(&args)};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), grid, block, params, shared_bytes,
                                             at::cuda::getCurrentCUDAStream()));
}

// Blocks of `kernel` that can be resident at once: its occupancy per SM with this much dynamic
// shared memory, times the SMs; 0 where the device cannot launch cooperatively or a block cannot
// have that much shared memory.
template <typename Args>
int64_t cooperative_capacity(void (*kernel)(Args), dim3 block, size_t shared_bytes) {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  if (!props->cooperativeLaunch || shared_bytes > props->sharedMemPerBlockOptin) return 0;
  allow_all_shared_bytes(kernel);
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, reinterpret_cast<const void*>(kernel), static_cast<int>(block.x * block.y * block.z), shared_bytes));
  return static_cast<int64_t>(per_sm) * props->multiProcessorCount;
}

bool capturing_a_graph() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

int forced_rows_per_block() {  // read per call, so that a benchmark can switch it between runs
  const char* value = std::getenv("FUSED_RNN_CUDA_ROWS_PER_BLOCK");
  return value == nullptr ? 0 : std::atoi(value);
}

}  // namespace
}  // namespace fused_rnn
