// 16-lane vectors for the CPU kernels. A VF holds 16 floats as one AVX-512
// register, two AVX2 registers or four SSE registers, depending on the
// instruction set this translation unit is compiled for; every operation is
// applied lane-wise with the same IEEE operation, so a lane's result is the
// same bits in every build (and equal to the scalar twins in decodekit/math.h).
// Requires -ffp-contract=off. Reductions across lanes happen only in the
// fixed orders written here, never in an order the compiler picks.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "decodekit/math.h"
#include "cpu/common/fpenv.h"
#include "cpu/common/isa.h"  // DK_ISA

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace decodekit {
namespace cpu {
// In the build's own namespace: VF and its operations differ per instruction
// set, so one name must never stand for two layouts (the ODR).
namespace DK_ISA {

#if defined(__AVX512F__)
#define DK_NATIVE_LANES 16
#elif defined(__AVX__)
#define DK_NATIVE_LANES 8
#else
#define DK_NATIVE_LANES 4
#endif

constexpr int kVecLanes = 16;
constexpr int kParts = kVecLanes / DK_NATIVE_LANES;

typedef float nf __attribute__((vector_size(4 * DK_NATIVE_LANES)));
typedef int32_t ni __attribute__((vector_size(4 * DK_NATIVE_LANES)));
typedef uint32_t nu __attribute__((vector_size(4 * DK_NATIVE_LANES)));
typedef uint16_t nh __attribute__((vector_size(2 * DK_NATIVE_LANES)));
// Unaligned views for loads and stores (one native register each, so loads
// are never split into smaller moves through the stack).
typedef float nf_u __attribute__((vector_size(4 * DK_NATIVE_LANES), aligned(4), may_alias));
typedef int32_t ni_u __attribute__((vector_size(4 * DK_NATIVE_LANES), aligned(4), may_alias));
typedef uint16_t nh_u __attribute__((vector_size(2 * DK_NATIVE_LANES), aligned(2), may_alias));

#define DK_VINLINE inline __attribute__((always_inline))

struct VF {  // 16 float lanes
  nf p[kParts];
};
struct VI {  // 16 int32 lanes; comparison masks are -1 (true) / 0 (false)
  ni p[kParts];
};

#define DK_LANEWISE(R, A, B, expr)                \
  R r;                                            \
  for (int i = 0; i < kParts; ++i) r.p[i] = expr; \
  return r;

DK_VINLINE VF operator+(VF a, VF b){DK_LANEWISE(VF, a, b, a.p[i] + b.p[i])} DK_VINLINE VF operator-(VF a, VF b){
    DK_LANEWISE(VF, a, b, a.p[i] - b.p[i])} DK_VINLINE VF operator*(VF a, VF b){
    DK_LANEWISE(VF, a, b, a.p[i] * b.p[i])} DK_VINLINE VF operator/(VF a, VF b){
    DK_LANEWISE(VF, a, b, a.p[i] / b.p[i])} DK_VINLINE VI operator>(VF a, VF b){
    DK_LANEWISE(VI, a, b, a.p[i] > b.p[i])} DK_VINLINE VI operator>=(VF a, VF b){
    DK_LANEWISE(VI, a, b, a.p[i] >= b.p[i])} DK_VINLINE VI operator==(VF a, VF b){
    DK_LANEWISE(VI, a, b, a.p[i] == b.p[i])} DK_VINLINE VI operator!=(VF a, VF b){
    DK_LANEWISE(VI, a, b, a.p[i] != b.p[i])} DK_VINLINE VI operator+(VI a, VI b){
    DK_LANEWISE(VI, a, b, a.p[i] + b.p[i])} DK_VINLINE VI operator<(VI a, VI b){
    DK_LANEWISE(VI, a, b, a.p[i] < b.p[i])} DK_VINLINE VI operator|(VI a, VI b){
    DK_LANEWISE(VI, a, b, a.p[i] | b.p[i])} DK_VINLINE VI& operator|=(VI& a, VI b) {
  return a = a | b;
}
DK_VINLINE VI operator&(VI a, VI b){DK_LANEWISE(VI, a, b, a.p[i] & b.p[i])}

// m ? a : b, lane-wise.
DK_VINLINE VF select(VI m, VF a, VF b){DK_LANEWISE(VF, a, b, m.p[i] ? a.p[i] : b.p[i])} DK_VINLINE VI
    select(VI m, VI a, VI b){DK_LANEWISE(VI, a, b, m.p[i] ? a.p[i] : b.p[i])}

// Bit casts between the lane types.
DK_VINLINE VI as_vi(VF v){DK_LANEWISE(VI, v, v, (ni)v.p[i])} DK_VINLINE VF
    as_vf(VI v){DK_LANEWISE(VF, v, v, (nf)v.p[i])} DK_VINLINE VI operator==(VI a, VI b){
        DK_LANEWISE(VI, a, b, a.p[i] == b.p[i])} DK_VINLINE VI operator<=(VI a,
                                                                          VI b){DK_LANEWISE(VI, a, b, a.p[i] <= b.p[i])}

DK_VINLINE VF splat(float x) {
  VF r;
  for (int i = 0; i < kParts; ++i) r.p[i] = nf{} + x;
  return r;
}
DK_VINLINE VI splati(int32_t x) {
  VI r;
  for (int i = 0; i < kParts; ++i) r.p[i] = ni{} + x;
  return r;
}
DK_VINLINE VI iota16() {
  alignas(64) static const int32_t v[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  VI r;
  for (int i = 0; i < kParts; ++i) r.p[i] = *reinterpret_cast<const ni_u*>(v + i * DK_NATIVE_LANES);
  return r;
}

DK_VINLINE VF load_f32(const float* p) {
  VF r;
  for (int i = 0; i < kParts; ++i) r.p[i] = *reinterpret_cast<const nf_u*>(p + i * DK_NATIVE_LANES);
  return r;
}
DK_VINLINE VI load_i32(const int32_t* p) {
  VI r;
  for (int i = 0; i < kParts; ++i) r.p[i] = *reinterpret_cast<const ni_u*>(p + i * DK_NATIVE_LANES);
  return r;
}
DK_VINLINE void store_f32(float* p, VF v) {
  for (int i = 0; i < kParts; ++i) *reinterpret_cast<nf_u*>(p + i * DK_NATIVE_LANES) = v.p[i];
}
DK_VINLINE void to_array(VF v, float* out) { store_f32(out, v); }
DK_VINLINE void to_array(VI v, int32_t* out) {
  for (int i = 0; i < kParts; ++i) *reinterpret_cast<ni_u*>(out + i * DK_NATIVE_LANES) = v.p[i];
}

// True when any lane of the mask is set.
DK_VINLINE bool any_lane(VI m) {
  ni acc = m.p[0];
  for (int i = 1; i < kParts; ++i) acc |= m.p[i];
#if defined(__AVX512F__)
  return _mm512_test_epi32_mask((__m512i)acc, (__m512i)acc) != 0;
#elif defined(__AVX__)
  return _mm256_movemask_ps((__m256)acc) != 0;
#elif defined(__SSE2__)
  return _mm_movemask_ps((__m128)acc) != 0;
#else
  uint64_t w[sizeof(ni) / 8];
  std::memcpy(w, &acc, sizeof w);
  uint64_t o = 0;
  for (size_t i = 0; i < sizeof(ni) / 8; ++i) o |= w[i];
  return o != 0;
#endif
}

// Bit j set when lane j of the mask is set.
DK_VINLINE uint32_t lane_bits(VI m) {
#if defined(__AVX512F__)
  return _mm512_test_epi32_mask((__m512i)m.p[0], (__m512i)m.p[0]);
#elif defined(__AVX__)
  return static_cast<uint32_t>(_mm256_movemask_ps((__m256)m.p[0])) |
         (static_cast<uint32_t>(_mm256_movemask_ps((__m256)m.p[1])) << 8);
#elif defined(__SSE2__)
  uint32_t r = 0;
  for (int i = 0; i < kParts; ++i) r |= static_cast<uint32_t>(_mm_movemask_ps((__m128)m.p[i])) << (4 * i);
  return r;
#else
  int32_t a[16];
  to_array(m, a);
  uint32_t r = 0;
  for (int j = 0; j < 16; ++j) r |= (a[j] != 0 ? 1u : 0u) << j;
  return r;
#endif
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// For compress_store: row b lists the set bits of b (then zeros).
struct CompressLut {
  alignas(32) int32_t v[256][8];
};
constexpr CompressLut make_compress_lut() {
  CompressLut t{};
  for (int b = 0; b < 256; ++b) {
    int n = 0;
    for (int j = 0; j < 8; ++j)
      if ((b >> j) & 1) t.v[b][n++] = j;
  }
  return t;
}
static constexpr CompressLut kCompressLut = make_compress_lut();
#endif

// Writes the lanes of v whose mask lane is set to dst[0, n), in lane order,
// and returns n. dst must have room for 16 values: lanes past n may be
// written with unspecified values. No data-dependent branch on AVX-512/AVX2.
// dst holds 4-byte values of any type (the stores do not break aliasing).
DK_VINLINE int compress_store(VI m, VI v, void* dst) {
#if defined(__AVX512F__)
  const __mmask16 k = _mm512_test_epi32_mask((__m512i)m.p[0], (__m512i)m.p[0]);
  _mm512_storeu_si512(dst, _mm512_maskz_compress_epi32(k, (__m512i)v.p[0]));
  return __builtin_popcount(static_cast<unsigned>(k));
#elif defined(__AVX2__)
  const uint32_t bits = lane_bits(m);
  int n = 0;
  for (int i = 0; i < 2; ++i) {
    const uint32_t b = (bits >> (8 * i)) & 255u;
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompressLut.v[b]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<char*>(dst) + 4 * n),
                        _mm256_permutevar8x32_epi32((__m256i)v.p[i], perm));
    n += __builtin_popcount(b);
  }
  return n;
#else
  uint32_t bits = lane_bits(m);
  int32_t a[16];
  to_array(v, a);
  int n = 0;
  while (bits) {
    std::memcpy(static_cast<char*>(dst) + 4 * n++, &a[__builtin_ctz(bits)], 4);
    bits &= bits - 1;
  }
  return n;
#endif
}
DK_VINLINE int compress_store(VI m, VF v, void* dst) { return compress_store(m, as_vi(v), dst); }

// The lanes of x and of ids where a > b, to xdst and idst (room for 16 each);
// returns how many. One compare into a mask register on AVX-512.
DK_VINLINE int compress_where_gt(VF a, VF b, VF x, VI ids, float* xdst, int32_t* idst) {
#if defined(__AVX512F__)
  const __mmask16 k = _mm512_cmp_ps_mask((__m512)a.p[0], (__m512)b.p[0], _CMP_GT_OQ);
  _mm512_storeu_ps(xdst, _mm512_maskz_compress_ps(k, (__m512)x.p[0]));
  _mm512_storeu_si512(idst, _mm512_maskz_compress_epi32(k, (__m512i)ids.p[0]));
  return __builtin_popcount(static_cast<unsigned>(k));
#else
  const VI m = a > b;
  compress_store(m, x, xdst);
  return compress_store(m, ids, idst);
#endif
}

// Largest lane (NaN lanes ignored unless every lane is NaN; exact, so any
// order gives the same value).
DK_VINLINE float max_lane(VF v) {
#if defined(__AVX512F__)
  return _mm512_reduce_max_ps((__m512)v.p[0]);
#elif defined(__AVX__)
  __m256 m = _mm256_max_ps((__m256)v.p[0], (__m256)v.p[1]);
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
  return _mm_cvtss_f32(h);
#else
  float a[16];
  to_array(v, a);
  float m = a[0];
  for (int j = 1; j < 16; ++j) m = a[j] > m ? a[j] : m;
  return m;
#endif
}

// binary16 -> float32, exact (as half_bits_to_float in decodekit/math.h).
DK_VINLINE VF load_f16(const uint16_t* p) {
  VF r;
  for (int i = 0; i < kParts; ++i) {
    const nh h = *reinterpret_cast<const nh_u*>(p + i * DK_NATIVE_LANES);
    const nu u = __builtin_convertvector(h, nu);
    const nu sign = (u & 0x8000u) << 16;
    const nu mag = u & 0x7fffu;
    const nf scaled = (nf)(mag << 13) * (nf{} + 5.192296858534828e+33f);  // 2^112
    const nu finite = (nu)scaled;
    const nu special = ((mag & 0x3ffu) << 13) | 0x7f800000u;
    const ni is_special = (ni)(mag >= 0x7c00u);
    const nu bits = is_special ? special : finite;
    r.p[i] = (nf)(sign | bits);
  }
  return r;
}

// bfloat16 -> float32, exact.
DK_VINLINE VF load_bf16(const uint16_t* p) {
  VF r;
  for (int i = 0; i < kParts; ++i) {
    const nh h = *reinterpret_cast<const nh_u*>(p + i * DK_NATIVE_LANES);
    r.p[i] = (nf)(__builtin_convertvector(h, nu) << 16);
  }
  return r;
}

// Lane-wise correctly rounded a * b + c.
DK_VINLINE VF fma16(VF a, VF b, VF c) {
#if defined(__AVX512F__)
  VF r;
  r.p[0] = (nf)_mm512_fmadd_ps((__m512)a.p[0], (__m512)b.p[0], (__m512)c.p[0]);
  return r;
#elif defined(__FMA__)
  DK_LANEWISE(VF, a, b, (nf)_mm256_fmadd_ps((__m256)a.p[i], (__m256)b.p[i], (__m256)c.p[i]))
#else
  float fa[16], fb[16], fc[16];
  to_array(a, fa);
  to_array(b, fb);
  to_array(c, fc);
  for (int j = 0; j < 16; ++j) fa[j] = std::fmaf(fa[j], fb[j], fc[j]);  // libm: exact, slower
  return load_f32(fa);
#endif
}

// 2^f for f in [-0.5, 0.5]: the degree-6 polynomial of exp2_parts in decodekit/math.h.
DK_VINLINE VF exp2_poly16(VF f) {
  VF p = splat(kExp2C6);
  p = fma16(p, f, splat(kExp2C5));
  p = fma16(p, f, splat(kExp2C4));
  p = fma16(p, f, splat(kExp2C3));
  p = fma16(p, f, splat(kExp2C2));
  p = fma16(p, f, splat(kExp2C1));
  return fma16(p, f, splat(kExp2C0));
}

// The lane-wise twin of exp2_parts in decodekit/math.h.
DK_VINLINE VF exp2_parts16(VF f, VF n) {
  const VF p = exp2_poly16(f);
  VF out;
  for (int i = 0; i < kParts; ++i) out.p[i] = (nf)((nu)p.p[i] + ((nu) __builtin_convertvector(n.p[i], ni) << 23));
  return out;
}

#if defined(__AVX512F__)
// AVX-512 forms of the two exps below, with the same bits in every lane that
// is in range: n = round(z) by vrndscaleps (the same round-to-nearest-even as
// the 1.5 * 2^23 add and subtract), f = z - n by one fused multiply-subtract
// (fma(a, b, -n) exactly), and 2^n applied by vscalefps (p * 2^n is exact: p
// is in [2^-0.5, 2^0.5] and n in [-125, 0], so the result is normal, as the
// exponent-field add gives). Lanes out of range are not clamped first: their
// f may be garbage, but the zero-masking of the last step discards it.
DK_VINLINE VF exp2_finish16(__m512 f, __m512 n, __mmask16 in_range) {
  VF fv;
  fv.p[0] = (nf)f;
  const VF p = exp2_poly16(fv);
  VF out;
  out.p[0] = (nf)_mm512_maskz_scalef_ps(in_range, (__m512)p.p[0], n);
  return out;
}
#endif

// exp(x) for x <= 0: the lane-wise twin of exp_nonpositive in decodekit/math.h
// (the same operations in the same order, so every lane gives the same bits).
DK_VINLINE VF exp16(VF x) {
#if defined(__AVX512F__)
  const __m512 xv = (__m512)x.p[0];
  const __mmask16 in_range = _mm512_cmp_ps_mask(xv, _mm512_set1_ps(kExpLowest), _CMP_GT_OQ);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xv, _mm512_set1_ps(kExpLog2eHi)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fmsub_ps(xv, _mm512_set1_ps(kExpLog2eHi), n);
  f = _mm512_fmadd_ps(xv, _mm512_set1_ps(kExpLog2eLo), f);
  return exp2_finish16(f, n, in_range);
#else
  const VF lo = splat(kExpLowest);
  const VI in_range = x > lo;
  const VF xc = select(in_range, x, lo);
  const VF n = (xc * splat(kExpLog2eHi) + splat(12582912.0f)) - splat(12582912.0f);
  VF f = fma16(xc, splat(kExpLog2eHi), splat(-0.0f) - n);  // -n exactly, as in the scalar twin
  f = fma16(xc, splat(kExpLog2eLo), f);
  return select(in_range, exp2_parts16(f, n), splat(0.0f));
#endif
}

// exp(d * c) with c = c_hi + c_lo: the lane-wise twin of exp_scaled_nonpositive.
DK_VINLINE VF exp16_scaled(VF d, VF c_hi, VF c_lo) {
#if defined(__AVX512F__)
  const __m512 dv = (__m512)d.p[0], ch = (__m512)c_hi.p[0];
  const __m512 z = _mm512_mul_ps(dv, ch);
  const __mmask16 in_range = _mm512_cmp_ps_mask(z, _mm512_set1_ps(kExp2Lowest), _CMP_GT_OQ);
  const __m512 n = _mm512_roundscale_ps(z, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fmsub_ps(dv, ch, n);
  f = _mm512_fmadd_ps(dv, (__m512)c_lo.p[0], f);
  return exp2_finish16(f, n, in_range);
#else
  const VF lo = splat(kExp2Lowest);
  const VF z = d * c_hi;
  const VI in_range = z > lo;
  const VF zc = select(in_range, z, lo);
  const VF n = (zc + splat(12582912.0f)) - splat(12582912.0f);
  VF f = fma16(d, c_hi, splat(-0.0f) - n);
  f = fma16(d, c_lo, f);
  return select(in_range, exp2_parts16(f, n), splat(0.0f));
#endif
}

// Sum of the 16 lanes in a fixed tree: lane j += lane j + 8, then + 4, + 2, + 1
// (the same pairs in every build, so the same bits).
DK_VINLINE float tree_sum16(VF v) {
#if defined(__AVX512F__)
  const __m512 x = (__m512)v.p[0];
  const __m256 a =
      _mm256_add_ps(_mm512_castps512_ps256(x), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
  const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
  const __m128 d = _mm_add_ss(c, _mm_shuffle_ps(c, c, 1));
  return _mm_cvtss_f32(d);
#elif defined(__AVX__)
  const __m256 a = _mm256_add_ps((__m256)v.p[0], (__m256)v.p[1]);
  const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
  const __m128 d = _mm_add_ss(c, _mm_shuffle_ps(c, c, 1));
  return _mm_cvtss_f32(d);
#else
  float s[16];
  to_array(v, s);
  for (int w = 8; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) s[j] += s[j + w];
  return s[0];
#endif
}

// out[j] = tree_sum16(v[j]) for 16 vectors at once, the same bits (the same pairwise tree:
// lane i + lane i + w for w = 8, 4, 2, 1). The AVX-512 build runs the tree on all 16 vectors
// together (15 vector adds and 30 shuffles instead of 16 separate reductions); the sums land
// in a fixed lane order that one permute puts right.
DK_VINLINE VF tree_sum16x16(const VF* v) {
#if defined(__AVX512F__)
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i) {  // w = 8: [v2i halves summed | v2i+1 halves summed]
    const __m512 x = (__m512)v[2 * i].p[0], y = (__m512)v[2 * i + 1].p[0];
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xEE));
  }
  for (int i = 0; i < 4; ++i)  // w = 4: 128-bit lanes 0+1 and 2+3 of each half
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // w = 2: elements 0+2 and 1+3 of each 128-bit lane
    c[i] =
        _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44), _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
  // w = 1: elements 0+1 of each pair
  const __m512 d = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));
  // Lane L of d holds the sum of vector idx[L]; scatter back to position order.
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  VF r;
  r.p[0] = (nf)_mm512_permutexvar_ps(order, d);
  return r;
