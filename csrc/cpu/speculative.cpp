// Lossless speculative sampling of a draft chain (see speculative.h).
//
// Source: Leviathan, Kalman & Matias, "Fast Inference from Transformers via
// Speculative Decoding" (ICML 2023); Chen et al., "Accelerating Large Language
// Model Decoding with Speculative Sampling" (2023). Draft x at position j is
// accepted with probability min(1, p(x) / q(x)); on rejection the token comes
// from the normalised residual max(0, p - q), so every emitted position has
// exactly the target's distribution. Random numbers are Philox streams keyed
// per row (DESIGN.md): a row's result never depends on the batch.
#include "speculative.h"

#include <limits>

#include <algorithm>

#include "decodekit/philox.h"
#include "decodekit/reduce.h"
#include "vec.h"

#include <cstdlib>
#include <new>

#ifndef DK_ISA
#define DK_ISA baseline
#endif

namespace decodekit {
namespace cpu {
namespace DK_ISA {
namespace {

using reduce::kBlock;  // elements per float64 block sum (decodekit/reduce.h)

// Grow-only scratch with internal linkage (a std::vector<double> would share
// its out-of-line members between the per-instruction-set builds of this file).
struct Sums {
  double* p = nullptr;
  int64_t n = 0;
  ~Sums() { std::free(p); }
  double* get(int64_t need) {
    if (need > n) {
      std::free(p);
      p = static_cast<double*>(std::malloc(static_cast<size_t>(need) * sizeof(double)));
      if (!p) throw std::bad_alloc();
      n = need;
    }
    return p;
  }
};

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
  double at(int64_t i) const {  // the same float32 operations as chunk(), lane by lane
    const float pc = p[i] > 0.0f ? p[i] : 0.0f;
    if (!subtract) return pc;
    const float qc = q ? (q[i] > 0.0f ? q[i] : 0.0f) * sq : (i == x ? 1.0f : 0.0f);
    const float w = pc * sp - qc;
    return w > 0.0f ? static_cast<double>(w) : 0.0;
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
bool row_valid(const float* p, int64_t n) {
  VI bad = splati(0);
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) bad |= invalid_lanes(load_f32(p + c));
  if (any_lane(bad)) return false;
  for (; c < n; ++c)
    if (invalid_scalar(p[c])) return false;
  return true;
}

double row_mass(const float* p, int64_t n) {
  Acc16d acc;
  const Residual r{p, nullptr, -1, false};
  for (int64_t c = 0; c < n; c += 16) acc.add(r.chunk(c, n));
  return acc.sum();
}

// Inverse CDF in ascending index order with one float64 uniform: block sums in
// 16 float64 lanes (a split that depends only on n), then a sequential scan of
// the chosen block. Returns -1 when the total is 0; zero weights never drawn.
int64_t draw(const Residual& r, int64_t n, double u, Sums& scratch) {
  const int64_t nblocks = (n + kBlock - 1) / kBlock;
  double* sums = scratch.get(nblocks);
  double total = 0.0;
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    Acc16d acc;
    const int64_t end = std::min(n, (blk + 1) * kBlock);
    for (int64_t c = blk * kBlock; c < end; c += 16) acc.add(r.chunk(c, end));
    sums[blk] = acc.sum();
    total += sums[blk];
  }
  if (!(total > 0.0)) return -1;
  const double target = u * total;
  double cum = 0.0;
  int64_t blk = 0;
  for (; blk < nblocks; ++blk) {
    if (cum + sums[blk] > target) break;
    cum += sums[blk];
  }
  int64_t last = -1;
  for (int64_t i = std::min(blk, nblocks - 1) * kBlock; i < n; ++i) {
    const double wi = r.at(i);
    if (!(wi > 0.0)) continue;
    last = i;
    cum += wi;
    if (cum > target) return i;
  }
  if (last < 0)  // rounding put the target past every positive weight of the later blocks
    for (int64_t i = n - 1; i >= 0; --i)
      if (r.at(i) > 0.0) return i;
  return last;
}

}  // namespace

void chain_speculative_sampling(const float* draft_probs, const int64_t* draft_ids, const float* target_probs,
                                int64_t B, int64_t K, int64_t V, int64_t vocab_size, RowParam<int64_t> seed,
                                RowParam<int64_t> offset, int num_threads, int64_t* out, int64_t* num_accepted,
                                int64_t* num_emitted) {
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, B)));
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t b = 0; b < B; ++b) {
    const IeeeDenormals ieee;
    thread_local Sums sums;
    const uint64_t s = static_cast<uint64_t>(seed.at(b)), o = static_cast<uint64_t>(offset.at(b));
    int64_t* row_out = out + b * (K + 1);
    std::fill(row_out, row_out + K + 1, int64_t{-1});
    const int64_t* d = draft_ids + b * K;
    int64_t n = 0;  // real drafts: the leading ids in [0, vocab_size)
    while (n < K && d[n] >= 0 && d[n] < vocab_size) ++n;
    const PhiloxStreamRef accept{s, o, kStreamSpecAccept};
    int64_t j = 0;
    bool invalid = false;  // a row read here holds NaN, inf or a negative entry: the request is marked
    for (; j < n; ++j) {
      const float* p = target_probs + (b * (K + 1) + j) * V;
      const float* q = draft_probs ? draft_probs + (b * K + j) * V : nullptr;
      const int64_t x = d[j];
      if (!row_valid(p, vocab_size) || (q && !row_valid(q, vocab_size))) {
        invalid = true;
        break;
      }
      // Normalise over the vocabulary so unnormalised rows and padding columns are handled.
      const double mp = row_mass(p, vocab_size);
      const double mq = q ? row_mass(q, vocab_size) : 1.0;
      const double px = mp > 0.0 ? clean(p[x]) / mp : 0.0;
      const double qx = q ? (mq > 0.0 ? clean(q[x]) / mq : 0.0) : 1.0;
      // A draft the draft distribution gives probability 0 cannot have been drawn from it: it is
      // rejected (accepting it whatever u would bias the output), and the residual decides.
      if (qx > 0.0 && accept.uniform_double(static_cast<uint64_t>(j)) * qx < px) {
        row_out[j] = x;
        continue;
      }
      const double u = PhiloxStreamRef{s, o, static_cast<uint32_t>(kStreamSpecResidual + j)}.uniform_double(0);
      Residual res{p, q, x, true};
      res.sp = mp > 0.0 ? static_cast<float>(1.0 / mp) : 0.0f;
      res.sq = mq > 0.0 ? static_cast<float>(1.0 / mq) : 0.0f;
      int64_t t = draw(res, vocab_size, u, sums);
      if (t < 0) t = draw(Residual{p, nullptr, -1, false}, vocab_size, u, sums);
      row_out[j] = t;  // -1 only when the target row has no mass at all
      break;
    }
    if (invalid) {
      num_accepted[b] = j;
      num_emitted[b] = j;  // row_out[j] stays -1
      continue;
    }
    if (j == n) {  // every real draft accepted: the bonus token
      const float* p = target_probs + (b * (K + 1) + n) * V;
      if (!row_valid(p, vocab_size)) {
        num_accepted[b] = n;
        num_emitted[b] = n;
        continue;
      }
      const double u = PhiloxStreamRef{s, o, static_cast<uint32_t>(kStreamSpecResidual + n)}.uniform_double(0);
      row_out[n] = draw(Residual{p, nullptr, -1, false}, vocab_size, u, sums);
      num_accepted[b] = n;
    } else {
      num_accepted[b] = j;
    }
    num_emitted[b] = num_accepted[b] + (row_out[num_accepted[b]] >= 0 ? 1 : 0);
  }
}

