// CUDA registration of the speculative family (chain_speculative_sampling,
// greedy_verify, tree_speculative_sampling, typical_acceptance,
// greedy_tree_verify): the CPU's checks (torch/checks.h), raw device pointers and
// the current stream for csrc/cuda/speculative.cu (and the sampling family's
// argmax for greedy_verify on logits).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <utility>

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

// ------------------------------------------------------------- trees ----
// Scratch of the CUDA tree ops (the caching allocator: no synchronisation): float64 block sums and
// node stats, int64 trees.
std::pair<at::Tensor, at::Tensor> tree_scratch(const TreeDims& t, int64_t vocab_size, const at::Tensor& candidates) {
  return {at::empty({dk::cuda::tree_scratch_doubles(t.B, t.N, vocab_size)}, candidates.options().dtype(at::kDouble)),
          at::empty({dk::cuda::tree_scratch_ints(t.B, t.N)}, candidates.options())};
}

void check_tree_cuda(const TreeDims& t) {
  TORCH_CHECK(t.B < (int64_t{1} << 31) && t.B * t.N < (int64_t{1} << 31),
              "decodekit: the CUDA tree ops take B * N < 2^31 nodes, got B=", t.B, ", N=", t.N);
}

TreeResult tree_speculative_sampling_cuda(const at::Tensor& candidates, const at::Tensor& parents,
                                          const at::Tensor& target_probs, const std::optional<at::Tensor>& seed,
                                          int64_t seed_val, const std::optional<at::Tensor>& offset, int64_t offset_val,
                                          int64_t vocab_size, int64_t max_depth) {
  const c10::DeviceGuard guard(candidates.device());
  const auto t = check_tree(candidates, parents, max_depth);
  const int64_t V = check_tree_probs(t, candidates, target_probs, vocab_size);
  check_tree_cuda(t);
  const auto [s, o] = seed_offset(target_probs, seed, seed_val, offset, offset_val, t.B);
  auto r = tree_outputs(candidates, t.B, max_depth);
  if (t.B == 0) return r;
  auto [scratch, tree] = tree_scratch(t, vocab_size, candidates);
  check_ok(dk::cuda::tree_speculative_sampling(candidates.data_ptr<int64_t>(), parents.data_ptr<int64_t>(),
                                               target_probs.data_ptr<float>(), t.B, t.N, V, vocab_size, max_depth, s, o,
                                               scratch.data_ptr<double>(), tree.data_ptr<int64_t>(), tree_pointers(r),
                                               current_stream(candidates.device())),
           "tree_speculative_sampling");
  return r;
}

TreeResult typical_acceptance_cuda(const at::Tensor& candidates, const at::Tensor& parents,
                                   const at::Tensor& target_probs, const std::optional<at::Tensor>& epsilon,
                                   double epsilon_val, const std::optional<at::Tensor>& delta, double delta_val,
                                   const std::optional<at::Tensor>& seed, int64_t seed_val,
                                   const std::optional<at::Tensor>& offset, int64_t offset_val, int64_t vocab_size,
                                   int64_t max_depth) {
  const c10::DeviceGuard guard(candidates.device());
  const auto t = check_tree(candidates, parents, max_depth);
  const int64_t V = check_tree_probs(t, candidates, target_probs, vocab_size);
  check_tree_cuda(t);
  const auto [e, d] = typical_params(target_probs, epsilon, epsilon_val, delta, delta_val, t.B);
  const auto [s, o] = seed_offset(target_probs, seed, seed_val, offset, offset_val, t.B);
  auto r = tree_outputs(candidates, t.B, max_depth);
  if (t.B == 0) return r;
  auto [scratch, tree] = tree_scratch(t, vocab_size, candidates);
  check_ok(dk::cuda::typical_acceptance(candidates.data_ptr<int64_t>(), parents.data_ptr<int64_t>(),
                                        target_probs.data_ptr<float>(), t.B, t.N, V, vocab_size, max_depth, e, d, s, o,
                                        scratch.data_ptr<double>(), tree.data_ptr<int64_t>(), tree_pointers(r),
                                        current_stream(candidates.device())),
           "typical_acceptance");
  return r;
}

// greedy_tree_verify: target is float logits [B, N, V] (their argmax over [0, vocab_size), lowest
// index on ties, -1 for a row with a NaN or no finite logit: the sampling family's CUDA argmax)
// or int64 target token ids [B, N].
TreeResult greedy_tree_verify_cuda(const at::Tensor& candidates, const at::Tensor& parents, const at::Tensor& target,
                                   int64_t vocab_size, int64_t max_depth) {
  const c10::DeviceGuard guard(candidates.device());
  const auto t = check_tree(candidates, parents, max_depth);
  check_tree_cuda(t);
  TORCH_CHECK(target.device() == candidates.device(), "decodekit: target is on ", target.device(),
              " but candidates are on ", candidates.device());
  const cudaStream_t stream = current_stream(candidates.device());
  at::Tensor top;
  if (target.scalar_type() == at::kLong) {
    TORCH_CHECK_VALUE(vocab_size >= 1, "decodekit: vocab_size must be >= 1, got ", vocab_size);
    TORCH_CHECK(target.dim() == 2 && target.size(0) == t.B && target.size(1) == t.N,
                "decodekit: target ids must be int64 [B=", t.B, ", ", t.N, "], got ", target.sizes());
    top = target.contiguous();
    check_storage(top, "target");
  } else {
    TORCH_CHECK_VALUE(target.dim() == 3, "decodekit: target logits must be [B, N, V], got ", target.sizes());
    TORCH_CHECK_VALUE(vocab_size >= 1 && vocab_size <= target.size(2),
                      "decodekit: vocab_size must be in [1, V=", target.size(2), "], got ", vocab_size);
    TORCH_CHECK(target.size(0) == t.B && target.size(1) == t.N, "decodekit: target logits must be [B=", t.B, ", ", t.N,
                ", V], got ", target.sizes());
    auto rows = target.reshape({t.B * t.N, target.size(2)});
    if (rows.size(1) > 1 && rows.stride(1) != 1) rows = rows.contiguous();
    check_logits(rows, vocab_size);
    check_cuda_batch(rows);
    top = at::empty({t.B, t.N}, candidates.options());
    auto valid = at::empty({t.B * t.N}, candidates.options().dtype(at::kBool));
    if (rows.size(0) > 0)
      check_ok(dk::cuda::argmax(logits_view(rows, vocab_size), top.data_ptr<int64_t>(), valid.data_ptr<bool>(), stream),
               "greedy_tree_verify (argmax)");
  }
  auto r = tree_outputs(candidates, t.B, max_depth);
  if (t.B == 0) return r;
  auto tree = at::empty({dk::cuda::tree_scratch_ints(t.B, t.N)}, candidates.options());
  check_ok(
      dk::cuda::greedy_tree_verify(candidates.data_ptr<int64_t>(), parents.data_ptr<int64_t>(), top.data_ptr<int64_t>(),
                                   t.B, t.N, vocab_size, max_depth, tree.data_ptr<int64_t>(), tree_pointers(r), stream),
      "greedy_tree_verify");
  return r;
}

}  // namespace

TORCH_LIBRARY_IMPL(decodekit, CUDA, m) {
  m.impl("chain_speculative_sampling", &chain_speculative_sampling_cuda);
  m.impl("greedy_verify", &greedy_verify_cuda);
  m.impl("tree_speculative_sampling", &tree_speculative_sampling_cuda);
  m.impl("typical_acceptance", &typical_acceptance_cuda);
  m.impl("greedy_tree_verify", &greedy_tree_verify_cuda);
}
