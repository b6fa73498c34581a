// CPU kernels of the penalties family: repetition, frequency and presence
// penalties, logit bias and allowed/banned token masks, applied to logits
// before the sampling chain. Framework-free (raw pointers in, results out).
#pragma once

#include <cstdint>

#include "cpu/sampling/sampling.h"

namespace decodekit {
namespace cpu {

struct PenaltyInputs {
  RowParam<float> repetition;  // > 0; 1 disables. logit > 0 -> logit / r, else logit * r
  RowParam<float> frequency;   // logit -= frequency * count
  RowParam<float> presence;    // logit -= presence * (count > 0)
  // Counted tokens: either ids [B, L] (-1 = padding; out-of-range ids are
  // skipped) or dense counts [B, V] (int64). Both null: no penalties apply.
  const int64_t* token_ids = nullptr;
  int64_t token_ids_len = 0;
  const int64_t* token_counts = nullptr;
  // Additive bias: dense [B, V] float32, and/or sparse pairs [B, M] (-1 = padding).
  const float* bias_dense = nullptr;
  const int64_t* bias_ids = nullptr;
  const float* bias_values = nullptr;
  int64_t bias_len = 0;
  // Token mask [B, V]: with mask_allows, tokens where mask is false get -inf;
  // otherwise tokens where mask is true get -inf.
  const bool* mask = nullptr;
  bool mask_allows = false;
};

// out[b, :] (float32, [B, V] contiguous) = logits after, in this order: logit
// bias, repetition, frequency and presence penalties, then the token mask.
// Padding columns (>= vocab_size) are -inf.
using ApplyPenaltiesKernel = void(const LogitsView& logits, const PenaltyInputs& in, int num_threads, float* out);

}  // namespace cpu
}  // namespace decodekit
