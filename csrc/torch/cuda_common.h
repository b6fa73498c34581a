// Helpers of the CUDA registrations (csrc/torch/*_cuda.cpp) beside the shared
// tensor checks of checks.h: the current stream, the launch status and row
// parameters on the rows' device. No c10/cuda header, so these compile
// against the CPU torch too.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>

#include <cuda_runtime_api.h>

#include <optional>

#include "decodekit/types.h"
#include "torch/checks.h"

namespace decodekit {
namespace torch_ops {

inline cudaStream_t current_stream(const at::Device& device) {
  const c10::Stream s = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device);
  return static_cast<cudaStream_t>(s.native_handle());
}

inline void check_ok(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "decodekit: CUDA ", op, " failed: ", cudaGetErrorString(err));
}

// The rows of a CUDA op: one block per row, so B < 2^31.
inline void check_cuda_batch(const at::Tensor& rows) {
  TORCH_CHECK(rows.size(0) < (int64_t{1} << 31), "decodekit: CUDA ops take fewer than 2^31 rows, got ", rows.size(0));
}

// row_param of checks.h, on the same device as `like`.
template <typename T>
RowParam<T> device_row_param(const std::optional<at::Tensor>& t, T scalar, at::ScalarType dtype, const at::Tensor& like,
                             const char* name) {
  check_same_device(like, t, name);
  return row_param<T>(t, scalar, dtype, like.size(0), name);
}

}  // namespace torch_ops
}  // namespace decodekit
