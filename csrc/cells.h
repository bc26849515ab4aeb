// The one home of the recurrent cells' equations, forward and backward.
//
// Everything here works on hidden unit j of one batch row (units j .. j+Width-1 with a vector
// Math), so the CPU loop and a CUDA thread call the very same code. `T` is the type the math runs in:
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

// How the cell code reads, writes and activates values. ScalarMath does one unit, on the host and
// on the device; the CPU loop also passes a vector Math that does Width units at once
// (csrc/cpu/vec_math.h). The equations below are written once, against this interface.
template <typename T>
struct ScalarMath {
  using V = T;
  C10_HOST_DEVICE static V load(const T* p) { return *p; }
  C10_HOST_DEVICE static void store(T* p, V v) { *p = v; }
  C10_HOST_DEVICE static V sigmoid(V x) { return detail::sigmoid(x); }
  C10_HOST_DEVICE static V tanh(V x) { return detail::tanh_(x); }
  // NaN passes through, as torch.relu; the gradient is torch's threshold_backward (h <= 0 -> 0).
  C10_HOST_DEVICE static V relu(V x) { return x < V(0) ? V(0) : x; }
  C10_HOST_DEVICE static V relu_grad(V h, V dh) { return h <= V(0) ? V(0) : dh; }
  C10_HOST_DEVICE static V cj(V x) { return detail::cj(x); }
};

// The recurrent projections of one unit, gate by gate, held by the caller: a CUDA thread keeps its
// gate sums in registers instead of a round trip through memory.
template <typename T, int G>
struct UnitGateSums {
  T value[G];
};

// Gate g of unit j of the recurrent projection: from a [G*H] row, or from the unit's own sums.
template <typename M, typename T>
C10_HOST_DEVICE inline typename M::V gate_sum(const T* gh, int g, int64_t H, int64_t j) {
  return M::load(gh + g * H + j);
}
template <typename M, typename T, int G>
C10_HOST_DEVICE inline typename M::V gate_sum(const UnitGateSums<T, G>& gh, int g, int64_t, int64_t) {
  static_assert(sizeof(typename M::V) == sizeof(T), "a unit's own sums are scalars");
  return gh.value[g];
}

// Zoneout of one row of one step (fused_rnn's zoneout=z): the share m of the previous state each
// unit keeps, c_t = m c_{t-1} + (1 - m) ĉ_t and h_t = m h_{t-1} + (1 - m) ĥ_t (mix), where ĉ_t and ĥ_t
// are the cell's own. m is a 0/1 mask per unit, fresh at every step (training), or z for every unit
// (the expectation, eval). `on` false: the plain cell. With a projection (LSTM's proj_size) ĥ_t is
// the projected output: the cell mixes c_t only (mixes_h false) and the projection's epilogue h_t.
template <typename T>
struct Zoneout {
  const T* c = nullptr;  // LSTM's cell-state mask [H], or null: `keep` for every unit
  const T* h = nullptr;  // the output's mask [P], or null: `keep`
  T keep = T(0);
  bool on = false;
  bool mixes_h = true;  // whether the cell mixes h_t (not where a projection follows it)

  template <typename M>
  C10_HOST_DEVICE typename M::V of(const T* mask, int64_t j) const {
    return mask ? M::load(mask + j) : typename M::V(keep);
  }
  template <typename V>
  C10_HOST_DEVICE static V mix(const V& keep, const V& previous, const V& own) {
    return keep * previous + (V(1) - keep) * own;
  }

  // Of packed row `row` of N, H units and P outputs: z > 0 turns it on; masks (1 where a unit keeps
  // its state) of every row, LSTM's c_t's [N, H] then h_t's [N, P], one block after the other (GRU and
  // RNN: h_t's only), or null for the expectation z.
  C10_HOST_DEVICE static Zoneout of_row(double z, const T* masks, bool lstm, int64_t N, int64_t H, int64_t P,
                                        int64_t row) {
    Zoneout zone;
    zone.on = z > 0;
    zone.keep = T(z);
    zone.mixes_h = P == H;
    if (masks && zone.on) {
      zone.c = lstm ? masks + row * H : nullptr;
      zone.h = masks + (lstm ? N * H : 0) + row * P;
    }
    return zone;
  }
};

