// Top-p: the nucleus gather (a superset of the nucleus without sorting) and the
// selection of the shortest rank-order prefix reaching p (quickselect, or a
// radix sort). The one-read capture with its exact bucket cut is in
// nucleus_online.cpp.
#include "cpu/sampling/internal.h"
#include "cpu/sampling/top_k.h"
#include "decodekit/fixed.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace decodekit {
namespace cpu {
namespace DK_ISA {
namespace detail {

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
double nucleus_candidates(const float* x, int64_t V, const Wt& w, float w_max, double p, double W, const double* mass,
                          std::vector<Cand>& out) {
  const float t0 = w_max * 0.0625f, t1 = t0 * 0.0625f, t2 = t1 * 0.0625f, t3 = t2 * 0.0625f;
  const double target = p * W;
  float bound = static_cast<float>(0.5 * (1.0 - p) * W / static_cast<double>(V));
  if (mass[0] >= target)
    bound = std::max(bound, t0);
  else if (mass[1] >= target)
    bound = std::max(bound, t1);
  else if (mass[2] >= target)
    bound = std::max(bound, t2);
  else if (mass[3] >= target)
    bound = std::max(bound, t3);
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

template double gather_nucleus<LogitWeight>(const float*, int64_t, const LogitWeight&, float, double,
                                            std::vector<Cand>&);
template double gather_nucleus<ProbWeight>(const float*, int64_t, const ProbWeight&, float, double, std::vector<Cand>&);
template double nucleus_candidates<LogitWeight>(const float*, int64_t, const LogitWeight&, float, double, double,
                                                const double*, std::vector<Cand>&);

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
  auto key = [](float x) { return ~rank_key(x); };  // descending in x (-0 ranks with +0)
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

}  // namespace detail
}  // namespace DK_ISA
}  // namespace cpu
}  // namespace decodekit
