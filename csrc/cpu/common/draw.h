// The inverse-CDF draw of the CPU kernels (sampling, chain verification): the
// 16-lane form of decodekit/reduce.h, whose scalar reference it reproduces bit
// for bit in deterministic mode.
//
// A weight source S gives the weights of a row, all >= 0 (a token outside the
// kept set weighs 0):
//   VF full(c)          the 16 weights from c (c + 16 <= the row's length)
//   VF tail(c, end)     the weights from c, 0 at and past end
//   float at(i)         the weight of i, the same bits as its lane
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/common/isa.h"
#include "cpu/common/vec.h"
#include "decodekit/reduce.h"

namespace decodekit {
namespace cpu {
namespace DK_ISA {

// Block sums of the weights of [0, n) into sums[0, num_blocks(n)), in 16 float64
// lanes per block of kBlock tokens, even and odd vectors in two accumulators
// merged lane by lane (reduce::block_sum). Returns the total (blocks added in
// order).
// Fast mode (deterministic=False) first adds runs of 16 values per lane in
// float32, then in float64: the block sums then differ from the float64 ones
// by up to 16 u relative (~1e-6) and the draw is still exact in distribution
// up to that rounding, at less cost.
template <class S>
double block_sums(const S& src, int64_t n, double* sums, bool fast = false) {
  constexpr int64_t L = reduce::kLanes;
  double total = 0.0;
  for (int64_t b0 = 0, blk = 0; b0 < n; b0 += reduce::kBlock, ++blk) {
    const int64_t end = std::min(n, b0 + reduce::kBlock);
    Acc16d acc;
    int64_t c = b0;
    if (fast) {
      for (; c + 16 * L <= end; c += 16 * L) {
        VF run = splat(0.0f);
        for (int64_t k = 0; k < 16 * L; k += L) run = run + src.full(c + k);
        acc.add(run);
      }
    }
    // Two float64 accumulators (even / odd vectors of the block), merged in a
    // fixed order: half the dependency chain, the same split for every row.
    Acc16d acc_odd;
    for (; c + 2 * L <= end; c += 2 * L) {
      acc.add(src.full(c));
      acc_odd.add(src.full(c + L));
    }
    for (; c < end; c += L) acc.add(c + L <= end ? src.full(c) : src.tail(c, end));
    acc.merge(acc_odd);
    sums[blk] = acc.sum();
    total += sums[blk];
  }
  return total;
}

// Inverse CDF over block sums: the first index (ascending) whose running
// float64 sum exceeds target, walking the block sums, then the weights of the
// chosen block one by one. Zero weights are never returned; -1 when the scan
// meets no positive weight (the caller's fallback).
template <class S>
int64_t draw_from_blocks(const S& src, int64_t n, const double* sums, double target) {
  const int64_t nblocks = reduce::num_blocks(n);
  double cum = 0.0;
  int64_t blk = 0;
  for (; blk < nblocks; ++blk) {
    if (cum + sums[blk] > target) break;
    cum += sums[blk];
  }
  int64_t last_positive = -1;
  for (int64_t i = std::min(blk, nblocks - 1) * reduce::kBlock; i < n; ++i) {
    const float e = src.at(i);
    if (!(e > 0.0f)) continue;
    last_positive = i;
    cum += static_cast<double>(e);
    if (cum > target) return i;
  }
  return last_positive;
}

}  // namespace DK_ISA
}  // namespace cpu
}  // namespace decodekit
