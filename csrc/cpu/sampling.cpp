// CPU kernels of the sampling family (see sampling.h and DESIGN.md).
//
// Every row is processed by one thread with a fixed 16-lane reduction order
// that depends only on the vocabulary size, so a row's result is bit-identical
// whatever the batch, its position, the thread count or the instruction set
// (the hot loops are compiled for AVX-512, AVX2 and baseline x86-64 through
// function multiversioning; -ffp-contract=off keeps the arithmetic identical).
//
// The sampler never sorts the vocabulary:
//   pass A   one streaming read of the row: max, argmax, NaN/+inf flags and,
//            when top-k is on, the exact top-k candidates (a bounded buffer
//            compacted with nth_element, threshold rising as it goes).
//   pass B   (no top-k) exp((x - max) / T) with 16 float64 lanes: either block
//            sums for a direct inverse-CDF draw (no filter / min-p only), or a
//            gather of the only tokens that can be in the top-p nucleus
//            (a token with weight <= (1 - p) W / V never is).
//   small    the candidates are sorted (rank = logit desc, index asc), cut by
//            top-p in float64, filtered by min-p, and drawn from by inverse
//            CDF in ascending index order with one float64 Philox uniform.
#include "sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "decodekit/math.h"
#include "decodekit/philox.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(DK_NO_MULTIVERSION)
#define DK_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DK_CLONES
#endif
#define DK_INLINE inline __attribute__((always_inline))

namespace decodekit {
namespace cpu {
namespace {

constexpr int kLanes = 16;        // fixed lane count of every reduction
constexpr int64_t kBlock = 1024;  // elements per block sum (multiple of kLanes)
constexpr float kInf = std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------- loading --
struct LoadF32 {
  using T = float;
  static DK_INLINE float load(const T* p, int64_t i) { return p[i]; }
};
struct LoadF16 {
  using T = uint16_t;
  static DK_INLINE float load(const T* p, int64_t i) { return half_bits_to_float(p[i]); }
};
struct LoadBF16 {
  using T = uint16_t;
  static DK_INLINE float load(const T* p, int64_t i) { return bf16_bits_to_float(p[i]); }
};

DK_INLINE double combine_lanes(double* s) {
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) s[j] += s[j + w];
  return s[0];
}

// ----------------------------------------------------------- top-k buffer --
struct Cand {
  float x;      // logit (as float32)
  float e;      // exp((x - max) / T)
  int32_t idx;  // token id
};

// Rank order: logit descending, index ascending on ties.
DK_INLINE bool rank_before(const Cand& a, const Cand& b) {
  return a.x > b.x || (a.x == b.x && a.idx < b.idx);
}

// Keeps the k best (x, idx) seen so far in scan (ascending index) order. Once
// full, a later element equal to the threshold ranks below every kept element
// with that value (its index is higher), so admission is strictly x > thr.
struct TopKGather {
  int64_t k = 0;
  int64_t cap = 0;
  std::vector<Cand>* buf = nullptr;
  int64_t n = 0;
  float thr = -kInf;

