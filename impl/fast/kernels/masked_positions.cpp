// Masked group norm on CPU: groups x positions with one validity flag per (sample, position).
//
// x is a contiguous (B, G, Cg, L) tensor: group (b, g) holds Cg channels of L positions, and
// position l of sample b is valid where mask[b, l]. With k = Cg * |{l : mask[b, l]}|, nu = k - c:
//
//   mu = (1/k) sum_V x  (0 when !center),   rstd = 1 / sqrt((1/nu) sum_V (x - mu)^2 + eps)
//   y = ((x - mu) rstd) w_ch + b_ch   on P: every position ("normalize") or the valid ones;
//   elsewhere y = x ("keep") or 0 ("zero").
//
//   backward (xh = (x - mu) rstd, P_used = P minus the masked-out positions whose dy is 0):
//       A_ch = sum_{P_used} dy,   B_ch = sum_{P_used} dy xh        (per channel: dbias, dweight)
//       dx = rstd (dy w_ch - [valid] (sum_ch w A)/k - [valid] xh (sum_ch w B)/nu)   on P
//       dx = dy ("keep") or 0 ("zero") elsewhere
//   That is spec/closed_forms.py's vjp_centered(g_j = dy w_ch, p_j, m_j = [valid], yhat_j = xh,
//   sum_p_g = sum_ch w A, sum_p_g_yhat = sum_ch w B, k, nu, inv_s = rstd) (vjp_rms when !center);
//   A and B are bias_grad and weight_grad summed per channel.
//
// Group states: 0 fused; 1 degenerate (nu <= 0): passed through, out = x (0 at masked-out
// positions under "zero"), adds nothing to dw/db; 2 redo: statistics outside the range where this
// kernel is exact (a zero sum of squares, rstd outside [2^-40, 2^40], kappa ~ |mu| rstd above
// 1/(4u)); the caller recomputes those groups with the general path, so their output here is x.
//
// Valid positions are visited as runs [start, end) of each sample's mask row, so a masked-out value
// is never read by an arithmetic operation under "keep" and "zero" (and under "normalize" only by
// its own output and, where its dy is nonzero, the sums). Sums run in double, in blocks of kBlock
// terms (below float64 the forward's mean and sum of squares take one shifted pass where that is
// exact enough: group_moments); each group is done by one thread and dw/db are added over samples
// in a fixed order (per block of kSamples samples, then across blocks), so the bits do not depend
// on the number of threads.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "blocked_sums.h"
#include "stores.h"

