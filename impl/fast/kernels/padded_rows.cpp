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
// kBlock terms (float64 input: error ~ (kBlock / lanes + n / kBlock) u); a narrower row's moments take one
// shifted pass where that is as exact (moments()). dw and db are summed per
// block of kRows rows into their own slot, then across slots in order: the result does not depend on the
// number of threads.
//
// padded_rows_norm and its backward are the eager fast path's one call: x of any shape normalized
// over its last ndims axes, the mask of x's rank (constant along them), a token mask of its leading
// axes or none (every row valid), weight and bias of the normalized shape or none. The forward also counts the valid rows where the
// fused arithmetic is not accurate (rstd outside [2^-40, 2^40], or kappa = |mu| rstd above 1/(4u)
// in the statistics' type; a NaN fails both): the caller redoes the call on the general path when
// there are any, so no extra pass over the statistics and no Python-level check are needed.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>
#include <tuple>

#include "autograd_node.h"
#include "blocked_sums.h"
#include "stores.h"

namespace {

constexpr int64_t kRows = 128;   // rows per weight/bias-gradient slot

using masknorm_kernels::blocked_sum;
using masknorm_kernels::blocked_sums;
using masknorm_kernels::kBlock;
using masknorm_kernels::prefetch_row;
using masknorm_kernels::stored;

template <typename T>
void pass_through(const T* src, T* dst, int64_t n, bool zero) {
  if (zero) {
    std::fill(dst, dst + n, T(0));
  } else {
    std::copy(src, src + n, dst);
  }
}

// True where the fused statistics of a valid row are accurate (fast.padded_rows._inaccurate's test).
template <typename A>
bool accurate(A m, A r) {
  const A low = A(std::ldexp(1.0, -40)), high = A(std::ldexp(1.0, 40));
  const A kappa = A(0.5) / std::numeric_limits<A>::epsilon();
  return r >= low && r <= high && std::abs(m) * r <= kappa;
}

// (x_j - m)^2 in double as a blocked_sum term
template <typename T>
auto squared_deviation(const T* xr, double m) {
  return [xr, m](int64_t j) {
    const double d = double(xr[j]) - m;
    return d * d;
  };
}

// Row xr's (mean, sum of squared deviations) in two passes: mu = (1/n) sum x (0 when !center), ss = sum (x - mu)^2.
template <typename T>
std::pair<double, double> two_pass_moments(const T* xr, int64_t n, bool center) {
  const double mu = center ? blocked_sum(0, n, [xr](int64_t j) { return double(xr[j]); }) / double(n) : 0.0;
  return {mu, blocked_sum(0, n, squared_deviation(xr, mu))};
}

// Row xr's (mean, sum of squared deviations). float32/float16/bfloat16 with center take one pass, shifted by the
// row's first value s (as masked_positions.cpp's group_moments):
//   S1 = sum (x - s),  S2 = sum (x - s)^2,  mu = s + S1/n,  ss = S2 - S1 (S1/n),
// kept where (kBlock + n/kBlock) S2 <= 2^20 ss: ss within about 2^-32 relative and mu within 2^-33 sigma, so a
// rounding to float32 that differs from two_pass_moments' lies within 2^-8 ulp of a tie. A row that fails (|mean|
// large against sigma, a non-finite value: NaN fails) takes two_pass_moments. A constant row gives mu = s, ss = 0.
template <typename T>
std::pair<double, double> moments(const T* xr, int64_t n, bool center) {
  if (std::is_same_v<T, double> || !center) return two_pass_moments(xr, n, center);
  const double s = double(xr[0]);
  const auto [S1, S2] = blocked_sums(0, n, [xr, s](int64_t j) { return double(xr[j]) - s; }, squared_deviation(xr, s));
  const double ss = S2 - S1 * (S1 / double(n));
  if ((double(kBlock) + double(n) / double(kBlock)) * S2 <= 0x1p20 * ss) return {s + S1 / double(n), ss};
  return two_pass_moments(xr, n, center);
}

// valid == nullptr: every row is valid. inaccurate (may be nullptr): 1 where a valid row's statistics fail
// accurate(), else 0. One row at a time, in order: its moments (one pass over x, from memory), then its output
// (x again, from the cache), while the next row is asked into the cache.
template <typename T, typename A = at::opmath_type<T>>
void forward_rows(const T* x, const bool* valid, const T* w, const T* b, T* y, A* mean, A* rstd, int64_t rows,
                  int64_t n, double eps, bool center, bool zero, uint8_t* inaccurate = nullptr) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / n), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const T* xr = x + i * n;
      T* yr = y + i * n;
      if (inaccurate) inaccurate[i] = 0;
      if (valid && !valid[i]) {
        pass_through(xr, yr, n, zero);
        mean[i] = A(0);
        rstd[i] = A(0);
        continue;
      }
      const auto [mu, ss] = moments(xr, n, center);
      const A m = A(mu), r = A(1.0 / std::sqrt(ss / double(n) + eps));
      mean[i] = m;
      rstd[i] = r;
      if (inaccurate) inaccurate[i] = !accurate(m, r);
      if (i + 1 < rows) prefetch_row(xr + n, n);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) yr[j] = stored<T>((A(xr[j]) - m) * r * A(w[j]) + A(b[j]));
    }
  });
}

