// Weights in the order the tile kernels stream them (panels), and the product of rows with one
// panel block, on the kernel the panels' width names: vec_tiles.h (at::vec's width) or
// wide_float.h (AVX-512, 16 floats).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "layer_cpu.h"
#include "vec_tiles.h"
#include "wide_float.h"

namespace fused_rnn {
namespace cpu {

// Weights in the kernel's order. A panel block covers C vectors of `width` output columns for
// each of G gates (G = 1 for dG·W_hh); for each k, its G*C groups of `width` weights lie side by
// side, so the kernel streams one block with unit stride. Columns past the end are zero. The width
// is the AVX2 tile's vector (kWidth) or, for float with AVX-512, wide_float.h's 16.
// rows_product tells the kernels apart by the panels' width.
static_assert(KernelMath<float>::kWidth != cpu::kWideWidth, "AVX2 and AVX-512 panels must differ in width");

template <typename T>
struct Panels {
  static constexpr int64_t kWidth = KernelMath<T>::kWidth;
  at::Tensor storage;  // undefined for panels in memory of the caller's (columns_in, in place)
  T* data = nullptr;
  int64_t K = 0, G = 1, C = 1, cols = 0, blocks = 0, width = kWidth;
  int64_t block_rows = 0;  // the k a block has room for: K, or columns_in's capacity
  // Elements from one k of a block to the next, and from one block to the next: packed, a block's
  // k lie groups()·width apart; in place (of_columns on AVX-512), they are W's rows.
  int64_t k_stride = 0, block_step = 0;

  int64_t groups() const { return G * C; }
  int64_t block_size() const { return block_rows * groups() * width; }  // in elements
  const T* block(int64_t u) const { return data + u * block_step; }
  int64_t first_column(int64_t u, int64_t c) const { return (u * C + c) * width; }
  // How many of the `width` columns of vector c of block u exist (0 past the end).
  int64_t lanes(int64_t u, int64_t c) const { return std::clamp<int64_t>(cols - first_column(u, c), 0, width); }

  // Column j of gate g is row g*cols + j of w [G*cols, K]: for the forward product h·W_hhᵀ.
  static Panels of_rows(const at::Tensor& w, int64_t G, int64_t C, int64_t cols, int64_t width = kWidth) {
    Panels p = make(w, w.size(1), G, C, cols, width);
    const T* src = w.data_ptr<T>();
    T* dst = p.storage.template data_ptr<T>();
    p.for_each_block([&](int64_t u) {
      if constexpr (std::is_same_v<T, float>) {
        if (width == cpu::kWideWidth) {
          for (int64_t g = 0; g < G; ++g)
            for (int64_t c = 0; c < C; ++c) {
              const float* rows[cpu::kWideWidth];
              for (int64_t l = 0; l < p.lanes(u, c); ++l) rows[l] = src + (g * cols + p.first_column(u, c) + l) * p.K;
              cpu::wide_transpose_rows(rows, p.lanes(u, c), p.K, dst + (u * p.K * p.groups() + g * C + c) * width,
                                       p.groups() * width);
            }
          return;
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t c = 0; c < C; ++c)
          for (int64_t l = 0; l < width; ++l) {
            T* out = dst + (u * p.K * p.groups() + g * C + c) * width + l;
            if (l < p.lanes(u, c)) {
              const T* row = src + (g * cols + p.first_column(u, c) + l) * p.K;
              for (int64_t k = 0; k < p.K; ++k) out[k * p.groups() * width] = row[k];
            } else {
              for (int64_t k = 0; k < p.K; ++k) out[k * p.groups() * width] = T(0);
            }
          }
    });
    return p;
  }

  // Column j is column j of w [K, cols]: for the backward products dG·W_hh and dG·W_ih. W's own
  // rows are such panels already where every block is whole (cols a multiple of C·width) and the
  // kernel reads a block's k at any stride (AVX-512, float): then nothing is copied, which at one
  // row of dG (a cell's step) was a third of the backward (bench/NOTES.md). The same products, the
  // same bits. Only where the caller allows it (in_place): a long sequence streams the panels at
  // every step, and W's rows lie a page apart at H = 1024, a TLB miss for each k of a block.
  static Panels of_columns(const at::Tensor& w, int64_t C, int64_t width = kWidth, bool in_place = true) {
    if (in_place && std::is_same_v<T, float> && width == cpu::kWideWidth && w.size(1) % (C * width) == 0 &&
        w.is_contiguous()) {
      Panels p = shaped(w.size(0), 1, C, w.size(1), width, w.size(0));
      p.data = const_cast<T*>(w.data_ptr<T>());  // read only: the products never write panels
      p.k_stride = p.cols;
      p.block_step = C * width;
      return p;
    }
    Panels p = make(w, w.size(0), 1, C, w.size(1), width);
    p.for_each_block([&](int64_t u) { p.pack_rows(u, w.data_ptr<T>(), p.cols, 0, p.K); });
    return p;
  }

  // Room for the panels of a [K, cols] matrix in dst, which holds columns_size(capacity, ...)
  // floats (K <= capacity), filled by pack_rows: inside a team, each thread packs the blocks it is
  // given. A block's place does not depend on K, so that blocks never overlap from one use to the next.
  static Panels columns_in(T* dst, int64_t capacity, int64_t K, int64_t cols, int64_t C, int64_t width) {
    Panels p = shaped(K, 1, C, cols, width, capacity);
    p.data = dst;
    return p;
  }
  // The blocks' shape alone, with no weights packed: for a loop that reads the weights as they are.
  static Panels geometry(int64_t K, int64_t G, int64_t C, int64_t cols, int64_t width) {
    return shaped(K, G, C, cols, width, K);
  }
  static int64_t columns_size(int64_t K, int64_t cols, int64_t C, int64_t width) {
    return block_count(cols, C, width) * K * C * width;
  }

  // Rows [k0, k0 + n) of the matrix into block u, from src [n, cols] with row stride ld.
  void pack_rows(int64_t u, const T* src, int64_t ld, int64_t k0, int64_t n) const {
    for (int64_t k = 0; k < n; ++k)
      for (int64_t c = 0; c < C; ++c) {
        T* out = data + ((u * block_rows + k0 + k) * C + c) * width;
        const int64_t m = lanes(u, c);
        if (m > 0) std::memcpy(out, src + k * ld + first_column(u, c), m * sizeof(T));
        std::fill(out + m, out + width, T(0));
      }
  }

 private:
  // Packing is a copy of the weights: worth both threads once a block holds enough of them.
  template <typename F>
  void for_each_block(const F& pack_block) const {
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K * groups() * width));
    at::parallel_for(0, blocks, grain, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) pack_block(u);
    });
  }

  static int64_t block_count(int64_t cols, int64_t C, int64_t width) { return (cols + C * width - 1) / (C * width); }

  // The shape without memory: blocks of C vectors of `width` columns for G gates, room for block_rows k each.
  static Panels shaped(int64_t K, int64_t G, int64_t C, int64_t cols, int64_t width, int64_t block_rows) {
    Panels p;
    p.K = K;
    p.G = G;
    p.C = C;
    p.cols = cols;
    p.width = width;
    p.block_rows = block_rows;
    p.blocks = block_count(cols, C, width);
    p.k_stride = p.groups() * width;
    p.block_step = p.block_size();
    return p;
  }

  static Panels make(const at::Tensor& w, int64_t K, int64_t G, int64_t C, int64_t cols, int64_t width) {
    Panels p = shaped(K, G, C, cols, width, K);
    // Every element is written by the packing (zeros included): no zero fill first, and the block
    // cache's memory, already mapped.
    p.storage = empty_large({std::max<int64_t>(1, p.blocks * K * p.groups() * width)}, w.options());
    p.data = p.storage.template data_ptr<T>();
    return p;
  }
};

