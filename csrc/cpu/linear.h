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

// GGML block formats of a quantized weight (as stored in a GGUF file): each row
// of K weights is K / 32 consecutive blocks of 32 weights.
//   Q4_1 (20 bytes): binary16 d, binary16 m, 16 bytes qs; weight j of the block
//     is d * (qs[j] & 15) + m and weight j + 16 is d * (qs[j] >> 4) + m (j < 16).
//   Q8_0 (34 bytes): binary16 d, 32 int8 qs; weight j is d * qs[j].
// d * q is exact in float32 (11 + 8 significant bits at most), so the float32
// value of a weight is fma(d, q, m) (one rounding) for Q4_1 and exact for Q8_0:
// the same bits as any correct dequantization to float32.
enum class BlockType : int32_t { kQ4_1 = 0, kQ8_0 = 1 };

// Streamed weights (weight_stream.cpp). While on, the quantized products of a few rows (decoding,
// verification) prefetch their weights with the non-temporal hint: a model whose weights do not
// fit in the last-level cache then stops evicting everything else there (the KV cache, the
// interpreter's objects) at every step. A hint only: the results are the same bits either way.
// One process-wide switch (the pool's workers read it); callers set it around a whole forward.
namespace weight_stream {
bool on();
bool set(bool enable);             // returns the previous state
int64_t last_level_cache_bytes();  // the CPU's last-level cache (sysfs / sysconf), 32 MiB if unknown
}  // namespace weight_stream
constexpr int64_t kQuantBlockSize = 32;  // weights per block
constexpr int64_t kQ4_1BlockBytes = 20;
constexpr int64_t kQ8_0BlockBytes = 34;

// y = x W^T (+ b) with W given as blocks: x [M, K] float32 (row stride ldx),
// blocks: N rows of K / 32 blocks of type `type` (N * K / 32 * block_bytes
// bytes, no alignment needed), bias [N] or null, y [M, N] (row stride ldy).
// K must be a multiple of 32. Each weight is dequantized to its float32 value
// in registers and the products are accumulated in exactly the order of
// LinearKernel, so y is bit-identical to LinearKernel on the dequantized
// weights (and batch-invariant). For M > 4 each tile of weight rows is
// dequantized once into a per-thread buffer and reused by every row of x.
using LinearQuantizedKernel = void(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* blocks,
                                   BlockType type, int64_t N, const float* bias, float* y, int64_t ldy,
                                   int num_threads);

// out[r, :] = the K float32 values of weight row rows[r] (r < R) of an [N, K]
// weight given as blocks (an embedding lookup): each value as LinearQuantizedKernel
// sees it (the one rounding of fma(d, q, m) for Q4_1, d * q exactly for Q8_0). A
// row id outside [0, N) gives zeros (never read). out is [R, K], contiguous.
using DequantizeRowsKernel = void(const uint8_t* blocks, BlockType type, int64_t N, int64_t K, const int64_t* rows,
                                  int64_t R, float* out, int num_threads);

}  // namespace cpu
}  // namespace decodekit
