// The row plan of the samplers and the chain top-k -> top-p -> min-p.
#include "cpu/sampling/internal.h"
#include "cpu/sampling/nucleus_flat.h"
#include "cpu/sampling/plan.h"
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

// How a row is processed, chosen once from its parameters and dtype.
RowPlan plan_row(ScalarKind kind, float T, const ChainParams& cp) {
  if (!params_ok(T, cp.p, cp.min_p)) return RowPlan::kInvalid;
  // T == 0, top_k == 1 and top_p == 0 all keep only the top token.
  if (T == 0.0f || (cp.use_k && cp.k == 1) || cp.p <= 0.0) return RowPlan::kGreedy;
  if (kind == ScalarKind::kFloat32 && !cp.use_k) {
    if (!cp.use_p && !cp.use_min_p) return RowPlan::kPlainOneRead;
    if (cp.use_p) return RowPlan::kTopPOneRead;
  }
  return RowPlan::kChain;
}

LogitsRow prepare_logits_row(const LogitsView& lv, int64_t b, float T, int64_t k, double p, float min_p, Scratch& sc) {
  const int64_t V = lv.vocab_size;
  const ChainParams cp{T > 0.0f && k > 0 && k < V, k, p < 1.0, p, min_p > 0.0f, min_p};
  LogitsRow r;
  r.plan = plan_row(lv.kind, T, cp);
  if (r.plan == RowPlan::kInvalid) return r;
  // Pass A (and, by plan, the block sums or the nucleus in the same read).
  const float* row_f32 = static_cast<const float*>(lv.data) + b * lv.row_stride;
  TopKGather g;
  bool cut = false;
  switch (r.plan) {
    case RowPlan::kPlainOneRead:
      r.x = row_f32;
      r.s = plain_online(r.x, V, inverse_temperature(T), sc.cmax, sc.sums, &r.W);
      break;
    case RowPlan::kTopPOneRead:
      r.x = row_f32;
      r.s = nucleus_online(r.x, V, inverse_temperature(T), p, sc.cmax, sc.sums, sc.nucleus, sc.cands, &r.W, &cut);
      break;
    case RowPlan::kChain:
      if (cp.use_k && k > 1) g.init(k, &sc.cands, &sc.cmax, &sc.ctmp);
      r.s = load_row(lv, b, sc.xbuf, (cp.use_k && k > 1) ? &g : nullptr, &r.x);
      break;
    default:  // kGreedy
      r.s = load_row(lv, b, sc.xbuf, nullptr, &r.x);
  }
  r.valid = row_is_valid(r.s, T);
  if (!r.valid || r.plan == RowPlan::kGreedy) {
    r.w = LogitWeight{r.s.max, 1.0f};
    return r;
  }
  r.w = LogitWeight{r.s.max, inverse_temperature(T)};
  // The kept set: top-k -> top-p -> min-p.
  const float min_w = cp.use_min_p ? cp.min_p : 0.0f;
  switch (r.plan) {
    case RowPlan::kPlainOneRead:  // every token; the block sums are ready
      r.kept = Kept{true, 0.0f};
      break;
    case RowPlan::kTopPOneRead:  // the nucleus gathered in pass A (cut exactly there, or a superset)
      if (flat_nucleus().on) {   // a flat row: the nucleus is a rank threshold (flat_cut)
        r.kept = Kept{false, min_w};
        break;
      }
      if (!cut) {
        drop_below_nucleus_bound(sc.cands, p, r.W, V);
        if (!top_p_stage(sc.cands, p, r.W, true)) {
          r.kept = Kept{true, min_w};
          break;
        }
      }
      if (cp.use_min_p) min_p_stage(sc.cands, min_w);
      r.kept = Kept{false, min_w};
      break;
    default:  // kChain
      r.kept = apply_chain(r.x, V, r.w, 1.0f, cp, g, sc.cands);
  }
  return r;
}

