// CUDA registrations of the decodekit ops (linked in only when the installed
// torch is a CUDA build). Thin: check tensors, pass raw pointers and the
// current stream to the framework-free kernels in csrc/cuda.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>

#include "cuda/sampling.h"

namespace {

int logits_kind(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, "decodekit: logits must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

at::Tensor softmax_cuda(const at::Tensor& logits, const std::optional<at::Tensor>& temperature,
                        double temperature_val, int64_t vocab_size, bool /*deterministic*/) {
  TORCH_CHECK(logits.dim() == 2, "decodekit: logits must be 2-D [B, V]");
  TORCH_CHECK(logits.stride(1) == 1 || logits.size(1) == 1 || logits.size(0) == 0,
              "decodekit: logits rows must be contiguous (stride(1) == 1)");
  TORCH_CHECK(vocab_size >= 1 && vocab_size <= logits.size(1), "decodekit: vocab_size must be in [1, V]");
  const int64_t B = logits.size(0);
  const float* temps = nullptr;
  if (temperature.has_value()) {
    TORCH_CHECK(temperature->dim() == 1 && temperature->size(0) == B && temperature->scalar_type() == at::kFloat &&
                    temperature->is_contiguous() && temperature->device() == logits.device(),
                "decodekit: temperature must be a contiguous float32 [B] tensor on the logits' device");
    temps = temperature->data_ptr<float>();
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  auto probs = at::empty({B, logits.size(1)}, logits.options().dtype(at::kFloat));
  const cudaError_t err = decodekit::cuda::softmax(
      logits.data_ptr(), logits_kind(logits), B, logits.size(1), logits.stride(0), vocab_size, temps,
      static_cast<float>(temperature_val), probs.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "decodekit: softmax kernel failed: ", cudaGetErrorString(err));
  return probs;
}

}  // namespace

TORCH_LIBRARY_IMPL(decodekit, CUDA, m) {
  m.impl("softmax", &softmax_cuda);
}
