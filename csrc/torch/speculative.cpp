// Torch bindings of the speculative family: chain_speculative_sampling,
// greedy_verify, the tree ops (tree_speculative_sampling, typical_acceptance,
// greedy_tree_verify) and the row check _check_probability_rows (CPU and Meta; the
// old public name check_probability_rows stays registered, CPU only).
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
#include "torch/threads.h"

namespace dk = decodekit;
using namespace decodekit::torch_ops;

namespace {
std::tuple<at::Tensor, at::Tensor, at::Tensor> chain_speculative_sampling_cpu(
    const std::optional<at::Tensor>& draft_probs, const at::Tensor& draft_token_ids, const at::Tensor& target_probs,
    const std::optional<at::Tensor>& seed, int64_t seed_val, const std::optional<at::Tensor>& offset,
    int64_t offset_val, int64_t vocab_size) {
  const auto c = check_chain_speculative(draft_probs, draft_token_ids, target_probs, seed, seed_val, offset, offset_val,
                                         vocab_size);
  const int64_t B = c.B, K = c.K, V = c.V;
  const float* dp = c.draft_probs;
  const auto& s = c.seed;
  const auto& o = c.offset;
  auto out = at::empty({B, K + 1}, draft_token_ids.options());
  auto acc = at::empty({B}, draft_token_ids.options());
  auto emit = at::empty({B}, draft_token_ids.options());
  dk::cpu::kernels().chain_speculative_sampling(
      dp, draft_token_ids.data_ptr<int64_t>(), target_probs.data_ptr<float>(), B, K, V, vocab_size, s, o,
      dk::torch_ops::num_threads(), out.data_ptr<int64_t>(), acc.data_ptr<int64_t>(), emit.data_ptr<int64_t>());
  return {out, acc, emit};
}

// The target's token at each of `rows` positions of B requests: from float
// logits [B, rows, V] (their argmax over [0, vocab_size), lowest index on ties,
// -1 for a row with a NaN or no finite logit) or int64 ids [B, rows] (as given).
at::Tensor target_ids(const at::Tensor& target, const at::Tensor& like, int64_t B, int64_t rows, int64_t vocab_size,
                      const char* what) {
  TORCH_CHECK(target.device() == like.device(), "decodekit: target is on ", target.device(), " but ", what, " on ",
              like.device());
  if (target.scalar_type() == at::kLong) {
    TORCH_CHECK(target.dim() == 2 && target.size(0) == B && target.size(1) == rows,
                "decodekit: target ids must be int64 [B=", B, ", ", rows, "], got ", target.sizes());
    const auto top = target.contiguous();
    check_storage(top, "target");
    return top;
  }
  TORCH_CHECK(target.dim() == 3 && target.size(0) == B && target.size(1) == rows,
              "decodekit: target logits must be [B=", B, ", ", rows, ", V], got ", target.sizes());
  auto flat = target.reshape({B * rows, target.size(2)});
  if (flat.size(1) > 1 && flat.stride(1) != 1) flat = flat.contiguous();
  check_logits(flat, vocab_size);
  auto top = at::empty({B, rows}, like.options().dtype(at::kLong));
  auto valid = at::empty({B * rows}, like.options().dtype(at::kBool));
  if (flat.size(0) > 0)
    dk::cpu::kernels().argmax(logits_view(flat, vocab_size), dk::torch_ops::num_threads(), top.data_ptr<int64_t>(),
                              valid.data_ptr<bool>());
  return top;
}

// greedy_verify: target is float logits [B, K + 1, V] (their argmax over
// [0, vocab_size), lowest index on ties, -1 for a row with a NaN or no finite
// logit) or int64 target token ids [B, K + 1] (vocab_size unused).
std::tuple<at::Tensor, at::Tensor, at::Tensor> greedy_verify_cpu(const at::Tensor& draft_token_ids,
                                                                 const at::Tensor& target, int64_t vocab_size) {
  TORCH_CHECK(draft_token_ids.dim() == 2 && draft_token_ids.scalar_type() == at::kLong,
              "decodekit: draft_token_ids must be an int64 [B, K] tensor");
  const int64_t B = draft_token_ids.size(0), K = draft_token_ids.size(1);
  const at::Tensor top = target_ids(target, draft_token_ids, B, K + 1, vocab_size, "draft_token_ids are");
  const auto drafts = draft_token_ids.contiguous();
  check_storage(drafts, "draft_token_ids");
  auto out = at::empty({B, K + 1}, draft_token_ids.options());
  auto acc = at::empty({B}, draft_token_ids.options());
  auto emit = at::empty({B}, draft_token_ids.options());
  dk::cpu::kernels().greedy_verify(drafts.data_ptr<int64_t>(), top.data_ptr<int64_t>(), B, K,
                                   dk::torch_ops::num_threads(), out.data_ptr<int64_t>(), acc.data_ptr<int64_t>(),
                                   emit.data_ptr<int64_t>());
  return {out, acc, emit};
}

// ------------------------------------------------------------- trees ----
TreeResult tree_speculative_sampling_cpu(const at::Tensor& candidates, const at::Tensor& parents,
                                         const at::Tensor& target_probs, const std::optional<at::Tensor>& seed,
                                         int64_t seed_val, const std::optional<at::Tensor>& offset, int64_t offset_val,
                                         int64_t vocab_size, int64_t max_depth) {
  const auto t = check_tree(candidates, parents, max_depth);
  const int64_t V = check_tree_probs(t, candidates, target_probs, vocab_size);
  const auto [s, o] = seed_offset(target_probs, seed, seed_val, offset, offset_val, t.B);
  auto r = tree_outputs(candidates, t.B, max_depth);
  dk::cpu::kernels().tree_speculative_sampling(candidates.data_ptr<int64_t>(), parents.data_ptr<int64_t>(),
                                               target_probs.data_ptr<float>(), t.B, t.N, V, vocab_size, max_depth, s, o,
                                               dk::torch_ops::num_threads(), tree_pointers(r));
  return r;
}

TreeResult typical_acceptance_cpu(const at::Tensor& candidates, const at::Tensor& parents,
                                  const at::Tensor& target_probs, const std::optional<at::Tensor>& epsilon,
                                  double epsilon_val, const std::optional<at::Tensor>& delta, double delta_val,
                                  const std::optional<at::Tensor>& seed, int64_t seed_val,
                                  const std::optional<at::Tensor>& offset, int64_t offset_val, int64_t vocab_size,
                                  int64_t max_depth) {
  const auto t = check_tree(candidates, parents, max_depth);
  const int64_t V = check_tree_probs(t, candidates, target_probs, vocab_size);
  const auto [e, d] = typical_params(target_probs, epsilon, epsilon_val, delta, delta_val, t.B);
  const auto [s, o] = seed_offset(target_probs, seed, seed_val, offset, offset_val, t.B);
  auto r = tree_outputs(candidates, t.B, max_depth);
  dk::cpu::kernels().typical_acceptance(candidates.data_ptr<int64_t>(), parents.data_ptr<int64_t>(),
                                        target_probs.data_ptr<float>(), t.B, t.N, V, vocab_size, max_depth, e, d, s, o,
                                        dk::torch_ops::num_threads(), tree_pointers(r));
  return r;
}

// greedy_tree_verify: target is float logits [B, N, V] (their argmax over [0, vocab_size), lowest
// index on ties, -1 for a row with a NaN or no finite logit) or int64 target token ids [B, N].
TreeResult greedy_tree_verify_cpu(const at::Tensor& candidates, const at::Tensor& parents, const at::Tensor& target,
                                  int64_t vocab_size, int64_t max_depth) {
  const auto t = check_tree(candidates, parents, max_depth);
  if (target.scalar_type() != at::kLong) {
    TORCH_CHECK_VALUE(target.dim() == 3, "decodekit: target logits must be [B, N, V], got ", target.sizes());
    TORCH_CHECK_VALUE(vocab_size >= 1 && vocab_size <= target.size(2),
                      "decodekit: vocab_size must be in [1, V=", target.size(2), "], got ", vocab_size);
  } else {
    TORCH_CHECK_VALUE(vocab_size >= 1, "decodekit: vocab_size must be >= 1, got ", vocab_size);
  }
  const at::Tensor top = target_ids(target, candidates, t.B, t.N, vocab_size, "candidates are");
  auto r = tree_outputs(candidates, t.B, max_depth);
  dk::cpu::kernels().greedy_tree_verify(candidates.data_ptr<int64_t>(), parents.data_ptr<int64_t>(),
                                        top.data_ptr<int64_t>(), t.B, t.N, vocab_size, max_depth,
                                        dk::torch_ops::num_threads(), tree_pointers(r));
  return r;
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
                                                   dk::torch_ops::num_threads());
}

