// Argument checks shared by the CPU and CUDA host functions of the `mose` ops. Inputs were validated
// by mose_kernels.functional; these catch direct misuse of torch.ops.mose.* with clear messages.
#pragma once

#include <ATen/ATen.h>

namespace mose {

inline at::ScalarType accumulation_dtype(at::ScalarType w) {
  return w == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_vectors(const at::Tensor& V, const char* name) {
  TORCH_CHECK(V.dim() == 3, name, " must have shape (b, k, n), got ", V.sizes());
  TORCH_CHECK(V.scalar_type() == at::kFloat || V.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", V.scalar_type());
  TORCH_CHECK(V.is_contiguous(), name, " must be contiguous");
}

inline void check_weight(const at::Tensor& W, const at::Tensor& V, const char* name) {
  TORCH_CHECK(W.dim() == 3, name, " must have shape (b, n, m), got ", W.sizes());
  const auto dt = W.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, name,
              " must be float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK(accumulation_dtype(dt) == V.scalar_type(), "vectors must be ",
              accumulation_dtype(dt), " for ", name, " of dtype ", dt, ", got ", V.scalar_type());
  TORCH_CHECK(W.size(0) == V.size(0) && W.size(1) == V.size(2), name, " ", W.sizes(),
              " does not match vectors ", V.sizes(), " (expected (b, n, m) with V (b, k, n))");
  TORCH_CHECK(W.device() == V.device(), name, " and vectors must be on the same device, got ", W.device(),
              " and ", V.device());
}

inline void check_factor(const at::Tensor& T, const at::Tensor& V) {
  check_vectors(T, "T");
  TORCH_CHECK(T.scalar_type() == V.scalar_type() && T.size(0) == V.size(0) && T.size(1) == V.size(1) &&
                  T.size(2) == V.size(1),
              "T must be (b, k, k) in V's dtype, got ", T.sizes(), " ", T.scalar_type(), " for V ", V.sizes());
}

inline void check_out(const at::Tensor& out, const at::Tensor& W) {
  TORCH_CHECK(out.sizes() == W.sizes() && out.scalar_type() == W.scalar_type() && out.device() == W.device(),
              "out must match W (", W.sizes(), ", ", W.scalar_type(), "), got ", out.sizes(), ", ",
              out.scalar_type());
}

// (b, k, m) operand P of reflect_update.
inline void check_rows(const at::Tensor& P, const at::Tensor& V, const at::Tensor& W) {
  check_vectors(P, "P");
  TORCH_CHECK(P.scalar_type() == V.scalar_type() && P.size(0) == V.size(0) && P.size(1) == V.size(1) &&
                  P.size(2) == W.size(2),
              "P must be (b, k, m) in V's dtype, got ", P.sizes(), " for V ", V.sizes(), " and W ", W.sizes());
}

}  // namespace mose
