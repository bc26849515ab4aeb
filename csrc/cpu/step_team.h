// What the CPU step loops share (layer_cpu.cpp, quantized_cpu.cpp): a team of threads that keeps
// its share of the hidden units for a whole sequence, the cells.h math over a row's units, and the
// walk over a sequence in chunks of steps.
#pragma once

#include <ATen/Parallel.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cstdint>
#include <utility>

#include "layer_cpu.h"
#include "vec_math.h"
#include "wide_float.h"

// MKL's per-thread limit on its own threads (the C entry, by value; the lower-case names are the
// Fortran one, by pointer), when torch's BLAS is MKL (weak: null otherwise).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

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
    // BLAS calls inside take one thread, whatever torch's setting: MKL picks another kernel (other
    // bits, seen for dX on Intel) when it may use more threads, even nested where it runs on one.
    const auto one_blas_thread = [&](const Member& me) {
      const int before = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
      body(me);
      if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(before);
    };
#ifdef _OPENMP
    if (threads > 1) {
#pragma omp parallel num_threads(threads)
      one_blas_thread(Member{omp_get_thread_num(), omp_get_num_threads()});
      return;
    }
#endif
    one_blas_thread(Member{0, 1});
  }
};

// Whether float cells take WideMath (AVX-512, 16 units a call): with the AVX-512 products
// (wide_float.h) and where torch's SLEEF has its AVX-512 exp.
inline bool wide_cells() {
#if defined(__x86_64__)
  static const bool wide = wide_float_kernels() && Sleef_expf16_u10 != nullptr;
  return wide;
#else
  return false;
#endif
}

// The cell's forward or backward on WideMath over units [j, j + 16·n) of one row, for the largest n
// that fits in lanes; returns 16·n. Flattened so that the cell and WideMath's members are compiled
// into this AVX-512 function.
template <typename Cell, bool kForward, typename Io>
#if defined(__x86_64__)
__attribute__((target("avx512f"), flatten))
#endif
int64_t wide_cell_units(const Io& io, int64_t H, int64_t j, int64_t lanes) {
#if defined(__x86_64__)
  const int64_t n = lanes / WideMath::kWidth * WideMath::kWidth;
  for (int64_t l = 0; l < n; l += WideMath::kWidth) {
    if constexpr (kForward) {
      Cell::template forward<WideMath>(io, H, j + l);
    } else {
      Cell::template backward<WideMath>(io, H, j + l);
    }
  }
  return n;
#else
  return 0;
#endif
}

// The cell's forward or backward over units [j, j + lanes) of one row: vectors (16 floats with
// AVX-512, else KernelMath's), then unit by unit.
template <typename Cell, bool kForward, typename Io>
void cell_units(const Io& io, int64_t H, int64_t j, int64_t lanes) {
  using T = typename Cell::scalar_t;
  const auto apply = [&](auto math, int64_t unit) {
    if constexpr (kForward) {
      Cell::template forward<decltype(math)>(io, H, unit);
    } else {
      Cell::template backward<decltype(math)>(io, H, unit);
    }
  };
  if constexpr (std::is_same_v<T, float>) {
    if (lanes >= kWideWidth && wide_cells()) {
      const int64_t done = wide_cell_units<Cell, kForward>(io, H, j, lanes);
      j += done, lanes -= done;
    }
  }
  constexpr int64_t W = KernelMath<T>::kWidth;
  for (; lanes >= W; j += W, lanes -= W) apply(KernelMath<T>{}, j);
  for (int64_t l = 0; l < lanes; ++l) apply(ScalarMath<T>{}, j + l);
}

// Gate values per chunk of steps (4 MB of floats): the forward's x·W_ihᵀ and the backward's gate
// gradients are produced and consumed a chunk at a time, large enough for efficient GEMMs, small
// enough to stay in cache in between (instead of [N, G*H] tensors faulted in page by page per call).
constexpr int64_t kChunkElements = int64_t{1} << 20;

// A chunk's BLAS products are cut into calls of whole pieces of their outputs' rows or columns,
// the same calls whatever the number of threads, each thread taking whole ones: MKL's AVX-512
// kernels (on Intel) can give an element other bits when the call around it has another shape.
// Pieces of G*H (dW's rows, x·W_ihᵀ's columns): a quarter of it, 64 to 512, as large as keeps
// two threads busy (training at B=256 on the Xeon VM: 64 -> 512 took LSTM from 0.89x to 0.95x of
// torch.nn, RNN from 0.90x to 1.01x); of a chunk's rows (dX): 64, a chunk being 256 rows or more.
inline int64_t gemm_piece(int64_t size) { return std::clamp<int64_t>((size / 4 + 63) / 64 * 64, 64, 512); }
constexpr int64_t kGemmRowPiece = 64;

// f(p0, p1) for each piece [p0, p1) of `piece` elements in [begin, end) (begin a multiple of piece).
template <typename F>
void for_each_piece(int64_t begin, int64_t end, int64_t piece, const F& f) {
  for (int64_t p0 = begin; p0 < end; p0 += piece) f(p0, std::min(end, p0 + piece));
}

// Consecutive steps of a loop, in the order it walks them: steps [begin, end) of that order hold
// rows [row0, row0 + rows) of the packed sequence (steps are contiguous in memory in either order).
struct StepChunk {
  int64_t begin, end, row0, rows;
};

// Rows per chunk for G*H values per row: at least one step's worth (batch_sizes[0] = B).
inline int64_t chunk_rows(const LayerShape& s, int64_t values_per_row) {
  return std::max(s.B, kChunkElements / std::max<int64_t>(1, values_per_row));
}

// The chunk that starts at step `begin` of a walk over t = T-1, T-2, ... (descending) or 0, 1, ...:
// whole steps while their rows fit in `cap` rows.
inline StepChunk next_chunk(const LayerShape& s, bool descending, int64_t begin, int64_t cap) {
  StepChunk chunk{begin, begin, 0, 0};
  while (chunk.end < s.T) {
    const int64_t n = s.batch_sizes[descending ? s.T - 1 - chunk.end : chunk.end];
    if (chunk.end > begin && chunk.rows + n > cap) break;
    chunk.rows += n;
    ++chunk.end;
  }
  chunk.row0 = s.offsets[descending ? s.T - chunk.end : begin];
  return chunk;
}
}  // namespace cpu
}  // namespace fused_rnn