// Rows [0, n) times panel block u. row(r) gives row r of the left factor, out(r) where row r of
// block u's output starts; within it, gate g's vector c lies at g*gate_stride + c*width. On
// AVX-512 panels (float), wide_rows_product over all of k, each output starting from `bias` (laid
// out as the output, or null). Else block_product: k is walked in chunks that keep a chunk of the
// panel (16 KB) in L1 while every row block uses it, the partial sums added chunk after chunk in a
// fixed order (no bias there, nor onto_zero: wide_tile's, which only the AVX-512 weight gradients take).
template <typename T, int NG, typename RowFn, typename OutFn>
void rows_product(const Panels<T>& panels, int64_t u, int64_t n, const RowFn& row, const OutFn& out,
                  int64_t gate_stride, bool accumulate, const T* bias = nullptr, int64_t a_stride = 0,
                  bool onto_zero = false) {
  constexpr int64_t W = Panels<T>::kWidth;
  constexpr int64_t kDepth = std::max<int64_t>(16, 16384 / (NG * W * sizeof(T)));
  constexpr int kMaxGroups = std::max(NG, cpu::kWideMaxVectors);
  int64_t offset[kMaxGroups], lanes[kMaxGroups];
  for (int64_t g = 0; g < panels.G; ++g)
    for (int64_t c = 0; c < panels.C; ++c) {
      offset[g * panels.C + c] = g * gate_stride + c * panels.width;
      lanes[g * panels.C + c] = panels.lanes(u, c);
    }
  const T* panel = panels.block(u);
  if constexpr (std::is_same_v<T, float>) {
    if (panels.width == cpu::kWideWidth) {
      const float* init[kMaxGroups];
      for (int64_t q = 0; q < panels.groups() && bias; ++q) init[q] = bias + panels.first_column(u, 0) + offset[q];
      cpu::wide_rows_product(panel, panels.K, panels.k_stride, static_cast<int>(panels.groups()), n, row, out,
                             offset, lanes, bias ? init : nullptr, accumulate, a_stride, onto_zero);
      return;
    }
  }
  // (Panels in place are AVX-512 panels of float only: never here.)
  for (int64_t k0 = 0; k0 < panels.K; k0 += kDepth) {
    row_blocks<T, NG>(n, row, out, k0, std::min(kDepth, panels.K - k0), panel + k0 * NG * W, offset, lanes,
                      accumulate || k0 > 0);
  }
}

}  // namespace cpu
}  // namespace fused_rnn
