// CUDA registration of the KV-cache family (append_kv_cache,
// append_paged_kv_cache, compact_kv_cache, compact_paged_kv_cache): the CPU's checks (torch/checks.h), raw device
// pointers and the current stream for csrc/cuda/kv_cache.cu.
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>

#include "cuda/kv_cache.h"
#include "torch/cuda_common.h"

namespace dk = decodekit;
using namespace decodekit::torch_ops;

namespace {

void append_kv_cache_cuda(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& key,
                          const at::Tensor& value, const at::Tensor& seq_lens, const std::string& kv_layout) {
  const c10::DeviceGuard guard(k_cache.device());
  const auto c = check_kv_append(k_cache, v_cache, key, value, seq_lens, "seq_lens", 4, "[B, T, H, D]", kv_layout);
  check_contiguous_append(k_cache, key, seq_lens);
  dk::cpu::KVRows r;
  r.key = key.data_ptr();
  r.value = value.data_ptr();
  r.key_stride_b = key.stride(0), r.key_stride_t = key.stride(1), r.key_stride_h = key.stride(2);
  r.value_stride_b = value.stride(0), r.value_stride_t = value.stride(1), r.value_stride_h = value.stride(2);
  const int64_t S = k_cache.size(c.layout == dk::cpu::KVLayout::kNHD ? 1 : 2);
  check_ok(dk::cuda::append_kv_cache(c, k_cache.size(0), S, r, key.size(1), seq_lens.data_ptr<int64_t>(),
                                     current_stream(k_cache.device())),
           "append_kv_cache");
}

void append_paged_kv_cache_cuda(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& key,
                                const at::Tensor& value, const at::Tensor& slot_mapping, const std::string& kv_layout) {
  const c10::DeviceGuard guard(k_cache.device());
  const auto c = check_kv_append(k_cache, v_cache, key, value, slot_mapping, "slot_mapping", 3, "[N, H, D]", kv_layout);
  check_paged_append(key, slot_mapping);
  dk::cpu::KVRows r;
  r.key = key.data_ptr();
  r.value = value.data_ptr();
  r.key_stride_t = key.stride(0), r.key_stride_h = key.stride(1);
  r.value_stride_t = value.stride(0), r.value_stride_h = value.stride(1);
  const int64_t block_size = k_cache.size(c.layout == dk::cpu::KVLayout::kNHD ? 1 : 2);
  check_ok(dk::cuda::append_paged_kv_cache(c, k_cache.size(0), block_size, r, slot_mapping.data_ptr<int64_t>(),
                                           slot_mapping.size(0), current_stream(k_cache.device())),
           "append_paged_kv_cache");
}

// compact_kv_cache / compact_paged_kv_cache: the accepted path of a verified token tree moves to
// consecutive positions, in place (cpu/kv_cache.h).
void compact_kv_cache_cuda(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& start,
                           const at::Tensor& accepted_nodes, const std::string& kv_layout) {
  const c10::DeviceGuard guard(k_cache.device());
  const auto c = check_kv_caches(k_cache, v_cache, kv_layout);
  const int64_t B = check_kv_compact(k_cache, std::nullopt, start, accepted_nodes);
  const int64_t S = k_cache.size(c.layout == dk::cpu::KVLayout::kNHD ? 1 : 2);
  check_ok(dk::cuda::compact_kv_cache(c, B, S, start.data_ptr<int64_t>(), accepted_nodes.data_ptr<int64_t>(),
                                      accepted_nodes.size(1), current_stream(k_cache.device())),
           "compact_kv_cache");
}

void compact_paged_kv_cache_cuda(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_tables,
                                 const at::Tensor& start, const at::Tensor& accepted_nodes,
                                 const std::string& kv_layout) {
  const c10::DeviceGuard guard(k_cache.device());
  const auto c = check_kv_caches(k_cache, v_cache, kv_layout);
  const int64_t B = check_kv_compact(k_cache, block_tables, start, accepted_nodes);
  const int64_t block_size = k_cache.size(c.layout == dk::cpu::KVLayout::kNHD ? 1 : 2);
  check_ok(dk::cuda::compact_paged_kv_cache(c, k_cache.size(0), block_size, block_tables.data_ptr<int64_t>(),
                                            block_tables.size(1), B, start.data_ptr<int64_t>(),
                                            accepted_nodes.data_ptr<int64_t>(), accepted_nodes.size(1),
                                            current_stream(k_cache.device())),
           "compact_paged_kv_cache");
}

}  // namespace

TORCH_LIBRARY_IMPL(decodekit, CUDA, m) {
  m.impl("append_kv_cache", &append_kv_cache_cuda);
  m.impl("append_paged_kv_cache", &append_paged_kv_cache_cuda);
  m.impl("compact_kv_cache", &compact_kv_cache_cuda);
  m.impl("compact_paged_kv_cache", &compact_paged_kv_cache_cuda);
}
