// CPU kernels of the sampling family (see sampling.h and DESIGN.md).
//
// Every row is processed by one thread with a fixed 16-lane reduction order
// that depends only on the vocabulary size, so a row's result is bit-identical
// whatever the batch, its position, the thread count or the instruction set.
// This file is compiled once per instruction set (AVX-512, AVX2, baseline
// x86-64) into namespace DK_ISA; dispatch.cpp picks one at run time. The
// lane-wise arithmetic is the same IEEE operations in every build
// (-ffp-contract=off, explicit FMAs), so all builds give the same bits.
//
// The sampler never sorts the vocabulary:
//   pass A   one streaming read of the row: max, argmax, NaN/+inf flags and,
//            when top-k is on, each 256-token chunk's maximum; the exact top-k
//            candidates are then gathered (a bounded buffer compacted with
//            nth_element) from the few chunks whose maximum reaches the k-th
//            largest chunk maximum, re-read from cache.
//   pass B   (no top-k) exp((x - max) * (1/T)) with 16 float64 lanes: either block
//            sums for a direct inverse-CDF draw (no filter / min-p only), or a
//            gather of the only tokens that can be in the top-p nucleus
//            (a token with weight <= (1 - p) W / V never is). For float32 logits
//            with top-p alone or no filter, passes A and B are one read of the
//            row (each block relative to the running maximum, rescaled at the
//            end: nucleus_online, plain_online); top-p alone also captures the
//            ids of the tokens within 2^-16 of the running maximum in that read
//            and cuts the nucleus among them with exact float64 bucket sums.
//   softmax  reads the row once: each chunk relative to the running maximum,
//            the few segments rescaled at the end.
//   small    the candidates are sorted (rank = logit desc, index asc), cut by
//            top-p in float64, filtered by min-p, and drawn from by inverse
//            CDF in ascending index order with one float64 Philox uniform.
#include "sampling.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <cmath>
#include <limits>
#include <vector>

#include "decodekit/math.h"
#include "decodekit/philox.h"
#include "decodekit/reduce.h"
#include "vec.h"

#ifndef DK_ISA
#define DK_ISA baseline
#endif
#define DK_INLINE inline __attribute__((always_inline))


namespace decodekit {
namespace cpu {
namespace DK_ISA {
namespace {

// The fixed splits (decodekit/reduce.h): 16 lanes, 256-token chunks, 1024-token blocks.
using reduce::kBlock;
using reduce::kChunk;
using reduce::kLanes;
constexpr float kInf = std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------- loading --
struct LoadF32 {
  using T = float;
  static DK_INLINE VF load16(const T* p) { return load_f32(p); }
  static DK_INLINE float load(const T* p, int64_t i) { return p[i]; }
};
struct LoadF16 {
  using T = uint16_t;
  static DK_INLINE VF load16(const T* p) { return load_f16(p); }
  static DK_INLINE float load(const T* p, int64_t i) { return half_bits_to_float(p[i]); }
};
struct LoadBF16 {
  using T = uint16_t;
  static DK_INLINE VF load16(const T* p) { return load_bf16(p); }
  static DK_INLINE float load(const T* p, int64_t i) { return bf16_bits_to_float(p[i]); }
};

// A chunk of 16 float32 values starting at c, -inf past n (tail chunks).
DK_INLINE VF load_tail(const float* x, int64_t c, int64_t n) {
  float tmp[kLanes];
  for (int j = 0; j < kLanes; ++j) tmp[j] = c + j < n ? x[c + j] : -kInf;
  return load_f32(tmp);
}

// ----------------------------------------------------------- top-k buffer --
// A grow-only scratch buffer. Defined here (internal linkage) rather than
// std::vector<float>, whose out-of-line members would be shared between the
// per-instruction-set builds of this file at link time.
template <typename T>
struct Buf {
  T* p = nullptr;
  int64_t n = 0;
  Buf() = default;
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf() { std::free(p); }
  int64_t size() const { return n; }
  T* data() { return p; }
  void release() {
    std::free(p);
    p = nullptr;
    n = 0;
  }
  void resize(int64_t need) {  // contents are not preserved
    if (need <= n) return;
    std::free(p);
    p = static_cast<T*>(std::malloc(static_cast<size_t>(need) * sizeof(T)));
    if (!p) throw std::bad_alloc();
    n = need;
  }
};

struct Cand {
  float x;      // logit (as float32)
  float e;      // exp((x - max) * (1 / T))
  int32_t idx;  // token id
};

// Rank order: logit descending, index ascending on ties.
DK_INLINE bool rank_before(const Cand& a, const Cand& b) {
  return a.x > b.x || (a.x == b.x && a.idx < b.idx);
}

// Keeps the k best (x, idx) seen so far in scan (ascending index) order. Once
// full, a later element equal to the threshold ranks below every kept element
// with that value (its index is higher), so admission is strictly x > thr.
//
// Pass A only records each chunk's maximum (chunk_max); gather_chunks then
// visits the chunks that can hold a top-k element. The k-th largest chunk
// maximum is a lower bound of the k-th largest value (those k maxima are k
// distinct elements), so a chunk whose maximum is below it holds no top-k
// element: for k = 50 of 128k tokens about 50 of 501 chunks are read again
// (from cache), instead of testing and branching on every vector of the row.
struct TopKGather {
  int64_t k = 0;
  int64_t cap = 0;
  std::vector<Cand>* buf = nullptr;
  Buf<float>* chunk_max = nullptr;
  Buf<float>* chunk_tmp = nullptr;
  int64_t n = 0;
  float thr = -kInf;

