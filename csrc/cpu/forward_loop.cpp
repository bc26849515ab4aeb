// The forward step loop on the CPU.
//
// The recurrent weights are packed once per call into panels (panels.h) that a register-blocked
// kernel streams: for a block of hidden units, all G gates' weights side by side for each k. A
// sequence runs in one parallel region (a Team, team.h): each thread keeps a range of unit blocks
// for every step. Per step it computes h_{t-1}·W_hhᵀ for all gates of a block and runs the cells.h
// math on it while it is in cache; a barrier ends the step. x·W_ihᵀ is computed a chunk of steps at
// a time (chunks.h), each thread its share of the columns. Which kernel takes each product is the
// plan's (kernel_plan.h). A projection (LSTM proj_size) needs every unit first: one more barrier
// per step, and BLAS. Under recurrent dropout the cells (or the projection) also write h'_t = h_t ⊙ m
// into rows of their own, which the next step's product reads instead of the outputs. Under layer
// norm a row's statistics need all its units: after the products one more barrier, then each thread
// takes whole rows (normalized product, the cell on every unit); x·W_ihᵀ is normalized per chunk.
//
// Blocks are aligned to the vector width, so which units take the scalar tail does not depend on
// the number of threads, and nothing is accumulated across threads: results are reproducible, and
// the same for any number of threads except where BLAS gives other bits to another share of a
// product (the projection's last bits can differ; tests/test_cpu_blocking.py checks the rest).
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstring>

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

// How far ahead the gate math asks for its rows of x's projection.
constexpr int64_t kPrefetchRows = 3;

template <typename Cell>
struct ForwardLoop {
  using T = typename Cell::scalar_t;
  static constexpr int64_t W = KernelMath<T>::kWidth;
  static constexpr int G = Cell::kGates, C = kVectorsPerGate<G>;

