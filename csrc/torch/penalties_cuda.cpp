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
using namespace dk_cuda;

namespace {

// A [B, N] tensor of the given dtype on the logits' device, or null.
template <typename T>
const T* matrix_or_null(const std::optional<at::Tensor>& t, const at::Tensor& logits, at::ScalarType dtype,
                        int64_t cols, const char* name, int64_t* cols_out = nullptr) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->dim() == 2 && t->size(0) == logits.size(0) && (cols < 0 || t->size(1) == cols), "decodekit: ", name,
              " must be 2-D [B=", logits.size(0), ", ", cols < 0 ? std::string("N") : std::to_string(cols), "], got ",
              t->sizes());
  TORCH_CHECK(t->scalar_type() == dtype, "decodekit: ", name, " must have dtype ", dtype, ", got ", t->scalar_type());
  TORCH_CHECK(t->is_contiguous(), "decodekit: ", name, " must be contiguous");
  TORCH_CHECK(t->device() == logits.device(), "decodekit: ", name, " is on ", t->device(), " but logits are on ",
              logits.device());
  if (cols_out) *cols_out = t->size(1);
  return t->data_ptr<T>();
}

at::Tensor apply_penalties_cuda(const at::Tensor& logits, const std::optional<at::Tensor>& repetition,
                                double repetition_val, const std::optional<at::Tensor>& frequency, double frequency_val,
                                const std::optional<at::Tensor>& presence, double presence_val,
                                const std::optional<at::Tensor>& token_ids,
                                const std::optional<at::Tensor>& token_counts,
                                const std::optional<at::Tensor>& logit_bias, const std::optional<at::Tensor>& bias_ids,
                                const std::optional<at::Tensor>& bias_values, const std::optional<at::Tensor>& mask,
                                bool mask_allows, int64_t vocab_size) {
  const c10::DeviceGuard guard(logits.device());
  const auto view = logits_view(logits, vocab_size);
  const int64_t B = logits.size(0), V = logits.size(1);
  dk::cuda::PenaltyArgs in;
  in.repetition =
      row_param<float>(repetition, static_cast<float>(repetition_val), at::kFloat, logits, "repetition_penalty");
  in.frequency =
      row_param<float>(frequency, static_cast<float>(frequency_val), at::kFloat, logits, "frequency_penalty");
  in.presence = row_param<float>(presence, static_cast<float>(presence_val), at::kFloat, logits, "presence_penalty");
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
