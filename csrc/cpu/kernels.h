// CPU kernels of the Householder apply, compiled once per instruction set: the including file
// defines MOSE_CPU_ISA (a namespace name) and includes the dependencies below first, so that only
// this file's functions get that file's target attributes.
//
// Two strategies stream W by column ranges [c0, c1) that a thread owns (no reduction across threads):
// - row-major W (rows contiguous, or any strides): tiles of kRows rows x kCols columns are gathered
//   into an accumulation-type buffer, so every inner loop is a contiguous, vectorisable loop;
// - column-major W (columns contiguous, the right side of a row-major weight): groups of kGroup
//   columns, dot products with kLanes partial sums (vectorisable without reassociation).
#ifndef MOSE_CPU_ISA
#error "define MOSE_CPU_ISA before including kernels.h"
#endif

#include <algorithm>
#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../householder_tile.h"
#include "kernels_api.h"

namespace mose {
namespace cpu {
namespace MOSE_CPU_ISA {
namespace {

constexpr int64_t kRows = 8;    // rows per register tile (row-major strategy)
constexpr int64_t kCols = 256;  // columns per L1 tile (row-major strategy): 8 KiB of float
constexpr int64_t kGroup = 8;   // columns per group (column-major strategy)
constexpr int64_t kLanes = 8;   // partial sums per dot product and rows per update step

template <typename acc_t>
using Tile = acc_t[kRows][kCols];

// Rows [i0, i0 + r) x columns [c0, c0 + w) of W into `tile`, converted, zero-padded to kRows rows.
template <typename scalar_t, typename acc_t>
void gather(const scalar_t* W, int64_t sn, int64_t sm, int64_t i0, int64_t r, int64_t c0, int64_t w,
            Tile<acc_t>& tile) {
  for (int64_t rr = 0; rr < kRows; ++rr) {
    acc_t* t = tile[rr];
    if (rr >= r) {
      std::fill(t, t + w, acc_t(0));
      continue;
    }
    const scalar_t* src = W + (i0 + rr) * sn + c0 * sm;
    if (sm == 1) {
      for (int64_t c = 0; c < w; ++c) t[c] = static_cast<acc_t>(src[c]);
    } else {
      for (int64_t c = 0; c < w; ++c) t[c] = static_cast<acc_t>(src[c * sm]);
    }
  }
}

template <typename scalar_t, typename acc_t>
void scatter(const Tile<acc_t>& tile, int64_t r, int64_t c0, int64_t w, int64_t i0, scalar_t* out,
             int64_t sn, int64_t sm) {
  for (int64_t rr = 0; rr < r; ++rr) {
    const acc_t* t = tile[rr];
    scalar_t* dst = out + (i0 + rr) * sn + c0 * sm;
    if (sm == 1) {
      for (int64_t c = 0; c < w; ++c) dst[c] = static_cast<scalar_t>(t[c]);
    } else {
      for (int64_t c = 0; c < w; ++c) dst[c * sm] = static_cast<scalar_t>(t[c]);
    }
  }
}

// Column i0..i0+kRows of V's row j, zero-padded past the r valid rows.
template <typename acc_t>
void vector_slice(const acc_t* V, int64_t n, int64_t j, int64_t i0, int64_t r, acc_t (&v)[kRows]) {
  for (int64_t rr = 0; rr < kRows; ++rr) v[rr] = rr < r ? V[j * n + i0 + rr] : acc_t(0);
}

template <typename scalar_t, typename acc_t>
void project_rows(const Problem& p, int64_t c0, int64_t c1) {
  const auto* W = static_cast<const scalar_t*>(p.W);
  const auto* V = static_cast<const acc_t*>(p.V);
  auto* X = static_cast<acc_t*>(p.X);
  for (int64_t j = 0; j < p.k; ++j) std::fill(X + j * p.m + c0, X + j * p.m + c1, acc_t(0));
  alignas(64) Tile<acc_t> tile;
  for (int64_t i0 = 0; i0 < p.n; i0 += kRows) {
    const int64_t r = std::min(kRows, p.n - i0);
    for (int64_t ct = c0; ct < c1; ct += kCols) {
      const int64_t w = std::min(kCols, c1 - ct);
      gather(W, p.w_sn, p.w_sm, i0, r, ct, w, tile);
      for (int64_t j = 0; j < p.k; ++j) {
        acc_t v[kRows];
        vector_slice(V, p.n, j, i0, r, v);
        acc_t* x = X + j * p.m + ct;
        for (int64_t c = 0; c < w; ++c) {
          acc_t s = x[c];
          for (int64_t rr = 0; rr < kRows; ++rr) s += v[rr] * tile[rr][c];
          x[c] = s;
        }
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void update_rows(const Problem& p, int64_t c0, int64_t c1) {
  const auto* W = static_cast<const scalar_t*>(p.W);
  auto* out = static_cast<scalar_t*>(p.out);
  const auto* V = static_cast<const acc_t*>(p.V);
  const auto* P = static_cast<const acc_t*>(p.P);
  alignas(64) Tile<acc_t> tile;
  for (int64_t i0 = 0; i0 < p.n; i0 += kRows) {
    const int64_t r = std::min(kRows, p.n - i0);
    for (int64_t ct = c0; ct < c1; ct += kCols) {
      const int64_t w = std::min(kCols, c1 - ct);
      gather(W, p.w_sn, p.w_sm, i0, r, ct, w, tile);
      for (int64_t j = 0; j < p.k; ++j) {
        acc_t v[kRows];
        vector_slice(V, p.n, j, i0, r, v);
        const acc_t* pj = P + j * p.m + ct;
        for (int64_t rr = 0; rr < kRows; ++rr) {
          acc_t* t = tile[rr];
          const acc_t vr = v[rr];
          for (int64_t c = 0; c < w; ++c) t[c] -= vr * pj[c];
        }
      }
      scatter(tile, r, ct, w, i0, out, p.o_sn, p.o_sm);
    }
  }
}

// Column-major W (w_sn == 1): column c starts at W + c * w_sm.
template <typename scalar_t, typename acc_t>
void project_columns(const Problem& p, int64_t c0, int64_t c1) {
  const auto* W = static_cast<const scalar_t*>(p.W);
  const auto* V = static_cast<const acc_t*>(p.V);
  auto* X = static_cast<acc_t*>(p.X);
  for (int64_t g = c0; g < c1; g += kGroup) {
    const int64_t gw = std::min(kGroup, c1 - g);
    const scalar_t* cols[kGroup];
    for (int64_t q = 0; q < kGroup; ++q) cols[q] = W + (g + std::min(q, gw - 1)) * p.w_sm;
    for (int64_t j = 0; j < p.k; ++j) {
      const acc_t* vj = V + j * p.n;
      acc_t acc[kGroup][kLanes] = {};
      int64_t i = 0;
      for (; i + kLanes <= p.n; i += kLanes) {
        for (int64_t q = 0; q < kGroup; ++q) {
          for (int64_t l = 0; l < kLanes; ++l) acc[q][l] += vj[i + l] * static_cast<acc_t>(cols[q][i + l]);
        }
      }
      for (; i < p.n; ++i) {
        for (int64_t q = 0; q < kGroup; ++q) acc[q][0] += vj[i] * static_cast<acc_t>(cols[q][i]);
      }
      for (int64_t q = 0; q < gw; ++q) {
        acc_t s = acc_t(0);
        for (int64_t l = 0; l < kLanes; ++l) s += acc[q][l];
        X[j * p.m + g + q] = s;
      }
    }
  }
}

template <bool kUnitOut, typename scalar_t, typename acc_t>
void update_columns_impl(const Problem& p, int64_t c0, int64_t c1) {
  const auto* W = static_cast<const scalar_t*>(p.W);
  auto* out = static_cast<scalar_t*>(p.out);
  const auto* V = static_cast<const acc_t*>(p.V);
  const auto* P = static_cast<const acc_t*>(p.P);
  for (int64_t g = c0; g < c1; g += kGroup) {
    const int64_t gw = std::min(kGroup, c1 - g);
    for (int64_t i0 = 0; i0 < p.n; i0 += kLanes) {
      const int64_t r = std::min(kLanes, p.n - i0);
      acc_t a[kGroup][kLanes] = {};
      for (int64_t q = 0; q < gw; ++q) {
        const scalar_t* col = W + (g + q) * p.w_sm + i0;
        for (int64_t l = 0; l < r; ++l) a[q][l] = static_cast<acc_t>(col[l]);
      }
      for (int64_t j = 0; j < p.k; ++j) {
        acc_t v[kLanes];
        for (int64_t l = 0; l < kLanes; ++l) v[l] = l < r ? V[j * p.n + i0 + l] : acc_t(0);
        for (int64_t q = 0; q < kGroup; ++q) {
          const acc_t pq = q < gw ? P[j * p.m + g + q] : acc_t(0);
          for (int64_t l = 0; l < kLanes; ++l) a[q][l] -= v[l] * pq;
        }
      }
      for (int64_t q = 0; q < gw; ++q) {
        scalar_t* dst = out + (g + q) * p.o_sm + i0 * p.o_sn;
        for (int64_t l = 0; l < r; ++l) dst[kUnitOut ? l : l * p.o_sn] = static_cast<scalar_t>(a[q][l]);
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void update_columns(const Problem& p, int64_t c0, int64_t c1) {
  if (p.o_sn == 1) {
    update_columns_impl<true, scalar_t, acc_t>(p, c0, c1);
  } else {
    update_columns_impl<false, scalar_t, acc_t>(p, c0, c1);
  }
}

bool columns_contiguous(const Problem& p) { return p.w_sn == 1 && p.w_sm != 1; }

template <typename scalar_t, typename acc_t>
void project(const Problem& p, int64_t c0, int64_t c1) {
  if (columns_contiguous(p)) {
    project_columns<scalar_t, acc_t>(p, c0, c1);
  } else {
    project_rows<scalar_t, acc_t>(p, c0, c1);
  }
}

template <typename scalar_t, typename acc_t>
void update(const Problem& p, int64_t c0, int64_t c1) {
  if (columns_contiguous(p)) {
    update_columns<scalar_t, acc_t>(p, c0, c1);
  } else {
    update_rows<scalar_t, acc_t>(p, c0, c1);
  }
}

void project_any(const Problem& p, int64_t c0, int64_t c1) {
  switch (p.dtype) {
    case DType::kFloat32: return project<float, float>(p, c0, c1);
    case DType::kFloat64: return project<double, double>(p, c0, c1);
    case DType::kFloat16: return project<c10::Half, float>(p, c0, c1);
    case DType::kBFloat16: return project<c10::BFloat16, float>(p, c0, c1);
  }
}

void update_any(const Problem& p, int64_t c0, int64_t c1) {
  switch (p.dtype) {
    case DType::kFloat32: return update<float, float>(p, c0, c1);
    case DType::kFloat64: return update<double, double>(p, c0, c1);
    case DType::kFloat16: return update<c10::Half, float>(p, c0, c1);
    case DType::kBFloat16: return update<c10::BFloat16, float>(p, c0, c1);
  }
}

}  // namespace

Kernels kernels() { return Kernels{&project_any, &update_any, MOSE_CPU_ISA_NAME}; }

}  // namespace MOSE_CPU_ISA
}  // namespace cpu
}  // namespace mose
