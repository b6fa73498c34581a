// The logprob outputs of the samplers: the n best tokens of a row, and the
// outputs of an invalid row (write_logprobs, a template, is in internal.h).
#include <algorithm>
#include <limits>
#include <vector>

#include "cpu/sampling/internal.h"
#include "cpu/sampling/top_k.h"

namespace decodekit {
namespace cpu {
namespace DK_ISA {
namespace detail {

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

void write_invalid_logprobs(const LogprobRequest& lp, int64_t b) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  if (lp.logprobs) lp.logprobs[b] = nan;
  for (int64_t j = 0; j < lp.n_top; ++j) {
    lp.top_ids[b * lp.n_top + j] = -1;
    lp.top_logprobs[b * lp.n_top + j] = nan;
  }
}

}  // namespace detail
}  // namespace DK_ISA
}  // namespace cpu
}  // namespace decodekit
