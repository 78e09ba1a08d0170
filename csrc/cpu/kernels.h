// CPU kernels of the Householder apply, compiled once per instruction set: the including file
// defines MOSE_CPU_ISA (a namespace name) and includes the dependencies below first, so that only
// this file's functions get that file's target attributes.
//
// Threads own column ranges [c0, c1) of W (no reduction across threads). Unit-stride layouts take
// register-tiled paths (GCC/Clang vector extension): row-major W (rows contiguous, the left side of a
// row-major weight) in tiles of kTileRows rows x kTileVecs vectors; column-major W (the right side)
// kTileRows columns at a time with vectors along n. Any other strides go through the generic paths,
// which gather kRows x kCols tiles into an accumulation-type buffer. Edges use the tile maths of
// ../householder_tile.h element by element.
#ifndef MOSE_CPU_ISA
#error "define MOSE_CPU_ISA before including kernels.h"
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

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

// 32-byte vectors through the GCC/Clang vector extension: AVX registers in the AVX2 build, pairs of
// SSE registers in the default one. Halves are converted element by element on load and store.
template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(32)));
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr int64_t kWidth = 32 / sizeof(T);

template <typename acc_t, typename scalar_t>
inline Vec<acc_t> load_vec(const scalar_t* src) {
  Vec<acc_t> v;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    std::memcpy(&v, src, sizeof(v));
  } else {
    acc_t tmp[kWidth<acc_t>];
    for (int64_t l = 0; l < kWidth<acc_t>; ++l) tmp[l] = static_cast<acc_t>(src[l]);
    std::memcpy(&v, tmp, sizeof(v));
  }
  return v;
}

template <typename acc_t, typename scalar_t>
inline void store_vec(scalar_t* dst, const Vec<acc_t>& v) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    std::memcpy(dst, &v, sizeof(v));
  } else {
    acc_t tmp[kWidth<acc_t>];
    std::memcpy(tmp, &v, sizeof(v));
    for (int64_t l = 0; l < kWidth<acc_t>; ++l) dst[l] = static_cast<scalar_t>(tmp[l]);
  }
}

// Register tile of the unit-stride paths: kTileRows rows (or columns) x kTileVecs vectors.
constexpr int64_t kTileRows = 4;
constexpr int64_t kTileVecs = 2;

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

// Column-major W (w_sn == 1), out with any strides: column c starts at W + c * w_sm.
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

// Row-major W and out with unit column stride: register tiles of kTileRows rows x kTileVecs
// vectors, W read once and written once; edges element by element with the shared tile maths.
template <typename scalar_t, typename acc_t>
void update_rows_unit(const Problem& p, int64_t c0, int64_t c1) {
  const auto* W = static_cast<const scalar_t*>(p.W);
  auto* out = static_cast<scalar_t*>(p.out);
  const auto* V = static_cast<const acc_t*>(p.V);
  const auto* P = static_cast<const acc_t*>(p.P);
  constexpr int64_t B = kTileVecs * kWidth<acc_t>;
  const int64_t c_full = c0 + (c1 - c0) / B * B;
  const int64_t i_full = p.n / kTileRows * kTileRows;
  for (int64_t i0 = 0; i0 < i_full; i0 += kTileRows) {
    for (int64_t cb = c0; cb < c_full; cb += B) {
      Vec<acc_t> a[kTileRows][kTileVecs];
      for (int64_t r = 0; r < kTileRows; ++r) {
        for (int64_t q = 0; q < kTileVecs; ++q) {
          a[r][q] = load_vec<acc_t>(W + (i0 + r) * p.w_sn + cb + q * kWidth<acc_t>);
        }
      }
      for (int64_t j = 0; j < p.k; ++j) {
        Vec<acc_t> pj[kTileVecs];
        for (int64_t q = 0; q < kTileVecs; ++q) pj[q] = load_vec<acc_t>(P + j * p.m + cb + q * kWidth<acc_t>);
        for (int64_t r = 0; r < kTileRows; ++r) {
          const acc_t v = V[j * p.n + i0 + r];
          for (int64_t q = 0; q < kTileVecs; ++q) a[r][q] -= v * pj[q];
        }
      }
      for (int64_t r = 0; r < kTileRows; ++r) {
        for (int64_t q = 0; q < kTileVecs; ++q) {
          store_vec<acc_t>(out + (i0 + r) * p.o_sn + cb + q * kWidth<acc_t>, a[r][q]);
        }
      }
    }
    for (int64_t i = i0; i < i0 + kTileRows; ++i) {
      for (int64_t c = c_full; c < c1; ++c) {
        out[i * p.o_sn + c] = static_cast<scalar_t>(tile::reflect_element(W[i * p.w_sn + c], V + i, p.n, P + c, p.m, p.k));
      }
    }
  }
  for (int64_t i = i_full; i < p.n; ++i) {
    for (int64_t c = c0; c < c1; ++c) {
      out[i * p.o_sn + c] = static_cast<scalar_t>(tile::reflect_element(W[i * p.w_sn + c], V + i, p.n, P + c, p.m, p.k));
    }
  }
}