// Valid rows one at a time, in order: the sums of g = dy w and g xh (xh = (x - mean) rstd; one pass over dy and
// x, from memory, while the row of dx is asked for), then dx = rstd (g - mean(g) - xh mean(g xh)) with dy xh and dy
// added to the slot's dw and db (while the next rows of dy and x are asked for).
template <typename T, typename A = at::opmath_type<T>>
void backward_rows(const T* dy, const T* x, const bool* valid, const A* mean, const A* rstd, const T* w, T* dx,
                   double* slots, int64_t rows, int64_t n, bool center, bool zero) {
  const int64_t nslots = (rows + kRows - 1) / kRows;
  const auto valid_row = [&](int64_t i, double* dw, double* db) {
    const T *dyr = dy + i * n, *xr = x + i * n;
    T* dxr = dx + i * n;
    const A m = mean[i], rs = rstd[i];
    prefetch_row<1>(dxr, n);
    const auto g = [dyr, w](int64_t j) { return double(A(dyr[j]) * A(w[j])); };
    const auto gxh = [dyr, w, xr, m, rs](int64_t j) { return double(A(dyr[j]) * A(w[j])) * double((A(xr[j]) - m) * rs); };
    const auto [sum_g, sum_gxh] = center ? blocked_sums(0, n, g, gxh) : std::pair<double, double>(0.0, blocked_sum(0, n, gxh));
    const A a = A(sum_g / double(n)), c = A(sum_gxh / double(n));
    if (i + 1 < rows) {
      prefetch_row(dyr + n, n);
      prefetch_row(xr + n, n);
    }
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const A xh = (A(xr[j]) - m) * rs;
      dxr[j] = stored<T>(rs * (A(dyr[j]) * A(w[j]) - a - xh * c));
      dw[j] += double(dyr[j]) * double(xh);
      db[j] += double(dyr[j]);
    }
  };
  at::parallel_for(0, nslots, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t s = lo; s < hi; ++s) {
      double* dw = slots + s * 2 * n;
      double* db = dw + n;
      for (int64_t i = s * kRows; i < std::min(rows, (s + 1) * kRows); ++i) {
        if (valid && !valid[i]) {
          pass_through(dy + i * n, dx + i * n, n, zero);
        } else {
          valid_row(i, dw, db);
        }
      }
    }
  });
}

// dw[j] = sum_s slots[s][0][j] and db[j] = sum_s slots[s][1][j], added in slot order in double, rounded once.
template <typename T>
void sum_slots(const double* slots, int64_t nslots, int64_t n, T* dw, T* db) {
  for (int64_t j = 0; j < 2 * n; ++j) {
    double total = 0;
    for (int64_t s = 0; s < nslots; ++s) total += slots[s * 2 * n + j];
    (j < n ? dw[j] : db[j - n]) = T(total);
  }
}

void check_rows(const at::Tensor& x, const at::Tensor& valid) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "x must be a 2-d CPU tensor (rows, n), got ", x.sizes());
  TORCH_CHECK(valid.dtype() == at::kBool && valid.dim() == 1 && valid.size(0) == x.size(0),
              "valid must be a bool vector with one flag per row of x, got ", valid.sizes());
}