// Recurrent dropout of one row (fused_rnn's recurrent_dropout=p): the next step's recurrent product
// takes h'_t = h_t ⊙ m, where m is the mask of the row's sequence (0 or 1/(1 - p) per unit, drawn once
// per call: the same at every step). Only the product sees it; the cell's own h_{t-1} (GRU's mix,
// zoneout) is h_t. Its backward is the transpose: the product's part of dL/dh_{t-1} is m ⊙ (dG_t·W_hh),
// which the loops scale by `mask` where they add it to the direct part. Off (`into` null): nothing.
template <typename T>
struct RecurrentDropout {
  const T* mask = nullptr;  // [P], of the row's sequence
  T* into = nullptr;        // where h'_t goes, [P]

  template <typename M>
  C10_HOST_DEVICE void write(const typename M::V& h, int64_t j) const {
    if (into) M::store(into + j, h * M::load(mask + j));
  }
};

// Layer norm of a row (fused_rnn's layer_norm=True): LN(v) = (v - mean) / sqrt(var + 1e-5) over the
// row's n entries, biased variance. The statistics take a pass over the whole row in a fixed order
// (the same bits for any thread count), so a row is normalized by one caller: the loops give each
// thread whole rows. The input and recurrent projections are normalized this way before the cell
// sees them (gx, gh hold LN(·) ⊙ weight, plus the biases); LSTM's ĉ_t inside the cell (CellNorm).
template <typename T>
struct RowNorm {
  T mean = T(0), rstd = T(0);

  static constexpr double kEpsilon = 1e-5;
  C10_HOST_DEVICE static RowNorm of(const T* v, int64_t n) {
    RowNorm r;
    r.mean = mean_of(n, [&](int64_t j) { return v[j]; });
    const T variance = mean_of(n, [&](int64_t j) { return (v[j] - r.mean) * (v[j] - r.mean); });
    r.rstd = T(1) / std::sqrt(variance + T(kEpsilon));
    return r;
  }
  C10_HOST_DEVICE T normalized(T v) const { return (v - mean) * rstd; }

  // The gradient of the row's normalized values x̂ = LN(v) from g = dL/dx̂ (x̂ given): dL/dv =
  // rstd (g - mean(g) - x̂ mean(g x̂)). `into` may be g.
  C10_HOST_DEVICE void backward(const T* g, const T* x_hat, int64_t n, T* into) const {
    const T mean_g = mean_of(n, [&](int64_t j) { return g[j]; });
    const T mean_gx = mean_of(n, [&](int64_t j) { return g[j] * x_hat[j]; });
    for (int64_t j = 0; j < n; ++j) into[j] = rstd * (g[j] - mean_g - x_hat[j] * mean_gx);
  }

  // The mean of term(j) over [0, n): kLanes sums of every kLanes-th term, added in order at the end. A
  // fixed order, hence fixed bits; and kLanes independent chains of additions instead of one, which
  // the compiler keeps in a vector register (a row of 1024 took 4 µs as one chain on the Zen 5).
  static constexpr int kLanes = 16;
  template <typename Term>
  C10_HOST_DEVICE static T mean_of(int64_t n, const Term& term) {
    T lanes[kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) lanes[l] += term(j + l);
    }
    for (int l = 0; j < n; ++j, ++l) lanes[l] += term(j);
    T sum = T(0);
    for (int l = 0; l < kLanes; ++l) sum += lanes[l];
    return n > 0 ? sum / T(n) : T(0);
  }
};

// LSTM's layer norm of ĉ_t: ĥ_t = o ⊙ tanh(LN(ĉ_t) ⊙ weight + bias). LN needs the whole row's ĉ_t, so
// the cell runs in two passes over the row's units: the gates (ĉ_t and o kept in `own`), the caller's
// RowNorm of ĉ_t, then ĥ_t (output_pass). The backward likewise: its first pass leaves dL/dy
// (y = LN(ĉ_t) ⊙ weight + bias) in `dy`, the caller sums the row, the second finishes the cell.
template <typename T>
struct CellNorm {
  const T* weight = nullptr;  // [H]; null: off
  const T* bias = nullptr;    // [H]
  T* own = nullptr;           // the row's ĉ_t [H], then o [H]
  T* dy = nullptr;            // backward: dL/dy of the row [H]
  RowNorm<T> norm = {};       // of ĉ_t's row (the output pass, and the backward)
  T mean_g = T(0), mean_gx = T(0);  // backward's second pass: the row's means of g = dy ⊙ weight, g x̂
  bool output_pass = false;
};

