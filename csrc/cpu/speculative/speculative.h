// CPU kernels of the speculative family: lossless rejection sampling of a chain
// of drafted tokens against the target model's probabilities. Framework-free.
#pragma once

#include <cstdint>

#include "cpu/sampling/sampling.h"  // RowParam

namespace decodekit {
namespace cpu {

// For each row b with drafts draft_ids[b, :K] (-1 padding after the last real
// one), draft_probs[b, j, :] (or null: one-hot drafts) and target_probs[b, j, :]
// for j = 0..K (float32, probabilities over [0, vocab_size); columns past
// vocab_size ignored): accept draft j while u_j q(x) < p(x) in float64 (u_j the
// float64 uniform j of stream 1); at the first rejection emit a token drawn from
// max(0, p - q) normalised by its sum (or from p when that has no mass), with
// stream 2 + j; if every real draft passes, emit a bonus token from the target's
// next distribution with stream 2 + n (n real drafts). out [B, K + 1] holds the
// emitted tokens then -1; num_accepted and num_emitted are [B].
using ChainSpeculativeSamplingKernel = void(const float* draft_probs, const int64_t* draft_ids,
                                            const float* target_probs, int64_t B, int64_t K, int64_t V,
                                            int64_t vocab_size, RowParam<int64_t> seed, RowParam<int64_t> offset,
                                            int num_threads, int64_t* out, int64_t* num_accepted, int64_t* num_emitted);

// Greedy verification: for each row b, draft j (of the leading drafts
// draft_ids[b, j] >= 0; -1 pads after the last real one) is accepted while it
// equals target_ids[b, j], the target's argmax at position j (-1 for an
// invalid target row, which no draft equals). out[b, :] (int64 [B, K + 1])
// holds the accepted drafts, then target_ids[b, a] (a = num_accepted[b]: the
// target's token at the first mismatch, or the bonus token after every real
// draft), then -1; num_emitted[b] = a + 1, or a when that token is -1.
using GreedyVerifyKernel = void(const int64_t* draft_ids, const int64_t* target_ids, int64_t B, int64_t K,
                                int num_threads, int64_t* out, int64_t* num_accepted, int64_t* num_emitted);

// Status of check_probability_rows.
enum ProbabilityRowsStatus : int { kProbabilityRowsOk = 0, kProbabilityRowsBadEntry = 1, kProbabilityRowsNoMass = 2 };

// Checks nrows probability rows of V floats in one parallel pass: returns 1 when
// an entry is negative, NaN or infinite (any column), else 2 when need_mass and a
// row has no positive entry in [0, vocab_size), else 0.
using CheckProbabilityRowsKernel = int(const float* rows, int64_t nrows, int64_t V, int64_t vocab_size, bool need_mass,
                                       int num_threads);

}  // namespace cpu
}  // namespace decodekit