namespace {

using masknorm_kernels::as_bytes;
using masknorm_kernels::blocked_sum;
using masknorm_kernels::kBlock;
using masknorm_kernels::kMomentBlock;
using masknorm_kernels::pick;
using masknorm_kernels::prefetch_row;
using masknorm_kernels::stored;

constexpr int64_t kSamples = 64;  // samples per weight/bias-gradient slot
enum Policy : int64_t { kNormalize = 0, kKeep = 1, kZero = 2 };
enum State : int8_t { kFused = 0, kDegenerate = 1, kRedo = 2 };

using Runs = std::vector<std::pair<int64_t, int64_t>>;

// The runs of valid positions of each mask row, and each row's count of valid positions.
std::vector<Runs> valid_runs(const bool* mask, int64_t B, int64_t L, std::vector<int64_t>& counts) {
  std::vector<Runs> runs(B);
  counts.assign(B, 0);
  for (int64_t b = 0; b < B; ++b) {
    const bool* m = mask + b * L;
    for (int64_t l = 0; l < L;) {
      if (!m[l]) { ++l; continue; }
      const int64_t s = l;
      while (l < L && m[l]) ++l;
      runs[b].emplace_back(s, l);
      counts[b] += l - s;
    }
  }
  return runs;
}

// (sum t1(j), sum t2(j)) added to (*s1, *s2), block by block as blocked_sums.h's blocked_sums: a block
// whose t2 sum is not finite is summed again with wide(j): t2 with its xh formed by finite_xh, equal to
// t2(j) where t2(j) is finite (so the fast loop needs no per-term check).
template <typename T1, typename T2, typename Wide>
void blocked_sums(int64_t s, int64_t e, T1 t1, T2 t2, Wide wide, double* s1, double* s2) {
  for (int64_t a = s; a < e; a += kBlock) {
    const int64_t z = std::min(e, a + kBlock);
    auto [acc1, acc2] = masknorm_kernels::blocked_sums(a, z, t1, t2);
    if (!std::isfinite(acc2)) {
      acc2 = 0;
      for (int64_t j = a; j < z; ++j) acc2 += wide(j);
    }
    *s1 += acc1;
    *s2 += acc2;
  }
}

// fn(start, end, valid) over the runs of a row and the gaps between them, in order.
template <typename Fn>
void segments(const Runs& runs, int64_t L, Fn fn) {
  int64_t at = 0;
  for (const auto& run : runs) {
    if (run.first > at) fn(at, run.first, false);
    fn(run.first, run.second, true);
    at = run.second;
  }
  if (at < L) fn(at, L, false);
}

// One sample's mask row: visited as runs of valid positions, or, when its valid runs are short
// (scattered padding), whole, with each masked-out input replaced by a select before any
// arithmetic (`dense`).
struct Row {
  const Runs* runs;
  const uint8_t* m;  // the mask row read as bytes (0/1): a loop that loads bools does not vectorize
  int64_t L;
  bool dense;
};

// sum over the row's valid positions j of term(j, true); dense rows add term(j, m[j]) where
// m[j] (term must then read its inputs through the flag: a select, not arithmetic).
template <typename Term>
double valid_sum(const Row& row, Term term) {
  if (row.dense) {
    return blocked_sum(0, row.L, [term, m = row.m](int64_t j) {
      const bool v = m[j];
      const double t = term(j, v);
      return v ? t : 0.0;
    });
  }
  double total = 0;
  for (const auto& r : *row.runs) total += blocked_sum(r.first, r.second, [term](int64_t j) { return term(j, true); });
  return total;
}

// (sum d(j, true), sum d(j, true)^2) over the row's valid positions j, in blocks of kMomentBlock terms
// (blocked_sums); dense rows add d(j, m[j]) where m[j] (d must then read its inputs through the flag,
// as in valid_sum).
template <typename D>
std::pair<double, double> valid_moments(const Row& row, D d) {
  auto square = [](double t) { return t * t; };
  if (row.dense) {
    auto dv = [d, m = row.m](int64_t j) {
      const bool v = m[j];
      const double t = d(j, v);
      return v ? t : 0.0;
    };
    return masknorm_kernels::blocked_sums<kMomentBlock>(0, row.L, dv, [dv, square](int64_t j) { return square(dv(j)); });
  }
  double total1 = 0, total2 = 0;
  for (const auto& r : *row.runs) {
    const auto [a, b] = masknorm_kernels::blocked_sums<kMomentBlock>(
        r.first, r.second, [d](int64_t j) { return d(j, true); }, [d, square](int64_t j) { return square(d(j, true)); });
    total1 += a;
    total2 += b;
  }
  return {total1, total2};
}

// (sum t1(j), sum t2(j)) over the row's masked-out positions j, added to (*s1, *s2) (wide: as in
// blocked_sums).
template <typename T1, typename T2, typename Wide>
void gap_sums(const Row& row, T1 t1, T2 t2, Wide wide, double* s1, double* s2) {
  if (row.dense) {
    const uint8_t* m = row.m;
    blocked_sums(0, row.L, [t1, m](int64_t j) { const double t = t1(j); return m[j] ? 0.0 : t; },
                 [t2, m](int64_t j) { const double t = t2(j); return m[j] ? 0.0 : t; },
                 [wide, m](int64_t j) { const double t = wide(j); return m[j] ? 0.0 : t; }, s1, s2);
    return;
  }
  segments(*row.runs, row.L, [&](int64_t s, int64_t e, bool valid) {
    if (!valid) blocked_sums(s, e, t1, t2, wide, s1, s2);
  });
}

// out[j] = valid(j, true) at valid positions, other(j) at masked-out ones (valid reads its inputs
// through the flag, as in valid_sum).
template <typename T, typename Valid, typename Other>
void write_row(const Row& row, T* out, Valid valid, Other other) {
  if (row.dense) {
    const uint8_t* m = row.m;
#pragma omp simd
    for (int64_t j = 0; j < row.L; ++j) {
      const bool v = m[j];
      const T a = valid(j, v), o = other(j);
      out[j] = v ? a : o;
    }
    return;
  }
  segments(*row.runs, row.L, [&](int64_t s, int64_t e, bool is_valid) {
    if (is_valid) {
#pragma omp simd
      for (int64_t j = s; j < e; ++j) out[j] = valid(j, true);
    } else {
#pragma omp simd
      for (int64_t j = s; j < e; ++j) out[j] = other(j);
    }
  });
}

// (x_j - mu)^2 in double as a valid_sum term: a masked-out x_j is read through the flag.
template <typename T>
auto squared_deviation(const T* xr, double mu) {
  return [xr, mu](int64_t j, bool v) {
    const double d = pick(xr, j, v, mu) - mu;
    return d * d;
  };
}

// Under "normalize" a masked-out x_j far from its group has xh_j = (x_j - mu) rstd beyond acc_t's
// range where w_j xh_j + b_j (w_j = 0: b_j), the sums of dy xh and the gradients need not be: acc_t
// arithmetic gives inf there, and inf * 0 = NaN. Those values are formed in double instead, which
// holds xh of any float input (|xh| < 2^(129 + 40)) and its products with float factors; with
// float64 inputs acc_t is double already (no wider type: not repaired). Finite values keep their bits.
template <typename A>
double wide_xh(A x, A m, A r) {
  return (double(x) - double(m)) * double(r);
}

// xh = h where finite, else in double from x (see wide_xh): a select over both values (no branch), so a loop
// of these vectorizes.
template <typename A>
double finite_xh(A h, A x, A m, A r) {
  const double wide = wide_xh(x, m, r);
  return std::abs(h) <= std::numeric_limits<A>::max() ? double(h) : wide;
}

// Whether out[0, n) is all finite: one vectorized pass (the sum of out_j * 0 is NaN iff some out_j is not).
template <typename T>
bool all_finite(const T* out, int64_t n) {
  using acc_t = at::opmath_type<T>;
  acc_t probe = 0;
#pragma omp simd reduction(+ : probe)
  for (int64_t j = 0; j < n; ++j) probe += acc_t(out[j]) * acc_t(0);
  return probe == acc_t(0);
}

// Whether a group's outputs at its masked-out positions (the only ones repair_overflow mends) are all finite:
// all_finite over the gaps between the row's runs in each of its Cg channels where the row has at least
// kGapProbe masked-out positions (`gaps`), else over the whole group (dense rows, or few masked-out positions: a
// call per gap would cost more than the whole).
constexpr int64_t kGapProbe = 64;
template <typename T>
bool gaps_finite(const Row& row, int64_t gaps, const T* yg, int64_t Cg) {
  if (row.dense || gaps < kGapProbe) return all_finite(yg, Cg * row.L);
  bool finite = true;
  for (int64_t c = 0; c < Cg && finite; ++c)
    segments(*row.runs, row.L, [&](int64_t s, int64_t e, bool valid) {
      finite = finite && (valid || all_finite(yg + c * row.L + s, e - s));
    });
  return finite;
}

// A "normalize" row's outputs at masked-out positions that came out non-finite from a finite x,
// recomputed in double: out_j = affine(j, xh_j) with xh_j = (x_j - m) r (see wide_xh). The caller
// runs it where a probe (all_finite, gaps_finite) found a non-finite output, and probes only rows with
// masked-out positions (nothing else is repaired).
template <typename T, typename A, typename Affine>
void repair_overflow(const Row& row, T* out, const T* x, A m, A r, Affine affine) {
  using acc_t = at::opmath_type<T>;
  for (int64_t j = 0; j < row.L; ++j)
    if (!row.m[j] && !std::isfinite(double(out[j])) && std::isfinite(double(x[j])))
      out[j] = T(acc_t(affine(j, wide_xh(acc_t(x[j]), m, r))));
}

// A group's state from its statistics: degenerate (nu <= 0), fused, or redo (outside the exact range).
inline int8_t classify(double nu, double mu, double ss, double rs, double kappa_limit) {
  const bool exact = ss > 0 && rs >= 0x1p-40 && rs <= 0x1p40 && std::abs(mu) * rs <= kappa_limit;
  return nu <= 0 ? kDegenerate : (exact ? kFused : kRedo);
}

// out[j] = valid(j, true) at valid positions; at masked-out ones by the policy: masked(j)
// ("normalize"), src[j] ("keep") or 0 ("zero").
template <typename T, typename Valid, typename Masked>
void write_policy(const Row& row, T* out, const T* src, int64_t policy, Valid valid, Masked masked) {
  if (policy == kKeep) {
    write_row(row, out, valid, [src](int64_t j) { return src[j]; });
  } else if (policy == kZero) {
    write_row(row, out, valid, [](int64_t) { return T(0); });
  } else {
    write_row(row, out, valid, masked);
  }
}

// A normalized row: normalized(j, true) at every position under "normalize" (one loop), else as
// write_policy with x's values or 0 at the masked-out positions.
template <typename T, typename Norm>
void write_normalized(const Row& row, T* out, const T* x, int64_t policy, Norm normalized) {
  if (policy != kNormalize) {
    write_policy(row, out, x, policy, normalized, [](int64_t) { return T(0); });
    return;
  }
#pragma omp simd
  for (int64_t j = 0; j < row.L; ++j) out[j] = normalized(j, true);
}

// The mask rows: dense when the valid runs average fewer than kDenseRun positions.
constexpr int64_t kDenseRun = 16;
std::vector<Row> rows_of(const bool* mask, const std::vector<Runs>& runs, int64_t L) {
  std::vector<Row> rows;
  for (size_t b = 0; b < runs.size(); ++b)
    rows.push_back({&runs[b], as_bytes(mask) + b * L, L, int64_t(runs[b].size()) * kDenseRun > L});
  return rows;
}

// A passed-through row: src everywhere, except 0 at masked-out positions under "zero".
template <typename T>
void pass_row(const T* src, T* dst, const Row& row, bool zero) {
  if (!zero) {
    std::copy(src, src + row.L, dst);
    return;
  }
  write_row(row, dst, [src](int64_t j, bool v) { return pick(src, j, v, T(0)); }, [](int64_t) { return T(0); });
}

// The number of valid positions of a mask row read as bytes (0 or 1 each).
inline int64_t valid_count(const uint8_t* m, int64_t n) {
  int64_t count = 0;
  for (int64_t j = 0; j < n; ++j) count += m[j];
  return count;
}

// A group's mean mu (0 when !center) and sum of squared deviations ss over its valid values (k of
// them, k > 0; the row kernel's rows are groups with Cg = 1 and no runs), in double. Float64 inputs
// take two passes: mu, then the squares about it. Narrower inputs first take one, shifted by the
// group's first valid value s:
//   S1 = sum (x - s),  S2 = sum (x - s)^2,  mu = s + S1/k,  ss = S2 - S1 (S1/k).
// valid_moments' sums of k terms have relative errors below about c u (c = kMomentBlock + k/kMomentBlock,
// u = 2^-53), so ss is off by about 2 c u S2 = 2 c u F ss with F = S2/ss = 1 + k (mu - s)^2/ss, and mu by
// about c u sqrt(S2/k) = c u sqrt(F) sigma (sigma^2 = ss/k). These values are kept where c F <= 2^20: ss
// within about 2^-32 relative (under 2^-8 of a float32 ulp of rstd), mu within 2^-33 sigma (c <= 2^20);
// else the two passes run. A constant group has S1 = S2 = 0: ss = 0 exactly, as with two passes.
template <typename T>
std::pair<double, double> group_moments(const Row& row, const T* xg, int64_t Cg, double k, bool center) {
  const int64_t L = row.L;
  if (!std::is_same_v<T, double> && center) {
    const double s = double(xg[row.runs ? row.runs->front().first : std::find(row.m, row.m + L, 1) - row.m]);
    double s1 = 0, s2 = 0;
    for (int64_t c = 0; c < Cg; ++c) {
      const auto [a, b] = valid_moments(row, [xr = xg + c * L, s](int64_t j, bool v) { return pick(xr, j, v, s) - s; });
      s1 += a;
      s2 += b;
    }
    const double ss = s2 - s1 * (s1 / k);
    if ((double(kMomentBlock) + k / double(kMomentBlock)) * s2 <= 0x1p20 * ss) return {s + s1 / k, ss};
  }
  double mu = 0, ss = 0;
  if (center) {
    for (int64_t c = 0; c < Cg; ++c)
      mu += valid_sum(row, [xr = xg + c * L](int64_t j, bool v) { return pick(xr, j, v, 0.0); });
    mu /= k;
  }
  for (int64_t c = 0; c < Cg; ++c) ss += valid_sum(row, squared_deviation(xg + c * L, mu));
  return {mu, ss};
}

template <typename T>
void forward_groups(const T* x, const bool* mask, const at::opmath_type<T>* w, const at::opmath_type<T>* bias, T* y,
                    at::opmath_type<T>* mean, at::opmath_type<T>* rstd, int8_t* state, int64_t B, int64_t G,
                    int64_t Cg, int64_t L, int64_t correction, double eps, bool center, int64_t policy) {
  using acc_t = at::opmath_type<T>;
  std::vector<int64_t> counts;
  const auto runs = valid_runs(mask, B, L, counts);
  const auto rows = rows_of(mask, runs, L);
  const double kappa_limit = 0.5 / std::numeric_limits<acc_t>::epsilon();
  at::parallel_for(0, B * G, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, Cg * L)), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t b = i / G, g = i % G;
      const Row& row = rows[b];
      const T* xg = x + i * Cg * L;
      T* yg = y + i * Cg * L;
      const double k = double(counts[b] * Cg), nu = k - double(correction);
      const auto [mu, ss] = nu > 0 ? group_moments(row, xg, Cg, k, center) : std::pair<double, double>(0.0, 0.0);
      const double rs = 1.0 / std::sqrt(ss / nu + eps);
      state[i] = classify(nu, mu, ss, rs, kappa_limit);
      if (state[i] != kFused) {
        mean[i] = acc_t(0);
        rstd[i] = acc_t(0);
        for (int64_t c = 0; c < Cg; ++c) pass_row(xg + c * L, yg + c * L, row, policy == kZero);
        continue;
      }
      const acc_t m = acc_t(mu), r = acc_t(rs);
      mean[i] = m;
      rstd[i] = r;
      for (int64_t c = 0; c < Cg; ++c) {
        const T* xr = xg + c * L;
        T* yr = yg + c * L;
        const acc_t wc = w[g * Cg + c], bc = bias[g * Cg + c];
        auto normalized = [xr, m, r, wc, bc](int64_t j, bool v) { return stored<T>((pick(xr, j, v, m) - m) * r * wc + bc); };
        write_normalized(row, yr, xr, policy, normalized);
      }
      if (policy == kNormalize && counts[b] < L && !gaps_finite(row, L - counts[b], yg, Cg))
        for (int64_t c = 0; c < Cg; ++c) {
          const double wc = w[g * Cg + c], bc = bias[g * Cg + c];
          repair_overflow(row, yg + c * L, xg + c * L, m, r, [wc, bc](int64_t, double xh) { return xh * wc + bc; });
        }
    }
  });
}

