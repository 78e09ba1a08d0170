// Unit tests of the shared tile maths (csrc/householder_tile.h) against naive loops: the factor T,
// the triangular step, and a full apply composed from the tile functions (every side of the WY
// product: Q W and Q^T W), in double and with float storage, for k = 1, odd sizes and k > n.
#include "householder_tile.h"

#include <algorithm>

#include "check.h"

namespace {

using mose_test::Failures;

// T is upper triangular and S T = I with S = diag(G)/2 + striu(G).
void test_factor(Failures& f, int64_t k, int64_t n) {
  const auto V = mose_test::random_values(k * n, 7 + k);
  const auto G = mose_test::gram(V, k, n);
  std::vector<double> T(k * k, -1.0);
  mose::tile::factor_from_gram(G.data(), k, k, T.data(), k);
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j < k; ++j) {
      double s = 0;
      for (int64_t l = 0; l < k; ++l) {
        const double S_il = l < i ? 0.0 : (l == i ? G[i * k + i] / 2 : G[i * k + l]);
        s += S_il * T[l * k + j];
      }
      f.expect_close("S T = I", s, i == j ? 1.0 : 0.0, 1e-12);
      if (i > j) f.expect_close("T lower triangle", T[i * k + j], 0.0, 0.0);
    }
  }
}

// Full apply from the tile functions, W stored as `store_t` and accumulated in `acc_t`.
template <typename store_t, typename acc_t>
void test_apply(Failures& f, int64_t k, int64_t n, int64_t m, bool transpose, double tol) {
  const auto Vd = mose_test::random_values(k * n, 11 + k + n);
  const auto Wd = mose_test::random_values(n * m, 13 + m);
  const auto want = mose_test::sequential_apply(Vd, Wd, k, n, m, transpose);
  std::vector<acc_t> V(Vd.begin(), Vd.end());
  std::vector<store_t> W(Wd.begin(), Wd.end());
  std::vector<acc_t> G(k * k), T(k * k), X(k * m, acc_t(0)), P(k * m);
  for (int64_t a = 0; a < k; ++a) {
    for (int64_t b = 0; b < k; ++b) {
      acc_t s = 0;
      for (int64_t i = 0; i < n; ++i) s += V[a * n + i] * V[b * n + i];
      G[a * k + b] = s;
    }
  }
  mose::tile::factor_from_gram(G.data(), k, k, T.data(), k);
  const int64_t half = n / 2;  // project in two row tiles to exercise the accumulation
  for (int64_t c = 0; c < m; ++c) {
    mose::tile::project_column(V.data(), n, k, W.data() + c, m, 0, half, X.data() + c, m);
    mose::tile::project_column(V.data(), n, k, W.data() + c, m, half, n, X.data() + c, m);
    mose::tile::triangular_apply(T.data(), k, k, transpose, X.data() + c, m, P.data() + c, m);
  }
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t c = 0; c < m; ++c) {
      const acc_t got = mose::tile::reflect_element(W[i * m + c], V.data() + i, n, P.data() + c, m, k);
      f.expect_close("apply", static_cast<double>(got), want[i * m + c], tol);
    }
  }
}

}  // namespace

int main() {
  Failures f;
  for (int64_t k : {1, 2, 5, 16, 33}) test_factor(f, k, 37);
  test_factor(f, 9, 4);  // k > n: G is singular but its diagonal is not, so T exists
  for (bool transpose : {false, true}) {
    for (int64_t k : {1, 3, 8, 17}) {
      test_apply<double, double>(f, k, 29, 7, transpose, 1e-12);
      test_apply<float, float>(f, k, 29, 7, transpose, 2e-5);
      test_apply<float, double>(f, k, 64, 3, transpose, 1e-6);
    }
  }
  std::printf("%s: %d failure(s)\n", f.count ? "FAILED" : "passed", f.count);
  return f.count ? 1 : 0;
}
