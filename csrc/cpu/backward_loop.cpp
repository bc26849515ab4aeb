// The backward step loop on the CPU.
//
// It has the forward's shape (forward_loop.cpp), walking the steps the other way: at each step a
// thread first propagates the step after's gate gradients into its columns of dh (dG·W_hh), then
// runs the cell backward on them. Once a chunk of steps is done, each thread adds its share of the
// rows of dW_ih, dW_hh and the bias gradients while the chunk's gate gradients are in cache, and
// computes its share of the chunk's rows of dX. h_{t-1} is read from the outputs (or h_0), c_{t-1}
// from the step before's saved c_t (or c_0): neither is saved twice (under recurrent dropout dW_hh
// takes h'_{t-1}, which the op computes from them, and m scales dG·W_hh). Which kernel takes each
// product is the plan's (kernel_plan.h). Chunks are added in a fixed order, nothing across
// threads: reproducible, as the forward. Under layer norm, as in the forward, whole rows per thread
// after dG·W_hh (normalized_row_backward), and the products take the normalized projections'
// gradients (NormChunk).
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include "amx_split.h"
#include "blas.h"
#include "cell_units.h"
#include "chunks.h"
#include "kernel_plan.h"
#include "panels.h"
#include "team.h"

namespace fused_rnn {
namespace cpu {
namespace {

using at::Tensor;

// Calls of up to this many steps read W_hh and W_ih as panels in place (Panels::of_columns);
// longer ones pack them once. LSTM T100 B8 H1024 backward on the Zen 5: 94-101 ms in place, 76-78
// packed; a cell's step (T = 1) packed spent a third of its backward packing (bench/NOTES.md).
constexpr int64_t kStepsInPlace = 4;

// One call's backward: its operands, its plan's kernels and buffers (set up once), and the walk's
// named steps, which each thread of the team runs on its own share (Share).
template <typename Cell>
class BackwardLoop {
  using T = typename Cell::scalar_t;
  static constexpr int64_t W = KernelMath<T>::kWidth;
  static constexpr int C = kVectorsPerGate<1>;

 public:
  static void run(const CpuPlan& plan, const LayerShape& s, bool reverse, const BackwardOperands& op,
                  const Tensor& w_hh_conj, const Tensor& w_hr_conj, Tensor& dh_total, LayerGrads& grads) {
    const BackwardLoop loop(plan, s, reverse, op, w_hh_conj, w_hr_conj, dh_total, grads);
    Team(2.0 * s.B * loop.GH * (2 * s.P + 2 * s.I)).run([&](const Member& me) { loop.walk(me); });
  }

 private:
  // What one thread keeps from step to step: its columns of dh (blocks of P), with a projection
  // its hidden units (in vectors), and the gate gradients of the step before, still to propagate.
  // A chunk's buffers of the gradients the products take (layer norm: their own; else dG's).
  struct NormChunk {
    T* dax;  // of x·W_ihᵀ: dW_ih and dX
    T* dah;  // of the recurrent product: dG·W_hh and dW_hh
    T* dyc;  // LSTM with layer norm: dL/dy of y = LN(ĉ_t) ⊙ weight + bias [rows, H]; else null
  };

  struct Share {
    const Member& me;
    int64_t u0, u1, v0, v1;
    const T* pending_dg = nullptr;
    int64_t pending_rows = 0;
  };