  void init(int64_t k_, std::vector<Cand>* b, Buf<float>* cmax = nullptr, Buf<float>* ctmp = nullptr) {
    k = k_;
    cap = k_ + std::max<int64_t>(k_, 64);
    buf = b;
    chunk_max = cmax;
    chunk_tmp = ctmp;
    if (static_cast<int64_t>(buf->size()) < cap) buf->resize(cap);
    n = 0;
    thr = -kInf;
  }
  // Where pass A writes the maxima of the ceil(V / kChunk) chunks.
  float* chunk_max_for(int64_t V) {
    chunk_max->resize((V + kChunk - 1) / kChunk);
    return chunk_max->data();
  }
  void compact() {
    Cand* d = buf->data();
    std::nth_element(d, d + (k - 1), d + n, rank_before);
    n = k;
    thr = d[k - 1].x;
  }
  void push(float x, int64_t i) {
    (*buf)[n++] = Cand{x, 0.0f, static_cast<int32_t>(i)};
    if (n == cap) compact();
  }
  // Gathers the top-k candidates of the float32 row x, whose chunk maxima
  // pass A stored (elements at -inf are never candidates).
  void gather_chunks(const float* x, int64_t V) {
    const int64_t nch = (V + kChunk - 1) / kChunk;
    const float* cm = chunk_max->data();
    float lower = -kInf;  // <= the k-th largest value
    if (k <= nch) {
      chunk_tmp->resize(nch);
      float* t = chunk_tmp->data();
      std::memcpy(t, cm, static_cast<size_t>(nch) * sizeof(float));
      std::nth_element(t, t + (k - 1), t + nch, [](float a, float b) { return a > b; });
      lower = t[k - 1];
    }
    // Admit x >= lower (compared as such, not as x > the float below it: that
    // float can be a denormal, which flush-to-zero would turn into 0) and, as
    // always, x > thr (-inf until the buffer first fills).
    thr = -kInf;
    const VF vlower = splat(lower);
    for (int64_t ch = 0; ch < nch; ++ch) {
      if (!(cm[ch] >= lower && cm[ch] > thr)) continue;
      const int64_t end = std::min(V, (ch + 1) * kChunk);
      for (int64_t c = ch * kChunk; c < end; c += kLanes) {
        const VF xs = c + kLanes <= end ? load_f32(x + c) : load_tail(x, c, end);
        uint32_t bits = lane_bits((xs >= vlower) & (xs > splat(thr)));
        while (bits) {  // lanes admitted against the threshold at the vector's start
          const int j = __builtin_ctz(bits);
          bits &= bits - 1;
          push(x[c + j], c + j);
        }
      }
    }
  }
  void finish() {
    if (n > k) compact();
  }
};

struct RowStats {
  float max;
  int64_t argmax;
  bool has_nan;
  bool has_pinf;
};

int64_t first_index_of_max(const float* row, int64_t V, const float* span_maxima, int64_t span, float m);

// Pass A prefetches each line 8 KiB ahead, and one line per chunk 32 KiB
// ahead: with 4 KiB pages the hardware prefetcher stops at every page start,
// and after other work has run (a model forward, an allocation that unmapped
// memory) the page walks of a cold row would otherwise be taken one by one.
// Measured at B=8, V=128256 after a large allocation: 1 thread ~290 -> ~255 us.
template <typename T>
constexpr int64_t kPrefetchElems = 8192 / sizeof(T);
template <typename T>
constexpr int64_t kPageElems = 4096 / sizeof(T);

// Pass A: one streaming read. Records each chunk's maximum in cmax (the top-k
// gather uses them; the argmax is the first index of the row maximum in the
// first chunk that reaches it) and a NaN flag; optionally converts to float32
// into xbuf (which then holds the row for the argmax). The chunk maximum is a
// tree over four vectors at a time, so no long dependency chain runs through
// the stream; +inf is seen as the maximum.
template <typename L>
DK_INLINE RowStats pass_a_impl(const typename L::T* row, int64_t V, float* xbuf, float* cmax) {
  VI vnan = splati(0);
  // One prefetch per 4 KiB page of the row before streaming it, so that the
  // page walks of a cold row overlap instead of stalling the stream one page
  // at a time (see kPrefetchElems).
  for (int64_t q = 0; q < V; q += kPageElems<typename L::T>) __builtin_prefetch(row + q, 0, 0);
  int64_t c = 0;
  auto vmax2 = [](VF a, VF b) __attribute__((always_inline)) { return select(a > b, a, b); };
  float m = -kInf;
  for (; c + kChunk <= V; c += kChunk) {
    VF cm = splat(-kInf);
    for (int64_t j = c; j < c + kChunk; j += 4 * kLanes) {
      VF xs[4];
      for (int q = 0; q < 4; ++q) __builtin_prefetch(row + j + q * kLanes + kPrefetchElems<typename L::T>, 0, 0);
      for (int q = 0; q < 4; ++q) {
        xs[q] = L::load16(row + j + q * kLanes);
        if (xbuf) store_f32(xbuf + j + q * kLanes, xs[q]);
      }
      vnan |= (xs[0] != xs[0]) | (xs[1] != xs[1]) | (xs[2] != xs[2]) | (xs[3] != xs[3]);
      cm = vmax2(cm, vmax2(vmax2(xs[0], xs[1]), vmax2(xs[2], xs[3])));
    }
    const float chunk_max = max_lane(cm);
    cmax[c / kChunk] = chunk_max;
    m = chunk_max > m ? chunk_max : m;
  }
  if (c < V) {  // the last, partial chunk
    VF cm = splat(-kInf);
    for (; c < V; c += kLanes) {
      VF xs;
      if (c + kLanes <= V) {
        xs = L::load16(row + c);
      } else {
        float tmp[kLanes];
        for (int j = 0; j < kLanes; ++j) tmp[j] = c + j < V ? L::load(row, c + j) : -kInf;
        xs = load_f32(tmp);
      }
      if (xbuf) {
        float tmp[kLanes];
        to_array(xs, tmp);
        for (int64_t j = 0; j < kLanes && c + j < V; ++j) xbuf[c + j] = tmp[j];
      }
      vnan |= xs != xs;
      cm = vmax2(cm, xs);
    }
    const float chunk_max = max_lane(cm);
    cmax[V / kChunk] = chunk_max;
    m = chunk_max > m ? chunk_max : m;
  }
  RowStats s{m, 0, any_lane(vnan), m == kInf};
  if (!s.has_nan && m > -kInf) {
    const float* x = xbuf ? xbuf : reinterpret_cast<const float*>(row);  // float32 rows are read in place
    s.argmax = first_index_of_max(x, V, cmax, kChunk, m);
  }
  return s;
}

RowStats pass_a_f32(const float* r, int64_t V, float* xb, float* cmax) {
  return pass_a_impl<LoadF32>(r, V, xb, cmax);
}
RowStats pass_a_f16(const uint16_t* r, int64_t V, float* xb, float* cmax) {
  return pass_a_impl<LoadF16>(r, V, xb, cmax);
}
RowStats pass_a_bf16(const uint16_t* r, int64_t V, float* xb, float* cmax) {
  return pass_a_impl<LoadBF16>(r, V, xb, cmax);
}

// Loads row b into float32: returns a pointer to float32 logits (the input
// itself for float32, else the converted copy in xbuf) and the row stats.
RowStats load_row(const LogitsView& lv, int64_t b, Buf<float>& xbuf, TopKGather* g,
                  const float** x_out) {
  const int64_t V = lv.vocab_size;
  thread_local Buf<float> own_cmax;
  float* cmax = g ? g->chunk_max_for(V) : nullptr;
  if (!cmax) {
    own_cmax.resize((V + kChunk - 1) / kChunk);
    cmax = own_cmax.data();
  }
  RowStats s;
  if (lv.kind == ScalarKind::kFloat32) {
    const float* row = static_cast<const float*>(lv.data) + b * lv.row_stride;
    *x_out = row;
    s = pass_a_f32(row, V, nullptr, cmax);
  } else {
    if (static_cast<int64_t>(xbuf.size()) < V) xbuf.resize(V);
    const uint16_t* row = static_cast<const uint16_t*>(lv.data) + b * lv.row_stride;
    *x_out = xbuf.data();
    s = lv.kind == ScalarKind::kFloat16 ? pass_a_f16(row, V, xbuf.data(), cmax)
                                        : pass_a_bf16(row, V, xbuf.data(), cmax);
  }
  if (g && !s.has_nan) g->gather_chunks(*x_out, V);
  return s;
}

// Pass A over a probability row: max, argmax, a "bad" flag (NaN, negative or
// infinite entries) and the number of positive entries; optionally the exact
// top-k candidates (ranked by probability, lowest index on ties).
RowStats pass_a_probs(const float* row, int64_t V, TopKGather* g, int64_t* npos) {
  VF vmax = splat(-kInf);
  VI vidx = iota16();
  VI vbad = splati(0), vpos = splati(0);
  const VF inf = splat(kInf), zero = splat(0.0f);
  float* cmax = g ? g->chunk_max_for(V) : nullptr;
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    VF cm = splat(-kInf);
    const int64_t end = std::min(V, c0 + kChunk);
    for (int64_t c = c0; c < end; c += kLanes) {
      const VF xs = c + kLanes <= V ? load_f32(row + c) : load_tail(row, c, V);
      const VI valid_lane = iota16() + splati(static_cast<int32_t>(c)) < splati(static_cast<int32_t>(V));
      const VI gt = xs > vmax;
      vmax = select(gt, xs, vmax);
      vidx = select(gt, iota16() + splati(static_cast<int32_t>(c)), vidx);
      vbad |= select(valid_lane, (xs != xs) | (xs == inf) | (zero > xs), splati(0));
      vpos = vpos + select(xs > zero, splati(1), splati(0));
      cm = select(xs > cm, xs, cm);
    }
    if (cmax) cmax[c0 / kChunk] = max_lane(cm);
  }
  RowStats s{-kInf, 0, any_lane(vbad), false};
  if (g && !s.has_nan) g->gather_chunks(row, V);
  float ma[kLanes];
  int32_t ia[kLanes], pa[kLanes];
  to_array(vmax, ma);
  to_array(vidx, ia);
  to_array(vpos, pa);
  int64_t count = 0;
  for (int j = 0; j < kLanes; ++j) {
    count += pa[j];
    if (ma[j] > s.max) s.max = ma[j];
  }
  int64_t best = std::numeric_limits<int64_t>::max();
  for (int j = 0; j < kLanes; ++j)
    if (ma[j] == s.max && ia[j] < best) best = ia[j];
  s.argmax = best;
  *npos = count;
  return s;
}

// --------------------------------------------------------------- weights ---
// A token's sampling weight from its float32 value x. From logits it is
// exp((x - max) / T), so the top token weighs exactly 1; from probabilities
// it is the probability itself. Every pass below is written once for both.
struct LogitWeight {
  static constexpr bool kIdentity = false;
  float m, inv_t;
  ExpScale c;  // inv_t * log2 e as head + tail
  LogitWeight(float m_, float inv_t_) : m(m_), inv_t(inv_t_), c(exp_scale(inv_t_)) {}
  DK_INLINE VF operator()(VF x) const { return exp16_scaled(x - splat(m), splat(c.hi), splat(c.lo)); }
  DK_INLINE float operator()(float x) const { return exp_scaled_nonpositive(x - m, c.hi, c.lo); }
  // A logit below which no weight exceeds bound (0 < bound <= 1). The slack
  // of 1e-3 in log space is far above the exp error (~1e-7 relative) and the
  // float32 rounding of (x - m) * inv_t (<= 87 * 2^-23 ~ 1e-5 absolute).
  float lower_x(float bound) const {
    const double y = static_cast<double>(m) + (log_double(static_cast<double>(bound)) - 1e-3) / static_cast<double>(inv_t);
    return std::nextafter(static_cast<float>(y), -kInf);
  }
};
struct ProbWeight {
  static constexpr bool kIdentity = true;
  DK_INLINE VF operator()(VF x) const { return x; }
  DK_INLINE float operator()(float x) const { return x; }
  float lower_x(float bound) const { return bound; }  // the weight is the value
};

// --------------------------------------------------------------- pass B ----
// Block sums of w_i if w_i >= min_w else 0, in 16 float64 lanes per block of
// kBlock tokens. Returns the total (blocks added in order).
template <class Wt>
// Fast mode (deterministic=False) first adds runs of 16 values per lane in
// float32, then in float64: the block sums then differ from the float64 ones
// by up to 16 u relative (~1e-6) and the draw is still exact in distribution
// up to that rounding, at less cost.
double block_sums(const float* x, int64_t V, const Wt& w, float min_w, double* sums, bool fast = false) {
  double total = 0.0;
  const VF vmin = splat(min_w), zero = splat(0.0f);
  for (int64_t b0 = 0, blk = 0; b0 < V; b0 += kBlock, ++blk) {
    const int64_t end = std::min(V, b0 + kBlock);
    Acc16d acc;
    int64_t c = b0;
    if (fast) {
      for (; c + 16 * kLanes <= end; c += 16 * kLanes) {
        VF run = zero;
        for (int64_t k = 0; k < 16 * kLanes; k += kLanes) {
          const VF xs = load_f32(x + c + k);
          const VF e = select(xs > splat(-kInf), w(xs), zero);
          run = run + select(e >= vmin, e, zero);
        }
        acc.add(run);
      }
    }
    // Two float64 accumulators (even / odd vectors of the block), merged in a
    // fixed order: half the dependency chain, the same split for every row.
    Acc16d acc_odd;
    for (; c + 2 * kLanes <= end; c += 2 * kLanes) {
      const VF xa = load_f32(x + c), xb = load_f32(x + c + kLanes);
      const VF ea = select(xa > splat(-kInf), w(xa), zero), eb = select(xb > splat(-kInf), w(xb), zero);
      acc.add(select(ea >= vmin, ea, zero));
      acc_odd.add(select(eb >= vmin, eb, zero));
    }
    for (; c < end; c += kLanes) {
      const VF xs = c + kLanes <= end ? load_f32(x + c) : load_tail(x, c, end);
      const VF e = select(xs > splat(-kInf), w(xs), zero);
      acc.add(select(e >= vmin, e, zero));
    }
    acc.merge(acc_odd);
    sums[blk] = acc.sum();
    total += sums[blk];
  }
  return total;
}

// Gathers a superset of the top-p nucleus, in two passes and without sorting.
// Pass 1 computes every weight, the total W in float64 lanes and, in float32 lanes, the mass
// above four thresholds tau_j = w_max * 16^-(j+1). If the mass above tau_j
// reaches p W, every nucleus token weighs more than tau_j: the rank-order
// prefix reaches p W before it goes below tau_j. The float32 masses are
// discounted by twice their worst relative rounding error (n u for n terms
// per lane). Otherwise the bound is (1 - p) W / V halved: a token at or below
// it cannot be in the nucleus, since the mass ranked at or below it would be
// at most V times its weight. Pass 2 gathers the tokens above the bound: it
// compares the logits with Wt::lower_x(bound), below which no weight exceeds
// the bound, and computes the weight only there (no weight is stored).
// Returns W.
double mass_discount(int64_t V);
double lane_total(VF v);
template <class Wt>
double nucleus_candidates(const float* x, int64_t V, const Wt& w, float w_max, double p, double W,
                          const double* mass, std::vector<Cand>& out);

template <class Wt>
double gather_nucleus(const float* x, int64_t V, const Wt& w, float w_max, double p, std::vector<Cand>& out) {
  out.clear();
  // Even and odd vectors go to separate float64 accumulators (merged in a
  // fixed order), and the masses add a pair of vectors at a time: shorter
  // dependency chains, the same split for every row.
  Acc16d acc0, acc1;
  const float t0 = w_max * 0.0625f, t1 = t0 * 0.0625f, t2 = t1 * 0.0625f, t3 = t2 * 0.0625f;
  VF m0 = splat(0.0f), m1 = m0, m2 = m0, m3 = m0;
  const VF zero = splat(0.0f), vt0 = splat(t0), vt1 = splat(t1), vt2 = splat(t2), vt3 = splat(t3);
  auto weight = [&](VF xs, int64_t) __attribute__((always_inline)) { return select(xs > splat(-kInf), w(xs), zero); };
  int64_t c = 0;
  for (; c + 2 * kLanes <= V; c += 2 * kLanes) {
    const VF ea = weight(load_f32(x + c), c), eb = weight(load_f32(x + c + kLanes), c + kLanes);
    acc0.add(ea);
    acc1.add(eb);
    m0 = m0 + (select(ea > vt0, ea, zero) + select(eb > vt0, eb, zero));
    m1 = m1 + (select(ea > vt1, ea, zero) + select(eb > vt1, eb, zero));
    m2 = m2 + (select(ea > vt2, ea, zero) + select(eb > vt2, eb, zero));
    m3 = m3 + (select(ea > vt3, ea, zero) + select(eb > vt3, eb, zero));
  }
  for (; c < V; c += kLanes) {
    const VF e = weight(c + kLanes <= V ? load_f32(x + c) : load_tail(x, c, V), c);
    acc0.add(e);
    m0 = m0 + select(e > vt0, e, zero);
    m1 = m1 + select(e > vt1, e, zero);
    m2 = m2 + select(e > vt2, e, zero);
    m3 = m3 + select(e > vt3, e, zero);
  }
  acc0.merge(acc1);
  const double W = acc0.sum();
  const double discount = mass_discount(V);
  const double mass[4] = {lane_total(m0) * discount, lane_total(m1) * discount, lane_total(m2) * discount,
                          lane_total(m3) * discount};
  return nucleus_candidates(x, V, w, w_max, p, W, mass, out);
}

// The float32 lane masses are discounted by twice their worst relative
// rounding error (n u for n terms per lane).
double mass_discount(int64_t V) {
  const double lane_terms = static_cast<double>(V / kLanes + 1);
  return std::max(0.0, 1.0 - 2.0 * lane_terms * 5.9604644775390625e-08);
}

double lane_total(VF v) {
  float a[kLanes];
  to_array(v, a);
  double s = 0.0;
  for (int j = 0; j < kLanes; ++j) s += static_cast<double>(a[j]);
  return s;
}

// Pass 2 of the nucleus gather: from the total W and lower bounds mass[j] of
// the weight above tau_j = w_max * 16^-(j+1), the bound below which no
// nucleus token lies, then the tokens above it (see gather_nucleus).
template <class Wt>
double nucleus_candidates(const float* x, int64_t V, const Wt& w, float w_max, double p, double W,
                          const double* mass, std::vector<Cand>& out) {
  const float t0 = w_max * 0.0625f, t1 = t0 * 0.0625f, t2 = t1 * 0.0625f, t3 = t2 * 0.0625f;
  const double target = p * W;
  float bound = static_cast<float>(0.5 * (1.0 - p) * W / static_cast<double>(V));
  if (mass[0] >= target) bound = std::max(bound, t0);
  else if (mass[1] >= target) bound = std::max(bound, t1);
  else if (mass[2] >= target) bound = std::max(bound, t2);
  else if (mass[3] >= target) bound = std::max(bound, t3);
  const VF vxl = splat(w.lower_x(bound));
  for (int64_t c2 = 0; c2 < V; c2 += kLanes) {
    const VF xs = c2 + kLanes <= V ? load_f32(x + c2) : load_tail(x, c2, V);
    uint32_t bits = lane_bits(xs > vxl);  // load_tail pads with -inf: never above
    if (!bits) continue;
    float ea[kLanes];
    to_array(w(xs), ea);  // the same bits as the lane in pass 1
    while (bits) {
      const int j = __builtin_ctz(bits);
      bits &= bits - 1;
      if (ea[j] > bound) out.push_back(Cand{x[c2 + j], ea[j], static_cast<int32_t>(c2 + j)});
    }
  }
  return W;
}

// The n tokens of a row from c0, loaded 16 at a time (-inf past the end).
struct Span {
  const float* r;
  int64_t n;
  DK_INLINE VF load(int64_t k) const { return k + kLanes <= n ? load_f32(r + k) : load_tail(r, k, n); }
};

// Maximum of row[c0, c0 + n) (NaN lanes ignored, noted in vnan), prefetching
// ahead: the first, memory-bound read of a span in the one-read passes.
float span_max(const float* row, int64_t c0, int64_t n, int64_t V, VI& vnan) {
  if (c0 + kPrefetchElems<float> < V) __builtin_prefetch(row + c0 + kPrefetchElems<float>, 0, 0);
  const Span sp{row + c0, n};
  VF cm = splat(-kInf);
  for (int64_t k = 0; k < n; k += kLanes) {
    const VF xs = sp.load(k);
    cm = select(xs > cm, xs, cm);
    vnan |= xs != xs;
  }
  return max_lane(cm);
}

// The lowest index holding the row maximum m, in the first span (of `span`
// tokens) whose recorded maximum is m.
int64_t first_index_of_max(const float* row, int64_t V, const float* span_maxima, int64_t span, float m) {
  for (int64_t s0 = 0, i = 0; s0 < V; s0 += span, ++i) {
    if (span_maxima[i] != m) continue;
    const int64_t end = std::min(V, s0 + span);
    for (int64_t j = s0; j < end; ++j)
      if (row[j] == m) return j;
  }
  return 0;
}

// Tokens captured per row in the one-read nucleus pass (128 KiB of ids at most).
constexpr int64_t kCaptureCap = 32768;

// Per-thread scratch of nucleus_online's capture.
struct NucleusScratch {
  Buf<int32_t> idx;  // captured token ids (kCaptureCap + 16: compress_store writes 16)
  Buf<float> x, e;   // their logits and weights
  Buf<int32_t> q;    // their buckets
  std::vector<Cand> band;
  void reserve() {
    idx.resize(kCaptureCap + kLanes);
    x.resize(kCaptureCap + kLanes);
    e.resize(kCaptureCap + kLanes);
    q.resize(kCaptureCap + kLanes);
  }
};

// Buckets per octave of weight in the exact nucleus selection, and octaves.
constexpr int kBucketsPerOctave = 8;
constexpr int kOctaves = 16;
constexpr int kBuckets = kBucketsPerOctave * kOctaves;

// Pass A and the nucleus in one read of a float32 row (top-p without top-k,
// T > 0). Each 256-token chunk is loaded once: its maximum (kept for the
// argmax) and NaN flag, then its weights relative to the running maximum m_s,
// added into the segment's float64 lanes; with the row maximum m and
// f_s = exp((m_s - m) / T), W = sum_s W_s f_s. The same loop captures the ids
// of the tokens whose weight relative to m_s exceeds 2^-16.016 (a branch-free
// compress of the lanes, in index order), a superset of the tokens whose final
// weight exceeds 2^-16 since m_s <= m.
//
// The nucleus is then found among the captured tokens, exactly: with weights
// >= 2^-17 (multiples of 2^-40) whose total is below 2^13, every
// float64 partial sum of their weights is exact, whatever the order, so the
// mass of a set does not depend on how it is added. Buckets by
// z = (x - m) * c_hi (log2 of the weight, 8 per octave, 16 octaves, monotone
// in the logit, so a bucket ranks wholly above the next) give the bucket
// holding the p W boundary; only that bucket is sorted by rank (logit desc,
// index asc) and scanned. The kept set, in index order, is what the rank-order
// running sum of top_p_select_sorted_input keeps, bit for bit; *cut is set.
//
// If the capture would exceed kCaptureCap (a flat row), the rest of the row
// falls back to float32 mass lanes above tau_j = 16^-(j+1) relative to m_s
// (the masses of the captured part are added exactly); if the boundary lies
// below 2^-16, or the weight above it reaches 4096, the masses feed
// nucleus_candidates, which gathers a superset of the nucleus from a second
// read of the row (from cache) for apply_chain to cut. Returns the row stats;
// W and the candidates only for a valid row.
RowStats nucleus_online(const float* row, int64_t V, float inv_t, double p, Buf<float>& cmax_buf,
                        Buf<double>& seg_buf, NucleusScratch& ns, std::vector<Cand>& out, double* W_out,
                        bool* cut) {
  out.clear();
  *cut = false;
  const int64_t nch = (V + kChunk - 1) / kChunk;
  cmax_buf.resize(nch);
  seg_buf.resize(6 * nch + 6);  // (m_s, W_s, M_s[0..3]) per segment
  ns.reserve();
  float* cmax = cmax_buf.data();
  double* seg = seg_buf.data();
  int32_t* cap = ns.idx.data();
  float* cx = ns.x.data();
  int64_t ncap = 0;
  bool capturing = true;
  int64_t nseg = 0;
  float m = -kInf;
  VI vnan = splati(0);
  const ExpScale ec = exp_scale(inv_t);
  const VF zero = splat(0.0f), vch = splat(ec.hi), vcl = splat(ec.lo);
  // d = x - m_s above this captures every token whose final z = d * c_hi
  // exceeds -16 (slack 1e-3, far above the roundings of d and z).
  const VF vdcap = splat(static_cast<float>(-16.016 / static_cast<double>(ec.hi)));
  const VF vt0 = splat(0.0625f), vt1 = splat(0.00390625f), vt2 = splat(0.000244140625f),
           vt3 = splat(1.52587890625e-05f);
  Acc16d acc, acc_odd;
  VF m0 = zero, m1 = zero, m2 = zero, m3 = zero;
  auto flush = [&]() {
    if (m > -kInf && m < kInf) {
      double* q = seg + 6 * nseg++;
      acc.merge(acc_odd);
      q[0] = static_cast<double>(m);
      q[1] = acc.sum();
      q[2] = lane_total(m0);
      q[3] = lane_total(m1);
      q[4] = lane_total(m2);
      q[5] = lane_total(m3);
    }
    acc = Acc16d{};
    acc_odd = Acc16d{};
    m0 = m1 = m2 = m3 = zero;
  };
  const VI lane_ids = iota16();
  for (int64_t ch = 0; ch < nch; ++ch) {
    const int64_t c0 = ch * kChunk;
    const Span sp{row + c0, std::min(kChunk, V - c0)};
    const int64_t n = sp.n;
    auto load = [&](int64_t k) __attribute__((always_inline)) { return sp.load(k); };
    const float chunk_max = span_max(row, c0, n, V, vnan);
    cmax[ch] = chunk_max;
    if (chunk_max > m) {
      flush();
      m = chunk_max;
    }
    if (!(m > -kInf) || m == kInf) continue;  // nothing finite yet, or +inf (the row is invalid)
    const VF vm = splat(m);
    auto weight = [&](VF d) __attribute__((always_inline)) { return exp16_scaled(d, vch, vcl); };  // 0 at -inf
    if (capturing && ncap + kChunk > kCaptureCap) capturing = false;
    int64_t k = 0;
    if (capturing) {
      for (; k + 2 * kLanes <= n; k += 2 * kLanes) {
        const VF xa = load(k), xb = load(k + kLanes);
        const VF da = xa - vm, db = xb - vm;
        acc.add(weight(da));
        acc_odd.add(weight(db));
        const VI ia = lane_ids + splati(static_cast<int32_t>(c0 + k));
        ncap += compress_where_gt(da, vdcap, xa, ia, cx + ncap, cap + ncap);
        ncap += compress_where_gt(db, vdcap, xb, ia + splati(kLanes), cx + ncap, cap + ncap);
      }
      for (; k < n; k += kLanes) {
        const VF xs = load(k);
        const VF d = xs - vm;
        acc.add(weight(d));
        ncap += compress_where_gt(d, vdcap, xs, lane_ids + splati(static_cast<int32_t>(c0 + k)), cx + ncap, cap + ncap);
      }
      continue;
    }
    for (; k + 2 * kLanes <= n; k += 2 * kLanes) {  // every value into float64 lanes, as gather_nucleus
      const VF ea = weight(load(k) - vm), eb = weight(load(k + kLanes) - vm);
      acc.add(ea);
      acc_odd.add(eb);
      m0 = m0 + (select(ea > vt0, ea, zero) + select(eb > vt0, eb, zero));
      m1 = m1 + (select(ea > vt1, ea, zero) + select(eb > vt1, eb, zero));
      m2 = m2 + (select(ea > vt2, ea, zero) + select(eb > vt2, eb, zero));
      m3 = m3 + (select(ea > vt3, ea, zero) + select(eb > vt3, eb, zero));
    }
    for (; k < n; k += kLanes) {
      const VF e = weight(load(k) - vm);
      acc.add(e);
      m0 = m0 + select(e > vt0, e, zero);
      m1 = m1 + select(e > vt1, e, zero);
      m2 = m2 + select(e > vt2, e, zero);
      m3 = m3 + select(e > vt3, e, zero);
    }
  }
  flush();
  RowStats st{m, 0, any_lane(vnan), m == kInf};
  if (st.has_nan || !(m > -kInf) || m == kInf) return st;
  st.argmax = first_index_of_max(row, V, cmax, kChunk, m);
  double W = 0.0, mass[4] = {0.0, 0.0, 0.0, 0.0};
  const double discount = mass_discount(V);
  for (int64_t i = 0; i < nseg; ++i) {
    const double* q = seg + 6 * i;
    const float ms = static_cast<float>(q[0]);
    if (ms == m) {  // the last segment: weights are relative to m already
      W += q[1];
      for (int j = 0; j < 4; ++j) mass[j] += q[2 + j] * discount;
      continue;
    }
    const double f = static_cast<double>(exp_scaled_nonpositive(ms - m, ec.hi, ec.lo));
    W += q[1] * f;
    if (!(f > 0.0)) continue;
    int d = 1;
    double level = 0.0625;
    while (d < 4 && level > f * (1.0 - 1e-4)) {
      ++d;
      level *= 0.0625;
    }
    for (int j = 0; j + d < 4; ++j) mass[j + d] += q[2 + j] * f * (1.0 - 1e-4) * discount;
  }
  *W_out = W;

  // The captured tokens whose final z = (x - m) * c_hi exceeds -16, compacted
  // in place (in index order), with their weights and buckets 8 (-z).
  float* ce = ns.e.data();
  int32_t* cq = ns.q.data();
  const VF vm = splat(m), vbuckets = splat(static_cast<float>(kBuckets)),
           vper = splat(static_cast<float>(kBucketsPerOctave));
  int64_t nc = 0;
  for (int64_t i = 0; i < ncap; i += kLanes) {
    const VF xs = load_f32(cx + i);
    const VI ids = load_i32(cap + i);
    const VF d = xs - vm;
    const VF qf = (zero - d * vch) * vper;  // >= 0; lanes past ncap hold old values
    const VI keep = (vbuckets > qf) & (lane_ids < splati(static_cast<int32_t>(ncap - i)));
    VI qi;
    const VF qk = select(keep, qf, zero);
    for (int pi = 0; pi < kParts; ++pi) qi.p[pi] = __builtin_convertvector(qk.p[pi], ni);
    compress_store(keep, exp16_scaled(d, vch, vcl), ce + nc);
    compress_store(keep, qi, cq + nc);
    compress_store(keep, xs, cx + nc);  // nc <= i: never past what this step has read
    nc += compress_store(keep, ids, cap + nc);
  }
  if (capturing && W < 4096.0) {
    // Exact bucket masses (four histograms so that neighbours in one bucket
    // do not wait on each other's add; merging them changes no bit).
    double h4[4][kBuckets] = {};
    int64_t i = 0;
    for (; i + 4 <= nc; i += 4)
      for (int j = 0; j < 4; ++j) h4[j][cq[i + j]] += static_cast<double>(ce[i + j]);
    for (; i < nc; ++i) h4[0][cq[i]] += static_cast<double>(ce[i]);
    const double target = p * W;
    double before = 0.0;
    int b = 0;
    for (; b < kBuckets; ++b) {
      const double hb = (h4[0][b] + h4[1][b]) + (h4[2][b] + h4[3][b]);
      if (before + hb >= target) break;
      before += hb;
    }
    if (b < kBuckets) {
      // The boundary bucket, in rank order, up to the token that reaches p W.
      std::vector<Cand>& band = ns.band;
      band.clear();
      const VI vb = splati(b);
      for (int64_t i2 = 0; i2 < nc; i2 += kLanes) {
        uint32_t bits = lane_bits((load_i32(cq + i2) == vb) & (lane_ids < splati(static_cast<int32_t>(nc - i2))));
        while (bits) {
          const int64_t j = i2 + __builtin_ctz(bits);
          bits &= bits - 1;
          band.push_back(Cand{cx[j], ce[j], cap[j]});
        }
      }
      std::sort(band.begin(), band.end(), rank_before);
      double run = before;
      size_t L = 0;
      while (L < band.size()) {
        run += static_cast<double>(band[L++].e);
        if (run >= target) break;
      }
      const Cand last = band[L - 1];  // the lowest-ranked kept token
      // Kept: buckets above b, and bucket b down to `last` (rank order:
      // logit desc, index asc).
      const VF vlx = splat(last.x);
      const VI vli = splati(last.idx);
      out.resize(static_cast<size_t>(nc));
      Cand* o = out.data();
      for (int64_t i2 = 0; i2 < nc; i2 += kLanes) {
        const VI qv = load_i32(cq + i2);
        const VF xs = load_f32(cx + i2);
        const VI at_or_above = (xs > vlx) | ((xs == vlx) & (load_i32(cap + i2) <= vli));
        const VI kept = ((qv < vb) | ((qv == vb) & at_or_above)) & (lane_ids < splati(static_cast<int32_t>(nc - i2)));
        uint32_t bits = lane_bits(kept);
        while (bits) {
          const int64_t j = i2 + __builtin_ctz(bits);
          bits &= bits - 1;
          *o++ = Cand{cx[j], ce[j], cap[j]};
        }
      }
      out.resize(static_cast<size_t>(o - out.data()));
      *cut = true;
      return st;
    }
  }
  // Fallback: lower bounds of the masses above tau_j, the captured part exactly.
  const float t[4] = {0.0625f, 0.00390625f, 0.000244140625f, 1.52587890625e-05f};
  for (int64_t i = 0; i < nc; ++i)
    for (int j = 0; j < 4; ++j)
      if (ce[i] > t[j]) mass[j] += static_cast<double>(ce[i]) * (1.0 - 1e-9);
  nucleus_candidates(row, V, LogitWeight{m, inv_t}, 1.0f, p, W, mass, out);
  return st;
}

// Inverse CDF over block sums: the first index (ascending) whose running
// float64 sum exceeds target. Zero-weight tokens are never returned.
template <class Wt>
int64_t draw_from_blocks(const float* x, int64_t V, const Wt& w, float min_w, const double* sums,
                         double target, int64_t fallback) {
  const int64_t nblocks = (V + kBlock - 1) / kBlock;
  double cum = 0.0;
  int64_t blk = 0;
  for (; blk < nblocks; ++blk) {
    if (cum + sums[blk] > target) break;
    cum += sums[blk];
  }
  int64_t last_positive = fallback;
  for (int64_t i = std::min(blk, nblocks - 1) * kBlock; i < V; ++i) {
    if (!(x[i] > -kInf)) continue;
    const float e = w(x[i]);
    if (!(e >= min_w) || e == 0.0f) continue;
    last_positive = i;
    cum += static_cast<double>(e);
    if (cum > target) return i;
  }
  return last_positive;
}

// Pass A and the block sums of a plain temperature draw (no filter) in one
// read of a float32 row. Each kBlock-token block is loaded once: its maximum
// (kept for the argmax) and NaN flag from memory, then its weights relative
// to the running maximum m_b from L1, summed in float64 lanes (even and odd
// vectors apart, as block_sums). With the row maximum m the block's sum is
// rescaled by exp((m_b - m) / T); the draw then walks these sums and, inside
// the chosen block, the weights relative to m (draw_from_blocks). Returns the
// row stats; W and the sums only for a valid row.
RowStats plain_online(const float* row, int64_t V, float inv_t, Buf<float>& bmax_buf, Buf<double>& sums_buf,
                      double* W_out) {
  const int64_t nb = (V + kBlock - 1) / kBlock;
  bmax_buf.resize(2 * nb);  // block maximum, then the running maximum the block used
  sums_buf.resize(nb);
  float* bmax = bmax_buf.data();
  float* bref = bmax + nb;
  double* sums = sums_buf.data();
  float m = -kInf;
  VI vnan = splati(0);
  const ExpScale ec = exp_scale(inv_t);
  const VF vch = splat(ec.hi), vcl = splat(ec.lo);
  for (int64_t blk = 0; blk < nb; ++blk) {
    const int64_t c0 = blk * kBlock;
    const Span sp{row + c0, std::min(kBlock, V - c0)};
    const int64_t n = sp.n;
    auto load = [&](int64_t k) __attribute__((always_inline)) { return sp.load(k); };
    const float block_max = span_max(row, c0, n, V, vnan);
    bmax[blk] = block_max;
    m = block_max > m ? block_max : m;
    bref[blk] = m;
    sums[blk] = 0.0;
    if (!(m > -kInf) || m == kInf) continue;  // nothing finite yet, or +inf (the row is invalid)
    const VF vm = splat(m);
    auto weight = [&](VF xs) __attribute__((always_inline)) { return exp16_scaled(xs - vm, vch, vcl); };  // 0 at -inf
    Acc16d acc, acc_odd;
    int64_t k = 0;
    for (; k + 2 * kLanes <= n; k += 2 * kLanes) {
      acc.add(weight(load(k)));
      acc_odd.add(weight(load(k + kLanes)));
    }
    for (; k < n; k += kLanes) acc.add(weight(load(k)));
    acc.merge(acc_odd);
    sums[blk] = acc.sum();
  }
  RowStats st{m, 0, any_lane(vnan), m == kInf};
  if (st.has_nan || !(m > -kInf) || m == kInf) return st;
  st.argmax = first_index_of_max(row, V, bmax, kBlock, m);
  double W = 0.0;
  float f_ref = kInf, f = 1.0f;
  for (int64_t blk = 0; blk < nb; ++blk) {
    if (bref[blk] != f_ref) {
      f_ref = bref[blk];
      f = f_ref == m ? 1.0f : exp_scaled_nonpositive(f_ref - m, ec.hi, ec.lo);
    }
    if (f != 1.0f) sums[blk] *= static_cast<double>(f);
    W += sums[blk];
  }
  *W_out = W;
  return st;
}

// --------------------------------------------------------- candidate set ---
// Top-p over a candidate list that contains the nucleus: reorders cands so
// that cands[0, L) is the shortest rank-order prefix whose float64 mass reaches
// p * total, and returns L (-1 when even all candidates fall short: then every
// token of the stage is kept). A quickselect on mass (median-of-three pivots,
// partitions summed in float64) narrows the boundary to <= 32 candidates,
// which are sorted and scanned in rank order. Expected O(n), no full sort.
// The partition sums may round differently from one running sum in rank
// order only when p * total lies within float64 rounding of a prefix mass.
int64_t top_p_select(std::vector<Cand>& cands, double p, double total) {
  const double target = p * total;
  Cand* c = cands.data();
  int64_t lo = 0, hi = static_cast<int64_t>(cands.size());
  double acc = 0.0;  // mass of c[0, lo), all kept
  while (hi - lo > 32) {
    const int64_t mid = lo + (hi - lo) / 2;
    Cand a = c[lo], b = c[mid], d = c[hi - 1];
    if (rank_before(b, a)) std::swap(a, b);
    if (rank_before(d, b)) std::swap(b, d);
    if (rank_before(b, a)) std::swap(a, b);
    const Cand pivot = b;  // median of three by rank
    // [lo, split): rank strictly before pivot; then the pivot; then the rest.
    Cand* split = std::partition(c + lo, c + hi, [&](const Cand& x) { return rank_before(x, pivot); });
    Cand* piv = std::find_if(split, c + hi, [&](const Cand& x) { return x.idx == pivot.idx; });
    std::swap(*split, *piv);
    double left = 0.0;
    for (Cand* q = c + lo; q < split; ++q) left += static_cast<double>(q->e);
    const int64_t s = split - c;
    if (acc + left >= target) {
      hi = s;
    } else if (acc + left + static_cast<double>(split->e) >= target) {
      return s + 1;
    } else {
      acc += left + static_cast<double>(split->e);
      lo = s + 1;
    }
  }
  std::sort(c + lo, c + hi, rank_before);
  for (int64_t i = lo; i < hi; ++i) {
    acc += static_cast<double>(c[i].e);
    if (acc >= target) return i + 1;
  }
  return -1;
}

// The same contract as top_p_select for larger candidate lists: a stable
// least-significant-digit radix sort (four 8-bit digits) of the logits'
// order-preserving bit patterns gives the rank order (logit desc; equal logits
// keep their relative order, and the list is in ascending index order, so
// index asc), then one float64 running sum in rank order finds L. No
// data-dependent branches in the sort, so fresh data costs what warm data
// does. cands must be in ascending index order; cands[0, L) come back so too.
int64_t top_p_select_sorted_input(std::vector<Cand>& cands, double p, double total, std::vector<Cand>& tmp) {
  const size_t n = cands.size();
  auto key = [](float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    if (u == 0x80000000u) u = 0;               // -0 ranks with +0
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // ascending in x
    return ~u;                                 // descending in x
  };
  tmp.resize(2 * n);
  Cand* a = tmp.data();
  Cand* bbuf = a + n;
  std::copy(cands.begin(), cands.end(), a);
  uint32_t count[4][256] = {};
  for (size_t i = 0; i < n; ++i) {
    const uint32_t k = key(a[i].x);
    for (int d = 0; d < 4; ++d) ++count[d][(k >> (8 * d)) & 255u];
  }
  for (int d = 0; d < 4; ++d) {
    if (count[d][(key(a[0].x) >> (8 * d)) & 255u] == n) continue;  // one bucket: the pass changes nothing
    uint32_t pos[256];
    uint32_t acc = 0;
    for (int v = 0; v < 256; ++v) {
      pos[v] = acc;
      acc += count[d][v];
    }
    for (size_t i = 0; i < n; ++i) bbuf[pos[(key(a[i].x) >> (8 * d)) & 255u]++] = a[i];
    std::swap(a, bbuf);
  }
  const double target = p * total;
  double run = 0.0;
  int64_t L = -1;
  for (size_t i = 0; i < n; ++i) {
    run += static_cast<double>(a[i].e);
    if (run >= target) {
      L = static_cast<int64_t>(i) + 1;
      break;
    }
  }
  if (L < 0) return -1;
  // Keep exactly the first L in rank order, in index order.
  const uint32_t kb = key(a[L - 1].x);
  const int32_t ib = a[L - 1].idx;
  size_t w = 0;
  for (size_t i = 0; i < n; ++i) {
    const uint32_t k = key(cands[i].x);
    if (k < kb || (k == kb && cands[i].idx <= ib)) cands[w++] = cands[i];
  }
  cands.resize(w);
  return L;
}

// Inverse CDF over candidates in ascending index order.
// Leaves cands sorted by index; *total_out = their float64 mass.
int64_t draw_from_cands(std::vector<Cand>& cands, double u, int64_t fallback, double* total_out) {
  auto by_index = [](const Cand& a, const Cand& b) { return a.idx < b.idx; };
  if (!std::is_sorted(cands.begin(), cands.end(), by_index)) std::sort(cands.begin(), cands.end(), by_index);
  double total = 0.0;
  for (const Cand& c : cands) total += static_cast<double>(c.e);
  *total_out = total;
  const double target = u * total;
  double cum = 0.0;
  int64_t last_positive = fallback;
  for (const Cand& c : cands) {
    if (c.e == 0.0f) continue;
    last_positive = c.idx;
    cum += static_cast<double>(c.e);
    if (cum > target) return c.idx;
  }
  return last_positive;
}

// ------------------------------------------------------------ the chain ----
// Which tokens survive top-k -> top-p -> min-p. Either the whole row passes
// top-k and top-p (full_row: kept = {i : w_i >= min_w}), or `cands` holds
// exactly the kept tokens (in no particular order) with their weights.
struct Kept {
  bool full_row;
  float min_w;
};

struct ChainParams {
  bool use_k;
  int64_t k;
  bool use_p;
  double p;
  bool use_min_p;
  float min_p;
};

// `g` holds the top-k candidates gathered in pass A when cp.use_k. w_max is
// the weight of the top token (1 from logits, the max probability from probs);
// min-p keeps w >= min_p * w_max, in float32.
template <class Wt>
Kept apply_chain(const float* x, int64_t V, const Wt& w, float w_max, const ChainParams& cp, TopKGather& g,
                 std::vector<Cand>& cands, const double* gathered_total = nullptr, bool nucleus_cut = false) {
  const float min_w = cp.use_min_p ? cp.min_p * w_max : 0.0f;
  if (!cp.use_k && !cp.use_p) return Kept{true, min_w};
  double stage_total = 0.0;
  if (nucleus_cut) {
    // nucleus_online found the nucleus itself: cands are exactly the kept tokens
  } else if (cp.use_k) {
    g.finish();
    cands.resize(g.n);
    for (Cand& c : cands) {
      c.e = w(c.x);
      stage_total += static_cast<double>(c.e);
    }
  } else {
    // (nucleus_online may have gathered the candidates already, with pass A)
    stage_total = gathered_total ? *gathered_total : gather_nucleus(x, V, w, w_max, cp.p, cands);
    // No token with weight <= (1 - p) W / V can be in the nucleus.
    const float bound = static_cast<float>(0.5 * (1.0 - cp.p) * stage_total / static_cast<double>(V));
    cands.erase(std::remove_if(cands.begin(), cands.end(), [&](const Cand& c) { return !(c.e > bound); }),
                cands.end());
  }
  if (cp.use_p && !nucleus_cut) {
    // The nucleus gather leaves the candidates in index order: for more than a
    // few dozen, the branch-free radix selection is faster on fresh data.
    thread_local std::vector<Cand> tmp;
    const int64_t keep = !cp.use_k && cands.size() > 64 ? top_p_select_sorted_input(cands, cp.p, stage_total, tmp)
                                                         : top_p_select(cands, cp.p, stage_total);
    if (tmp.capacity() > (size_t{1} << 20)) std::vector<Cand>().swap(tmp);  // do not pin a huge call's memory
    if (keep >= 0) {
      cands.resize(keep);
    } else if (!cp.use_k) {
      return Kept{true, min_w};  // rounding left the nucleus short of p: every token stays
    }
  }
  if (cp.use_min_p) {
    // The top token is always a candidate, so the stage's max weight is w_max.
    cands.erase(std::remove_if(cands.begin(), cands.end(), [&](const Cand& c) { return !(c.e >= min_w); }),
                cands.end());
  }
  return Kept{false, min_w};
}

// Draws from the kept tokens; *W_out = their total weight.
template <class Wt>
int64_t draw_kept(const float* x, int64_t V, const Wt& w, const Kept& kept, std::vector<Cand>& cands,
                  Buf<double>& sums, double u, int64_t fallback, double* W_out, bool fast = false) {
  if (!kept.full_row) return draw_from_cands(cands, u, fallback, W_out);
  sums.resize((V + kBlock - 1) / kBlock);
  const double W = block_sums(x, V, w, kept.min_w, sums.data(), fast);
  *W_out = W;
  return draw_from_blocks(x, V, w, kept.min_w, sums.data(), u * W, fallback);
}

// Is token i kept? cands must be sorted by index (draw_from_cands leaves them so).
template <class Wt>
bool is_kept(int64_t i, const float* x, const Wt& w, const Kept& kept, const std::vector<Cand>& cands) {
  if (kept.full_row) return x[i] > -kInf && w(x[i]) >= kept.min_w;
  auto it = std::lower_bound(cands.begin(), cands.end(), i,
                             [](const Cand& c, int64_t v) { return static_cast<int64_t>(c.idx) < v; });
  return it != cands.end() && it->idx == i;
}

// The n best tokens by value (desc, index asc), sorted; tokens at -inf fill
// the list in index order when fewer than n are finite.
void top_n_by_value(const float* x, int64_t V, int64_t n, std::vector<Cand>& out) {
  n = std::min(n, V);
  TopKGather g;
  g.init(n, &out);
  for (int64_t c = 0; c < V; c += kLanes) {
    const VF xs = c + kLanes <= V ? load_f32(x + c) : load_tail(x, c, V);
    if (any_lane(xs > splat(g.thr))) {
      float xa[kLanes];
      to_array(xs, xa);
      for (int j = 0; j < kLanes; ++j)
        if (xa[j] > g.thr) g.push(xa[j], c + j);
    }
  }
  g.finish();
  out.resize(g.n);
  std::sort(out.begin(), out.end(), rank_before);
  for (int64_t i = 0; static_cast<int64_t>(out.size()) < n && i < V; ++i)
    if (!(x[i] > -kInf)) out.push_back(Cand{x[i], 0.0f, static_cast<int32_t>(i)});
}

// Writes the logprob outputs of row b: the drawn token's and the n best.
template <class F>
void write_logprobs(const LogprobRequest& lp, int64_t b, int64_t token, const float* x, int64_t V,
                    F&& logprob_of, std::vector<Cand>& topn) {
  if (lp.logprobs) lp.logprobs[b] = static_cast<float>(logprob_of(token));
  if (lp.n_top > 0) {
    top_n_by_value(x, V, lp.n_top, topn);
    for (int64_t j = 0; j < lp.n_top; ++j) {
      const bool have = j < static_cast<int64_t>(topn.size());
      lp.top_ids[b * lp.n_top + j] = have ? topn[j].idx : -1;
      lp.top_logprobs[b * lp.n_top + j] =
          have ? static_cast<float>(logprob_of(topn[j].idx)) : -std::numeric_limits<float>::infinity();
    }
  }
}

void write_invalid_logprobs(const LogprobRequest& lp, int64_t b) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  if (lp.logprobs) lp.logprobs[b] = nan;
  for (int64_t j = 0; j < lp.n_top; ++j) {
    lp.top_ids[b * lp.n_top + j] = -1;
    lp.top_logprobs[b * lp.n_top + j] = nan;
  }
}

struct Scratch {
  Buf<float> xbuf;
  std::vector<Cand> cands;
  std::vector<Cand> topn;
  Buf<double> sums;
  Buf<float> cmax;  // chunk maxima of the top-k gather
  Buf<float> ctmp;
  NucleusScratch nucleus;
};

Scratch& thread_scratch() {
  thread_local Scratch s;
  return s;
}

// Per-thread scratch is kept between calls (no allocation on the hot path)
// unless a call needed more than this many entries: then it is freed again,
// so one huge call does not pin its memory for the life of the thread.
constexpr int64_t kKeepScratch = int64_t{1} << 20;

void trim_scratch() {
  Scratch& s = thread_scratch();
  if (s.xbuf.size() > kKeepScratch) s.xbuf.release();
  if (s.sums.size() > kKeepScratch) s.sums.release();
  if (static_cast<int64_t>(s.cands.capacity()) > kKeepScratch) std::vector<Cand>().swap(s.cands);
  if (static_cast<int64_t>(s.topn.capacity()) > kKeepScratch) std::vector<Cand>().swap(s.topn);
}

template <typename F>
void for_each_row(int64_t B, int num_threads, F&& f) {
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, B)));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const IeeeDenormals ieee;
    // Dynamic: the calling thread starts on the rows at once, and a worker
    // that was asleep (after other work ran) joins when it wakes instead of
    // making the call wait for its share. Rows are independent, so which
    // thread takes a row never changes its bits.
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) f(b);
    trim_scratch();
  }
}

