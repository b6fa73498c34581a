// CUDA kernels of the KV-cache family: append_kv_cache, append_paged_kv_cache
// and the compactions after tree verification, with the semantics of csrc/cpu/kv_cache.h (the same framework-free
// structs, holding DEVICE pointers). Raw element bytes are copied (float32, float16 and bfloat16 alike); positions past
// the cache, negative slots and slots outside the pool are skipped, never written. On the given stream, no host
// synchronisation (capturable in a CUDA graph).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "cpu/kv_cache.h"

namespace decodekit {
namespace cuda {

// Contiguous cache: key/value [b, t] go to position seq_lens[b] + t (seq_lens on the device).
cudaError_t append_kv_cache(const cpu::KVCacheTensors& cache, int64_t batch, int64_t max_seq_len,
                            const cpu::KVRows& rows, int64_t tokens, const int64_t* seq_lens, cudaStream_t stream);

// Paged cache: row i < num_slots of key/value goes to slot slot_mapping[i] (on the device).
cudaError_t append_paged_kv_cache(const cpu::KVCacheTensors& cache, int64_t num_blocks, int64_t block_size,
                                  const cpu::KVRows& rows, const int64_t* slot_mapping, int64_t num_slots,
                                  cudaStream_t stream);

// Compaction after tree verification (cpu/kv_cache.h's CompactKVCacheKernel and
// CompactPagedKVCacheKernel): row b's accepted path (accepted_nodes [batch,
// max_accepted], relative to start[b], on the device) moves to consecutive
// positions in place. One block per (row, head), the path's steps in order.
cudaError_t compact_kv_cache(const cpu::KVCacheTensors& cache, int64_t batch, int64_t max_seq_len, const int64_t* start,
                             const int64_t* accepted_nodes, int64_t max_accepted, cudaStream_t stream);

cudaError_t compact_paged_kv_cache(const cpu::KVCacheTensors& cache, int64_t num_blocks, int64_t block_size,
                                   const int64_t* block_tables, int64_t max_blocks, int64_t batch, const int64_t* start,
                                   const int64_t* accepted_nodes, int64_t max_accepted, cudaStream_t stream);

}  // namespace cuda
}  // namespace decodekit
