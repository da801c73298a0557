// Masked batch norm in training mode on CPU: x (N, C, *S) reduced over every axis but 1, the mask of x's rank
// with size 1 on axis 1, or (N, *S) (the batch-norm modules' mask), or none (every position valid), per channel over
// its valid positions V (k = |V|):
//
//   mu = sum_V x / k,   M2 = sum_V (x - mu)^2,   var = M2 / nu (nu = k - correction),   inv_s = 1 / sqrt(var + eps)
//   out = (x - mu) inv_s gamma + beta at the normalized positions P (every position under "normalize", V under
//         "keep"/"zero"); x ("keep") or 0 ("zero") elsewhere; a channel with nu <= 0 passes x through (0 at
//         masked-out positions under "zero"): spec/CONTRACT.md's degenerate rule.
//
//   backward (yhat = (x - mu) inv_s, A = sum_P g, B = sum_P g yhat, a masked-out position with g = 0 left out):
//       gx = gamma inv_s (g [p in P] - m_p (A/k + B yhat_p / nu)),   grad gamma = B,   grad beta = A
//   spec/closed_forms.py's vjp_centered with gamma factored out of the sums (one gamma per channel); a passed-through
//   position's gradient is g ("keep", degenerate channels) or 0 ("zero").
//
// Sums and per-element arithmetic run in double; a sum adds blocks of kBlock terms (float64 input: error
// ~ (kBlock + k / kBlock) u), and each channel is summed by one thread, so the bits do not depend on the thread
// count. M2 is summed around the first mean and corrected (M2 = S2 - S1^2 / k, mu += S1 / k). A masked-out
// position is skipped by a branch, never multiplied by 0: whatever it holds (NaN, Inf) reaches no sum.
//
// The forward counts the channels it cannot do exactly (fast.per_channel._out_of_range's test in x's dtype, or a
// first mean off by more than sigma / 2^10): they hold placeholder statistics (shift 0, inv_s 1, var 1) and the
// caller redoes them on the general path. The backward counts the channels whose A or B is not finite (garbage
// under "normalize" with a nonzero gradient): the caller redoes the call on the Python path.
//
// per_channel_norm's Autograd kernel records a C++ node (PerChannelNormBackward) on the output: one dispatcher
// call each way, no autograd.Function. per_channel_track does a batch-norm module's running update in one call:
//
//   r <- (1 - f) r + f stat on the channels with k > 1 (the others keep r),  f = momentum, or 1/num_batches_tracked
//
// rounded as modules._running.update_running's torch ops round it (each product in r's dtype, then their sum).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "autograd_node.h"
#include "blocked_sums.h"

namespace {

using masknorm_kernels::kBlock;
using masknorm_kernels::make_node;
using masknorm_kernels::wants_grad;

enum class Masked { normalize, keep, zero };

Masked policy(c10::string_view masked) {
  if (masked == "normalize") return Masked::normalize;
  if (masked == "keep") return Masked::keep;
  TORCH_CHECK(masked == "zero", "masked must be normalize, keep or zero, got ", std::string(masked));
  return Masked::zero;
}

// The (N, C, S) view of a channel: x[n, c, s] at (n C + c) S + s, its mask flag at n S + s.
struct Layout {
  int64_t N, C, S;
};

// The sums of the K terms term(i) over the positions j = n S + s (x offset i = (n C + c) S + s) where use(j, i),
// in blocks of kBlock used positions, in double.
template <int K, typename Use, typename Term>
std::array<double, K> channel_sums(const Layout& l, int64_t c, Use use, Term term) {
  std::array<double, K> total{}, acc{};
  int64_t used = 0;
  for (int64_t n = 0; n < l.N; ++n) {
    const int64_t row = (n * l.C + c) * l.S;
    for (int64_t s = 0; s < l.S; ++s) {
      if (!use(n * l.S + s, row + s)) continue;
      const std::array<double, K> t = term(row + s);
      for (int q = 0; q < K; ++q) acc[q] += t[q];
      if (++used == kBlock) {
        for (int q = 0; q < K; ++q) total[q] += acc[q], acc[q] = 0;
        used = 0;
      }
    }
  }
  for (int q = 0; q < K; ++q) total[q] += acc[q];
  return total;
}

// fast.per_channel._out_of_range's test passed: the fused statistics are exact for this channel.
template <typename T>
bool in_range(double mu, double var64, double eps) {
  const T var = T(var64);
  const T max = std::numeric_limits<T>::max(), tiny = std::numeric_limits<T>::min();
  return std::isfinite(mu) && var < max / T(16) &&
         (var > tiny * T(std::ldexp(1.0, 64)) || double(var) <= eps * double(std::numeric_limits<T>::epsilon()));
}

// Channels per task: about 32768 positions.
int64_t grain(const Layout& l) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, l.N * l.S));
}