  static void run(const CpuPlan& plan, const LayerShape& s, bool reverse, const Tensor& x, const Tensor& w_ih, const Tensor& bias,
                  const Tensor& w_hh, const Tensor& b_hn, const Tensor& w_hr, const Variants& variants, Tensor& y,
                  Tensor& h, Tensor& c, Tensor& saved) {
    const int64_t H = s.H, P = s.P, GH = G * H;
    const int64_t K = saved.defined() ? s.saved_cols() : 0;
    // The plan's kernels (kernel_plan.h). The AVX-512 steps read W_hh in panels; the row dots and
    // AMX read it as it is and as split tiles, and take the panels' geometry only.
    const bool row_dots = plan.steps == Kernel::kAvx512RowDots, amx_steps = plan.steps == Kernel::kAmx;
    const bool amx = plan.input == Kernel::kAmx, tiled_projection = plan.input == Kernel::kAvx512Tiles;
    // A call of a few rows (a cell's step) multiplies W_ih as it lies: packing it would cost more
    // than the product, every call (wide_rows_of_rows: the tiles' sums, the same bits).
    const bool projection_of_rows = tiled_projection && s.N <= kWideRowsOfRows;
    const Panels<T> panels =
        row_dots || amx_steps ? Panels<T>::geometry(P, G, wide_vectors_per_gate(G, H), H, kWideWidth)
        : plan.wide_panels()  ? Panels<T>::of_rows(w_hh, G, wide_vectors_per_gate(G, H), H, kWideWidth)
                              : Panels<T>::of_rows(w_hh, G, C, H);
    const T* w_hh_p = w_hh.data_ptr<T>();
    const Panels<T> input_panels =
        projection_of_rows ? Panels<T>::geometry(s.I, 1, wide_vectors_per_gate(1, GH), GH, kWideWidth)
        : tiled_projection ? Panels<T>::of_rows(w_ih, 1, wide_vectors_per_gate(1, GH), GH, kWideWidth)
                           : Panels<T>();
    const int64_t input_rows = projection_rows(s.I);
    // x·W_ihᵀ + bias, a chunk of steps at a time (see kChunkElements).
    const int64_t chunk_cap = chunk_rows(s, GH);
    // W_ih (and W_hh) split once per call; each chunk's x (each step's h_{t-1}) split by all
    // threads before any multiplies.
    const AmxSplit x_split =
        amx ? AmxSplit::of_rows(w_ih, 1, GH, std::min(s.N, chunk_cap),
                                bias.defined() && !s.layer_norm ? bias.data_ptr<float>() : nullptr)
            : AmxSplit();
    const AmxSplit h_split = amx_steps ? AmxSplit::of_rows(w_hh, G, H, s.B, nullptr) : AmxSplit();
    // Rows per pass of the AMX product: whole 32-row blocks, about input_rows.
    const int64_t amx_rows = std::max<int64_t>(32, input_rows / 32 * 32);
    Tensor gx_buffer = empty_large({std::min(s.N, chunk_cap), GH}, x.options());
    Tensor gh = at::empty({s.B, GH}, x.options());
    // The LSTM's o*tanh(c_t) before the projection: kept in `saved` when training, else here.
    Tensor proj_buffer = s.proj && !saved.defined() ? at::empty({s.B, H}, x.options()) : Tensor();
    // Recurrent dropout: the products take h'_{t-1} = h_{t-1} ⊙ m (cells.h's RecurrentDropout), which
    // each step writes beside its outputs, from h_0 ⊙ m at the first.
    const bool dropout = s.recurrent_dropout;
    Tensor product_rows = dropout ? empty_large({s.N, P}, x.options()) : Tensor();
    Tensor product_h0 = dropout ? h * variants.recurrent_masks : Tensor();

    const T* x_p = x.data_ptr<T>();
    const T* w_ih_p = w_ih.data_ptr<T>();
    const T* bias_p = bias.defined() ? bias.data_ptr<T>() : nullptr;
    // Layer norm normalizes x·W_ihᵀ before the biases add (normalize_row): the products leave them out.
    const T* projection_bias_p = s.layer_norm ? nullptr : bias_p;
    const T* w_hr_p = s.proj ? w_hr.data_ptr<T>() : nullptr;
    const T* b_hn_p = b_hn.defined() ? b_hn.data_ptr<T>() : nullptr;
    const T* peephole_p = variants.peephole.defined() ? variants.peephole.data_ptr<T>() : nullptr;
    const T* zoneout_p = variants.zoneout_masks.defined() ? variants.zoneout_masks.data_ptr<T>() : nullptr;
    T* gx_buffer_p = gx_buffer.data_ptr<T>();
    T* gh_p = gh.data_ptr<T>();
    T* y_p = y.data_ptr<T>();
    T* h_p = h.data_ptr<T>();  // h_0 until the end, when it becomes h_n
    const T* dropout_mask_p = dropout ? variants.recurrent_masks.data_ptr<T>() : nullptr;
    // Layer norm: its weights [ln_ih | ln_hh | LSTM's ln_c weight, bias], and LSTM's ĉ_t and o of each row
    // between the cell's two passes (cells.h's CellNorm).
    const T* norm_p = s.layer_norm ? variants.layer_norm.data_ptr<T>() : nullptr;
    Tensor norm_scratch = s.layer_norm && Cell::kHasCellState ? at::empty({s.B, 2 * H}, x.options()) : Tensor();
    T* norm_scratch_p = norm_scratch.defined() ? norm_scratch.data_ptr<T>() : nullptr;
    T* product_rows_p = dropout ? product_rows.data_ptr<T>() : nullptr;
    const T* product_y_p = dropout ? product_rows_p : y_p;  // the rows the products read, and h_0's
    const T* product_h0_p = dropout ? product_h0.data_ptr<T>() : h_p;
    T* c_p = c.defined() ? c.data_ptr<T>() : nullptr;
    T* saved_p = saved.defined() ? saved.data_ptr<T>() : nullptr;
    T* proj_buffer_p = proj_buffer.defined() ? proj_buffer.data_ptr<T>() : nullptr;

    // The cells write h'_t where the next step's product reads it, except where a projection follows
    // them (the projected rows are masked after it).
    const bool dropout_in_cells = dropout && !s.proj;
    // Layer norm of one row of G*H (cells.h's RowNorm): v ← LN(v) ⊙ weight (+ add); x̂ and 1/σ kept
    // where given (training).
    const auto normalize_row = [&](T* v, const T* weight, const T* add, T* x_hat, T* rstd) {
      const RowNorm<T> norm = RowNorm<T>::of(v, GH);
      for (int64_t j = 0; j < GH; ++j) {
        const T normalized = norm.normalized(v[j]);
        if (x_hat) x_hat[j] = normalized;
        v[j] = normalized * weight[j] + (add ? add[j] : T(0));
      }
      if (rstd) *rstd = norm.rstd;
    };

    Team(2.0 * s.B * GH * (P + s.I)).run([&](const Member& me) {
      const auto [u0, u1] = me.share(panels.blocks);  // this thread's blocks of hidden units
      const int64_t j_begin = std::min(H, panels.first_column(u0, 0)), j_end = std::min(H, panels.first_column(u1, 0));
      const auto [p0, p1] = me.share(P);               // and output features of the projection
      for (int64_t step = 0; step < s.T;) {
        const StepChunk chunk = next_chunk(s, reverse, step, chunk_cap);
        const int64_t row0 = chunk.row0, rows = chunk.rows;
        // x·W_ihᵀ + bias for the chunk: one GEMM per thread over its share of the G*H columns, so
        // that BLAS packs the chunk's x once. The previous chunk's last step ended with a barrier,
        // so nobody still reads the buffer; a barrier after it, as a thread's steps read every gate
        // of its units.
        if (amx) {
          x_split.split_rows(me, rows, [&](int64_t r) { return x_p + (row0 + r) * s.I; });
          me.barrier();  // every row split before anyone multiplies
          const auto [q0, q1] = me.share(x_split.groups(), 2);
          for (int64_t r0 = 0; r0 < rows && q0 < q1; r0 += amx_rows) {
            x_split.product(r0, std::min(amx_rows, rows - r0), q0, q1, gx_buffer_p + r0 * GH, GH);
          }
        } else if (projection_of_rows) {
          if constexpr (std::is_same_v<T, float>) {
            const auto [b0, b1] = me.share(input_panels.blocks);
            for (int64_t u = b0; u < b1; ++u)
              for (int64_t v = 0; v < input_panels.C && input_panels.lanes(u, v) > 0; ++v) {
                const int64_t j = input_panels.first_column(u, v);
                wide_rows_of_rows(w_ih_p, j, input_panels.lanes(u, v), s.I, rows,
                                  [&](int64_t r) { return x_p + (row0 + r) * s.I; },
                                  [&](int64_t r) { return gx_buffer_p + r * GH + j; },
                                  projection_bias_p ? projection_bias_p + j : nullptr,
                                  false);
              }
          }
        } else if (tiled_projection) {
          const auto [b0, b1] = me.share(input_panels.blocks);
          for (int64_t r0 = 0; r0 < rows; r0 += input_rows) {
            for (int64_t u = b0; u < b1; ++u) {
              const int64_t j0 = input_panels.first_column(u, 0);
              rows_product<T, G * C>(input_panels, u, std::min(input_rows, rows - r0),
                                     [&](int64_t r) { return x_p + (row0 + r0 + r) * s.I; },
                                     [&](int64_t r) { return gx_buffer_p + (r0 + r) * GH + j0; }, 0, false,
                                     projection_bias_p);
            }
          }
        } else {
          const int64_t piece = gemm_piece(GH);
          const auto [c0, c1] = me.share(GH, piece);
          for_each_piece(c0, c1, piece, [&](int64_t j0, int64_t j1) {
            if (projection_bias_p) {
              for (int64_t r = 0; r < rows; ++r) {
                std::memcpy(gx_buffer_p + r * GH + j0, projection_bias_p + j0, (j1 - j0) * sizeof(T));
              }
            }
            gemm_rows<T>(rows, j1 - j0, s.I, {x_p + row0 * s.I, s.I}, {w_ih_p + j0 * s.I, s.I, true},
                         projection_bias_p != nullptr, gx_buffer_p + j0, GH);
          });
        }
        me.barrier();
        if (s.layer_norm) {  // LN(x·W_ihᵀ) ⊙ ln_ih + biases, each thread a share of the chunk's rows
          const auto [r0, r1] = me.share(rows);
          for (int64_t r = r0; r < r1; ++r) {
            T* saved_norm = saved_p ? saved_p + (row0 + r) * K + s.norm_col() : nullptr;
            normalize_row(gx_buffer_p + r * GH, norm_p, bias_p, saved_norm, saved_norm ? saved_norm + 2 * GH : nullptr);
          }
          me.barrier();
        }

        for (; step < chunk.end; ++step) {
          const int64_t t = reverse ? s.T - 1 - step : step;
          const int64_t n = s.batch_sizes[t], off = s.offsets[t];
          if (n == 0) continue;
          // h_{t-1}: the step before's output, or h_0, which h keeps until the end.
          const Predecessor before = predecessor(s, reverse, t);
          const auto h_prev_row = [&](int64_t b) { return before.row<T>(b, y_p, P, h_p, P); };
          // what the product takes: h'_{t-1} under recurrent dropout, else h_{t-1}
          const auto product_row = [&](int64_t b) { return before.row<T>(b, product_y_p, P, product_h0_p, P); };
          T* proj_in = s.proj ? (saved_p ? saved_p + off * K + s.proj_input_col() : proj_buffer_p) : nullptr;
          const int64_t proj_in_stride = saved_p ? K : H;

          if (amx_steps) {
            h_split.split_rows(me, n, product_row);
            me.barrier();  // every row of h_{t-1} split before anyone multiplies
          }
          for (int64_t u = u0; u < u1; ++u) {
            const int64_t j0 = panels.first_column(u, 0);
            if (amx_steps) {  // gate g's vector c of block u: group g·units + j0/16 + c of the split W_hh
              int64_t listed[8], count = 0;
              for (int g = 0; g < G; ++g)
                for (int64_t c = 0; c < panels.C && panels.lanes(u, c) > 0; ++c) {
                  listed[count++] = g * amx_tiles(H) + j0 / kAmxTile + c;
                }
              h_split.product(n, listed, count, gh_p, GH);
            } else if (row_dots) {  // n = 1
              if constexpr (std::is_same_v<T, float>) {
                const int64_t units = std::min(panels.C * panels.width, H - j0);
                for (int g = 0; g < G; ++g) {
                  wide_row_dots(w_hh_p + (g * H + j0) * P, P, P, product_row(0), units, gh_p + g * H + j0);
                }
              }
            } else {
              rows_product<T, G * C>(panels, u, n, product_row, [&](int64_t b) { return gh_p + b * GH + j0; },
                                     H, false);
            }
          }
          if (s.layer_norm) {  // a row's statistics need all its units: each thread takes whole rows
            me.barrier();      // every block's products done
            const auto [b0, b1] = me.share(n);
            for (int64_t b = b0; b < b1; ++b) {
              T* saved_row = saved_p ? saved_p + (off + b) * K : nullptr;
              T* saved_norm = saved_row ? saved_row + s.norm_col() : nullptr;  // x̂_x, x̂_h, statistics
              normalize_row(gh_p + b * GH, norm_p + GH, nullptr, saved_norm ? saved_norm + GH : nullptr,
                            saved_norm ? saved_norm + 2 * GH + 1 : nullptr);
              StepForward<T> io{gx_buffer_p + (off - row0 + b) * GH, gh_p + b * GH, b_hn_p, h_prev_row(b),
                                c_p ? c_p + b * H : nullptr,
                                s.proj ? proj_in + b * proj_in_stride : y_p + (off + b) * P, saved_row, peephole_p,
                                Zoneout<T>::of_row(s.zoneout, zoneout_p, Cell::kHasCellState, s.N, H, P, off + b)};
              if (dropout_in_cells) io.dropout = {dropout_mask_p + b * P, product_rows_p + (off + b) * P};
              if constexpr (Cell::kHasCellState) {
                io.norm = {norm_p + 2 * GH, norm_p + 2 * GH + H, norm_scratch_p + b * 2 * H};
              }
              cell_units<Cell, true>(io, H, 0, H, plan.wide_cells);
              if (io.norm.weight) {  // LSTM's second pass, with the statistics of the row's ĉ_t
                io.norm.norm = RowNorm<T>::of(io.norm.own, H);
                if (saved_norm) saved_norm[2 * GH + 2] = io.norm.norm.mean, saved_norm[2 * GH + 3] = io.norm.norm.rstd;
                io.norm.output_pass = true;
                cell_units<Cell, true>(io, H, 0, H, plan.wide_cells);
              }
            }
          }
          // The cells on all of this thread's units of a row at once (the gate sums of its blocks
          // are in cache still), so that the gate math has several vectors to interleave.
          for (int64_t b = 0; b < n && j_begin < j_end && !s.layer_norm; ++b) {
            // The rows of x's projection are 4·G·H bytes apart, which the hardware prefetcher
            // does not follow: ask for the gates of a row a few rows ahead.
            if (b + kPrefetchRows < n) {
              for (int g = 0; g < G; ++g)
                for (int64_t j = j_begin; j < j_end; j += kWideWidth) {
                  __builtin_prefetch(gx_buffer_p + (off - row0 + b + kPrefetchRows) * GH + g * H + j);
                }
            }
            const T* h_prev = h_prev_row(b);
            T* saved_row = saved_p ? saved_p + (off + b) * K : nullptr;
            T* out_row = s.proj ? proj_in + b * proj_in_stride : y_p + (off + b) * P;
            StepForward<T> io{gx_buffer_p + (off - row0 + b) * GH, gh_p + b * GH, b_hn_p, h_prev,
                              c_p ? c_p + b * H : nullptr, out_row, saved_row, peephole_p,
                              Zoneout<T>::of_row(s.zoneout, zoneout_p, Cell::kHasCellState, s.N, H, P, off + b)};
            if (dropout_in_cells) {
              io.dropout = {dropout_mask_p + b * P, product_rows_p + (off + b) * P};
              cell_units<Cell, true>(io, H, j_begin, j_end - j_begin, plan.wide_cells);
            } else {  // a call of its own, where the compiler sees no h'_t to write: the plain cell's code
              cell_units<Cell, true>(io, H, j_begin, j_end - j_begin, plan.wide_cells);
            }
          }
          if (s.proj) {  // y_t = (o*tanh c_t) · W_hrᵀ once every unit is done, by output features
            me.barrier();
            gemm_rows<T>(n, p1 - p0, H, {proj_in, proj_in_stride}, {w_hr_p + p0 * H, H, true}, false, y_p + off * P + p0,
                         P);
            for (int64_t b = 0; b < n && (s.zoneout > 0 || dropout); ++b) {  // this thread's output features:
              T* y_row = y_p + (off + b) * P;
              if (s.zoneout > 0) {  // h_t = m h_{t-1} + (1 - m) ĥ_t, ĥ_t the projected output
                const Zoneout<T> zone = Zoneout<T>::of_row(s.zoneout, zoneout_p, true, s.N, H, P, off + b);
                const T* h_prev = h_prev_row(b);
                for (int64_t p = p0; p < p1; ++p) {
                  y_row[p] = Zoneout<T>::mix(zone.template of<ScalarMath<T>>(zone.h, p), h_prev[p], y_row[p]);
                }
              }
              if (dropout) {  // h'_t for the next product
                const RecurrentDropout<T> drop{dropout_mask_p + b * P, product_rows_p + (off + b) * P};
                for (int64_t p = p0; p < p1; ++p) drop.template write<ScalarMath<T>>(y_row[p], p);
              }
            }
          }
          me.barrier();  // h_t complete before anyone starts step t+1
        }
      }
    });

    for (const FinalRun& run : final_runs(s, reverse)) {  // h_n
      std::memcpy(h_p + run.row * P, y_p + run.source * P, run.rows * P * sizeof(T));
    }
  }
};

}  // namespace
}  // namespace cpu

void forward_loop_cpu(const cpu::CpuPlan& plan, const LayerShape& s, bool reverse, const at::Tensor& x,
                      const at::Tensor& w_ih, const at::Tensor& bias, const at::Tensor& w_hh, const at::Tensor& b_hn,
                      const at::Tensor& w_hr, const Variants& variants, at::Tensor& y, at::Tensor& h,
                      at::Tensor& c, at::Tensor& saved) {
  AT_DISPATCH_FLOATING_AND_COMPLEX_TYPES(x.scalar_type(), "fused_rnn_forward_cpu", [&] {
    dispatch_cell<cpu::ForwardLoop, scalar_t>(s.cell, plan, s, reverse, x, w_ih, bias, w_hh, b_hn, w_hr, variants, y,
                                              h, c, saved);
  });
}

}  // namespace fused_rnn
