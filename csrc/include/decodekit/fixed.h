// Rank keys and exact fixed-point masses shared by the CUDA sampling kernels
// and their CPU unit tests (tests/ops/test_fixed_point.py through the
// extension's `_fixed_point_selftest`). Header-only, DK_HOST_DEVICE.
//
// Why fixed point: the GPU kernels reduce a row with many threads and
// shared-memory atomics. Integer addition is associative, so a mass summed
// from 64-bit integers is the same whatever the order, the thread count or the
// batch: deterministic mode costs nothing. A weight w in [0, 1] (the top token
// of a logits row weighs exactly 1; a probability row is first scaled by a
// power of two so its maximum is <= 1) becomes q = floor(w 2^62), an integer
// <= 2^62, kept as two parts hi = q >> 31 and lo = q & (2^31 - 1) so that sums
// of up to 2^31 terms never overflow either part. A mass is hi 2^31 + lo in
// units of 2^-62 (an exact 94-bit integer). Truncation costs at most 2^-62
// per token: a row of V tokens is off by at most V 2^-62 (3e-14 at V = 128k),
// about the size of the rounding in a float64 running sum of the same row.
#pragma once

#include <cstdint>

#include "decodekit/math.h"

namespace decodekit {

using u128 = unsigned __int128;

// An order-preserving key of a float (larger value -> larger key; -0 and +0
// share a key; -inf has the smallest key of any non-NaN value).
DK_HOST_DEVICE uint32_t rank_key(float x) {
  uint32_t u = float_to_bits(x);
  if (u == 0x80000000u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

struct Mass {
  uint64_t hi = 0, lo = 0;  // value = hi 2^31 + lo, units of 2^-62
  DK_HOST_DEVICE void add(uint64_t q) {
    hi += q >> 31;
    lo += q & 0x7fffffffu;
  }
  DK_HOST_DEVICE void add(const Mass& m) {
    hi += m.hi;
    lo += m.lo;
  }
  DK_HOST_DEVICE u128 value() const { return (static_cast<u128>(hi) << 31) + lo; }
};

// 2^62 times w (w in [0, 1], already scaled), truncated: exact, since a
// float32 times a power of two is exact and the conversion truncates.
DK_HOST_DEVICE uint64_t fixed_of(float w, float scale_2_62) {
  const float s = w * scale_2_62;
  return s >= 1.0f ? static_cast<uint64_t>(s) : 0u;
}

// A u128 as a double (rounded once per part; relative error ~2^-52).
DK_HOST_DEVICE double u128_to_double(u128 v) {
  const uint64_t hi = static_cast<uint64_t>(v >> 64), lo = static_cast<uint64_t>(v);
  return static_cast<double>(hi) * 18446744073709551616.0 + static_cast<double>(lo);
}

// floor(t) for 0 <= t < 2^124 as a u128 (0 for NaN or negative t).
DK_HOST_DEVICE u128 u128_of_double(double t) {
  if (!(t > 0.0)) return 0;
  const double two62 = 4611686018427387904.0;
  const double h = static_cast<double>(static_cast<uint64_t>(t / two62));  // floor(t / 2^62) < 2^62
  const double l = t - h * two62;                                          // exact: a multiple of ulp(t) below 2^62
  return (static_cast<u128>(static_cast<uint64_t>(h)) << 62) + static_cast<uint64_t>(l);
}

// ceil(t) for 0 <= t < 2^124: the smallest integer mass m with m >= t.
DK_HOST_DEVICE u128 u128_ceil_of_double(double t) {
  u128 r = u128_of_double(t);
  if (u128_to_double(r) < t) r += 1;
  return r;
}

// The power of two 2^(62 - e) with 2^e >= max_w (the smallest such e, so that
// every w / 2^e <= 1): the factor fixed_of() takes. max_w must be > 0 and finite.
DK_HOST_DEVICE float fixed_scale_for(float max_w) {
  int e = static_cast<int>((float_to_bits(max_w) >> 23) & 0xff) - 127;      // floor(log2) for normals
  if (((float_to_bits(max_w) >> 23) & 0xff) == 0) e = -126;                 // subnormal max: 2^-126 covers it
  if (bits_to_float(static_cast<uint32_t>(e + 127) << 23) < max_w) e += 1;  // not a power of two: round up
  int s = 62 - e;  // callers keep max_w >= 2^-60 (so s <= 122) and finite (s >= -66)
  if (s > 127) s = 127;
  if (s < -126) s = -126;
  return bits_to_float(static_cast<uint32_t>(s + 127) << 23);
}

}  // namespace decodekit
