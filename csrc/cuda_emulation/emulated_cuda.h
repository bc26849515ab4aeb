// Just enough of CUDA's programming model to run csrc/cuda/'s kernels and step loops on the CPU, so
// that the whole CUDA path is tested where no GPU is (CI, most machines; device_emulated.h puts the
// device interface on top of it):
//  - a launch runs the grid's blocks one after another, in ascending order or (blocks_descending)
//    the other way round, each block's CUDA threads as fibers on the calling host thread, with
//    threadIdx / blockIdx / blockDim / gridDim set for each. Blocks of one launch must not depend
//    on each other: the two orders give the same results only when they don't. A cooperative
//    launch (run_cooperative) has every block resident at once, with grid_sync() a barrier over
//    all of their threads, and fails beyond the blocks that can be resident;
//  - each thread runs until it waits at a barrier or returns, the threads in order: as far out of
//    step with each other as a barrier allows, so that a missing barrier shows as wrong values
//    (a thread reads shared memory that the others have not yet written, or overwrites what they
//    have not yet read), the same on every run;
//  - __shared__ arrays are function statics, one copy per host thread, which the block that runs
//    there uses alone (so a cooperative kernel keeps its shared data in dynamic_shared_memory(), one
//    per block); host threads that launch at the same time each run their own grids;
//  - __syncthreads() is a barrier over the block's threads. Reaching one after another thread of
//    the block has returned, or while others wait at another barrier, is an error (undefined
//    behaviour on a GPU), reported as an exception from the launch instead of a hang.
//  - __half / __nv_bfloat16 are c10::Half / c10::BFloat16 (the same bits, and the same rounding to
//    nearest even from float);
//  - the tensor-core instructions of csrc/cuda/mma_ptx.cuh (ldmatrix, mma.sync, cvt to TF32) run
//    warp-wide: each lane posts its part to its warp, and gets back what the PTX ISA's fragment
//    layouts give it (float32 sums of exact products, in k order); ldmatrix checks its rows'
//    16-byte alignment.
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
#define __shared__ static thread_local
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

// What one lane posts for its warp's exchanges (ldmatrix's row address, mma.sync's operands).
struct WarpSlot {
  const void* address;
  std::uint32_t regs[6];
};

