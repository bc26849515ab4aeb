// A team of threads that keeps its share of the hidden units for a whole sequence (the CPU step
// loops: forward_loop.cpp, backward_loop.cpp, quantized_cpu.cpp).
#pragma once

#include <ATen/Parallel.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cstdint>
#include <utility>

#include "blas.h"

namespace fused_rnn {
namespace cpu {

// One thread of a Team: its index and the team's size.
struct Member {
  int64_t index, threads;

  // This thread's part of [0, size): the same part at every step.
  std::pair<int64_t, int64_t> share(int64_t size) const {
    return {size * index / threads, size * (index + 1) / threads};
  }
  // The same in whole pieces of `align` (only the last part may end in a partial piece).
  std::pair<int64_t, int64_t> share(int64_t size, int64_t align) const {
    const auto [first, last] = share((size + align - 1) / align);
    return {std::min(size, first * align), std::min(size, last * align)};
  }

  // Between steps: what one thread wrote is read by all at the next step.
  void barrier() const {
#ifdef _OPENMP
    if (threads > 1) {
#pragma omp barrier
    }
#endif
  }
};

// A whole sequence in one parallel region: each thread keeps the same share of the hidden units
// for every step, and steps are separated by barriers, cheaper than a fork and a join per step.
// One thread when a step is too small for a second to pay for the barrier. Nothing in the region
// may throw (an exception cannot leave an OpenMP region): it runs cells.h and raw BLAS (for complex
// types, ATen's mm on memory that exists already, which has nothing left to check).
struct Team {
  int64_t threads;

  explicit Team(double flops_per_step) {
    constexpr double kFlopsWorthAThread = 1 << 17;
    threads = flops_per_step < kFlopsWorthAThread ? 1 : std::max<int64_t>(1, at::get_num_threads());
  }

  template <typename F>
  void run(const F& body) const {
    // BLAS calls inside take one thread (blas.h says why).
#ifdef _OPENMP
    if (threads > 1) {
#pragma omp parallel num_threads(threads)
      with_one_blas_thread([&] { body(Member{omp_get_thread_num(), omp_get_num_threads()}); });
      return;
    }
#endif
    with_one_blas_thread([&] { body(Member{0, 1}); });
  }
};

}  // namespace cpu
}  // namespace fused_rnn