  BackwardLoop(const CpuPlan& plan, const LayerShape& s, bool reverse, const BackwardOperands& op,
               const Tensor& w_hh_conj, const Tensor& w_hr_conj, Tensor& dh_total, LayerGrads& grads)
      : s(s), reverse(reverse), H(s.H), P(s.P), I(s.I), GH(s.gates * s.H), K(s.saved_cols()) {
    const Tensor &x = op.x, &w_ih = op.w_ih, &saved = op.saved, &dh = op.dh, &dc = op.dc;
    // dG·W_hh and dX on AMX take k in ranges of kAmxRange, so that the rows' part of a range stays
    // in L2 while the weights pass (a split row of dG is 6 bytes a k: 3 KB a range).
    amx_steps = plan.steps == Kernel::kAmx;
    amx_dx = plan.input == Kernel::kAmx;
    tiled_dx = plan.input == Kernel::kAvx512Tiles;
    tiled_dw = plan.weight_grads == Kernel::kAvx512Tiles;
    wide_cells = plan.wide_cells;
    panels = amx_steps            ? Panels<T>::geometry(GH, 1, wide_vectors_per_gate(1, P), P, kWideWidth)
             : plan.wide_panels() ? Panels<T>::of_columns(w_hh_conj, wide_vectors_per_gate(1, P), kWideWidth,
                                                          s.T <= kStepsInPlace)
                                  : Panels<T>::of_columns(w_hh_conj, C);
    d_proj_input = s.proj ? at::empty({s.B, H}, dh.options()) : Tensor();
    // Recurrent dropout: dG·W_hh lands here, and m ⊙ it in dh (propagate).
    dh_product = s.recurrent_dropout ? at::empty({s.B, P}, dh.options()) : Tensor();
    // The gate gradients, a chunk of steps at a time (chunks.h), in two buffers taken in turn: a
    // chunk's first step still propagates the last step of the chunk before. A buffer is written
    // again two chunks later, past the step barriers of the chunk between, so every thread has
    // finished its dX rows from it by then.
    chunk_cap = chunk_rows(s, GH);
    buffer_rows = std::min(s.N, chunk_cap);
    dgx_buffers = empty_large({2, buffer_rows, GH}, dh.options());
    dgh_buffers = Cell::kSeparateRecurrentGrad ? empty_large({2, buffer_rows, GH}, dh.options()) : dgx_buffers;
    if (s.layer_norm) {  // two of each, as dG's
      dax_buffers = empty_large({2, buffer_rows, GH}, dh.options());
      dah_buffers = empty_large({2, buffer_rows, GH}, dh.options());
      if (Cell::kHasCellState) dyc_buffers = empty_large({2, buffer_rows, H}, dh.options());
    }
    // dX on the tiles takes panels of W_ih's columns, only where dX is asked for (not for a first
    // layer whose input needs no gradient: 16 MB packed for nothing at H = 1024).
    x_groups = wide_vectors_per_gate(1, I);
    h_groups = wide_vectors_per_gate(1, P);
    input_panels = tiled_dx ? Panels<T>::of_columns(w_ih, x_groups, kWideWidth, s.T <= kStepsInPlace) : Panels<T>();
    dh_split = amx_steps ? AmxSplit::of_columns(w_hh_conj, s.B) : AmxSplit();
    dx_split = amx_dx ? AmxSplit::of_columns(w_ih, buffer_rows) : AmxSplit();
    // dW on the tiles: each chunk's x and h_{t-1} packed into panels by the team, and a strip of
    // dG's columns per thread (see weight_grads_tiled).
    x_panels_size = Panels<T>::columns_size(buffer_rows, I, x_groups, kWideWidth);
    const int64_t h_panels_size = Panels<T>::columns_size(buffer_rows, P, h_groups, kWideWidth);
    strip_columns = std::min(kWideWidth, GH);  // no wider than dG itself
    if (tiled_dw) {
      chunk_panels = empty_large({std::max<int64_t>(1, x_panels_size + h_panels_size)}, dh.options());
      strips = empty_large({std::max<int64_t>(1, at::get_num_threads()) * buffer_rows * strip_columns}, dh.options());
    }
    // Rows of dG a pass of dX takes: the thread's whole share where a panel block of W_ih (G*H k
    // by 64 columns, 1 MB at H = 1024) fits in half of L2, so that every row tile reads it from
    // there; else about 384 KB of rows, which stay in L2 while the panels stream past.
    const int64_t dx_block_bytes = input_panels.block_size() * static_cast<int64_t>(sizeof(T));
    dx_rows = 2 * dx_block_bytes <= l2_cache_bytes() ? buffer_rows : projection_rows(GH);

    x_p = x.data_ptr<T>();
    w_ih_p = w_ih.data_ptr<T>();
    saved_p = saved.data_ptr<T>();
    out_p = op.outputs.data_ptr<T>();
    out_ld = op.outputs.stride(0);
    h0_p = op.h0.data_ptr<T>();
    product_out_p = op.product_outputs.data_ptr<T>();
    product_out_ld = op.product_outputs.stride(0);
    product_h0_p = op.product_h0.data_ptr<T>();
    c0_p = op.c0.defined() ? op.c0.data_ptr<T>() : nullptr;
    runs = previous_runs(s, reverse);
    dy_p = op.dy.defined() ? op.dy.data_ptr<T>() : nullptr;
    const Variants& v = op.variants;
    peephole_p = v.peephole.defined() ? v.peephole.data_ptr<T>() : nullptr;
    d_peephole_p = grads.d_peephole.defined() ? grads.d_peephole.data_ptr<T>() : nullptr;
    zoneout_p = v.zoneout_masks.defined() ? v.zoneout_masks.data_ptr<T>() : nullptr;
    dropout_mask_p = s.recurrent_dropout ? v.recurrent_masks.data_ptr<T>() : nullptr;
    dh_product_p = s.recurrent_dropout ? dh_product.data_ptr<T>() : nullptr;
    norm_p = s.layer_norm ? v.layer_norm.data_ptr<T>() : nullptr;
    d_norm_p = s.layer_norm ? grads.d_layer_norm.data_ptr<T>() : nullptr;
    dax_buffers_p = dax_buffers.defined() ? dax_buffers.data_ptr<T>() : nullptr;
    dah_buffers_p = dah_buffers.defined() ? dah_buffers.data_ptr<T>() : nullptr;
    dyc_buffers_p = dyc_buffers.defined() ? dyc_buffers.data_ptr<T>() : nullptr;
    // GRU's cell, and any cell under zoneout, leaves the direct part of dL/dh_{t-1} in dh for the
    // step's dG·W_hh to add to
    direct_dh = Cell::kSeparateRecurrentGrad || s.zoneout > 0;
    w_hr_p = s.proj ? w_hr_conj.data_ptr<T>() : nullptr;
    dh_p = dh.data_ptr<T>();
    dc_p = dc.defined() ? dc.data_ptr<T>() : nullptr;
    dgx_buffers_p = dgx_buffers.data_ptr<T>();
    dgh_buffers_p = dgh_buffers.data_ptr<T>();
    dh_total_p = s.proj ? dh_total.data_ptr<T>() : nullptr;
    d_proj_p = s.proj ? d_proj_input.data_ptr<T>() : nullptr;
    dx_p = grads.dx.defined() ? grads.dx.data_ptr<T>() : nullptr;
    dw_ih_p = grads.dw_ih.data_ptr<T>();
    dw_hh_p = grads.dw_hh.data_ptr<T>();
    db_ih_p = grads.db_ih.defined() ? grads.db_ih.data_ptr<T>() : nullptr;
    db_hh_p = grads.db_hh.defined() && Cell::kSeparateRecurrentGrad ? grads.db_hh.data_ptr<T>() : nullptr;
    x_panels_p = tiled_dw ? chunk_panels.data_ptr<T>() : nullptr;
    h_panels_p = tiled_dw ? x_panels_p + x_panels_size : nullptr;
    strips_p = tiled_dw ? strips.data_ptr<T>() : nullptr;
  }

