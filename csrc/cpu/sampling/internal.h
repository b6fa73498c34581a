// Shared internals of the sampling kernels (csrc/cpu/sampling/*.cpp; see
// sampling.h and DESIGN.md). Everything here lives in namespace DK_ISA::detail:
// each instruction-set build has its own copy (cpu/common/isa.h).
//
// Every row is processed by one thread with a fixed 16-lane reduction order
// that depends only on the vocabulary size, so a row's result is bit-identical
// whatever the batch, its position, the thread count or the instruction set.
// The files are compiled once per instruction set (AVX-512, AVX2, baseline
// x86-64) into namespace DK_ISA; cpu/common/dispatch.cpp picks one at run time. The
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
//            On a flat row (the capture overflows, or holds 16384 tokens or
//            more: a nucleus of thousands of tokens) flat_cut
//            (nucleus_online.cpp, nucleus_flat.h) counts the tokens per
//            bucket, bounds the buckets' masses from their weight ranges, and
//            in one more read sums the tokens above the boundary's band
//            exactly and gathers the band, cut in finer buckets; only the
//            boundary's fine bucket is sorted. The nucleus is kept as a rank
//            threshold that the draw reads through exact block sums.
//   softmax  reads the row once: each chunk relative to the running maximum,
//            the few segments rescaled at the end.
//   small    the candidates are sorted (rank = logit desc, index asc), cut by
//            top-p in float64, filtered by min-p, and drawn from by inverse
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/common/isa.h"
#include "cpu/common/scratch.h"
#include "cpu/common/vec.h"
#include "cpu/sampling/sampling.h"
#include "decodekit/math.h"
#include "decodekit/philox.h"
#include "decodekit/reduce.h"

#define DK_INLINE inline __attribute__((always_inline))