// Out-of-range parameters (the Python wrappers reject them unless
// validate=False) make the row invalid instead of giving an arbitrary answer.
bool params_ok(float T, double p, float min_p) {
  return T >= 0.0f && T < kInf && p >= 0.0 && p <= 1.0 && min_p >= 0.0f && min_p <= 1.0f;
}

bool row_is_valid(const RowStats& s, float T) {
  if (!(T >= 0.0f && T < kInf)) return false;
  if (s.has_nan || s.max == -kInf) return false;
  if (T > 0.0f && s.has_pinf) return false;
  return true;
}

int64_t sample_row(const LogitsView& lv, int64_t b, const SamplingParams& prm, const LogprobRequest& lp, bool fast,
                   bool* ok) {
  Scratch& sc = thread_scratch();
  const int64_t V = lv.vocab_size;
  const float T = prm.temperature.at(b);
  const int64_t k = prm.top_k.at(b);
  const ChainParams cp{T > 0.0f && k > 0 && k < V, k, prm.top_p.at(b) < 1.0, prm.top_p.at(b),
                       prm.min_p.at(b) > 0.0f, prm.min_p.at(b)};
  TopKGather g;
  if (cp.use_k && k > 1) g.init(k, &sc.cands, &sc.cmax, &sc.ctmp);
  const float* x = nullptr;
  // Top-p alone, or no filter at all, on float32 logits: pass A and the pass
  // over the weights in one read.
  const bool one_read = lv.kind == ScalarKind::kFloat32 && !cp.use_k && T > 0.0f && T < kInf &&
                        params_ok(T, cp.p, cp.min_p);
  const bool online = one_read && cp.use_p && cp.p > 0.0;
  const bool plain = one_read && !cp.use_p && !cp.use_min_p;
  double online_total = 0.0;
  bool online_cut = false;
  RowStats s;
  if (online) {
    x = static_cast<const float*>(lv.data) + b * lv.row_stride;
    s = nucleus_online(x, V, inverse_temperature(T), cp.p, sc.cmax, sc.sums, sc.nucleus, sc.cands, &online_total,
                       &online_cut);
  } else if (plain) {
    x = static_cast<const float*>(lv.data) + b * lv.row_stride;
    s = plain_online(x, V, inverse_temperature(T), sc.cmax, sc.sums, &online_total);
  } else {
    s = load_row(lv, b, sc.xbuf, (cp.use_k && k > 1) ? &g : nullptr, &x);
  }
  *ok = row_is_valid(s, T) && params_ok(T, cp.p, cp.min_p);
  if (!*ok) {
    write_invalid_logprobs(lp, b);
    return -1;
  }
  const float m = s.max;
  // Greedy: T == 0, top_k == 1 and top_p == 0 all keep only the top token.
  const bool greedy = T == 0.0f || (cp.use_k && k == 1) || cp.p <= 0.0;
  int64_t token = s.argmax;
  const LogitWeight w{m, greedy ? 1.0f : inverse_temperature(T)};
  Kept kept{true, 0.0f};
  double W = 1.0;
  if (!greedy) {
    const double u = PhiloxStreamRef{static_cast<uint64_t>(prm.seed.at(b)), static_cast<uint64_t>(prm.offset.at(b)),
                                     kStreamSample}.uniform_double(0);
    if (plain) {  // the block sums are ready: draw from them
      W = online_total;
      token = draw_from_blocks(x, V, w, 0.0f, sc.sums.data(), u * W, s.argmax);
    } else {
      kept = apply_chain(x, V, w, 1.0f, cp, g, sc.cands, online ? &online_total : nullptr, online_cut);
      token = draw_kept(x, V, w, kept, sc.cands, sc.sums, u, s.argmax, &W, fast);
    }
  }
  if (!lp.active()) return token;
  if (lp.raw) {
    sc.sums.resize((V + kBlock - 1) / kBlock);
    const double log_raw = log_double(block_sums(x, V, LogitWeight{m, 1.0f}, 0.0f, sc.sums.data()));
    write_logprobs(lp, b, token, x, V, [&](int64_t i) { return static_cast<double>(x[i] - m) - log_raw; }, sc.topn);
  } else if (greedy) {
    const int64_t top = s.argmax;
    write_logprobs(lp, b, token, x, V,
                   [&](int64_t i) { return i == top ? 0.0 : -std::numeric_limits<double>::infinity(); }, sc.topn);
  } else {
    const double logW = log_double(W);
    write_logprobs(lp, b, token, x, V, [&](int64_t i) {
      return is_kept(i, x, w, kept, sc.cands) ? static_cast<double>((x[i] - m) * w.inv_t) - logW
                                               : -std::numeric_limits<double>::infinity();
    }, sc.topn);
  }
  return token;
}

