// Minimal test helpers for the C++ unit tests (no framework dependency): deterministic random data,
// a naive sequential Householder reference, and a failure counter.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

namespace mose_test {

struct Failures {
  int count = 0;
  void expect_close(const char* what, double got, double want, double tol) {
    if (!(std::fabs(got - want) <= tol * (1.0 + std::fabs(want)))) {
      if (count < 20) std::printf("FAIL %s: got %.17g, want %.17g (tol %.1e)\n", what, got, want, tol);
      ++count;
    }
  }
};

// xorshift64*, uniform in [-1, 1): reproducible everywhere.
inline std::vector<double> random_values(int64_t count, uint64_t seed) {
  std::vector<double> out(count);
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (auto& x : out) {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    x = static_cast<double>((s * 0x2545F4914F6CDD1Dull) >> 11) / 9007199254740992.0 * 2.0 - 1.0;
  }
  return out;
}

// Q W (or Q^T W) by reflections one at a time, in double: Q = H_1 ... H_k, so Q W applies H_k first.
// V is (k, n) row-major, W (n, m) row-major.
inline std::vector<double> sequential_apply(const std::vector<double>& V, const std::vector<double>& W, int64_t k,
                                            int64_t n, int64_t m, bool transpose) {
  std::vector<double> Y = W;
  for (int64_t step = 0; step < k; ++step) {
    const int64_t j = transpose ? step : k - 1 - step;
    double vv = 0;
    for (int64_t i = 0; i < n; ++i) vv += V[j * n + i] * V[j * n + i];
    for (int64_t c = 0; c < m; ++c) {
      double d = 0;
      for (int64_t i = 0; i < n; ++i) d += V[j * n + i] * Y[i * m + c];
      for (int64_t i = 0; i < n; ++i) Y[i * m + c] -= 2.0 * d / vv * V[j * n + i];
    }
  }
  return Y;
}

inline std::vector<double> gram(const std::vector<double>& V, int64_t k, int64_t n) {
  std::vector<double> G(k * k);
  for (int64_t a = 0; a < k; ++a) {
    for (int64_t b = 0; b < k; ++b) {
      double s = 0;
      for (int64_t i = 0; i < n; ++i) s += V[a * n + i] * V[b * n + i];
      G[a * k + b] = s;
    }
  }
  return G;
}

}  // namespace mose_test
