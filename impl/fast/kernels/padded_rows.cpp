// Padded-token layer and RMS norm on CPU: the rows of a contiguous (rows, n) tensor, one validity flag per row.
//
//   valid row:   mu = (1/n) sum x (0 when !center),  rstd = 1 / sqrt((1/n) sum (x - mu)^2 + eps),
//                y = (x - mu) rstd w + b
//   padded row:  y = x (or 0 when `zero`),  mu = rstd = 0  (passed through; spec/CONTRACT.md's degenerate rule)
//
//   backward, valid row (xh = (x - mu) rstd, g = dy w; the mean(g) term only when center):
//       dx = rstd (g - mean(g) - xh mean(g xh)),   dw += dy xh,   db += dy
//   backward, padded row: dx = dy (or 0), and nothing is added to dw or db.
//
// These are spec/closed_forms.py's formulas with every position valid and P = V (k = nu = n, c = 0):
// dx is vjp_centered(g_j, p_j = m_j = 1, yhat_j = xh, sum_p_g = n mean(g), sum_p_g_yhat = n mean(g xh),
// k = nu = n, inv_s = rstd) (vjp_rms without the mean(g) term), dw is weight_grad, db is bias_grad.
//
// float16/bfloat16 rows are computed in float (at::opmath_type) and rounded once; mean and rstd are
// returned in that type. One pass over the memory each way: a padded row is only copied, so
// whatever it holds (NaN, Inf) never meets an arithmetic operation. Sums run in double, in blocks of
// kBlock terms (float64 input: error ~ (kBlock / lanes + n / kBlock) u). dw and db are summed per
// block of kRows rows into their own slot, then across slots: the result does not depend on the
// number of threads.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

namespace {

constexpr int64_t kBlock = 256;  // terms per partial sum
constexpr int64_t kRows = 128;   // rows per weight/bias-gradient slot

// sum_j term(j) for j in [0, n), in double. The terms capture their pointers by value: through a
// captured reference the loop would reload them and run about 3x slower.
template <typename Term>
double blocked_sum(int64_t n, Term term) {
  double total = 0;
  for (int64_t s = 0; s < n; s += kBlock) {
    const int64_t e = std::min(n, s + kBlock);
    double acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = s; j < e; ++j) acc += term(j);
    total += acc;
  }
  return total;
}

template <typename T>
void pass_through(const T* src, T* dst, int64_t n, bool zero) {
  if (zero) {
    std::fill(dst, dst + n, T(0));
  } else {
    std::copy(src, src + n, dst);
  }
}

template <typename T, typename A = at::opmath_type<T>>
void forward_rows(const T* x, const bool* valid, const T* w, const T* b, T* y, A* mean, A* rstd, int64_t rows,
                  int64_t n, double eps, bool center, bool zero) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / n), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const T* xr = x + i * n;
      T* yr = y + i * n;
      if (!valid[i]) {
        pass_through(xr, yr, n, zero);
        mean[i] = A(0);
        rstd[i] = A(0);
        continue;
      }
      const double mu = center ? blocked_sum(n, [xr](int64_t j) { return double(xr[j]); }) / double(n) : 0.0;
      const double ss = blocked_sum(n, [xr, mu](int64_t j) {
        const double d = double(xr[j]) - mu;
        return d * d;
      });
      const A m = A(mu), r = A(1.0 / std::sqrt(ss / double(n) + eps));
      mean[i] = m;
      rstd[i] = r;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) yr[j] = T((A(xr[j]) - m) * r * A(w[j]) + A(b[j]));
    }
  });
}

template <typename T, typename A = at::opmath_type<T>>
void backward_rows(const T* dy, const T* x, const bool* valid, const A* mean, const A* rstd, const T* w, T* dx,
                   double* slots, int64_t rows, int64_t n, bool center, bool zero) {
  const int64_t nslots = (rows + kRows - 1) / kRows;
  at::parallel_for(0, nslots, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t s = lo; s < hi; ++s) {
      double* dw = slots + s * 2 * n;
      double* db = dw + n;
      for (int64_t i = s * kRows; i < std::min(rows, (s + 1) * kRows); ++i) {
        const T* dyr = dy + i * n;
        const T* xr = x + i * n;
        T* dxr = dx + i * n;
        if (!valid[i]) {
          pass_through(dyr, dxr, n, zero);
          continue;
        }
        const A m = mean[i], r = rstd[i];
        const double sg = center ? blocked_sum(n, [dyr, w](int64_t j) { return double(A(dyr[j]) * A(w[j])); }) : 0.0;
        const double sgx = blocked_sum(n, [dyr, w, xr, m, r](int64_t j) {
          return double(A(dyr[j]) * A(w[j])) * double((A(xr[j]) - m) * r);
        });
        const A a = A(sg / double(n)), c = A(sgx / double(n));
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          const A xh = (A(xr[j]) - m) * r;
          dxr[j] = T(r * (A(dyr[j]) * A(w[j]) - a - xh * c));
          dw[j] += double(dyr[j]) * double(xh);
          db[j] += double(dyr[j]);
        }
      }
    }
  });
}

