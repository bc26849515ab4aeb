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
// The same Math for float with AVX-512, 16 units a call (wide_cell_units, cell_units.h): the same
// operations in the same order as KernelMath<float> (SLEEF's exp, the rational tanh), on zmm
// registers. Every member is AVX-512 code, called only from functions compiled for it.
#define FUSED_RNN_AVX512F_INLINE __attribute__((target("avx512f"))) inline

// torch's SLEEF, its AVX-512 build (weak: where it is missing, cells stay on AVX2).
extern "C" __attribute__((weak, target("avx512f"))) __m512 Sleef_expf16_u10(__m512);

struct WideVector {
  __m512 v;
  WideVector() = default;
  FUSED_RNN_AVX512F_INLINE WideVector(__m512 x) : v(x) {}
  FUSED_RNN_AVX512F_INLINE WideVector(float x) : v(_mm512_set1_ps(x)) {}
};
FUSED_RNN_AVX512F_INLINE WideVector operator+(WideVector a, WideVector b) { return _mm512_add_ps(a.v, b.v); }
FUSED_RNN_AVX512F_INLINE WideVector operator-(WideVector a, WideVector b) { return _mm512_sub_ps(a.v, b.v); }
FUSED_RNN_AVX512F_INLINE WideVector operator*(WideVector a, WideVector b) { return _mm512_mul_ps(a.v, b.v); }
FUSED_RNN_AVX512F_INLINE WideVector operator/(WideVector a, WideVector b) { return _mm512_div_ps(a.v, b.v); }

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ == 12  // PR 105593: see wide_float.h
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
struct WideMath {
  using V = WideVector;
  static constexpr int64_t kWidth = 16;

  FUSED_RNN_AVX512F_INLINE static V load(const float* p) { return _mm512_loadu_ps(p); }
  FUSED_RNN_AVX512F_INLINE static void store(float* p, V v) { _mm512_storeu_ps(p, v.v); }
  FUSED_RNN_AVX512F_INLINE static V sigmoid(V x) {
    return V(1.0f) / (V(1.0f) + Sleef_expf16_u10(_mm512_sub_ps(_mm512_setzero_ps(), x.v)));
  }
  // KernelMath<float>::rational_tanh; min and max take x second, so that NaN passes through.
  FUSED_RNN_AVX512F_INLINE static V tanh(V x) {
    const __m512 clamp = _mm512_set1_ps(7.90531110763549805f);
    const __m512 xc = _mm512_min_ps(clamp, _mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), clamp), x.v));
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
    const __m512 magnitude = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x.v), _mm512_set1_epi32(0x7fffffff)));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(magnitude, _mm512_set1_ps(0.0004f), _CMP_LT_OQ), ratio, x.v);
  }
  FUSED_RNN_AVX512F_INLINE static V relu(V x) {  // NaN passes through, as KernelMath's
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x.v, x.v, _CMP_UNORD_Q), _mm512_max_ps(x.v, _mm512_setzero_ps()), x.v);
  }
  FUSED_RNN_AVX512F_INLINE static V relu_grad(V h, V dh) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(h.v, _mm512_setzero_ps(), _CMP_LE_OQ), dh.v, _mm512_setzero_ps());
  }
  FUSED_RNN_AVX512F_INLINE static V cj(V x) { return x; }
};
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ == 12
#pragma GCC diagnostic pop
#endif
#undef FUSED_RNN_AVX512F_INLINE
#endif

}  // namespace fused_rnn
