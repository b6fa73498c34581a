// CUDA registration of the attention family (paged_attention): the CPU's
// checks (torch/checks.h), raw device pointers and the current stream for
// csrc/cuda/attention.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "cuda/attention.h"
#include "torch/cuda_common.h"

namespace dk = decodekit;
using namespace decodekit::torch_ops;

namespace {

at::Tensor paged_attention_cuda(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                                const std::string& kv_layout, const std::optional<at::Tensor>& tree_mask) {
  const c10::DeviceGuard guard(query.device());
  const auto g = check_paged_attention(query, k_cache, v_cache, block_tables, seq_lens, kv_layout);
  check_tree_mask(tree_mask, query);
  TORCH_CHECK(g.D <= dk::cuda::kMaxAttentionHeadDim,
              "decodekit: the CUDA paged_attention takes head_dim <= ", dk::cuda::kMaxAttentionHeadDim, ", got ", g.D);
  TORCH_CHECK(g.Q <= 65535, "decodekit: the CUDA paged_attention takes at most 65535 query positions, got ", g.Q);
  TORCH_CHECK(g.B * g.Hkv < (int64_t{1} << 31), "decodekit: B * H_kv must be < 2^31 on CUDA");
  const dk::cuda::PagedKVView kv{
      k_cache.data_ptr(), v_cache.data_ptr(), logits_kind(k_cache), g.num_blocks, g.block_size, g.Hkv, g.D, g.hnd};
  auto out = at::empty({g.B, g.Q, g.Hq, g.D}, query.options());
  if (out.numel() == 0) return out;
  check_ok(dk::cuda::paged_attention(
               query.data_ptr<float>(), g.B, g.Q, g.Hq, kv, block_tables.data_ptr<int64_t>(), g.max_blocks,
               seq_lens.data_ptr<int64_t>(),
               tree_mask.has_value() ? reinterpret_cast<const uint8_t*>(tree_mask->data_ptr<bool>()) : nullptr,
               static_cast<float>(scale), out.data_ptr<float>(), current_stream(query.device())),
           "paged_attention");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(decodekit, CUDA, m) { m.impl("paged_attention", &paged_attention_cuda); }
