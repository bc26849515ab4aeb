// The cells.h math over a row's hidden units, in vectors as wide as the plan allows
// (kernel_plan.h: wide_cells), then unit by unit.
#pragma once

#include <cstdint>
#include <type_traits>

#include "vec_math.h"
#include "wide_float.h"

namespace fused_rnn {
namespace cpu {

#if defined(__x86_64__)
// Units [j + l, j + lanes) of one row on M, M::kWidth at a time while they fit; l moves past them.
template <typename Cell, bool kForward, typename M, typename Io>
__attribute__((target("avx512f"))) inline void wide_units(const Io& io, int64_t H, int64_t j, int64_t lanes,
                                                          int64_t& l) {
  for (; l + M::kWidth <= lanes; l += M::kWidth) {
    if constexpr (kForward) {
      Cell::template forward<M>(io, H, j + l);
    } else {
      Cell::template backward<M>(io, H, j + l);
    }
  }
}
#endif

// The cell's forward or backward on WideMathOf over units [j, j + 16·n) of one row, for the
// largest n that fits in lanes, 4 vectors a call while they last (vec_math.h says why); returns
// 16·n. Flattened so that the cell and WideMathOf's members are compiled into this AVX-512 function.
template <typename Cell, bool kForward, typename Io>
#if defined(__x86_64__)
__attribute__((target("avx512f"), flatten))
#endif
int64_t wide_cell_units(const Io& io, int64_t H, int64_t j, int64_t lanes) {
#if defined(__x86_64__)
  int64_t l = 0;
  wide_units<Cell, kForward, WideMathOf<4>>(io, H, j, lanes, l);
  wide_units<Cell, kForward, WideMathOf<2>>(io, H, j, lanes, l);
  wide_units<Cell, kForward, WideMathOf<1>>(io, H, j, lanes, l);
  return l;
#else
  return 0;
#endif
}

// The cell's forward or backward over units [j, j + lanes) of one row: vectors (16 floats where
// the plan says wide_cells, else KernelMath's), then unit by unit.
template <typename Cell, bool kForward, typename Io>
void cell_units(const Io& io, int64_t H, int64_t j, int64_t lanes, bool wide_cells) {
  using T = typename Cell::scalar_t;
  const auto apply = [&](auto math, int64_t unit) {
    if constexpr (kForward) {
      Cell::template forward<decltype(math)>(io, H, unit);
    } else {
      Cell::template backward<decltype(math)>(io, H, unit);
    }
  };
  if constexpr (std::is_same_v<T, float>) {
    if (lanes >= kWideWidth && wide_cells) {
      const int64_t done = wide_cell_units<Cell, kForward>(io, H, j, lanes);
      j += done, lanes -= done;
    }
  }
  constexpr int64_t W = KernelMath<T>::kWidth;
  for (; lanes >= W; j += W, lanes -= W) apply(KernelMath<T>{}, j);
  for (int64_t l = 0; l < lanes; ++l) apply(ScalarMath<T>{}, j + l);
}

}  // namespace cpu
}  // namespace fused_rnn
