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
                               const std::string& kv_layout) {
  TORCH_CHECK(kv_layout == "NHD" || kv_layout == "HND", "decodekit: kv_layout must be 'NHD' or 'HND'");
  const bool hnd = kv_layout == "HND";
  TORCH_CHECK(query.dim() == 4 && query.scalar_type() == at::kFloat && query.is_contiguous(),
              "decodekit: query must be a contiguous float32 [B, Q, H_q, D] tensor");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && k_cache.scalar_type() == v_cache.scalar_type(),
              "decodekit: k_cache and v_cache must be contiguous 4-D tensors of one shape and dtype");
  const int64_t B = query.size(0), Q = query.size(1), Hq = query.size(2), D = query.size(3);
  const int64_t Hkv = hnd ? k_cache.size(1) : k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D, "decodekit: head_dim of the cache (", k_cache.size(3), ") != query's (", D, ")");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "decodekit: H_q=", Hq, " must be a multiple of H_kv=", Hkv);
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B && block_tables.scalar_type() == at::kLong &&
                  block_tables.is_contiguous(),
              "decodekit: block_tables must be a contiguous int64 [B, max_blocks] tensor");
  TORCH_CHECK(
      seq_lens.dim() == 1 && seq_lens.size(0) == B && seq_lens.scalar_type() == at::kLong && seq_lens.is_contiguous(),
      "decodekit: seq_lens must be a contiguous int64 [B] tensor");
  for (const at::Tensor* t : {&k_cache, &v_cache, &block_tables, &seq_lens})
    TORCH_CHECK(t->device() == query.device(), "decodekit: all tensors must be on the query's device");
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
  dk::cpu::kernels().paged_attention(query.data_ptr<float>(), B, Q, Hq, kv, block_tables.data_ptr<int64_t>(),
                                     block_tables.size(1), seq_lens.data_ptr<int64_t>(), static_cast<float>(scale),
                                     dk::torch_ops::num_threads(), out.data_ptr<float>());
  return out;
}

at::Tensor paged_attention_meta(const at::Tensor& query, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, double, const std::string&) {
  require_meta(query, "query");
  TORCH_CHECK(query.dim() == 4, "decodekit: query must be [B, Q, H_q, D]");
  return at::empty(query.sizes(), query.options().dtype(at::kFloat));
}

}  // namespace

TORCH_LIBRARY_IMPL(decodekit, CPU, m) { m.impl("paged_attention", &paged_attention_cpu); }

TORCH_LIBRARY_IMPL(decodekit, Meta, m) { m.impl("paged_attention", &paged_attention_meta); }
