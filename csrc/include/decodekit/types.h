// Framework-free views and parameter structs shared by the CPU and CUDA
// kernels (DESIGN.md, "Layout"). Raw pointers, sizes and strides only: the
// torch binding layer (csrc/torch/) fills them from tensors.
// A pointer is host memory for a CPU kernel and device memory for a CUDA one.
#pragma once

#include <cstdint>

#include "decodekit/philox.h"  // DK_HOST_DEVICE

namespace decodekit {

enum class ScalarKind : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// A per-row parameter: a pointer to B values, or one value for every row.
template <typename T>
struct RowParam {
  const T* values = nullptr;  // B values, or nullptr
  T scalar{};
  DK_HOST_DEVICE T at(int64_t row) const { return values ? values[row] : scalar; }
};

struct SamplingParams {
  RowParam<float> temperature;  // >= 0; 0 means greedy
  RowParam<int64_t> top_k;      // <= 0 or >= vocab: disabled
  RowParam<double> top_p;       // in [0, 1]; 1 disables
  RowParam<float> min_p;        // in [0, 1]; 0 disables
  RowParam<int64_t> seed;       // Philox key (as 64 bits)
  RowParam<int64_t> offset;     // Philox counter words 0-1 (as 64 bits)
};

// Optional logprob outputs of the samplers (all null / 0 when not requested).
struct LogprobRequest {
  float* logprobs = nullptr;      // [B]: the drawn token's logprob
  int64_t n_top = 0;              // n best per row
  int64_t* top_ids = nullptr;     // [B, n_top]
  float* top_logprobs = nullptr;  // [B, n_top]
  bool raw = false;               // log_softmax of the raw input instead of the processed distribution
  DK_HOST_DEVICE bool active() const { return logprobs != nullptr || n_top > 0; }
};

struct FilterParams {
  RowParam<int64_t> top_k;  // <= 0 or >= vocab: disabled
  RowParam<double> top_p;   // in [0, 1]; 1 disables
  RowParam<float> min_p;    // in [0, 1]; 0 disables
};

// Probability rows: float32, row stride in elements, padding at >= vocab_size.
struct ProbsView {
  const float* data;
  int64_t batch;
  int64_t vocab;
  int64_t row_stride;
  int64_t vocab_size;
};

struct LogitsView {
  const void* data;
  ScalarKind kind;
  int64_t batch;       // B
  int64_t vocab;       // V (row length)
  int64_t row_stride;  // elements between rows
  int64_t vocab_size;  // columns >= vocab_size are padding (vocab_size <= vocab)
};

}  // namespace decodekit
