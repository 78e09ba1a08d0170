// The CPU kernels of every instruction set built here (csrc/cpu/kernels_*.cpp) against the naive
// sequential reference: row-major, column-major and strided W, in place and out of place, float,
// double, float16 and bfloat16 storage, column ranges split as threads split them, edge sizes.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <vector>

#include "check.h"
#include "cpu/kernels_api.h"
#include "householder_tile.h"

namespace {

using mose::cpu::DType;
using mose::cpu::Kernels;
using mose::cpu::Problem;
using mose_test::Failures;

enum class Layout { kRowMajor, kColumnMajor, kStrided };

template <typename store_t>
constexpr DType dtype_of() {
  if constexpr (std::is_same_v<store_t, float>) return DType::kFloat32;
  if constexpr (std::is_same_v<store_t, double>) return DType::kFloat64;
  if constexpr (std::is_same_v<store_t, c10::Half>) return DType::kFloat16;
  return DType::kBFloat16;
}

template <typename store_t, typename acc_t>
void run_case(Failures& f, const Kernels& kern, int64_t k, int64_t n, int64_t m, Layout layout, bool in_place,
              bool transpose, double tol) {
  const auto Vd = mose_test::random_values(k * n, 3 + k);
  const auto Wd = mose_test::random_values(n * m, 5 + n + m);
  const auto want = mose_test::sequential_apply(Vd, Wd, k, n, m, transpose);
  // Element (i, c) of W lives at i * sn + c * sm in a buffer of 2 n m elements.
  const int64_t sn = layout == Layout::kRowMajor ? m : (layout == Layout::kColumnMajor ? 1 : 2 * m);
  const int64_t sm = layout == Layout::kRowMajor ? 1 : (layout == Layout::kColumnMajor ? n : 2);
  std::vector<store_t> W(2 * n * m + 1), out(2 * n * m + 1);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t c = 0; c < m; ++c) W[i * sn + c * sm] = static_cast<store_t>(Wd[i * m + c]);
  }
  std::vector<acc_t> V(Vd.begin(), Vd.end()), T(k * k), X(k * m), P(k * m);
  const auto Gd = mose_test::gram(Vd, k, n);
  std::vector<acc_t> G(Gd.begin(), Gd.end());
  mose::tile::factor_from_gram(G.data(), k, k, T.data(), k);
  Problem p{};
  p.dtype = dtype_of<store_t>();
  p.W = W.data();
  p.w_sn = sn;
  p.w_sm = sm;
  p.out = in_place ? W.data() : out.data();
  p.o_sn = in_place ? sn : 1;  // out of place: column-major out, whatever W's layout
  p.o_sm = in_place ? sm : n;
  p.V = V.data();
  p.n = n;
  p.m = m;
  p.k = k;
  p.X = X.data();
  p.P = P.data();
  const int64_t split = m / 3;  // two column ranges, as two threads would own them
  for (auto [c0, c1] : {std::pair<int64_t, int64_t>{0, split}, {split, m}}) {
    kern.project(p, c0, c1);
    for (int64_t c = c0; c < c1; ++c) {
      mose::tile::triangular_apply(T.data(), k, k, transpose, X.data() + c, m, P.data() + c, m);
    }
    kern.update(p, c0, c1);
  }
  const store_t* res = static_cast<const store_t*>(p.out);
  double err = 0, norm = 0;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t c = 0; c < m; ++c) {
      const double d = static_cast<double>(res[i * p.o_sn + c * p.o_sm]) - want[i * m + c];
      err += d * d;
      norm += want[i * m + c] * want[i * m + c];
    }
  }
  char what[160];
  std::snprintf(what, sizeof(what), "%s k=%lld n=%lld m=%lld layout=%d in_place=%d transpose=%d rel. RMS error",
                kern.isa, static_cast<long long>(k), static_cast<long long>(n), static_cast<long long>(m),
                static_cast<int>(layout), in_place, transpose);
  f.expect_close(what, std::sqrt(err / norm), 0.0, tol);
}

void run_all(Failures& f, const Kernels& kern) {
  const int64_t shapes[][3] = {{1, 1, 1}, {1, 70, 45}, {4, 37, 129}, {16, 64, 96}, {17, 33, 40}, {3, 5, 300}};
  for (const auto& s : shapes) {
    for (Layout layout : {Layout::kRowMajor, Layout::kColumnMajor, Layout::kStrided}) {
      for (bool in_place : {true, false}) {
        for (bool transpose : {false, true}) {
          run_case<double, double>(f, kern, s[0], s[1], s[2], layout, in_place, transpose, 1e-13);
          run_case<float, float>(f, kern, s[0], s[1], s[2], layout, in_place, transpose, 2e-6);
          run_case<c10::Half, float>(f, kern, s[0], s[1], s[2], layout, in_place, transpose, 2e-3);
          run_case<c10::BFloat16, float>(f, kern, s[0], s[1], s[2], layout, in_place, transpose, 1.6e-2);
        }
      }
    }
  }
}

}  // namespace

int main() {
  Failures f;
  run_all(f, mose::cpu::isa_default::kernels());
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    run_all(f, mose::cpu::isa_avx2::kernels());
  } else {
    std::printf("no AVX2 + FMA on this processor: the avx2 kernels are not tested\n");
  }
#endif
  std::printf("%s: %d failure(s)\n", f.count ? "FAILED" : "passed", f.count);
  return f.count ? 1 : 0;
}
