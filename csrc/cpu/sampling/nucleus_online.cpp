// Top-p alone on float32 logits: pass A and the nucleus in one read of the row,
// with an exact cut of the nucleus among the tokens captured in that read.
#include "cpu/sampling/internal.h"
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
RowStats nucleus_online(const float* row, int64_t V, float inv_t, double p, Buf<float>& cmax_buf, Buf<double>& seg_buf,
                        NucleusScratch& ns, std::vector<Cand>& out, double* W_out, bool* cut) {
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

}  // namespace detail
}  // namespace DK_ISA
}  // namespace cpu
}  // namespace decodekit