int64_t sample_row(const LogitsView& lv, int64_t b, const SamplingParams& prm, const LogprobRequest& lp, bool fast,
                   bool* ok) {
  Scratch& sc = thread_scratch();
  const int64_t V = lv.vocab_size;
  LogitsRow r = prepare_logits_row(lv, b, prm.temperature.at(b), prm.top_k.at(b), prm.top_p.at(b), prm.min_p.at(b), sc);
  *ok = r.plan != RowPlan::kInvalid && r.valid;
  if (!*ok) {
    write_invalid_logprobs(lp, b);
    return -1;
  }
  const float* x = r.x;
  const float m = r.s.max;
  const bool greedy = r.plan == RowPlan::kGreedy;
  const bool flat = r.plan == RowPlan::kTopPOneRead && flat_nucleus().on;  // the nucleus is flat_cut's
  int64_t token = r.s.argmax;
  double W = 1.0;
  if (!greedy) {
    const double u =
        PhiloxStreamRef{static_cast<uint64_t>(prm.seed.at(b)), static_cast<uint64_t>(prm.offset.at(b)), kStreamSample}
            .uniform_double(0);
    if (r.plan == RowPlan::kPlainOneRead) {  // the block sums are ready: draw from them
      W = r.W;
      const int64_t t = draw_from_blocks(RowWeights<LogitWeight>{x, r.w, 0.0f}, V, sc.sums.data(), u * W);
      token = t >= 0 ? t : r.s.argmax;
    } else if (flat && !lp.active()) {  // no candidate list needed: draw from the threshold
      token = draw_flat(x, V, flat_nucleus(), r.kept.min_w, u, sc.sums, r.s.argmax, &W);
    } else {
      if (flat) flat_cands(x, V, flat_nucleus(), r.kept.min_w, sc.cands);
      token = draw_kept(x, V, r.w, r.kept, sc.cands, sc.sums, u, r.s.argmax, &W, fast);
    }
  }
  if (!lp.active()) return token;
  if (lp.raw) {
    const RowWeights<LogitWeight> raw{x, LogitWeight{m, 1.0f}, 0.0f};
    const double log_raw = log_double(block_sums(raw, V, sc.sums.get(reduce::num_blocks(V))));
    write_logprobs(lp, b, token, x, V, [&](int64_t i) { return static_cast<double>(x[i] - m) - log_raw; }, sc.topn);
  } else if (greedy) {
    const int64_t top = r.s.argmax;
    write_logprobs(
        lp, b, token, x, V, [&](int64_t i) { return i == top ? 0.0 : -std::numeric_limits<double>::infinity(); },
        sc.topn);
  } else {
    const double logW = log_double(W);
    const LogitWeight& w = r.w;
    const Kept& kept = r.kept;
    write_logprobs(
        lp, b, token, x, V,
        [&](int64_t i) {
          return is_kept(i, x, w, kept, sc.cands) ? static_cast<double>((x[i] - m) * w.inv_t) - logW
                                                  : -std::numeric_limits<double>::infinity();
        },
        sc.topn);
  }
  return token;
}

bool processed_row(const LogitsView& lv, int64_t b, const SamplingParams& prm, bool fast, float* out) {
  Scratch& sc = thread_scratch();
  const int64_t V = lv.vocab_size;
  const LogitsRow r =
      prepare_logits_row(lv, b, prm.temperature.at(b), prm.top_k.at(b), prm.top_p.at(b), prm.min_p.at(b), sc);
  if (r.plan == RowPlan::kInvalid || !r.valid) {
    std::fill(out, out + V, std::numeric_limits<float>::quiet_NaN());
    return false;
  }
  if (r.plan == RowPlan::kGreedy) {
    std::fill(out, out + V, 0.0f);
    out[r.s.argmax] = 1.0f;
    return true;
  }
  if (r.kept.full_row) {
    // Every token whose weight reaches min-p; W as the draw computes it.
    const RowWeights<LogitWeight> src{r.x, r.w, r.kept.min_w};
    const double W =
        r.plan == RowPlan::kPlainOneRead ? r.W : block_sums(src, V, sc.sums.get(reduce::num_blocks(V)), fast);
    float e[kLanes];
    for (int64_t c = 0; c < V; c += kLanes) {
      to_array(c + kLanes <= V ? src.full(c) : src.tail(c, V), e);
      for (int64_t j = 0; j < kLanes && c + j < V; ++j) out[c + j] = static_cast<float>(static_cast<double>(e[j]) / W);
    }
    return true;
  }
  // The kept candidates; W their float64 total in index order (draw_from_cands).
  std::vector<Cand>& cands = sc.cands;
  if (r.plan == RowPlan::kTopPOneRead && flat_nucleus().on) flat_cands(r.x, V, flat_nucleus(), r.kept.min_w, cands);
  std::sort(cands.begin(), cands.end(), [](const Cand& x, const Cand& y) { return x.idx < y.idx; });
  double W = 0.0;
  for (const Cand& c : cands) W += static_cast<double>(c.e);
  std::fill(out, out + V, 0.0f);
  for (const Cand& c : cands) out[c.idx] = static_cast<float>(static_cast<double>(c.e) / W);
  return true;
}

// ------------------------------------------------------ probability rows ---
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

}  // namespace detail
}  // namespace DK_ISA
}  // namespace cpu
}  // namespace decodekit