template <typename scalar_t, typename acc_t>
void project_rows_unit(const Problem& p, int64_t c0, int64_t c1) {
  const auto* W = static_cast<const scalar_t*>(p.W);
  const auto* V = static_cast<const acc_t*>(p.V);
  auto* X = static_cast<acc_t*>(p.X);
  for (int64_t j = 0; j < p.k; ++j) std::fill(X + j * p.m + c0, X + j * p.m + c1, acc_t(0));
  constexpr int64_t B = kTileVecs * kWidth<acc_t>;
  const int64_t c_full = c0 + (c1 - c0) / B * B;
  const int64_t i_full = p.n / kTileRows * kTileRows;
  for (int64_t i0 = 0; i0 < i_full; i0 += kTileRows) {
    for (int64_t cb = c0; cb < c_full; cb += B) {
      Vec<acc_t> a[kTileRows][kTileVecs];
      for (int64_t r = 0; r < kTileRows; ++r) {
        for (int64_t q = 0; q < kTileVecs; ++q) {
          a[r][q] = load_vec<acc_t>(W + (i0 + r) * p.w_sn + cb + q * kWidth<acc_t>);
        }
      }
      for (int64_t j = 0; j < p.k; ++j) {
        acc_t* xj = X + j * p.m + cb;
        Vec<acc_t> x[kTileVecs];
        for (int64_t q = 0; q < kTileVecs; ++q) x[q] = load_vec<acc_t>(xj + q * kWidth<acc_t>);
        for (int64_t r = 0; r < kTileRows; ++r) {
          const acc_t v = V[j * p.n + i0 + r];
          for (int64_t q = 0; q < kTileVecs; ++q) x[q] += v * a[r][q];
        }
        for (int64_t q = 0; q < kTileVecs; ++q) store_vec<acc_t>(xj + q * kWidth<acc_t>, x[q]);
      }
    }
  }
  // Edges: the remaining columns over all rows, then the remaining rows over the full columns.
  for (int64_t c = c_full; c < c1; ++c) tile::project_column(V, p.n, p.k, W + c, p.w_sn, 0, p.n, X + c, p.m);
  for (int64_t c = c0; c < c_full; ++c) tile::project_column(V, p.n, p.k, W + c, p.w_sn, i_full, p.n, X + c, p.m);
}

