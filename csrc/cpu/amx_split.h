// float32 operands split for amx_float.h's product: the weights once per call, the rows (x, h_{t-1},
// dG) as the loops reach them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "amx_float.h"
#include "layer_cpu.h"
#include "team.h"

namespace fused_rnn {
namespace cpu {

// Weights split into AMX tiles (amx_float.h), and room for up to max_rows split rows of the left
// factor. Group q holds 16 output columns, which lie at offset[q] of a row of out: for
// out = rows · Wᵀ with W [G*cols, K] (of_rows: group g·units + v, units = amx_tiles(cols), holds
// W's rows g·cols + 16v .. + 16, the layout of x·W_ihᵀ's and h·W_hhᵀ's buffers), or out = rows · W
// with W [K, cols] (of_columns: group v holds columns 16v .. + 16; dX = dG·W_ih, dh = dG·W_hh).
struct AmxSplit {
  at::Tensor weights, rows;
  int64_t K = 0, group = 0;
  std::vector<const uint16_t*> b;
  std::vector<int64_t> offset, lanes;
  std::vector<const float*> bias;

  AmxSplit() = default;
  static AmxSplit of_rows(const at::Tensor& w, int64_t G, int64_t cols, int64_t max_rows, const float* bias_p) {
    AmxSplit split(w.size(1), G * cpu::amx_tiles(cols), max_rows, w);
    const int64_t units = cpu::amx_tiles(cols);
    for (int64_t q = 0; q < split.groups(); ++q) {
      split.offset[q] = q / units * cols + q % units * cpu::kAmxTile;
      split.lanes[q] = std::min(cpu::kAmxTile, cols - q % units * cpu::kAmxTile);
      split.bias[q] = bias_p ? bias_p + split.offset[q] : nullptr;
    }
    const float* src = w.data_ptr<float>();
    split.split_groups([&](int64_t q, uint16_t* dst) {
      cpu::amx_split_columns(src + split.offset[q] * split.K, split.K, split.lanes[q], split.K, dst);
    });
    return split;
  }
  static AmxSplit of_columns(const at::Tensor& w, int64_t max_rows) {
    const int64_t cols = w.size(1);
    AmxSplit split(w.size(0), cpu::amx_tiles(cols), max_rows, w);
    for (int64_t q = 0; q < split.groups(); ++q) {
      split.offset[q] = q * cpu::kAmxTile;
      split.lanes[q] = std::min(cpu::kAmxTile, cols - q * cpu::kAmxTile);
    }
    const float* src = w.data_ptr<float>();
    split.split_groups([&](int64_t q, uint16_t* dst) {
      cpu::amx_split_kmajor(src + split.offset[q], cols, split.K, split.lanes[q], dst);
    });
    return split;
  }

  int64_t groups() const { return static_cast<int64_t>(b.size()); }
  uint16_t* split() const { return reinterpret_cast<uint16_t*>(rows.data_ptr<int16_t>()); }

  // Rows [r0, r1) of the left factor (r0 a multiple of 16), row(r) giving row r: into their 16-row
  // groups, or with a team each thread its share of the groups of [0, r1).
  template <typename RowFn>
  void split_rows(int64_t r0, int64_t r1, const RowFn& row) const {
    if constexpr (std::is_convertible_v<decltype(row(0)), const float*>) {  // float only
      for (int64_t g = r0 / cpu::kAmxTile; g * cpu::kAmxTile < r1; ++g) {
        const float* in[cpu::kAmxTile];
        const int64_t m = std::min(cpu::kAmxTile, r1 - g * cpu::kAmxTile);
        for (int64_t r = 0; r < m; ++r) in[r] = row(g * cpu::kAmxTile + r);
        cpu::amx_split_rows(in, m, K, split() + g * group);
      }
    }
  }
  template <typename RowFn>
  void split_rows(const Member& me, int64_t n, const RowFn& row) const {
    const auto [r0, r1] = me.share(n, cpu::kAmxTile);
    split_rows(r0, r1, row);
  }

  // out (row stride ldo) for split rows [r0, r0 + n) (r0 a multiple of 32) and groups [q0, q1),
  // over k in [k0, k1) (k0 a multiple of 32; k1 = -1: K) and from out's values with `accumulate`
  // (bias with the first range only).
  template <typename T>
  void product(int64_t r0, int64_t n, int64_t q0, int64_t q1, T* out, int64_t ldo, int64_t k0 = 0, int64_t k1 = -1,
               bool accumulate = false) const {
    if constexpr (std::is_same_v<T, float>) {
      const int64_t shift = k0 / cpu::kAmxDepth * cpu::kAmxBlock;
      cpu::amx_product(split() + r0 / cpu::kAmxTile * group + shift, group, n, b.data() + q0, shift, offset.data() + q0,
                       lanes.data() + q0, q1 - q0, (k1 < 0 ? K : k1) - k0, k0 == 0 ? bias.data() + q0 : nullptr,
                       accumulate, out, ldo);
    }
  }
  // Rows [0, n), all of k, for the listed groups (at most 8).
  template <typename T>
  void product(int64_t n, const int64_t* listed, int64_t count, T* out, int64_t ldo) const {
    if constexpr (std::is_same_v<T, float>) {
      const uint16_t* listed_b[8];
      int64_t listed_offset[8], listed_lanes[8];
      const float* listed_bias[8];
      for (int64_t i = 0; i < count; ++i) {
        const int64_t q = listed[i];
        listed_b[i] = b[q], listed_offset[i] = offset[q], listed_lanes[i] = lanes[q], listed_bias[i] = bias[q];
      }
      cpu::amx_product(split(), group, n, listed_b, 0, listed_offset, listed_lanes, count, K, listed_bias, false, out,
                       ldo);
    }
  }

 private:
  AmxSplit(int64_t K_, int64_t count, int64_t max_rows, const at::Tensor& w)
      : K(K_), group(cpu::amx_group_size(K_)), b(count), offset(count), lanes(count), bias(count, nullptr) {
    const auto options = w.options().dtype(at::kShort);
    weights = empty_large({std::max<int64_t>(1, count * group)}, options);
    rows = empty_large({std::max<int64_t>(1, cpu::amx_tiles(max_rows) * group)}, options);
    for (int64_t q = 0; q < count; ++q) b[q] = reinterpret_cast<const uint16_t*>(weights.data_ptr<int16_t>()) + q * group;
  }
  // split(q, dst) for every group, on all threads.
  template <typename F>
  void split_groups(const F& split_group) const {
    auto* dst = reinterpret_cast<uint16_t*>(weights.data_ptr<int16_t>());
    at::parallel_for(0, groups(), 4, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) split_group(q, dst + q * group);
    });
  }
};

// The k of a range of the backward's AMX products (backward_loop.cpp: a range of dG's split rows
// stays in L2 while the weights pass; bench/NOTES.md has the measurements).
constexpr int64_t kAmxRange = 512;

}  // namespace cpu
}  // namespace fused_rnn
