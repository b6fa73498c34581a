// CUDA kernels of the sampling family. Framework-free: the views and
// parameter structs of decodekit/types.h holding DEVICE pointers (per-row
// parameter arrays too), a stream in, a cudaError_t out. No kernel
// synchronises with the host, so every call can be captured in a CUDA graph.
//
// Semantics are those of csrc/cpu/sampling.h and DESIGN.md (tie rule, chain
// order, float64 top-p rule, Philox keying, exact greedy at T = 0, invalid
// rows). One thread block per row with a fixed block size: a row's result
// never depends on the batch (deterministic and fast mode are one path).
//
// Masses (the row total, the top-p prefix masses, the inverse-CDF running
// sum) are exact 94-bit fixed-point sums (decodekit/fixed.h) where the CPU
// sums float64 in its fixed order. The two agree except when a top-p target
// p * W or a draw target u * W lies within rounding (~1e-13 relative) of a
// prefix mass: then a token id or the top-p boundary may differ. The weights
// themselves are the CPU's bits (the same exp_scaled_nonpositive).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "decodekit/types.h"

namespace decodekit {
namespace cuda {

// The largest top_logprobs the CUDA samplers return per row.
constexpr int64_t kMaxTopLogprobs = 1024;

cudaError_t softmax(const LogitsView& logits, RowParam<float> temperature, float* probs, cudaStream_t stream);

cudaError_t argmax(const LogitsView& logits, int64_t* ids, bool* valid, cudaStream_t stream);

// scratch: B bytes of device memory, or nullptr. With it, on compute
// capability >= 9.0 and without logprob requests, rows are sampled by a
// cluster of blocks per row (sampling_cluster.cu: the same ids, each row read
// once), and the rows that path leaves go to the one-block-per-row kernel.
cudaError_t sample_from_logits(const LogitsView& logits, const SamplingParams& params, const LogprobRequest& lp,
                               int64_t* ids, bool* valid, unsigned char* scratch, cudaStream_t stream);

cudaError_t sample_from_probs(const ProbsView& probs, const FilterParams& params, RowParam<int64_t> seed,
                              RowParam<int64_t> offset, const LogprobRequest& lp, int64_t* ids, bool* valid,
                              cudaStream_t stream);

cudaError_t filter_probs(const ProbsView& probs, const FilterParams& params, float* out, bool* valid,
                         cudaStream_t stream);

// probs = the distribution sample_from_logits draws from: each kept weight over
// the kept set's total (seed and offset unused); greedy rows one-hot; invalid rows NaN.
cudaError_t processed_probs(const LogitsView& logits, const SamplingParams& params, float* probs, bool* valid,
                            cudaStream_t stream);

cudaError_t top_k_mask_logits(const LogitsView& logits, RowParam<int64_t> top_k, void* out, bool* valid,
                              cudaStream_t stream);

}  // namespace cuda
}  // namespace decodekit