  // The walk: steps in the forward's order, backwards, a chunk at a time; after each chunk's steps
  // the products that need the whole chunk's gate gradients.
  void walk(const Member& me) const {
    Share share{me, 0, 0, 0, 0};
    std::tie(share.u0, share.u1) = me.share(panels.blocks);
    std::tie(share.v0, share.v1) = me.share((H + W - 1) / W);
    for (int64_t step = 0, chunk_index = 0; step < s.T; ++chunk_index) {
      const StepChunk chunk = next_chunk(s, !reverse, step, chunk_cap);
      const int64_t half = chunk_index % 2;
      T* dgx_chunk = dgx_buffers_p + half * buffer_rows * GH;
      T* dgh_chunk = dgh_buffers_p + half * buffer_rows * GH;
      // With layer norm the products take the gradients of the projections before their norm: of
      // x·W_ihᵀ (dax) and of the recurrent product (dah); LSTM's dL/dy of LN(ĉ_t) (dyc) for its weights.
      const NormChunk norm = s.layer_norm ? NormChunk{dax_buffers_p + half * buffer_rows * GH,
                                                      dah_buffers_p + half * buffer_rows * GH,
                                                      dyc_buffers_p ? dyc_buffers_p + half * buffer_rows * H : nullptr}
                                          : NormChunk{dgx_chunk, dgh_chunk, nullptr};
      for (; step < chunk.end; ++step) {
        const int64_t t = reverse ? step : s.T - 1 - step;
        if (s.batch_sizes[t] == 0) continue;
        backward_step(share, t, chunk, dgx_chunk, dgh_chunk, norm);
      }
      weight_grads(share, chunk, chunk_index == 0, norm.dax, norm.dah);
      bias_grads(share, chunk, dgx_chunk, dgh_chunk);
      if (s.layer_norm) norm_grads(share, chunk, dgx_chunk, dgh_chunk, norm.dyc);
      input_grads(share, chunk, norm.dax);
    }
    propagate_amx(share);  // the first step's gate gradients reach h_0
    for (int64_t u = share.u0; u < share.u1; ++u) propagate(share, u);
  }