int check_probability_rows(const float* rows, int64_t nrows, int64_t V, int64_t vocab_size, bool need_mass,
                           int num_threads) {
  int bad = 0, empty = 0;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, nrows)));
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1) reduction(| : bad, empty)
  for (int64_t r = 0; r < nrows; ++r) {
    const IeeeDenormals ieee;
    const float* row = rows + r * V;
    VI row_bad = splati(0);
    VF mx = splat(0.0f);
    int64_t c = 0;
    for (; c + 16 <= V; c += 16) {
      const VF x = load_f32(row + c);
      row_bad |= invalid_lanes(x);
      if (c + 16 <= vocab_size) mx = select(x > mx, x, mx);
    }
    float lanes[16];
    to_array(mx, lanes);
    float m = 0.0f;
    for (int j = 0; j < 16; ++j) m = std::max(m, lanes[j]);
    bool tail_bad = false;
    for (int64_t i = c; i < V; ++i) tail_bad |= invalid_scalar(row[i]);
    for (int64_t i = (vocab_size / 16) * 16; i < vocab_size; ++i) m = std::max(m, row[i] > 0.0f ? row[i] : 0.0f);
    bad |= (any_lane(row_bad) || tail_bad) ? 1 : 0;
    empty |= (need_mass && !(m > 0.0f)) ? 1 : 0;
  }
  return bad ? 1 : (empty ? 2 : 0);
}

}  // namespace DK_ISA
}  // namespace cpu
}  // namespace decodekit
