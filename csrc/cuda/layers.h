// CUDA kernels of the layer family: rms_norm, silu_and_mul, the RoPE op and
// linear, with the semantics AND the float32 operation order of the CPU kernels
// (csrc/cpu/layers.h, csrc/cpu/linear.h): the same 16-lane fused multiply-add
// chains (lane j takes the elements j mod 16, in ascending order, the tail
// zero-padded), the same fixed tree for the 16 lanes, the same exponential
// (decodekit/math.h). Built with --fmad=false and IEEE division and square
// root, so every result is the CPU's bits and a row's result never depends on
// the number of rows. float32, DEVICE pointers, the given stream, no host
// synchronisation (capturable in a CUDA graph).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace decodekit {
namespace cuda {

// y[r, :] = w * (x[r, :] * (1 / sqrt(mean(x[r, :]^2) + eps))), r < N rows of H floats.
cudaError_t rms_norm(const float* x, int64_t N, int64_t H, int64_t ldx, const float* w, float eps, float* y,
                     int64_t ldy, cudaStream_t stream);

// y[r, i] = silu(x[r, i]) * x[r, I + i], i < I.
cudaError_t silu_and_mul(const float* x, int64_t N, int64_t I, int64_t ldx, float* y, int64_t ldy, cudaStream_t stream);

// Rotary embedding in place ("rotate half"), tables [P, D]; a token whose
// position lies outside [0, P) is left unchanged (the host cannot check device
// positions without a synchronisation; the Python wrapper validates them).
cudaError_t rope_inplace(float* x, int64_t N, int64_t H, int64_t D, int64_t ldx, const float* cos_table,
                         const float* sin_table, int64_t P, const int64_t* positions, cudaStream_t stream);

// y = x W^T (+ bias): x [M, K] (row stride ldx), w [N, K] (ldw), bias [N] or
// null, y [M, N] (ldy). One half-warp per output element's reduction, tiles
// of up to 8 rows of x and 16 columns of W per block; the reduction order
// depends only on K (batch-invariant, and the CPU's bits).
cudaError_t linear(const float* x, int64_t M, int64_t K, int64_t ldx, const float* w, int64_t N, int64_t ldw,
                   const float* bias, float* y, int64_t ldy, cudaStream_t stream);

}  // namespace cuda
}  // namespace decodekit
