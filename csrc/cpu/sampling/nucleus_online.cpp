// Top-p alone on float32 logits: pass A and the nucleus in one read of the row,
// with an exact cut of the nucleus among the tokens captured in that read.
#include "cpu/sampling/internal.h"
#include "cpu/common/draw.h"
#include "cpu/sampling/nucleus_flat.h"
#include "cpu/sampling/top_k.h"

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
// Captures at least this large go to flat_cut first (see below).
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
// only adds its weights into the float64 lanes: nothing is stored, so the row
// stays in cache for flat_cut's read. If the boundary lies below 2^-16, or the
// weight above it reaches 4096, flat_cut (below) cuts the nucleus exactly over
// every token (a capture of kCountedCapture tokens or more tries it first);
// only when its boundary lies below its exact domain does the general path
// run: lower bounds of the masses above tau_j = 16^-(j+1) (from the captured
// tokens exactly, or from a read of the row when the capture overflowed) feed
// nucleus_candidates, which gathers a superset of the nucleus for apply_chain
// to cut. Returns the row stats; W and the candidates only for a valid row.
RowStats nucleus_online(const float* row, int64_t V, float inv_t, double p, Buf<float>& cmax_buf, Buf<double>& seg_buf,
                        NucleusScratch& ns, std::vector<Cand>& out, double* W_out, bool* cut) {
  out.clear();
  *cut = false;
  FlatNucleus& flat = flat_nucleus();
  flat.on = false;
  const int64_t nch = (V + kChunk - 1) / kChunk;
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
    // Past the capture: only the weights into float64 lanes (nothing stored:
    // the row stays in cache for flat_cut's read).
    for (; k + 2 * kLanes <= n; k += 2 * kLanes) {
      acc.add(weight(load(k) - vm));
      acc_odd.add(weight(load(k + kLanes) - vm));
    }
    for (; k < n; k += kLanes) acc.add(weight(load(k) - vm));  // load_tail's -inf weighs 0
  }
  flush();
  RowStats st{m, 0, any_lane(vnan), m == kInf};
  if (st.has_nan || !(m > -kInf) || m == kInf) return st;
  st.argmax = first_index_of_max(row, V, cmax, kChunk, m);
  double W = 0.0;
  for (int64_t i = 0; i < nseg; ++i) {
    const double* q = seg + 2 * i;
    const float ms = static_cast<float>(q[0]);
    if (ms == m)  // the last segment: weights are relative to m already
      W += q[1];
    else
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
  // tokens) and list the nucleus; flat_cut finds the same kept set (both are the
  // exact rank-order prefix) and draws from block sums.
  if (capturing && W < 4096.0 && ncap >= kCountedCapture && flat_cut(row, V, m, ec, p, W, flat, false)) {
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
  if (flat_cut(row, V, m, ec, p, W, flat, !capturing)) {
    *cut = true;
    return st;
  }
  // Fallback: lower bounds of the masses above tau_j, then the superset of the
  // nucleus above the bound they give (nucleus_candidates). The masses come
  // from the captured tokens exactly where the capture holds every token that
  // can count, else from a read of the row (float32 lanes, discounted).
  const LogitWeight lw{m, inv_t};
  double mass[4] = {0.0, 0.0, 0.0, 0.0};
  if (capturing) {
    if (!(W < 4096.0)) compact();
    const float t[4] = {0.0625f, 0.00390625f, 0.000244140625f, 1.52587890625e-05f};
    for (int64_t i = 0; i < nc; ++i)
      for (int j = 0; j < 4; ++j)
        if (ce[i] > t[j]) mass[j] += static_cast<double>(ce[i]) * (1.0 - 1e-9);
  } else {
    nucleus_masses(row, V, lw, 1.0f, mass);
  }
  nucleus_candidates(row, V, lw, 1.0f, p, W, mass, out);
  return st;
}

// ------------------------------------------------------------ flat rows ---
// Buckets per octave of weight in the flat-row cut, and the most buckets.
constexpr int kFlatPerOctave = 64;
constexpr int kFlatBuckets = kFlatPerOctave * 30;
// Fine buckets per coarse bucket inside the band.
constexpr int kFinePerBucket = 8;

// The exact nucleus of a flat row (one whose nucleus holds many thousand
// tokens), without a sort of the row and without storing its weights.
//
// Exact domain: with the total W < 2^L, every token whose weight is >= 2^-A,
// A = 29 - L, is a multiple of 2^-(A+23), and every partial sum of such
// weights is below 2^L = 2^(29-A): float64 adds them exactly (52 bits), in any
// order. The rank-order running sum of top_p_select_sorted_input is then the
// exact prefix mass, which the buckets below reproduce.
//
// Buckets: q = floor(64 z), z = (m - x) c_hi (log2 of 1 / e up to rounding,
// e = exp((x - m) / T) with the bits of LogitWeight and the capture).
// Monotone in the logit, so bucket q ranks wholly above bucket q + 1; the fine
// buckets floor(512 z) split each coarse one in 8 (scaling by a power of two is
// exact, so a fine bucket lies inside its coarse bucket). Only buckets with
// z < A - 0.01 (weights >= 2^-A, slack far above the roundings of z and the
// exp error) are in the domain (nq of them).
//
// The cut (band_cut) takes a band [qa, qb) of coarse buckets that should hold
// the boundary, and reads the row once: the exact mass of the tokens above the
// band per block of reduce::kBlock tokens, and the band's logits and ids. The
// band's exact masses in fine buckets give the one where the running sum
// reaches p W; only that one is sorted by rank (logit desc, index asc) and
// scanned. The kept set is every token ranked at or above the boundary token
// (ns.bx, ns.bi), with its exact mass per block in ns.block_sums for
// draw_flat. When the boundary lies outside the band, band_cut says so and
// decides nothing.
//
// The band comes from a sample of the row first (sampled_band: a guess, one
// token in 16, no pass over the row), else from counts of every token's
// bucket (counted_band: bounds, one pass). Either way the kept set is the
// exact rank-order prefix, so it never depends on which band was used. Where
// both decline (the boundary below the domain), flat_cut returns false and the
// caller takes the general path (nucleus_candidates, top_p_stage).
FlatNucleus& flat_nucleus() {
  thread_local FlatNucleus f;
  return f;
}

// The coarse bucket of each lane: nq (outside the domain) unless z < nq / 64.
DK_INLINE VI coarse_bucket(VF d, VF vch, VF vper, VF vnq) {
  const VF qf = (splat(0.0f) - d * vch) * vper;  // >= 0; +inf at -inf
  const VF qk = select(vnq > qf, qf, vnq);
  VI qi;
  for (int pi = 0; pi < kParts; ++pi) qi.p[pi] = __builtin_convertvector(qk.p[pi], ni);
  return qi;
}

// The band from counts (integer increments: no weight is needed). A token of
// bucket q weighs within [2^-((q + 1) / 64), 2^-(q / 64)] up to the roundings
// of z and of exp (1e-5 relative, far above them), so the counts bound the
// mass before every bucket from both sides; the band [qa, qb) is where those
// bounds straddle p W (about 1% of the mass). qb <= nq. False: no band.
static bool counted_band(const float* row, int64_t V, float m, const ExpScale& ec, double p, double W, int nq,
                         FlatNucleus& ns, int* qa_out, int* qb_out) {
  const VF vm = splat(m), vch = splat(ec.hi), vper = splat(static_cast<float>(kFlatPerOctave)),
           vnq = splat(static_cast<float>(nq));
  // Two count arrays: neighbours in one bucket do not wait on each other.
  int32_t* cnt = ns.count.get(2 * (nq + 1));
  int32_t* cnt1 = cnt + nq + 1;
  std::memset(cnt, 0, sizeof(int32_t) * 2 * (nq + 1));
  alignas(64) int32_t keys[kBlock];
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const int64_t n = std::min(kBlock, V - b0);
    for (int64_t k = 0; k < n; k += kLanes) {
      const VF xs = k + kLanes <= n ? load_f32(row + b0 + k) : load_tail(row + b0, k, n);
      to_array(coarse_bucket(xs - vm, vch, vper, vnq), keys + k);
    }
    int64_t k = 0;
    for (; k + 2 <= n; k += 2) {
      ++cnt[keys[k]];
      ++cnt1[keys[k + 1]];
    }
    if (k < n) ++cnt[keys[k]];
  }
  const double target = p * W;
  double lo = 0.0, hi = 0.0;
  int qa = 0, qb = nq;
  const double step = std::exp2(-1.0 / kFlatPerOctave);
  double wq = 1.0;
  for (int q = 0; q < nq; ++q) {
    const double n = static_cast<double>(cnt[q] + cnt1[q]);
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

// The band guessed from a sample: the first kLanes tokens of every kChunk
// (one token in 16, over the whole row). F(q), the sample's share of its
// weight in buckets below q, estimates the row's; sigma, the standard error of
// that ratio at the sample's boundary bucket, is estimated over the sample's
// clusters (one vector each). The band runs from the last bucket boundary with
// F <= p - delta to the first with F >= p + delta, delta = kSampleSigmas sigma
// + kSampleSlack. False (use the counts) when the row is short, when the
// nucleus holds fewer than kSampleMinNucleus tokens by the sample's count, or
// when the band would hold more than kSampleMaxBand.
constexpr int64_t kMinSampleClusters = 64;
constexpr double kSampleSigmas = 6.0, kSampleSlack = 0.002;
constexpr int64_t kSampleMaxBand = 16384, kSampleMinNucleus = 16384;

static bool sampled_band(const float* row, int64_t V, float m, const ExpScale& ec, double p, int nq, FlatNucleus& ns,
                         int* qa_out, int* qb_out) {
  const int64_t nc = V / kChunk;
  if (nc < kMinSampleClusters) return false;
  const VF vm = splat(m), vch = splat(ec.hi), vcl = splat(ec.lo), vper = splat(static_cast<float>(kFlatPerOctave)),
           vnq = splat(static_cast<float>(nq));
  float* se = ns.sample_e.get(nc * kLanes);
  int32_t* sq = ns.sample_q.get(nc * kLanes);
  double* h = ns.sample_hist.get(nq + 1);
  int32_t* hn = ns.sample_count.get(nq + 1);
  std::memset(h, 0, sizeof(double) * (nq + 1));
  std::memset(hn, 0, sizeof(int32_t) * (nq + 1));
  for (int64_t c = 0; c < nc; ++c) {
    const VF d = load_f32(row + c * kChunk) - vm;
    store_f32(se + c * kLanes, exp16_scaled(d, vch, vcl));  // 0 at -inf
    to_array(coarse_bucket(d, vch, vper, vnq), sq + c * kLanes);
  }
  for (int64_t i = 0; i < nc * kLanes; ++i) {
    h[sq[i]] += static_cast<double>(se[i]);
    ++hn[sq[i]];
  }
  double S = 0.0;
  for (int q = 0; q <= nq; ++q) S += h[q];
  if (!(S > 0.0)) return false;
  // The sample's boundary bucket qs: F(qs) < p <= F(qs + 1).
  double before = 0.0;
  int qs = 0;
  for (; qs < nq; ++qs) {
    if (before + h[qs] >= p * S) break;
    before += h[qs];
  }
  if (qs == nq) return false;  // below the domain: the counts decide
  // A narrow nucleus (few sampled tokens above the boundary): the counts' band is
  // far narrower than any the sample can give.
  int64_t nabove = 0;
  for (int q = 0; q <= qs; ++q) nabove += hn[q];
  if (nabove * (kChunk / kLanes) < kSampleMinNucleus) return false;
  const double R = before / S;
  const VI vqs = splati(qs);
  const VF zero = splat(0.0f);
  double s2 = 0.0;  // float sums per cluster: only an estimate
  for (int64_t c = 0; c < nc; ++c) {
    const VF e = load_f32(se + c * kLanes);
    const double xc = tree_sum16(e), yc = tree_sum16(select(load_i32(sq + c * kLanes) < vqs, e, zero));
    s2 += (yc - R * xc) * (yc - R * xc);
  }
  const double xbar = S / static_cast<double>(nc);
  const double sigma = std::sqrt(s2 / (static_cast<double>(nc) * static_cast<double>(nc - 1))) / xbar;
  const double delta = kSampleSigmas * sigma + kSampleSlack;
  int qa = qs;
  double f = before;
  int64_t nin = hn[qs];
  while (qa > 0 && f > (p - delta) * S) {
    f -= h[--qa];
    nin += hn[qa];
  }
  int qb = qs + 1;
  f = before + h[qs];
  while (qb < nq && f < (p + delta) * S) {
    nin += hn[qb];
    f += h[qb++];
  }
  if (nin * kChunk / kLanes > kSampleMaxBand) return false;
  *qa_out = qa;
  *qb_out = qb;
  return qa < qb;
}

// The cut inside the band [qa, qb) (see above); false when the exact boundary
// lies outside the band (nothing decided).
static bool band_cut(const float* row, int64_t V, float m, const ExpScale& ec, double p, double W, int qa, int qb,
                     FlatNucleus& ns) {
  const VF vm = splat(m), vch = splat(ec.hi), vcl = splat(ec.lo), zero = splat(0.0f),
           vper = splat(static_cast<float>(kFlatPerOctave));
  const double target = p * W;
  const int64_t nb = reduce::num_blocks(V);
  double* bs = ns.block_sums.get(nb);
  int32_t* bid = ns.band_idx.get(V + kLanes);
  float* bx = ns.band_x.get(V + kLanes);
  int64_t nband = 0;
  const VF vqa = splat(static_cast<float>(qa)), vqb = splat(static_cast<float>(qb));
  const VI lane_ids = iota16();
  double before = 0.0;
  // The read: the mass above the band per block, the band's logits and ids.
  // One vector: its weight above the band into acc, its band tokens appended.
  auto step = [&](VF xs, int64_t c, Acc16d& acc) __attribute__((always_inline)) {
    const VF d = xs - vm;
    const VF qf = (zero - d * vch) * vper;  // +inf at -inf: in no band
    acc.add(select(vqa > qf, exp16_scaled(d, vch, vcl), zero));
    const VI in_band = (vqb > qf) & (qf >= vqa);
    compress_store(in_band, xs, bx + nband);
    nband += compress_store(in_band, lane_ids + splati(static_cast<int32_t>(c)), bid + nband);
  };
  for (int64_t b0 = 0, blk = 0; b0 < V; b0 += kBlock, ++blk) {
    const int64_t end = std::min(V, b0 + kBlock);
    // Two accumulators: every weight above the band is in the exact domain, so
    // the sums are exact in any order.
    Acc16d acc0, acc1;
    int64_t c = b0;
    for (; c + 2 * kLanes <= end; c += 2 * kLanes) {
      step(load_f32(row + c), c, acc0);
      step(load_f32(row + c + kLanes), c + kLanes, acc1);
    }
    for (; c < end; c += kLanes) step(c + kLanes <= end ? load_f32(row + c) : load_tail(row, c, end), c, acc0);
    acc0.merge(acc1);
    bs[blk] = acc0.sum();
    before += bs[blk];
  }
  if (!(before < target)) return false;  // the boundary lies above the band
  // The band's weights and fine buckets, then its exact masses per fine bucket.
  const int F = kFinePerBucket * (qb - qa);
  double* h = ns.hist.get(2 * F);
  double* h1 = h + F;
  std::memset(h, 0, sizeof(double) * 2 * F);
  float* be = ns.band_e.get(nband + kLanes);
  int32_t* bq = ns.band_q.get(nband + kLanes);
  const VF vfine = splat(static_cast<float>(kFlatPerOctave * kFinePerBucket));
  const VI vf0 = splati(-kFinePerBucket * qa), vflast = splati(F - 1), izero = splati(0);
  for (int64_t j = 0; j < nband; j += kLanes) {  // bx has kLanes of slack past nband
    const VF d = load_f32(bx + j) - vm;
    const VF qf = (zero - d * vch) * vfine;
    VI f;
    for (int pi = 0; pi < kParts; ++pi) f.p[pi] = __builtin_convertvector(qf.p[pi], ni);
    f = f + vf0;
    f = select(f < izero, izero, f);
    f = select(vflast < f, vflast, f);
    to_array(f, bq + j);
    store_f32(be + j, exp16_scaled(d, vch, vcl));
  }
  int64_t j = 0;
  for (; j + 2 <= nband; j += 2) {
    h[bq[j]] += static_cast<double>(be[j]);
    h1[bq[j + 1]] += static_cast<double>(be[j + 1]);
  }
  if (j < nband) h[bq[j]] += static_cast<double>(be[j]);
  double run = before;
  int fb = 0;
  for (; fb < F; ++fb) {
    const double hb = h[fb] + h1[fb];  // exact
    if (run + hb >= target) break;
    run += hb;
  }
  if (fb == F) return false;  // the boundary lies below the band
  std::vector<Cand>& band = ns.band;
  band.clear();
  for (int64_t i = 0; i < nband; ++i)
    if (bq[i] == fb) band.push_back(Cand{bx[i], be[i], bid[i]});
  if (!std::is_sorted(band.begin(), band.end(), rank_before)) std::sort(band.begin(), band.end(), rank_before);
  size_t n = 0;
  while (n < band.size()) {
    run += static_cast<double>(band[n++].e);
    if (run >= target) break;
  }
  if (n == 0 || run < target) return false;  // cannot happen: the bucket's exact mass reaches p W
  // e where the token's fine bucket is above fb, else 0 (no branch: half the band either way).
  auto kept_weight = [&](int64_t i) {
    uint32_t u;
    std::memcpy(&u, &be[i], 4);
    u &= 0u - static_cast<uint32_t>(bq[i] < fb);
    float e;
    std::memcpy(&e, &u, 4);
    return static_cast<double>(e);
  };
  // The kept band tokens of the buckets above fb into their blocks' sums (ids
  // ascending: a run per block, two accumulators; exact, so in any order).
  for (int64_t i = 0; i < nband;) {
    const int32_t blk = bid[i] / kBlock, next = (blk + 1) * kBlock;
    double a0 = 0.0, a1 = 0.0;
    for (; i + 1 < nband && bid[i + 1] < next; i += 2) {
      a0 += kept_weight(i);
      a1 += kept_weight(i + 1);
    }
    if (i < nband && bid[i] < next) a0 += kept_weight(i++);
    bs[blk] += a0 + a1;
  }
  for (size_t i = 0; i < n; ++i) bs[band[i].idx / kBlock] += static_cast<double>(band[i].e);
  ns.bx = band[n - 1].x;
  ns.bi = band[n - 1].idx;
  ns.m = m;
  ns.ec = ec;
  ns.on = true;
  return true;
}

bool flat_cut(const float* row, int64_t V, float m, const ExpScale& ec, double p, double W, FlatNucleus& ns,
              bool sample) {
  ns.on = false;
  if (!(W >= 1.0) || !(W < 1e12)) return false;  // the top token weighs 1
  int L = 0;
  while (std::ldexp(1.0, L) <= W * (1.0 + 1e-4)) ++L;  // 2^L above the exact total (W is within ~1e-6 of it)
  const int A = 29 - L;
  if (A < 2) return false;
  const int nq = std::min(kFlatBuckets, static_cast<int>(kFlatPerOctave * (static_cast<double>(A) - 0.01)));
  if (nq < 2) return false;
  int qa = 0, qb = 0;
  if (sample && sampled_band(row, V, m, ec, p, nq, ns, &qa, &qb) && band_cut(row, V, m, ec, p, W, qa, qb, ns))
    return true;
  return counted_band(row, V, m, ec, p, W, nq, ns, &qa, &qb) && band_cut(row, V, m, ec, p, W, qa, qb, ns);
}

// The weights of a flat row's kept tokens (cpu/common/draw.h's source): e
// where the token ranks at or above (bx, bi) and e >= min_w (min-p), else 0.
// e is computed again from the logit (the bits of the cut's weights); at()
// weighs a whole block at a time.
struct FlatWeights {
  const float* x;
  int64_t n;
  float m, bx;
  ExpScale ec;
  int32_t bi;
  float min_w;
  float* block;            // kBlock weights of block `cached`
  mutable int64_t cached;  // -1: none
  DK_INLINE VF of(VF xs, int64_t c) const {
    const VF es = exp16_scaled(xs - splat(m), splat(ec.hi), splat(ec.lo));  // 0 at -inf
    const VF vbx = splat(bx);
    const VI ids = iota16() + splati(static_cast<int32_t>(c));
    const VI kept = ((xs > vbx) | ((xs == vbx) & (ids <= splati(bi)))) & (es >= splat(min_w));
    return select(kept, es, splat(0.0f));
  }
  DK_INLINE VF full(int64_t c) const { return of(load_f32(x + c), c); }
  DK_INLINE VF tail(int64_t c, int64_t end) const { return of(load_tail(x, c, end), c); }
  float at(int64_t i) const {
    const int64_t b = i / kBlock;
    if (b != cached) {
      const int64_t b0 = b * kBlock, end = std::min(n, b0 + kBlock);
      for (int64_t c = b0; c < end; c += kLanes)
        store_f32(block + (c - b0), c + kLanes <= end ? full(c) : tail(c, end));
      cached = b;
    }
    return block[i - b * kBlock];
  }
};

// Inverse CDF over a flat row's kept tokens: every kept weight is in the
// exact domain of flat_cut, so the block sums and the running sum are the
// exact sums that draw_from_cands computes one by one in index order, and the
// token is the same. The block sums are flat_cut's unless min-p removes tokens.
// *W_out = the kept mass.
int64_t draw_flat(const float* x, int64_t V, const FlatNucleus& ns, float min_w, double u, Buf<double>& sums,
                  int64_t fallback, double* W_out) {
  alignas(64) float block[kBlock + kLanes];
  const FlatWeights src{x, V, ns.m, ns.bx, ns.ec, ns.bi, min_w, block, -1};
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
  alignas(64) float block[kBlock + kLanes];
  const FlatWeights src{x, V, ns.m, ns.bx, ns.ec, ns.bi, min_w, block, -1};
  out.clear();
  alignas(64) float e[kLanes];
  for (int64_t c = 0; c < V; c += kLanes) {
    const VF w = c + kLanes <= V ? src.full(c) : src.tail(c, V);
    uint32_t bits = lane_bits(w > splat(0.0f));
    if (!bits) continue;
    store_f32(e, w);
    while (bits) {
      const int j = __builtin_ctz(bits);
      bits &= bits - 1;
      out.push_back(Cand{x[c + j], e[j], static_cast<int32_t>(c + j)});
    }
  }
}

}  // namespace detail
}  // namespace DK_ISA
}  // namespace cpu
}  // namespace decodekit
