// The cluster fast path of sample_from_logits (sampling_cluster.cu), used by
// sampling.cu: internal to the CUDA kernels of the sampling family.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "decodekit/types.h"

namespace decodekit {
namespace cuda {

// Shared memory a block may take for its slice of the row (float32).
constexpr size_t kMaxClusterSliceBytes = 160 * 1024;

// True when the cluster path can run these rows (no logprobs, B <= 65535, a
// slice that fits, a device of compute capability >= 9.0).
bool cluster_path_applies(const LogitsView& logits, const LogprobRequest& lp);

// Samples the rows it can; fallback[b] = 1 marks the rows left to the
// one-block-per-row kernel (which must run next on the same stream).
cudaError_t sample_from_logits_cluster(const LogitsView& logits, const SamplingParams& params, int64_t* ids,
                                       bool* valid, unsigned char* fallback, cudaStream_t stream);

}  // namespace cuda
}  // namespace decodekit