// _check_probability_rows: the same status as a 0-d int64 tensor (no host
// sync inside the op; a Meta kernel can give its shape).
at::Tensor check_probability_rows_status_cpu(const at::Tensor& probs, int64_t vocab_size, bool need_mass) {
  auto status = at::empty({}, probs.options().dtype(at::kLong));
  status.fill_(check_probability_rows_cpu(probs, vocab_size, need_mass));
  return status;
}

// ------------------------------------------------------------- Meta ----
std::tuple<at::Tensor, at::Tensor, at::Tensor> chain_speculative_sampling_meta(
    const std::optional<at::Tensor>&, const at::Tensor& draft_token_ids, const at::Tensor& target_probs,
    const std::optional<at::Tensor>&, int64_t, const std::optional<at::Tensor>&, int64_t, int64_t) {
  require_meta(target_probs, "target_probs");
  TORCH_CHECK(draft_token_ids.dim() == 2, "decodekit: draft_token_ids must be [B, K]");
  const int64_t B = draft_token_ids.size(0), K = draft_token_ids.size(1);
  const auto opts = target_probs.options().dtype(at::kLong);
  return {at::empty({B, K + 1}, opts), at::empty({B}, opts), at::empty({B}, opts)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> greedy_verify_meta(const at::Tensor& draft_token_ids,
                                                                  const at::Tensor& target, int64_t) {
  require_meta(draft_token_ids, "draft_token_ids");
  TORCH_CHECK(draft_token_ids.dim() == 2, "decodekit: draft_token_ids must be [B, K]");
  TORCH_CHECK(target.dim() == 2 || target.dim() == 3, "decodekit: target must be ids [B, K+1] or logits [B, K+1, V]");
  const int64_t B = draft_token_ids.size(0), K = draft_token_ids.size(1);
  const auto opts = draft_token_ids.options().dtype(at::kLong);
  return {at::empty({B, K + 1}, opts), at::empty({B}, opts), at::empty({B}, opts)};
}

TreeResult tree_speculative_sampling_meta(const at::Tensor& candidates, const at::Tensor& parents,
                                          const at::Tensor& target_probs, const std::optional<at::Tensor>&, int64_t,
                                          const std::optional<at::Tensor>&, int64_t, int64_t vocab_size,
                                          int64_t max_depth) {
  require_meta(candidates, "candidates");
  const auto t = check_tree(candidates, parents, max_depth);
  check_tree_probs(t, candidates, target_probs, vocab_size);
  return tree_outputs(candidates, t.B, max_depth);
}

TreeResult typical_acceptance_meta(const at::Tensor& candidates, const at::Tensor& parents,
                                   const at::Tensor& target_probs, const std::optional<at::Tensor>&, double,
                                   const std::optional<at::Tensor>&, double, const std::optional<at::Tensor>&, int64_t,
                                   const std::optional<at::Tensor>&, int64_t, int64_t vocab_size, int64_t max_depth) {
  require_meta(candidates, "candidates");
  const auto t = check_tree(candidates, parents, max_depth);
  check_tree_probs(t, candidates, target_probs, vocab_size);
  return tree_outputs(candidates, t.B, max_depth);
}

TreeResult greedy_tree_verify_meta(const at::Tensor& candidates, const at::Tensor& parents, const at::Tensor& target,
                                   int64_t, int64_t max_depth) {
  require_meta(candidates, "candidates");
  const auto t = check_tree(candidates, parents, max_depth);
  TORCH_CHECK_VALUE(
      target.dim() == (target.scalar_type() == at::kLong ? 2 : 3) && target.size(0) == t.B && target.size(1) == t.N,
      "decodekit: target must be ids [B, N] or logits [B, N, V], got ", target.sizes());
  return tree_outputs(candidates, t.B, max_depth);
}

at::Tensor check_probability_rows_status_meta(const at::Tensor& probs, int64_t, bool) {
  require_meta(probs, "probs");
  return at::empty({}, probs.options().dtype(at::kLong));
}

}  // namespace

TORCH_LIBRARY_IMPL(decodekit, CPU, m) {
  m.impl("chain_speculative_sampling", &chain_speculative_sampling_cpu);
  m.impl("greedy_verify", &greedy_verify_cpu);
  m.impl("tree_speculative_sampling", &tree_speculative_sampling_cpu);
  m.impl("typical_acceptance", &typical_acceptance_cpu);
  m.impl("greedy_tree_verify", &greedy_tree_verify_cpu);
  m.impl("_check_probability_rows", &check_probability_rows_status_cpu);
  m.impl("check_probability_rows", &check_probability_rows_cpu);  // the old name, until the callers move
}

TORCH_LIBRARY_IMPL(decodekit, Meta, m) {
  m.impl("chain_speculative_sampling", &chain_speculative_sampling_meta);
  m.impl("greedy_verify", &greedy_verify_meta);
  m.impl("tree_speculative_sampling", &tree_speculative_sampling_meta);
  m.impl("typical_acceptance", &typical_acceptance_meta);
  m.impl("greedy_tree_verify", &greedy_tree_verify_meta);
  m.impl("_check_probability_rows", &check_probability_rows_status_meta);
}