template <typename T>
void forward_channels(const T* x, const bool* m, const T* w, const T* b, T* out, T* mean, T* var_unbiased,
                      T* count, T* var, T* shift, T* inv_s, bool* redo, const Layout& l, double k, int64_t correction,
                      double eps, Masked masked) {
  const double nu = k - double(correction);
  at::parallel_for(0, l.C, grain(l), [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      auto valid = [m](int64_t j, int64_t) { return m == nullptr || m[j]; };
      const auto [sx] = channel_sums<1>(l, c, valid, [x](int64_t i) { return std::array<double, 1>{double(x[i])}; });
      const double mu1 = sx / k;
      const auto [s1, s2] = channel_sums<2>(l, c, valid, [x, mu1](int64_t i) {
        const double d = double(x[i]) - mu1;
        return std::array<double, 2>{d, d * d};
      });
      const double step = s1 / k, mu = mu1 + step;
      const double m2 = std::max(s2 - s1 * step, 0.0);
      mean[c] = T(mu);
      var_unbiased[c] = T(m2 / (k - 1));
      count[c] = T(k);
      const bool degenerate = nu <= 0;
      redo[c] = !degenerate && !(in_range<T>(mu, m2 / nu, eps) && !(step * step * std::ldexp(1.0, 20) > m2 / k));
      const bool normalize = !degenerate && !redo[c];
      const double r = normalize ? 1 / std::sqrt(m2 / nu + eps) : 1.0;
      var[c] = normalize ? T(m2 / nu) : T(1);
      shift[c] = normalize ? T(mu) : T(0);
      inv_s[c] = T(r);
      const double scale = r * (w ? double(w[c]) : 1.0), beta = b ? double(b[c]) : 0.0;
      for (int64_t n = 0; n < l.N; ++n) {
        const int64_t row = (n * l.C + c) * l.S;
        for (int64_t s = 0; s < l.S; ++s) {
          const bool v = m == nullptr || m[n * l.S + s];
          const int64_t i = row + s;
          if (normalize && (v || masked == Masked::normalize)) {
            out[i] = T((double(x[i]) - mu) * scale + beta);
          } else {
            out[i] = (masked == Masked::zero && !v) ? T(0) : x[i];
          }
        }
      }
    }
  });
}

template <typename T>
void backward_channels(const T* g, const T* x, const bool* m, const T* w, const T* shift, const T* inv_s,
                       const bool* skip, T* gx, T* gw, T* gb, uint8_t* bad, const Layout& l, double k,
                       int64_t correction, Masked masked) {
  const double nu = k - double(correction);
  at::parallel_for(0, l.C, grain(l), [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      bad[c] = 0;
      const bool degenerate = nu <= 0, skipped = skip != nullptr && skip[c];
      if (degenerate || skipped) {  // passed through, or the caller's (redone channels: placeholders 0)
        gw[c] = gb[c] = T(0);
        for (int64_t n = 0; n < l.N; ++n) {
          const int64_t row = (n * l.C + c) * l.S;
          for (int64_t s = 0; s < l.S; ++s) {
            const bool v = m == nullptr || m[n * l.S + s];
            gx[row + s] = (skipped || (masked == Masked::zero && !v)) ? T(0) : g[row + s];
          }
        }
        continue;
      }
      const double mu = double(shift[c]), r = double(inv_s[c]);
      const double gamma_s = r * (w ? double(w[c]) : 1.0);
      auto used = [m, g, masked](int64_t j, int64_t i) {
        return m == nullptr || m[j] || (masked == Masked::normalize && g[i] != T(0));
      };
      const auto [A, B] = channel_sums<2>(l, c, used, [g, x, mu, r](int64_t i) {
        return std::array<double, 2>{double(g[i]), double(g[i]) * ((double(x[i]) - mu) * r)};
      });
      if (!std::isfinite(A) || !std::isfinite(B)) bad[c] = 1;
      gw[c] = T(B);
      gb[c] = T(A);
      const double a = A / k, bn = B / nu;
      for (int64_t n = 0; n < l.N; ++n) {
        const int64_t row = (n * l.C + c) * l.S;
        for (int64_t s = 0; s < l.S; ++s) {
          const bool v = m == nullptr || m[n * l.S + s];
          const int64_t i = row + s;
          if (v) {
            gx[i] = T(gamma_s * (double(g[i]) - (a + bn * ((double(x[i]) - mu) * r))));
          } else if (masked == Masked::normalize) {
            gx[i] = T(gamma_s * double(g[i]));
          } else {
            gx[i] = masked == Masked::keep ? g[i] : T(0);
          }
        }
      }
    }
  });
}