  // Step t: the step after's gate gradients propagated into dh, then the cell backward on this
  // thread's units, writing dG_t into the chunk's buffers.
  void backward_step(Share& share, int64_t t, const StepChunk& chunk, T* dgx_chunk, T* dgh_chunk,
                     const NormChunk& norm) const {
    const Member& me = share.me;
    const int64_t n = s.batch_sizes[t], off = s.offsets[t];
    const int64_t first = off - chunk.row0;  // the step's first row in the chunk buffers
    const Predecessor before = predecessor(s, reverse, t);
    // The cell backward on rows [0, n), units [j, j + lanes), the gradient at h_t read from cell_dh.
    const auto cell_rows = [&](int64_t j, int64_t lanes, const T* step_dy, T* cell_dh, int64_t dh_stride) {
      for (int64_t b = 0; b < n && lanes > 0; ++b) {
        const T* h_prev = before.row(b, out_p, out_ld, h0_p, P);
        const T* c_prev = c0_p ? before.row(b, saved_p + s.cell_state_col(), K, c0_p, H) : nullptr;
        const StepBackward<T> io{step_dy ? step_dy + b * P : nullptr, cell_dh + b * dh_stride,
                                 dc_p ? dc_p + b * H : nullptr, saved_p + (off + b) * K, h_prev, c_prev,
                                 dgx_chunk + (first + b) * GH, dgh_chunk + (first + b) * GH, peephole_p,
                                 d_peephole_p,
                                 Zoneout<T>::of_row(s.zoneout, zoneout_p, Cell::kHasCellState, s.N, H, P, off + b)};
        cell_units<Cell, false>(io, H, j, lanes, wide_cells);
      }
    };

    propagate_amx(share);
    if (!s.proj) {  // dh's columns are the hidden units: finish dh on this thread's blocks, then the
                    // cell on all their units of a row at once (vectors for the gate math to interleave)
      for (int64_t u = share.u0; u < share.u1; ++u) propagate(share, u);
      const int64_t j_begin = std::min(H, panels.first_column(share.u0, 0));
      if (!s.layer_norm) {
        cell_rows(j_begin, std::min(H, panels.first_column(share.u1, 0)) - j_begin, dy_p ? dy_p + off * P : nullptr,
                  dh_p, P);
      }
    } else {  // dh over output features first; the projection's backward needs all of them
      for (int64_t u = share.u0; u < share.u1; ++u) {
        propagate(share, u);
        const int64_t p_begin = panels.first_column(u, 0), p_end = std::min(P, panels.first_column(u + 1, 0));
        for (int64_t b = 0; b < n; ++b) {  // the gradient at the projection's output, kept for dW_hr
          T* total = dh_total_p + (off + b) * P;
          for (int64_t p = p_begin; p < p_end; ++p) {
            total[p] = dh_p[b * P + p] + (dy_p ? dy_p[(off + b) * P + p] : T(0));
          }
          if (s.zoneout > 0) {  // of dL/dh_t, m passes straight to h_{t-1} (the direct part), 1 - m to ĥ_t
            const Zoneout<T> zone = Zoneout<T>::of_row(s.zoneout, zoneout_p, true, s.N, H, P, off + b);
            for (int64_t p = p_begin; p < p_end; ++p) {
              const T keep = zone.template of<ScalarMath<T>>(zone.h, p);
              dh_p[b * P + p] = keep * total[p];
              total[p] = (T(1) - keep) * total[p];
            }
          }
        }
      }
      me.barrier();
      const int64_t j0 = std::min(H, share.v0 * W), j1 = std::min(H, share.v1 * W);
      gemm_rows<T>(n, j1 - j0, P, {dh_total_p + off * P, P}, {w_hr_p + j0, H}, false, d_proj_p + j0, H);
      for (int64_t v = share.v0; v < share.v1 && !s.layer_norm; ++v) {
        cell_rows(v * W, std::min(W, H - v * W), nullptr, d_proj_p, H);
      }
    }
    if (s.layer_norm) {  // a row's statistics need all its units: each thread takes whole rows
      me.barrier();      // dL/dh_t complete on every unit
      const auto [b0, b1] = me.share(n);
      for (int64_t b = b0; b < b1; ++b) {
        const bool projected = s.proj;
        normalized_row_backward(t, b, first, projected ? nullptr : (dy_p ? dy_p + off * P : nullptr),
                                projected ? d_proj_p + b * H : dh_p + b * P, dgx_chunk, dgh_chunk, norm);
      }
    }
    me.barrier();  // dG_t complete before anyone propagates it
    share.pending_dg = norm.dah + first * GH;
    share.pending_rows = n;
  }