// Softmax of one row (T > 0) in one read of the logits. Each 256-token chunk
// is loaded once from memory, its maximum folded into the running maximum
// m_c, and e = exp((x - m_c) / T) computed from L1 and stored. Chunks that
// share m_c form a segment (a handful per row: the running maximum rises
// about ln(#chunks) times); each chunk adds its values in runs of 16 per lane
// in float32 (relative error <= 16 u ~ 1e-6) into its segment's float64
// lanes. With the row maximum m, f = exp((m_seg - m) / T) and S = sum over
// segments of S_seg f (float64, in order), the final pass scales each chunk
// by f / S. From the chunk holding the maximum on, that is e / S exactly as a
// two-pass softmax gives; earlier chunks carry one more rounding. Returns
// false for an invalid row (NaN, no finite logit, +inf).
template <typename L>
bool softmax_online(const typename L::T* row, int64_t V, float inv_t, float* out, Buf<float>& mref_buf,
                    Buf<double>& seg_buf) {
  const int64_t nch = (V + kChunk - 1) / kChunk;
  mref_buf.resize(nch);
  seg_buf.resize(2 * nch + 2);  // (m_seg, S_seg) pairs
  float* mref = mref_buf.data();
  double* seg = seg_buf.data();
  int64_t nseg = 0;
  float m = -kInf;
  VI vnan = splati(0);  // +inf needs no flag: it becomes the running maximum
  const ExpScale ec = exp_scale(inv_t);
  const VF vch = splat(ec.hi), vcl = splat(ec.lo);
  Acc16d acc;
  auto flush = [&]() {
    if (m > -kInf) {
      seg[2 * nseg] = static_cast<double>(m);
      seg[2 * nseg + 1] = acc.sum();
      ++nseg;
    }
    acc = Acc16d{};
  };
  for (int64_t ch = 0; ch < nch; ++ch) {
    const int64_t c0 = ch * kChunk;
    const int64_t n = std::min(kChunk, V - c0);
    const typename L::T* r = row + c0;
    float* o = out + c0;
    auto load = [&](int64_t k) __attribute__((always_inline)) {
      if (k + kLanes <= n) return L::load16(r + k);
      float tmp[kLanes];
      for (int j = 0; j < kLanes; ++j) tmp[j] = k + j < n ? L::load(r, k + j) : -kInf;
      return load_f32(tmp);
    };
    if (c0 + kPrefetchElems<typename L::T> < V) __builtin_prefetch(row + c0 + kPrefetchElems<typename L::T>, 0, 0);
    VF cm = splat(-kInf);
    for (int64_t k = 0; k < n; k += kLanes) {
      const VF xs = load(k);
      cm = select(xs > cm, xs, cm);
      vnan |= xs != xs;
    }
    const float chunk_max = max_lane(cm);
    if (chunk_max > m) {
      flush();
      m = chunk_max;
    }
    mref[ch] = m;
    if (!(m > -kInf) || m == kInf) {  // nothing finite yet (or +inf: the row is invalid)
      std::fill(o, o + n, 0.0f);
      continue;
    }
    const VF vm = splat(m);
    VF run = splat(0.0f);
    int64_t k = 0;
    for (; k + kLanes <= n; k += kLanes) {
      const VF e = exp16_scaled(load(k) - vm, vch, vcl);
      store_f32(o + k, e);
      run = run + e;
    }
    if (k < n) {
      const VF e = exp16_scaled(load(k) - vm, vch, vcl);
      float ea[kLanes];
      to_array(e, ea);
      for (int64_t j = 0; k + j < n; ++j) o[k + j] = ea[j];
      run = run + e;
    }
    acc.add(run);
  }
  flush();
  if (any_lane(vnan) || !(m > -kInf) || m == kInf) return false;
  double S = 0.0;
  for (int64_t i = 0; i < nseg; ++i)
    S += seg[2 * i + 1] * static_cast<double>(exp_scaled_nonpositive(static_cast<float>(seg[2 * i]) - m, ec.hi, ec.lo));
  const double inv_S = 1.0 / S;
  float g = 0.0f, g_ref = kInf;
  for (int64_t ch = 0; ch < nch; ++ch) {
    const int64_t c0 = ch * kChunk;
    const int64_t n = std::min(kChunk, V - c0);
    if (mref[ch] != g_ref) {
      g_ref = mref[ch];
      g = g_ref == m ? static_cast<float>(inv_S)
                     : static_cast<float>(static_cast<double>(exp_scaled_nonpositive(g_ref - m, ec.hi, ec.lo)) * inv_S);
    }
    if (!(g_ref > -kInf)) continue;  // the leading chunks with no finite logit stay 0
    float* o = out + c0;
    const VF vg = splat(g);
    int64_t k = 0;
    for (; k + kLanes <= n; k += kLanes) store_f32(o + k, load_f32(o + k) * vg);
    for (; k < n; ++k) o[k] *= g;
  }
  return true;
}

