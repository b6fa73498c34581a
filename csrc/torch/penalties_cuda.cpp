// CUDA registration of the penalties family (apply_penalties): checks, raw
// device pointers and the current stream for csrc/cuda/penalties.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "cuda/penalties.h"
#include "torch/cuda_common.h"

namespace dk = decodekit;
using namespace decodekit::torch_ops;

namespace {

// A [B, N] tensor of the given dtype on the logits' device, or null.

at::Tensor apply_penalties_cuda(const at::Tensor& logits, const std::optional<at::Tensor>& repetition,
                                double repetition_val, const std::optional<at::Tensor>& frequency, double frequency_val,
                                const std::optional<at::Tensor>& presence, double presence_val,
                                const std::optional<at::Tensor>& token_ids,
                                const std::optional<at::Tensor>& token_counts,
                                const std::optional<at::Tensor>& logit_bias, const std::optional<at::Tensor>& bias_ids,
                                const std::optional<at::Tensor>& bias_values, const std::optional<at::Tensor>& mask,
                                bool mask_allows, int64_t vocab_size) {
  const c10::DeviceGuard guard(logits.device());
  check_logits(logits, vocab_size);
  check_cuda_batch(logits);
  const auto view = logits_view(logits, vocab_size);
  const int64_t B = logits.size(0), V = logits.size(1);
  dk::cuda::PenaltyArgs in;
  in.repetition =
      device_row_param<float>(repetition, static_cast<float>(repetition_val), at::kFloat, logits, "repetition_penalty");
  in.frequency =
      device_row_param<float>(frequency, static_cast<float>(frequency_val), at::kFloat, logits, "frequency_penalty");
  in.presence =
      device_row_param<float>(presence, static_cast<float>(presence_val), at::kFloat, logits, "presence_penalty");
  TORCH_CHECK(!(token_ids.has_value() && token_counts.has_value()),
              "decodekit: pass token_ids or token_counts, not both");
  in.token_ids = matrix_or_null<int64_t>(token_ids, logits, at::kLong, -1, "token_ids", &in.token_ids_len);
  in.token_counts = matrix_or_null<int64_t>(token_counts, logits, at::kLong, V, "token_counts");
  in.bias_dense = matrix_or_null<float>(logit_bias, logits, at::kFloat, V, "logit_bias");
  TORCH_CHECK(bias_ids.has_value() == bias_values.has_value(), "decodekit: bias_ids and bias_values go together");
  in.bias_ids = matrix_or_null<int64_t>(bias_ids, logits, at::kLong, -1, "bias_ids", &in.bias_len);
  in.bias_values = matrix_or_null<float>(bias_values, logits, at::kFloat, in.bias_len, "bias_values");
  in.mask = matrix_or_null<bool>(mask, logits, at::kBool, V, "mask");
  in.mask_allows = mask_allows;
  auto out = at::empty({B, V}, logits.options().dtype(at::kFloat));
  check_ok(dk::cuda::apply_penalties(view, in, out.data_ptr<float>(), current_stream(logits.device())),
           "apply_penalties");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(decodekit, CUDA, m) { m.impl("apply_penalties", &apply_penalties_cuda); }