  // Layer norm: the cell's backward on every unit of row b of step t (LSTM's two passes, cells.h's
  // CellNorm), then the gradients of the normalized projections, dax and dah, from the gate
  // gradients (RowNorm::backward of dG ⊙ ln weight, with the saved x̂ and 1/σ). The weights'
  // gradients (peepholes, layer norm) are summed per column after the chunk (norm_grads): a row's
  // thread depends on the thread count, a column's sum must not.
  void normalized_row_backward(int64_t t, int64_t b, int64_t first, const T* row_dy, T* row_dh, T* dgx_chunk,
                               T* dgh_chunk, const NormChunk& norm) const {
    const int64_t off = s.offsets[t];
    const Predecessor before = predecessor(s, reverse, t);
    const T* saved_row = saved_p + (off + b) * K;
    const T* saved_norm = saved_row + s.norm_col();  // x̂_x [GH], x̂_h [GH], statistics
    T* dgx_row = dgx_chunk + (first + b) * GH;
    T* dgh_row = dgh_chunk + (first + b) * GH;
    StepBackward<T> io{row_dy ? row_dy + b * P : nullptr, row_dh, dc_p ? dc_p + b * H : nullptr, saved_row,
                       before.row(b, out_p, out_ld, h0_p, P),
                       c0_p ? before.row(b, saved_p + s.cell_state_col(), K, c0_p, H) : nullptr, dgx_row, dgh_row,
                       peephole_p, nullptr, Zoneout<T>::of_row(s.zoneout, zoneout_p, Cell::kHasCellState, s.N, H, P,
                                                               off + b)};
    if constexpr (Cell::kHasCellState) {
      io.norm = {norm_p + 2 * GH, norm_p + 2 * GH + H, nullptr, norm.dyc + (first + b) * H,
                 RowNorm<T>{saved_norm[2 * GH + 2], saved_norm[2 * GH + 3]}};
    }
    cell_units<Cell, false>(io, H, 0, H, wide_cells);
    if (io.norm.weight) {  // LSTM's second pass, with the row's means of g = dy ⊙ weight and g x̂
      const T* c_own = saved_row + LSTMCell<T>::kOwnStateSlot * H;
      const T *dy = io.norm.dy, *weight = io.norm.weight;
      const RowNorm<T>& c_norm = io.norm.norm;
      io.norm.mean_g = RowNorm<T>::mean_of(H, [&](int64_t j) { return dy[j] * weight[j]; });
      io.norm.mean_gx =
          RowNorm<T>::mean_of(H, [&](int64_t j) { return dy[j] * weight[j] * c_norm.normalized(c_own[j]); });
      io.norm.output_pass = true;
      cell_units<Cell, false>(io, H, 0, H, wide_cells);
    }
    // dL/d(x·W_ihᵀ) and dL/d(h_{t-1}·W_hhᵀ): LN's backward of the gate gradients times the ln weights
    T* dax_row = norm.dax + (first + b) * GH;
    T* dah_row = norm.dah + (first + b) * GH;
    for (int64_t j = 0; j < GH; ++j) dax_row[j] = dgx_row[j] * norm_p[j];
    RowNorm<T>{T(0), saved_norm[2 * GH]}.backward(dax_row, saved_norm, GH, dax_row);
    for (int64_t j = 0; j < GH; ++j) dah_row[j] = dgh_row[j] * norm_p[GH + j];
    RowNorm<T>{T(0), saved_norm[2 * GH + 1]}.backward(dah_row, saved_norm + GH, GH, dah_row);
  }

  // Layer norm: this thread's columns of the chunk's sums for the ln weights (dG ⊙ x̂ of each
  // projection; LSTM's dy ⊙ LN(ĉ_t) and dy), and for the peepholes (dG ⊙ c_{t-1}, dG_o ⊙ ĉ_t), row by
  // row in order (the same bits for any thread count).
  void norm_grads(const Share& share, const StepChunk& chunk, const T* dgx_chunk, const T* dgh_chunk,
                  const T* dyc_chunk) const {
    const auto [g0, g1] = share.me.share(GH, gemm_piece(GH));
    for (int64_t r = 0; r < chunk.rows; ++r) {
      const T* saved_norm = saved_p + (chunk.row0 + r) * K + s.norm_col();
      for (int64_t j = g0; j < g1; ++j) {
        d_norm_p[j] += dgx_chunk[r * GH + j] * saved_norm[j];
        d_norm_p[GH + j] += dgh_chunk[r * GH + j] * saved_norm[GH + j];
      }
    }
    if constexpr (!Cell::kHasCellState) return;
    const auto [j0, j1] = share.me.share(H, W);
    for (int64_t r = 0; r < chunk.rows; ++r) {
      const T* saved_row = saved_p + (chunk.row0 + r) * K;
      const RowNorm<T> c_norm{saved_row[s.norm_col() + 2 * GH + 2], saved_row[s.norm_col() + 2 * GH + 3]};
      const T* c_own = saved_row + LSTMCell<T>::kOwnStateSlot * H;
      for (int64_t j = j0; j < j1; ++j) {
        const T dy = dyc_chunk[r * H + j];
        d_norm_p[2 * GH + j] += dy * c_norm.normalized(c_own[j]);
        d_norm_p[2 * GH + H + j] += dy;
      }
    }
    if (!d_peephole_p) return;
    rows_before_in(chunk, c0_p, H, saved_p + s.cell_state_col(), K, [&](int64_t lo, int64_t hi, const T* c_prev,
                                                                       int64_t ld) {
      for (int64_t r = lo; r < hi; ++r) {
        const T* dg = dgx_chunk + (r - chunk.row0) * GH;
        const T* prev = c_prev + (r - lo) * ld;
        const T* c_own = saved_p + r * K + LSTMCell<T>::kOwnStateSlot * H;
        for (int64_t j = j0; j < j1; ++j) {
          d_peephole_p[j] += dg[j] * prev[j];
          d_peephole_p[H + j] += dg[H + j] * prev[j];
          d_peephole_p[2 * H + j] += dg[3 * H + j] * c_own[j];
        }
      }
    });
  }

