// Schemas of the `mose` operator namespace (implementations: cpu/householder_cpu.cpp,
// cuda/householder_cuda.cpp; fake kernels and the Python backend: mose_kernels/_ext.py).
//
// All ops work on the canonical left-side batch of mose_kernels/backends.py: W and out (b, n, m) with
// any strides, V (b, k, n) and T (b, k, k) contiguous in the accumulation dtype (float64 for float64
// W, float32 otherwise), X = V W and P (b, k, m) in the accumulation dtype.
#include <torch/library.h>

TORCH_LIBRARY(mose, m) {
  // T with Q = H_1 ... H_k = I - V^T T V.
  m.def("wy_factor(Tensor V) -> Tensor");
  // out = Q W (Q^T W if transpose); returns X = V W. out must not overlap W (see householder_fwd_).
  m.def("householder_fwd(Tensor W, Tensor V, Tensor T, bool transpose, Tensor(a!) out) -> Tensor");
  // In place: W = Q W (Q^T W if transpose) with O(k m) extra memory; returns X = V W (before update).
  m.def("householder_fwd_(Tensor(a!) W, Tensor V, Tensor T, bool transpose) -> Tensor");
  // X = V W (any strides of W; V contiguous). Used by the backward.
  m.def("project(Tensor V, Tensor W) -> Tensor");
  // out = W - V^T P. Used by the backward.
  m.def("reflect_update(Tensor W, Tensor V, Tensor P, Tensor(a!) out) -> ()");
}