template <typename T>
void backward_groups(const T* dy, const T* x, const bool* mask, const at::opmath_type<T>* mean,
                     const at::opmath_type<T>* rstd, const int8_t* state, const at::opmath_type<T>* w, T* dx,
                     double* slots, int64_t B, int64_t G, int64_t Cg, int64_t L, int64_t correction, bool center,
                     int64_t policy) {
  using acc_t = at::opmath_type<T>;
  std::vector<int64_t> counts;
  const auto runs = valid_runs(mask, B, L, counts);
  const auto rows = rows_of(mask, runs, L);
  // One task per (block of kSamples samples, group index g): it adds its samples' (A_ch, B_ch) into
  // its own slot, in order.
  const int64_t blocks = (B + kSamples - 1) / kSamples;
  at::parallel_for(0, blocks * G, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task)
    for (int64_t b = (task / G) * kSamples; b < std::min(B, (task / G + 1) * kSamples); ++b) {
      const int64_t g = task % G, i = b * G + g;
      const Row& row = rows[b];
      const T* dyg = dy + i * Cg * L;
      const T* xg = x + i * Cg * L;
      T* dxg = dx + i * Cg * L;
      double* slot = slots + task * Cg * 2;  // (A_ch, B_ch) per channel of the group
      if (state[i] != kFused) {
        for (int64_t c = 0; c < Cg; ++c) pass_row(dyg + c * L, dxg + c * L, row, policy == kZero);
        continue;
      }
      const acc_t m = mean[i], r = rstd[i];
      double sg = 0, sgy = 0;
      for (int64_t c = 0; c < Cg; ++c) {
        const T* dyr = dyg + c * L;
        const T* xr = xg + c * L;
        double a = 0, bsum = 0;
        auto dyv = [dyr](int64_t j, bool v) { return pick(dyr, j, v, 0.0); };
        // dy_j xh_j where position j is used: xh in acc_t (fast), or through finite_xh (wide)
        auto dyxh = [dyr, xr, m, r](int64_t j, bool u) {
          return pick(dyr, j, u, 0.0) * double((pick(xr, j, u, m) - m) * r);
        };
        auto dyxh_wide = [dyr, xr, m, r](int64_t j, bool u) {
          const acc_t xj = pick(xr, j, u, m);
          return pick(dyr, j, u, 0.0) * finite_xh((xj - m) * r, xj, m, r);
        };
        if (row.dense) {
          const uint8_t* mr = row.m;
          blocked_sums(0, L, [dyv, mr](int64_t j) { return dyv(j, mr[j]); }, [dyxh, mr](int64_t j) { return dyxh(j, mr[j]); },
                       [dyxh_wide, mr](int64_t j) { return dyxh_wide(j, mr[j]); }, &a, &bsum);
        } else {
          for (const auto& run : *row.runs)
            blocked_sums(run.first, run.second, [dyv](int64_t j) { return dyv(j, true); },
                         [dyxh](int64_t j) { return dyxh(j, true); }, [dyxh_wide](int64_t j) { return dyxh_wide(j, true); },
                         &a, &bsum);
        }
        if (policy == kNormalize) {  // masked-out positions count where their dy is nonzero
          gap_sums(row, [dyr](int64_t j) { return dyr[j] != T(0) ? double(dyr[j]) : 0.0; },
                   [dyr, dyxh](int64_t j) { return dyxh(j, dyr[j] != T(0)); },
                   [dyr, dyxh_wide](int64_t j) { return dyxh_wide(j, dyr[j] != T(0)); }, &a, &bsum);
        }
        slot[2 * c] += a;
        slot[2 * c + 1] += bsum;
        sg += double(w[g * Cg + c]) * a;
        sgy += double(w[g * Cg + c]) * bsum;
      }
      const double k = double(counts[b] * Cg), nu = k - double(correction);
      const double wa = center ? sg / k : 0.0, wb = sgy / nu;
      const acc_t ma = acc_t(wa), mb = acc_t(wb);
      for (int64_t c = 0; c < Cg; ++c) {
        const T* dyr = dyg + c * L;
        const T* xr = xg + c * L;
        const acc_t wc = w[g * Cg + c];
        auto valid = [dyr, xr, m, r, wc, ma, mb](int64_t j, bool v) {
          const acc_t xh = (pick(xr, j, v, m) - m) * r;
          return stored<T>(r * (pick(dyr, j, v, acc_t(0)) * wc - ma - xh * mb));
        };
        auto valid_wide = [dyr, xr, m, r, wc, wa, wb](int64_t j, bool v) {  // sums beyond acc_t (see wide_xh)
          const double xh = wide_xh(pick(xr, j, v, m), m, r);
          return T(acc_t(double(r) * (pick(dyr, j, v, 0.0) * double(wc) - wa - xh * wb)));
        };
        T* dxr = dxg + c * L;
        auto other = [dyr, r, wc](int64_t j) { return stored<T>(r * (acc_t(dyr[j]) * wc)); };
        if (std::isfinite(ma) && std::isfinite(mb))
          write_policy(row, dxr, dyr, policy, valid, other);
        else
          write_policy(row, dxr, dyr, policy, valid_wide, other);
      }
    }
  });
}

