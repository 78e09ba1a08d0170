// CPU implementations of the `mose` ops (schemas in ../mose_ops.cpp): host checks, the split of the
// columns of W among threads, the k x k triangular step, and the dispatch to the kernels of the best
// instruction set (kernels.h). Each thread owns whole column ranges, so it projects, solves and
// updates them without waiting for others; W is streamed in place with X and P (k x m) as the only
// extra memory.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "../householder_tile.h"
#include "kernels_api.h"

namespace mose {
namespace cpu {
namespace {

// Columns of X kept per thread in the row-major strategy: k * width accumulators within ~256 KiB.
constexpr int64_t kProjectBytes = 256 * 1024;

const Kernels& best_kernels() {
  static const Kernels chosen = [] {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return isa_avx2::kernels();
#endif
    return isa_default::kernels();
  }();
  return chosen;
}

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "unsupported dtype ", t);
  }
}

// Problem of batch entry `b` (pointers offset by the batch strides).
Problem batch_problem(const at::Tensor& W, const at::Tensor& out, const at::Tensor& V, const at::Tensor& X,
                      const at::Tensor& P, int64_t b) {
  const int64_t item = W.element_size();
  const int64_t acc = V.element_size();
  const int64_t k = V.size(1), m = W.size(2);
  Problem p{};
  p.dtype = to_dtype(W.scalar_type());
  p.W = static_cast<const char*>(W.const_data_ptr()) + b * W.stride(0) * item;
  p.w_sn = W.stride(1);
  p.w_sm = W.stride(2);
  if (out.defined()) {
    p.out = static_cast<char*>(out.data_ptr()) + b * out.stride(0) * item;
    p.o_sn = out.stride(1);
    p.o_sm = out.stride(2);
  }
  p.V = static_cast<const char*>(V.const_data_ptr()) + b * V.stride(0) * acc;
  p.n = W.size(1);
  p.m = m;
  p.k = k;
  if (X.defined()) p.X = static_cast<char*>(X.data_ptr()) + b * k * m * acc;
  if (P.defined()) p.P = static_cast<const char*>(P.const_data_ptr()) + b * k * m * acc;
  return p;
}

// Column ranges handed to threads: enough ranges for every thread, of bounded X footprint.
int64_t column_width(const at::Tensor& W, int64_t k) {
  const int64_t b = std::max<int64_t>(1, W.size(0)), m = W.size(2);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per_batch = (threads + b - 1) / b;
  int64_t width = (m + per_batch - 1) / per_batch;
  const int64_t cap = std::max<int64_t>(256, kProjectBytes / std::max<int64_t>(1, k * 4));
  width = std::min(width, cap);
  return std::max<int64_t>(1, (width + 15) / 16 * 16);
}

template <typename F>
void for_each_range(const at::Tensor& W, int64_t width, const F& fn) {
  const int64_t m = W.size(2);
  const int64_t chunks = (m + width - 1) / width;
  at::parallel_for(0, W.size(0) * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks;
      const int64_t c0 = (item % chunks) * width;
      fn(b, c0, std::min(m, c0 + width));
    }
  });
}

template <typename acc_t>
void solve_columns(const Problem& p, const acc_t* T, bool transpose, acc_t* P, int64_t c0, int64_t c1) {
  const auto* X = static_cast<const acc_t*>(p.X);
  for (int64_t c = c0; c < c1; ++c) tile::triangular_apply(T, p.k, p.k, transpose, X + c, p.m, P + c, p.m);
}

at::Tensor apply(const at::Tensor& W, const at::Tensor& V, const at::Tensor& T, bool transpose,
                 const at::Tensor& out) {
  check_vectors(V, "V");
  check_weight(W, V, "W");
  check_factor(T, V);
  check_out(out, W);
  TORCH_CHECK(W.device().is_cpu(), "householder_fwd (CPU) got W on ", W.device());
  const int64_t k = V.size(1), m = W.size(2);
  auto X = at::empty({W.size(0), k, m}, V.options());
  auto P = at::empty({W.size(0), k, m}, V.options());
  const Kernels& kern = best_kernels();
  for_each_range(W, column_width(W, k), [&](int64_t b, int64_t c0, int64_t c1) {
    const Problem p = batch_problem(W, out, V, X, P, b);
    kern.project(p, c0, c1);
    AT_DISPATCH_FLOATING_TYPES(V.scalar_type(), "mose_solve", [&] {
      solve_columns<scalar_t>(p, T.const_data_ptr<scalar_t>() + b * k * k, transpose,
                              P.data_ptr<scalar_t>() + b * k * m, c0, c1);
    });
    kern.update(p, c0, c1);
  });
  return X;
}

at::Tensor householder_fwd(const at::Tensor& W, const at::Tensor& V, const at::Tensor& T, bool transpose,
                           at::Tensor& out) {
  return apply(W, V, T, transpose, out);
}

at::Tensor householder_fwd_(at::Tensor& W, const at::Tensor& V, const at::Tensor& T, bool transpose) {
  return apply(W, V, T, transpose, W);
}

at::Tensor wy_factor(const at::Tensor& V) {
  check_vectors(V, "V");
  TORCH_CHECK(V.device().is_cpu(), "wy_factor (CPU) got V on ", V.device());
  const int64_t k = V.size(1);
  auto G = at::bmm(V, V.transpose(1, 2)).contiguous();
  auto T = at::empty_like(G);
  AT_DISPATCH_FLOATING_TYPES(V.scalar_type(), "mose_wy_factor", [&] {
    const scalar_t* g = G.const_data_ptr<scalar_t>();
    scalar_t* t = T.data_ptr<scalar_t>();
    at::parallel_for(0, V.size(0), 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) tile::factor_from_gram(g + b * k * k, k, k, t + b * k * k, k);
    });
  });
  return T;
}

at::Tensor project(const at::Tensor& V, const at::Tensor& W) {
  check_vectors(V, "V");
  check_weight(W, V, "W");
  TORCH_CHECK(W.device().is_cpu(), "project (CPU) got W on ", W.device());
  const int64_t k = V.size(1);
  auto X = at::empty({W.size(0), k, W.size(2)}, V.options());
  const Kernels& kern = best_kernels();
  for_each_range(W, column_width(W, k), [&](int64_t b, int64_t c0, int64_t c1) {
    kern.project(batch_problem(W, at::Tensor(), V, X, at::Tensor(), b), c0, c1);
  });
  return X;
}

void reflect_update(const at::Tensor& W, const at::Tensor& V, const at::Tensor& P, at::Tensor& out) {
  check_vectors(V, "V");
  check_weight(W, V, "W");
  check_rows(P, V, W);
  check_out(out, W);
  TORCH_CHECK(W.device().is_cpu(), "reflect_update (CPU) got W on ", W.device());
  const Kernels& kern = best_kernels();
  for_each_range(W, column_width(W, V.size(1)), [&](int64_t b, int64_t c0, int64_t c1) {
    kern.update(batch_problem(W, out, V, at::Tensor(), P, b), c0, c1);
  });
}

}  // namespace
}  // namespace cpu
}  // namespace mose

TORCH_LIBRARY_IMPL(mose, CPU, m) {
  m.impl("wy_factor", &mose::cpu::wy_factor);
  m.impl("householder_fwd", &mose::cpu::householder_fwd);
  m.impl("householder_fwd_", &mose::cpu::householder_fwd_);
  m.impl("project", &mose::cpu::project);
  m.impl("reflect_update", &mose::cpu::reflect_update);
}