// x (N, C, S) as a contiguous tensor, and its layout.
std::pair<at::Tensor, Layout> channels(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "x must be a float32 or float64 CPU tensor (N, C, *S), got ", x.sizes(), " ", x.scalar_type());
  const int64_t N = x.size(0), C = x.size(1);
  return {x.contiguous(), Layout{N, C, C == 0 || N == 0 ? 0 : x.numel() / (N * C)}};
}

// The mask as a contiguous bool (N, S) (undefined when there is none) and the valid count k.
std::pair<at::Tensor, double> flags(const c10::optional<at::Tensor>& mask, const at::Tensor& x, const Layout& l) {
  if (!mask) return {at::Tensor(), double(l.N * l.S)};
  const bool plain = mask->dim() == x.dim() - 1;  // (N, *S): the batch-norm modules' mask, axis 1 inserted here
  TORCH_CHECK(mask->scalar_type() == at::kBool && (plain || (mask->dim() == x.dim() && mask->size(1) == 1)),
              "mask must be a bool tensor of x's rank with size 1 on axis 1, or of x's shape without axis 1, got ",
              mask->sizes(), " ", mask->scalar_type());
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[1] = 1;
  const auto m = (plain ? mask->unsqueeze(1) : *mask).expand(shape).contiguous();
  const bool* v = m.const_data_ptr<bool>();
  return {m, double(std::count(v, v + m.numel(), true))};
}

// The per-channel parameter as a contiguous vector of C values of x's dtype, or undefined.
at::Tensor per_channel(const c10::optional<at::Tensor>& t, const at::Tensor& x, const char* name) {
  if (!t) return at::Tensor();
  TORCH_CHECK(t->numel() == x.size(1) && t->dtype() == x.dtype(), name, " must have ", x.size(1),
              " elements of x's dtype, got ", t->sizes(), " ", t->dtype());
  return t->contiguous().view({-1});
}

