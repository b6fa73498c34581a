// CPU kernels of the layer family: the per-token operations around a decoder
// block's matrix products (RMSNorm, the SwiGLU activation, rotary embeddings).
// Each row's result depends only on that row (batch-invariant). Framework-free.
#pragma once

#include <cstdint>

namespace decodekit {
namespace cpu {

// y[r, :] = w * (x[r, :] * (1 / sqrt(mean(x[r, :]^2) + eps))) for r < N rows of H
// floats (row strides ldx, ldy). The sum of squares uses 16 float32 lanes (lane
// j takes the columns j mod 16, fused multiply-adds in ascending order, the
// tail zero-padded), combined in the fixed tree of tree_sum16.
using RmsNormKernel = void(const float* x, int64_t N, int64_t H, int64_t ldx, const float* w, float eps, float* y,
                           int64_t ldy, int num_threads);

// y[r, i] = silu(x[r, i]) * x[r, I + i] for i < I (gate then up, as a fused
// gate/up projection writes them); silu(g) = g * sigmoid(g), with the sigmoid
// from exp(-|g|) so the exponential never overflows.
using SiluAndMulKernel = void(const float* x, int64_t N, int64_t I, int64_t ldx, float* y, int64_t ldy,
                              int num_threads);

// Rotary embedding in place, "rotate half" layout: for token n (row stride
// ldx) and each of the first H heads of D floats, with c = cos_table[pos[n]],
// s = sin_table[pos[n]] (tables [P, D]): x[i] <- x[i] c[i] - x[i + D/2] s[i] and
// x[i + D/2] <- x[i + D/2] c[i + D/2] + x[i] s[i + D/2], each product rounded
// before the sum (the bits of x * cos + rotate_half(x) * sin in float32).
using RopeInplaceKernel = void(float* x, int64_t N, int64_t H, int64_t D, int64_t ldx, const float* cos_table,
                               const float* sin_table, const int64_t* positions, int num_threads);

}  // namespace cpu
}  // namespace decodekit
