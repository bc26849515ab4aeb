// The one home of the recurrent cells' equations, forward and backward.
//
// Everything here works on one hidden unit j of one batch row, so the CPU loop (under
// at::parallel_for) and a CUDA thread call the very same code. `T` is the type the math runs in:
// float or double, or c10::complex of them; half types are loaded into float by the caller.
//
// Gate layouts follow torch.nn: LSTM (i, f, g, o), GRU (r, z, n), RNN a single gate.
// `gx` holds x·W_ihᵀ + b_ih with every bias that simply adds folded in (for GRU all but b_hn,
// which torch.nn scales by r); `gh` holds h_{t-1}·W_hhᵀ (for GRU's n gate plus b_hn).
//
// Complex numbers: torch's autograd passes conj(∂f/∂z)·grad for holomorphic f, hence the cj() on
// every local derivative below; for real types cj() is the identity.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/complex.h>

#include <cmath>
#include <cstdint>
#include <utility>

namespace fused_rnn {

// Matches the `cell` integer of the compiled ops and fused_rnn/functional.py.
enum class CellKind : int64_t { LSTM = 0, GRU = 1, RNN_TANH = 2, RNN_RELU = 3 };

namespace detail {

template <typename T>
C10_HOST_DEVICE inline T cj(T x) { return x; }
template <typename T>
C10_HOST_DEVICE inline c10::complex<T> cj(c10::complex<T> x) { return c10::complex<T>(x.real(), -x.imag()); }

template <typename T>
C10_HOST_DEVICE inline T sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }
template <typename T>
C10_HOST_DEVICE inline T tanh_(T x) { return std::tanh(x); }

template <typename T>
struct is_complex { static constexpr bool value = false; };
template <typename T>
struct is_complex<c10::complex<T>> { static constexpr bool value = true; };

}  // namespace detail

// Pointers into one batch row of one timestep. Rows are [G*H] for gate tensors, [H] otherwise.
template <typename T>
struct StepForward {
  const T* gx;      // input projection with biases, [G*H]
  const T* gh;      // recurrent projection, [G*H]
  const T* b_hn;    // GRU: the n gate's hidden bias, [H]; may be null
  const T* h_prev;  // GRU: h_{t-1}, [H]
  T* c;             // LSTM: cell state, c_{t-1} in, c_t out (in place)
  T* h;             // the cell's output h_t (LSTM: before the projection), [H]
  T* saved;         // what backward needs, [kSaved*H]; null when no gradient is wanted
};

template <typename T>
struct StepBackward {
  const T* dy;      // gradient of the layer's output at this step (no projection: added to dh_carry)
  T* dh_carry;      // in: gradient flowing into h_t; GRU out: the direct part of dL/dh_{t-1}
  T* dc_carry;      // LSTM: dL/dc_t in, dL/dc_{t-1} out (in place)
  const T* saved;   // as written by forward, [kSaved*H]
  const T* h_prev;  // GRU: h_{t-1}, [H]
  T* dgx;           // gradient of the pre-activations, input side, [G*H]
  T* dgh;           // recurrent side, [G*H]; differs from dgx only for GRU's n gate
};

// LSTM: i, f, o = σ(·), g = tanh(·); c_t = f c_{t-1} + i g; h_t = o tanh(c_t).
template <typename T>
struct LSTMCell {
  using scalar_t = T;
  static constexpr int kGates = 4;
  static constexpr int kSaved = 6;  // i, f, g, o, c_t, c_{t-1}
  static constexpr bool kSeparateRecurrentGrad = false;

  C10_HOST_DEVICE static void forward(const StepForward<T>& s, int64_t H, int64_t j) {
    using namespace detail;
    const T i = sigmoid(s.gx[j] + s.gh[j]);
    const T f = sigmoid(s.gx[H + j] + s.gh[H + j]);
    const T g = tanh_(s.gx[2 * H + j] + s.gh[2 * H + j]);
    const T o = sigmoid(s.gx[3 * H + j] + s.gh[3 * H + j]);
    const T c_prev = s.c[j];
    const T c = f * c_prev + i * g;
    s.c[j] = c;
    s.h[j] = o * tanh_(c);
    if (s.saved) {
      s.saved[j] = i;
      s.saved[H + j] = f;
      s.saved[2 * H + j] = g;
      s.saved[3 * H + j] = o;
      s.saved[4 * H + j] = c;
      s.saved[5 * H + j] = c_prev;
    }
  }

