// The vector Math for cells.h on the CPU: the same equations over at::vec::Vectorized<T>, so one
// call of a cell's forward/backward handles kWidth hidden units (8 floats with AVX2). exp is SLEEF's,
// within 1 ulp, as torch's own vectorised CPU kernels use; so is tanh for double. float tanh is a
// rational approximation (below).
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/complex.h>

#include <cstdint>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

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

#if defined(__x86_64__)
// The same Math for float with AVX-512, N vectors of 16 units a call (wide_cell_units,
// cell_units.h): the same operations in the same order as KernelMath<float> (SLEEF's exp, the
// rational tanh), on zmm registers, each vector on its own. Why N: one vector's gate math is a
// chain of dependent steps (exp, divide, the tanh's polynomial, divide) that leaves the core waiting
// on latencies; N independent vectors a call fill those waits. Every member is AVX-512 code,
// called only from functions compiled for it.
#define FUSED_RNN_AVX512F_INLINE __attribute__((target("avx512f"))) inline

// torch's SLEEF, its AVX-512 build (weak: where it is missing, cells stay on AVX2).
extern "C" __attribute__((weak, target("avx512f"))) __m512 Sleef_expf16_u10(__m512);

template <int N>
struct WideVectors {
  __m512 v[N];
  WideVectors() = default;
  FUSED_RNN_AVX512F_INLINE WideVectors(float x) {
    for (int i = 0; i < N; ++i) v[i] = _mm512_set1_ps(x);
  }
};
#define FUSED_RNN_WIDE_OPERATOR(op, intrinsic)                                                     \
  template <int N>                                                                                \
  FUSED_RNN_AVX512F_INLINE WideVectors<N> operator op(const WideVectors<N>& a, const WideVectors<N>& b) { \
    WideVectors<N> r;                                                                             \
    for (int i = 0; i < N; ++i) r.v[i] = intrinsic(a.v[i], b.v[i]);                               \
    return r;                                                                                     \
  }
FUSED_RNN_WIDE_OPERATOR(+, _mm512_add_ps)
FUSED_RNN_WIDE_OPERATOR(-, _mm512_sub_ps)
FUSED_RNN_WIDE_OPERATOR(*, _mm512_mul_ps)
FUSED_RNN_WIDE_OPERATOR(/, _mm512_div_ps)
#undef FUSED_RNN_WIDE_OPERATOR

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ == 12  // PR 105593: see wide_float.h
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
// One vector's functions, for WideMathOf.
struct WideFunctions {
  // KernelMath<float>::rational_tanh; min and max take x second, so that NaN passes through.
  FUSED_RNN_AVX512F_INLINE static __m512 tanh(__m512 x) {
    const __m512 clamp = _mm512_set1_ps(7.90531110763549805f);
    const __m512 xc = _mm512_min_ps(clamp, _mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), clamp), x));
    const __m512 x2 = _mm512_mul_ps(xc, xc);
    __m512 p = _mm512_fmadd_ps(x2, _mm512_set1_ps(-2.76076847742355e-16f), _mm512_set1_ps(2.00018790482477e-13f));
    p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-8.60467152213735e-11f));
    p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(5.12229709037114e-08f));
    p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(1.48572235717979e-05f));
    p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(6.37261928875436e-04f));
    p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(4.89352455891786e-03f));
    __m512 q = _mm512_fmadd_ps(x2, _mm512_set1_ps(1.19825839466702e-06f), _mm512_set1_ps(1.18534705686654e-04f));
    q = _mm512_fmadd_ps(x2, q, _mm512_set1_ps(2.26843463243900e-03f));
    q = _mm512_fmadd_ps(x2, q, _mm512_set1_ps(4.89352518554385e-03f));
    const __m512 ratio = _mm512_div_ps(_mm512_mul_ps(xc, p), q);
    const __m512 magnitude = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7fffffff)));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(magnitude, _mm512_set1_ps(0.0004f), _CMP_LT_OQ), ratio, x);
  }
  FUSED_RNN_AVX512F_INLINE static __m512 relu(__m512 x) {  // NaN passes through, as KernelMath's
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_max_ps(x, _mm512_setzero_ps()), x);
  }
  FUSED_RNN_AVX512F_INLINE static __m512 relu_grad(__m512 h, __m512 dh) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(h, _mm512_setzero_ps(), _CMP_LE_OQ), dh, _mm512_setzero_ps());
  }
};

template <int N>
struct WideMathOf {
  using V = WideVectors<N>;
  static constexpr int64_t kWidth = 16 * N;

  FUSED_RNN_AVX512F_INLINE static V load(const float* p) {
    V r;
    for (int i = 0; i < N; ++i) r.v[i] = _mm512_loadu_ps(p + 16 * i);
    return r;
  }
  FUSED_RNN_AVX512F_INLINE static void store(float* p, const V& x) {
    for (int i = 0; i < N; ++i) _mm512_storeu_ps(p + 16 * i, x.v[i]);
  }
  // 1 / (1 + exp(0 - x)), KernelMath's operations, the N exps first.
  FUSED_RNN_AVX512F_INLINE static V sigmoid(const V& x) {
    V e;
    for (int i = 0; i < N; ++i) e.v[i] = Sleef_expf16_u10(_mm512_sub_ps(_mm512_setzero_ps(), x.v[i]));
    return V(1.0f) / (V(1.0f) + e);
  }
  FUSED_RNN_AVX512F_INLINE static V tanh(const V& x) { return each<&WideFunctions::tanh>(x); }
  FUSED_RNN_AVX512F_INLINE static V relu(const V& x) { return each<&WideFunctions::relu>(x); }
  FUSED_RNN_AVX512F_INLINE static V relu_grad(const V& h, const V& dh) {
    V r;
    for (int i = 0; i < N; ++i) r.v[i] = WideFunctions::relu_grad(h.v[i], dh.v[i]);
    return r;
  }
  FUSED_RNN_AVX512F_INLINE static V cj(const V& x) { return x; }

 private:
  template <__m512 (*f)(__m512)>
  FUSED_RNN_AVX512F_INLINE static V each(const V& x) {
    V r;
    for (int i = 0; i < N; ++i) r.v[i] = f(x.v[i]);
    return r;
  }
};
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ == 12
#pragma GCC diagnostic pop
#endif
#undef FUSED_RNN_AVX512F_INLINE
#endif

}  // namespace fused_rnn
