// The chain top-k -> top-p -> min-p over a row's weights, and the draw from
// the tokens it keeps (templates over the weight: logits or probabilities).
#pragma once

#include <algorithm>
#include <vector>

#include "cpu/common/draw.h"
#include "cpu/sampling/internal.h"
#include "cpu/sampling/top_k.h"

namespace decodekit {
namespace cpu {
namespace DK_ISA {
namespace detail {

// The chain, one step per filter. The candidates of a stage are either the
// top-k tokens (gathered in pass A) or a superset of the top-p nucleus.

// 1a. Top-k: the k gathered candidates with their weights; returns their mass.
template <class Wt>
double top_k_stage(TopKGather& g, const Wt& w, std::vector<Cand>& cands) {
  g.finish();
  cands.resize(g.n);
  double total = 0.0;
  for (Cand& c : cands) {
    c.e = w(c.x);
    total += static_cast<double>(c.e);
  }
  return total;
}

// 1b. Top-p alone: drops the gathered tokens that cannot be in the nucleus (no
// token with weight <= (1 - p) W / V can be); total W is the row's mass.
inline void drop_below_nucleus_bound(std::vector<Cand>& cands, double p, double total, int64_t V) {
  const float bound = static_cast<float>(0.5 * (1.0 - p) * total / static_cast<double>(V));
  cands.erase(std::remove_if(cands.begin(), cands.end(), [&](const Cand& c) { return !(c.e > bound); }), cands.end());
}

// 2. Top-p over candidates that contain the nucleus (total: the stage's mass).
// True when cands now hold exactly the nucleus; false when rounding left even
// all of them short of p (then every token of the stage stays). Candidates in
// index order (a nucleus gather): for more than a few dozen, the branch-free
// radix selection is faster on fresh data.
inline bool top_p_stage(std::vector<Cand>& cands, double p, double total, bool index_order) {
  thread_local std::vector<Cand> tmp;
  const int64_t keep = index_order && cands.size() > 64 ? top_p_select_sorted_input(cands, p, total, tmp)
                                                        : top_p_select(cands, p, total);
  if (tmp.capacity() > (size_t{1} << 20)) std::vector<Cand>().swap(tmp);  // do not pin a huge call's memory
  if (keep < 0) return false;
  cands.resize(keep);
  return true;
}

// 3. Min-p: keeps w >= min_w. The top token is always a candidate, so the
// stage's max weight is w_max.
inline void min_p_stage(std::vector<Cand>& cands, float min_w) {
  cands.erase(std::remove_if(cands.begin(), cands.end(), [&](const Cand& c) { return !(c.e >= min_w); }), cands.end());
}

// top-k -> top-p -> min-p, in that order. `g` holds the top-k candidates
// gathered in pass A when cp.use_k. w_max is the weight of the top token (1
// from logits, the max probability from probs); min-p keeps
// w >= min_p * w_max, in float32.
template <class Wt>
Kept apply_chain(const float* x, int64_t V, const Wt& w, float w_max, const ChainParams& cp, TopKGather& g,
                 std::vector<Cand>& cands) {
  const float min_w = cp.use_min_p ? cp.min_p * w_max : 0.0f;
  if (!cp.use_k && !cp.use_p) return Kept{true, min_w};
  double total;
  if (cp.use_k) {
    total = top_k_stage(g, w, cands);
  } else {
    total = gather_nucleus(x, V, w, w_max, cp.p, cands);
    drop_below_nucleus_bound(cands, cp.p, total, V);
  }
  if (cp.use_p && !top_p_stage(cands, cp.p, total, !cp.use_k) && !cp.use_k) return Kept{true, min_w};
  if (cp.use_min_p) min_p_stage(cands, min_w);
  return Kept{false, min_w};
}

// Draws from the kept tokens; *W_out = their total weight.
template <class Wt>
int64_t draw_kept(const float* x, int64_t V, const Wt& w, const Kept& kept, std::vector<Cand>& cands, Buf<double>& sums,
                  double u, int64_t fallback, double* W_out, bool fast = false) {
  if (!kept.full_row) return draw_from_cands(cands, u, fallback, W_out);
  const RowWeights<Wt> src{x, w, kept.min_w};
  const double W = block_sums(src, V, sums.get(reduce::num_blocks(V)), fast);
  *W_out = W;
  const int64_t token = draw_from_blocks(src, V, sums.data(), u * W);
  return token >= 0 ? token : fallback;
}

// Is token i kept? cands must be sorted by index (draw_from_cands leaves them so).
template <class Wt>
bool is_kept(int64_t i, const float* x, const Wt& w, const Kept& kept, const std::vector<Cand>& cands) {
  if (kept.full_row) return x[i] > -kInf && w(x[i]) >= kept.min_w;
  auto it = std::lower_bound(cands.begin(), cands.end(), i,
                             [](const Cand& c, int64_t v) { return static_cast<int64_t>(c.idx) < v; });
  return it != cands.end() && it->idx == i;
}

}  // namespace detail
}  // namespace DK_ISA
}  // namespace cpu
}  // namespace decodekit