  // dL/dh_{t-1} (+)= dG_t · W_hh on the columns of block u, for the step whose gate gradients are
  // pending (GRU's cell, and any under zoneout, has already written the direct part into dh: accumulate).
  void propagate(const Share& share, int64_t u) const {
    if (amx_steps) return;  // propagate_amx did it
    const int64_t j0 = panels.first_column(u, 0);
    T* into = dh_product_p ? dh_product_p : dh_p;
    rows_product<T, C>(panels, u, share.pending_rows, [&](int64_t r) { return share.pending_dg + r * GH; },
                       [&](int64_t r) { return into + r * P + j0; }, 0, direct_dh && !dh_product_p);
    drop_product_grad(share.pending_rows, j0, std::min(P, panels.first_column(u + 1, 0)));
  }

  // Recurrent dropout: the product's part of dL/dh_{t-1} is m ⊙ (dG_t·W_hh) (cells.h's
  // RecurrentDropout), on columns [p0, p1) of rows [0, rows), added to the direct part where there is one.
  void drop_product_grad(int64_t rows, int64_t p0, int64_t p1) const {
    for (int64_t b = 0; b < rows && dh_product_p; ++b) {
      T* dh_row = dh_p + b * P;
      const T *product = dh_product_p + b * P, *mask = dropout_mask_p + b * P;
      for (int64_t p = p0; p < p1; ++p) dh_row[p] = (direct_dh ? dh_row[p] : T(0)) + mask[p] * product[p];
    }
  }

  // The same on AMX for all of this thread's blocks at once: the pending rows split by the team,
  // then k in ranges.
  void propagate_amx(const Share& share) const {
    if (!amx_steps || share.pending_rows == 0) return;
    dh_split.split_rows(share.me, share.pending_rows, [&](int64_t r) { return share.pending_dg + r * GH; });
    share.me.barrier();  // every row split before anyone multiplies
    const int64_t q0 = panels.first_column(share.u0, 0) / kAmxTile;
    const int64_t q1 = std::min(dh_split.groups(), panels.first_column(share.u1, 0) / kAmxTile);
    T* into = dh_product_p ? dh_product_p : dh_p;
    for (int64_t k0 = 0; k0 < GH && q0 < q1; k0 += kAmxRange) {
      dh_split.product(0, share.pending_rows, q0, q1, into, P, k0, std::min(GH, k0 + kAmxRange),
                       k0 > 0 || (direct_dh && !dh_product_p));
    }
    if (q0 < q1) drop_product_grad(share.pending_rows, q0 * kAmxTile, std::min(P, q1 * kAmxTile));
  }

  // f(lo, hi, h_prev, ld) for each part [lo, hi) of a run of h_{t-1} that lies in the chunk's rows:
  // h_prev is row lo's h_{t-1} as the product took it (h'_{t-1} under recurrent dropout; from h_0 or
  // the outputs), ld its row stride.
  template <typename F>
  void previous_runs_in(const StepChunk& chunk, const F& f) const {
    rows_before_in(chunk, product_h0_p, P, product_out_p, product_out_ld, f);
  }
  // The same for any state kept as h is: rows of `initial` (h_0, c_0) or of `before` (the outputs,
  // saved's c_t), with their row strides.
  template <typename F>
  void rows_before_in(const StepChunk& chunk, const T* initial, int64_t initial_ld, const T* before,
                      int64_t before_ld, const F& f) const {
    for (const PreviousRun& run : runs) {
      const int64_t lo = std::max(run.row, chunk.row0), hi = std::min(run.row + run.rows, chunk.row0 + chunk.rows);
      if (lo >= hi) continue;
      const int64_t source = run.source + lo - run.row;
      f(lo, hi, run.from_h0 ? initial + source * initial_ld : before + source * before_ld,
        run.from_h0 ? initial_ld : before_ld);
    }
  }

