// The walk over a sequence in chunks of steps (the input projection and the weight gradients'
// products run a chunk at a time), and the pieces BLAS calls are cut into.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../layer.h"

namespace fused_rnn {
namespace cpu {

// Gate values per chunk of steps (4 MB of floats): the forward's x·W_ihᵀ and the backward's gate
// gradients are produced and consumed a chunk at a time, large enough for efficient GEMMs, small
// enough to stay in cache in between (instead of [N, G*H] tensors faulted in page by page per call).
constexpr int64_t kChunkElements = int64_t{1} << 20;

// A chunk's BLAS products are cut into calls of whole pieces of their outputs' rows or columns,
// the same calls whatever the number of threads, each thread taking whole ones: MKL's AVX-512
// kernels (on Intel) can give an element other bits when the call around it has another shape.
// Pieces of G*H (dW's rows, x·W_ihᵀ's columns): a quarter of it, 64 to 512, as large as keeps
// two threads busy (larger pieces were faster on Intel: bench/NOTES.md); of a chunk's rows (dX): 64,
// a chunk being 256 rows or more.
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

// Rows of x per pass of the input projection: about 384 KB of them, which stay in L2 while the
// thread's panels of W_ih stream past.
inline int64_t projection_rows(int64_t I) { return std::max<int64_t>(6, 98304 / std::max<int64_t>(1, I) / 6 * 6); }

}  // namespace cpu
}  // namespace fused_rnn
