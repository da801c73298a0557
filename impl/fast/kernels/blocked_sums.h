// Deterministic sums in double for the fused CPU kernels (included by padded_rows.cpp, masked_positions.cpp and
// per_channel.cpp), the masked loads their terms read through, and the prefetch of a row before it is read.
//
//   blocked_sum(s, e, t) = sum_{j in [s, e)} t(j): blocks of kBlock terms, each added across SIMD lanes, then the
//   blocks' sums in order (float64 terms: error ~ (kBlock / lanes + (e - s) / kBlock) u).
//
// The order of the additions depends on (s, e) alone, never on the number of threads.

#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

namespace masknorm_kernels {

constexpr int64_t kBlock = 256;  // terms per partial sum

// A bool mask's bytes (0 or 1 each): a loop that loads bools does not vectorize.
inline const uint8_t* as_bytes(const bool* mask) {
  return reinterpret_cast<const uint8_t*>(mask);
}

// p[j] where v, else `other`, as U: the load is unconditional (j is in bounds either way) and the flag
// selects, so a loop of these vectorizes; a masked-out value is converted, never used in arithmetic.
template <typename U, typename T>
U pick(const T* p, int64_t j, bool v, U other) {
  const U value = U(p[j]);
  return v ? value : other;
}

// Row t[0, n) asked into the cache ahead of its use (Write = 1: to be written; a hint, no value changes), at most
// its first 4 KiB (the hardware's own prefetcher follows from there), so that its misses overlap the work before.
template <int Write = 0, typename T>
inline void prefetch_row(const T* t, int64_t n) {
  const char* p = reinterpret_cast<const char*>(t);
  for (int64_t b = 0; b < std::min<int64_t>(n * int64_t(sizeof(T)), 4096); b += 64) __builtin_prefetch(p + b, Write);
}

// The terms capture their pointers by value: through a captured reference the loop would reload them
// and run about 3x slower.
template <typename Term>
double blocked_sum(int64_t s, int64_t e, Term term) {
  double total = 0;
  for (int64_t a = s; a < e; a += kBlock) {
    const int64_t z = std::min(e, a + kBlock);
    double acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = a; j < z; ++j) acc += term(j);
    total += acc;
  }
  return total;
}

// Blocks for sums whose terms are cheap (the forward's moments): adding the lanes of a block is a chain of
// scalar additions (OpenMP's reduction) that at kBlock terms costs about as much as the block itself.
// Error below (kMomentBlock + (e - s) / kMomentBlock) u of the sum of |terms|.
constexpr int64_t kMomentBlock = 4096;

// (blocked_sum(s, e, t0), blocked_sum(s, e, t1)) in one loop (the two chains overlap), each with
// blocked_sum's order of additions (with blocks of Block terms).
template <int64_t Block = kBlock, typename T0, typename T1>
std::pair<double, double> blocked_sums(int64_t s, int64_t e, T0 t0, T1 t1) {
  double total0 = 0, total1 = 0;
  for (int64_t a = s; a < e; a += Block) {
    const int64_t z = std::min(e, a + Block);
    double acc0 = 0, acc1 = 0;
#pragma omp simd reduction(+ : acc0, acc1)
    for (int64_t j = a; j < z; ++j) {
      acc0 += t0(j);
      acc1 += t1(j);
    }
    total0 += acc0;
    total1 += acc1;
  }
  return {total0, total1};
}

// (blocked_sum(s, e, t0), ..., blocked_sum(s, e, t3)) in one loop: four independent chains (four rows of a
// layer norm), each with blocked_sum's order of additions.
template <typename T0, typename T1, typename T2, typename T3>
std::array<double, 4> blocked_sums4(int64_t s, int64_t e, T0 t0, T1 t1, T2 t2, T3 t3) {
  std::array<double, 4> total{0, 0, 0, 0};
  for (int64_t a = s; a < e; a += kBlock) {
    const int64_t z = std::min(e, a + kBlock);
    double acc0 = 0, acc1 = 0, acc2 = 0, acc3 = 0;
#pragma omp simd reduction(+ : acc0, acc1, acc2, acc3)
    for (int64_t j = a; j < z; ++j) {
      acc0 += t0(j);
      acc1 += t1(j);
      acc2 += t2(j);
      acc3 += t3(j);
    }
    total[0] += acc0;
    total[1] += acc1;
    total[2] += acc2;
    total[3] += acc3;
  }
  return total;
}

}  // namespace masknorm_kernels