struct BarrierMisuse : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The CUDA threads of the blocks resident at once (one block for a launch, the whole grid for a
// cooperative one) as fibers (ucontext) on the calling host thread. A pass resumes every runnable
// fiber, block by block and thread by thread, and each runs until it waits at a barrier or
// returns; then one barrier that all its threads have reached releases them (release_first_complete):
// a block's (__syncthreads), a warp's (the emulated warp-wide instructions) or the grid's
// (grid_sync). A
// barrier that some of its threads can never reach (one has returned, or waits at another
// barrier) is reported as an exception from the launch instead of a hang. Each resident block has
// its own dynamic shared memory; __shared__ arrays (function statics) are one copy per host thread,
// so a cooperative launch's kernels must keep their shared data in the dynamic memory.
class Residents {
 public:
  static constexpr std::size_t kStackBytes = 256 * 1024;
  static constexpr int kWarpSize = 32;

  template <typename Body>
  void run(dim3 grid, const std::vector<dim3>& blocks, dim3 block, std::size_t shared_bytes, const Body& body) {
    threads_ = static_cast<int>(block.x * block.y * block.z);
    warps_ = (threads_ + kWarpSize - 1) / kWarpSize;
    const int resident = static_cast<int>(blocks.size()), total = resident * threads_;
    fibers_.resize(static_cast<std::size_t>(total));
    block_arrived_.assign(static_cast<std::size_t>(resident), 0);
    warp_arrived_.assign(static_cast<std::size_t>(resident * warps_), 0);
    warp_slots_.assign(static_cast<std::size_t>(resident * warps_ * kWarpSize), WarpSlot{});
    shared_.resize(static_cast<std::size_t>(resident));
    // All bits one: a NaN in every floating type (float32, float64, the half types), so that a
    // kernel reading dynamic shared memory it never wrote shows NaN in its results.
    for (auto& bytes : shared_) bytes.assign((shared_bytes + 15) / 16, uint4{~0u, ~0u, ~0u, ~0u});
    grid_arrived_ = 0;
    error_ = nullptr;
    body_ = [&body] { body(); };
    grid_ = grid, blocks_ = blocks, block_ = block;
    for (int i = 0; i < total; ++i) {
      Fiber& f = fibers_[static_cast<std::size_t>(i)];
      if (!f.stack) f.stack.reset(new char[kStackBytes]);
      const int t = i % threads_;
      f.block = i / threads_;
      f.thread = dim3(t % block.x, t / block.x % block.y, t / block.x / block.y);
      f.waiting = kRunnable;
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack.get();
      f.context.uc_stack.ss_size = kStackBytes;
      f.context.uc_link = &scheduler_;
      makecontext(&f.context, &Residents::entry, 0);
    }
    Residents* const outer = running;
    running = this;
    try {
      schedule();
    } catch (...) {
      running = outer;
      throw;
    }
    running = outer;
  }

  static void wait_for_block() { running->wait(kAtBlockBarrier); }
  static void wait_for_warp() { running->wait(kAtWarpBarrier); }
  static void wait_for_grid() { running->wait(kAtGridBarrier); }
  // The calling thread's warp's exchange slots, one per lane; its block's dynamic shared memory.
  static WarpSlot* warp_slots() {
    Residents& r = *running;
    return r.warp_slots_.data() + static_cast<std::size_t>(r.warp_of(r.current_)) * kWarpSize;
  }
  static unsigned char* dynamic_shared() {
    Residents& r = *running;
    return reinterpret_cast<unsigned char*>(r.shared_[static_cast<std::size_t>(r.fiber().block)].data());
  }

 private:
  enum : int { kRunnable, kReturned, kAtBlockBarrier, kAtWarpBarrier, kAtGridBarrier };
  struct Fiber {
    ucontext_t context;
    std::unique_ptr<char[]> stack;
    dim3 thread;
    int block = 0;
    int waiting = kRunnable;
  };

  static inline thread_local Residents* running = nullptr;

  Fiber& fiber() { return fibers_[static_cast<std::size_t>(current_)]; }
  int warp_of(int i) const { return (i / threads_) * warps_ + (i % threads_) / kWarpSize; }
  int warp_threads(int w) const { return std::min(kWarpSize, threads_ - (w % warps_) * kWarpSize); }

  static void entry() {
    Residents& r = *running;
    try {
      r.body_();
    } catch (...) {
      if (!r.error_) r.error_ = std::current_exception();
    }
    r.fiber().waiting = kReturned;
  }  // to scheduler_, through uc_link

  void wait(int barrier) {
    Fiber& f = fiber();
    f.waiting = barrier;
    if (barrier == kAtBlockBarrier) {
      ++block_arrived_[static_cast<std::size_t>(f.block)];
    } else if (barrier == kAtWarpBarrier) {
      ++warp_arrived_[static_cast<std::size_t>(warp_of(current_))];
    } else {
      ++grid_arrived_;
    }
    swapcontext(&f.context, &scheduler_);
  }

  void schedule() {
    const int total = static_cast<int>(fibers_.size());
    for (;;) {
      for (current_ = 0; current_ < total; ++current_) {
        Fiber& f = fiber();
        if (f.waiting != kRunnable) continue;
        threadIdx = f.thread;
        blockIdx = blocks_[static_cast<std::size_t>(f.block)];
        blockDim = block_;
        gridDim = grid_;
        swapcontext(&scheduler_, &f.context);
        if (error_) std::rethrow_exception(error_);  // the other fibers are abandoned
      }
      if (release_first_complete()) continue;
      int returned = 0;
      for (const Fiber& f : fibers_) returned += f.waiting == kReturned;
      if (returned == total) return;
      throw BarrierMisuse(returned > 0 ? "emulated CUDA: a barrier reached after a thread it waits for had returned"
                                       : "emulated CUDA: threads wait at different barriers");
    }
  }

  // Releases one barrier that all its threads have reached: of the first resident block that has
  // one (its warps' first, then its own), else the grid's. So the first block runs as far ahead of
  // the others as its barriers let it, which is what shows a missing grid barrier: without one, it
  // reads what the other blocks have not written yet.
  bool release_first_complete() {
    for (int k = 0; k < static_cast<int>(block_arrived_.size()); ++k) {
      for (int w = k * warps_; w < (k + 1) * warps_; ++w) {
        if (warp_arrived_[static_cast<std::size_t>(w)] == warp_threads(w)) {
          release([this, w](int i, const Fiber& f) { return warp_of(i) == w && f.waiting == kAtWarpBarrier; });
          warp_arrived_[static_cast<std::size_t>(w)] = 0;
          return true;
        }
      }
      if (block_arrived_[static_cast<std::size_t>(k)] == threads_) {
        release([k](int, const Fiber& f) { return f.block == k && f.waiting == kAtBlockBarrier; });
        block_arrived_[static_cast<std::size_t>(k)] = 0;
        return true;
      }
    }
    if (grid_arrived_ == static_cast<int>(fibers_.size())) {
      release([](int, const Fiber& f) { return f.waiting == kAtGridBarrier; });
      grid_arrived_ = 0;
      return true;
    }
    return false;
  }

  template <typename Which>
  void release(const Which& which) {
    for (int i = 0; i < static_cast<int>(fibers_.size()); ++i) {
      Fiber& f = fibers_[static_cast<std::size_t>(i)];
      if (which(i, f)) f.waiting = kRunnable;
    }
  }

  ucontext_t scheduler_;
  std::vector<Fiber> fibers_;
  std::vector<int> block_arrived_, warp_arrived_;
  std::vector<WarpSlot> warp_slots_;
  std::vector<std::vector<uint4>> shared_;
  int threads_ = 0, warps_ = 0, grid_arrived_ = 0, current_ = 0;
  std::exception_ptr error_;
  std::function<void()> body_;
  dim3 grid_, block_;
  std::vector<dim3> blocks_;
};

inline bool blocks_descending = false;

inline dim3 block_index(dim3 grid, unsigned long linear) {
  return dim3(linear % grid.x, linear / grid.x % grid.y, linear / grid.x / grid.y);
}

// The grid's blocks in launch order: ascending, or descending with blocks_descending.
inline std::vector<dim3> blocks_in_order(dim3 grid) {
  const unsigned long blocks = static_cast<unsigned long>(grid.x) * grid.y * grid.z;
  std::vector<dim3> order;
  for (unsigned long k = 0; k < blocks; ++k) order.push_back(block_index(grid, blocks_descending ? blocks - 1 - k : k));
  return order;
}

// Runs body() as every thread of every block of the grid, the blocks one after another;
// rethrows the first exception of any thread.
template <typename Body>
void run_grid(dim3 grid, dim3 block, const Body& body) {
  static thread_local Residents residents;  // its fibers' stacks serve every launch
  for (const dim3& b : blocks_in_order(grid)) residents.run(grid, {b}, block, 0, body);
}

// A cooperative launch: every block resident at once (the launch fails, as on a GPU, if the grid
// has more blocks than `capacity`, the blocks that can be resident at once).
template <typename Body>
void run_cooperative(dim3 grid, dim3 block, std::size_t shared_bytes, long capacity, const Body& body) {
  static thread_local Residents residents;
  const std::vector<dim3> order = blocks_in_order(grid);
  if (static_cast<long>(order.size()) > capacity) {
    throw std::runtime_error("emulated CUDA: a cooperative launch with more blocks than can be resident");
  }
  residents.run(grid, order, block, shared_bytes, body);
}

}  // namespace emulated_cuda