  void init(int64_t k_, std::vector<Cand>* b) {
    k = k_;
    cap = k_ + std::max<int64_t>(k_, 1024);
    buf = b;
    if (static_cast<int64_t>(buf->size()) < cap) buf->resize(cap);
    n = 0;
    thr = -kInf;
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

// Pass A: one streaming read. Optionally converts to float32 into xbuf and
// gathers the exact top-k candidates.
template <typename L>
DK_INLINE RowStats pass_a_impl(const typename L::T* row, int64_t V, float* xbuf, TopKGather* g) {
  float vmax[kLanes];
  int64_t vidx[kLanes];
  bool vnan[kLanes], vpinf[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    vmax[j] = -kInf;
    vidx[j] = j;
    vnan[j] = false;
    vpinf[j] = false;
  }
  for (int64_t c = 0; c < V; c += kLanes) {
    float xs[kLanes];
    if (c + kLanes <= V) {
      for (int j = 0; j < kLanes; ++j) xs[j] = L::load(row, c + j);
      if (xbuf)
        for (int j = 0; j < kLanes; ++j) xbuf[c + j] = xs[j];
    } else {
      for (int j = 0; j < kLanes; ++j) xs[j] = c + j < V ? L::load(row, c + j) : -kInf;
      if (xbuf)
        for (int64_t j = 0; c + j < V; ++j) xbuf[c + j] = xs[j];
    }
    for (int j = 0; j < kLanes; ++j) {
      const bool gt = xs[j] > vmax[j];
      vmax[j] = gt ? xs[j] : vmax[j];
      vidx[j] = gt ? c + j : vidx[j];
      vnan[j] = vnan[j] | (xs[j] != xs[j]);
      vpinf[j] = vpinf[j] | (xs[j] == kInf);
    }
    if (g) {
      bool any = false;
      for (int j = 0; j < kLanes; ++j) any |= xs[j] > g->thr;
      if (any)
        for (int j = 0; j < kLanes; ++j)
          if (xs[j] > g->thr) g->push(xs[j], c + j);
    }
  }
  RowStats s{-kInf, 0, false, false};
  for (int j = 0; j < kLanes; ++j) {
    s.has_nan |= vnan[j];
    s.has_pinf |= vpinf[j];
    if (vmax[j] > s.max) s.max = vmax[j];
  }
  int64_t best = std::numeric_limits<int64_t>::max();
  for (int j = 0; j < kLanes; ++j)
    if (vmax[j] == s.max && vidx[j] < best) best = vidx[j];
  s.argmax = best;
  return s;
}

DK_CLONES RowStats pass_a_f32(const float* r, int64_t V, float* xb, TopKGather* g) {
  return pass_a_impl<LoadF32>(r, V, xb, g);
}
DK_CLONES RowStats pass_a_f16(const uint16_t* r, int64_t V, float* xb, TopKGather* g) {
  return pass_a_impl<LoadF16>(r, V, xb, g);
}
DK_CLONES RowStats pass_a_bf16(const uint16_t* r, int64_t V, float* xb, TopKGather* g) {
  return pass_a_impl<LoadBF16>(r, V, xb, g);
}

// Loads row b into float32: returns a pointer to float32 logits (the input
// itself for float32, else the converted copy in xbuf) and the row stats.
RowStats load_row(const LogitsView& lv, int64_t b, std::vector<float>& xbuf, TopKGather* g,
                  const float** x_out) {
  const int64_t V = lv.vocab_size;
  if (lv.kind == ScalarKind::kFloat32) {
    const float* row = static_cast<const float*>(lv.data) + b * lv.row_stride;
    *x_out = row;
    return pass_a_f32(row, V, nullptr, g);
  }
  if (static_cast<int64_t>(xbuf.size()) < V) xbuf.resize(V);
  const uint16_t* row = static_cast<const uint16_t*>(lv.data) + b * lv.row_stride;
  *x_out = xbuf.data();
  return lv.kind == ScalarKind::kFloat16 ? pass_a_f16(row, V, xbuf.data(), g)
                                         : pass_a_bf16(row, V, xbuf.data(), g);
}

// --------------------------------------------------------------- pass B ----
// Block sums of w_i = e_i if e_i >= min_e else 0, e_i = exp((x_i - m) / T),
// in 16 float64 lanes per block. Returns the total (blocks added in order).
DK_CLONES double block_sums(const float* x, int64_t V, float m, float T, float min_e,
                            double* sums) {
  double total = 0.0;
  for (int64_t b0 = 0, blk = 0; b0 < V; b0 += kBlock, ++blk) {
    const int64_t end = std::min(V, b0 + kBlock);
    double acc[kLanes] = {0};
    for (int64_t c = b0; c < end; c += kLanes) {
      float w[kLanes];
      if (c + kLanes <= end) {
        for (int j = 0; j < kLanes; ++j) {
          const float e = exp_nonpositive((x[c + j] - m) / T);
          w[j] = e >= min_e ? e : 0.0f;
        }
      } else {
        for (int j = 0; j < kLanes; ++j) {
          const float e = c + j < end ? exp_nonpositive((x[c + j] - m) / T) : 0.0f;
          w[j] = e >= min_e ? e : 0.0f;
        }
      }
      for (int j = 0; j < kLanes; ++j) acc[j] += static_cast<double>(w[j]);
    }
    sums[blk] = combine_lanes(acc);
    total += sums[blk];
  }
  return total;
}

// Gathers every token whose weight can put it in the top-p nucleus: weight >
// bound, where bound = 0.5 (1 - p) W_partial / V only grows as W_partial does
// (the final test uses the final W, so this gathers a superset). Returns W.
DK_CLONES double gather_nucleus(const float* x, int64_t V, float m, float T, double p,
                                std::vector<Cand>& out) {
  out.clear();
  double lanes[kLanes] = {0};
  double running = 1.0;  // the max token alone has weight exactly 1
  float bound = static_cast<float>(0.5 * (1.0 - p) * running / static_cast<double>(V));
  for (int64_t c = 0; c < V; c += kLanes) {
    float e[kLanes];
    if (c + kLanes <= V) {
      for (int j = 0; j < kLanes; ++j) e[j] = exp_nonpositive((x[c + j] - m) / T);
    } else {
      for (int j = 0; j < kLanes; ++j) e[j] = c + j < V ? exp_nonpositive((x[c + j] - m) / T) : 0.0f;
    }
    double chunk[kLanes];
    for (int j = 0; j < kLanes; ++j) {
      chunk[j] = static_cast<double>(e[j]);
      lanes[j] += chunk[j];
    }
    bool any = false;
    for (int j = 0; j < kLanes; ++j) any |= e[j] > bound;
    if (any)
      for (int j = 0; j < kLanes; ++j)
        if (e[j] > bound) out.push_back(Cand{x[c + j], e[j], static_cast<int32_t>(c + j)});
    if ((c & (kBlock - 1)) == kBlock - kLanes) {
      double t[kLanes];
      for (int j = 0; j < kLanes; ++j) t[j] = lanes[j];
      running = std::max(running, combine_lanes(t));
      bound = static_cast<float>(0.5 * (1.0 - p) * running / static_cast<double>(V));
    }
  }
  return combine_lanes(lanes);
}

// Inverse CDF over block sums: the first index (ascending) whose running
// float64 sum exceeds target. Zero-weight tokens are never returned.
int64_t draw_from_blocks(const float* x, int64_t V, float m, float T, float min_e,
                         const double* sums, double target, int64_t fallback) {
  const int64_t nblocks = (V + kBlock - 1) / kBlock;
  double cum = 0.0;
  int64_t blk = 0;
  for (; blk < nblocks; ++blk) {
    if (cum + sums[blk] > target) break;
    cum += sums[blk];
  }
  int64_t last_positive = fallback;
  for (int64_t i = std::min(blk, nblocks - 1) * kBlock; i < V; ++i) {
    const float e = exp_nonpositive((x[i] - m) / T);
    if (!(e >= min_e) || e == 0.0f) continue;
    last_positive = i;
    cum += static_cast<double>(e);
    if (cum > target) return i;
  }
  return last_positive;
}

// --------------------------------------------------------- candidate set ---
// Shortest rank-order prefix of cands (sorted in place by rank) whose float64
// mass reaches p * total. Returns the prefix length, or -1 when even the whole
// candidate list falls short (then every token of the stage is kept).
int64_t top_p_prefix(std::vector<Cand>& cands, double p, double total) {
  std::sort(cands.begin(), cands.end(), rank_before);
  const double target = p * total;
  double cum = 0.0;
  for (size_t i = 0; i < cands.size(); ++i) {
    cum += static_cast<double>(cands[i].e);
    if (cum >= target) return static_cast<int64_t>(i) + 1;
  }
  return -1;
}

// Inverse CDF over candidates in ascending index order.
int64_t draw_from_cands(std::vector<Cand>& cands, double u, int64_t fallback) {
  std::sort(cands.begin(), cands.end(), [](const Cand& a, const Cand& b) { return a.idx < b.idx; });
  double total = 0.0;
  for (const Cand& c : cands) total += static_cast<double>(c.e);
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

struct Scratch {
  std::vector<float> xbuf;
  std::vector<Cand> cands;
  std::vector<double> sums;
};

Scratch& thread_scratch() {
  thread_local Scratch s;
  return s;
}

template <typename F>
void for_each_row(int64_t B, int num_threads, F&& f) {
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, B)));
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t b = 0; b < B; ++b) f(b);
}

bool row_is_valid(const RowStats& s, float T) {
  if (s.has_nan || s.max == -kInf) return false;
  if (T > 0.0f && s.has_pinf) return false;
  return true;
}

int64_t sample_row(const LogitsView& lv, int64_t b, const SamplingParams& prm, bool* ok) {
  Scratch& sc = thread_scratch();
  const int64_t V = lv.vocab_size;
  const float T = prm.temperature.at(b);
  const int64_t k_raw = prm.top_k.at(b);
  const double p = prm.top_p.at(b);
  const float min_p = prm.min_p.at(b);
  const bool use_k = T > 0.0f && k_raw > 0 && k_raw < V;
  const bool use_p = p < 1.0;
  const bool use_min_p = min_p > 0.0f;

  TopKGather g;
  if (use_k && k_raw > 1) g.init(k_raw, &sc.cands);
  const float* x = nullptr;
  const RowStats s = load_row(lv, b, sc.xbuf, (use_k && k_raw > 1) ? &g : nullptr, &x);
  *ok = row_is_valid(s, T);
  if (!*ok) return -1;
  // Greedy: T == 0, top_k == 1 and top_p == 0 all keep only the top token.
  if (T == 0.0f || (use_k && k_raw == 1) || p <= 0.0) return s.argmax;

  const PhiloxStreamRef rng{static_cast<uint64_t>(prm.seed.at(b)),
                            static_cast<uint64_t>(prm.offset.at(b)), kStreamSample};
  const double u = rng.uniform_double(0);
  const float m = s.max;

  if (!use_k && !use_p) {
    // Temperature (and min-p) only: w_i >= min_p * max_w, and max_w == 1.
    const float min_e = use_min_p ? min_p : 0.0f;
    const int64_t nblocks = (V + kBlock - 1) / kBlock;
    if (static_cast<int64_t>(sc.sums.size()) < nblocks) sc.sums.resize(nblocks);
    const double W = block_sums(x, V, m, T, min_e, sc.sums.data());
    return draw_from_blocks(x, V, m, T, min_e, sc.sums.data(), u * W, s.argmax);
  }

  std::vector<Cand>& cands = sc.cands;
  double stage_total;
  int64_t stage_size;
  if (use_k) {
    g.finish();
    cands.resize(g.n);
    stage_total = 0.0;
    for (Cand& c : cands) c.e = exp_nonpositive((c.x - m) / T);
    stage_size = k_raw;
  } else {
    stage_total = gather_nucleus(x, V, m, T, p, cands);
    stage_size = V;
  }
  if (use_p) {
    if (use_k) {
      // Mass of the top-k stage, summed in rank order.
      std::sort(cands.begin(), cands.end(), rank_before);
      for (const Cand& c : cands) stage_total += static_cast<double>(c.e);
      const float bound = static_cast<float>(0.5 * (1.0 - p) * stage_total / static_cast<double>(stage_size));
      cands.erase(std::remove_if(cands.begin(), cands.end(), [&](const Cand& c) { return !(c.e > bound); }),
                  cands.end());
    } else {
      const float bound = static_cast<float>(0.5 * (1.0 - p) * stage_total / static_cast<double>(stage_size));
      cands.erase(std::remove_if(cands.begin(), cands.end(), [&](const Cand& c) { return !(c.e > bound); }),
                  cands.end());
    }
    const int64_t keep = top_p_prefix(cands, p, stage_total);
    if (keep >= 0) {
      cands.resize(keep);
    } else if (!use_k) {
      // Rounding left the nucleus short of p: keep every token of the row.
      const float min_e = use_min_p ? min_p : 0.0f;
      const int64_t nblocks = (V + kBlock - 1) / kBlock;
      if (static_cast<int64_t>(sc.sums.size()) < nblocks) sc.sums.resize(nblocks);
      const double W = block_sums(x, V, m, T, min_e, sc.sums.data());
      return draw_from_blocks(x, V, m, T, min_e, sc.sums.data(), u * W, s.argmax);
    }
  }
  if (use_min_p) {
    // The top token (weight exactly 1) is always a candidate, so max_w == 1.
    cands.erase(std::remove_if(cands.begin(), cands.end(), [&](const Cand& c) { return !(c.e >= min_p); }),
                cands.end());
  }
  return draw_from_cands(cands, u, s.argmax);
}

// Softmax of one row into out[0, V).
DK_CLONES double exp_store(const float* x, int64_t V, float m, float T, float* out) {
  double acc[kLanes] = {0};
  for (int64_t c = 0; c < V; c += kLanes) {
    float e[kLanes];
    if (c + kLanes <= V) {
      for (int j = 0; j < kLanes; ++j) e[j] = exp_nonpositive((x[c + j] - m) / T);
      for (int j = 0; j < kLanes; ++j) out[c + j] = e[j];
    } else {
      for (int j = 0; j < kLanes; ++j) e[j] = c + j < V ? exp_nonpositive((x[c + j] - m) / T) : 0.0f;
      for (int64_t j = 0; c + j < V; ++j) out[c + j] = e[j];
    }
    for (int j = 0; j < kLanes; ++j) acc[j] += static_cast<double>(e[j]);
  }
  return combine_lanes(acc);
}

DK_CLONES void scale_store(float* out, int64_t V, float inv) {
  for (int64_t i = 0; i < V; ++i) out[i] *= inv;
}

}  // namespace

