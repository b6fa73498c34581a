// Numeric helpers shared by the CPU and CUDA kernels: our own exp and the
// half / bfloat16 to float conversions, written with IEEE float operations
// and explicit fused multiply-adds (fmaf, correctly rounded everywhere) so
// that every instruction set (AVX2, AVX-512, baseline x86-64 through libm's
// fmaf, CUDA) produces the same bits. Build with -ffp-contract=off so the
// compiler adds no FMA of its own.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "decodekit/philox.h"  // DK_FN

namespace decodekit {

DK_FN float bits_to_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
#endif
}

DK_FN uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
#endif
}

DK_FN float fma_f32(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fmaf(a, b, c);
#endif
}

DK_FN uint64_t double_to_bits(double d) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(d));
#else
  uint64_t b;
  std::memcpy(&b, &d, sizeof b);
  return b;
#endif
}

DK_FN double bits_to_double(uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(b));
#else
  double d;
  std::memcpy(&d, &b, sizeof d);
  return d;
#endif
}

// exp(x) for x <= 0 (x = (logit - max) / T), including -inf, as 2^(x log2 e):
// n = round(x log2 e), f = x log2 e - n from two FMAs (log2 e split into a
// float32 head and tail, so f carries no product rounding), 2^f on
// [-1/2, 1/2] by a degree-6 polynomial (relative error <= 8e-8) evaluated with
// FMAs, and n added into the exponent bits. Inputs below -86.5 give 0 (the
// result would be near the subnormal range; above it the result is normal,
// so the exponent addition is exact). exp(0) is exactly 1. Relative error
// about 1.5 ulp. Nine multiply-add-unit operations per value where the
// earlier Cody-Waite form took eleven. NaN inputs give 0 (callers mark such
// rows invalid before using the result).
constexpr float kExpLog2eHi = 1.44269502162933349609375f;
constexpr float kExpLog2eLo = 1.925963033500011e-08f;
constexpr float kExpLowest = -86.5f;
// 2^f ~ sum_k kExp2C<k> f^k (scalars, so device code can use them too).
constexpr float kExp2C0 = 1.0f, kExp2C1 = 0.6931471824645996f, kExp2C2 = 0.24022646248340607f,
                kExp2C3 = 0.05550328642129898f, kExp2C4 = 0.009618489071726799f, kExp2C5 = 0.0013399930903688073f,
                kExp2C6 = 0.00015345764404628426f;

// 2^(n + f) for |f| <= 1/2 and an integer n in [-125, 0]: the polynomial for
// 2^f, then n added into the exponent bits (2^n p stays normal, so exact).
DK_FN float exp2_parts(float f, float n) {
  float p = kExp2C6;
  p = fma_f32(p, f, kExp2C5);
  p = fma_f32(p, f, kExp2C4);
  p = fma_f32(p, f, kExp2C3);
  p = fma_f32(p, f, kExp2C2);
  p = fma_f32(p, f, kExp2C1);
  p = fma_f32(p, f, kExp2C0);
  return bits_to_float(float_to_bits(p) + (static_cast<uint32_t>(static_cast<int32_t>(n)) << 23));
}

DK_FN float exp_nonpositive(float x) {
  const float xc = x > kExpLowest ? x : kExpLowest;                // also maps NaN to the lowest input
  const float n = (xc * kExpLog2eHi + 12582912.0f) - 12582912.0f;  // round to nearest even
  float f = fma_f32(xc, kExpLog2eHi, -n);
  f = fma_f32(xc, kExpLog2eLo, f);
  return x > kExpLowest ? exp2_parts(f, n) : 0.0f;
}

// exp(d * inv_t) for d = logit - max <= 0, without rounding d * inv_t first:
// the caller splits c = inv_t * log2 e into a float32 head and tail
// (exp_scale), z = d * c_hi picks n = round(z), f = d * c - n comes from two
// FMAs (exact product, one rounding), then 2^f as in exp_nonpositive. One
// multiply fewer than exp_nonpositive(d * inv_t) and no error from rounding
// d / T (the old form's largest term far from the maximum). Results below
// 2^-124.75 give 0; exp(0) is exactly 1; NaN gives 0.
struct ExpScale {
  float hi, lo;
};
DK_FN ExpScale exp_scale(float inv_t) {
  const double c = static_cast<double>(inv_t) * 1.4426950408889634;
  if (!(c < 3.4028234663852886e+38)) return ExpScale{3.4028234663852886e+38f, 0.0f};  // tiny T: capped
  const float hi = static_cast<float>(c);
  return ExpScale{hi, static_cast<float>(c - static_cast<double>(hi))};
}
constexpr float kExp2Lowest = -124.75f;

