// Just enough of CUDA's programming model to run csrc/cuda/step_loops.cuh on the CPU, so that the
// kernels and the step loops around them are tested where no GPU is (CI, most machines):
//  - a launch runs the grid's blocks one after another, in ascending order or (blocks_descending)
//    the other way round, each block as one host thread per CUDA thread, with threadIdx /
//    blockIdx / blockDim / gridDim as thread-locals. Blocks of one launch must not depend on each
//    other: the two orders give the same results only when they don't;
//  - __shared__ arrays are function statics: one copy, which the block that runs uses alone;
//  - __syncthreads() is a barrier over the block's threads. Reaching one after another thread of
//    the block has returned is an error (undefined behaviour on a GPU), reported as an exception
//    from the launch instead of a hang.
//  - __half / __nv_bfloat16 are c10::Half / c10::BFloat16 (the same bits, and the same rounding to
//    nearest even from float);
//  - nvcuda::wmma's 16x16x16 fragments hold whole tiles: lane 0 of each warp does the warp's
//    product and store (float32 sums of exact products), and every load and store checks what the
//    hardware requires (256-bit aligned pointers, ldm a multiple of 16 bytes).
// What it cannot show: the speed, the memory model's weaker orderings, warp-level behaviour, and
// the tensor cores' own order of summation.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <condition_variable>
#include <cstdint>
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
inline bool blocks_descending = false;

// Runs body() as every thread of every block of the grid; rethrows the first exception of any thread.
template <typename Body>
void run_grid(dim3 grid, dim3 block, const Body& body) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  const unsigned long blocks = static_cast<unsigned long>(grid.x) * grid.y * grid.z;
  for (unsigned long k = 0; k < blocks; ++k) {
    const unsigned long linear = blocks_descending ? blocks - 1 - k : k;
    const unsigned bx = linear % grid.x, by = linear / grid.x % grid.y, bz = linear / grid.x / grid.y;
    BlockBarrier barrier(threads);
    std::mutex error_mutex;
    std::exception_ptr error;
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned tz = 0; tz < block.z; ++tz) {
      for (unsigned ty = 0; ty < block.y; ++ty) {
        for (unsigned tx = 0; tx < block.x; ++tx) {
          pool.emplace_back([&, tx, ty, tz] {
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

}  // namespace emulated_cuda

inline void __syncthreads() { emulated_cuda::block_barrier->arrive_and_wait(); }

using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline __half __float2half_rn(float v) { return __half(v); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return __nv_bfloat16(v); }

namespace emulated_cuda {
inline int lane() {
  return static_cast<int>((threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x) % 32;
}
}  // namespace emulated_cuda

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
enum layout_t { mem_row_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "emulated wmma: 16x16x16 only");
  T x[16][16];
};

template <typename T>
void check_operand(const T* p, unsigned ldm, const char* what) {
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0) {
    throw std::runtime_error(std::string("emulated wmma: ") + what + " pointer not 256-bit aligned");
  }
  if (ldm % (16 / sizeof(T)) != 0) {
    throw std::runtime_error(std::string("emulated wmma: ") + what + " ldm not a multiple of 16 bytes");
  }
}

template <typename Use, typename T>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, row_major>& f, const T* p, unsigned ldm) {
  check_operand(p, ldm, "load_matrix_sync");
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) f.x[r][c] = p[r * ldm + c];
  }
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float v) {
  for (auto& row : f.x) {
    for (float& e : row) e = v;
  }
}

template <typename T>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, row_major>& a,
              const fragment<matrix_b, 16, 16, 16, T, row_major>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  if (emulated_cuda::lane() != 0) return;  // lane 0 holds the warp's result
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      float sum = c.x[i][j];
      for (int k = 0; k < 16; ++k) sum += static_cast<float>(a.x[i][k]) * static_cast<float>(b.x[k][j]);
      d.x[i][j] = sum;
    }
  }
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t) {
  check_operand(p, ldm, "store_matrix_sync");
  if (emulated_cuda::lane() != 0) return;
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) p[r * ldm + c] = f.x[r][c];
  }
}

}  // namespace wmma
}  // namespace nvcuda
