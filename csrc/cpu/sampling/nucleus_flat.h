// Top-p alone on flat rows (nucleus_online.cpp): the exact nucleus of a row
// whose nucleus holds thousands of tokens, cut in a band of weight buckets and
// held as a rank threshold instead of a candidate list.
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/sampling/internal.h"

namespace decodekit {
namespace cpu {
namespace DK_ISA {
namespace detail {

// Per-thread state of the last row's flat cut (flat_nucleus()). The kept set
// is every token ranked at or above (bx, bi): x > bx, or x == bx and index <= bi.
struct FlatNucleus {
  bool on = false;  // the last nucleus_online call on this thread cut its row here
  float bx = 0.0f;
  int32_t bi = -1;
  float m = 0.0f;  // the row maximum and exp scale of the weights e = exp((x - m) / T)
  ExpScale ec{};
  Buf<double> hist;        // the band's masses per fine bucket
  Buf<double> block_sums;  // the kept mass per reduce::kBlock tokens
  std::vector<Cand> band;  // the boundary fine bucket
  Buf<int32_t> count;      // counted_band's bucket counts
  Buf<int32_t> band_idx;   // the band's token ids, logits, weights and fine buckets
  Buf<float> band_x, band_e;
  Buf<int32_t> band_q;
  Buf<float> sample_e;  // sampled_band's weights, buckets, bucket masses and counts
  Buf<int32_t> sample_q;
  Buf<double> sample_hist;
  Buf<int32_t> sample_count;
};
FlatNucleus& flat_nucleus();

// The cut (see nucleus_online.cpp); false when the row is left to the general path.
// sample: try the band of a sample first (rows whose capture overflowed: a large nucleus).
bool flat_cut(const float* row, int64_t V, float m, const ExpScale& ec, double p, double W, FlatNucleus& fl,
              bool sample);
// The inverse-CDF draw from the kept tokens (min-p: also w >= min_w); *W_out = their mass.
int64_t draw_flat(const float* x, int64_t V, const FlatNucleus& fl, float min_w, double u, Buf<double>& sums,
                  int64_t fallback, double* W_out);
// The kept tokens as candidates in index order (for logprobs and processed_probs).
void flat_cands(const float* x, int64_t V, const FlatNucleus& fl, float min_w, std::vector<Cand>& out);

}  // namespace detail
}  // namespace DK_ISA
}  // namespace cpu
}  // namespace decodekit
