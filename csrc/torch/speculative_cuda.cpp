// CUDA registration of the speculative family (chain_speculative_sampling,
// greedy_verify): the CPU's checks (torch/checks.h), raw device pointers and
// the current stream for csrc/cuda/speculative.cu (and the sampling family's
// argmax for greedy_verify on logits).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cuda/sampling.h"
#include "cuda/speculative.h"
#include "torch/cuda_common.h"

namespace dk = decodekit;
using namespace decodekit::torch_ops;

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> chain_speculative_sampling_cuda(
    const std::optional<at::Tensor>& draft_probs, const at::Tensor& draft_token_ids, const at::Tensor& target_probs,
    const std::optional<at::Tensor>& seed, int64_t seed_val, const std::optional<at::Tensor>& offset,
    int64_t offset_val, int64_t vocab_size) {
  const c10::DeviceGuard guard(target_probs.device());
  const auto c = check_chain_speculative(draft_probs, draft_token_ids, target_probs, seed, seed_val, offset, offset_val,
                                         vocab_size);
  TORCH_CHECK(c.B < (int64_t{1} << 31), "decodekit: CUDA ops take fewer than 2^31 rows, got ", c.B);
  auto out = at::empty({c.B, c.K + 1}, draft_token_ids.options());
  auto acc = at::empty({c.B}, draft_token_ids.options());
  auto emit = at::empty({c.B}, draft_token_ids.options());
  if (c.B == 0) return {out, acc, emit};
  // Per-row block sums of the draws (the caching allocator: no synchronisation).
  auto scratch =
      at::empty({dk::cuda::chain_scratch_size(c.B, c.K, vocab_size)}, target_probs.options().dtype(at::kDouble));
  check_ok(dk::cuda::chain_speculative_sampling(
               c.draft_probs, draft_token_ids.data_ptr<int64_t>(), target_probs.data_ptr<float>(), c.B, c.K, c.V,
               vocab_size, c.seed, c.offset, scratch.data_ptr<double>(), out.data_ptr<int64_t>(),
               acc.data_ptr<int64_t>(), emit.data_ptr<int64_t>(), current_stream(target_probs.device())),
           "chain_speculative_sampling");
  return {out, acc, emit};
}

// greedy_verify: target is float logits [B, K + 1, V] (their argmax over
// [0, vocab_size), lowest index on ties, -1 for a row with a NaN or no finite
// logit: the sampling family's CUDA argmax) or int64 target ids [B, K + 1].
std::tuple<at::Tensor, at::Tensor, at::Tensor> greedy_verify_cuda(const at::Tensor& draft_token_ids,
                                                                  const at::Tensor& target, int64_t vocab_size) {
  const c10::DeviceGuard guard(draft_token_ids.device());
  TORCH_CHECK(draft_token_ids.dim() == 2 && draft_token_ids.scalar_type() == at::kLong,
              "decodekit: draft_token_ids must be an int64 [B, K] tensor");
  const int64_t B = draft_token_ids.size(0), K = draft_token_ids.size(1);
  TORCH_CHECK(target.device() == draft_token_ids.device(), "decodekit: target is on ", target.device(),
              " but draft_token_ids are on ", draft_token_ids.device());
  const cudaStream_t stream = current_stream(draft_token_ids.device());
  at::Tensor top;
  if (target.scalar_type() == at::kLong) {
    TORCH_CHECK(target.dim() == 2 && target.size(0) == B && target.size(1) == K + 1,
                "decodekit: target ids must be int64 [B=", B, ", K+1=", K + 1, "], got ", target.sizes());
    top = target.contiguous();
  } else {
    TORCH_CHECK(target.dim() == 3 && target.size(0) == B && target.size(1) == K + 1,
                "decodekit: target logits must be [B=", B, ", K+1=", K + 1, ", V], got ", target.sizes());
    auto rows = target.reshape({B * (K + 1), target.size(2)});
    if (rows.size(1) > 1 && rows.stride(1) != 1) rows = rows.contiguous();
    check_logits(rows, vocab_size);
    check_cuda_batch(rows);
    top = at::empty({B, K + 1}, draft_token_ids.options());
    auto valid = at::empty({B * (K + 1)}, draft_token_ids.options().dtype(at::kBool));
    if (rows.size(0) > 0)
      check_ok(dk::cuda::argmax(logits_view(rows, vocab_size), top.data_ptr<int64_t>(), valid.data_ptr<bool>(), stream),
               "greedy_verify (argmax)");
  }
  const auto drafts = draft_token_ids.contiguous();
  auto out = at::empty({B, K + 1}, draft_token_ids.options());
  auto acc = at::empty({B}, draft_token_ids.options());
  auto emit = at::empty({B}, draft_token_ids.options());
  check_ok(dk::cuda::greedy_verify(drafts.data_ptr<int64_t>(), top.data_ptr<int64_t>(), B, K, out.data_ptr<int64_t>(),
                                   acc.data_ptr<int64_t>(), emit.data_ptr<int64_t>(), stream),
           "greedy_verify");
  return {out, acc, emit};
}

}  // namespace

TORCH_LIBRARY_IMPL(decodekit, CUDA, m) {
  m.impl("chain_speculative_sampling", &chain_speculative_sampling_cuda);
  m.impl("greedy_verify", &greedy_verify_cuda);
}
