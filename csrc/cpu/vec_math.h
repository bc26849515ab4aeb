// The vector Math for cells.h on the CPU: the same equations over at::vec::Vectorized<T>, so one
// call of a cell's forward/backward handles kWidth hidden units (8 floats with AVX2). exp is SLEEF's,
// within 1 ulp, as torch's own vectorised CPU kernels use; so is tanh for double. float tanh is a
// rational approximation (below).
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/complex.h>

#include <cstdint>
#include <type_traits>

#include "../cells.h"

namespace fused_rnn {

// What the CPU loops use: the cells' Math over at::vec::Vectorized<T> (kWidth units per call),
// plus what the blocked matrix product needs (broadcast, fused multiply-add, partial loads and
// stores), for float and double; complex numbers go one unit at a time through ScalarMath.
template <typename T>
struct KernelMath {
  using V = at::vec::Vectorized<T>;
  static constexpr int64_t kWidth = V::size();

  static V load(const T* p) { return V::loadu(p); }
  static void store(T* p, const V& v) { v.store(p); }
  static V sigmoid(const V& x) { return V(T(1)) / (V(T(1)) + x.neg().exp()); }
  static V tanh(const V& x) {
    if constexpr (std::is_same_v<T, float>) {
      return rational_tanh(x);
    } else {
      return x.tanh();
    }
  }
  // The same results as ScalarMath: NaN passes through relu; h <= 0 stops the gradient.
  static V relu(const V& x) { return at::vec::maximum(x, V(T(0))); }
  static V relu_grad(const V& h, const V& dh) { return V::blendv(dh, V(T(0)), h <= V(T(0))); }
  static V cj(const V& x) { return x; }  // real types only

  // float tanh as a rational function of degree 13/6 on [-7.905, 7.905] (the approximation Eigen
  // and XLA use): within 3.4e-7 absolute (6 ulp) of tanh, where SLEEF's 1-ulp tanh costs three
  // times as much and was the largest part of the LSTM's gate math. NaN stays NaN.
  static V rational_tanh(const V& x) {
    const V clamp(7.90531110763549805f);
    const V xc = at::vec::minimum(at::vec::maximum(x, V(0) - clamp), clamp);
    const V x2 = xc * xc;
    V p = at::vec::fmadd(x2, V(-2.76076847742355e-16f), V(2.00018790482477e-13f));
    p = at::vec::fmadd(x2, p, V(-8.60467152213735e-11f));
    p = at::vec::fmadd(x2, p, V(5.12229709037114e-08f));
    p = at::vec::fmadd(x2, p, V(1.48572235717979e-05f));
    p = at::vec::fmadd(x2, p, V(6.37261928875436e-04f));
    p = at::vec::fmadd(x2, p, V(4.89352455891786e-03f));
    V q = at::vec::fmadd(x2, V(1.19825839466702e-06f), V(1.18534705686654e-04f));
    q = at::vec::fmadd(x2, q, V(2.26843463243900e-03f));
    q = at::vec::fmadd(x2, q, V(4.89352518554385e-03f));
    // Near 0, tanh(x) = x to float precision, and the ratio would lose the last bits.
    return V::blendv(xc * p / q, x, x.abs() < V(0.0004f));
  }

  static V broadcast(T x) { return V(x); }
  static V fmadd(const V& a, const V& b, const V& c) { return at::vec::fmadd(a, b, c); }
  static V load_n(const T* p, int64_t n) { return V::loadu(p, n); }
  static void store_n(T* p, const V& v, int64_t n) { v.store(p, static_cast<int>(n)); }
};

template <typename T>
struct KernelMath<c10::complex<T>> : ScalarMath<c10::complex<T>> {
  using C = c10::complex<T>;
  using V = C;
  static constexpr int64_t kWidth = 1;
  static V broadcast(C x) { return x; }
  static V fmadd(V a, V b, V c) { return a * b + c; }
  static V load_n(const C* p, int64_t) { return *p; }
  static void store_n(C* p, V v, int64_t) { *p = v; }
};

}  // namespace fused_rnn
