// Torch bindings of the attention family: paged_attention (CPU and Meta).
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
at::Tensor paged_attention_cpu(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                               const std::string& kv_layout, const std::optional<at::Tensor>& tree_mask) {
  const auto g = check_paged_attention(query, k_cache, v_cache, block_tables, seq_lens, kv_layout);
  check_tree_mask(tree_mask, query);
  const bool hnd = g.hnd;
  const int64_t B = g.B, Q = g.Q, Hq = g.Hq, D = g.D, Hkv = g.Hkv;
  const dk::cpu::PagedKV kv{k_cache.data_ptr(),
                            v_cache.data_ptr(),
                            logits_kind(k_cache),
                            k_cache.size(0),
                            hnd ? k_cache.size(2) : k_cache.size(1),
                            Hkv,
                            D,
                            hnd};
  auto out = at::empty({B, Q, Hq, D}, query.options());
  if (out.numel() == 0) return out;
  dk::cpu::kernels().paged_attention(
      query.data_ptr<float>(), B, Q, Hq, kv, block_tables.data_ptr<int64_t>(), block_tables.size(1),
      seq_lens.data_ptr<int64_t>(),
      tree_mask.has_value() ? reinterpret_cast<const uint8_t*>(tree_mask->data_ptr<bool>()) : nullptr,
      static_cast<float>(scale), dk::torch_ops::num_threads(), out.data_ptr<float>());
  return out;
}

at::Tensor paged_attention_meta(const at::Tensor& query, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, double, const std::string&,
                                const std::optional<at::Tensor>& tree_mask) {
  require_meta(query, "query");
  TORCH_CHECK(query.dim() == 4, "decodekit: query must be [B, Q, H_q, D]");
  check_tree_mask(tree_mask, query);
  return at::empty(query.sizes(), query.options().dtype(at::kFloat));
}

}  // namespace

TORCH_LIBRARY_IMPL(decodekit, CPU, m) { m.impl("paged_attention", &paged_attention_cpu); }

TORCH_LIBRARY_IMPL(decodekit, Meta, m) { m.impl("paged_attention", &paged_attention_meta); }