  // dh_carry[j] is the full gradient at h_t (the caller has added dy and applied the projection).
  C10_HOST_DEVICE static void backward(const StepBackward<T>& s, int64_t H, int64_t j) {
    using namespace detail;
    const T i = s.saved[j], f = s.saved[H + j], g = s.saved[2 * H + j], o = s.saved[3 * H + j];
    const T c = s.saved[4 * H + j], c_prev = s.saved[5 * H + j];
    const T dh = s.dh_carry[j] + (s.dy ? s.dy[j] : T(0));
    const T tc = tanh_(c);
    const T dc = s.dc_carry[j] + dh * cj(o * (T(1) - tc * tc));
    const T d_o = dh * cj(tc);
    const T d_i = dc * cj(g), d_f = dc * cj(c_prev), d_g = dc * cj(i);
    s.dc_carry[j] = dc * cj(f);
    s.dgx[j] = d_i * cj(i * (T(1) - i));
    s.dgx[H + j] = d_f * cj(f * (T(1) - f));
    s.dgx[2 * H + j] = d_g * cj(T(1) - g * g);
    s.dgx[3 * H + j] = d_o * cj(o * (T(1) - o));
  }
};

// GRU as torch.nn: r, z = σ(·); n = tanh(gx_n + r (gh_n + b_hn)); h_t = (1 - z) n + z h_{t-1}.
template <typename T>
struct GRUCell {
  using scalar_t = T;
  static constexpr int kGates = 3;
  static constexpr int kSaved = 4;  // r, z, n, gh_n + b_hn
  static constexpr bool kSeparateRecurrentGrad = true;

  C10_HOST_DEVICE static void forward(const StepForward<T>& s, int64_t H, int64_t j) {
    using namespace detail;
    const T r = sigmoid(s.gx[j] + s.gh[j]);
    const T z = sigmoid(s.gx[H + j] + s.gh[H + j]);
    const T hn = s.gh[2 * H + j] + (s.b_hn ? s.b_hn[j] : T(0));
    const T n = tanh_(s.gx[2 * H + j] + r * hn);
    s.h[j] = (T(1) - z) * n + z * s.h_prev[j];
    if (s.saved) {
      s.saved[j] = r;
      s.saved[H + j] = z;
      s.saved[2 * H + j] = n;
      s.saved[3 * H + j] = hn;
    }
  }

  C10_HOST_DEVICE static void backward(const StepBackward<T>& s, int64_t H, int64_t j) {
    using namespace detail;
    const T r = s.saved[j], z = s.saved[H + j], n = s.saved[2 * H + j], hn = s.saved[3 * H + j];
    const T dh = s.dh_carry[j] + (s.dy ? s.dy[j] : T(0));
    const T dn = dh * cj(T(1) - z) * cj(T(1) - n * n);
    const T dz = dh * cj(s.h_prev[j] - n) * cj(z * (T(1) - z));
    const T dr = dn * cj(hn) * cj(r * (T(1) - r));
    s.dh_carry[j] = dh * cj(z);
    s.dgx[j] = dr;
    s.dgx[H + j] = dz;
    s.dgx[2 * H + j] = dn;
    s.dgh[j] = dr;
    s.dgh[H + j] = dz;
    s.dgh[2 * H + j] = dn * cj(r);
  }
};

// Elman RNN: h_t = tanh(·) or relu(·).
template <typename T, bool kRelu>
struct ElmanCell {
  using scalar_t = T;
  static constexpr int kGates = 1;
  static constexpr int kSaved = 1;  // h_t
  static constexpr bool kSeparateRecurrentGrad = false;

  C10_HOST_DEVICE static T activate(T x) {
    if constexpr (kRelu) {
      return x > T(0) ? x : T(0);
    } else {
      return detail::tanh_(x);
    }
  }

  C10_HOST_DEVICE static void forward(const StepForward<T>& s, int64_t H, int64_t j) {
    const T h = activate(s.gx[j] + s.gh[j]);
    s.h[j] = h;
    if (s.saved) s.saved[j] = h;
  }

  C10_HOST_DEVICE static void backward(const StepBackward<T>& s, int64_t H, int64_t j) {
    const T h = s.saved[j];
    const T dh = s.dh_carry[j] + (s.dy ? s.dy[j] : T(0));
    if constexpr (kRelu) {
      s.dgx[j] = h > T(0) ? dh : T(0);
    } else {
      s.dgx[j] = dh * detail::cj(T(1) - h * h);
    }
  }
};

template <typename T>
using RNNTanhCell = ElmanCell<T, false>;
template <typename T>
using RNNReluCell = ElmanCell<T, true>;

// Runs Op<Cell>::run(args...) with the cell type named by `kind`. relu has no complex version in
// torch.nn, so for complex T it is never instantiated (callers reject it first).
template <template <typename> class Op, typename T, typename... Args>
inline void dispatch_cell(CellKind kind, Args&&... args) {
  switch (kind) {
    case CellKind::LSTM: Op<LSTMCell<T>>::run(std::forward<Args>(args)...); break;
    case CellKind::GRU: Op<GRUCell<T>>::run(std::forward<Args>(args)...); break;
    case CellKind::RNN_TANH: Op<RNNTanhCell<T>>::run(std::forward<Args>(args)...); break;
    case CellKind::RNN_RELU:
      if constexpr (!detail::is_complex<T>::value) Op<RNNReluCell<T>>::run(std::forward<Args>(args)...);
      break;
  }
}

}  // namespace fused_rnn