// ------------------------------------------------------ probability rows ---
struct ProbRow {
  const float* x;
  RowStats s;
  int64_t npos;  // entries > 0
  bool valid;
  Kept kept;
};

// Pass A and the chain for probability row b. A row is invalid when it has a
// NaN, a negative or an infinite entry, or no positive entry.
ProbRow prepare_probs_row(const ProbsView& pv, int64_t b, const FilterParams& fp, Scratch& sc) {
  const int64_t V = pv.vocab_size;
  const int64_t k = fp.top_k.at(b);
  const double p = fp.top_p.at(b);
  const float min_p = fp.min_p.at(b);
  const ChainParams cp{k > 0 && k < V, k, p < 1.0, p, min_p > 0.0f, min_p};
  ProbRow r;
  r.x = pv.data + b * pv.row_stride;
  TopKGather g;
  if (cp.use_k && k > 1) g.init(k, &sc.cands, &sc.cmax, &sc.ctmp);
  r.s = pass_a_probs(r.x, V, (cp.use_k && k > 1) ? &g : nullptr, &r.npos);
  r.valid = !r.s.has_nan && r.s.max > 0.0f && params_ok(0.0f, p, min_p);
  if (!r.valid) return r;
  if ((cp.use_k && k == 1) || p <= 0.0) {  // only the top token
    sc.cands.assign(1, Cand{r.s.max, r.s.max, static_cast<int32_t>(r.s.argmax)});
    r.kept = Kept{false, 0.0f};
    return r;
  }
  r.kept = apply_chain(r.x, V, ProbWeight{}, r.s.max, cp, g, sc.cands);
  return r;
}