// x's shape with every axis but 1 of size 1.
std::vector<int64_t> keepdim(const at::Tensor& x) {
  std::vector<int64_t> keep(x.dim(), 1);
  keep[1] = x.size(1);
  return keep;
}

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
per_channel_norm(const at::Tensor& x_, const c10::optional<at::Tensor>& mask,
                 const c10::optional<at::Tensor>& weight_, const c10::optional<at::Tensor>& bias_,
                 int64_t correction, double eps, c10::string_view masked) {
  const auto [x, l] = channels(x_);
  const auto [m, k] = flags(mask, x, l);
  const auto weight = per_channel(weight_, x, "weight"), bias = per_channel(bias_, x, "bias");
  const auto keep = keepdim(x);
  auto out = at::empty_like(x);
  std::vector<at::Tensor> stats;
  for (int i = 0; i < 6; ++i) stats.push_back(at::empty(keep, x.options()));
  auto redo = at::empty(keep, x.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "per_channel_norm", [&] {
    forward_channels<scalar_t>(x.const_data_ptr<scalar_t>(), data_or_null<bool>(m), data_or_null<scalar_t>(weight),
                               data_or_null<scalar_t>(bias), out.mutable_data_ptr<scalar_t>(),
                               stats[0].mutable_data_ptr<scalar_t>(), stats[1].mutable_data_ptr<scalar_t>(),
                               stats[2].mutable_data_ptr<scalar_t>(), stats[3].mutable_data_ptr<scalar_t>(),
                               stats[4].mutable_data_ptr<scalar_t>(), stats[5].mutable_data_ptr<scalar_t>(),
                               redo.mutable_data_ptr<bool>(), l, k, correction, eps, policy(masked));
  });
  const bool* flagged = redo.const_data_ptr<bool>();
  const int64_t count = std::count(flagged, flagged + l.C, true);
  return {out, stats[0], stats[1], stats[2], stats[3], stats[4], stats[5], redo,
          at::scalar_tensor(count, x.options().dtype(at::kLong))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> per_channel_norm_backward(
    const at::Tensor& g_, const at::Tensor& x_, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& weight_, const at::Tensor& shift_, const at::Tensor& inv_s_,
    const c10::optional<at::Tensor>& skip_, int64_t correction, c10::string_view masked) {
  const auto [x, l] = channels(x_);
  TORCH_CHECK(g_.sizes() == x_.sizes() && g_.dtype() == x_.dtype(), "g must match x, got ", g_.sizes());
  TORCH_CHECK(shift_.numel() == l.C && inv_s_.numel() == l.C && shift_.dtype() == x.dtype() &&
                  inv_s_.dtype() == x.dtype(), "shift and inv_s need one value of x's dtype per channel");
  const auto [m, k] = flags(mask, x, l);
  const auto g = g_.contiguous(), shift = shift_.contiguous(), inv_s = inv_s_.contiguous();
  const auto weight = per_channel(weight_, x, "weight");
  at::Tensor skip;
  if (skip_) {
    TORCH_CHECK(skip_->scalar_type() == at::kBool && skip_->numel() == l.C, "skip needs one flag per channel");
    skip = skip_->contiguous();
  }
  auto gx = at::empty_like(x), gw = at::empty({l.C}, x.options()), gb = at::empty({l.C}, x.options());
  std::vector<uint8_t> bad(l.C);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "per_channel_norm_backward", [&] {
    backward_channels<scalar_t>(g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), data_or_null<bool>(m),
                                data_or_null<scalar_t>(weight), shift.const_data_ptr<scalar_t>(),
                                inv_s.const_data_ptr<scalar_t>(), data_or_null<bool>(skip),
                                gx.mutable_data_ptr<scalar_t>(), gw.mutable_data_ptr<scalar_t>(),
                                gb.mutable_data_ptr<scalar_t>(), bad.data(), l, k, correction, policy(masked));
  });
  int64_t count = 0;
  for (const uint8_t flag : bad) count += flag;
  return {gx, gw, gb, at::scalar_tensor(count, x.options().dtype(at::kLong))};
}

// per_channel_norm as a dispatcher call (the kernel below autograd: CPU, or a fake or meta kernel).
using ForwardFn = decltype(per_channel_norm);
const c10::TypedOperatorHandle<ForwardFn>& forward_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("masknorm::per_channel_norm", "")
      .typed<ForwardFn>();
  return op;
}

// True where t is a CPU tensor with data of its own (not fake, functional, batched or meta): its values can be read.
bool has_data(const at::Tensor& t) {
  const auto wrappers = c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize,
                                             c10::DispatchKey::FuncTorchBatched,
                                             c10::DispatchKey::FuncTorchGradWrapper});
  return t.device().is_cpu() && t.has_storage() && !t.key_set().has_any(wrappers);
}

