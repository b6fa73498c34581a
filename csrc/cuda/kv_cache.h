// CUDA kernels of the KV-cache family: append_kv_cache and append_paged_kv_cache
// with the semantics of csrc/cpu/kv_cache.h (the same framework-free structs,
// holding DEVICE pointers). Raw element bytes are copied (float32, float16 and
// bfloat16 alike); positions past the cache, negative slots and slots outside
// the pool are skipped, never written. On the given stream, no host
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

}  // namespace cuda
}  // namespace decodekit
