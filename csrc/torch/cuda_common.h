// Helpers shared by the CUDA registrations (csrc/torch/*_cuda.cpp): tensor
// checks, row parameters, the current stream. No c10/cuda header, so these
// compile against the CPU torch too.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>

#include <cuda_runtime_api.h>

#include <optional>

#include "decodekit/types.h"

namespace dk = decodekit;

namespace dk_cuda {

inline cudaStream_t current_stream(const at::Device& device) {
  const c10::Stream s = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device);
  return static_cast<cudaStream_t>(s.native_handle());
}

inline void check_ok(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "decodekit: CUDA ", op, " failed: ", cudaGetErrorString(err));
}

inline dk::ScalarKind logits_kind(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return dk::ScalarKind::kFloat32;
    case at::kHalf:
      return dk::ScalarKind::kFloat16;
    case at::kBFloat16:
      return dk::ScalarKind::kBFloat16;
    default:
      TORCH_CHECK(false, "decodekit: logits must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

inline void check_rows(const at::Tensor& x, int64_t vocab_size, const char* name) {
  TORCH_CHECK(x.dim() == 2, "decodekit: ", name, " must be 2-D [B, V], got ", x.dim(), "-D");
  TORCH_CHECK(x.is_cuda(), "decodekit: ", name, " must be a CUDA tensor here");
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) == 1 || x.size(0) == 0, "decodekit: ", name,
              " rows must be contiguous (stride(1) == 1)");
  TORCH_CHECK(x.stride(0) >= 0, "decodekit: ", name, " must have a non-negative row stride");
  TORCH_CHECK(x.size(1) > 0 && x.size(1) < (int64_t{1} << 31), "decodekit: ", name, " must have 1 <= V < 2^31");
  TORCH_CHECK(x.size(0) < (int64_t{1} << 31), "decodekit: ", name, " must have B < 2^31 rows on CUDA");
  TORCH_CHECK(vocab_size >= 1 && vocab_size <= x.size(1), "decodekit: vocab_size must be in [1, V=", x.size(1),
              "], got ", vocab_size);
}

inline dk::LogitsView logits_view(const at::Tensor& logits, int64_t vocab_size) {
  check_rows(logits, vocab_size, "logits");
  return dk::LogitsView{logits.data_ptr(), logits_kind(logits), logits.size(0),
                        logits.size(1),    logits.stride(0),    vocab_size};
}

inline dk::ProbsView probs_view(const at::Tensor& probs, int64_t vocab_size) {
  check_rows(probs, vocab_size, "probs");
  TORCH_CHECK(probs.scalar_type() == at::kFloat, "decodekit: probs must be float32, got ", probs.scalar_type());
  return dk::ProbsView{probs.data_ptr<float>(), probs.size(0), probs.size(1), probs.stride(0), vocab_size};
}

template <typename T>
dk::RowParam<T> row_param(const std::optional<at::Tensor>& t, T scalar, at::ScalarType dtype, const at::Tensor& like,
                          const char* name) {
  dk::RowParam<T> p;
  p.scalar = scalar;
  if (t.has_value()) {
    TORCH_CHECK(t->device() == like.device(), "decodekit: ", name, " is on ", t->device(), " but the rows are on ",
                like.device());
    TORCH_CHECK(t->dim() == 1 && t->size(0) == like.size(0), "decodekit: ", name,
                " must be a 1-D tensor of length B=", like.size(0));
    TORCH_CHECK(t->scalar_type() == dtype, "decodekit: ", name, " must have dtype ", dtype, ", got ", t->scalar_type());
    TORCH_CHECK(t->is_contiguous(), "decodekit: ", name, " must be contiguous");
    p.values = t->data_ptr<T>();
  }
  return p;
}

}  // namespace dk_cuda