// The affine parameter as a contiguous tensor of n values of x's dtype; `fill` when absent.
at::Tensor affine(const c10::optional<at::Tensor>& t, const at::Tensor& x, int64_t n, double fill, const char* name) {
  if (!t) return at::full({n}, fill, x.options());
  TORCH_CHECK(t->numel() == n && t->dtype() == x.dtype(), name, " must have ", n,
              " elements of x's dtype, got ", t->sizes(), " ", t->dtype());
  return t->contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rows_norm(const at::Tensor& x_, const at::Tensor& valid_,
    const c10::optional<at::Tensor>& weight_, const c10::optional<at::Tensor>& bias_, double eps, bool center,
    bool zero) {
  check_rows(x_, valid_);
  const auto x = x_.contiguous(), valid = valid_.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  const auto weight = affine(weight_, x, n, 1.0, "weight"), bias = affine(bias_, x, n, 0.0, "bias");
  auto y = at::empty_like(x);
  const auto stats = x.options().dtype(at::toOpMathType(x.scalar_type()));
  auto mean = at::empty({rows, 1}, stats);
  auto rstd = at::empty({rows, 1}, stats);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rows_norm", [&] {
    using A = at::opmath_type<scalar_t>;
    forward_rows<scalar_t>(x.const_data_ptr<scalar_t>(), valid.const_data_ptr<bool>(),
                           weight.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(),
                           y.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<A>(),
                           rstd.mutable_data_ptr<A>(), rows, n, eps, center, zero);
  });
  return {y, mean, rstd};
}