inline void __syncthreads() { emulated_cuda::Residents::wait_for_block(); }
inline void grid_sync() { emulated_cuda::Residents::wait_for_grid(); }
inline unsigned char* dynamic_shared_memory() { return emulated_cuda::Residents::dynamic_shared(); }

using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline __half __float2half_rn(float v) { return __half(v); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return __nv_bfloat16(v); }
inline float __uint_as_float(unsigned v) {
  float f;
  std::memcpy(&f, &v, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned v;
  std::memcpy(&v, &f, 4);
  return v;
}

namespace emulated_cuda {
inline int lane() {
  return static_cast<int>((threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x) % 32;
}
}  // namespace emulated_cuda

// The tensor-core instructions of csrc/cuda/mma_ptx.cuh, from the fragment layouts that it
// spells out (the PTX ISA's): each lane posts its operands to its warp's exchange slots, the warp
// waits for all 32, and each lane computes what the hardware gives it, then the warp waits again
// before the slots are reused. ldmatrix also checks its rows' 16-byte alignment. mma.sync's sums
// are float32 sums of exact products in k order (the hardware's own order and rounding of partial
// sums are not emulated).
namespace ptx {

inline std::uint16_t bits16(const void* row, int column) {
  std::uint16_t v;
  std::memcpy(&v, static_cast<const char*>(row) + 2 * column, 2);
  return v;
}

inline const void* posted_row(const emulated_cuda::WarpSlot* slots, int lane) {
  const void* row = slots[lane].address;
  if (reinterpret_cast<std::uintptr_t>(row) % 16 != 0) {
    throw std::runtime_error("emulated ldmatrix: a row address not 16-byte aligned");
  }
  return row;
}

inline void ldmatrix_x4_any(std::uint32_t (&r)[4], const void* row, bool transposed) {
  emulated_cuda::WarpSlot* slots = emulated_cuda::Residents::warp_slots();
  const int l = emulated_cuda::lane();
  slots[l].address = row;
  emulated_cuda::Residents::wait_for_warp();
  for (int i = 0; i < 4; ++i) {
    const int g = l / 4, t = l % 4;
    std::uint32_t lo, hi;
    if (transposed) {  // column g, rows 2t and 2t+1
      lo = bits16(posted_row(slots, 8 * i + 2 * t), g);
      hi = bits16(posted_row(slots, 8 * i + 2 * t + 1), g);
    } else {  // row g, columns 2t and 2t+1
      lo = bits16(posted_row(slots, 8 * i + g), 2 * t);
      hi = bits16(posted_row(slots, 8 * i + g), 2 * t + 1);
    }
    r[i] = lo | (hi << 16);
  }
  emulated_cuda::Residents::wait_for_warp();
}

inline void ldmatrix_x4(std::uint32_t (&r)[4], const void* row) { ldmatrix_x4_any(r, row, false); }
inline void ldmatrix_x4_trans(std::uint32_t (&r)[4], const void* row) { ldmatrix_x4_any(r, row, true); }

// The value of element `half` (0: low) of register bits, as float: W is __half, __nv_bfloat16, or
// float (TF32: the whole register).
template <typename W>
float element(std::uint32_t bits, int half) {
  if constexpr (std::is_same_v<W, float>) {
    float v;
    std::memcpy(&v, &bits, 4);
    return v;
  } else {
    return static_cast<float>(W(static_cast<std::uint16_t>(half ? bits >> 16 : bits & 0xFFFFu), W::from_bits()));
  }
}

// d += a·b for the warp's tile. kK = 16 (16-bit W, two values a register) or 8 (TF32, one).
template <typename W, int kK>
void emulated_mma(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1) {
  emulated_cuda::WarpSlot* slots = emulated_cuda::Residents::warp_slots();
  const int l = emulated_cuda::lane();
  for (int i = 0; i < 4; ++i) slots[l].regs[i] = a[i];
  slots[l].regs[4] = b0;
  slots[l].regs[5] = b1;
  emulated_cuda::Residents::wait_for_warp();
  constexpr int kPerReg = kK == 16 ? 2 : 1, kHalfK = kK / 2;  // k per register; k of a register pair
  const auto A = [&](int row, int k) {  // lane (row % 8)*4 + (k % kHalfK)/kPerReg; register row/8 + 2*(k/kHalfK)
    const std::uint32_t bits = slots[(row % 8) * 4 + (k % kHalfK) / kPerReg].regs[row / 8 + 2 * (k / kHalfK)];
    return element<W>(bits, k % kPerReg);
  };
  const auto B = [&](int k, int n) {  // lane n*4 + (k % kHalfK)/kPerReg; register 4 + k/kHalfK
    const std::uint32_t bits = slots[n * 4 + (k % kHalfK) / kPerReg].regs[4 + k / kHalfK];
    return element<W>(bits, k % kPerReg);
  };
  const int g = l / 4, t = l % 4;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
    float sum = d[i];
    for (int k = 0; k < kK; ++k) sum += A(row, k) * B(k, col);
    out[i] = sum;
  }
  emulated_cuda::Residents::wait_for_warp();
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

template <typename W>
void mma_m16n8k16(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1) {
  emulated_mma<W, 16>(d, a, b0, b1);
}
inline void mma_m16n8k8_tf32(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1) {
  emulated_mma<float, 8>(d, a, b0, b1);
}

// cvt.rna.tf32.f32: to nearest, ties away from zero, 13 low bits cleared; NaN and infinities kept.
inline std::uint32_t to_tf32(float v) {
  std::uint32_t bits;
  std::memcpy(&bits, &v, 4);
  if (std::isfinite(v)) bits = (bits + 0x1000u) & 0xFFFFE000u;
  return bits;
}

}  // namespace ptx