  // A complete chunk's share of dW_ih and dW_hh (+)= dGᵀ·[x, h_{t-1}] (after its last step's
  // barrier), on the plan's kernel, chunk after chunk in a fixed order. The tiles write the first
  // chunk's as 0 + its sum (ops_cpu.cpp then leaves dW unzeroed); BLAS adds to zeros.
  void weight_grads(const Share& share, const StepChunk& chunk, bool first, const T* dgx_chunk,
                    const T* dgh_chunk) const {
    if (tiled_dw) {
      weight_grads_tiled(share.me, chunk, first, dgx_chunk, dgh_chunk);
      return;
    }
    // BLAS: this thread's pieces of the G*H rows, each a single GEMM (per run of h_{t-1} for
    // dW_hh), so that BLAS packs the chunk's x once.
    const int64_t piece = gemm_piece(GH);
    const auto [g0, g1] = share.me.share(GH, piece);
    for_each_piece(g0, g1, piece, [&](int64_t j0, int64_t j1) {
      gemm_rows<T>(j1 - j0, I, chunk.rows, {dgx_chunk + j0, GH, true}, {x_p + chunk.row0 * I, I, false, true}, true,
                   dw_ih_p + j0 * I, I);
      previous_runs_in(chunk, [&](int64_t lo, int64_t hi, const T* h_prev, int64_t ld) {
        gemm_rows<T>(j1 - j0, P, hi - lo, {dgh_chunk + (lo - chunk.row0) * GH + j0, GH, true},
                     {h_prev, ld, false, true}, true, dw_hh_p + j0 * P, P);
      });
    });
  }

  // The same on the AVX-512 tiles: the chunk's x and h_{t-1} packed into panels (each thread a
  // share of the blocks, then a barrier); each thread its share of dG's columns, 16 at a time
  // copied into a strip whose k lie 16 floats apart (dG's are 4·G·H bytes apart, too far for the
  // tiles' broadcasts), times every block.
  void weight_grads_tiled(const Member& me, const StepChunk& chunk, bool first, const T* dgx_chunk,
                          const T* dgh_chunk) const {
    const Panels<T> xs = Panels<T>::columns_in(x_panels_p, buffer_rows, chunk.rows, I, x_groups, kWideWidth);
    const Panels<T> hs = Panels<T>::columns_in(h_panels_p, buffer_rows, chunk.rows, P, h_groups, kWideWidth);
    me.barrier();  // everyone is done with the chunk before's panels (its steps may all have been empty)
    {
      const auto [u0, u1] = me.share(xs.blocks);
      for (int64_t u = u0; u < u1; ++u) xs.pack_rows(u, x_p + chunk.row0 * I, I, 0, chunk.rows);
    }
    const auto [h0_block, h1_block] = me.share(hs.blocks);
    previous_runs_in(chunk, [&](int64_t lo, int64_t hi, const T* h_prev, int64_t ld) {
      for (int64_t v = h0_block; v < h1_block; ++v) hs.pack_rows(v, h_prev, ld, lo - chunk.row0, hi - lo);
    });
    me.barrier();
    T* strip = strips_p + me.index * buffer_rows * strip_columns;
    const auto copy_strip = [&](const T* dg, int64_t j0, int64_t n) {
      for (int64_t k = 0; k < chunk.rows; ++k) std::memcpy(strip + k * strip_columns, dg + k * GH + j0, n * sizeof(T));
    };
    const auto strip_times = [&](const Panels<T>& blocks, int64_t j0, int64_t n, T* dw, int64_t ld) {
      for (int64_t u = 0; u < blocks.blocks; ++u) {
        T* out = dw + j0 * ld + blocks.first_column(u, 0);
        rows_product<T, C>(blocks, u, n, [&](int64_t r) { return strip + r; }, [&](int64_t r) { return out + r * ld; },
                           0, !first, nullptr, strip_columns, first);
      }
    };
    const auto [g0, g1] = me.share(GH, strip_columns);
    for (int64_t j0 = g0; j0 < g1; j0 += strip_columns) {
      const int64_t n = std::min(strip_columns, g1 - j0);
      copy_strip(dgx_chunk, j0, n);
      strip_times(xs, j0, n, dw_ih_p, I);
      if (dgh_chunk != dgx_chunk) copy_strip(dgh_chunk, j0, n);
      strip_times(hs, j0, n, dw_hh_p, P);
    }
  }

  // This thread's share of the bias gradients' columns (the same pieces as weight_grads' BLAS).
  void bias_grads(const Share& share, const StepChunk& chunk, const T* dgx_chunk, const T* dgh_chunk) const {
    const auto [g0, g1] = share.me.share(GH, gemm_piece(GH));
    for (int64_t r = 0; r < chunk.rows && db_ih_p; ++r) {
      for (int64_t j = g0; j < g1; ++j) db_ih_p[j] += dgx_chunk[r * GH + j];
    }
    for (int64_t r = 0; r < chunk.rows && db_hh_p; ++r) {
      for (int64_t j = g0; j < g1; ++j) db_hh_p[j] += dgh_chunk[r * GH + j];
    }
  }