// Writes the filtered, renormalised row. A row from which no positive entry
// was removed is copied bit for bit (no renormalisation).
void write_filtered_row(const ProbRow& r, int64_t V, std::vector<Cand>& cands, float* out) {
  if (r.kept.full_row) {
    if (r.kept.min_w <= 0.0f) {
      std::memcpy(out, r.x, static_cast<size_t>(V) * sizeof(float));
      return;
    }
    double W = 0.0;
    int64_t count = 0;
    for (int64_t i = 0; i < V; ++i)
      if (r.x[i] >= r.kept.min_w && r.x[i] > 0.0f) {
        W += static_cast<double>(r.x[i]);
        ++count;
      }
    if (count == r.npos) {
      std::memcpy(out, r.x, static_cast<size_t>(V) * sizeof(float));
      return;
    }
    for (int64_t i = 0; i < V; ++i)
      out[i] = r.x[i] >= r.kept.min_w ? static_cast<float>(static_cast<double>(r.x[i]) / W) : 0.0f;
    return;
  }
  std::sort(cands.begin(), cands.end(), [](const Cand& a, const Cand& c) { return a.idx < c.idx; });
  double W = 0.0;
  int64_t count = 0;
  for (const Cand& c : cands)
    if (c.e > 0.0f) {
      W += static_cast<double>(c.e);
      ++count;
    }
  if (count == r.npos) {
    std::memcpy(out, r.x, static_cast<size_t>(V) * sizeof(float));
    return;
  }
  std::fill(out, out + V, 0.0f);
  for (const Cand& c : cands) out[c.idx] = static_cast<float>(static_cast<double>(c.e) / W);
}

}  // namespace

