// Torch bindings of the speculative family: chain_speculative_sampling and
// check_probability_rows (CPU and Meta).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "cpu/common/isa.h"
#include "torch/checks.h"

namespace dk = decodekit;
using namespace decodekit::torch_ops;

namespace {
std::tuple<at::Tensor, at::Tensor, at::Tensor> chain_speculative_sampling_cpu(
    const std::optional<at::Tensor>& draft_probs, const at::Tensor& draft_token_ids, const at::Tensor& target_probs,
    const std::optional<at::Tensor>& seed, int64_t seed_val, const std::optional<at::Tensor>& offset,
    int64_t offset_val, int64_t vocab_size) {
  TORCH_CHECK(draft_token_ids.dim() == 2 && draft_token_ids.scalar_type() == at::kLong && draft_token_ids.is_contiguous(),
              "decodekit: draft_token_ids must be a contiguous int64 [B, K] tensor");
  const int64_t B = draft_token_ids.size(0), K = draft_token_ids.size(1);
  TORCH_CHECK(target_probs.dim() == 3 && target_probs.size(0) == B && target_probs.size(1) == K + 1 &&
                  target_probs.scalar_type() == at::kFloat && target_probs.is_contiguous(),
              "decodekit: target_probs must be a contiguous float32 [B, K + 1, V] tensor");
  const int64_t V = target_probs.size(2);
  TORCH_CHECK(vocab_size >= 1 && vocab_size <= V, "decodekit: vocab_size must be in [1, V=", V, "]");
  const float* dp = nullptr;
  if (draft_probs.has_value()) {
    TORCH_CHECK(draft_probs->dim() == 3 && draft_probs->size(0) == B && draft_probs->size(1) == K &&
                    draft_probs->size(2) == V && draft_probs->scalar_type() == at::kFloat &&
                    draft_probs->is_contiguous(),
                "decodekit: draft_probs must be a contiguous float32 [B, K, V] tensor");
    check_same_device(target_probs, draft_probs, "draft_probs");
    dp = draft_probs->data_ptr<float>();
  }
  TORCH_CHECK(draft_token_ids.device() == target_probs.device(), "decodekit: tensors must be on one device");
  check_same_device(target_probs, seed, "seed");
  check_same_device(target_probs, offset, "offset");
  const auto s = row_param<int64_t>(seed, seed_val, at::kLong, B, "seed");
  const auto o = row_param<int64_t>(offset, offset_val, at::kLong, B, "offset");
  auto out = at::empty({B, K + 1}, draft_token_ids.options());
  auto acc = at::empty({B}, draft_token_ids.options());
  auto emit = at::empty({B}, draft_token_ids.options());
  dk::cpu::kernels().chain_speculative_sampling(dp, draft_token_ids.data_ptr<int64_t>(), target_probs.data_ptr<float>(), B, K,
                                      V, vocab_size, s, o, at::get_num_threads(), out.data_ptr<int64_t>(),
                                      acc.data_ptr<int64_t>(), emit.data_ptr<int64_t>());
  return {out, acc, emit};
}

// Status of probability rows [..., V] (see check_probability_rows): 0 ok, 1 a negative /
// NaN / infinite entry, 2 a row without positive mass in [0, vocab_size) (need_mass).
int64_t check_probability_rows_cpu(const at::Tensor& probs, int64_t vocab_size, bool need_mass) {
  TORCH_CHECK(probs.scalar_type() == at::kFloat && probs.is_contiguous() && probs.dim() >= 1,
              "decodekit: check_probability_rows wants a contiguous float32 tensor");
  const int64_t V = probs.size(-1);
  TORCH_CHECK(vocab_size >= 0 && vocab_size <= V, "decodekit: vocab_size must be in [0, V]");
  if (probs.numel() == 0) return 0;
  return dk::cpu::kernels().check_probability_rows(probs.data_ptr<float>(), probs.numel() / V, V, vocab_size, need_mass,
                                         at::get_num_threads());
}


std::tuple<at::Tensor, at::Tensor, at::Tensor> chain_speculative_sampling_meta(
    const std::optional<at::Tensor>&, const at::Tensor& draft_token_ids, const at::Tensor& target_probs,
    const std::optional<at::Tensor>&, int64_t, const std::optional<at::Tensor>&, int64_t, int64_t) {
  require_meta(target_probs, "target_probs");
  TORCH_CHECK(draft_token_ids.dim() == 2, "decodekit: draft_token_ids must be [B, K]");
  const int64_t B = draft_token_ids.size(0), K = draft_token_ids.size(1);
  const auto opts = target_probs.options().dtype(at::kLong);
  return {at::empty({B, K + 1}, opts), at::empty({B}, opts), at::empty({B}, opts)};
}

}  // namespace

TORCH_LIBRARY_IMPL(decodekit, CPU, m) {
  m.impl("chain_speculative_sampling", &chain_speculative_sampling_cpu);
  m.impl("check_probability_rows", &check_probability_rows_cpu);
}

TORCH_LIBRARY_IMPL(decodekit, Meta, m) {
  m.impl("chain_speculative_sampling", &chain_speculative_sampling_meta);
}
