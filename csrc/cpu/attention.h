// CPU kernels of the attention family: decode attention over a paged KV cache.
// Framework-free: raw pointers, sizes and strides in, results out.
#pragma once

#include <cstdint>

#include "cpu/sampling/sampling.h"  // ScalarKind

namespace decodekit {
namespace cpu {

struct PagedKV {
  const void* k;  // [num_blocks, block_size, H_kv, D] (NHD) or [num_blocks, H_kv, block_size, D] (HND)
  const void* v;
  ScalarKind kind;  // float32, float16 or bfloat16 (raw element bits)
  int64_t num_blocks;
  int64_t block_size;
  int64_t num_kv_heads;
  int64_t head_dim;
  bool hnd;
};

// out[b, i, h, :] = softmax_j(scale * q[b, i, h] . k_j) v_j over the positions
// j = 0 .. seq_lens[b] - Q + i of sequence b (causal within its Q new tokens),
// read through block_tables[b] (int64 [B, max_blocks]); query head h reads KV
// head h / (H_q / H_kv). float32 accumulation, online softmax over tiles of
// 16 positions aligned at position 0, so a query row's result depends only on
// its own query and the cache contents, never on B or Q. Positions whose block
// id is out of range contribute nothing (never read); a query with no position
// gets zeros.
//
// tree_mask (null: the causal rule above) is bool [B, Q, Q] as bytes (0 / 1):
// query i of sequence b then reads the prefix 0 .. n_b - Q - 1 and the new
// token at position n_b - Q + j only where tree_mask[b, i, j] (token trees:
// ancestors come before descendants, so only j <= i is ever read; entries
// with j > i are ignored). A masked-out position is never scored nor added:
// the row's operations are those of the causal kernel with that position
// absent, so a mask that allows every j <= i gives the causal bits.
using PagedAttentionKernel = void(const float* q, int64_t B, int64_t Q, int64_t Hq, const PagedKV& kv,
                                  const int64_t* block_tables, int64_t max_blocks, const int64_t* seq_lens,
                                  const uint8_t* tree_mask, float scale, int num_threads, float* out);

}  // namespace cpu
}  // namespace decodekit