// Elementwise masks over rows: x and mask are (R, n), weight and bias one value per column j (layer
// and RMS norm over trailing axes with a mask that varies inside a row). Each row is one group,
// read whole with its masked-out inputs replaced by selects (a dense Row); the formulas are the
// group kernel's with Cg = 1, L = n, and w_j, b_j per position instead of per channel:
//   A = sum_{P_used} dy_j w_j,  B = sum_{P_used} dy_j w_j xh_j,  dw_j += dy_j xh_j,  db_j += dy_j  (P_used)
template <typename T>
void forward_masked_rows(const T* x, const bool* mask, const at::opmath_type<T>* w, const at::opmath_type<T>* bias,
                         T* y, at::opmath_type<T>* mean, at::opmath_type<T>* rstd, int8_t* state, int64_t R,
                         int64_t n, int64_t correction, double eps, bool center, int64_t policy) {
  using acc_t = at::opmath_type<T>;
  const double kappa_limit = 0.5 / std::numeric_limits<acc_t>::epsilon();
  at::parallel_for(0, R, std::max<int64_t>(1, 32768 / n), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const Row row{nullptr, as_bytes(mask) + i * n, n, true};
      const T* xr = x + i * n;
      T* yr = y + i * n;
      double k = 0, mu = 0, ss = 0;
      if (std::is_same_v<T, double>) {  // the sum beside the count, then the squares: the bits as before
        const auto valid_x = [m = row.m, xr](int64_t j) { return pick(xr, j, m[j], 0.0); };
        blocked_sums(0, n, [m = row.m](int64_t j) { return m[j] ? 1.0 : 0.0; }, valid_x, valid_x, &k, &mu);
        mu = center && k > double(correction) ? mu / k : 0.0;
        if (k > double(correction)) ss = valid_sum(row, squared_deviation(xr, mu));
      } else {
        k = double(valid_count(row.m, n));
        if (k > double(correction)) std::tie(mu, ss) = group_moments(row, xr, 1, k, center);
      }
      const double nu = k - double(correction);
      const double rs = 1.0 / std::sqrt(ss / nu + eps);
      state[i] = classify(nu, mu, ss, rs, kappa_limit);
      if (state[i] != kFused) {
        mean[i] = acc_t(0);
        rstd[i] = acc_t(0);
        pass_row(xr, yr, row, policy == kZero);
        continue;
      }
      const acc_t m = acc_t(mu), r = acc_t(rs);
      mean[i] = m;
      rstd[i] = r;
      if (i + 1 < R) {
        prefetch_row(xr + n, n);
        prefetch_row(row.m + n, n);
      }
      auto normalized = [xr, m, r, w, bias](int64_t j, bool v) {
        return stored<T>((pick(xr, j, v, m) - m) * r * w[j] + bias[j]);
      };
      write_normalized(row, yr, xr, policy, normalized);
      if (policy == kNormalize && k < double(n) && !all_finite(yr, n))
        repair_overflow(row, yr, xr, m, r, [w, bias](int64_t j, double xh) { return xh * double(w[j]) + double(bias[j]); });
    }
  });
}