// Pointers into one batch row of one timestep. Rows are [G*H] for gate tensors, [H] otherwise.
template <typename T, typename GateSums = const T*>
struct StepForward {
  const T* gx;      // input projection with biases, [G*H]
  GateSums gh;      // recurrent projection: a [G*H] row, or the unit's UnitGateSums
  const T* b_hn;    // GRU: the n gate's hidden bias, [H]; may be null
  const T* h_prev;  // h_{t-1}, [H] (GRU's cell, and zoneout)
  T* c;             // LSTM: cell state, c_{t-1} in, c_t out (in place)
  T* h;             // the cell's output h_t (LSTM: before the projection), [H]
  T* saved;         // what backward needs, [kSaved*H]; null when no gradient is wanted
  const T* peephole = nullptr;  // LSTM: peephole weights (p_i, p_f, p_o) [3*H], or null
  Zoneout<T> zoneout = {};
  RecurrentDropout<T> dropout = {};  // h'_t for the next product; off where a projection follows the cell
  CellNorm<T> norm = {};             // LSTM with layer norm: its two passes
};

template <typename T>
struct StepBackward {
  const T* dy;      // gradient of the layer's output at this step (no projection: added to dh_carry)
  T* dh_carry;      // in: gradient flowing into h_t; GRU and zoneout out: the direct part of dL/dh_{t-1}
  T* dc_carry;      // LSTM: dL/dc_t in, dL/dc_{t-1} out (in place)
  const T* saved;   // as written by forward, [kSaved*H]
  const T* h_prev;  // GRU: h_{t-1}, [H]
  const T* c_prev;  // LSTM: c_{t-1}, [H] (the previous step's saved c_t, or c_0)
  T* dgx;           // gradient of the pre-activations, input side, [G*H]
  T* dgh;           // recurrent side, [G*H]; differs from dgx only for GRU's n gate
  const T* peephole = nullptr;  // LSTM: peephole weights [3*H], or null
  T* d_peephole = nullptr;      // and their gradient [3*H], added to (one caller per unit: no races),
                                // or null where the caller sums it from dgx afterwards (CUDA)
  Zoneout<T> zoneout = {};      // as forward's; dh_carry out then holds m·dL/dh_t, the direct part
  CellNorm<T> norm = {};        // LSTM with layer norm: its two passes
};

// LSTM: i, f, o = σ(·), g = tanh(·); c_t = f c_{t-1} + i g; h_t = o tanh(c_t).
// With peephole weights p (Gers and Schmidhuber's connections, as fused_rnn.LSTM(peephole=True)):
// i = σ(· + p_i c_{t-1}), f = σ(· + p_f c_{t-1}), o = σ(· + p_o c_t). Without, the operations are
// exactly those of the plain cell (the same bits as before the peephole existed). With zoneout the
// cell's own ĉ_t and ĥ_t = o tanh(ĉ_t) are mixed with the previous state (Zoneout); o sees ĉ_t.
template <typename T>
struct LSTMCell {
  using scalar_t = T;
  static constexpr int kGates = 4;
  // i, f, g, o, c_t. c_{t-1} is the step before's c_t (or c_0), so it is not saved again; tanh(c_t)
  // is computed again in backward, cheaper than writing and reading one more value per unit. With
  // zoneout c_t is the mixed state and ĉ_t one more slot; layer norm needs ĉ_t there too.
  static constexpr int kSaved = 5;
  static constexpr int kCellStateSlot = 4;
  static constexpr int kOwnStateSlot = 5;  // ĉ_t, under zoneout or layer norm
  static constexpr bool kHasCellState = true;
  static constexpr bool kSeparateRecurrentGrad = false;

