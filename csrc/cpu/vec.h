// 16-lane float vectors for the CPU kernels, written with GCC/Clang vector
// extensions. Each function applies exactly the same IEEE operations, in the
// same order, as its scalar twin in decodekit/math.h, so a lane's result is the
// same bits whatever the instruction set the compiler lowers it to (one
// AVX-512 register, two AVX2 registers, four SSE registers) and equal to the
// scalar function. Requires -ffp-contract=off.
#pragma once

#include <cstdint>
#include <cstring>

namespace decodekit {
namespace cpu {

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));
typedef float v8f __attribute__((vector_size(32)));
typedef double v8d __attribute__((vector_size(64)));

#define DK_VINLINE inline __attribute__((always_inline))

DK_VINLINE v16f splat(float x) { return v16f{} + x; }
DK_VINLINE v16i splati(int32_t x) { return v16i{} + x; }
DK_VINLINE v16i iota16() { return v16i{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}; }

DK_VINLINE v16f load_f32(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
DK_VINLINE void store_f32(float* p, v16f v) { std::memcpy(p, &v, sizeof v); }

// binary16 -> float32, exact (as half_bits_to_float).
DK_VINLINE v16f load_f16(const uint16_t* p) {
  v16h h;
  std::memcpy(&h, p, sizeof h);
  const v16u u = __builtin_convertvector(h, v16u);
  const v16u sign = (u & 0x8000u) << 16;
  const v16u mag = u & 0x7fffu;
  const v16f scaled = (v16f)(mag << 13) * splat(5.192296858534828e+33f);
  const v16u finite = (v16u)scaled;
  const v16u special = ((mag & 0x3ffu) << 13) | 0x7f800000u;
  const v16u bits = (v16u)((mag >= 0x7c00u) ? (v16i)special : (v16i)finite);
  return (v16f)(sign | bits);
}

// bfloat16 -> float32, exact.
DK_VINLINE v16f load_bf16(const uint16_t* p) {
  v16h h;
  std::memcpy(&h, p, sizeof h);
  return (v16f)(__builtin_convertvector(h, v16u) << 16);
}

// exp(x) for x <= 0: the lane-wise twin of exp_nonpositive in decodekit/math.h.
DK_VINLINE v16f exp16(v16f x) {
  const v16f lo = splat(-87.0f);
  const v16f xc = x > lo ? x : lo;
  const v16f t = xc * splat(1.44269504088896341f);
  const v16f n = (t + splat(12582912.0f)) - splat(12582912.0f);
  v16f r = xc - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  v16f p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  const v16f y = p * (r * r) + r + splat(1.0f);
  const v16i e = __builtin_convertvector(n, v16i) + 127;
  const v16f scale = (v16f)(e << 23);
  const v16f out = y * scale;
  return x > lo ? out : splat(0.0f);
}

// True when any lane of the mask is set.
DK_VINLINE bool any_lane(v16i m) {
  uint64_t w[8];
  std::memcpy(w, &m, sizeof w);
  return (w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7]) != 0;
}

// 16 float64 lanes as two halves: lane j < 8 in lo[j], lane j >= 8 in hi[j - 8].
struct Acc16d {
  v8d lo{};
  v8d hi{};
  DK_VINLINE void add(v16f v) {
    v8f a, b;
    std::memcpy(&a, &v, sizeof a);
    std::memcpy(&b, reinterpret_cast<const char*>(&v) + sizeof a, sizeof b);
    lo += __builtin_convertvector(a, v8d);
    hi += __builtin_convertvector(b, v8d);
  }
  // Fixed tree: lane j += lane j + 8, then + 4, + 2, + 1.
  DK_VINLINE double sum() const {
    const v8d s = lo + hi;
    const double a0 = s[0] + s[4], a1 = s[1] + s[5], a2 = s[2] + s[6], a3 = s[3] + s[7];
    const double b0 = a0 + a2, b1 = a1 + a3;
    return b0 + b1;
  }
};

}  // namespace cpu
}  // namespace decodekit
