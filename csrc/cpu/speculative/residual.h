// The weights of the speculative family's draws (chain and tree verification):
// the residual max(0, p - q) of a target and a draft distribution, one-hot
// drafts, a row with rejected tokens removed, the checks of probability rows and
// the common draw.
#pragma once

#include <cstdint>
#include <limits>

#include "cpu/common/draw.h"
#include "cpu/common/isa.h"
#include "cpu/common/scratch.h"
#include "cpu/common/vec.h"
#include "decodekit/reduce.h"

namespace decodekit {
namespace cpu {
namespace DK_ISA {
namespace detail {

inline double clean(float x) { return x > 0.0f ? static_cast<double>(x) : 0.0; }

// w_i = max(0, clean(p_i) - clean(q_i)), with q one-hot at x when q is null and
// absent (zero) when subtract is false; NaN and negative entries count as 0.
struct Residual {
  const float* p;
  const float* q;
  int64_t x;
  bool subtract;
  float sp = 1.0f;  // 1 / (mass of p over the vocabulary): the rows need not be normalised
  float sq = 1.0f;  // 1 / (mass of q)
  // Loads 16 entries from c, zero past n (a full chunk is loaded directly).
  static DK_VINLINE VF load_upto(const float* a, int64_t c, int64_t n) {
    if (c + 16 <= n) return load_f32(a + c);
    float t[16];
    for (int j = 0; j < 16; ++j) t[j] = c + j < n ? a[c + j] : 0.0f;
    return load_f32(t);
  }
  DK_VINLINE VF chunk(int64_t c, int64_t n) const {
    float qa[16];
    VF pv = load_upto(p, c, n);
    const VF zero = splat(0.0f);
    pv = select(pv > zero, pv, zero);
    if (!subtract) return pv;
    pv = pv * splat(sp);
    VF qv;
    if (q) {
      qv = load_upto(q, c, n);
      qv = select(qv > zero, qv, zero) * splat(sq);
    } else {
      for (int j = 0; j < 16; ++j) qa[j] = c + j == x ? 1.0f : 0.0f;
      qv = load_f32(qa);
    }
    const VF w = pv - qv;
    return select(w > zero, w, zero);
  }
  // The weight source of the common draw (cpu/common/draw.h).
  DK_VINLINE VF full(int64_t c) const { return chunk(c, c + 16); }
  DK_VINLINE VF tail(int64_t c, int64_t end) const { return chunk(c, end); }
  float at(int64_t i) const {  // the same float32 operations as chunk(), lane by lane
    const float pc = p[i] > 0.0f ? p[i] : 0.0f;
    if (!subtract) return pc;
    const float qc = q ? (q[i] > 0.0f ? q[i] : 0.0f) * sq : (i == x ? 1.0f : 0.0f);
    const float w = pc * sp - qc;
    return w > 0.0f ? w : 0.0f;
  }
};

// Mass of a probability row over [0, n) (negative and NaN entries count as 0),
// in 16 float64 lanes: the same value whatever the batch.
constexpr float kInfF = std::numeric_limits<float>::infinity();

// Lanes holding invalid probability data: negative, NaN or infinite (!(0 <= x < inf)).
DK_VINLINE VI invalid_lanes(VF x) {
  const VF zero = splat(0.0f), one = splat(1.0f);
  return one > select(x >= zero, select(splat(kInfF) > x, one, zero), zero);
}

inline bool invalid_scalar(float x) { return !(x >= 0.0f && x < kInfF); }

// Whether every entry of a row is finite and >= 0.
inline bool row_valid(const float* p, int64_t n) {
  VI bad = splati(0);
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) bad |= invalid_lanes(load_f32(p + c));
  if (any_lane(bad)) return false;
  for (; c < n; ++c)
    if (invalid_scalar(p[c])) return false;
  return true;
}

// p over [0, n) (negative and NaN entries as 0) with the tokens ex[0, nex) set
// to 0: the residual of a tree node whose one-hot candidates ex were rejected.
struct Excluding {
  const float* p;
  const int64_t* ex;
  int64_t nex;
  DK_VINLINE VF chunk(int64_t c, int64_t n) const {
    VF pv = Residual::load_upto(p, c, n);
    const VF zero = splat(0.0f);
    pv = select(pv > zero, pv, zero);
    bool hit = false;
    for (int64_t k = 0; k < nex; ++k) hit |= ex[k] >= c && ex[k] < c + 16;
    if (!hit) return pv;
    float t[16];
    to_array(pv, t);
    for (int64_t k = 0; k < nex; ++k)
      if (ex[k] >= c && ex[k] < c + 16) t[ex[k] - c] = 0.0f;
    return load_f32(t);
  }
  DK_VINLINE VF full(int64_t c) const { return chunk(c, c + 16); }
  DK_VINLINE VF tail(int64_t c, int64_t end) const { return chunk(c, end); }
  float at(int64_t i) const {
    for (int64_t k = 0; k < nex; ++k)
      if (ex[k] == i) return 0.0f;
    return p[i] > 0.0f ? p[i] : 0.0f;
  }
};

// ln x for the positive normal floats of 16 lanes: x = f 2^e with f in
// [sqrt(1/2), sqrt(2)), ln x = e ln 2 + 2 atanh(s), s = (f - 1) / (f + 1), the
// series to s^9 (|s| <= 0.172: relative error ~1e-8 before float32 rounding).
// IEEE operations only, so every build gives the same bits, and each lane the
// bits of decodekit::log_positive_normal (decodekit/math.h, the CUDA kernels' twin).
DK_VINLINE VF log16(VF x) {
  const VI bits = as_vi(x);
  VI e;
  VF f;
  for (int i = 0; i < kParts; ++i) {
    e.p[i] = (bits.p[i] >> 23) - 127;
    f.p[i] = (nf)((bits.p[i] & 0x007fffff) | 0x3f800000);
  }
  const VI big = f > splat(1.41421356f);
  f = select(big, f * splat(0.5f), f);
  e = e + (big & splati(1));
  const VF s = (f - splat(1.0f)) / (f + splat(1.0f));
  const VF s2 = s * s;
  VF t = splat(1.0f / 9.0f);
  t = t * s2 + splat(1.0f / 7.0f);
  t = t * s2 + splat(1.0f / 5.0f);
  t = t * s2 + splat(1.0f / 3.0f);
  t = t * s2 + splat(1.0f);
  VF ef;
  for (int i = 0; i < kParts; ++i) ef.p[i] = __builtin_convertvector(e.p[i], nf);
  return ef * splat(0.693147182f) + splat(2.0f) * s * t;
}

inline double row_mass(const float* p, int64_t n) {
  Acc16d acc;
  const Residual r{p, nullptr, -1, false};
  for (int64_t c = 0; c < n; c += 16) acc.add(r.chunk(c, n));
  return acc.sum();
}

// Inverse CDF in ascending index order with one float64 uniform: the common
// draw of cpu/common/draw.h (block sums in 16 float64 lanes, a split that
// depends only on n, then a scan of the chosen block). Returns -1 when the
// total is 0; zero weights are never drawn.
template <class S>
int64_t draw(const S& r, int64_t n, double u, Buf<double>& scratch) {
  double* sums = scratch.get(reduce::num_blocks(n));
  const double total = block_sums(r, n, sums);
  if (!(total > 0.0)) return -1;
  const int64_t t = draw_from_blocks(r, n, sums, u * total);
  if (t >= 0) return t;
  // Rounding put the target past every positive weight of the later blocks.
  for (int64_t i = n - 1; i >= 0; --i)
    if (r.at(i) > 0.0f) return i;
  return -1;
}

}  // namespace detail
}  // namespace DK_ISA
}  // namespace cpu
}  // namespace decodekit
