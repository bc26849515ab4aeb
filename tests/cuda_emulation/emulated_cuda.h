// Just enough of CUDA's programming model to run csrc/cuda/step_loops.cuh on the CPU, so that the
// CUDA-core kernels and the step loops around them are tested where no GPU is (CI, most machines):
//  - a launch runs the grid's blocks one after another, each block as one host thread per CUDA
//    thread, with threadIdx / blockIdx / blockDim / gridDim as thread-locals;
//  - __shared__ arrays are function statics: one copy, which the block that runs uses alone;
//  - __syncthreads() is a barrier over the block's threads. Reaching one after another thread of
//    the block has returned is an error (undefined behaviour on a GPU), reported as an exception
//    from the launch instead of a hang.
// What it cannot show: the speed, the memory model's weaker orderings, warp-level behaviour, and
// anything of the tensor-core kernel (wmma), which stays in layer_cuda.cu.
#pragma once

#include <condition_variable>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emulated_cuda {

struct BarrierMisuse : std::runtime_error {
  BarrierMisuse()
      : std::runtime_error("emulated CUDA: __syncthreads() reached after a thread of the block had returned") {}
};

class BlockBarrier {
 public:
  explicit BlockBarrier(int threads) : threads_(threads) {}

  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    if (returned_ > 0) throw BarrierMisuse();
    const unsigned long generation = generation_;
    if (++arrived_ == threads_) {
      arrived_ = 0;
      ++generation_;
      all_arrived_.notify_all();
      return;
    }
    all_arrived_.wait(lock, [&] { return generation_ != generation || returned_ > 0; });
    if (generation_ == generation) throw BarrierMisuse();  // woken by a thread that returned
  }

  void thread_returned() {
    std::lock_guard<std::mutex> lock(mutex_);
    ++returned_;
    all_arrived_.notify_all();  // threads waiting now would wait forever
  }

 private:
  std::mutex mutex_;
  std::condition_variable all_arrived_;
  const int threads_;
  int arrived_ = 0, returned_ = 0;
  unsigned long generation_ = 0;
};

inline thread_local BlockBarrier* block_barrier = nullptr;

// Runs body() as every thread of every block of the grid; rethrows the first exception of any thread.
template <typename Body>
void run_grid(dim3 grid, dim3 block, const Body& body) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        BlockBarrier barrier(threads);
        std::mutex error_mutex;
        std::exception_ptr error;
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned tz = 0; tz < block.z; ++tz) {
          for (unsigned ty = 0; ty < block.y; ++ty) {
            for (unsigned tx = 0; tx < block.x; ++tx) {
              pool.emplace_back([&, tx, ty, tz, bx, by, bz] {
                threadIdx = dim3(tx, ty, tz);
                blockIdx = dim3(bx, by, bz);
                blockDim = block;
                gridDim = grid;
                block_barrier = &barrier;
                try {
                  body();
                } catch (...) {
                  const std::lock_guard<std::mutex> lock(error_mutex);
                  if (!error) error = std::current_exception();
                }
                barrier.thread_returned();
              });
            }
          }
        }
        for (std::thread& t : pool) t.join();
        if (error) std::rethrow_exception(error);
      }
    }
  }
}

}  // namespace emulated_cuda

inline void __syncthreads() { emulated_cuda::block_barrier->arrive_and_wait(); }
