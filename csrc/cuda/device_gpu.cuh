// The device interface (device.h) on a GPU, the kernels' side: the launches on the current stream,
// and the device functions that persistent_loops.cuh asks of its includer (dynamic_shared_memory(),
// grid_sync()) with the PTX instructions of mma_ptx.cuh. Compiled by nvcc, through loops.cuh, in
// the translation units of the step loops (forward.cu, backward.cu); the host's side is
// device_gpu.cpp.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "device.h"
#include "mma_ptx.cuh"

// The block's dynamic shared memory (a cooperative kernel's resident weights and rows).
__device__ __forceinline__ unsigned char* dynamic_shared_memory() {
  extern __shared__ __align__(16) unsigned char dynamic_shared_bytes[];
  return dynamic_shared_bytes;
}
// The CUDA programming guide: once grid.sync() returns, every thread of the grid has reached it and
// the memory operations made before it are visible to all of them.
__device__ __forceinline__ void grid_sync() { cooperative_groups::this_grid().sync(); }

namespace fused_rnn {
namespace device {

template <typename Args>
void launch(void (*kernel)(Args), dim3 grid, dim3 block, const Args& args) {
  kernel<<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

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

}  // namespace device
}  // namespace fused_rnn
