// The device interface (csrc/cuda/device.h) under the emulation, the kernels' side: launches run the
// grid on fibers (emulated_cuda.h) and are counted, a cooperative grid must fit the emulated GPU.
// loops.cuh includes this instead of device_gpu.cuh when FUSED_RNN_EMULATED_CUDA is defined, so
// that forward.cu and backward.cu compile for the CPU unchanged (forward_emulated.cpp,
// backward_emulated.cpp); the host's side is device_emulated.cpp.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

#include "emulated_cuda.h"
#include "../cuda/device.h"
#include "../cuda/loops_by_dtype.h"
#include "../layer.h"

namespace emulated_cuda {

// The GPU the emulation stands for (fused_rnn.testing.emulate_cuda()'s arguments), by default an
// H100's numbers: 132 multiprocessors, compute capability 9.0, 227 KB of shared memory a block. A
// cooperative grid may have as many blocks as there are multiprocessors times the blocks whose
// dynamic shared memory fits one block's 227 KB (threads and registers are not counted).
struct Gpu {
  int multiprocessors = 132;
  int compute_capability = 90;
  std::size_t shared_bytes_per_block = 227 * 1024;
};
inline Gpu gpu;
// Kernel launches emulated since the module was loaded, cooperative ones included, from any thread.
inline std::atomic<long> launches{0};

}  // namespace emulated_cuda

namespace fused_rnn {
namespace device {

template <typename Args>
void launch(void (*kernel)(Args), dim3 grid, dim3 block, const Args& args) {
  ++emulated_cuda::launches;
  emulated_cuda::run_grid(grid, block, [&] { kernel(args); });
}

template <typename Args>
int64_t cooperative_capacity(void (*)(Args), dim3, std::size_t shared_bytes) {
  const emulated_cuda::Gpu& gpu = emulated_cuda::gpu;
  if (shared_bytes > gpu.shared_bytes_per_block) return 0;
  const std::size_t per_sm = shared_bytes == 0 ? 32 : gpu.shared_bytes_per_block / shared_bytes;
  return static_cast<int64_t>(gpu.multiprocessors) * static_cast<int64_t>(per_sm);
}

template <typename Args>
void launch_cooperative(void (*kernel)(Args), dim3 grid, dim3 block, std::size_t shared_bytes, const Args& args) {
  ++emulated_cuda::launches;
  const long capacity = static_cast<long>(cooperative_capacity(kernel, block, shared_bytes));
  emulated_cuda::run_cooperative(grid, block, shared_bytes, capacity, [&] { kernel(args); });
}

}  // namespace device

// What the kernels' translation units tell the emulation's module of the cost model, for tests, on
// the emulated GPU: the rows per block of the variant that a step of n rows runs ("forward" on the
// CUDA cores, "tensor_core" with float16 W_hh, "backward" the fused one; forward_emulated.cpp).
// Whether a layer takes a persistent kernel is the plan's question (loops_by_dtype.h).
int64_t chosen_rows_per_block(const std::string& kernel, CellKind cell, int64_t n, int64_t H, int64_t P,
                              bool float64);

}  // namespace fused_rnn
