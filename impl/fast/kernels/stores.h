// A kernel's result stored in x's dtype, rounded as c10's conversions round it, in a form GCC vectorizes.

#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace masknorm_kernels {

// T(v): for bfloat16, c10's round to nearest even (NaN -> 0x7FC0) with a select where c10 branches on NaN
// (a loop of c10's conversions stays scalar: GCC 12 does not if-convert it); other types by T's own conversion.
template <typename T, typename A>
inline T stored(A v) {
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<A, float>) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof bits);
    const uint16_t rounded = uint16_t((bits + ((bits >> 16) & 1u) + 0x7FFFu) >> 16);
    return T(v != v ? uint16_t(0x7FC0) : rounded, T::from_bits());
  } else {
    return T(v);
  }
}

}  // namespace masknorm_kernels
