// Batch-invariant linear layer (see linear.h). Compiled once per instruction
// set; every build gives the same bits (same lane-wise FMAs, same tree).
//
// The stock CPU GEMM changes its blocking of the inner dimension with M, so a
// row's result depends on how many rows share the call; here the reduction of
// each output element is the same sequence of operations for every M. Tiling:
// 4 weight rows x 4 input rows at a time (16 accumulators of 16 lanes), so
// each weight vector loaded from memory is used by 4 input rows, and each
// input vector by 4 weight rows.
#include "linear.h"
#include "cpu/common/isa.h"
#include "cpu/common/parallel.h"

#include <algorithm>
#include <cstring>

#include "cpu/common/vec.h"

namespace decodekit {
namespace cpu {
namespace DK_ISA {
namespace {

constexpr int kL = kVecLanes;
constexpr int kTileN = 4;
constexpr int kTileM = 4;
constexpr int64_t kPrefetch = 256;  // floats ahead (1 KiB)

// The tail of K (K mod 16 elements) is zero-padded into full vectors, so the
// operation sequence is the same for every row.
DK_VINLINE VF load_k_tail(const float* p, int64_t n) {
  float t[kL] = {0};
  std::memcpy(t, p, static_cast<size_t>(n) * sizeof(float));
  return load_f32(t);
}

template <int TM, int TN>
void tile(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t K, const float* bias, float* y,
          int64_t ldy) {
  VF acc[TM][TN];
  for (int i = 0; i < TM; ++i)
    for (int j = 0; j < TN; ++j) acc[i][j] = splat(0.0f);
  const int64_t K16 = K - K % kL;
  for (int64_t k = 0; k < K16; k += kL) {
    VF wv[TN];
    // Software prefetch a few cache lines ahead in each weight row: with several input rows
    // per tile the loop does more arithmetic per byte and the hardware prefetcher falls behind.
    if (TM > 1)
      for (int j = 0; j < TN; ++j) __builtin_prefetch(w + j * ldw + k + kPrefetch, 0, 0);
    for (int j = 0; j < TN; ++j) wv[j] = load_f32(w + j * ldw + k);
    for (int i = 0; i < TM; ++i) {
      const VF xv = load_f32(x + i * ldx + k);
      for (int j = 0; j < TN; ++j) acc[i][j] = fma16(xv, wv[j], acc[i][j]);
    }
  }
  if (K16 < K) {
    VF wv[TN];
    for (int j = 0; j < TN; ++j) wv[j] = load_k_tail(w + j * ldw + K16, K - K16);
    for (int i = 0; i < TM; ++i) {
      const VF xv = load_k_tail(x + i * ldx + K16, K - K16);
      for (int j = 0; j < TN; ++j) acc[i][j] = fma16(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < TM; ++i)
    for (int j = 0; j < TN; ++j) y[i * ldy + j] = tree_sum16(acc[i][j]) + (bias ? bias[j] : 0.0f);
}

// Rows [0, M) against weight rows [n0, n0 + tn), tn <= kTileN.
template <int TN>
void column_block(const float* x, int64_t M, int64_t K, int64_t ldx, const float* w, int64_t ldw, const float* bias,
                  float* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + kTileM <= M; m += kTileM) tile<kTileM, TN>(x + m * ldx, ldx, w, ldw, K, bias, y + m * ldy, ldy);
  // The last 1-3 rows in one tile, so the weight rows are read once for them too (the
  // operations per output element are the same whatever the tile height).
  switch (M - m) {
    case 3:
      tile<3, TN>(x + m * ldx, ldx, w, ldw, K, bias, y + m * ldy, ldy);
      break;
    case 2:
      tile<2, TN>(x + m * ldx, ldx, w, ldw, K, bias, y + m * ldy, ldy);
      break;
    case 1:
      tile<1, TN>(x + m * ldx, ldx, w, ldw, K, bias, y + m * ldy, ldy);
      break;
    default:
      break;
  }
}

}  // namespace

void linear(const float* x, int64_t M, int64_t K, int64_t ldx, const float* w, int64_t N, int64_t ldw,
            const float* bias, float* y, int64_t ldy, int num_threads) {
  const int64_t tiles = (N + kTileN - 1) / kTileN;
  const int nt = threads_for(tiles, num_threads);
  parallel_rows(tiles, nt, Schedule::kStatic, [&](int64_t t) {
    const int64_t n0 = t * kTileN;
    const int64_t tn = std::min<int64_t>(kTileN, N - n0);
    const float* b = bias ? bias + n0 : nullptr;
    switch (tn) {
      case 4:
        column_block<4>(x, M, K, ldx, w + n0 * ldw, ldw, b, y + n0, ldy);
        break;
      case 3:
        column_block<3>(x, M, K, ldx, w + n0 * ldw, ldw, b, y + n0, ldy);
        break;
      case 2:
        column_block<2>(x, M, K, ldx, w + n0 * ldw, ldw, b, y + n0, ldy);
        break;
      default:
        column_block<1>(x, M, K, ldx, w + n0 * ldw, ldw, b, y + n0, ldy);
        break;
    }
  });
}

}  // namespace DK_ISA
}  // namespace cpu
}  // namespace decodekit