// Column-major W (w_sn == 1) and out (o_sn == 1): kTileRows columns at a time, vectors along n.
template <typename scalar_t, typename acc_t>
void update_columns_unit(const Problem& p, int64_t c0, int64_t c1) {
  const auto* W = static_cast<const scalar_t*>(p.W);
  auto* out = static_cast<scalar_t*>(p.out);
  const auto* V = static_cast<const acc_t*>(p.V);
  const auto* P = static_cast<const acc_t*>(p.P);
  constexpr int64_t L = kWidth<acc_t>;
  const int64_t i_full = p.n / L * L;
  const int64_t g_full = c0 + (c1 - c0) / kTileRows * kTileRows;
  for (int64_t g = c0; g < g_full; g += kTileRows) {
    for (int64_t i = 0; i < i_full; i += L) {
      Vec<acc_t> a[kTileRows];
      for (int64_t q = 0; q < kTileRows; ++q) a[q] = load_vec<acc_t>(W + (g + q) * p.w_sm + i);
      for (int64_t j = 0; j < p.k; ++j) {
        const Vec<acc_t> v = load_vec<acc_t>(V + j * p.n + i);
        for (int64_t q = 0; q < kTileRows; ++q) a[q] -= v * P[j * p.m + g + q];
      }
      for (int64_t q = 0; q < kTileRows; ++q) store_vec<acc_t>(out + (g + q) * p.o_sm + i, a[q]);
    }
  }
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t i = c < g_full ? i_full : 0; i < p.n; ++i) {
      out[c * p.o_sm + i] = static_cast<scalar_t>(tile::reflect_element(W[c * p.w_sm + i], V + i, p.n, P + c, p.m, p.k));
    }
  }
}

template <typename scalar_t, typename acc_t>
void project_columns_unit(const Problem& p, int64_t c0, int64_t c1) {
  const auto* W = static_cast<const scalar_t*>(p.W);
  const auto* V = static_cast<const acc_t*>(p.V);
  auto* X = static_cast<acc_t*>(p.X);
  constexpr int64_t L = kWidth<acc_t>;
  const int64_t i_full = p.n / L * L;
  for (int64_t c = c0; c < c1; c += kTileRows) {
    const int64_t gw = std::min(kTileRows, c1 - c);
    const scalar_t* cols[kTileRows];
    for (int64_t q = 0; q < kTileRows; ++q) cols[q] = W + (c + std::min(q, gw - 1)) * p.w_sm;
    for (int64_t j = 0; j < p.k; ++j) {
      const acc_t* vj = V + j * p.n;
      Vec<acc_t> acc[kTileRows] = {};
      for (int64_t i = 0; i < i_full; i += L) {
        const Vec<acc_t> v = load_vec<acc_t>(vj + i);
        for (int64_t q = 0; q < kTileRows; ++q) acc[q] += v * load_vec<acc_t>(cols[q] + i);
      }
      for (int64_t q = 0; q < gw; ++q) {
        acc_t lanes[L];
        std::memcpy(lanes, &acc[q], sizeof(lanes));
        acc_t s = acc_t(0);
        for (int64_t l = 0; l < L; ++l) s += lanes[l];
        for (int64_t i = i_full; i < p.n; ++i) s += vj[i] * static_cast<acc_t>(cols[q][i]);
        X[j * p.m + c + q] = s;
      }
    }
  }
}

bool columns_contiguous(const Problem& p) { return p.w_sn == 1 && p.w_sm != 1; }

template <typename scalar_t, typename acc_t>
void project(const Problem& p, int64_t c0, int64_t c1) {
  if (columns_contiguous(p)) {
    project_columns_unit<scalar_t, acc_t>(p, c0, c1);
  } else if (p.w_sm == 1) {
    project_rows_unit<scalar_t, acc_t>(p, c0, c1);
  } else {
    project_rows<scalar_t, acc_t>(p, c0, c1);
  }
}

template <typename scalar_t, typename acc_t>
void update(const Problem& p, int64_t c0, int64_t c1) {
  if (columns_contiguous(p) && p.o_sn == 1) {
    update_columns_unit<scalar_t, acc_t>(p, c0, c1);
  } else if (columns_contiguous(p)) {
    update_columns<scalar_t, acc_t>(p, c0, c1);
  } else if (p.w_sm == 1 && p.o_sm == 1) {
    update_rows_unit<scalar_t, acc_t>(p, c0, c1);
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
