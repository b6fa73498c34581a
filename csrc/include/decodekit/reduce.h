// The fixed reduction splits of the sampling kernels, and a scalar reference
// of the block sums and the inverse-CDF draw that the CPU kernels (16-lane
// vectors, csrc/cpu/common/draw.h) reproduce bit for bit and CUDA kernels must
// reproduce too (DESIGN.md, "Deterministic and fast modes"). The splits depend
// only on the row length, never on the batch, the thread count or the device.
//
// Framework-free and header-only (DK_FN), so CUDA code can include it.
#pragma once

#include <cstdint>

#include "decodekit/philox.h"  // DK_FN

namespace decodekit {
namespace reduce {

// Lanes of every reduction: lane j takes the elements j mod 16 of a block.
constexpr int kLanes = 16;
// Tokens per chunk: pass A's chunk maxima (top-k pre-selection, argmax), the
// one-read softmax and nucleus segments.
constexpr int64_t kChunk = 256;
// Tokens per block sum of the inverse-CDF draw (a multiple of kLanes).
constexpr int64_t kBlock = 1024;

DK_FN int64_t num_blocks(int64_t n) { return (n + kBlock - 1) / kBlock; }
DK_FN int64_t num_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

// Sum of 16 float64 lanes in a fixed tree: lane j += lane j + 8, then + 4, + 2, + 1.
DK_FN double tree_sum16(double* s) {
  for (int w = 8; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) s[j] += s[j + w];
  return s[0];
}

// The float64 sum of the weights w(i), i in [begin, end) (end - begin <= kBlock),
// as every kernel computes it: the block is read as vectors of 16 (the last one
// zero-padded); in each full pair of vectors (2p, 2p + 1) vector 2p adds its
// lanes, converted to float64, into the even accumulator and 2p + 1 into the odd
// one (two chains, half the dependency); a vector after the last full pair (a
// block whose length is not a multiple of 32) goes to the even one; the two are
// added lane by lane, then summed by tree_sum16. Weights are >= 0 (a token
// outside the kept set weighs 0).
template <class W>
DK_FN double block_sum(const W& w, int64_t begin, int64_t end) {
  double even[kLanes] = {}, odd[kLanes] = {};
  const int64_t pairs = (end - begin) / (2 * kLanes);
  for (int64_t v = 0; begin + v * kLanes < end; ++v) {
    double* acc = (v & 1) && v < 2 * pairs ? odd : even;
    for (int j = 0; j < kLanes; ++j) {
      const int64_t i = begin + v * kLanes + j;
      acc[j] += i < end ? static_cast<double>(w(i)) : 0.0;
    }
  }
  for (int j = 0; j < kLanes; ++j) even[j] += odd[j];
  return tree_sum16(even);
}

// Inverse CDF in ascending index order with one float64 uniform u in [0, 1):
// the blocks' sums (block_sum) are added in order to the total W; the draw
// walks the block sums while the running sum stays <= u W, then the weights of
// the chosen block (and, if rounding left it short, of the later ones) one by
// one in float64, and returns the first index where the running sum exceeds
// u W. A zero weight is never returned: if the scan ends first, the last
// positive weight seen is, else `fallback`. *total_out = W (may be 0; then
// `fallback` is returned).
template <class W>
DK_FN int64_t draw(const W& w, int64_t n, double u, int64_t fallback, double* total_out) {
  const int64_t nb = num_blocks(n);
  double total = 0.0;
  for (int64_t b = 0; b < nb; ++b) total += block_sum(w, b * kBlock, b * kBlock + kBlock < n ? b * kBlock + kBlock : n);
  *total_out = total;
  if (!(total > 0.0)) return fallback;
  const double target = u * total;
  double cum = 0.0;
  int64_t b = 0;
  for (; b < nb; ++b) {
    const double s = block_sum(w, b * kBlock, b * kBlock + kBlock < n ? b * kBlock + kBlock : n);
    if (cum + s > target) break;
    cum += s;
  }
  int64_t last = fallback;
  for (int64_t i = (b < nb ? b : nb - 1) * kBlock; i < n; ++i) {
    const double e = static_cast<double>(w(i));
    if (!(e > 0.0)) continue;
    last = i;
    cum += e;
    if (cum > target) return i;
  }
  return last;
}

}  // namespace reduce
}  // namespace decodekit
