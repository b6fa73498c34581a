// CUDA registration of the layers family (rms_norm, silu_and_mul, rope_,
// linear): the CPU registration's checks plus same-device checks, raw device
// pointers and the current stream for csrc/cuda/layers.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>

#include "cuda/layers.h"
#include "torch/cuda_common.h"

namespace dk = decodekit;
using namespace decodekit::torch_ops;

namespace {

void check_on(const at::Tensor& t, const at::Tensor& like, const char* name, const char* like_name) {
  TORCH_CHECK(t.device() == like.device(), "decodekit: ", name, " is on ", t.device(), " but ", like_name, " is on ",
              like.device());
}

at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const c10::DeviceGuard guard(x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && x.dim() >= 1 &&
                  weight.dim() == 1 && x.size(-1) == weight.size(0) && weight.is_contiguous(),
              "decodekit: rms_norm wants float32 x [..., H] and weight [H]");
  check_on(weight, x, "weight", "x");
  auto xc = x.contiguous();
  auto y = at::empty(xc.sizes(), xc.options());
  const int64_t H = xc.size(-1);
  if (xc.numel() == 0) return y;
  check_ok(dk::cuda::rms_norm(xc.data_ptr<float>(), xc.numel() / H, H, H, weight.data_ptr<float>(),
                              static_cast<float>(eps), y.data_ptr<float>(), H, current_stream(x.device())),
           "rms_norm");
  return y;
}

at::Tensor silu_and_mul_cuda(const at::Tensor& x) {
  const c10::DeviceGuard guard(x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() >= 1 && x.size(-1) % 2 == 0,
              "decodekit: silu_and_mul wants float32 x [..., 2 * I]");
  auto xc = x.contiguous();
  auto sizes = xc.sizes().vec();
  const int64_t I = sizes.back() / 2;
  sizes.back() = I;
  auto y = at::empty(sizes, xc.options());
  if (y.numel() == 0) return y;
  check_ok(dk::cuda::silu_and_mul(xc.data_ptr<float>(), xc.numel() / (2 * I), I, 2 * I, y.data_ptr<float>(), I,
                                  current_stream(x.device())),
           "silu_and_mul");
  return y;
}

// Positions are not read on the host (that would synchronise): a position
// outside the tables leaves its token unchanged (the Python wrapper checks them).
void rope_inplace_cuda(const at::Tensor& x, int64_t num_heads, const at::Tensor& cos_table, const at::Tensor& sin_table,
                       const at::Tensor& positions) {
  const c10::DeviceGuard guard(x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1,
              "decodekit: rope_ wants float32 x [N, C] with unit column stride");
  TORCH_CHECK(cos_table.scalar_type() == at::kFloat && sin_table.scalar_type() == at::kFloat && cos_table.dim() == 2 &&
                  cos_table.sizes() == sin_table.sizes() && cos_table.is_contiguous() && sin_table.is_contiguous(),
              "decodekit: rope_ wants contiguous float32 cos/sin tables [P, D] of one shape");
  const int64_t D = cos_table.size(1), P = cos_table.size(0), N = x.size(0);
  TORCH_CHECK(D % 2 == 0 && num_heads >= 0 && num_heads * D <= x.size(1),
              "decodekit: rope_ needs an even head_dim and num_heads * head_dim <= x.size(1)");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1 && positions.size(0) == N &&
                  positions.is_contiguous(),
              "decodekit: rope_ wants int64 positions [N]");
  check_on(cos_table, x, "cos_table", "x");
  check_on(sin_table, x, "sin_table", "x");
  check_on(positions, x, "positions", "x");
  if (N == 0 || num_heads == 0) return;
  check_ok(
      dk::cuda::rope_inplace(x.data_ptr<float>(), N, num_heads, D, x.stride(0), cos_table.data_ptr<float>(),
                             sin_table.data_ptr<float>(), P, positions.data_ptr<int64_t>(), current_stream(x.device())),
      "rope_");
}

at::Tensor linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const c10::DeviceGuard guard(x.device());
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "decodekit: linear wants x [M, K] and weight [N, K] with the same K, got ", x.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "decodekit: linear is float32");
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) <= 1, "decodekit: x rows must be contiguous");
  TORCH_CHECK(weight.stride(1) == 1 || weight.size(1) <= 1, "decodekit: weight rows must be contiguous");
  check_on(weight, x, "weight", "x");
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == at::kFloat &&
                    bias->is_contiguous() && bias->device() == x.device(),
                "decodekit: bias must be a contiguous float32 [N] tensor on x's device");
    b = bias->data_ptr<float>();
  }
  auto y = at::empty({x.size(0), weight.size(0)}, x.options());
  if (x.size(0) == 0 || weight.size(0) == 0) return y;
  TORCH_CHECK(x.size(0) <= 65535 * 8, "decodekit: the CUDA linear takes at most 524280 rows, got ", x.size(0));
  check_ok(
      dk::cuda::linear(x.data_ptr<float>(), x.size(0), x.size(1), x.stride(0), weight.data_ptr<float>(), weight.size(0),
                       weight.stride(0), b, y.data_ptr<float>(), y.stride(0), current_stream(x.device())),
      "linear");
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(decodekit, CUDA, m) {
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("silu_and_mul", &silu_and_mul_cuda);
  m.impl("rope_", &rope_inplace_cuda);
  m.impl("linear", &linear_cuda);
}