void softmax(const LogitsView& lv, RowParam<float> temperature, bool /*deterministic*/,
             int num_threads, float* probs) {
  for_each_row(lv.batch, num_threads, [&](int64_t b) {
    Scratch& sc = thread_scratch();
    float* out = probs + b * lv.vocab;
    const float T = temperature.at(b);
    const float* x = nullptr;
    const RowStats s = load_row(lv, b, sc.xbuf, nullptr, &x);
    std::fill(out + lv.vocab_size, out + lv.vocab, 0.0f);
    if (!row_is_valid(s, T)) {
      std::fill(out, out + lv.vocab_size, std::numeric_limits<float>::quiet_NaN());
      return;
    }
    if (T == 0.0f) {
      std::fill(out, out + lv.vocab_size, 0.0f);
      out[s.argmax] = 1.0f;
      return;
    }
    const double total = exp_store(x, lv.vocab_size, s.max, T, out);
    scale_store(out, lv.vocab_size, static_cast<float>(1.0 / total));
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

void sample_from_logits(const LogitsView& lv, const SamplingParams& params, bool /*deterministic*/,
                        int num_threads, int64_t* ids, bool* valid) {
  for_each_row(lv.batch, num_threads, [&](int64_t b) {
    bool ok = false;
    const int64_t id = sample_row(lv, b, params, &ok);
    valid[b] = ok;
    ids[b] = ok ? id : -1;
  });
}

}  // namespace cpu
}  // namespace decodekit