// per_channel_norm's autograd node. Its edges are x, weight and bias; the statistics and flags are not
// differentiable. Its backward is per_channel_norm_backward, except where that cannot be the answer, where it is
// masknorm::per_channel_python_backward (fast.per_channel registers it from Python as a CompositeImplicitAutograd
// operator): its general closed form in differentiable torch ops when the backward is itself recorded (grad mode
// on: double backward), when the inputs have no data to check (traced), or when the forward flagged a channel
// (its output there is the caller's to redo); its torch-kernel path (fast.per_channel.fused_backward) when the
// kernel's sums are not finite.
struct PerChannelNormBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable x, mask, weight, var, shift, inv_s, flagged;
  std::vector<int64_t> weight_shape, bias_shape;
  int64_t correction = 0;
  double eps = 0;
  std::string masked;
  bool has_mask = false, has_weight = false, has_bias = false;

  std::string name() const override { return "PerChannelNormBackward"; }

  void release_variables() override {
    for (auto* v : {&x, &mask, &weight, &var, &shift, &inv_s, &flagged}) v->reset_data();
  }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    const auto x_ = x.unpack(getptr());
    const c10::optional<at::Tensor> mask_ = has_mask ? c10::optional<at::Tensor>(mask.unpack()) : c10::nullopt;
    const c10::optional<at::Tensor> weight_ = has_weight ? c10::optional<at::Tensor>(weight.unpack()) : c10::nullopt;
    const auto dy = grads[0].defined() ? grads[0] : at::zeros_like(x_);
    const auto shift_ = shift.unpack(), inv_s_ = inv_s.unpack();
    at::Tensor dx, dw, db;
    const bool general = at::GradMode::is_enabled() || !has_data(x_) || !has_data(dy) ||
                         *flagged.unpack().const_data_ptr<int64_t>() != 0;
    bool exact = !general;
    if (exact) {
      static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("masknorm::per_channel_norm_backward", "")
          .typed<decltype(per_channel_norm_backward)>();
      at::Tensor bad;
      at::AutoDispatchBelowADInplaceOrView guard;  // to the kernel, not through autograd's boxed fallback (~4 us)
      std::tie(dx, dw, db, bad) = op.call(dy, x_, mask_, weight_, shift_, inv_s_, c10::nullopt, correction, masked);
      exact = *bad.const_data_ptr<int64_t>() == 0;
    }
    if (!exact) {
      static auto python = c10::Dispatcher::singleton()
          .findSchemaOrThrow("masknorm::per_channel_python_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
              const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, int64_t, double, c10::string_view, bool, bool)>();
      std::tie(dx, dw, db) = python.call(dy, x_, mask_, weight_, var.unpack(), shift_, inv_s_, correction, eps, masked,
                                         has_bias, general);
    }
    return {should_compute_output(0) ? dx : at::Tensor(),
            should_compute_output(1) ? dw.reshape(weight_shape) : at::Tensor(),
            should_compute_output(2) ? db.reshape(bias_shape) : at::Tensor()};
  }
};

// per_channel_norm's Autograd kernel: the call below autograd, and a PerChannelNormBackward node on the output
// where x, weight or bias requires grad in grad mode. Forward-mode AD has no formula: a tangent is refused.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
per_channel_norm_autograd(const at::Tensor& x, const c10::optional<at::Tensor>& mask,
                          const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                          int64_t correction, double eps, c10::string_view masked) {
  using torch::autograd::isFwGradDefined;
  TORCH_CHECK(!isFwGradDefined(x) && !isFwGradDefined(weight) && !isFwGradDefined(bias),
              "masknorm::per_channel_norm has no forward-mode AD formula");
  auto out = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;  // below autograd, through the dispatcher (fake tensors too)
    return forward_op().call(x, mask, weight, bias, correction, eps, masked);
  }();
  if (at::GradMode::is_enabled() && (wants_grad(x) || wants_grad(weight) || wants_grad(bias))) {
    auto node = make_node<PerChannelNormBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(x, weight.value_or(at::Tensor()),
                                                             bias.value_or(at::Tensor())));
    node->x = torch::autograd::SavedVariable(x, false);
    node->mask = torch::autograd::SavedVariable(mask.value_or(at::Tensor()), false);
    node->weight = torch::autograd::SavedVariable(weight.value_or(at::Tensor()), false);
    node->var = torch::autograd::SavedVariable(std::get<4>(out), false);
    node->shift = torch::autograd::SavedVariable(std::get<5>(out), false);
    node->inv_s = torch::autograd::SavedVariable(std::get<6>(out), false);
    node->flagged = torch::autograd::SavedVariable(std::get<8>(out), false);
    node->has_mask = mask.has_value() && mask->defined();
    node->has_weight = weight.has_value() && weight->defined();
    node->has_bias = bias.has_value() && bias->defined();
    if (node->has_weight) node->weight_shape = weight->sizes().vec();
    if (node->has_bias) node->bias_shape = bias->sizes().vec();
    node->correction = correction;
    node->eps = eps;
    node->masked = std::string(masked);
    torch::autograd::set_history(std::get<0>(out), node);
  }
  return out;
}

// a r + b s rounded as two torch multiplications and an addition round it: each product, then the sum (volatile:
// the compiler may not fuse them into one multiply-add, whose single rounding gives other bits).
template <typename T>
T blend(T a, T r, T b, T s) {
  volatile T ar = a * r;
  volatile T bs = b * s;
  return ar + bs;
}