// One row's sums for backward_masked_rows in one pass: (A, B, k) with A and B in blocks as
// blocked_sums, and its terms dy_j xh_j and dy_j added to dw[j] and db[j]. Position j is used (enters
// the sums) where valid, or under "normalize" where masked out with dy_j != 0; xh_j is finite_xh's.
// The test and finite_xh's choice are selects over values loaded unconditionally: with a branch, or
// with this loop written inside the parallel_for lambda, GCC 12 leaves it scalar.
template <typename T, typename A = at::opmath_type<T>>
std::array<double, 3> masked_row_sums(const T* dy, const T* x, const uint8_t* mask, const A* w, A m, A r,
                                      bool normalize, double* dw, double* db, int64_t n) {
  double a = 0, bsum = 0, k = 0;
  for (int64_t s = 0; s < n; s += kBlock) {
    const int64_t e = std::min(n, s + kBlock);
    double acc_a = 0, acc_b = 0, acc_k = 0;
#pragma omp simd reduction(+ : acc_a, acc_b, acc_k)
    for (int64_t j = s; j < e; ++j) {
      const A dj = A(dy[j]), xj = A(x[j]);
      const bool u = bool(mask[j]) | (normalize & (dj != A(0)));
      const A xu = u ? xj : m;
      const double d = u ? double(dj) : 0.0, dxh = d * finite_xh((xu - m) * r, xu, m, r);
      acc_a += d * double(w[j]);
      acc_b += dxh * double(w[j]);
      acc_k += mask[j] ? 1.0 : 0.0;
      dw[j] += dxh;
      db[j] += d;
    }
    a += acc_a;
    bsum += acc_b;
    k += acc_k;
  }
  return {a, bsum, k};
}

