// CUDA kernel of the penalties family: the semantics of csrc/cpu/penalties.h
// (dense bias, sparse bias in list order, repetition / frequency / presence
// penalties on the counted tokens, then the mask), with device pointers in
// decodekit::PenaltyInputs-shaped arguments. Same float operations in the same
// order (built with --fmad=false), so the same bits as the CPU.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "decodekit/types.h"

namespace decodekit {
namespace cuda {

struct PenaltyArgs {
  RowParam<float> repetition, frequency, presence;
  const int64_t* token_ids = nullptr;  // [B, L], -1 padding
  int64_t token_ids_len = 0;
  const int64_t* token_counts = nullptr;  // [B, V]
  const float* bias_dense = nullptr;      // [B, V]
  const int64_t* bias_ids = nullptr;      // [B, M]
  const float* bias_values = nullptr;     // [B, M]
  int64_t bias_len = 0;
  const bool* mask = nullptr;  // [B, V]
  bool mask_allows = false;
};

cudaError_t apply_penalties(const LogitsView& logits, const PenaltyArgs& in, float* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace decodekit
