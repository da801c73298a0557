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
// Sums and per-element arithmetic run in double. A channel's sum adds its rows n = 0, ..., N - 1 in order, each
// row's S terms as blocked_sums.h's blocked_sum (blocks of kBlock terms added across SIMD lanes, then in order),
// the rows' sums in partial sums of at least kBlock terms (RowSum; float64 input: error ~ (kBlock + k / kBlock) u),
// and each channel is summed by one thread, so the bits do not depend on the thread count. Below float64, M2 and
// mu first take one pass shifted by the channel's value s at the first valid position: S1 = sum (x - s),
// S2 = sum (x - s)^2, mu = s + S1 / k, M2 = S2 - S1 (S1 / k); the sums' relative error below c u (c = 2 kBlock +
// 2 k / kBlock, RowSum's bound) puts M2 within about 2 c u S2 of its value, kept where c S2 <= 2^20 M2 (within
// 2^-32 relative, far below a float32 ulp). Otherwise, and for float64, M2 is summed around the first mean and
// corrected (M2 = S2 - S1^2 / k, mu += S1 / k). A masked-out position is read through a select (blocked_sums.h's
// pick: 0, the shift, or the mean where x is centered, in place of its value), never multiplied by 0: whatever it
// holds (NaN, Inf) reaches no sum, the bits are those of clean padding, and the loops vectorize.
//
// The forward counts the channels it cannot do exactly (fast.per_channel._out_of_range's test in x's dtype, or a
// first mean of the two passes off by more than sigma / 2^10): they hold placeholder statistics (shift 0, inv_s 1,
// var 1) and the caller redoes them on the general path. The backward counts the channels whose A or B is not finite (garbage
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
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "autograd_node.h"
#include "blocked_sums.h"

namespace {

using masknorm_kernels::as_bytes;
using masknorm_kernels::has_data;
using masknorm_kernels::blocked_sum;
using masknorm_kernels::blocked_sums;
using masknorm_kernels::kBlock;
using masknorm_kernels::pick;

enum class Masked { normalize, keep, zero };

Masked policy(c10::string_view masked) {
  if (masked == "normalize") return Masked::normalize;
  if (masked == "keep") return Masked::keep;
  TORCH_CHECK(masked == "zero", "masked must be normalize, keep or zero, got ", std::string(masked));
  return Masked::zero;
}

// The (N, C, S) view of a channel: x[n, c, s] at (n C + c) S + s, its mask flag at n M + s (M = S, or 0 with no
// mask: one row of ones).
struct Layout {
  int64_t N, C, S, M;
};

// fn(c, i, v) for the channels c in [lo, hi) and their rows n = 0, ..., N - 1, n outer and c inner, so that the
// rows are read in memory order: i the offset of x[n, c, 0], v its mask row (bytes). Each channel's rows come in
// the order n = 0, ..., N - 1 whatever [lo, hi) is, so a sum over them has the same bits for any range.
template <typename Fn>
void each_row(const Layout& l, const uint8_t* m, int64_t lo, int64_t hi, Fn fn) {
  for (int64_t n = 0; n < l.N; ++n)
    for (int64_t c = lo; c < hi; ++c) fn(c, (n * l.C + c) * l.S, m + n * l.M);
}

// A channel's sum over its rows: each row's sum (blocked_sum's) added to a partial sum, which joins the total once
// it holds kBlock terms or more, so the error does not grow with N: ~ (kBlock / lanes + kBlock + S / kBlock +
// k / kBlock) u, at most (2 kBlock + 2 k / kBlock) u.
struct RowSum {
  double total = 0, partial = 0;
  int64_t terms = 0;

  void add(double row, int64_t n) {
    partial += row;
    terms += n;
    if (terms >= kBlock) total += partial, partial = 0, terms = 0;
  }
  double sum() const { return total + partial; }
};

// o[j] = valid(j, true) where v[j], else other(j), for j < n: both computed, then a select (valid reads its inputs
// through the flag, as pick does), so the loop vectorizes.
template <typename T, typename Valid, typename Other>
void write_row(T* o, const uint8_t* v, int64_t n, Valid valid, Other other) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const bool u = v[j];
    const T a = valid(j, u), b = other(j);
    o[j] = u ? a : b;
  }
}