template <typename T>
void backward_masked_rows(const T* dy, const T* x, const bool* mask, const at::opmath_type<T>* mean,
                          const at::opmath_type<T>* rstd, const int8_t* state, const at::opmath_type<T>* w, T* dx,
                          double* slots, int64_t R, int64_t n, int64_t correction, bool center, int64_t policy) {
  using acc_t = at::opmath_type<T>;
  const int64_t blocks = (R + kSamples - 1) / kSamples;
  at::parallel_for(0, blocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t blk = lo; blk < hi; ++blk) {
      double* dwb = slots + blk * 2 * n;  // (dw_j, db_j) of this block's rows, added in order
      double* dbb = dwb + n;
      for (int64_t i = blk * kSamples; i < std::min(R, (blk + 1) * kSamples); ++i) {
        const Row row{nullptr, as_bytes(mask) + i * n, n, true};
        const T* dyr = dy + i * n;
        const T* xr = x + i * n;
        T* dxr = dx + i * n;
        if (state[i] != kFused) {
          pass_row(dyr, dxr, row, policy == kZero);
          continue;
        }
        const acc_t m = mean[i], r = rstd[i];
        auto xh = [xr, m, r](int64_t j, bool u) { return (pick(xr, j, u, m) - m) * r; };
        prefetch_row<1>(dxr, n);
        const auto [a, bsum, k] = masked_row_sums(dyr, xr, row.m, w, m, r, policy == kNormalize, dwb, dbb, n);
        if (i + 1 < R) {
          prefetch_row(dyr + n, n);
          prefetch_row(xr + n, n);
          prefetch_row(row.m + n, n);
        }
        const double wa = center ? a / k : 0.0, wb = bsum / (k - double(correction));
        const acc_t ma = acc_t(wa), mb = acc_t(wb);
        auto valid = [dyr, w, r, ma, mb, xh](int64_t j, bool v) {
          return stored<T>(r * (pick(dyr, j, v, acc_t(0)) * w[j] - ma - xh(j, v) * mb));
        };
        auto valid_wide = [dyr, xr, w, m, r, wa, wb](int64_t j, bool v) {  // sums beyond acc_t (see wide_xh)
          const double xh = wide_xh(pick(xr, j, v, m), m, r);
          return T(acc_t(double(r) * (pick(dyr, j, v, 0.0) * double(w[j]) - wa - xh * wb)));
        };
        auto other = [dyr, r, w](int64_t j) { return stored<T>(r * (acc_t(dyr[j]) * w[j])); };
        if (std::isfinite(ma) && std::isfinite(mb))
          write_policy(row, dxr, dyr, policy, valid, other);
        else
          write_policy(row, dxr, dyr, policy, valid_wide, other);
      }
    }
  });
}

void check_layout(const at::Tensor& x, const at::Tensor& mask, int64_t policy) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu(), "x must be a 4-d CPU tensor (B, G, Cg, L), got ", x.sizes());
  TORCH_CHECK(mask.dtype() == at::kBool && mask.dim() == 2 && mask.size(0) == x.size(0) && mask.size(1) == x.size(3),
              "mask must be a bool (B, L) tensor for x of shape ", x.sizes(), ", got ", mask.sizes());
  TORCH_CHECK(policy >= kNormalize && policy <= kZero, "policy must be 0 (normalize), 1 (keep) or 2 (zero)");
}

// n parameter values as contiguous values of the accumulation dtype (read flat: t itself where it is
// so already, with no operator call); `fill` when absent.
at::Tensor flat_values(const c10::optional<at::Tensor>& t, int64_t n, const at::Tensor& x, at::ScalarType acc,
                       double fill) {
  if (!t) return at::full({n}, fill, x.options().dtype(acc));
  if (t->scalar_type() == acc && t->is_contiguous()) return *t;
  return t->reshape({n}).to(acc).contiguous();
}

// A per-channel parameter as G * Cg values (flat_values).
at::Tensor channels(const c10::optional<at::Tensor>& t, const at::Tensor& x, at::ScalarType acc, double fill,
                    const char* name) {
  const int64_t n = x.size(1) * x.size(2);
  TORCH_CHECK(!t || t->numel() == n, name, " must have G * Cg = ", n, " elements, got ", t->sizes());
  return flat_values(t, n, x, acc, fill);
}

at::ScalarType acc_type(const at::Tensor& x) {
  return at::toOpMathType(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_positions_norm(const at::Tensor& x_,
    const at::Tensor& mask_, const c10::optional<at::Tensor>& weight_, const c10::optional<at::Tensor>& bias_,
    int64_t correction, double eps, bool center, int64_t policy) {
  check_layout(x_, mask_, policy);
  const auto x = x_.contiguous(), mask = mask_.contiguous();
  const auto acc = acc_type(x);
  const auto weight = channels(weight_, x, acc, 1.0, "weight"), bias = channels(bias_, x, acc, 0.0, "bias");
  const int64_t B = x.size(0), G = x.size(1), Cg = x.size(2), L = x.size(3);
  auto y = at::empty_like(x);
  auto mean = at::empty({B, G}, x.options().dtype(acc));
  auto rstd = at::empty({B, G}, x.options().dtype(acc));
  auto state = at::empty({B, G}, x.options().dtype(at::kChar));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "masked_positions_norm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_groups<scalar_t>(x.const_data_ptr<scalar_t>(), mask.const_data_ptr<bool>(), weight.const_data_ptr<acc_t>(),
                             bias.const_data_ptr<acc_t>(), y.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<acc_t>(),
                             rstd.mutable_data_ptr<acc_t>(), state.mutable_data_ptr<int8_t>(), B, G, Cg, L, correction,
                             eps, center, policy);
  });
  return {y, mean, rstd, state};
}

