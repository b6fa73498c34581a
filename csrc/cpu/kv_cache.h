// CPU kernels of the KV-cache family: writing the keys and values of new
// tokens into a contiguous or a paged cache. Framework-free (raw pointers,
// sizes, strides). The kernels copy raw element bytes (float32, float16 and
// bfloat16 alike), never raise on data, and never write out of bounds: a
// position past the cache, or a slot outside the pool, is skipped.
#pragma once

#include <cstdint>

namespace decodekit {
namespace cpu {

// Order of the dimensions of one cache tensor.
//   kNHD: contiguous [B, S_max, H, D]; paged [num_blocks, block_size, H, D]
//   kHND: contiguous [B, H, S_max, D]; paged [num_blocks, H, block_size, D]
enum class KVLayout { kNHD, kHND };

// New keys and values: rows of head_dim elements whose last dimension is
// contiguous. Strides are in elements. For the contiguous append the rows are
// indexed [b, t, h] (stride_b, stride_t, stride_h); for the paged append [n, h]
// (stride_t is the token stride, stride_b is unused).
struct KVRows {
  const void* key = nullptr;
  const void* value = nullptr;
  int64_t key_stride_b = 0, key_stride_t = 0, key_stride_h = 0;
  int64_t value_stride_b = 0, value_stride_t = 0, value_stride_h = 0;
};

// The two cache tensors (contiguous, same shape and dtype) of one layer.
struct KVCacheTensors {
  void* k = nullptr;
  void* v = nullptr;
  int64_t elem_size = 0;  // bytes per element: 4 (float32) or 2 (float16, bfloat16)
  int64_t num_heads = 0;  // H
  int64_t head_dim = 0;   // D
  KVLayout layout = KVLayout::kNHD;
};

// Contiguous cache of `batch` rows and `max_seq_len` positions per row. For
// every row b and t in [0, tokens), key/value [b, t] go to position
// seq_lens[b] + t. A row whose seq_lens is negative, and every position at or
// past max_seq_len, is skipped (the rest of the row is still written).
using AppendKVCacheKernel = void(const KVCacheTensors& cache, int64_t batch, int64_t max_seq_len, const KVRows& rows,
                                 int64_t tokens, const int64_t* seq_lens, int num_threads);

// Paged cache of `num_blocks` blocks of `block_size` positions. Row i of
// key/value (i < num_slots) goes to slot slot_mapping[i] = block * block_size
// + offset. Negative slots (padding) and slots >= num_blocks * block_size are
// skipped. Rows at or past num_slots are never read.
using AppendPagedKVCacheKernel = void(const KVCacheTensors& cache, int64_t num_blocks, int64_t block_size,
                                      const KVRows& rows, const int64_t* slot_mapping, int64_t num_slots,
                                      int num_threads);

// Compaction after tree verification (token trees of speculative decoding): the
// accepted path's entries move to consecutive positions. Row b's tree starts at
// position start[b] (the length cached before the tree); accepted_nodes[b]
// (int64 [batch, max_accepted], row-major) lists the accepted nodes' flat
// indices relative to start[b], in path order. For k = 0, 1, ... the entry at
// position start[b] + accepted_nodes[b, k] (every head, key and value) is
// copied to position start[b] + k. The path ends at the first index that is
// negative (-1 padding) or not greater than the one before.
//
// In place in ascending k: the indices strictly increase from >= 0, so
// accepted_nodes[b, k] >= k; the write of step k lands at start + k, below
// every source still to be read (start + accepted_nodes[b, k'] >= start + k' >
// start + k for k' > k), so no source is overwritten before it is read. An
// entry already in place (index == k) is not copied.
//
// Rows with start[b] < 0 are skipped; the path stops at the first position
// past the cache (contiguous: max_seq_len; paged: max_blocks * block_size), and
// in the paged cache a position whose block id is outside [0, num_blocks) is
// neither read nor written. The rows' written blocks must be distinct (the
// wrappers check it); each (row, head) is copied by one thread.
using CompactKVCacheKernel = void(const KVCacheTensors& cache, int64_t batch, int64_t max_seq_len, const int64_t* start,
                                  const int64_t* accepted_nodes, int64_t max_accepted, int num_threads);

// The paged cache of AppendPagedKVCacheKernel, positions read through
// block_tables (int64 [batch, max_blocks], row-major).
using CompactPagedKVCacheKernel = void(const KVCacheTensors& cache, int64_t num_blocks, int64_t block_size,
                                       const int64_t* block_tables, int64_t max_blocks, int64_t batch,
                                       const int64_t* start, const int64_t* accepted_nodes, int64_t max_accepted,
                                       int num_threads);

}  // namespace cpu
}  // namespace decodekit
