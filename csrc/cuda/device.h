// What the CUDA half needs that only a GPU has: the one interface between its host code (ops_cuda.cpp,
// the step loops of step_loops.cuh and persistent_loops.cuh) and the hardware. Two implementations:
//  - on a GPU: device_gpu.cuh (the launches, compiled by nvcc with the kernels) and device_gpu.cpp
//    (the device's description, cuBLAS's mixed-precision product, pinned copies; the ops'
//    registration under the CUDA dispatch key);
//  - for tests, csrc/cuda_emulation/: the same host code and kernels compiled for the CPU, the
//    kernels run on fibers (emulated_cuda.h), an H100's numbers by default, and the ops registered
//    under the CPU key while fused_rnn.testing.emulate_cuda() is active.
// Everything else the host code does (allocations, copies, matrix products, sums) is ATen's, on the
// tensors' own device: CUDA on a GPU, the CPU under the emulation.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>
#include <vector>

struct dim3;  // CUDA's (vector_types.h), or the emulation's

namespace torch {
class Library;
}

namespace fused_rnn {
namespace device {

// --- Launches, on the current stream, each checked. --------------------------------------------
// Defined beside the kernels (device_gpu.cuh, or the emulation's device_emulated.h), which loops.cuh
// brings into the loops' translation units only: host code elsewhere launches through the loops.
// kernel<<<grid, block>>>(args).
template <typename Args>
void launch(void (*kernel)(Args), dim3 grid, dim3 block, const Args& args);
// A cooperative launch with `shared_bytes` of dynamic shared memory a block: every block of the grid
// resident at once, grid_sync() a barrier over all of them. The grid must fit (cooperative_capacity).
template <typename Args>
void launch_cooperative(void (*kernel)(Args), dim3 grid, dim3 block, std::size_t shared_bytes, const Args& args);
// How many blocks of `kernel` with this much dynamic shared memory can be resident at once: its
// occupancy per multiprocessor times the multiprocessors; 0 where a block cannot have that much
// shared memory or the device cannot launch cooperatively.
template <typename Args>
int64_t cooperative_capacity(void (*kernel)(Args), dim3 block, std::size_t shared_bytes);

// --- The device. -------------------------------------------------------------------------------
// Multiprocessors of the current device.
int multiprocessor_count();
// `device`'s compute capability, major * 10 + minor (90 on an H100).
int compute_capability(const at::Device& device);
// Whether the current stream is being captured into a CUDA graph (a copy from the host cannot be).
bool capturing_a_graph();

// --- Memory and products. ----------------------------------------------------------------------
// `values` as an int64 tensor on `device`, copied from pinned memory without waiting for the device.
at::Tensor upload(const std::vector<int64_t>& values, const at::Device& device);
// a·b of float16 or bfloat16 matrices, the products summed in float32 and returned in float32
// (cuBLAS's mixed-precision product, which ATen's CPU kernels do not have).
at::Tensor product_in_float(const at::Tensor& a, const at::Tensor& b);

}  // namespace device

// The CUDA half's ops (ops_cuda.cpp), registered on `m`: under the CUDA dispatch key on a GPU
// (device_gpu.cpp), under the CPU key while the emulation is active.
void implement_cuda_ops(torch::Library& m);

}  // namespace fused_rnn