// The group and instance norm modules' lane (fast/channel_lane.py): masked_positions_norm(centered, correction 0)
// on x (B, C, *S) read as (B, groups, C / groups, L = prod S) and the mask (B, *S) or (B, 1, *S) read as (B, L)
// (absent: every position valid): y in x's shape, each group's (mean, rstd, state) as masked_positions_norm returns
// them ((B, groups); what its Autograd kernel, kernels/masked_channels.cpp, saves for the backward), and the number
// of groups flagged for redoing (state 2), whose outputs are x's (the caller redoes the call).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_channels_norm(const at::Tensor& x_, const c10::optional<at::Tensor>& mask_,
    const c10::optional<at::Tensor>& weight_, const c10::optional<at::Tensor>& bias_, int64_t groups, double eps,
    int64_t policy) {
  TORCH_CHECK(x_.dim() >= 3 && x_.device().is_cpu() && x_.numel() > 0 && groups > 0 && x_.size(1) % groups == 0,
              "x must be a non-empty CPU tensor (B, C, *S) with C divisible by groups = ", groups, ", got ", x_.sizes());
  TORCH_CHECK(policy >= kNormalize && policy <= kZero, "policy must be 0 (normalize), 1 (keep) or 2 (zero)");
  const int64_t B = x_.size(0), C = x_.size(1), G = groups, Cg = C / groups, L = x_.numel() / (B * C);
  TORCH_CHECK(!mask_ || (mask_->scalar_type() == at::kBool && mask_->device().is_cpu() && mask_->size(0) == B &&
                         mask_->numel() == B * L),
              "mask must be a bool CPU tensor (B, *S) or (B, 1, *S) for x of shape ", x_.sizes());
  const auto x = x_.contiguous();
  const auto mask = mask_ ? mask_->contiguous() : at::Tensor();
  std::vector<uint8_t> all_valid(mask_ ? 0 : B * L, 1);
  const bool* m = mask_ ? mask.const_data_ptr<bool>() : reinterpret_cast<const bool*>(all_valid.data());
  for (const auto* t : {&weight_, &bias_})
    TORCH_CHECK(!*t || ((*t)->numel() == C && (*t)->device().is_cpu()), "weight and bias must be CPU tensors of C = ", C,
                " elements");
  const auto acc = acc_type(x);
  const auto weight = flat_values(weight_, C, x, acc, 1.0), bias = flat_values(bias_, C, x, acc, 0.0);
  auto y = at::empty_like(x);
  auto mean = at::empty({B, G}, x.options().dtype(acc));
  auto rstd = at::empty({B, G}, x.options().dtype(acc));
  auto state = at::empty({B, G}, x.options().dtype(at::kChar));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "masked_channels_norm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_groups<scalar_t>(x.const_data_ptr<scalar_t>(), m, weight.const_data_ptr<acc_t>(),
                             bias.const_data_ptr<acc_t>(), y.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<acc_t>(),
                             rstd.mutable_data_ptr<acc_t>(), state.mutable_data_ptr<int8_t>(), B, G, Cg, L, 0, eps, true,
                             policy);
  });
  const int8_t* states = state.const_data_ptr<int8_t>();
  auto count = at::empty({}, x.options().dtype(at::kLong));
  *count.mutable_data_ptr<int64_t>() = std::count(states, states + B * G, int8_t(kRedo));
  return {y, mean, rstd, state, count};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_positions_norm_backward(const at::Tensor& dy_, const at::Tensor& x_,
    const at::Tensor& mask_, const at::Tensor& mean_, const at::Tensor& rstd_, const at::Tensor& state_,
    const c10::optional<at::Tensor>& weight_, int64_t correction, bool center, int64_t policy) {
  check_layout(x_, mask_, policy);
  TORCH_CHECK(dy_.sizes() == x_.sizes() && dy_.dtype() == x_.dtype(), "dy must match x, got ", dy_.sizes());
  const int64_t B = x_.size(0), G = x_.size(1), Cg = x_.size(2), L = x_.size(3);
  const auto acc = acc_type(x_);
  TORCH_CHECK(mean_.numel() == B * G && rstd_.numel() == B * G && state_.numel() == B * G &&
                  mean_.scalar_type() == acc && rstd_.scalar_type() == acc && state_.scalar_type() == at::kChar,
              "mean, rstd and state need one value per group, as masked_positions_norm returns them");
  const auto dy = dy_.contiguous(), x = x_.contiguous(), mask = mask_.contiguous();
  const auto mean = mean_.contiguous(), rstd = rstd_.contiguous(), state = state_.contiguous();
  const auto weight = channels(weight_, x, acc, 1.0, "weight");
  auto dx = at::empty_like(x);
  auto slots = at::zeros({(B + kSamples - 1) / kSamples, G * Cg, 2}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "masked_positions_norm_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_groups<scalar_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), mask.const_data_ptr<bool>(),
                              mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(),
                              state.const_data_ptr<int8_t>(), weight.const_data_ptr<acc_t>(),
                              dx.mutable_data_ptr<scalar_t>(), slots.mutable_data_ptr<double>(), B, G, Cg, L,
                              correction, center, policy);
  });
  // dweight, dbias per channel: the blocks' slots added in order (no dependence on threads).
  auto sums = at::zeros({2, G * Cg}, x.options().dtype(at::kDouble));
  const double* s = slots.const_data_ptr<double>();
  double* db = sums.mutable_data_ptr<double>();
  double* dw = db + G * Cg;
  for (int64_t blk = 0; blk < slots.size(0); ++blk)
    for (int64_t ch = 0; ch < G * Cg; ++ch) {
      db[ch] += s[(blk * G * Cg + ch) * 2];
      dw[ch] += s[(blk * G * Cg + ch) * 2 + 1];
    }
  const auto out = sums.to(acc);
  return {dx, out[1], out[0]};
}

