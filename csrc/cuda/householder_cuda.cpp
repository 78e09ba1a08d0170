// CUDA implementations of the `mose` ops (schemas in ../mose_ops.cpp): host checks, allocation of
// the k x m intermediates, device guard and current stream, then the kernels of
// householder_kernels.cu. The only translation unit of the CUDA extension that includes torch.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "householder_launch.h"

namespace mose {
namespace cuda {
namespace {

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "the CUDA kernels support float32, float16 and bfloat16 W, got ", t);
  }
}

void check_cuda(const at::Tensor& W, const at::Tensor& V, const char* op) {
  TORCH_CHECK(W.is_cuda() && V.is_cuda(), op, " (CUDA) needs CUDA tensors, got ", W.device(), " and ",
              V.device());
  TORCH_CHECK(V.scalar_type() == at::kFloat, op, " (CUDA) needs float32 vectors, got ", V.scalar_type());
}

Problem make_problem(const at::Tensor& W, const at::Tensor& out, const at::Tensor& V, const at::Tensor& scale,
                     const at::Tensor& X, const at::Tensor& P) {
  Problem p{};
  p.dtype = to_dtype(W.scalar_type());
  p.b = W.size(0);
  p.n = W.size(1);
  p.m = W.size(2);
  p.k = V.size(1);
  p.W = W.const_data_ptr();
  p.w_sb = W.stride(0);
  p.w_sn = W.stride(1);
  p.w_sm = W.stride(2);
  if (out.defined()) {
    p.out = out.data_ptr();
    p.o_sb = out.stride(0);
    p.o_sn = out.stride(1);
    p.o_sm = out.stride(2);
  }
  p.V = V.const_data_ptr<float>();
  p.scale = scale.const_data_ptr<float>();
  if (X.defined()) p.X = X.data_ptr<float>();
  if (P.defined()) p.P = P.const_data_ptr<float>();
  return p;
}

// ||V_j||: the tensor-core paths work with unit rows of V.
at::Tensor row_scale(const at::Tensor& V) {
  return at::linalg_vector_norm(V, 2, {-1}, false, std::nullopt).clamp_min(1e-30).contiguous();
}

at::Tensor project_into(const at::Tensor& V, const at::Tensor& W, const at::Tensor& scale) {
  auto X = at::zeros({W.size(0), V.size(1), W.size(2)}, V.options());
  C10_CUDA_CHECK(launch_project(make_problem(W, at::Tensor(), V, scale, X, at::Tensor()),
                                at::cuda::getCurrentCUDAStream()));
  return X;
}

at::Tensor apply(const at::Tensor& W, const at::Tensor& V, const at::Tensor& T, bool transpose,
                 const at::Tensor& out) {
  check_vectors(V, "V");
  check_weight(W, V, "W");
  check_factor(T, V);
  check_out(out, W);
  check_cuda(W, V, "householder_fwd");
  const c10::cuda::CUDAGuard guard(W.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto scale = row_scale(V);
  auto X = project_into(V, W, scale);
  auto P = at::empty_like(X);
  C10_CUDA_CHECK(launch_solve(T.const_data_ptr<float>(), X.const_data_ptr<float>(), P.data_ptr<float>(),
                              X.size(0), X.size(1), X.size(2), transpose, stream));
  C10_CUDA_CHECK(launch_update(make_problem(W, out, V, scale, at::Tensor(), P), stream));
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
  TORCH_CHECK(V.is_cuda() && V.scalar_type() == at::kFloat, "wy_factor (CUDA) needs float32 CUDA vectors, got ",
              V.scalar_type(), " on ", V.device());
  const c10::cuda::CUDAGuard guard(V.device());
  auto G = at::bmm(V, V.transpose(1, 2)).contiguous();
  auto T = at::empty_like(G);
  C10_CUDA_CHECK(launch_factor(G.const_data_ptr<float>(), T.data_ptr<float>(), V.size(0), V.size(1),
                               at::cuda::getCurrentCUDAStream()));
  return T;
}

at::Tensor project(const at::Tensor& V, const at::Tensor& W) {
  check_vectors(V, "V");
  check_weight(W, V, "W");
  check_cuda(W, V, "project");
  const c10::cuda::CUDAGuard guard(W.device());
  return project_into(V, W, row_scale(V));
}

void reflect_update(const at::Tensor& W, const at::Tensor& V, const at::Tensor& P, at::Tensor& out) {
  check_vectors(V, "V");
  check_weight(W, V, "W");
  check_rows(P, V, W);
  check_out(out, W);
  check_cuda(W, V, "reflect_update");
  const c10::cuda::CUDAGuard guard(W.device());
  C10_CUDA_CHECK(launch_update(make_problem(W, out, V, row_scale(V), at::Tensor(), P),
                               at::cuda::getCurrentCUDAStream()));
}

}  // namespace
}  // namespace cuda
}  // namespace mose

TORCH_LIBRARY_IMPL(mose, CUDA, m) {
  m.impl("wy_factor", &mose::cuda::wy_factor);
  m.impl("householder_fwd", &mose::cuda::householder_fwd);
  m.impl("householder_fwd_", &mose::cuda::householder_fwd_);
  m.impl("project", &mose::cuda::project);
  m.impl("reflect_update", &mose::cuda::reflect_update);
}
