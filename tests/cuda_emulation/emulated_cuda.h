// Just enough of CUDA's programming model to run csrc/cuda/step_loops.cuh on the CPU, so that the
// kernels and the step loops around them are tested where no GPU is (CI, most machines):
//  - a launch runs the grid's blocks one after another, in ascending order or (blocks_descending)
//    the other way round, each block's CUDA threads as fibers on the calling host thread, with
//    threadIdx / blockIdx / blockDim / gridDim set for each. Blocks of one launch must not depend
//    on each other: the two orders give the same results only when they don't;
//  - each thread runs until it waits at a barrier or returns, the threads in order: as far out of
//    step with each other as a barrier allows, so that a missing barrier shows as wrong values
//    (a thread reads shared memory that the others have not yet written, or overwrites what they
//    have not yet read), the same on every run;
//  - __shared__ arrays are function statics: one copy, which the block that runs uses alone;
//  - __syncthreads() is a barrier over the block's threads. Reaching one after another thread of
//    the block has returned, or while others wait at another barrier, is an error (undefined
//    behaviour on a GPU), reported as an exception from the launch instead of a hang.
//  - __half / __nv_bfloat16 are c10::Half / c10::BFloat16 (the same bits, and the same rounding to
//    nearest even from float);
//  - nvcuda::wmma's 16x16x16 fragments (16x16x8 for TF32) hold whole tiles: lane 0 of each warp
//    does the warp's product and store (float32 sums of exact products), and every load and store
//    checks what the hardware requires (256-bit aligned pointers, ldm a multiple of 16 bytes);
//    __float_to_tf32 rounds as the hardware's cvt.rna.tf32.f32 does.
// What it cannot show: the speed, the memory model's weaker orderings, warp-level behaviour beyond
// the exchanges emulated here, and the tensor cores' own order of summation.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
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
  using std::runtime_error::runtime_error;
};

// The CUDA threads of a block as fibers (ucontext) on the calling host thread. A pass resumes every
// runnable fiber in thread order, and each runs until it waits at a barrier or returns; then every
// barrier that all its threads have reached releases them. A barrier that some of its threads can
// never reach (one has returned, or waits at another barrier) is reported as an exception from the
// launch instead of a hang.
class Block {
 public:
  static constexpr std::size_t kStackBytes = 256 * 1024;
  static constexpr int kWarpSize = 32;

  template <typename Body>
  void run(dim3 grid, dim3 block_index, dim3 block, const Body& body) {
    threads_ = static_cast<int>(block.x * block.y * block.z);
    const int warps = (threads_ + kWarpSize - 1) / kWarpSize;
    fibers_.resize(static_cast<std::size_t>(threads_));
    warp_arrived_.assign(static_cast<std::size_t>(warps), 0);
    block_arrived_ = 0;
    error_ = nullptr;
    body_ = [&body] { body(); };
    grid_ = grid, block_index_ = block_index, block_ = block;
    for (int i = 0; i < threads_; ++i) {
      Fiber& f = fibers_[static_cast<std::size_t>(i)];
      if (!f.stack) f.stack.reset(new char[kStackBytes]);
      f.thread = dim3(i % block.x, i / block.x % block.y, i / block.x / block.y);
      f.waiting = kRunnable;
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack.get();
      f.context.uc_stack.ss_size = kStackBytes;
      f.context.uc_link = &scheduler_;
      makecontext(&f.context, &Block::entry, 0);
    }
    Block* const outer = running;
    running = this;
    try {
      schedule();
    } catch (...) {
      running = outer;
      throw;
    }
    running = outer;
  }

  // __syncthreads() and the emulation's warp-wide exchanges: wait until every thread of the
  // block (or of the calling thread's warp) has arrived.
  static void wait_for_block() { running->wait(kAtBlockBarrier); }
  static void wait_for_warp() { running->wait(kAtWarpBarrier); }

 private:
  enum : int { kRunnable, kReturned, kAtBlockBarrier, kAtWarpBarrier };
  struct Fiber {
    ucontext_t context;
    std::unique_ptr<char[]> stack;
    dim3 thread;
    int waiting = kRunnable;
  };

  static inline thread_local Block* running = nullptr;

  static void entry() {
    Block& b = *running;
    try {
      b.body_();
    } catch (...) {
      if (!b.error_) b.error_ = std::current_exception();
    }
    b.fibers_[static_cast<std::size_t>(b.current_)].waiting = kReturned;
  }  // to scheduler_, through uc_link

  void wait(int barrier) {
    Fiber& f = fibers_[static_cast<std::size_t>(current_)];
    f.waiting = barrier;
    if (barrier == kAtBlockBarrier) {
      ++block_arrived_;
    } else {
      ++warp_arrived_[static_cast<std::size_t>(current_ / kWarpSize)];
    }
    swapcontext(&f.context, &scheduler_);
  }

  int warp_threads(int warp) const { return std::min(kWarpSize, threads_ - warp * kWarpSize); }