  template <typename M = ScalarMath<T>, typename GateSums>
  C10_HOST_DEVICE static void forward(const StepForward<T, GateSums>& s, int64_t H, int64_t j) {
    using V = typename M::V;
    if (s.norm.output_pass) {  // layer norm's second pass: ĥ_t = o tanh(LN(ĉ_t) ⊙ weight + bias)
      const V c = M::load(s.norm.own + j), o = M::load(s.norm.own + H + j);
      const V y = (c - V(s.norm.norm.mean)) * V(s.norm.norm.rstd) * M::load(s.norm.weight + j) +
                  M::load(s.norm.bias + j);
      output<M>(s, o * M::tanh(y), j);
      return;
    }
    const V c_prev = M::load(s.c + j);
    V i_in = M::load(s.gx + j) + gate_sum<M>(s.gh, 0, H, j);
    V f_in = M::load(s.gx + H + j) + gate_sum<M>(s.gh, 1, H, j);
    if (s.peephole) {
      i_in = i_in + M::load(s.peephole + j) * c_prev;
      f_in = f_in + M::load(s.peephole + H + j) * c_prev;
    }
    const V i = M::sigmoid(i_in);
    const V f = M::sigmoid(f_in);
    const V g = M::tanh(M::load(s.gx + 2 * H + j) + gate_sum<M>(s.gh, 2, H, j));
    const V c = f * c_prev + i * g;
    V o_in = M::load(s.gx + 3 * H + j) + gate_sum<M>(s.gh, 3, H, j);
    if (s.peephole) o_in = o_in + M::load(s.peephole + 2 * H + j) * c;
    const V o = M::sigmoid(o_in);
    const V c_t = s.zoneout.on ? Zoneout<T>::mix(s.zoneout.template of<M>(s.zoneout.c, j), c_prev, c) : c;
    M::store(s.c + j, c_t);
    if (s.saved) {
      M::store(s.saved + j, i);
      M::store(s.saved + H + j, f);
      M::store(s.saved + 2 * H + j, g);
      M::store(s.saved + 3 * H + j, o);
      M::store(s.saved + kCellStateSlot * H + j, c_t);
      if (s.zoneout.on || s.norm.weight) M::store(s.saved + kOwnStateSlot * H + j, c);
    }
    if (s.norm.weight) {  // ĥ_t waits for the statistics of the row's ĉ_t: the second pass
      M::store(s.norm.own + j, c);
      M::store(s.norm.own + H + j, o);
      return;
    }
    output<M>(s, o * M::tanh(c), j);
  }

  // dh_carry[j] is the full gradient at h_t (the caller has added dy and applied the projection).
  // With layer norm, two passes (CellNorm): the first leaves dL/dy in norm.dy and o's gradient in
  // dgx, the second (norm.output_pass) the rest.
  template <typename M = ScalarMath<T>>
  C10_HOST_DEVICE static void backward(const StepBackward<T>& s, int64_t H, int64_t j) {
    using V = typename M::V;
    const V i = M::load(s.saved + j), f = M::load(s.saved + H + j);
    const V g = M::load(s.saved + 2 * H + j), o = M::load(s.saved + 3 * H + j);
    const bool own_slot = s.zoneout.on || s.norm.weight;
    const V c_own = M::load(s.saved + (own_slot ? kOwnStateSlot : kCellStateSlot) * H + j);  // ĉ_t
    const V c_prev = M::load(s.c_prev + j);
    // m of c_t passes straight to c_{t-1}; 1 - m to ĉ_t
    const V keep_c = s.zoneout.on ? s.zoneout.template of<M>(s.zoneout.c, j) : V(0);
    if (s.norm.output_pass) {  // layer norm's second pass: LN's gradient from the row's means
      const V x_hat = (c_own - V(s.norm.norm.mean)) * V(s.norm.norm.rstd);
      const V grad = M::load(s.norm.dy + j) * M::load(s.norm.weight + j);
      const V dc_own = V(s.norm.norm.rstd) * (grad - V(s.norm.mean_g) - x_hat * V(s.norm.mean_gx));
      const V dc_in = M::load(s.dc_carry + j);
      gates_backward<M>(s, H, j, i, f, g, c_own, c_prev, keep_c,
                        (s.zoneout.on ? dc_in * (V(1) - keep_c) : dc_in) + dc_own, M::load(s.dgx + 3 * H + j));
      return;
    }
    V dh = M::load(s.dh_carry + j) + (s.dy ? M::load(s.dy + j) : V(0));
    if (s.zoneout.on && s.zoneout.mixes_h) {  // m of h_t passes straight to h_{t-1}; 1 - m to the cell
      const V keep_h = s.zoneout.template of<M>(s.zoneout.h, j);  // (with a projection, its backward split it)
      M::store(s.dh_carry + j, dh * keep_h);
      dh = dh * (V(1) - keep_h);
    }
    if (s.norm.weight) {  // layer norm's first pass: h_t = o tanh(y), y = LN(ĉ_t) ⊙ weight + bias
      const V y = (c_own - V(s.norm.norm.mean)) * V(s.norm.norm.rstd) * M::load(s.norm.weight + j) +
                  M::load(s.norm.bias + j);
      const V ty = M::tanh(y);
      M::store(s.norm.dy + j, dh * M::cj(o * (V(1) - ty * ty)));
      M::store(s.dgx + 3 * H + j, dh * M::cj(ty) * M::cj(o * (V(1) - o)));
      return;
    }
    const V tc = M::tanh(c_own);
    V dc_in = M::load(s.dc_carry + j);
    if (s.zoneout.on) dc_in = dc_in * (V(1) - keep_c);
    const V dc = dc_in + dh * M::cj(o * (V(1) - tc * tc));
    const V d_o = dh * M::cj(tc);
    gates_backward<M>(s, H, j, i, f, g, c_own, c_prev, keep_c, dc, d_o * M::cj(o * (V(1) - o)));
  }