// A passed-through row: src everywhere, except 0 at masked-out positions under "zero".
template <typename T>
void pass_row(const T* src, T* o, const uint8_t* v, int64_t n, bool zero) {
  if (zero) {
    write_row(o, v, n, [src](int64_t j, bool u) { return pick(src, j, u, T(0)); }, [](int64_t) { return T(0); });
  } else {
    std::copy(src, src + n, o);
  }
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

// fn(lo, hi) for the chunks of [lo, hi) that one pass after another reads: about 2^16 positions (the chunk stays in
// cache for the next pass), and rows of at least 1 KiB across the chunk's channels (short rows are not read one
// channel at a time, a cache line or a page each).
template <typename T, typename Fn>
void each_chunk(const Layout& l, int64_t lo, int64_t hi, Fn fn) {
  const int64_t per_row = int64_t(1024 / sizeof(T)) / std::max<int64_t>(1, l.S);
  const int64_t width = std::max<int64_t>({1, (int64_t(1) << 16) / std::max<int64_t>(1, l.N * l.S), per_row});
  for (int64_t c = lo; c < hi; c += width) fn(c, std::min(hi, c + width));
}

// The offset n0 C S + j0 of channel 0's value at the first valid position (n0, j0), or -1 where there is none (the
// mask is the same for every channel: channel c's value there is at that offset + c S).
int64_t first_valid(const Layout& l, const uint8_t* m) {
  for (int64_t n = 0; n < l.N; ++n) {
    const uint8_t* v = m + n * l.M;
    const uint8_t* f = std::find(v, v + l.S, uint8_t(1));
    if (f != v + l.S) return n * l.C * l.S + (f - v);
  }
  return -1;
}

template <typename T>
void forward_channels(const T* x, const uint8_t* m, const T* w, const T* b, T* out, T* mean, T* var_unbiased,
                      T* count, T* var, T* shift, T* inv_s, bool* redo, const Layout& l, double k, int64_t correction,
                      double eps, Masked masked) {
  const double nu = k - double(correction);
  const bool zero = masked == Masked::zero;
  const double sum_error = 2.0 * double(kBlock) + 2.0 * k / double(kBlock);  // RowSum's bound, in units of u
  const int64_t first = first_valid(l, m);
  at::parallel_for(0, l.C, grain(l), [&](int64_t begin, int64_t end) {
    each_chunk<T>(l, begin, end, [&](int64_t lo, int64_t hi) {
      // per channel of the chunk: the sums, then (mu, scale, beta) of out = (x - mu) scale + beta, and whether
      // the channel is normalized
      std::vector<RowSum> sx(hi - lo), s1(hi - lo), s2(hi - lo);
      std::vector<double> mu1(hi - lo), mu(hi - lo), scale(hi - lo), beta(hi - lo);
      std::vector<uint8_t> normalize(hi - lo), shifted(hi - lo);
      // Narrower than float64: one pass about the channel's value s at the first valid position, kept where exact
      // enough (mu1 = s, S1 and S2 summed about it).
      if (!std::is_same_v<T, double> && first >= 0) {
        for (int64_t c = lo; c < hi; ++c) mu1[c - lo] = double(x[first + c * l.S]);
        each_row(l, m, lo, hi, [&](int64_t c, int64_t i, const uint8_t* v) {
          auto d = [xr = x + i, v, s = mu1[c - lo]](int64_t j) { return pick(xr, j, v[j], s) - s; };
          const auto [t1, t2] = blocked_sums(0, l.S, d, [d](int64_t j) { return d(j) * d(j); });
          s1[c - lo].add(t1, l.S);
          s2[c - lo].add(t2, l.S);
        });
        for (int64_t q = 0; q < hi - lo; ++q) {
          const double t1 = s1[q].sum(), t2 = s2[q].sum();
          shifted[q] = sum_error * t2 <= 0x1p20 * (t2 - t1 * (t1 / k));
          if (!shifted[q]) s1[q] = RowSum(), s2[q] = RowSum();
        }
      }
      // The others: the mean, then the squares about it (the mean corrected by their sum, flagged where it moved
      // by more than sigma / 2^10).
      const bool all_shifted = std::all_of(shifted.begin(), shifted.end(), [](uint8_t f) { return f != 0; });
      if (!all_shifted) {
        each_row(l, m, lo, hi, [&](int64_t c, int64_t i, const uint8_t* v) {
          if (shifted[c - lo]) return;
          sx[c - lo].add(blocked_sum(0, l.S, [xr = x + i, v](int64_t j) { return pick(xr, j, v[j], 0.0); }), l.S);
        });
        for (int64_t q = 0; q < hi - lo; ++q) {
          if (!shifted[q]) mu1[q] = sx[q].sum() / k;
        }
        each_row(l, m, lo, hi, [&](int64_t c, int64_t i, const uint8_t* v) {
          if (shifted[c - lo]) return;
          auto d = [xr = x + i, v, mu = mu1[c - lo]](int64_t j) { return pick(xr, j, v[j], mu) - mu; };
          const auto [t1, t2] = blocked_sums(0, l.S, d, [d](int64_t j) { return d(j) * d(j); });
          s1[c - lo].add(t1, l.S);
          s2[c - lo].add(t2, l.S);
        });
      }
      for (int64_t c = lo; c < hi; ++c) {
        const int64_t q = c - lo;
        const double step = s1[q].sum() / k;
        mu[q] = mu1[q] + step;
        const double m2 = std::max(s2[q].sum() - s1[q].sum() * step, 0.0);
        mean[c] = T(mu[q]);
        var_unbiased[c] = T(m2 / (k - 1));
        count[c] = T(k);
        const bool degenerate = nu <= 0;
        const bool off = !shifted[q] && step * step * std::ldexp(1.0, 20) > m2 / k;
        redo[c] = !degenerate && !(in_range<T>(mu[q], m2 / nu, eps) && !off);
        normalize[q] = !degenerate && !redo[c];
        const double r = normalize[q] ? 1 / std::sqrt(m2 / nu + eps) : 1.0;
        var[c] = normalize[q] ? T(m2 / nu) : T(1);
        shift[c] = normalize[q] ? T(mu[q]) : T(0);
        inv_s[c] = T(r);
        scale[q] = r * (w ? double(w[c]) : 1.0);
        beta[q] = b ? double(b[c]) : 0.0;
      }
      each_row(l, m, lo, hi, [&](int64_t c, int64_t i, const uint8_t* v) {
        const int64_t q = c - lo;
        const T* xr = x + i;
        T* o = out + i;
        auto normalized = [xr, mu = mu[q], scale = scale[q], beta = beta[q]](int64_t j, bool u) {
          return T((pick(xr, j, u, mu) - mu) * scale + beta);
        };
        if (!normalize[q]) {
          pass_row(xr, o, v, l.S, zero);
        } else if (masked == Masked::normalize) {
#pragma omp simd
          for (int64_t j = 0; j < l.S; ++j) o[j] = normalized(j, true);
        } else if (zero) {
          write_row(o, v, l.S, normalized, [](int64_t) { return T(0); });
        } else {
          write_row(o, v, l.S, normalized, [xr](int64_t j) { return xr[j]; });
        }
      });
    });
  });
}

template <typename T>
void backward_channels(const T* g, const T* x, const uint8_t* m, const T* w, const T* shift, const T* inv_s,
                       const bool* skip, T* gx, T* gw, T* gb, uint8_t* bad, const Layout& l, double k,
                       int64_t correction, Masked masked) {
  const double nu = k - double(correction);
  const bool all = masked == Masked::normalize, keep = masked == Masked::keep, degenerate = nu <= 0;
  at::parallel_for(0, l.C, grain(l), [&](int64_t begin, int64_t end) {
    each_chunk<T>(l, begin, end, [&](int64_t lo, int64_t hi) {
      std::vector<RowSum> A(hi - lo), B(hi - lo);
      // passed through (degenerate), or the caller's (redone channels: placeholders 0)
      auto passed = [&](int64_t c) { return degenerate || (skip != nullptr && skip[c]); };
      each_row(l, m, lo, hi, [&](int64_t c, int64_t i, const uint8_t* v) {
        if (passed(c)) return;
        const double mu = double(shift[c]), r = double(inv_s[c]);
        // a masked-out position is used where its gradient is nonzero under "normalize"
        auto used = [gr = g + i, v, all](int64_t j) { return bool(v[j] | (all & (gr[j] != T(0)))); };
        auto ga = [gr = g + i, used](int64_t j) { return pick(gr, j, used(j), 0.0); };
        const auto [ta, tb] = blocked_sums(0, l.S, ga, [ga, used, xr = x + i, mu, r](int64_t j) {
          return ga(j) * ((pick(xr, j, used(j), mu) - mu) * r);
        });
        A[c - lo].add(ta, l.S);
        B[c - lo].add(tb, l.S);
      });
      for (int64_t c = lo; c < hi; ++c) {
        const int64_t q = c - lo;
        bad[c] = !std::isfinite(A[q].sum()) || !std::isfinite(B[q].sum());
        gw[c] = T(B[q].sum());
        gb[c] = T(A[q].sum());
      }
      each_row(l, m, lo, hi, [&](int64_t c, int64_t i, const uint8_t* v) {
        const T* gr = g + i;
        const T* xr = x + i;
        T* o = gx + i;
        if (passed(c)) {
          if (skip != nullptr && skip[c]) {
            std::fill(o, o + l.S, T(0));
          } else {
            pass_row(gr, o, v, l.S, masked == Masked::zero);
          }
          return;
        }
        const double mu = double(shift[c]), r = double(inv_s[c]);
        const double gamma_s = r * (w ? double(w[c]) : 1.0), a = A[c - lo].sum() / k, bn = B[c - lo].sum() / nu;
        auto valid = [gr, xr, gamma_s, a, bn, mu, r](int64_t j, bool u) {
          return T(gamma_s * (pick(gr, j, u, 0.0) - (a + bn * ((pick(xr, j, u, mu) - mu) * r))));
        };
        if (all) {
          write_row(o, v, l.S, valid, [gr, gamma_s](int64_t j) { return T(gamma_s * double(gr[j])); });
        } else if (keep) {
          write_row(o, v, l.S, valid, [gr](int64_t j) { return gr[j]; });
        } else {
          write_row(o, v, l.S, valid, [](int64_t) { return T(0); });
        }
      });
    });
  });
}

// x (N, C, S) as a contiguous tensor, and its layout.
std::pair<at::Tensor, Layout> channels(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "x must be a float32 or float64 CPU tensor (N, C, *S), got ", x.sizes(), " ", x.scalar_type());
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t S = C == 0 || N == 0 ? 0 : x.numel() / (N * C);
  return {x.contiguous(), Layout{N, C, S, S}};
}