void per_channel_track(at::Tensor& running_mean, at::Tensor& running_var,
                       const c10::optional<at::Tensor>& num_batches_tracked, const at::Tensor& mean,
                       const at::Tensor& var, const at::Tensor& count, c10::optional<double> momentum) {
  const int64_t C = running_mean.numel();
  const std::initializer_list<const at::Tensor*> tensors = {&running_mean, &running_var, &mean, &var, &count};
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->numel() == C &&
                    t->scalar_type() == running_mean.scalar_type() &&
                    (running_mean.scalar_type() == at::kFloat || running_mean.scalar_type() == at::kDouble),
                "the running statistics and the batch's moments must be contiguous float32 or float64 CPU tensors of ",
                C, " values of one dtype, got ", t->sizes(), " ", t->scalar_type());
  }
  if (num_batches_tracked) {
    TORCH_CHECK(num_batches_tracked->device().is_cpu() && num_batches_tracked->numel() == 1 &&
                    num_batches_tracked->scalar_type() == at::kLong,
                "num_batches_tracked must be one int64 CPU value, got ", num_batches_tracked->sizes(), " ",
                num_batches_tracked->scalar_type());
  }
  AT_DISPATCH_FLOATING_TYPES(running_mean.scalar_type(), "per_channel_track", [&] {
    const scalar_t* k = count.const_data_ptr<scalar_t>();
    const bool counted = std::any_of(k, k + C, [](scalar_t v) { return v > scalar_t(1); });
    double factor = momentum ? *momentum : 0.0;
    if (num_batches_tracked) {
      int64_t& batches = *num_batches_tracked->mutable_data_ptr<int64_t>();
      batches += momentum ? 1 : int64_t(counted);
      if (!momentum) factor = 1.0 / double(std::max<int64_t>(batches, 1));
    }
    const scalar_t a = scalar_t(1 - factor), b = scalar_t(factor);
    for (auto [running, stat] : {std::pair{&running_mean, &mean}, std::pair{&running_var, &var}}) {
      scalar_t* r = running->mutable_data_ptr<scalar_t>();
      const scalar_t* s = stat->const_data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) {
        if (k[c] > scalar_t(1)) r[c] = blend(a, r[c], b, s[c]);
      }
    }
  });
}

// per_channel_track's ADInplaceOrView kernel: the update below it, then the mutated tensors' version counters
// bumped, as torch's in-place operators bump them (a graph that saved a running statistic then refuses to run
// its backward on the updated values).
void per_channel_track_inplace(at::Tensor& running_mean, at::Tensor& running_var,
                               const c10::optional<at::Tensor>& num_batches_tracked, const at::Tensor& mean,
                               const at::Tensor& var, const at::Tensor& count, c10::optional<double> momentum) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("masknorm::per_channel_track", "")
        .typed<decltype(per_channel_track)>();
    op.call(running_mean, running_var, num_batches_tracked, mean, var, count, momentum);
  }
  torch::autograd::impl::bump_version(running_mean);
  torch::autograd::impl::bump_version(running_var);
  if (num_batches_tracked) torch::autograd::impl::bump_version(*num_batches_tracked);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(masknorm, m) {
  m.def("per_channel_norm(Tensor x, Tensor? mask, Tensor? weight, Tensor? bias, int correction, float eps, str masked)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("per_channel_norm_backward(Tensor g, Tensor x, Tensor? mask, Tensor? weight, Tensor shift, Tensor inv_s,"
        " Tensor? skip, int correction, str masked) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("per_channel_track(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor(c!)? num_batches_tracked,"
        " Tensor mean, Tensor var, Tensor count, float? momentum) -> ()");
}

TORCH_LIBRARY_IMPL(masknorm, CPU, m) {
  m.impl("per_channel_norm", &per_channel_norm);
  m.impl("per_channel_norm_backward", &per_channel_norm_backward);
  m.impl("per_channel_track", &per_channel_track);
}

TORCH_LIBRARY_IMPL(masknorm, Autograd, m) {
  m.impl("per_channel_norm", &per_channel_norm_autograd);
}

TORCH_LIBRARY_IMPL(masknorm, ADInplaceOrView, m) {
  m.impl("per_channel_track", &per_channel_track_inplace);
}