  void schedule() {
    for (;;) {
      for (current_ = 0; current_ < threads_; ++current_) {
        Fiber& f = fibers_[static_cast<std::size_t>(current_)];
        if (f.waiting != kRunnable) continue;
        threadIdx = f.thread;
        blockIdx = block_index_;
        blockDim = block_;
        gridDim = grid_;
        swapcontext(&scheduler_, &f.context);
        if (error_) std::rethrow_exception(error_);  // the other fibers are abandoned
      }
      bool released = false;
      if (block_arrived_ == threads_) {
        release([](int, const Fiber& f) { return f.waiting == kAtBlockBarrier; });
        block_arrived_ = 0;
        released = true;
      }
      for (int w = 0; w < static_cast<int>(warp_arrived_.size()); ++w) {
        if (warp_arrived_[static_cast<std::size_t>(w)] == warp_threads(w)) {
          release([w](int i, const Fiber& f) { return i / kWarpSize == w && f.waiting == kAtWarpBarrier; });
          warp_arrived_[static_cast<std::size_t>(w)] = 0;
          released = true;
        }
      }
      if (released) continue;
      int returned = 0;
      for (const Fiber& f : fibers_) returned += f.waiting == kReturned;
      if (returned == threads_) return;
      throw BarrierMisuse(returned > 0 ? "emulated CUDA: a barrier reached after a thread of the block had returned"
                                       : "emulated CUDA: the threads of a block wait at different barriers");
    }
  }

  template <typename Which>
  void release(const Which& which) {
    for (int i = 0; i < threads_; ++i) {
      Fiber& f = fibers_[static_cast<std::size_t>(i)];
      if (which(i, f)) f.waiting = kRunnable;
    }
  }

  ucontext_t scheduler_;
  std::vector<Fiber> fibers_;
  std::vector<int> warp_arrived_;
  int threads_ = 0, block_arrived_ = 0, current_ = 0;
  std::exception_ptr error_;
  std::function<void()> body_;
  dim3 grid_, block_index_, block_;
};

inline bool blocks_descending = false;

// Runs body() as every thread of every block of the grid, the blocks one after another;
// rethrows the first exception of any thread.
template <typename Body>
void run_grid(dim3 grid, dim3 block, const Body& body) {
  static thread_local Block runner;  // its fibers' stacks serve every launch
  const unsigned long blocks = static_cast<unsigned long>(grid.x) * grid.y * grid.z;
  for (unsigned long k = 0; k < blocks; ++k) {
    const unsigned long linear = blocks_descending ? blocks - 1 - k : k;
    runner.run(grid, dim3(linear % grid.x, linear / grid.x % grid.y, linear / grid.x / grid.y), block, body);
  }
}

}  // namespace emulated_cuda

inline void __syncthreads() { emulated_cuda::Block::wait_for_block(); }

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
namespace precision {
struct tf32 {};  // float32 storage; __float_to_tf32 rounds the values that mma_sync takes
}  // namespace precision

// TF32: float32 with a 10-bit mantissa, rounded to nearest with ties away from zero (cvt.rna).
inline float __float_to_tf32(float v) {
  if (!std::isfinite(v)) return v;
  std::uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  bits = (bits + 0x1000u) & 0xFFFFE000u;
  std::memcpy(&v, &bits, sizeof bits);
  return v;
}

template <typename T>
struct storage {
  using type = T;
};
template <>
struct storage<precision::tf32> {
  using type = float;
};

// Whole tiles: A is M x K, B is K x N, the accumulator M x N; every thread holds all of it, as
// num_elements values (the hardware spreads them over the warp's lanes).
template <typename Use, int M, int N, int K>
struct tile_shape {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
};

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && (K == 16 || (K == 8 && std::is_same_v<T, precision::tf32>) ||
                                       std::is_same_v<Use, accumulator>),
                "emulated wmma: 16x16x16, or 16x16x8 for TF32");
  using shape = tile_shape<Use, M, N, K>;
  static constexpr int rows = shape::rows, cols = shape::cols, num_elements = rows * cols;
  typename storage<T>::type x[num_elements];
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

template <typename Use, int K, typename T, typename S>
void load_matrix_sync(fragment<Use, 16, 16, K, T, row_major>& f, const S* p, unsigned ldm) {
  static_assert(std::is_same_v<typename storage<T>::type, S>, "emulated wmma: loads from the fragment's storage type");
  check_operand(p, ldm, "load_matrix_sync");
  using F = fragment<Use, 16, 16, K, T, row_major>;
  for (int r = 0; r < F::rows; ++r) {
    for (int c = 0; c < F::cols; ++c) f.x[r * F::cols + c] = p[r * ldm + c];
  }
}

template <int K>
void fill_fragment(fragment<accumulator, 16, 16, K, float>& f, float v) {
  for (float& e : f.x) e = v;
}

// float32 sums of exact products (half, bfloat16 and TF32 values have at most 11 significant bits).
template <int K, typename T>
void mma_sync(fragment<accumulator, 16, 16, K, float>& d, const fragment<matrix_a, 16, 16, K, T, row_major>& a,
              const fragment<matrix_b, 16, 16, K, T, row_major>& b, const fragment<accumulator, 16, 16, K, float>& c) {
  if (emulated_cuda::lane() != 0) return;  // lane 0 holds the warp's result
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      float sum = c.x[i * 16 + j];
      for (int k = 0; k < K; ++k) sum += static_cast<float>(a.x[i * K + k]) * static_cast<float>(b.x[k * 16 + j]);
      d.x[i * 16 + j] = sum;
    }
  }
}

template <int K>
void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, K, float>& f, unsigned ldm, layout_t) {
  check_operand(p, ldm, "store_matrix_sync");
  if (emulated_cuda::lane() != 0) return;
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) p[r * ldm + c] = f.x[r * 16 + c];
  }
}

}  // namespace wmma
}  // namespace nvcuda