void check_rows(const at::Tensor& x, const at::Tensor& mask, int64_t policy) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "x must be a 2-d CPU tensor (rows, n), got ", x.sizes());
  TORCH_CHECK(mask.dtype() == at::kBool && mask.sizes() == x.sizes(), "mask must be a bool tensor of x's shape ",
              x.sizes(), ", got ", mask.sizes());
  TORCH_CHECK(policy >= kNormalize && policy <= kZero, "policy must be 0 (normalize), 1 (keep) or 2 (zero)");
}

// A per-column parameter as n values (flat_values).
at::Tensor columns(const c10::optional<at::Tensor>& t, const at::Tensor& x, at::ScalarType acc, double fill,
                   const char* name) {
  const int64_t n = x.size(1);
  TORCH_CHECK(!t || t->numel() == n, name, " must have n = ", n, " elements, got ", t->sizes());
  return flat_values(t, n, x, acc, fill);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_row_norm(const at::Tensor& x_,
    const at::Tensor& mask_, const c10::optional<at::Tensor>& weight_, const c10::optional<at::Tensor>& bias_,
    int64_t correction, double eps, bool center, int64_t policy) {
  check_rows(x_, mask_, policy);
  const auto x = x_.contiguous(), mask = mask_.contiguous();
  const auto acc = acc_type(x);
  const auto weight = columns(weight_, x, acc, 1.0, "weight"), bias = columns(bias_, x, acc, 0.0, "bias");
  const int64_t R = x.size(0), n = x.size(1);
  auto y = at::empty_like(x);
  auto mean = at::empty({R, 1}, x.options().dtype(acc));  // (B, G) = (R, 1), as the group kernel's
  auto rstd = at::empty({R, 1}, x.options().dtype(acc));
  auto state = at::empty({R, 1}, x.options().dtype(at::kChar));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "masked_row_norm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_masked_rows<scalar_t>(x.const_data_ptr<scalar_t>(), mask.const_data_ptr<bool>(),
                                  weight.const_data_ptr<acc_t>(), bias.const_data_ptr<acc_t>(),
                                  y.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<acc_t>(),
                                  rstd.mutable_data_ptr<acc_t>(), state.mutable_data_ptr<int8_t>(), R, n, correction,
                                  eps, center, policy);
  });
  return {y, mean, rstd, state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_row_norm_backward(const at::Tensor& dy_, const at::Tensor& x_,
    const at::Tensor& mask_, const at::Tensor& mean_, const at::Tensor& rstd_, const at::Tensor& state_,
    const c10::optional<at::Tensor>& weight_, int64_t correction, bool center, int64_t policy) {
  check_rows(x_, mask_, policy);
  TORCH_CHECK(dy_.sizes() == x_.sizes() && dy_.dtype() == x_.dtype(), "dy must match x, got ", dy_.sizes());
  const int64_t R = x_.size(0), n = x_.size(1);
  const auto acc = acc_type(x_);
  TORCH_CHECK(mean_.numel() == R && rstd_.numel() == R && state_.numel() == R && mean_.scalar_type() == acc &&
                  rstd_.scalar_type() == acc && state_.scalar_type() == at::kChar,
              "mean, rstd and state need one value per row, as masked_row_norm returns them");
  const auto dy = dy_.contiguous(), x = x_.contiguous(), mask = mask_.contiguous();
  const auto mean = mean_.contiguous(), rstd = rstd_.contiguous(), state = state_.contiguous();
  const auto weight = columns(weight_, x, acc, 1.0, "weight");
  auto dx = at::empty_like(x);
  auto slots = at::zeros({std::max<int64_t>(1, (R + kSamples - 1) / kSamples), 2, n}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "masked_row_norm_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_masked_rows<scalar_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                   mask.const_data_ptr<bool>(), mean.const_data_ptr<acc_t>(),
                                   rstd.const_data_ptr<acc_t>(), state.const_data_ptr<int8_t>(),
                                   weight.const_data_ptr<acc_t>(), dx.mutable_data_ptr<scalar_t>(),
                                   slots.mutable_data_ptr<double>(), R, n, correction, center, policy);
  });
  const auto sums = slots.sum(0).to(acc);  // the blocks' slots added in order: no dependence on threads
  return {dx, sums[0], sums[1]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(masknorm, m) {
  m.def("masked_positions_norm(Tensor x, Tensor mask, Tensor? weight, Tensor? bias, int correction, float eps,"
        " bool center, int policy) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("masked_channels_norm(Tensor x, Tensor? mask, Tensor? weight, Tensor? bias, int groups, float eps,"
        " int policy) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("masked_row_norm(Tensor x, Tensor mask, Tensor? weight, Tensor? bias, int correction, float eps,"
        " bool center, int policy) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("masked_row_norm_backward(Tensor dy, Tensor x, Tensor mask, Tensor mean, Tensor rstd, Tensor state,"
        " Tensor? weight, int correction, bool center, int policy) -> (Tensor, Tensor, Tensor)");
  m.def("masked_positions_norm_backward(Tensor dy, Tensor x, Tensor mask, Tensor mean, Tensor rstd, Tensor state,"
        " Tensor? weight, int correction, bool center, int policy) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(masknorm, CPU, m) {
  m.impl("masked_positions_norm", &masked_positions_norm);
  m.impl("masked_positions_norm_backward", &masked_positions_norm_backward);
  m.impl("masked_channels_norm", &masked_channels_norm);
  m.impl("masked_row_norm", &masked_row_norm);
  m.impl("masked_row_norm_backward", &masked_row_norm_backward);
}
