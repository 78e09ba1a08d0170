// Torch-free interface of the CUDA kernels (householder_kernels.cu), called by the ATen host code
// (householder_cuda.cpp). Shapes follow the canonical batch of mose_kernels/backends.py.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace mose {
namespace cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// W (b, n, m) and out at arbitrary element strides; V (b, k, n), X and P (b, k, m), T (b, k, k),
// G (b, k, k) and scale (b, k) contiguous float32.
struct Problem {
  DType dtype;
  int64_t b, n, m, k;
  const void* W;
  int64_t w_sb, w_sn, w_sm;
  void* out;
  int64_t o_sb, o_sn, o_sm;
  const float* V;
  const float* scale;  // ||V_j||, rescales V and P on the tensor-core paths (fp16 range)
  float* X;            // projection target, zero-filled by the caller
  const float* P;
};

// T_b from G_b = V_b V_b^T (one thread per column of T, shared tile maths).
cudaError_t launch_factor(const float* G, float* T, int64_t b, int64_t k, cudaStream_t stream);
// X += V W (X zero-filled beforehand).
cudaError_t launch_project(const Problem& p, cudaStream_t stream);
// P = A X with A = T (or T^T when transpose).
cudaError_t launch_solve(const float* T, const float* X, float* P, int64_t b, int64_t k, int64_t m, bool transpose,
                         cudaStream_t stream);
// out = W - V^T P.
cudaError_t launch_update(const Problem& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace mose
