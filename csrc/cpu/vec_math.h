// The vector Math for cells.h on the CPU: the same equations over at::vec::Vectorized<T>, so one
// call of a cell's forward/backward handles kWidth hidden units (8 floats with AVX2). exp and tanh
// are SLEEF's, within 1 ulp, as torch's own vectorised CPU kernels use.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/complex.h>

#include <cstdint>

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
  static V tanh(const V& x) { return x.tanh(); }
  // The same results as ScalarMath: NaN passes through relu; h <= 0 stops the gradient.
  static V relu(const V& x) { return at::vec::maximum(x, V(T(0))); }
  static V relu_grad(const V& h, const V& dh) { return V::blendv(dh, V(T(0)), h <= V(T(0))); }
  static V cj(const V& x) { return x; }  // real types only

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