 private:
  // h_t from ĥ_t (zoneout), stored with its h'_t (recurrent dropout).
  template <typename M, typename GateSums>
  C10_HOST_DEVICE static void output(const StepForward<T, GateSums>& s, typename M::V h_t, int64_t j) {
    if (s.zoneout.on && s.zoneout.mixes_h) {
      h_t = Zoneout<T>::mix(s.zoneout.template of<M>(s.zoneout.h, j), M::load(s.h_prev + j), h_t);
    }
    M::store(s.h + j, h_t);
    s.dropout.template write<M>(h_t, j);
  }

  // The gates' gradients from dL/dĉ_t (dc: through tanh or LN, and from c_t) and o's pre-activation
  // gradient do_in; dL/dc_{t-1} into dc_carry, the peepholes' gradients.
  template <typename M>
  C10_HOST_DEVICE static void gates_backward(const StepBackward<T>& s, int64_t H, int64_t j, typename M::V i,
                                             typename M::V f, typename M::V g, typename M::V c_own,
                                             typename M::V c_prev, typename M::V keep_c, typename M::V dc,
                                             typename M::V do_in) {
    using V = typename M::V;
    if (s.peephole) dc = dc + do_in * M::cj(M::load(s.peephole + 2 * H + j));  // o saw ĉ_t
    const V d_i = dc * M::cj(g), d_f = dc * M::cj(c_prev), d_g = dc * M::cj(i);
    const V di_in = d_i * M::cj(i * (V(1) - i)), df_in = d_f * M::cj(f * (V(1) - f));
    // the direct part of c_{t-1}'s gradient under zoneout: m · dL/dc_t
    const V dc_kept = s.zoneout.on ? keep_c * M::load(s.dc_carry + j) : V(0);
    if (s.peephole) {  // i and f saw c_{t-1}; the weights' gradients summed over rows and steps
      V dc_prev = dc * M::cj(f) + di_in * M::cj(M::load(s.peephole + j)) + df_in * M::cj(M::load(s.peephole + H + j));
      if (s.zoneout.on) dc_prev = dc_prev + dc_kept;
      M::store(s.dc_carry + j, dc_prev);
      if (s.d_peephole) {
        M::store(s.d_peephole + j, M::load(s.d_peephole + j) + di_in * M::cj(c_prev));
        M::store(s.d_peephole + H + j, M::load(s.d_peephole + H + j) + df_in * M::cj(c_prev));
        M::store(s.d_peephole + 2 * H + j, M::load(s.d_peephole + 2 * H + j) + do_in * M::cj(c_own));
      }
    } else if (s.zoneout.on) {
      M::store(s.dc_carry + j, dc * M::cj(f) + dc_kept);
    } else {
      M::store(s.dc_carry + j, dc * M::cj(f));
    }
    M::store(s.dgx + j, di_in);
    M::store(s.dgx + H + j, df_in);
    M::store(s.dgx + 2 * H + j, d_g * M::cj(V(1) - g * g));
    M::store(s.dgx + 3 * H + j, do_in);
  }
};

// GRU as torch.nn: r, z = σ(·); n = tanh(gx_n + r (gh_n + b_hn)); h_t = (1 - z) n + z h_{t-1}.
template <typename T>
struct GRUCell {
  using scalar_t = T;
  static constexpr int kGates = 3;
  static constexpr int kSaved = 4;  // r, z, n, gh_n + b_hn
  static constexpr bool kHasCellState = false;
  static constexpr bool kSeparateRecurrentGrad = true;

