// Torch bindings of the penalties family: apply_penalties (CPU and Meta).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "cpu/common/fpenv.h"
#include "cpu/common/isa.h"
#include "torch/checks.h"
#include "torch/threads.h"

namespace dk = decodekit;
using namespace decodekit::torch_ops;

namespace {

at::Tensor apply_penalties_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& repetition,
                               double repetition_val, const std::optional<at::Tensor>& frequency, double frequency_val,
                               const std::optional<at::Tensor>& presence, double presence_val,
                               const std::optional<at::Tensor>& token_ids,
                               const std::optional<at::Tensor>& token_counts,
                               const std::optional<at::Tensor>& logit_bias, const std::optional<at::Tensor>& bias_ids,
                               const std::optional<at::Tensor>& bias_values, const std::optional<at::Tensor>& mask,
                               bool mask_allows, int64_t vocab_size) {
  // Parameters become float32 here: convert them with IEEE denormals whatever the caller set.
  const dk::cpu::IeeeDenormals ieee;
  check_logits(logits, vocab_size);
  const int64_t B = logits.size(0), V = logits.size(1);
  for (auto [t, name] : {std::pair{&repetition, "repetition_penalty"},
                         {&frequency, "frequency_penalty"},
                         {&presence, "presence_penalty"}})
    check_same_device(logits, *t, name);
  dk::cpu::PenaltyInputs in;
  in.repetition = row_param<float>(repetition, static_cast<float>(repetition_val), at::kFloat, B, "repetition_penalty");
  in.frequency = row_param<float>(frequency, static_cast<float>(frequency_val), at::kFloat, B, "frequency_penalty");
  in.presence = row_param<float>(presence, static_cast<float>(presence_val), at::kFloat, B, "presence_penalty");
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
  dk::cpu::kernels().apply_penalties(logits_view(logits, vocab_size), in, dk::torch_ops::num_threads(),
                                     out.data_ptr<float>());
  return out;
}

at::Tensor apply_penalties_meta(const at::Tensor& logits, const std::optional<at::Tensor>&, double,
                                const std::optional<at::Tensor>&, double, const std::optional<at::Tensor>&, double,
                                const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, int64_t) {
  require_meta(logits, "logits");
  TORCH_CHECK(logits.dim() == 2, "decodekit: logits must be 2-D [B, V]");
  return at::empty({logits.size(0), logits.size(1)}, logits.options().dtype(at::kFloat));
}

}  // namespace

TORCH_LIBRARY_IMPL(decodekit, CPU, m) { m.impl("apply_penalties", &apply_penalties_cpu); }

TORCH_LIBRARY_IMPL(decodekit, Meta, m) { m.impl("apply_penalties", &apply_penalties_meta); }