void check_rows(const at::Tensor& x, const at::Tensor& valid) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "x must be a 2-d CPU tensor (rows, n), got ", x.sizes());
  TORCH_CHECK(valid.dtype() == at::kBool && valid.dim() == 1 && valid.size(0) == x.size(0),
              "valid must be a bool vector with one flag per row of x, got ", valid.sizes());
}

// The affine parameter as a contiguous vector of n values of x's dtype; `fill` when absent.
at::Tensor affine(const c10::optional<at::Tensor>& t, const at::Tensor& x, double fill, const char* name) {
  if (!t) return at::full({x.size(1)}, fill, x.options());
  TORCH_CHECK(t->numel() == x.size(1) && t->dtype() == x.dtype(), name, " must have ", x.size(1),
              " elements of x's dtype, got ", t->sizes(), " ", t->dtype());
  return t->contiguous().view({-1});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_layer_norm(const at::Tensor& x_, const at::Tensor& valid_,
    const c10::optional<at::Tensor>& weight_, const c10::optional<at::Tensor>& bias_, double eps, bool center,
    bool zero) {
  check_rows(x_, valid_);
  const auto x = x_.contiguous(), valid = valid_.contiguous();
  const auto weight = affine(weight_, x, 1.0, "weight"), bias = affine(bias_, x, 0.0, "bias");
  const int64_t rows = x.size(0), n = x.size(1);
  auto y = at::empty_like(x);
  const auto stats = x.options().dtype(at::toOpMathType(x.scalar_type()));
  auto mean = at::empty({rows, 1}, stats);
  auto rstd = at::empty({rows, 1}, stats);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "token_layer_norm", [&] {
    using A = at::opmath_type<scalar_t>;
    forward_rows<scalar_t>(x.const_data_ptr<scalar_t>(), valid.const_data_ptr<bool>(),
                           weight.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(),
                           y.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<A>(),
                           rstd.mutable_data_ptr<A>(), rows, n, eps, center, zero);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_layer_norm_backward(const at::Tensor& dy_, const at::Tensor& x_,
    const at::Tensor& valid_, const at::Tensor& mean_, const at::Tensor& rstd_,
    const c10::optional<at::Tensor>& weight_, bool center, bool zero) {
  check_rows(x_, valid_);
  TORCH_CHECK(dy_.sizes() == x_.sizes() && dy_.dtype() == x_.dtype(), "dy must match x, got ", dy_.sizes());
  TORCH_CHECK(mean_.numel() == x_.size(0) && rstd_.numel() == x_.size(0), "mean and rstd need one value per row");
  TORCH_CHECK(mean_.scalar_type() == at::toOpMathType(x_.scalar_type()) && rstd_.scalar_type() == mean_.scalar_type(),
              "mean and rstd must be of x's computation type, got ", mean_.scalar_type(), " and ", rstd_.scalar_type());
  const auto dy = dy_.contiguous(), x = x_.contiguous(), valid = valid_.contiguous();
  const auto mean = mean_.contiguous(), rstd = rstd_.contiguous();
  const auto weight = affine(weight_, x, 1.0, "weight");
  const int64_t rows = x.size(0), n = x.size(1);
  auto dx = at::empty_like(x);
  auto slots = at::zeros({std::max<int64_t>(1, (rows + kRows - 1) / kRows), 2, n}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "token_layer_norm_backward", [&] {
    using A = at::opmath_type<scalar_t>;
    backward_rows<scalar_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                            valid.const_data_ptr<bool>(), mean.const_data_ptr<A>(),
                            rstd.const_data_ptr<A>(), weight.const_data_ptr<scalar_t>(),
                            dx.mutable_data_ptr<scalar_t>(), slots.mutable_data_ptr<double>(), rows, n, center, zero);
  });
  const auto sums = slots.sum(0).to(x.scalar_type());
  return {dx, sums[0], sums[1]};
}

}  // namespace

TORCH_LIBRARY(masknorm, m) {
  m.def("token_layer_norm(Tensor x, Tensor valid, Tensor? weight, Tensor? bias, float eps, bool center, bool zero)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("token_layer_norm_backward(Tensor dy, Tensor x, Tensor valid, Tensor mean, Tensor rstd, Tensor? weight,"
        " bool center, bool zero) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(masknorm, CPU, m) {
  m.impl("token_layer_norm", &token_layer_norm);
  m.impl("token_layer_norm_backward", &token_layer_norm_backward);
}
