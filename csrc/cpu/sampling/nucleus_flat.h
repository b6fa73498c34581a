// Top-p alone on flat rows (nucleus_online.cpp): the exact nucleus of a row
// whose nucleus holds thousands of tokens, cut by bucket masses over every
// token's weight and held as a rank threshold instead of a candidate list.
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
  Buf<float> w;               // every token's weight exp((x - max) / T)
  Buf<float> eref;            // per chunk: the maximum nucleus_online's weights in w are relative to (NaN: none)
  Buf<double> hist;           // bucket masses; the sample's tail sums; the band's fine histograms
  Buf<double> block_sums;     // the kept mass per reduce::kBlock tokens
  std::vector<Cand> band;     // the boundary bucket
  Buf<int32_t> count;         // the coarse buckets' counts, of a sample or of every token (banded_cut)
  Buf<int32_t> band_idx;      // the band's token ids
  Buf<int32_t> band_q;        // and their fine buckets
  Buf<float> band_x, band_e;  // the band's logits and weights
};
FlatNucleus& flat_nucleus();

// The cut (see nucleus_online.cpp); false when the row is left to the general path
// (banded_only: also when banded_cut declines).
bool flat_cut(const float* row, int64_t V, float m, const ExpScale& ec, double p, double W, FlatNucleus& fl,
              bool banded_only = false);
// The inverse-CDF draw from the kept tokens (min-p: also w >= min_w); *W_out = their mass.
int64_t draw_flat(const float* x, int64_t V, const FlatNucleus& fl, float min_w, double u, Buf<double>& sums,
                  int64_t fallback, double* W_out);
// The kept tokens as candidates in index order (for logprobs and processed_probs).
void flat_cands(const float* x, int64_t V, const FlatNucleus& fl, float min_w, std::vector<Cand>& out);

}  // namespace detail
}  // namespace DK_ISA
}  // namespace cpu
}  // namespace decodekit
