// CPU kernels of the linear family: y = x W^T (+ b) with a reduction order that
// depends only on K, so every output row is bit-identical whatever the number
// of rows M in the call (batch-invariant). Framework-free.
#pragma once

#include <cstdint>

namespace decodekit {
namespace cpu {

// x: [M, K] float32 (row stride ldx), w: [N, K] float32 (row stride ldw),
// bias: [N] or null, y: [M, N] float32 (row stride ldy).
// Each y[m, n] = sum over k of x[m, k] * w[n, k] accumulated with fused
// multiply-adds into 16 lanes (lane j takes k = j mod 16, in ascending k),
// the lanes combined in a fixed tree, then + bias[n]. Tiles run over M and N
// only; the work is split over threads by N tiles.
using LinearKernel = void(const float* x, int64_t M, int64_t K, int64_t ldx, const float* w, int64_t N, int64_t ldw,
                          const float* bias, float* y, int64_t ldy, int num_threads);

}  // namespace cpu
}  // namespace decodekit
