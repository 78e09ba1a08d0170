// Torch-free interface between the ATen host code (householder_cpu.cpp) and the CPU kernels
// (kernels.h), which are compiled once per instruction set (kernels_default.cpp, kernels_avx2.cpp).
#pragma once

#include <cstdint>

namespace mose {
namespace cpu {

enum class DType { kFloat32, kFloat64, kFloat16, kBFloat16 };

// One matrix of the canonical batch: out = A-reflected W on the columns [c0, c1), with
// W (n, m) and out (n, m) at arbitrary element strides, V (k, n) row-major and X, P (k, m) row-major
// in the accumulation type (double for kFloat64, float otherwise).
struct Problem {
  DType dtype;
  const void* W;
  int64_t w_sn, w_sm;
  void* out;
  int64_t o_sn, o_sm;
  const void* V;
  int64_t n, m, k;
  void* X;  // written by project
  const void* P;  // read by update
};

// X[:, c0:c1] = V W[:, c0:c1].
using ProjectFn = void (*)(const Problem&, int64_t c0, int64_t c1);
// out[:, c0:c1] = W[:, c0:c1] - V^T P[:, c0:c1] (in place when out == W).
using UpdateFn = void (*)(const Problem&, int64_t c0, int64_t c1);

struct Kernels {
  ProjectFn project;
  UpdateFn update;
  const char* isa;
};

namespace isa_default {
Kernels kernels();
}
namespace isa_avx2 {
Kernels kernels();  // only defined on x86-64 builds
}

}  // namespace cpu
}  // namespace mose