#else
  float s[16];
  for (int j = 0; j < 16; ++j) s[j] = tree_sum16(v[j]);
  return load_f32(s);
#endif
}

// 16 float64 lanes (lane j accumulates the j-th float lane of every add).
struct Acc16d {
#if defined(__AVX512F__)
  __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
  DK_VINLINE void add(VF v) {
    const __m512 x = (__m512)v.p[0];
    lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(x)));
    hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1))));
  }
  DK_VINLINE void lanes(double* out) const {
    _mm512_storeu_pd(out, lo);
    _mm512_storeu_pd(out + 8, hi);
  }
#elif defined(__AVX__)
  __m256d q[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
  DK_VINLINE void add(VF v) {
    for (int i = 0; i < 2; ++i) {
      const __m256 x = (__m256)v.p[i];
      q[2 * i] = _mm256_add_pd(q[2 * i], _mm256_cvtps_pd(_mm256_castps256_ps128(x)));
      q[2 * i + 1] = _mm256_add_pd(q[2 * i + 1], _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
    }
  }
  DK_VINLINE void lanes(double* out) const {
    for (int i = 0; i < 4; ++i) _mm256_storeu_pd(out + 4 * i, q[i]);
  }
#else
  double d[16] = {0};
  DK_VINLINE void add(VF v) {
    float f[16];
    to_array(v, f);
    for (int j = 0; j < 16; ++j) d[j] += static_cast<double>(f[j]);
  }
  DK_VINLINE void lanes(double* out) const { std::memcpy(out, d, sizeof d); }
#endif
  // Lane-wise this += o (the same bits in every build).
  DK_VINLINE void merge(const Acc16d& o) {
#if defined(__AVX512F__)
    lo = _mm512_add_pd(lo, o.lo);
    hi = _mm512_add_pd(hi, o.hi);
#elif defined(__AVX__)
    for (int i = 0; i < 4; ++i) q[i] = _mm256_add_pd(q[i], o.q[i]);
#else
    for (int j = 0; j < 16; ++j) d[j] += o.d[j];
#endif
  }
  // Fixed tree: lane j += lane j + 8, then + 4, + 2, + 1.
  DK_VINLINE double sum() const {
    double s[16];
    lanes(s);
    for (int w = 8; w >= 1; w /= 2)
      for (int j = 0; j < w; ++j) s[j] += s[j + w];
    return s[0];
  }
};

#undef DK_LANEWISE

}  // namespace DK_ISA
}  // namespace cpu
}  // namespace decodekit
