// CUDA kernels of the sampling family. Framework-free: raw device pointers and
// a stream in, a cudaError_t out. Same semantics as csrc/cpu/sampling.h.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace decodekit {
namespace cuda {

// logits_kind: 0 float32, 1 float16, 2 bfloat16 (as decodekit::cpu::ScalarKind).
// temperature: B floats on the device, or nullptr to use temperature_val for every row.
cudaError_t softmax(const void* logits, int logits_kind, int64_t batch, int64_t vocab,
                    int64_t row_stride, int64_t vocab_size, const float* temperature,
                    float temperature_val, float* probs, cudaStream_t stream);

}  // namespace cuda
}  // namespace decodekit
