// The step loops on the CPU: per step one recurrent GEMM into a preallocated buffer, then the cell
// math from cells.h over (row, unit) pairs under at::parallel_for.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "../layer.h"

namespace fused_rnn {
namespace {

using at::Tensor;

// Enough work per task that thread start-up does not dominate small steps.
constexpr int64_t kGrainElements = 16384;

// Calls body(row, j_begin, j_end) over rows [0, rows) x units [0, H), split across threads.
template <typename F>
void for_each_unit(int64_t rows, int64_t H, int64_t work_per_unit, const F& body) {
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, work_per_unit));
  at::parallel_for(0, rows * H, grain, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end;) {
      const int64_t row = idx / H, j0 = idx % H;
      const int64_t j1 = std::min(H, j0 + (end - idx));
      body(row, j0, j1);
      idx += j1 - j0;
    }
  });
}

template <typename Cell>
struct ForwardLoop {
  using T = typename Cell::scalar_t;

  static void run(const LayerShape& s, bool reverse, const Tensor& gx, const Tensor& w_hh, const Tensor& b_hn,
                  const Tensor& w_hr, Tensor& y, Tensor& h, Tensor& c, Tensor& saved) {
    const int64_t H = s.H, P = s.P, GH = s.gates * H;
    const int64_t K = saved.defined() ? s.saved_cols() : 0;
    Tensor gh = at::empty({s.B, GH}, gx.options());
    // The LSTM's o*tanh(c_t) before the projection: kept in `saved` when training, else here.
    Tensor proj_input = s.proj && !saved.defined() ? at::empty({s.B, H}, gx.options()) : Tensor();
    const Tensor w_hh_t = w_hh.t(), w_hr_t = s.proj ? w_hr.t() : Tensor();

    const T* gx_p = gx.data_ptr<T>();
    const T* gh_p = gh.data_ptr<T>();
    const T* b_hn_p = b_hn.defined() ? b_hn.data_ptr<T>() : nullptr;
    T* y_p = y.data_ptr<T>();
    T* h_p = h.data_ptr<T>();
    T* c_p = c.defined() ? c.data_ptr<T>() : nullptr;
    T* saved_p = saved.defined() ? saved.data_ptr<T>() : nullptr;

    for (int64_t step = 0; step < s.T; ++step) {
      const int64_t t = reverse ? s.T - 1 - step : step;
      const int64_t n = s.batch_sizes[t], off = s.offsets[t];
      if (n == 0) continue;
      Tensor gh_rows = gh.narrow(0, 0, n);
      at::mm_out(gh_rows, h.narrow(0, 0, n), w_hh_t);

      for_each_unit(n, H, GH, [&](int64_t b, int64_t j0, int64_t j1) {
        T* saved_row = saved_p ? saved_p + (off + b) * K : nullptr;
        if (saved_row) {  // h_{t-1}, before the state moves on
          const int64_t p1 = std::min(j1, P);
          if (p1 > j0) std::memcpy(saved_row + s.hprev_col() + j0, h_p + b * P + j0, (p1 - j0) * sizeof(T));
        }
        T* out_row = !s.proj ? y_p + (off + b) * P
                     : saved_row ? saved_row + s.proj_input_col()
                                 : proj_input.data_ptr<T>() + b * H;
        StepForward<T> io{gx_p + (off + b) * GH, gh_p + b * GH, b_hn_p, h_p + b * P,
                          c_p ? c_p + b * H : nullptr, out_row, saved_row};
        for (int64_t j = j0; j < j1; ++j) Cell::forward(io, H, j);
      });

      Tensor y_rows = y.narrow(0, off, n);
      if (s.proj) {
        const Tensor r = saved_p ? saved.narrow(0, off, n).narrow(1, s.proj_input_col(), H) : proj_input.narrow(0, 0, n);
        at::mm_out(y_rows, r, w_hr_t);
      }
      h.narrow(0, 0, n).copy_(y_rows);
    }
  }
};

template <typename Cell>
struct BackwardLoop {
  using T = typename Cell::scalar_t;

