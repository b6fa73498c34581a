// CUDA kernel of the penalties family (see penalties.h). One thread block per
// row. Counted token ids are sorted in shared memory (the sampling family's
// bitonic sort) so each distinct id is penalised once with its count; lists
// longer than the shared buffer count occurrences by a direct scan.
#include "cuda/penalties.h"

#include <cstdint>

#include "cuda/sampling_row.cuh"
#include "decodekit/math.h"

namespace decodekit {
namespace cuda {
namespace {

using namespace row;

__device__ __forceinline__ float penalize(float x, float r, float f, float p, int64_t count) {
  if (r != 1.0f) x = x > 0.0f ? x / r : x * r;
  x -= f * static_cast<float>(count);
  x -= p;
  return x;
}

template <int K>
__global__ void __launch_bounds__(kThreads)
    penalties_kernel(const void* data, int64_t vocab, int64_t row_stride, int64_t V, PenaltyArgs in, float* out) {
  __shared__ Shared sh;
  const int64_t b = blockIdx.x;
  constexpr int64_t kElem = K == kF32 ? 4 : 2;
  const void* row = static_cast<const char*>(data) + b * row_stride * kElem;
  float* o = out + b * vocab;
  const float* bias = in.bias_dense ? in.bias_dense + b * vocab : nullptr;
  for (int64_t i = threadIdx.x; i < vocab; i += kThreads)
    o[i] = i < V ? (bias ? load_x<K>(row, i) + bias[i] : load_x<K>(row, i)) : -kInf;
  __syncthreads();
  if (in.bias_ids && threadIdx.x == 0) {  // in list order, as the CPU adds them
    for (int64_t j = 0; j < in.bias_len; ++j) {
      const int64_t id = in.bias_ids[b * in.bias_len + j];
      if (id >= 0 && id < V) o[id] += in.bias_values[b * in.bias_len + j];
    }
  }
  __syncthreads();
  const float r = in.repetition.at(b), f = in.frequency.at(b), p = in.presence.at(b);
  const bool any_penalty = r != 1.0f || f != 0.0f || p != 0.0f;
  if (any_penalty && in.token_counts) {
    const int64_t* counts = in.token_counts + b * vocab;
    for (int64_t i = threadIdx.x; i < V; i += kThreads)
      if (counts[i] > 0) o[i] = penalize(o[i], r, f, p, counts[i]);
  } else if (any_penalty && in.token_ids) {
    const int64_t L = in.token_ids_len;
    const int64_t* ids = in.token_ids + b * L;
    if (L <= kCap) {
      for (int64_t j = threadIdx.x; j < L; j += kThreads) {
        const int64_t id = ids[j];
        sh.cand[j] = (id >= 0 && id < V) ? static_cast<uint64_t>(id) + 1 : 0;  // 0: skipped
      }
      __syncthreads();
      sort_desc(static_cast<int>(L), sh);
      for (int64_t j = threadIdx.x; j < L; j += kThreads) {
        const uint64_t w = sh.cand[j];
        if (w == 0 || (j > 0 && sh.cand[j - 1] == w)) continue;  // not the start of a run
        int64_t e = j + 1;
        while (e < L && sh.cand[e] == w) ++e;
        const int64_t id = static_cast<int64_t>(w) - 1;
        o[id] = penalize(o[id], r, f, p, e - j);
      }
    } else {
      for (int64_t j = threadIdx.x; j < L; j += kThreads) {
        const int64_t id = ids[j];
        if (id < 0 || id >= V) continue;
        bool first = true;
        for (int64_t q = 0; q < j && first; ++q) first = ids[q] != id;
        if (!first) continue;
        int64_t count = 1;
        for (int64_t q = j + 1; q < L; ++q) count += ids[q] == id;
        o[id] = penalize(o[id], r, f, p, count);
      }
    }
  }
  __syncthreads();
  if (in.mask) {
    const bool* m = in.mask + b * vocab;
    for (int64_t i = threadIdx.x; i < V; i += kThreads)
      if (m[i] != in.mask_allows) o[i] = -kInf;
  }
}

}  // namespace

cudaError_t apply_penalties(const LogitsView& logits, const PenaltyArgs& in, float* out, cudaStream_t stream) {
  if (logits.batch == 0) return cudaSuccess;
  if (logits.batch > 2147483647) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(logits.batch));
  switch (logits.kind) {
    case ScalarKind::kFloat32:
      penalties_kernel<kF32>
          <<<grid, kThreads, 0, stream>>>(logits.data, logits.vocab, logits.row_stride, logits.vocab_size, in, out);
      break;
    case ScalarKind::kFloat16:
      penalties_kernel<kF16>
          <<<grid, kThreads, 0, stream>>>(logits.data, logits.vocab, logits.row_stride, logits.vocab_size, in, out);
      break;
    case ScalarKind::kBFloat16:
      penalties_kernel<kBF16>
          <<<grid, kThreads, 0, stream>>>(logits.data, logits.vocab, logits.row_stride, logits.vocab_size, in, out);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace decodekit