  template <typename M = ScalarMath<T>, typename GateSums>
  C10_HOST_DEVICE static void forward(const StepForward<T, GateSums>& s, int64_t H, int64_t j) {
    using V = typename M::V;
    const V r = M::sigmoid(M::load(s.gx + j) + gate_sum<M>(s.gh, 0, H, j));
    const V z = M::sigmoid(M::load(s.gx + H + j) + gate_sum<M>(s.gh, 1, H, j));
    const V hn = gate_sum<M>(s.gh, 2, H, j) + (s.b_hn ? M::load(s.b_hn + j) : V(0));
    const V n = M::tanh(M::load(s.gx + 2 * H + j) + r * hn);
    const V h_prev = M::load(s.h_prev + j);
    V h_t = (V(1) - z) * n + z * h_prev;
    if (s.zoneout.on) h_t = Zoneout<T>::mix(s.zoneout.template of<M>(s.zoneout.h, j), h_prev, h_t);
    M::store(s.h + j, h_t);
    s.dropout.template write<M>(h_t, j);
    if (s.saved) {
      M::store(s.saved + j, r);
      M::store(s.saved + H + j, z);
      M::store(s.saved + 2 * H + j, n);
      M::store(s.saved + 3 * H + j, hn);
    }
  }

  template <typename M = ScalarMath<T>>
  C10_HOST_DEVICE static void backward(const StepBackward<T>& s, int64_t H, int64_t j) {
    using V = typename M::V;
    const V r = M::load(s.saved + j), z = M::load(s.saved + H + j);
    const V n = M::load(s.saved + 2 * H + j), hn = M::load(s.saved + 3 * H + j);
    V dh = M::load(s.dh_carry + j) + (s.dy ? M::load(s.dy + j) : V(0));
    V dh_kept = V(0);
    if (s.zoneout.on) {  // m of h_t passes straight to h_{t-1}
      const V keep = s.zoneout.template of<M>(s.zoneout.h, j);
      dh_kept = dh * keep;
      dh = dh * (V(1) - keep);
    }
    const V dn = dh * M::cj(V(1) - z) * M::cj(V(1) - n * n);
    const V dz = dh * M::cj(M::load(s.h_prev + j) - n) * M::cj(z * (V(1) - z));
    const V dr = dn * M::cj(hn) * M::cj(r * (V(1) - r));
    M::store(s.dh_carry + j, s.zoneout.on ? dh * M::cj(z) + dh_kept : dh * M::cj(z));
    M::store(s.dgx + j, dr);
    M::store(s.dgx + H + j, dz);
    M::store(s.dgx + 2 * H + j, dn);
    M::store(s.dgh + j, dr);
    M::store(s.dgh + H + j, dz);
    M::store(s.dgh + 2 * H + j, dn * M::cj(r));
  }
};

// Elman RNN: h_t = tanh(·) or relu(·) (with zoneout, that is ĥ_t, which `saved` keeps).
template <typename T, bool kRelu>
struct ElmanCell {
  using scalar_t = T;
  static constexpr int kGates = 1;
  static constexpr int kSaved = 1;  // h_t (ĥ_t)
  static constexpr bool kHasCellState = false;
  static constexpr bool kSeparateRecurrentGrad = false;

  template <typename M = ScalarMath<T>, typename GateSums>
  C10_HOST_DEVICE static void forward(const StepForward<T, GateSums>& s, int64_t H, int64_t j) {
    using V = typename M::V;
    const V pre = M::load(s.gx + j) + gate_sum<M>(s.gh, 0, H, j);
    V h;
    if constexpr (kRelu) {
      h = M::relu(pre);
    } else {
      h = M::tanh(pre);
    }
    if (s.saved) M::store(s.saved + j, h);
    if (s.zoneout.on) h = Zoneout<T>::mix(s.zoneout.template of<M>(s.zoneout.h, j), M::load(s.h_prev + j), h);
    M::store(s.h + j, h);
    s.dropout.template write<M>(h, j);
  }

  template <typename M = ScalarMath<T>>
  C10_HOST_DEVICE static void backward(const StepBackward<T>& s, int64_t /*H*/, int64_t j) {
    using V = typename M::V;
    const V h = M::load(s.saved + j);
    V dh = M::load(s.dh_carry + j) + (s.dy ? M::load(s.dy + j) : V(0));
    if (s.zoneout.on) {  // m of h_t passes straight to h_{t-1}
      const V keep = s.zoneout.template of<M>(s.zoneout.h, j);
      M::store(s.dh_carry + j, dh * keep);
      dh = dh * (V(1) - keep);
    }
    if constexpr (kRelu) {
      M::store(s.dgx + j, M::relu_grad(h, dh));
    } else {
      M::store(s.dgx + j, dh * M::cj(V(1) - h * h));
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