// The mask as a contiguous bool (N, S), or one row of S ones when there is none (l.M set to 0: every row reads
// it), and the valid count k.
std::pair<at::Tensor, double> flags(const c10::optional<at::Tensor>& mask, const at::Tensor& x, Layout& l) {
  if (!mask) {
    l.M = 0;
    return {at::ones({l.S}, x.options().dtype(at::kBool)), double(l.N * l.S)};
  }
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
  auto [x, l] = channels(x_);
  const auto [m, k] = flags(mask, x, l);
  const auto weight = per_channel(weight_, x, "weight"), bias = per_channel(bias_, x, "bias");
  const auto keep = keepdim(x);
  auto out = at::empty_like(x);
  std::vector<at::Tensor> stats;
  for (int i = 0; i < 6; ++i) stats.push_back(at::empty(keep, x.options()));
  auto redo = at::empty(keep, x.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "per_channel_norm", [&] {
    forward_channels<scalar_t>(x.const_data_ptr<scalar_t>(), as_bytes(m.const_data_ptr<bool>()),
                               data_or_null<scalar_t>(weight),
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
  auto [x, l] = channels(x_);
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
    backward_channels<scalar_t>(g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                as_bytes(m.const_data_ptr<bool>()),
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
  return masknorm_kernels::record<PerChannelNormBackward>(
      "masknorm::per_channel_norm", x, mask, weight, bias,
      [&] { return forward_op().call(x, mask, weight, bias, correction, eps, masked); },
      [&](PerChannelNormBackward& node, const auto& out) {
        node.var = torch::autograd::SavedVariable(std::get<4>(out), false);
        node.shift = torch::autograd::SavedVariable(std::get<5>(out), false);
        node.inv_s = torch::autograd::SavedVariable(std::get<6>(out), false);
        node.flagged = torch::autograd::SavedVariable(std::get<8>(out), false);
        if (node.has_weight) node.weight_shape = weight->sizes().vec();
        if (node.has_bias) node.bias_shape = bias->sizes().vec();
        node.correction = correction;
        node.eps = eps;
        node.masked = std::string(masked);
      });
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
