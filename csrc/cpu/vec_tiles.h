// The panel tiles over at::vec (8 floats or 4 doubles a vector with the AVX2 build, one complex
// number): the steps' products for every type and CPU that the AVX-512 and AMX kernels do not
// take (kernel_plan.h). Each output sums k in chunks (panels.h: rows_product), the partial sums
// added in a fixed order: the same bits whichever thread computes it.
#pragma once

#include <algorithm>
#include <cstdint>

#include "vec_math.h"

namespace fused_rnn {
namespace cpu {

// About 12 accumulators fit AVX2's 16 vector registers next to the weights: 3 or 4 groups per block.
template <int G>
constexpr int kVectorsPerGate = G >= 3 ? 1 : (G == 2 ? 2 : 3);
template <int NG>
constexpr int kRowsPerBlock = NG >= 12 ? 1 : 12 / NG;

// For MR rows and the NG = G*C groups of one panel block, in registers:
// out[r] + offset[q] (lanes[q] values) (+)= Σ_k rows[r][k] · panel[k][q].
// Kept out of line (one call per row block and k chunk, so the call is cheap): profiles then show
// the matrix product apart from the gate math.
template <typename T, int MR, int NG>
__attribute__((noinline)) void block_product(const T* const* rows, int64_t K, const T* panel, T* const* out,
                                             const int64_t* offset, const int64_t* lanes, bool accumulate) {
  using M = KernelMath<T>;
  using V = typename M::V;
  constexpr int64_t W = M::kWidth;
  V acc[MR][NG];
  for (int r = 0; r < MR; ++r)
    for (int q = 0; q < NG; ++q) acc[r][q] = M::broadcast(T(0));
  for (int64_t k = 0; k < K; ++k) {
    V w[NG];
    for (int q = 0; q < NG; ++q) w[q] = M::load(panel + (k * NG + q) * W);
    for (int r = 0; r < MR; ++r) {
      const V a = M::broadcast(rows[r][k]);
      for (int q = 0; q < NG; ++q) acc[r][q] = M::fmadd(a, w[q], acc[r][q]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int q = 0; q < NG; ++q) {
      if (lanes[q] == 0) continue;
      T* dst = out[r] + offset[q];
      M::store_n(dst, accumulate ? acc[r][q] + M::load_n(dst, lanes[q]) : acc[r][q], lanes[q]);
    }
}

// One pass over k in [k0, k0 + depth) for rows [0, n): kRowsPerBlock rows at a time, then the rest.
template <typename T, int NG, int MR = kRowsPerBlock<NG>, typename RowFn, typename OutFn>
void row_blocks(int64_t n, const RowFn& row, const OutFn& out, int64_t k0, int64_t depth, const T* panel_chunk,
                const int64_t* offset, const int64_t* lanes, bool accumulate) {
  int64_t r0 = 0;
  for (; r0 + MR <= n; r0 += MR) {
    const T* in[MR];
    T* dst[MR];
    for (int r = 0; r < MR; ++r) in[r] = row(r0 + r) + k0, dst[r] = out(r0 + r);
    block_product<T, MR, NG>(in, depth, panel_chunk, dst, offset, lanes, accumulate);
  }
  if constexpr (MR > 1) {
    if (r0 < n) {
      row_blocks<T, NG, MR - 1>(n - r0, [&](int64_t r) { return row(r0 + r); }, [&](int64_t r) { return out(r0 + r); },
                                k0, depth, panel_chunk, offset, lanes, accumulate);
    }
  }
}

}  // namespace cpu
}  // namespace fused_rnn