void softmax(const LogitsView& lv, RowParam<float> temperature, bool /*deterministic*/,
             int num_threads, float* probs) {
  for_each_row(lv.batch, num_threads, [&](int64_t b) {
    Scratch& sc = thread_scratch();
    float* out = probs + b * lv.vocab;
    const float T = temperature.at(b);
    const int64_t V = lv.vocab_size;
    std::fill(out + V, out + lv.vocab, 0.0f);
    if (T > 0.0f && T < kInf) {
      const float inv_t = inverse_temperature(T);
      bool ok;
      if (lv.kind == ScalarKind::kFloat32)
        ok = softmax_online<LoadF32>(static_cast<const float*>(lv.data) + b * lv.row_stride, V, inv_t, out, sc.cmax,
                                     sc.sums);
      else if (lv.kind == ScalarKind::kFloat16)
        ok = softmax_online<LoadF16>(static_cast<const uint16_t*>(lv.data) + b * lv.row_stride, V, inv_t, out,
                                     sc.cmax, sc.sums);
      else
        ok = softmax_online<LoadBF16>(static_cast<const uint16_t*>(lv.data) + b * lv.row_stride, V, inv_t, out,
                                      sc.cmax, sc.sums);
      if (!ok) std::fill(out, out + V, std::numeric_limits<float>::quiet_NaN());
      return;
    }
    const float* x = nullptr;
    const RowStats s = load_row(lv, b, sc.xbuf, nullptr, &x);
    if (!row_is_valid(s, T)) {
      std::fill(out, out + V, std::numeric_limits<float>::quiet_NaN());
      return;
    }
    std::fill(out, out + V, 0.0f);  // T == 0: one-hot at the argmax of the raw logits
    out[s.argmax] = 1.0f;
  });
}

