// Per-tile maths of the compact-WY Householder apply, shared by the CPU and CUDA kernels.
//
// Q = H_1 ... H_k = I - V^T T V with V (k, n) holding one Householder vector per row and
// T^{-1} = S = diag(G)/2 + striu(G), G = V V^T (MOSE_NOTES.md section 2). Applying Q (or Q^T) to a
// column w of W is x = V w, p = A x with A = T (or T^T), w' = w - V^T p.
//
// Everything here is a plain __host__ __device__ template over the storage type of W (float, double,
// c10::Half, c10::BFloat16, __half, ...) and the accumulation type (float or double), with explicit
// int64 strides, so the C++ unit tests (tests/csrc) exercise exactly the code the kernels run.
#pragma once

#include <cstdint>

// Internal linkage: each translation unit (including each instruction-set build of the CPU kernels)
// keeps its own copy, so no copy compiled for one target can replace another at link time.
#if defined(__CUDACC__)
#define MOSE_HD static __host__ __device__ __forceinline__
#else
#define MOSE_HD static inline
#endif

namespace mose {
namespace tile {

// Column j of T = S^{-1} (S upper triangular, S_ii = G_ii / 2, S_il = G_il for i < l) by back
// substitution: T_jj = 1 / S_jj, T_ij = -(sum_{l=i+1..j} S_il T_lj) / S_ii for i < j, T_ij = 0 for i > j.
// G and T are row-major with leading dimensions ldg, ldt; only the upper triangle of G is read.
// Columns are independent, so a GPU computes one per thread.
template <typename acc_t>
MOSE_HD void factor_column(const acc_t* G, int64_t ldg, int64_t k, int64_t j, acc_t* T, int64_t ldt) {
  for (int64_t i = k - 1; i > j; --i) {
    T[i * ldt + j] = acc_t(0);
  }
  T[j * ldt + j] = acc_t(2) / G[j * ldg + j];
  for (int64_t i = j - 1; i >= 0; --i) {
    acc_t s = acc_t(0);
    for (int64_t l = i + 1; l <= j; ++l) {
      s += G[i * ldg + l] * T[l * ldt + j];
    }
    T[i * ldt + j] = -acc_t(2) * s / G[i * ldg + i];
  }
}

// The whole k x k factor T from the Gram matrix G.
template <typename acc_t>
MOSE_HD void factor_from_gram(const acc_t* G, int64_t ldg, int64_t k, acc_t* T, int64_t ldt) {
  for (int64_t j = 0; j < k; ++j) {
    factor_column(G, ldg, k, j, T, ldt);
  }
}

// Row j of p = A x for one column: A = T (p_j = sum_{l >= j} T_jl x_l) or, with transpose,
// A = T^T (p_j = sum_{l <= j} T_lj x_l). x and p have strides incx and incp.
template <typename acc_t>
MOSE_HD acc_t triangular_row(const acc_t* T, int64_t ldt, int64_t k, bool transpose, int64_t j,
                             const acc_t* x, int64_t incx) {
  acc_t s = acc_t(0);
  if (transpose) {
    for (int64_t l = 0; l <= j; ++l) {
      s += T[l * ldt + j] * x[l * incx];
    }
  } else {
    for (int64_t l = j; l < k; ++l) {
      s += T[j * ldt + l] * x[l * incx];
    }
  }
  return s;
}

// p = A x for one column (all k rows); p must not alias x.
template <typename acc_t>
MOSE_HD void triangular_apply(const acc_t* T, int64_t ldt, int64_t k, bool transpose, const acc_t* x,
                              int64_t incx, acc_t* p, int64_t incp) {
  for (int64_t j = 0; j < k; ++j) {
    p[j * incp] = triangular_row(T, ldt, k, transpose, j, x, incx);
  }
}

// One updated element w' = w - sum_j v_j p_j, accumulated in acc_t (v: column i of V, stride incv).
template <typename acc_t, typename in_t>
MOSE_HD acc_t reflect_element(in_t w, const acc_t* v, int64_t incv, const acc_t* p, int64_t incp,
                              int64_t k) {
  acc_t s = static_cast<acc_t>(w);
  for (int64_t j = 0; j < k; ++j) {
    s -= v[j * incv] * p[j * incp];
  }
  return s;
}

// x_j += sum_{i in [i0, i1)} V_ji w_i for one column w of W (stride incw) and all k rows of V
// (row-major, leading dimension ldv): the projection of one tile of rows.
template <typename acc_t, typename in_t>
MOSE_HD void project_column(const acc_t* V, int64_t ldv, int64_t k, const in_t* w, int64_t incw,
                            int64_t i0, int64_t i1, acc_t* x, int64_t incx) {
  for (int64_t j = 0; j < k; ++j) {
    acc_t s = x[j * incx];
    for (int64_t i = i0; i < i1; ++i) {
      s += V[j * ldv + i] * static_cast<acc_t>(w[i * incw]);
    }
    x[j * incx] = s;
  }
}

}  // namespace tile
}  // namespace mose