// dx (of x_'s shape), dw and db (of nshape) for x_ read as (rows, n) with one flag per row in `valid`
// (undefined: every row valid).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_call(const at::Tensor& dy_, const at::Tensor& x_,
    const at::Tensor& valid, const at::Tensor& mean_, const at::Tensor& rstd_,
    const c10::optional<at::Tensor>& weight_, int64_t rows, int64_t n, at::IntArrayRef nshape, bool center,
    bool zero) {
  TORCH_CHECK(dy_.sizes() == x_.sizes() && dy_.dtype() == x_.dtype(), "dy must match x, got ", dy_.sizes());
  TORCH_CHECK(mean_.numel() == rows && rstd_.numel() == rows, "mean and rstd need one value per row");
  TORCH_CHECK(mean_.scalar_type() == at::toOpMathType(x_.scalar_type()) && rstd_.scalar_type() == mean_.scalar_type(),
              "mean and rstd must be of x's computation type, got ", mean_.scalar_type(), " and ", rstd_.scalar_type());
  const auto dy = dy_.contiguous(), x = x_.contiguous();
  const auto mean = mean_.contiguous(), rstd = rstd_.contiguous();
  const auto weight = affine(weight_, x, n, 1.0, "weight");
  auto dx = at::empty_like(x_, at::MemoryFormat::Contiguous);
  auto dw = at::empty(nshape, x.options()), db = at::empty(nshape, x.options());
  const int64_t nslots = std::max<int64_t>(1, (rows + kRows - 1) / kRows);
  std::vector<double> slots(nslots * 2 * n, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rows_norm_backward", [&] {
    using A = at::opmath_type<scalar_t>;
    backward_rows<scalar_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                            valid.defined() ? valid.const_data_ptr<bool>() : nullptr, mean.const_data_ptr<A>(),
                            rstd.const_data_ptr<A>(), weight.const_data_ptr<scalar_t>(),
                            dx.mutable_data_ptr<scalar_t>(), slots.data(), rows, n, center, zero);
    sum_slots(slots.data(), nslots, n, dw.mutable_data_ptr<scalar_t>(), db.mutable_data_ptr<scalar_t>());
  });
  return {dx, dw, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rows_norm_backward(const at::Tensor& dy, const at::Tensor& x,
    const at::Tensor& valid, const at::Tensor& mean, const at::Tensor& rstd,
    const c10::optional<at::Tensor>& weight, bool center, bool zero) {
  check_rows(x, valid);
  return backward_call(dy, x, valid.contiguous(), mean, rstd, weight, x.size(0), x.size(1), {x.size(1)}, center, zero);
}

// The flag of each row of x (normalized over its last ndims axes) as a contiguous tensor of one flag
// per row (the mask itself where it is one already), from a mask of x's rank that is constant along
// those axes, or a token mask of x's leading axes (x.dim() - ndims of them) that broadcasts to them;
// undefined when there is no mask.
at::Tensor row_flags(const c10::optional<at::Tensor>& mask, const at::Tensor& x, int64_t ndims) {
  if (!mask) return {};
  const int64_t lead = x.dim() - ndims;
  TORCH_CHECK(mask->scalar_type() == at::kBool && (mask->dim() == x.dim() || mask->dim() == lead),
              "mask must be a bool tensor of x's rank ", x.dim(), " or of its ", lead, " leading axes, got ",
              mask->sizes(), " ", mask->scalar_type());
  std::vector<int64_t> rows(x.sizes().begin(), x.sizes().begin() + mask->dim());
  for (int64_t d = lead; d < mask->dim(); ++d) {
    TORCH_CHECK(mask->size(d) == 1, "mask of shape ", mask->sizes(), " varies along the normalized axes of x ",
                x.sizes());
    rows[d] = 1;
  }
  if (mask->sizes() == c10::IntArrayRef(rows) && mask->is_contiguous()) return *mask;
  return mask->expand(rows).contiguous();
}

// x's shape with its last ndims axes of size 1.
std::vector<int64_t> keepdim(const at::Tensor& x, int64_t ndims) {
  std::vector<int64_t> keep(x.sizes().begin(), x.sizes().end());
  for (int64_t d = x.dim() - ndims; d < x.dim(); ++d) keep[d] = 1;
  return keep;
}

void check_ndims(const at::Tensor& x, int64_t ndims) {
  TORCH_CHECK(x.device().is_cpu() && ndims >= 1 && ndims <= x.dim() && x.numel() > 0,
              "x must be a non-empty CPU tensor with at least ndims = ", ndims, " axes, got ", x.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> padded_rows_norm(const at::Tensor& x_,
    const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& weight_,
    const c10::optional<at::Tensor>& bias_, int64_t ndims, double eps, bool center, bool zero) {
  check_ndims(x_, ndims);
  const auto valid = row_flags(mask, x_, ndims);
  const auto keep = keepdim(x_, ndims);
  const int64_t rows = c10::multiply_integers(keep), n = x_.numel() / rows;
  const auto x = x_.contiguous();  // read as (rows, n)
  const auto weight = affine(weight_, x, n, 1.0, "weight"), bias = affine(bias_, x, n, 0.0, "bias");
  auto y = at::empty_like(x_, at::MemoryFormat::Contiguous);
  const auto stats = x.options().dtype(at::toOpMathType(x.scalar_type()));
  auto mean = at::empty(keep, stats);
  auto rstd = at::empty(keep, stats);
  std::vector<uint8_t> inaccurate(rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "padded_rows_norm", [&] {
    using A = at::opmath_type<scalar_t>;
    forward_rows<scalar_t>(x.const_data_ptr<scalar_t>(), valid.defined() ? valid.const_data_ptr<bool>() : nullptr,
                           weight.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(),
                           y.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<A>(), rstd.mutable_data_ptr<A>(),
                           rows, n, eps, center, zero, inaccurate.data());
  });
  auto count = at::empty({}, x.options().dtype(at::kLong));
  *count.mutable_data_ptr<int64_t>() = std::count(inaccurate.begin(), inaccurate.end(), uint8_t(1));
  return {y, mean, rstd, count};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> padded_rows_norm_backward(const at::Tensor& dy, const at::Tensor& x,
    const c10::optional<at::Tensor>& mask, const at::Tensor& mean, const at::Tensor& rstd,
    const c10::optional<at::Tensor>& weight, int64_t ndims, bool center, bool zero) {
  check_ndims(x, ndims);
  const int64_t rows = c10::multiply_integers(keepdim(x, ndims));
  return backward_call(dy, x, row_flags(mask, x, ndims), mean, rstd, weight, rows, x.numel() / rows,
                       x.sizes().slice(x.dim() - ndims), center, zero);
}

// padded_rows_norm as a dispatcher call (the kernel below autograd: CPU, or a fake or meta kernel).
const c10::TypedOperatorHandle<decltype(padded_rows_norm)>& forward_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("masknorm::padded_rows_norm", "")
      .typed<decltype(padded_rows_norm)>();
  return op;
}

// padded_rows_norm's autograd node, C++ as the ones torch generates for its own operators (no
// autograd.Function on the way, Python or C++). Its edges are x, weight and bias. Its backward is
// padded_rows_norm_backward, or, when the backward is itself recorded (double backward: grad mode on
// during backward), masknorm::padded_rows_general_backward, which masknorm.fast.padded_rows
// registers from Python as a CompositeImplicitAutograd operator (the general closed form in
// differentiable torch ops). mean, rstd and the count are not differentiable.
struct PaddedRowsNormBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable x, mask, weight, mean, rstd;
  int64_t ndims = 0;
  double eps = 0;
  bool center = true, zero = false, has_mask = false, has_weight = false, has_bias = false;

  std::string name() const override { return "PaddedRowsNormBackward"; }

  void release_variables() override {
    for (auto* v : {&x, &mask, &weight, &mean, &rstd}) v->reset_data();
  }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    const auto x_ = x.unpack(getptr());
    const c10::optional<at::Tensor> mask_ = has_mask ? c10::optional<at::Tensor>(mask.unpack()) : c10::nullopt;
    const c10::optional<at::Tensor> weight_ = has_weight ? c10::optional<at::Tensor>(weight.unpack()) : c10::nullopt;
    const auto dy = grads[0].defined() ? grads[0] : at::zeros_like(x_);
    at::Tensor dx, dw, db;
    if (at::GradMode::is_enabled()) {
      static auto general = c10::Dispatcher::singleton()
          .findSchemaOrThrow("masknorm::padded_rows_general_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
              const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, int64_t, double, bool, bool,
              bool)>();
      std::tie(dx, dw, db) = general.call(dy, x_, mask_, weight_, ndims, eps, center, zero, has_bias);
    } else {
      static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("masknorm::padded_rows_norm_backward", "")
          .typed<decltype(padded_rows_norm_backward)>();
      std::tie(dx, dw, db) = op.call(dy, x_, mask_, mean.unpack(), rstd.unpack(), weight_, ndims, center, zero);
    }
    return {should_compute_output(0) ? dx : at::Tensor(), should_compute_output(1) ? dw : at::Tensor(),
            should_compute_output(2) ? db : at::Tensor()};
  }
};

// padded_rows_norm's Autograd kernel: the call below autograd, and a PaddedRowsNormBackward node on y
// where x, weight or bias requires grad in grad mode. Forward-mode AD has no formula: a tangent is refused.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> padded_rows_norm_autograd(const at::Tensor& x,
    const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, int64_t ndims, double eps, bool center, bool zero) {
  return masknorm_kernels::record<PaddedRowsNormBackward>(
      "masknorm::padded_rows_norm", x, mask, weight, bias,
      [&] { return forward_op().call(x, mask, weight, bias, ndims, eps, center, zero); },
      [&](PaddedRowsNormBackward& node, const auto& out) {
        node.mean = torch::autograd::SavedVariable(std::get<1>(out), false);
        node.rstd = torch::autograd::SavedVariable(std::get<2>(out), false);
        node.ndims = ndims;
        node.eps = eps;
        node.center = center;
        node.zero = zero;
      });
}

}  // namespace

TORCH_LIBRARY(masknorm, m) {
  m.def("rows_norm(Tensor x, Tensor valid, Tensor? weight, Tensor? bias, float eps, bool center, bool zero)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("rows_norm_backward(Tensor dy, Tensor x, Tensor valid, Tensor mean, Tensor rstd, Tensor? weight,"
        " bool center, bool zero) -> (Tensor, Tensor, Tensor)");
  m.def("padded_rows_norm(Tensor x, Tensor? mask, Tensor? weight, Tensor? bias, int ndims, float eps, bool center,"
        " bool zero) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("padded_rows_norm_backward(Tensor dy, Tensor x, Tensor? mask, Tensor mean, Tensor rstd, Tensor? weight,"
        " int ndims, bool center, bool zero) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(masknorm, CPU, m) {
  m.impl("rows_norm", &rows_norm);
  m.impl("rows_norm_backward", &rows_norm_backward);
  m.impl("padded_rows_norm", &padded_rows_norm);
  m.impl("padded_rows_norm_backward", &padded_rows_norm_backward);
}

TORCH_LIBRARY_IMPL(masknorm, Autograd, m) {
  m.impl("padded_rows_norm", &padded_rows_norm_autograd);
}
