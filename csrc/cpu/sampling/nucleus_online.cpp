// Top-p alone on float32 logits: pass A and the nucleus in one read of the row,
// with an exact cut of the nucleus among the tokens captured in that read.
#include "cpu/sampling/internal.h"
#include "cpu/common/draw.h"
#include "cpu/sampling/nucleus_flat.h"
#include "cpu/sampling/top_k.h"
#include "decodekit/fixed.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace decodekit {
namespace cpu {
namespace DK_ISA {
namespace detail {

// Buckets per octave of weight in the exact nucleus selection, and octaves.
constexpr int kBucketsPerOctave = 8;
constexpr int kOctaves = 16;
constexpr int kBuckets = kBucketsPerOctave * kOctaves;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
// Captures at least this large go to flat_cut's banded cut first (see below).
constexpr int64_t kCountedCapture = 16384;

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
// is weighed into flat.w (relative to the row maximum where it is already
// known). If the boundary lies below 2^-16, or the weight above it reaches
// 4096, flat_cut (below) cuts the nucleus exactly over every token (a capture
// of kCountedCapture tokens or more tries flat_cut's banded cut first); only
// when its boundary lies below its exact domain does the row go to
// nucleus_candidates, with lower bounds of the masses above tau_j = 16^-(j+1)
// from the captured tokens (all of those above 2^-16 when the capture held
// them) or, past an overflow, from a read of their own; it gathers a superset
// of the nucleus from another read of the row (from cache) for apply_chain to
// cut. Returns the row stats; W and the candidates only for a valid row.
RowStats nucleus_online(const float* row, int64_t V, float inv_t, double p, Buf<float>& cmax_buf, Buf<double>& seg_buf,
                        NucleusScratch& ns, std::vector<Cand>& out, double* W_out, bool* cut) {
  out.clear();
  *cut = false;
  FlatNucleus& flat = flat_nucleus();
  flat.on = false;
  const int64_t nch = (V + kChunk - 1) / kChunk;
  float* eref = flat.eref.get(nch);  // per chunk: the maximum its stored weights are relative to, or NaN
  float* Ew = nullptr;
  cmax_buf.resize(nch);
  seg_buf.resize(2 * nch + 2);  // (m_s, W_s) per segment
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
  Acc16d acc, acc_odd;
  auto flush = [&]() {
    if (m > -kInf && m < kInf) {
      double* q = seg + 2 * nseg++;
      acc.merge(acc_odd);
      q[0] = static_cast<double>(m);
      q[1] = acc.sum();
    }
    acc = Acc16d{};
    acc_odd = Acc16d{};
  };
  const VI lane_ids = iota16();
  for (int64_t ch = 0; ch < nch; ++ch) {
    const int64_t c0 = ch * kChunk;
    const Span sp{row + c0, std::min(kChunk, V - c0)};
    const int64_t n = sp.n;
    auto load = [&](int64_t k) __attribute__((always_inline)) { return sp.load(k); };
    const float chunk_max = span_max(row, c0, n, V, vnan);
    cmax[ch] = chunk_max;
    eref[ch] = kNaN;
    if (chunk_max > m) {
      flush();
      m = chunk_max;
    }
    if (!(m > -kInf) || m == kInf) continue;  // nothing finite yet, or +inf (the row is invalid)
    const VF vm = splat(m);
    auto weight = [&](VF d) __attribute__((always_inline)) { return exp16_scaled(d, vch, vcl); };  // 0 at -inf
    if (capturing && ncap + kChunk > kCaptureCap) {
      capturing = false;
      Ew = flat.w.get(V + kLanes);
    }
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
    // Past the capture: every value into float64 lanes, as gather_nucleus, and
    // the weights into flat.w (flat_cut's, where m is the row maximum).
    eref[ch] = m;
    float* ew = Ew + c0;
    for (; k + 2 * kLanes <= n; k += 2 * kLanes) {
      const VF ea = weight(load(k) - vm), eb = weight(load(k + kLanes) - vm);
      store_f32(ew + k, ea);
      store_f32(ew + k + kLanes, eb);
      acc.add(ea);
      acc_odd.add(eb);
    }
    for (; k < n; k += kLanes) {
      const VF e = weight(load(k) - vm);
      store_f32(ew + k, e);  // load_tail's -inf weighs 0; flat.w has kLanes of slack
      acc.add(e);
    }
  }
  flush();
  RowStats st{m, 0, any_lane(vnan), m == kInf};
  if (st.has_nan || !(m > -kInf) || m == kInf) return st;
  st.argmax = first_index_of_max(row, V, cmax, kChunk, m);
  double W = 0.0;
  for (int64_t i = 0; i < nseg; ++i) {
    const double* q = seg + 2 * i;
    const float ms = static_cast<float>(q[0]);
    if (ms == m) {  // the last segment: weights are relative to m already
      W += q[1];
      continue;
    }
    W += q[1] * static_cast<double>(exp_scaled_nonpositive(ms - m, ec.hi, ec.lo));
  }
  *W_out = W;

  // The captured tokens whose final z = (x - m) * c_hi exceeds -16, compacted
  // in place (in index order), with their weights and buckets 8 (-z): only
  // where they are used (the capture's cut, and the fallback's masses).
  float* ce = ns.e.data();
  int32_t* cq = ns.q.data();
  int64_t nc = 0;
  auto compact = [&]() {
    const VF vm = splat(m), vbuckets = splat(static_cast<float>(kBuckets)),
             vper = splat(static_cast<float>(kBucketsPerOctave));
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
  };
  // A large capture (a flat row of a small vocabulary): the capture's cut would
  // weigh and bucket every captured token, sort the boundary bucket (hundreds of
  // tokens) and list the nucleus; the banded cut of flat_cut finds the same kept
  // set (both are the exact rank-order prefix) and draws from block sums.
  if (capturing && W < 4096.0 && ncap >= kCountedCapture && flat_cut(row, V, m, ec, p, W, flat, true)) {
    *cut = true;
    return st;
  }
  if (capturing && W < 4096.0) {
    compact();
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
  // A flat row (the capture overflowed, or its weight was too large): the
  // exact cut over every token whose weight is large enough for exact sums.
  if (flat_cut(row, V, m, ec, p, W, flat)) {
    *cut = true;
    return st;
  }
  // Fallback (rare): lower bounds of the masses above tau_j, from the captured
  // tokens (every token above 2^-16 when the capture held them all), or from a
  // read of the whole row once it overflowed.
  const float t[4] = {0.0625f, 0.00390625f, 0.000244140625f, 1.52587890625e-05f};
  double mass[4] = {0.0, 0.0, 0.0, 0.0};
  if (capturing) {
    if (!(W < 4096.0)) compact();
    for (int64_t i = 0; i < nc; ++i)
      for (int j = 0; j < 4; ++j)
        if (ce[i] > t[j]) mass[j] += static_cast<double>(ce[i]) * (1.0 - 1e-9);
  } else {
    const VF vmax = splat(m);
    Acc16d acc[4];
    for (int64_t c = 0; c < V; c += kLanes) {
      const VF e = exp16_scaled((c + kLanes <= V ? load_f32(row + c) : load_tail(row, c, V)) - vmax, vch, vcl);
      for (int j = 0; j < 4; ++j) acc[j].add(select(e > splat(t[j]), e, zero));
    }
    // Each lane adds V / 16 + 1 terms, then 16 lanes: a relative error below (V + 64) 2^-53
    // (doubled for slack), so the discounted sums are lower bounds for any V.
    const double discount = 1.0 - 1e-9 - 2.0 * static_cast<double>(V + 64) * 0x1p-53;
    for (int j = 0; j < 4; ++j) mass[j] = acc[j].sum() * discount;
  }
  nucleus_candidates(row, V, LogitWeight{m, inv_t}, 1.0f, p, W, mass, out);
  return st;
}

// ------------------------------------------------------------ flat rows ---
// Buckets per octave of weight in the flat-row cut, and the most buckets.
constexpr int kFlatPerOctave = 64;
constexpr int kFlatBuckets = kFlatPerOctave * 30;

// The exact nucleus of a flat row (one whose nucleus holds many thousand
// tokens), in two more reads of the row (from cache) and no sort of the row.
//
// Exact domain: with the total W < 2^L, every token whose weight is >= 2^-A,
// A = 29 - L, is a multiple of 2^-(A+23), and every partial sum of such
// weights is below 2^L = 2^(29-A): float64 adds them exactly (52 bits), in any
// order. The rank-order running sum of top_p_select_sorted_input is then the
// exact prefix mass, which the buckets below reproduce.
//
// Read 1 computes every weight e = exp((x - m) / T) (the same bits as
// LogitWeight and the capture), stores it in ns.w, and adds it to its bucket
// q = floor(64 z), z = (m - x) c_hi (log2 of 1 / e up to rounding; monotone in
// the logit, so bucket q ranks wholly above bucket q + 1). Only buckets with
// z < A - 0.01 (weights >= 2^-A, slack far above the roundings of z and the
// exp error) count; their masses are exact. The first bucket where the
// cumulative mass reaches p W holds the boundary token; read 2 gathers that
// bucket, sorts it by rank (logit desc, index asc) and scans it. The kept set
// is every token ranked at or above that token: ns.bx, ns.bi; ns.block_sums
// its exact mass per block of reduce::kBlock tokens, for draw_flat. False (nothing
// decided) when the boundary lies below the exact domain: the caller then
// takes the general path (nucleus_candidates, top_p_stage). banded_cut (below)
// is tried first and finds the same cut from a band of buckets instead of a
// histogram of masses; the reads above run only where it declines.
FlatNucleus& flat_nucleus() {
  thread_local FlatNucleus f;
  return f;
}

// The flat cut without a histogram of masses: the same kept set and block
// sums as the full histogram below (flat_cut), or false (nothing decided).
//
// The band: a range [qa, qb) of coarse buckets (64 per octave, as below)
// that holds the boundary token. First guessed from the counts of a sample of
// the row (one vector in 8: band_from_sample); the read below verifies it
// exactly. Where it misses (rare: a boundary in the far tail, a row whose
// heavy tokens all sit in unsampled vectors), every token is counted
// (integer increments: no weight is needed), and since a token of bucket q
// weighs within [2^-((q + 1) / 64), 2^-(q / 64)] up to the roundings of z and
// of exp (1e-5 relative, far above them), the counts bound the mass before
// every bucket from both sides: the band is where those bounds straddle p W
// (band_from_counts; about 1% of the mass, a few thousand tokens of a flat
// row). qb <= nq: the band lies in the exact domain.
//
// Read (cut_in_band): every weight e into ns.w (nucleus_online stored it
// already for the chunks it weighed relative to the row maximum: the same
// bits), the exact mass of the tokens ranked above the band per block
// (reduce::kBlock), and the ids of the band's tokens; false where the
// boundary lies outside the band. The band's exact masses in fine buckets (512 per
// octave, monotone in the logit) give the one where the running sum reaches
// p W; only that one is sorted by rank and scanned. The boundary token is the
// one the full histogram finds: both reproduce the exact rank-order running sum.
constexpr int kFinePerBucket = 8;

// The coarse bucket of each lane (as flat_cut's): nq (outside the domain) unless
// z < nq / 64, and nq + 1 for -inf (a masked token, which weighs nothing).
struct CoarseKey {
  VF vm, vch, zero, vper, vnq;
  VI masked;
  CoarseKey(float m, const ExpScale& ec, int nq)
      : vm(splat(m)),
        vch(splat(ec.hi)),
        zero(splat(0.0f)),
        vper(splat(static_cast<float>(kFlatPerOctave))),
        vnq(splat(static_cast<float>(nq))),
        masked(splati(nq + 1)) {}
  DK_INLINE VI operator()(VF xs) const {
    const VF qf = (zero - (xs - vm) * vch) * vper;  // >= 0; +inf at -inf
    const VF qk = select(vnq > qf, qf, vnq);
    VI qi;
    for (int pi = 0; pi < kParts; ++pi) qi.p[pi] = __builtin_convertvector(qk.p[pi], ni);
    return select(xs > splat(-kInf), qi, masked);
  }
};

// Counts of the coarse buckets into cnt[0..nq + 1] (two arrays: neighbours do not
// wait on each other's increment): of every token (stride 1), or of one vector
// of 16 tokens in each group of `stride` vectors, at a position that varies
// from group to group (a hash of the group), so that no periodic layout of the
// row hides from the sample. Returns the number of tokens counted.
static int64_t count_buckets(const float* row, int64_t V, const CoarseKey& key, int nq, int64_t stride, int32_t* cnt) {
  int32_t* cnt1 = cnt + nq + 2;
  std::memset(cnt, 0, sizeof(int32_t) * 2 * (nq + 2));
  alignas(64) int32_t keys[kBlock + kLanes];
  const int64_t step = kLanes * stride;
  int64_t counted = 0;
  for (int64_t b0 = 0; b0 < V; b0 += kBlock * stride) {
    // Up to kBlock keys at a time, then their increments.
    int64_t n = 0;
    for (int64_t g0 = b0; g0 < std::min(V, b0 + kBlock * stride); g0 += step) {
      const uint32_t h = static_cast<uint32_t>(g0 / step) * 2654435761u;
      const int64_t c =
          stride == 1 ? g0 : g0 + kLanes * static_cast<int64_t>((h >> 16) % static_cast<uint32_t>(stride));
      if (c >= V) continue;
      const VF xs = c + kLanes <= V ? load_f32(row + c) : load_tail(row, c, V);
      to_array(key(xs), keys + n);
      n += std::min<int64_t>(kLanes, V - c);  // a tail vector's padding lanes are overwritten or dropped
    }
    counted += n;
    int64_t k = 0;
    for (; k + 2 <= n; k += 2) {
      ++cnt[keys[k]];
      ++cnt1[keys[k + 1]];
    }
    if (k < n) ++cnt[keys[k]];
  }
  for (int q = 0; q <= nq + 1; ++q) cnt[q] += cnt1[q];
  return counted;
}

// The band [qa, qb) of coarse buckets that holds the boundary token, with
// certainty, from the counts of every token (see above).
static bool band_from_counts(const int32_t* cnt, int nq, double target, int* qa_out, int* qb_out) {
  double lo = 0.0, hi = 0.0;
  int qa = 0, qb = nq;
  const double step = std::exp2(-1.0 / kFlatPerOctave);
  double wq = 1.0;
  for (int q = 0; q < nq; ++q) {
    const double n = static_cast<double>(cnt[q]);
    hi += n * wq * (1.0 + 1e-5);
    wq *= step;
    lo += n * wq * (1.0 - 1e-5);
    if (hi < target) qa = q + 1;  // the mass before q + 1 is below p W
    if (lo >= target) {           // the mass before q + 1 reaches p W
      qb = q + 1;
      break;
    }
  }
  *qa_out = qa;
  *qb_out = qb;
  return qa < qb;
}

// The band estimated from a sample of the tokens (one vector in kSampleStride):
// the mass below each bucket edge (the tail, many light tokens: a low-variance
// estimate) scaled from the sample, with kSampleSigmas standard deviations
// (Poisson) of margin on each side. Only a guess: the read verifies it exactly
// and the caller counts every token when it misses.
constexpr int64_t kSampleStride = 8;
constexpr double kSampleSigmas = 4.0;
static bool band_from_sample(const int32_t* cnt, int nq, int64_t counted, int64_t V, double tail_target, int* qa_out,
                             int* qb_out, double* scratch) {
  if (counted <= 0) return false;
  const double scale = static_cast<double>(V) / static_cast<double>(counted);
  // t1[q], t2[q]: sums of n w and n w^2 over buckets q..nq (w: the bucket's middle weight).
  double* t1 = scratch;
  double* t2 = scratch + nq + 2;
  t1[nq + 1] = t2[nq + 1] = 0.0;
  const double wnq = std::exp2(-static_cast<double>(nq) / kFlatPerOctave);
  t1[nq] = cnt[nq] * wnq;  // beyond the domain: at most 2^-(nq / 64) each (masked tokens, cnt[nq + 1], weigh 0)
  t2[nq] = cnt[nq] * wnq * wnq;
  const double step = std::exp2(1.0 / kFlatPerOctave);
  double w = std::exp2(-(nq - 0.5) / kFlatPerOctave);  // bucket q's middle weight, from q = nq - 1 up
  for (int q = nq - 1; q >= 0; --q, w *= step) {
    const double n = static_cast<double>(cnt[q]);
    t1[q] = t1[q + 1] + n * w;
    t2[q] = t2[q + 1] + n * w * w;
  }
  // The boundary bucket b is the first whose following tail T(b + 1) <= (1 - p) W.
  // qa: the largest q whose estimated tail surely exceeds the target; qb: the
  // smallest q whose tail is surely at or below it.
  int qa = 0, qb = nq;
  for (int q = 0; q <= nq; ++q) {
    const double est = scale * t1[q], sd = scale * std::sqrt(t2[q]) * kSampleSigmas + 1e-3 * tail_target;
    if (est - sd > tail_target) qa = q;
    if (est + sd <= tail_target) {
      qb = q;
      break;
    }
  }
  *qa_out = qa;
  *qb_out = std::min(qb, nq);
  return qa < *qb_out;
}

static bool cut_in_band(const float* row, int64_t V, float m, const ExpScale& ec, double p, double W, int qa, int qb,
                        FlatNucleus& ns);

static bool banded_cut(const float* row, int64_t V, float m, const ExpScale& ec, double p, double W, int nq,
                       FlatNucleus& ns) {
  if (nq < 2) return false;
  const CoarseKey key(m, ec, nq);
  int32_t* cnt = ns.count.get(2 * (nq + 2));
  const double target = p * W;
  int qa, qb;
  // A sample of the row first: right unless the row's order hides its shape.
  const int64_t counted = count_buckets(row, V, key, nq, kSampleStride, cnt);
  if (band_from_sample(cnt, nq, counted, V, W - target, &qa, &qb, ns.hist.get(2 * (nq + 2))) &&
      cut_in_band(row, V, m, ec, p, W, qa, qb, ns))
    return true;
  count_buckets(row, V, key, nq, 1, cnt);
  if (!band_from_counts(cnt, nq, target, &qa, &qb)) return false;
  return cut_in_band(row, V, m, ec, p, W, qa, qb, ns);
}

// The smallest logit x whose coarse bucket, qf(x) = (0 - (x - m) c_hi) 64 in
// float32 (CoarseKey's operations, in the same order), is below q: qf is
// non-increasing in x (every rounding is monotone), so bucket(x) < q exactly
// where x >= the result, and a compare of the logits replaces the three
// operations of qf. +inf when no logit up to m qualifies; a bisection over the
// ordered float32 values between -FLT_MAX and m.
static float bucket_threshold(float m, float c_hi, int q) {
  const float qv = static_cast<float>(q), per = static_cast<float>(kFlatPerOctave);
  auto below = [&](float x) { return (0.0f - (x - m) * c_hi) * per < qv; };
  // rank_key's inverse (key 0x7fffffff, between rank_key(-0) and the negatives, is -0).
  auto value = [](uint32_t k) { return bits_to_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k); };
  if (!below(m)) return kInf;
  uint32_t lo = rank_key(-std::numeric_limits<float>::max()), hi = rank_key(m);  // below(value(hi))
  if (below(value(lo))) return value(lo);
  while (hi - lo > 1) {  // !below(value(lo)), below(value(hi))
    const uint32_t mid = lo + (hi - lo) / 2;
    (below(value(mid)) ? hi : lo) = mid;
  }
  return value(hi);
}

// The read: the exact masses above the band, the band's tokens, and the cut
// among them; false (nothing decided) when the boundary lies outside the band.
static bool cut_in_band(const float* row, int64_t V, float m, const ExpScale& ec, double p, double W, int qa, int qb,
                        FlatNucleus& ns) {
  const VF vm = splat(m), vch = splat(ec.hi), vcl = splat(ec.lo), zero = splat(0.0f);
  const double target = p * W;
  // The read.
  float* E = ns.w.get(V + kLanes);  // nucleus_online's weights where eref == m
  float* eref = ns.eref.data();
  const int64_t nb = reduce::num_blocks(V);
  double* bs = ns.block_sums.get(nb);
  int32_t* bid = ns.band_idx.get(V + kLanes);
  int64_t nband = 0;
  // The buckets as logit thresholds: bucket(x) < q exactly where x >= t(q).
  const VF vta = splat(bucket_threshold(m, ec.hi, qa)), vtb = splat(bucket_threshold(m, ec.hi, qb));
  const VI lane_ids = iota16();
  double before = 0.0;
  for (int64_t b0 = 0, blk = 0; b0 < V; b0 += kBlock, ++blk) {
    const int64_t end = std::min(V, b0 + kBlock);
    // Two accumulators (even and odd vectors): the sums are exact, so their order is free.
    Acc16d acc0, acc1;
    auto step = [&](VF xs, VF e, int64_t c, Acc16d& acc) __attribute__((always_inline)) {
      const VI above = xs >= vta;  // bucket < qa (-inf: in no band)
      acc.add(select(above, e, zero));
      const VI in_band = (xs >= vtb) & (vta > xs);
      nband += compress_store(in_band, lane_ids + splati(static_cast<int32_t>(c)), bid + nband);
    };
    for (int64_t c0 = b0; c0 < end; c0 += kChunk) {
      const int64_t cend = std::min(end, c0 + kChunk);
      int64_t c = c0;
      if (eref[c0 / kChunk] == m) {  // nucleus_online stored them relative to m: the same bits
        for (; c + 2 * kLanes <= cend; c += 2 * kLanes) {
          step(load_f32(row + c), load_f32(E + c), c, acc0);
          step(load_f32(row + c + kLanes), load_f32(E + c + kLanes), c + kLanes, acc1);
        }
      } else {
        for (; c + 2 * kLanes <= cend; c += 2 * kLanes) {
          const VF xa = load_f32(row + c), xb = load_f32(row + c + kLanes);
          const VF ea = exp16_scaled(xa - vm, vch, vcl), eb = exp16_scaled(xb - vm, vch, vcl);
          store_f32(E + c, ea);
          store_f32(E + c + kLanes, eb);
          step(xa, ea, c, acc0);
          step(xb, eb, c + kLanes, acc1);
        }
      }
      for (; c < cend; c += kLanes) {
        const VF xs = c + kLanes <= cend ? load_f32(row + c) : load_tail(row, c, cend);
        const VF e = exp16_scaled(xs - vm, vch, vcl);  // 0 at -inf
        store_f32(E + c, e);
        step(xs, e, c, acc0);
      }
      eref[c0 / kChunk] = m;  // E now holds the chunk's weights relative to m (a second read loads them)
    }
    acc0.merge(acc1);
    bs[blk] = acc0.sum();
    before += bs[blk];                     // exact: every weight above the band is in the exact domain
    if (!(before < target)) return false;  // the boundary lies above the band
  }
  // The band's exact masses in fine buckets (monotone in the logit, like the coarse ones).
  const int F = kFinePerBucket * (qb - qa);
  // Four histograms: neighbours in one bucket do not wait on each other's add
  // (exact sums: merging them changes no bit).
  double* h = ns.hist.get(4 * F);
  std::memset(h, 0, sizeof(double) * 4 * F);
  int32_t* bq = ns.band_q.get(nband + 1);
  float* bx = ns.band_x.get(nband + 1);
  float* be = ns.band_e.get(nband + 1);
  const float fine = static_cast<float>(kFlatPerOctave * kFinePerBucket), chi = ec.hi;
  const int f0 = kFinePerBucket * qa;
  for (int64_t j = 0; j < nband; ++j) {
    const int32_t i = bid[j];
    const float x = row[i], e = E[i];
    bx[j] = x;
    be[j] = e;
    const float qf = (0.0f - (x - m) * chi) * fine;
    const int f = std::min(std::max(static_cast<int>(qf) - f0, 0), F - 1);
    bq[j] = f;
    h[(j & 3) * F + f] += static_cast<double>(e);
  }
  for (int f = 0; f < F; ++f) h[f] = (h[f] + h[F + f]) + (h[2 * F + f] + h[3 * F + f]);
  double run = before;
  int fb = 0;
  for (; fb < F; ++fb) {
    if (run + h[fb] >= target) break;
    run += h[fb];
  }
  if (fb == F) return false;  // the boundary lies below the band
  std::vector<Cand>& band = ns.band;
  band.clear();
  for (int64_t j = 0; j < nband; ++j)
    if (bq[j] == fb) band.push_back(Cand{bx[j], be[j], bid[j]});
  if (!std::is_sorted(band.begin(), band.end(), rank_before)) std::sort(band.begin(), band.end(), rank_before);
  size_t n = 0;
  while (n < band.size()) {
    run += static_cast<double>(band[n++].e);
    if (run >= target) break;
  }
  if (n == 0 || run < target) return false;  // cannot happen: the bucket's exact mass reaches p W
  // e where the token's fine bucket is above fb, else 0 (no branch: half the band either way).
  auto kept_weight = [&](int64_t j) {
    uint32_t u;
    std::memcpy(&u, &be[j], 4);
    u &= 0u - static_cast<uint32_t>(bq[j] < fb);
    float e;
    std::memcpy(&e, &u, 4);
    return static_cast<double>(e);
  };
  // The kept band tokens of the buckets above fb into their blocks' sums (ids
  // ascending: a run per block, two accumulators; exact, so in any order).
  for (int64_t j = 0; j < nband;) {
    const int32_t blk = bid[j] / kBlock, next = (blk + 1) * kBlock;
    double a0 = 0.0, a1 = 0.0;
    for (; j + 1 < nband && bid[j + 1] < next; j += 2) {
      a0 += kept_weight(j);
      a1 += kept_weight(j + 1);
    }
    if (j < nband && bid[j] < next) a0 += kept_weight(j++);
    bs[blk] += a0 + a1;
  }
  for (size_t j = 0; j < n; ++j) bs[band[j].idx / kBlock] += static_cast<double>(band[j].e);
  ns.bx = band[n - 1].x;
  ns.bi = band[n - 1].idx;
  ns.on = true;
  return true;
}

bool flat_cut(const float* row, int64_t V, float m, const ExpScale& ec, double p, double W, FlatNucleus& ns,
              bool banded_only) {
  ns.on = false;
  if (!(W >= 1.0) || !(W < 1e12)) return false;  // the top token weighs 1
  int L = 0;
  while (std::ldexp(1.0, L) <= W * (1.0 + 1e-4)) ++L;  // 2^L above the exact total (W is within ~1e-6 of it)
  const int A = 29 - L;
  if (A < 2) return false;
  const int nq = std::min(kFlatBuckets, static_cast<int>(kFlatPerOctave * (static_cast<double>(A) - 0.01)));
  if (banded_cut(row, V, m, ec, p, W, nq, ns)) return true;
  if (banded_only) return false;
  float* E = ns.w.get(V + kLanes);
  double* h0 = ns.hist.get(2 * (kFlatBuckets + 2));
  double* h1 = h0 + kFlatBuckets + 2;
  std::memset(h0, 0, sizeof(double) * 2 * (kFlatBuckets + 2));
  const VF vm = splat(m), vch = splat(ec.hi), vcl = splat(ec.lo), zero = splat(0.0f);
  // The bucket of each lane: nq (outside the domain) or nq + 1 (-inf), never read, unless z < nq / 64.
  const CoarseKey bucket(m, ec, nq);
  alignas(64) int32_t qa[kLanes];
  alignas(64) float ea[kLanes];
  for (int64_t c = 0; c < V; c += kLanes) {
    const VF xs = c + kLanes <= V ? load_f32(row + c) : load_tail(row, c, V);
    const VF e = exp16_scaled(xs - vm, vch, vcl);  // 0 at -inf
    store_f32(E + c, e);
    store_f32(ea, e);
    to_array(bucket(xs), qa);
    // Two histograms: neighbours in one bucket do not wait on each other's add.
    for (int j = 0; j < kLanes; j += 2) {
      h0[qa[j]] += static_cast<double>(ea[j]);
      h1[qa[j + 1]] += static_cast<double>(ea[j + 1]);
    }
  }
  const double target = p * W;
  double before = 0.0;
  int b = 0;
  for (; b < nq; ++b) {
    const double hb = h0[b] + h1[b];
    if (before + hb >= target) break;
    before += hb;
  }
  if (b == nq) return false;
  // Read 2: the boundary bucket's tokens, and the block sums (reduce::kBlock) of
  // the weights in the buckets above it, for the draw.
  std::vector<Cand>& band = ns.band;
  band.clear();
  const int64_t nb = reduce::num_blocks(V);
  double* bs = ns.block_sums.get(nb);
  const VI vb = splati(b);
  for (int64_t b0 = 0, blk = 0; b0 < V; b0 += kBlock, ++blk) {
    const int64_t end = std::min(V, b0 + kBlock);
    Acc16d acc;
    for (int64_t c = b0; c < end; c += kLanes) {
      const VF xs = c + kLanes <= end ? load_f32(row + c) : load_tail(row, c, end);
      const VI q = bucket(xs);                         // load_tail's -inf lands in bucket nq + 1
      acc.add(select(q < vb, load_f32(E + c), zero));  // E has kLanes of slack past V
      uint32_t bits = lane_bits(q == vb);
      while (bits) {
        const int64_t i = c + __builtin_ctz(bits);
        bits &= bits - 1;
        band.push_back(Cand{row[i], E[i], static_cast<int32_t>(i)});
      }
    }
    bs[blk] = acc.sum();
  }
  // The band in rank order (gathered in index order: often sorted already, as in a run of ties).
  if (!std::is_sorted(band.begin(), band.end(), rank_before)) std::sort(band.begin(), band.end(), rank_before);
  double run = before;
  size_t n = 0;
  while (n < band.size()) {
    run += static_cast<double>(band[n++].e);
    if (run >= target) break;
  }
  if (n == 0 || run < target) return false;  // cannot happen: the bucket's exact mass reaches p W
  for (size_t j = 0; j < n; ++j) bs[band[j].idx / kBlock] += static_cast<double>(band[j].e);
  ns.bx = band[n - 1].x;
  ns.bi = band[n - 1].idx;
  ns.on = true;
  return true;
}

// The weights of a flat row's kept tokens (cpu/common/draw.h's source): e
// where the token ranks at or above (bx, bi) and e >= min_w (min-p), else 0.
struct FlatWeights {
  const float* x;
  const float* e;
  float bx;
  int32_t bi;
  float min_w;
  DK_INLINE VF of(VF xs, VF es, int64_t c) const {
    const VF vbx = splat(bx);
    const VI ids = iota16() + splati(static_cast<int32_t>(c));
    const VI kept = ((xs > vbx) | ((xs == vbx) & (ids <= splati(bi)))) & (es >= splat(min_w));
    return select(kept, es, splat(0.0f));
  }
  DK_INLINE VF full(int64_t c) const { return of(load_f32(x + c), load_f32(e + c), c); }
  DK_INLINE VF tail(int64_t c, int64_t end) const { return of(load_tail(x, c, end), load_tail(e, c, end), c); }
  DK_INLINE float at(int64_t i) const {
    const bool kept = (x[i] > bx || (x[i] == bx && i <= bi)) && e[i] >= min_w;
    return kept ? e[i] : 0.0f;
  }
};

// Inverse CDF over a flat row's kept tokens: every kept weight is in the
// exact domain of flat_cut, so the block sums and the running sum are the
// exact sums that draw_from_cands computes one by one in index order, and the
// token is the same. The block sums are flat_cut's unless min-p removes tokens.
// *W_out = the kept mass.
int64_t draw_flat(const float* x, int64_t V, const FlatNucleus& ns, float min_w, double u, Buf<double>& sums,
                  int64_t fallback, double* W_out) {
  const FlatWeights src{x, ns.w.data(), ns.bx, ns.bi, min_w};
  const int64_t nb = reduce::num_blocks(V);
  double W = 0.0;
  const double* bs = ns.block_sums.data();
  if (min_w > 0.0f) {  // min-p: the kept weights' block sums (flat_cut's hold the nucleus)
    W = block_sums(src, V, sums.get(nb));
    bs = sums.data();
  } else {
    for (int64_t k = 0; k < nb; ++k) W += bs[k];
  }
  *W_out = W;
  if (!(W > 0.0)) return fallback;
  const int64_t token = draw_from_blocks(src, V, bs, u * W);
  return token >= 0 ? token : fallback;
}

// A flat row's kept tokens as candidates, in index order (what the general
// path leaves after top_p_stage and min_p_stage).
void flat_cands(const float* x, int64_t V, const FlatNucleus& ns, float min_w, std::vector<Cand>& out) {
  const float* e = ns.w.data();
  out.clear();
  for (int64_t i = 0; i < V; ++i)
    if ((x[i] > ns.bx || (x[i] == ns.bx && i <= ns.bi)) && e[i] >= min_w)
      out.push_back(Cand{x[i], e[i], static_cast<int32_t>(i)});
}

}  // namespace detail
}  // namespace DK_ISA
}  // namespace cpu
}  // namespace decodekit
