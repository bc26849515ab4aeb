// Row-major matrix products on torch's BLAS, for the products the tiles do not take (double,
// complex, the AVX2 build's x·W_ihᵀ and dW, the LSTM's projection; kernel_plan.h says which).
//
// Why BLAS's own symbols rather than ATen: at::native::cpublas::gemm, ATen's BLAS wrapper, is not
// exported from libtorch_cpu (`nm -D` lists only its dispatch stubs), and at::mm_out goes through
// the dispatcher, may throw, and may pick oneDNN: these calls run inside the team's parallel region
// (team.h), where nothing may throw, a few times a step. So: the Fortran sgemm_/dgemm_ that torch's
// CPU build exports (MKL or OpenBLAS), declared weak, with at::mm_out where they are missing (a
// build without BLAS) and for complex types (BLAS has no conjugate without transpose).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <climits>
#include <type_traits>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

// MKL's per-thread limit on its own threads (the C entry, by value; the lower-case names are the
// Fortran one, by pointer), when torch's BLAS is MKL (weak: null otherwise).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace fused_rnn {
namespace cpu {

// A row-major matrix operand: element (r, c) at data[r * ld + c], or at data[c * ld + r] when
// transposed; conj for the complex fallback (real types ignore it).
template <typename T>
struct MatrixRef {
  const T* data;
  int64_t ld;
  bool transposed = false;
  bool conj = false;
};

// Row-major C[m, n] (+)= op(A)[m, k] · op(B)[k, n], with ldc the row stride of C. BLAS is
// column-major, so it computes Cᵀ = op(B)ᵀ · op(A)ᵀ.
template <typename T>
void gemm_rows(int64_t m, int64_t n, int64_t k, MatrixRef<T> a, MatrixRef<T> b, bool accumulate, T* c,
               int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // an empty sum (input_size 0, or no rows); BLAS would refuse the zero leading dimensions
    if (!accumulate) {
      for (int64_t r = 0; r < m; ++r) std::fill(c + r * ldc, c + r * ldc + n, T(0));
    }
    return;
  }
  const bool fits = std::max({m, n, k, a.ld, b.ld, ldc}) <= INT_MAX;
  const char trans_b = b.transposed ? 'T' : 'N', trans_a = a.transposed ? 'T' : 'N';
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int LDA = static_cast<int>(b.ld), LDB = static_cast<int>(a.ld), LDC = static_cast<int>(ldc);
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ && fits) {
      const float one = 1, beta = accumulate ? 1 : 0;
      sgemm_(&trans_b, &trans_a, &M, &N, &K, &one, b.data, &LDA, a.data, &LDB, &beta, c, &LDC);
      return;
    }
  } else if constexpr (std::is_same_v<T, double>) {
    if (dgemm_ && fits) {
      const double one = 1, beta = accumulate ? 1 : 0;
      dgemm_(&trans_b, &trans_a, &M, &N, &K, &one, b.data, &LDA, a.data, &LDB, &beta, c, &LDC);
      return;
    }
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const auto view = [&](MatrixRef<T> x, int64_t rows, int64_t cols) {
    at::Tensor t = x.transposed ? at::from_blob(const_cast<T*>(x.data), {cols, rows}, {x.ld, 1}, opts).t()
                            : at::from_blob(const_cast<T*>(x.data), {rows, cols}, {x.ld, 1}, opts);
    return x.conj ? t.conj() : t;
  };
  at::Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  if (accumulate) {
    C.addmm_(view(a, m, k), view(b, k, n));
  } else {
    at::mm_out(C, view(a, m, k), view(b, k, n));
  }
}


// f() with BLAS limited to one thread in this thread, whatever torch's setting: MKL picks another
// kernel (other bits, seen for dX on Intel) when it may use more threads, even nested in a
// parallel region where it runs on one. (ATen has no per-thread limit to call instead.)
template <typename F>
void with_one_blas_thread(const F& f) {
  const int before = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
  f();
  if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(before);
}

}  // namespace cpu
}  // namespace fused_rnn