  static void run(const LayerShape& s, bool reverse, const Tensor& w_hh_conj, const Tensor& w_hr_conj,
                  const Tensor& saved, const Tensor& dy, Tensor& dh, Tensor& dc, Tensor& dgx, Tensor& dgh,
                  Tensor& dh_total) {
    const int64_t H = s.H, P = s.P, GH = s.gates * H, K = s.saved_cols();
    Tensor d_proj_input = s.proj ? at::empty({s.B, H}, dh.options()) : Tensor();

    const T* saved_p = saved.data_ptr<T>();
    const T* dy_p = dy.defined() ? dy.data_ptr<T>() : nullptr;
    T* dh_p = dh.data_ptr<T>();
    T* dc_p = dc.defined() ? dc.data_ptr<T>() : nullptr;
    T* dgx_p = dgx.data_ptr<T>();
    T* dgh_p = dgh.data_ptr<T>();

    for (int64_t step = 0; step < s.T; ++step) {
      const int64_t t = reverse ? step : s.T - 1 - step;  // forward's order, backwards
      const int64_t n = s.batch_sizes[t], off = s.offsets[t];
      if (n == 0) continue;
      Tensor dh_rows = dh.narrow(0, 0, n);

      // With a projection, the gradient at h_t is mapped back through W_hr first.
      const T* step_dy = dy_p ? dy_p + off * P : nullptr;
      T* cell_dh = dh_p;
      int64_t cell_dh_stride = P;
      if (s.proj) {
        Tensor total = dh_total.narrow(0, off, n);
        if (dy.defined()) {
          at::add_out(total, dh_rows, dy.narrow(0, off, n));
        } else {
          total.copy_(dh_rows);
        }
        Tensor d_proj_rows = d_proj_input.narrow(0, 0, n);
        at::mm_out(d_proj_rows, total, w_hr_conj);
        step_dy = nullptr;
        cell_dh = d_proj_input.data_ptr<T>();
        cell_dh_stride = H;
      }

      for_each_unit(n, H, GH, [&](int64_t b, int64_t j0, int64_t j1) {
        const T* saved_row = saved_p + (off + b) * K;
        StepBackward<T> io{step_dy ? step_dy + b * P : nullptr, cell_dh + b * cell_dh_stride,
                           dc_p ? dc_p + b * H : nullptr, saved_row, saved_row + s.hprev_col(),
                           dgx_p + (off + b) * GH, dgh_p + (off + b) * GH};
        for (int64_t j = j0; j < j1; ++j) Cell::backward(io, H, j);
      });

      // dL/dh_{t-1} += dG_h · W_hh (GRU already wrote its direct z-path into dh).
      const Tensor dg_rows = dgh.narrow(0, off, n);
      if (Cell::kSeparateRecurrentGrad) {
        at::addmm_out(dh_rows, dh_rows, dg_rows, w_hh_conj);
      } else {
        at::mm_out(dh_rows, dg_rows, w_hh_conj);
      }
    }
  }
};

}  // namespace

void forward_loop_cpu(const LayerShape& s, bool reverse, const Tensor& gx, const Tensor& w_hh, const Tensor& b_hn,
                      const Tensor& w_hr, Tensor& y, Tensor& h, Tensor& c, Tensor& saved) {
  AT_DISPATCH_FLOATING_AND_COMPLEX_TYPES(gx.scalar_type(), "fused_rnn_forward_cpu", [&] {
    dispatch_cell<ForwardLoop, scalar_t>(s.cell, s, reverse, gx, w_hh, b_hn, w_hr, y, h, c, saved);
  });
}

void backward_loop_cpu(const LayerShape& s, bool reverse, const Tensor& w_hh_conj, const Tensor& w_hr_conj,
                       const Tensor& saved, const Tensor& dy, Tensor& dh, Tensor& dc, Tensor& dgx, Tensor& dgh,
                       Tensor& dh_total) {
  AT_DISPATCH_FLOATING_AND_COMPLEX_TYPES(saved.scalar_type(), "fused_rnn_backward_cpu", [&] {
    dispatch_cell<BackwardLoop, scalar_t>(s.cell, s, reverse, w_hh_conj, w_hr_conj, saved, dy, dh, dc, dgx, dgh,
                                          dh_total);
  });
}

}  // namespace fused_rnn
