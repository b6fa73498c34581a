// Torch bindings of the KV-cache family: append_kv_cache, append_paged_kv_cache,
// compact_kv_cache, compact_paged_kv_cache (CPU and Meta).
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
// The shape, dtype and device checks are shared with the CUDA registration (torch/checks.h).
void append_kv_cache_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& key,
                         const at::Tensor& value, const at::Tensor& seq_lens, const std::string& kv_layout) {
  const auto c = check_kv_append(k_cache, v_cache, key, value, seq_lens, "seq_lens", 4, "[B, T, H, D]", kv_layout);
  check_contiguous_append(k_cache, key, seq_lens);
  dk::cpu::KVRows r;
  r.key = key.data_ptr();
  r.value = value.data_ptr();
  r.key_stride_b = key.stride(0), r.key_stride_t = key.stride(1), r.key_stride_h = key.stride(2);
  r.value_stride_b = value.stride(0), r.value_stride_t = value.stride(1), r.value_stride_h = value.stride(2);
  const int64_t S = k_cache.size(c.layout == dk::cpu::KVLayout::kNHD ? 1 : 2);
  dk::cpu::kernels().append_kv_cache(c, k_cache.size(0), S, r, key.size(1), seq_lens.data_ptr<int64_t>(),
                                     dk::torch_ops::num_threads());
}

void append_paged_kv_cache_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& key,
                               const at::Tensor& value, const at::Tensor& slot_mapping, const std::string& kv_layout) {
  const auto c = check_kv_append(k_cache, v_cache, key, value, slot_mapping, "slot_mapping", 3, "[N, H, D]", kv_layout);
  check_paged_append(key, slot_mapping);
  dk::cpu::KVRows r;
  r.key = key.data_ptr();
  r.value = value.data_ptr();
  r.key_stride_t = key.stride(0), r.key_stride_h = key.stride(1);
  r.value_stride_t = value.stride(0), r.value_stride_h = value.stride(1);
  const int64_t block_size = k_cache.size(c.layout == dk::cpu::KVLayout::kNHD ? 1 : 2);
  dk::cpu::kernels().append_paged_kv_cache(c, k_cache.size(0), block_size, r, slot_mapping.data_ptr<int64_t>(),
                                           slot_mapping.size(0), dk::torch_ops::num_threads());
}

// Meta: the same shape checks, nothing to write.
void append_kv_cache_meta(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& key,
                          const at::Tensor& value, const at::Tensor& seq_lens, const std::string& kv_layout) {
  for (auto [t, name] : {std::pair{&k_cache, "k_cache"},
                         {&v_cache, "v_cache"},
                         {&key, "key"},
                         {&value, "value"},
                         {&seq_lens, "seq_lens"}})
    require_meta(*t, name);
  check_kv_append(k_cache, v_cache, key, value, seq_lens, "seq_lens", 4, "[B, T, H, D]", kv_layout);
  check_contiguous_append(k_cache, key, seq_lens);
}

void append_paged_kv_cache_meta(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& key,
                                const at::Tensor& value, const at::Tensor& slot_mapping, const std::string& kv_layout) {
  for (auto [t, name] : {std::pair{&k_cache, "k_cache"},
                         {&v_cache, "v_cache"},
                         {&key, "key"},
                         {&value, "value"},
                         {&slot_mapping, "slot_mapping"}})
    require_meta(*t, name);
  check_kv_append(k_cache, v_cache, key, value, slot_mapping, "slot_mapping", 3, "[N, H, D]", kv_layout);
  check_paged_append(key, slot_mapping);
}

// compact_kv_cache / compact_paged_kv_cache: the accepted path of a verified token tree moves to
// consecutive positions, in place (cpu/kv_cache.h).
void compact_kv_cache_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& start,
                          const at::Tensor& accepted_nodes, const std::string& kv_layout) {
  const auto c = check_kv_caches(k_cache, v_cache, kv_layout);
  const int64_t B = check_kv_compact(k_cache, std::nullopt, start, accepted_nodes);
  const int64_t S = k_cache.size(c.layout == dk::cpu::KVLayout::kNHD ? 1 : 2);
  dk::cpu::kernels().compact_kv_cache(c, B, S, start.data_ptr<int64_t>(), accepted_nodes.data_ptr<int64_t>(),
                                      accepted_nodes.size(1), dk::torch_ops::num_threads());
}

void compact_paged_kv_cache_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_tables,
                                const at::Tensor& start, const at::Tensor& accepted_nodes,
                                const std::string& kv_layout) {
  const auto c = check_kv_caches(k_cache, v_cache, kv_layout);
  const int64_t B = check_kv_compact(k_cache, block_tables, start, accepted_nodes);
  const int64_t block_size = k_cache.size(c.layout == dk::cpu::KVLayout::kNHD ? 1 : 2);
  dk::cpu::kernels().compact_paged_kv_cache(c, k_cache.size(0), block_size, block_tables.data_ptr<int64_t>(),
                                            block_tables.size(1), B, start.data_ptr<int64_t>(),
                                            accepted_nodes.data_ptr<int64_t>(), accepted_nodes.size(1),
                                            dk::torch_ops::num_threads());
}

void compact_kv_cache_meta(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& start,
                           const at::Tensor& accepted_nodes, const std::string& kv_layout) {
  for (auto [t, name] :
       {std::pair{&k_cache, "k_cache"}, {&v_cache, "v_cache"}, {&start, "start"}, {&accepted_nodes, "accepted_nodes"}})
    require_meta(*t, name);
  check_kv_caches(k_cache, v_cache, kv_layout);
  check_kv_compact(k_cache, std::nullopt, start, accepted_nodes);
}

void compact_paged_kv_cache_meta(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_tables,
                                 const at::Tensor& start, const at::Tensor& accepted_nodes,
                                 const std::string& kv_layout) {
  for (auto [t, name] : {std::pair{&k_cache, "k_cache"},
                         {&v_cache, "v_cache"},
                         {&block_tables, "block_tables"},
                         {&start, "start"},
                         {&accepted_nodes, "accepted_nodes"}})
    require_meta(*t, name);
  check_kv_caches(k_cache, v_cache, kv_layout);
  check_kv_compact(k_cache, block_tables, start, accepted_nodes);
}

}  // namespace

TORCH_LIBRARY_IMPL(decodekit, CPU, m) {
  m.impl("append_kv_cache", &append_kv_cache_cpu);
  m.impl("append_paged_kv_cache", &append_paged_kv_cache_cpu);
  m.impl("compact_kv_cache", &compact_kv_cache_cpu);
  m.impl("compact_paged_kv_cache", &compact_paged_kv_cache_cpu);
}

TORCH_LIBRARY_IMPL(decodekit, Meta, m) {
  m.impl("append_kv_cache", &append_kv_cache_meta);
  m.impl("append_paged_kv_cache", &append_paged_kv_cache_meta);
  m.impl("compact_kv_cache", &compact_kv_cache_meta);
  m.impl("compact_paged_kv_cache", &compact_paged_kv_cache_meta);
}