namespace decodekit {
namespace cpu {
namespace DK_ISA {
namespace detail {

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

struct Cand {
  float x;      // logit (as float32)
  float e;      // exp((x - max) * (1 / T))
  int32_t idx;  // token id
};

// Rank order: logit descending, index ascending on ties.
DK_INLINE bool rank_before(const Cand& a, const Cand& b) { return a.x > b.x || (a.x == b.x && a.idx < b.idx); }

struct RowStats {
  float max;
  int64_t argmax;
  bool has_nan;
  bool has_pinf;
};

// Pass A prefetches each line 8 KiB ahead, and one line per chunk 32 KiB
// ahead: with 4 KiB pages the hardware prefetcher stops at every page start,
// and after other work has run (a model forward, an allocation that unmapped
// memory) the page walks of a cold row would otherwise be taken one by one.
// Measured at B=8, V=128256 after a large allocation: 1 thread ~290 -> ~255 us.
template <typename T>
constexpr int64_t kPrefetchElems = 8192 / sizeof(T);
template <typename T>
constexpr int64_t kPageElems = 4096 / sizeof(T);

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
    const double y =
        static_cast<double>(m) + (log_double(static_cast<double>(bound)) - 1e-3) / static_cast<double>(inv_t);
    return std::nextafter(static_cast<float>(y), -kInf);
  }
};
struct ProbWeight {
  static constexpr bool kIdentity = true;
  DK_INLINE VF operator()(VF x) const { return x; }
  DK_INLINE float operator()(float x) const { return x; }
  float lower_x(float bound) const { return bound; }  // the weight is the value
};

struct Span {
  const float* r;
  int64_t n;
  DK_INLINE VF load(int64_t k) const { return k + kLanes <= n ? load_f32(r + k) : load_tail(r, k, n); }
};

// Maximum of row[c0, c0 + n) (NaN lanes ignored, noted in vnan), prefetching

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

// The weight source (cpu/common/draw.h) of a row whose whole length passes
// top-k and top-p: w(x_i) where that is >= min_w (min-p), else 0; 0 at -inf.
template <class Wt>
struct RowWeights {
  const float* x;
  Wt w;
  float min_w;
  DK_INLINE VF of(VF xs) const {
    const VF zero = splat(0.0f);
    const VF e = select(xs > splat(-kInf), w(xs), zero);
    return select(e >= splat(min_w), e, zero);
  }
  DK_INLINE VF full(int64_t c) const { return of(load_f32(x + c)); }
  DK_INLINE VF tail(int64_t c, int64_t end) const { return of(load_tail(x, c, end)); }
  DK_INLINE float at(int64_t i) const {
    if (!(x[i] > -kInf)) return 0.0f;
    const float e = w(x[i]);
    return e >= min_w ? e : 0.0f;
  }
};

// -------------------------------------------------------- per-thread scratch
struct Scratch {
  Buf<float> xbuf;
  std::vector<Cand> cands;
  std::vector<Cand> topn;
  Buf<double> sums;
  Buf<float> cmax;  // chunk maxima of the top-k gather
  Buf<float> ctmp;
  NucleusScratch nucleus;
};
Scratch& thread_scratch();
void trim_scratch();

// --------------------------------------------------- functions of the files
struct TopKGather;
// row_scan.cpp
RowStats load_row(const LogitsView& lv, int64_t b, Buf<float>& xbuf, TopKGather* g, const float** x_out);
RowStats pass_a_probs(const float* row, int64_t V, TopKGather* g, int64_t* npos);
float span_max(const float* row, int64_t c0, int64_t n, int64_t V, VI& vnan);
int64_t first_index_of_max(const float* row, int64_t V, const float* span_maxima, int64_t span, float m);
RowStats plain_online(const float* row, int64_t V, float inv_t, Buf<float>& bmax_buf, Buf<double>& sums_buf,
                      double* W_out);
// top_p.cpp
template <class Wt>
double gather_nucleus(const float* x, int64_t V, const Wt& w, float w_max, double p, std::vector<Cand>& out);
template <class Wt>
double nucleus_candidates(const float* x, int64_t V, const Wt& w, float w_max, double p, double W, const double* mass,
                          std::vector<Cand>& out);
double mass_discount(int64_t V);
double lane_total(VF v);
int64_t top_p_select(std::vector<Cand>& cands, double p, double total);
int64_t top_p_select_sorted_input(std::vector<Cand>& cands, double p, double total, std::vector<Cand>& tmp);
// nucleus_online.cpp
RowStats nucleus_online(const float* row, int64_t V, float inv_t, double p, Buf<float>& cmax_buf, Buf<double>& seg_buf,
                        NucleusScratch& ns, std::vector<Cand>& out, double* W_out, bool* cut);
// plan.cpp
int64_t draw_from_cands(std::vector<Cand>& cands, double u, int64_t fallback, double* total_out);
bool params_ok(float T, double p, float min_p);
bool row_is_valid(const RowStats& s, float T);
// How a row of logits is processed, chosen once per row from its parameters
// and dtype (plan_row), before it is read.
enum class RowPlan {
  kInvalid,       // a parameter out of range: the row is invalid, nothing is read
  kGreedy,        // T == 0, top_k == 1 or top_p == 0: the argmax (pass A only)
  kPlainOneRead,  // float32, T > 0, no filter: pass A and the block sums in one read, then the draw
  kTopPOneRead,   // float32, T > 0, top-p without top-k: pass A and the nucleus in one read (nucleus_online)
  kChain,         // anything else: pass A with the top-k gather, then top-k -> top-p -> min-p (apply_chain)
};
RowPlan plan_row(ScalarKind kind, float T, const ChainParams& cp);
// A row of logits after pass A and the chain: its stats, its weights
// exp((x - max) / T) and the kept tokens (Kept, and the scratch's cands).
struct LogitsRow {
  RowPlan plan = RowPlan::kInvalid;
  const float* x = nullptr;  // float32 logits (the input, or the scratch's converted copy)
  RowStats s{};
  bool valid = false;
  LogitWeight w{0.0f, 1.0f};
  Kept kept{true, 0.0f};
  double W = 0.0;  // kPlainOneRead: the total weight (block sums in the scratch); kTopPOneRead: the row's
};
LogitsRow prepare_logits_row(const LogitsView& lv, int64_t b, float T, int64_t k, double p, float min_p, Scratch& sc);
int64_t sample_row(const LogitsView& lv, int64_t b, const SamplingParams& prm, const LogprobRequest& lp, bool fast,
                   bool* ok);
// The row's processed distribution (processed_probs) into out[0, vocab_size); false for an invalid row.
bool processed_row(const LogitsView& lv, int64_t b, const SamplingParams& prm, bool fast, float* out);
struct ProbRow {  // a probability row after pass A and the chain
  const float* x;
  RowStats s;
  int64_t npos;  // entries > 0
  bool valid;
  Kept kept;
};
ProbRow prepare_probs_row(const ProbsView& pv, int64_t b, const FilterParams& fp, Scratch& sc);
void write_filtered_row(const ProbRow& r, int64_t V, std::vector<Cand>& cands, float* out);
// softmax.cpp
bool softmax_row(const LogitsView& lv, int64_t b, float inv_t, float* out, Scratch& sc);
// logprobs.cpp
void top_n_by_value(const float* x, int64_t V, int64_t n, std::vector<Cand>& out);
void write_invalid_logprobs(const LogprobRequest& lp, int64_t b);

// Writes the logprob outputs of row b: the drawn token's and the n best.
template <class F>
void write_logprobs(const LogprobRequest& lp, int64_t b, int64_t token, const float* x, int64_t V, F&& logprob_of,
                    std::vector<Cand>& topn) {
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

}  // namespace detail
}  // namespace DK_ISA
}  // namespace cpu
}  // namespace decodekit