void argmax(const LogitsView& lv, int num_threads, int64_t* ids, bool* valid) {
  for_each_row(lv.batch, num_threads, [&](int64_t b) {
    Scratch& sc = thread_scratch();
    const float* x = nullptr;
    const RowStats s = load_row(lv, b, sc.xbuf, nullptr, &x);
    valid[b] = row_is_valid(s, 0.0f);
    ids[b] = valid[b] ? s.argmax : -1;
  });
}

void sample_from_logits(const LogitsView& lv, const SamplingParams& params, const LogprobRequest& lp,
                        bool deterministic, int num_threads, int64_t* ids, bool* valid) {
  for_each_row(lv.batch, num_threads, [&](int64_t b) {
    bool ok = false;
    const int64_t id = sample_row(lv, b, params, lp, !deterministic, &ok);
    valid[b] = ok;
    ids[b] = ok ? id : -1;
  });
}

void sample_from_probs(const ProbsView& pv, const FilterParams& fp, RowParam<int64_t> seed,
                       RowParam<int64_t> offset, const LogprobRequest& lp, bool deterministic, int num_threads,
                       int64_t* ids, bool* valid) {
  for_each_row(pv.batch, num_threads, [&](int64_t b) {
    Scratch& sc = thread_scratch();
    const ProbRow r = prepare_probs_row(pv, b, fp, sc);
    valid[b] = r.valid;
    if (!r.valid) {
      ids[b] = -1;
      write_invalid_logprobs(lp, b);
      return;
    }
    const int64_t V = pv.vocab_size;
    const double u = PhiloxStreamRef{static_cast<uint64_t>(seed.at(b)), static_cast<uint64_t>(offset.at(b)),
                                     kStreamSample}.uniform_double(0);
    double W = 1.0;
    const int64_t token = draw_kept(r.x, V, ProbWeight{}, r.kept, sc.cands, sc.sums, u, r.s.argmax, &W,
                                    !deterministic);
    ids[b] = token;
    if (!lp.active()) return;
    const float* x = r.x;
    if (lp.raw) {
      sc.sums.resize((V + kBlock - 1) / kBlock);
      const double log_total = log_double(block_sums(x, V, ProbWeight{}, 0.0f, sc.sums.data()));
      write_logprobs(lp, b, token, x, V, [&](int64_t i) { return log_double(x[i]) - log_total; }, sc.topn);
    } else {
      const double logW = log_double(W);
      write_logprobs(lp, b, token, x, V, [&](int64_t i) {
        return is_kept(i, x, ProbWeight{}, r.kept, sc.cands) ? log_double(x[i]) - logW
                                                               : -std::numeric_limits<double>::infinity();
      }, sc.topn);
    }
  });
}

void filter_probs(const ProbsView& pv, const FilterParams& fp, int num_threads, float* out, bool* valid) {
  for_each_row(pv.batch, num_threads, [&](int64_t b) {
    Scratch& sc = thread_scratch();
    float* o = out + b * pv.vocab;
    std::fill(o + pv.vocab_size, o + pv.vocab, 0.0f);
    const ProbRow r = prepare_probs_row(pv, b, fp, sc);
    valid[b] = r.valid;
    if (!r.valid) {
      std::fill(o, o + pv.vocab_size, std::numeric_limits<float>::quiet_NaN());
      return;
    }
    write_filtered_row(r, pv.vocab_size, sc.cands, o);
  });
}

void top_k_mask_logits(const LogitsView& lv, RowParam<int64_t> top_k, int num_threads, void* out, bool* valid) {
  const size_t esize = lv.kind == ScalarKind::kFloat32 ? 4 : 2;
  const uint32_t ninf = lv.kind == ScalarKind::kFloat32 ? 0xFF800000u : (lv.kind == ScalarKind::kFloat16 ? 0xFC00u : 0xFF80u);
  auto fill_ninf = [&](char* dst, int64_t n) {
    if (esize == 4) {
      float v;
      std::memcpy(&v, &ninf, 4);
      std::fill(reinterpret_cast<float*>(dst), reinterpret_cast<float*>(dst) + n, v);
    } else {
      std::fill(reinterpret_cast<uint16_t*>(dst), reinterpret_cast<uint16_t*>(dst) + n, static_cast<uint16_t>(ninf));
    }
  };
  for_each_row(lv.batch, num_threads, [&](int64_t b) {
    Scratch& sc = thread_scratch();
    const int64_t V = lv.vocab_size;
    const char* in_row = static_cast<const char*>(lv.data) + b * lv.row_stride * static_cast<int64_t>(esize);
    char* o = static_cast<char*>(out) + b * lv.vocab * static_cast<int64_t>(esize);
    fill_ninf(o + V * esize, lv.vocab - V);
    const int64_t k = top_k.at(b);
    const bool use_k = k > 0 && k < V;
    TopKGather g;
    if (use_k && k > 1) g.init(k, &sc.cands, &sc.cmax, &sc.ctmp);
    const float* x = nullptr;
    const RowStats s = load_row(lv, b, sc.xbuf, (use_k && k > 1) ? &g : nullptr, &x);
    valid[b] = !s.has_nan;
    if (!use_k || s.has_nan) {
      std::memcpy(o, in_row, static_cast<size_t>(V) * esize);
      return;
    }
    fill_ninf(o, V);
    if (k == 1) {
      std::memcpy(o + s.argmax * esize, in_row + s.argmax * esize, esize);
      return;
    }
    g.finish();
    for (int64_t i = 0; i < g.n; ++i) {
      const int64_t idx = (*g.buf)[i].idx;
      std::memcpy(o + idx * esize, in_row + idx * esize, esize);
    }
  });
}

}  // namespace DK_ISA
}  // namespace cpu
}  // namespace decodekit
