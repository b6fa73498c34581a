// CUDA kernel of the attention family: paged decode attention with the
// semantics AND the float32 operation order of csrc/cpu/attention.h (tiles of
// 16 positions aligned at position 0; 16-lane FMA dot products over the head
// dimension zero-padded to a multiple of 16, combined in the fixed tree; the
// same online-softmax update and exponential; the weighted value rows added
// in position order). Every query row is computed whole by one warp, so its
// result is the CPU's bits and never depends on B, Q or the launch. DEVICE
// pointers, the given stream, no host synchronisation (capturable in a CUDA
// graph).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "decodekit/types.h"  // ScalarKind

namespace decodekit {
namespace cuda {

// The largest head_dim the kernel takes.
constexpr int64_t kMaxAttentionHeadDim = 256;

struct PagedKVView {
  const void* k;  // [num_blocks, block_size, H_kv, D] (NHD) or [num_blocks, H_kv, block_size, D] (HND)
  const void* v;
  ScalarKind kind;  // float32, float16 or bfloat16
  int64_t num_blocks, block_size, num_kv_heads, head_dim;
  bool hnd;
};

// out[b, i, h, :] = softmax_j(scale * q[b, i, h] . k_j) v_j over the positions
// j = 0 .. n_b - Q + i with n_b = clamp(seq_lens[b], 0, max_blocks * block_size),
// read through block_tables[b] (int64 [B, max_blocks]); query head h reads KV
// head h / (H_q / H_kv). Positions whose block id is outside [0, num_blocks)
// contribute nothing; a row with no position gets zeros; a NaN score makes the
// row NaN. q and out are float32 [B, Q, H_q, D], contiguous. tree_mask (null:
// the causal rule) is bool [B, Q, Q] as 0 / 1 bytes on the device, with the
// CPU's meaning (cpu/attention.h): query i reads new token j <= i only where
// tree_mask[b, i, j]; a masked-out position is neither scored nor added.
cudaError_t paged_attention(const float* q, int64_t B, int64_t Q, int64_t Hq, const PagedKVView& kv,
                            const int64_t* block_tables, int64_t max_blocks, const int64_t* seq_lens,
                            const uint8_t* tree_mask, float scale, float* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace decodekit