DK_FN float exp_scaled_nonpositive(float d, float c_hi, float c_lo) {
  const float z = d * c_hi;
  const bool in_range = z > kExp2Lowest;  // false for NaN
  const float zc = in_range ? z : kExp2Lowest;
  const float n = (zc + 12582912.0f) - 12582912.0f;  // round to nearest even, in [-125, 0]
  float f = fma_f32(d, c_hi, -n);
  f = fma_f32(d, c_lo, f);
  return in_range ? exp2_parts(f, n) : 0.0f;
}

// 1 / T for T > 0. A T below float32's smallest normal (1.18e-38, which the
// wrappers also substitute for smaller plain numbers) acts as that value, the
// T -> 0+ limit, so 1 / T stays finite (8.5e37). Every kernel scales by this
// instead of dividing by T.
DK_FN float inverse_temperature(float T) {
  return 1.0f / (T < 1.17549435082228751e-38f ? 1.17549435082228751e-38f : T);
}

// ln x for a positive normal float (the summands of typical acceptance's
// entropy): x = f 2^e with f in [sqrt(1/2), sqrt(2)), ln x = e ln 2 + 2 atanh(s),
// s = (f - 1) / (f + 1), the series to s^9 (|s| <= 0.172: relative error ~1e-8
// before float32 rounding). The scalar twin of the CPU's 16-lane log16
// (cpu/speculative/residual.h): the same IEEE operations in the same order, so
// the same bits (checked by tests/native/kernels_harness.cpp).
DK_FN float log_positive_normal(float x) {
  const uint32_t bits = float_to_bits(x);
  int e = static_cast<int>(bits >> 23) - 127;
  float f = bits_to_float((bits & 0x007fffffu) | 0x3f800000u);
  if (f > 1.41421356f) {
    f = f * 0.5f;
    e += 1;
  }
  const float s = (f - 1.0f) / (f + 1.0f);
  const float s2 = s * s;
  float t = 1.0f / 9.0f;
  t = t * s2 + 1.0f / 7.0f;
  t = t * s2 + 1.0f / 5.0f;
  t = t * s2 + 1.0f / 3.0f;
  t = t * s2 + 1.0f;
  return static_cast<float>(e) * 0.693147182f + 2.0f * s * t;
}

// Natural log of a positive finite double, with plain double arithmetic (no
// libm, whose implementation may differ between machines): x = f 2^e with f in
// [sqrt(1/2), sqrt(2)), log x = e ln 2 + 2 atanh(s), s = (f - 1) / (f + 1),
// atanh by its series (|s| <= 0.172, 11 terms). Relative error ~1e-16.
// Returns -inf for 0 and NaN for negative or NaN input.
DK_FN double log_double(double x) {
  if (!(x > 0.0)) return x == 0.0 ? -HUGE_VAL : NAN;
  if (x == HUGE_VAL) return x;
  int e = 0;
  // Scale subnormals into the normal range first.
  if (x < 2.2250738585072014e-308) {
    x *= 18014398509481984.0;  // 2^54
    e -= 54;
  }
  uint64_t bits = double_to_bits(x);
  e += static_cast<int>((bits >> 52) & 0x7ff) - 1023;
  bits = (bits & 0x000fffffffffffffull) | 0x3ff0000000000000ull;  // f in [1, 2)
  double f = bits_to_double(bits);
  if (f > 1.4142135623730951) {
    f *= 0.5;
    e += 1;
  }
  const double s = (f - 1.0) / (f + 1.0);
  const double s2 = s * s;
  double t = 1.0 / 23.0;
  t = t * s2 + 1.0 / 21.0;
  t = t * s2 + 1.0 / 19.0;
  t = t * s2 + 1.0 / 17.0;
  t = t * s2 + 1.0 / 15.0;
  t = t * s2 + 1.0 / 13.0;
  t = t * s2 + 1.0 / 11.0;
  t = t * s2 + 1.0 / 9.0;
  t = t * s2 + 1.0 / 7.0;
  t = t * s2 + 1.0 / 5.0;
  t = t * s2 + 1.0 / 3.0;
  t = t * s2 + 1.0;
  return static_cast<double>(e) * 0.6931471805599453 + 2.0 * s * t;
}

// IEEE binary16 -> float32, exact for every input (subnormals, inf, NaN).
DK_FN float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t mag = h & 0x7fffu;
  // Shift exponent and mantissa into place and rescale by 2^112: exact for
  // normals and subnormals because float32 has more exponent range.
  const float scaled = bits_to_float(mag << 13) * 5.192296858534828e+33f;  // 2^112
  const uint32_t finite_bits = float_to_bits(scaled);
  const uint32_t special_bits = 0x7f800000u | (mag & 0x3ffu) << 13;  // inf / NaN
  const uint32_t bits = mag >= 0x7c00u ? special_bits : finite_bits;
  return bits_to_float(sign | bits);
}

// bfloat16 -> float32 (exact: bfloat16 is the top half of a float32).
DK_FN float bf16_bits_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

}  // namespace decodekit