  // This thread's share of the chunk's rows of dX = dG·W_ih, on the plan's kernel.
  void input_grads(const Share& share, const StepChunk& chunk, const T* dgx_chunk) const {
    const Member& me = share.me;
    if (!dx_p) return;
    if (amx_dx) {  // this thread's rows of dG, split, times W_ih over k in ranges
      const auto [r0, r1] = me.share(chunk.rows, 2 * kAmxTile);
      dx_split.split_rows(r0, r1, [&](int64_t r) { return dgx_chunk + r * GH; });
      for (int64_t k0 = 0; k0 < GH && r0 < r1; k0 += kAmxRange) {
        dx_split.product(r0, r1 - r0, 0, dx_split.groups(), dx_p + (chunk.row0 + r0) * I, I, k0,
                         std::min(GH, k0 + kAmxRange), k0 > 0);
      }
    } else if (tiled_dx) {
      const auto [r0, r1] = me.share(chunk.rows);
      for (int64_t q0 = r0; q0 < r1; q0 += dx_rows) {
        for (int64_t u = 0; u < input_panels.blocks; ++u) {
          T* dx_rows_p = dx_p + (chunk.row0 + q0) * I + input_panels.first_column(u, 0);
          rows_product<T, C>(input_panels, u, std::min(dx_rows, r1 - q0), [&](int64_t r) { return dgx_chunk + (q0 + r) * GH; },
                             [&](int64_t r) { return dx_rows_p + r * I; }, 0, false);
        }
      }
    } else {
      const auto [r0, r1] = me.share(chunk.rows, kGemmRowPiece);
      for_each_piece(r0, r1, kGemmRowPiece, [&](int64_t q0, int64_t q1) {
        gemm_rows<T>(q1 - q0, I, GH, {dgx_chunk + q0 * GH, GH}, {w_ih_p, I, false, true}, false,
                     dx_p + (chunk.row0 + q0) * I, I);
      });
    }
  }

  const LayerShape& s;
  const bool reverse;
  const int64_t H, P, I, GH, K;
  bool amx_steps = false, amx_dx = false, tiled_dx = false, tiled_dw = false, wide_cells = false;
  Panels<T> panels, input_panels;
  AmxSplit dh_split, dx_split;
  Tensor dax_buffers, dah_buffers, dyc_buffers;
  Tensor d_proj_input, dh_product, dgx_buffers, dgh_buffers, chunk_panels, strips;
  int64_t chunk_cap = 0, buffer_rows = 0, x_groups = 0, h_groups = 0, x_panels_size = 0, strip_columns = 0, dx_rows = 0;
  std::vector<PreviousRun> runs;  // of h_{t-1}, for dW_hh
  const T *x_p, *w_ih_p, *saved_p, *out_p, *h0_p, *c0_p, *dy_p, *w_hr_p, *peephole_p, *zoneout_p;
  const T *product_out_p, *product_h0_p, *dropout_mask_p;  // h'_{t-1} for dW_hh, and m (recurrent dropout)
  T* dh_product_p;  // recurrent dropout: dG·W_hh before m, [B, P]; else null
  const T* norm_p;  // layer norm's weights [ln_ih | ln_hh | LSTM: ln_c weight, bias], or null
  T* d_norm_p;      // and their gradient, summed per column (norm_grads)
  T *dax_buffers_p, *dah_buffers_p, *dyc_buffers_p;
  bool direct_dh = false;
  int64_t out_ld = 0, product_out_ld = 0;
  T *d_peephole_p;  // each unit's sums added by the thread that owns the unit, in the walk's order
  T *dh_p, *dc_p, *dgx_buffers_p, *dgh_buffers_p, *dh_total_p, *d_proj_p, *dx_p, *dw_ih_p, *dw_hh_p, *db_ih_p, *db_hh_p;
  T *x_panels_p, *h_panels_p, *strips_p;
};

}  // namespace
}  // namespace cpu

void backward_loop_cpu(const cpu::CpuPlan& plan, const LayerShape& s, bool reverse, const BackwardOperands& op,
                       const at::Tensor& w_hh_conj, const at::Tensor& w_hr_conj, at::Tensor& dh_total,
                       LayerGrads& grads) {
  AT_DISPATCH_FLOATING_AND_COMPLEX_TYPES(op.saved.scalar_type(), "fused_rnn_backward_cpu", [&] {
    dispatch_cell<cpu::BackwardLoop, scalar_t>(s.cell, plan, s, reverse, op, w_hh_conj, w_hr_conj, dh_total, grads);
  });
}

}  // namespace fused_rnn
