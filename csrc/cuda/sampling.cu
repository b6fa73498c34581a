// CUDA kernels of the sampling family (see sampling.h and DESIGN.md).
//
// One thread block per row with a fixed block size and a fixed shared-memory
// reduction tree, so each row's result depends only on the row (never on the
// batch or the row's position). Built with --fmad=false like the CPU code.
#include "cuda/sampling.h"

#include <cmath>
#include <cstdint>

#include "decodekit/math.h"

namespace decodekit {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <int Kind>
__device__ __forceinline__ float load_logit(const void* base, int64_t i) {
  if constexpr (Kind == 0) {
    return static_cast<const float*>(base)[i];
  } else if constexpr (Kind == 1) {
    return half_bits_to_float(static_cast<const uint16_t*>(base)[i]);
  } else {
    return bf16_bits_to_float(static_cast<const uint16_t*>(base)[i]);
  }
}

template <int Kind>
__global__ void __launch_bounds__(kThreads)
    softmax_kernel(const void* logits, int64_t vocab, int64_t row_stride, int64_t vocab_size,
                   const float* temperature, float temperature_val, float* probs) {
  __shared__ float s_max[kThreads];
  __shared__ int64_t s_idx[kThreads];
  __shared__ int s_flags[kThreads];
  __shared__ double s_sum[kThreads];

  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  const float T = temperature ? temperature[row] : temperature_val;
  const char* row_base = static_cast<const char*>(logits) +
                         row * row_stride * (Kind == 0 ? sizeof(float) : sizeof(uint16_t));
  float* out = probs + row * vocab;

  // Pass 1: max, lowest argmax, NaN (bit 0) and +inf (bit 1) flags.
  float mx = -INFINITY;
  int64_t amax = INT64_MAX;
  int flags = 0;
  for (int64_t i = tid; i < vocab_size; i += kThreads) {
    const float x = load_logit<Kind>(row_base, i);
    if (x > mx) {
      mx = x;
      amax = i;
    }
    flags |= (x != x) ? 1 : 0;
    flags |= (x == INFINITY) ? 2 : 0;
  }
  s_max[tid] = mx;
  s_idx[tid] = amax;
  s_flags[tid] = flags;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w /= 2) {
    if (tid < w) {
      const float a = s_max[tid], b = s_max[tid + w];
      const int64_t ia = s_idx[tid], ib = s_idx[tid + w];
      if (b > a || (b == a && ib < ia)) {
        s_max[tid] = b;
        s_idx[tid] = ib;
      }
      s_flags[tid] |= s_flags[tid + w];
    }
    __syncthreads();
  }
  const float m = s_max[0];
  const int64_t arg = s_idx[0];
  const int fl = s_flags[0];
  for (int64_t i = vocab_size + tid; i < vocab; i += kThreads) out[i] = 0.0f;

  const bool invalid = (fl & 1) || m == -INFINITY || (T > 0.0f && (fl & 2));
  if (invalid) {
    for (int64_t i = tid; i < vocab_size; i += kThreads) out[i] = NAN;
    return;
  }
  if (T == 0.0f) {
    for (int64_t i = tid; i < vocab_size; i += kThreads) out[i] = i == arg ? 1.0f : 0.0f;
    return;
  }

  // Pass 2: e = exp((x - m) * (1 / T)), stored, summed in float64.
  const float inv_t = inverse_temperature(T);
  double sum = 0.0;
  for (int64_t i = tid; i < vocab_size; i += kThreads) {
    const float e = exp_nonpositive((load_logit<Kind>(row_base, i) - m) * inv_t);
    out[i] = e;
    sum += static_cast<double>(e);
  }
  s_sum[tid] = sum;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w /= 2) {
    if (tid < w) s_sum[tid] += s_sum[tid + w];
    __syncthreads();
  }
  const float inv = static_cast<float>(1.0 / s_sum[0]);
  // Pass 3: normalise (each thread rescales exactly the entries it wrote).
  for (int64_t i = tid; i < vocab_size; i += kThreads) out[i] *= inv;
}

}  // namespace

cudaError_t softmax(const void* logits, int logits_kind, int64_t batch, int64_t vocab,
                    int64_t row_stride, int64_t vocab_size, const float* temperature,
                    float temperature_val, float* probs, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  if (batch > 2147483647 || vocab_size < 1 || vocab_size > vocab) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(batch));
  switch (logits_kind) {
    case 0:
      softmax_kernel<0><<<grid, kThreads, 0, stream>>>(logits, vocab, row_stride, vocab_size,
                                                       temperature, temperature_val, probs);
      break;
    case 1:
      softmax_kernel<1><<<grid, kThreads, 0, stream>>>(logits, vocab, row_stride, vocab_size,
                                                       temperature, temperature_val, probs);
      break;
    case 2:
      softmax_kernel<2><<<grid, kThreads, 0, stream>>>(logits, vocab, row_stride, vocab_size,
                                                       temperature, temperature_val, probs);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace decodekit
