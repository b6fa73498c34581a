// Torch bindings of the KV-cache family: append_kv_cache, append_paged_kv_cache
// (CPU and Meta).
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
// ------------------------------------------------------------- KV cache ----
// append_kv_cache / append_paged_kv_cache write into k_cache and v_cache in
// place (Tensor(a!) / Tensor(b!) in the schema) and return nothing. Positions
// past the cache and out-of-pool slots are skipped by the kernels; the Python
// wrappers reject them before anything is written.
dk::cpu::KVLayout kv_layout_of(const std::string& s) {
  if (s == "NHD") return dk::cpu::KVLayout::kNHD;
  TORCH_CHECK(s == "HND", "decodekit: kv_layout must be \"NHD\" or \"HND\", got \"", s, "\"");
  return dk::cpu::KVLayout::kHND;
}

// Checks the caches (4-D, same shape and dtype, contiguous) and the new rows
// (key_dims-D, ending in the cache's [H, D], same dtype, last dimension
// contiguous), all on one device. Returns the kernel's view of the caches
// (pointers left null for meta tensors).
dk::cpu::KVCacheTensors check_kv_append(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& key,
                                        const at::Tensor& value, const at::Tensor& index, const char* index_name,
                                        int64_t key_dims, const char* key_shape, const std::string& kv_layout) {
  const auto layout = kv_layout_of(kv_layout);
  TORCH_CHECK(k_cache.dim() == 4, "decodekit: k_cache must be 4-D, got ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "decodekit: v_cache must have the shape of k_cache ", k_cache.sizes(),
              ", got ", v_cache.sizes());
  const auto dtype = k_cache.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "decodekit: k_cache must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(v_cache.scalar_type() == dtype, "decodekit: v_cache must have the dtype of k_cache (", dtype, "), got ",
              v_cache.scalar_type());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "decodekit: k_cache and v_cache must be contiguous");
  const int64_t H = k_cache.size(layout == dk::cpu::KVLayout::kNHD ? 2 : 1), D = k_cache.size(3);
  for (auto [t, name] : {std::pair{&key, "key"}, {&value, "value"}}) {
    TORCH_CHECK(t->dim() == key_dims, "decodekit: ", name, " must be ", key_dims, "-D ", key_shape, ", got ",
                t->sizes());
    TORCH_CHECK(t->size(key_dims - 2) == H && t->size(key_dims - 1) == D, "decodekit: ", name, " must end in [H=", H,
                ", D=", D, "] (the cache's heads and head_dim), got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == dtype, "decodekit: ", name, " must have the cache's dtype ", dtype, ", got ",
                t->scalar_type());
    TORCH_CHECK(t->stride(key_dims - 1) == 1 || D <= 1, "decodekit: ", name,
                " must have a contiguous last dimension (stride 1)");
  }
  TORCH_CHECK(value.sizes() == key.sizes(), "decodekit: value must have the shape of key ", key.sizes(), ", got ",
              value.sizes());
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong && index.is_contiguous(), "decodekit: ", index_name,
              " must be a contiguous 1-D int64 tensor, got ", index.sizes(), " ", index.scalar_type());
  for (auto [t, name] : {std::pair{&v_cache, "v_cache"}, {&key, "key"}, {&value, "value"}, {&index, index_name}})
    TORCH_CHECK(t->device() == k_cache.device(), "decodekit: ", name, " is on ", t->device(), " but k_cache is on ",
                k_cache.device());
  dk::cpu::KVCacheTensors c;
  c.elem_size = static_cast<int64_t>(k_cache.element_size());
  c.num_heads = H;
  c.head_dim = D;
  c.layout = layout;
  if (!k_cache.is_meta()) {
    c.k = k_cache.data_ptr();
    c.v = v_cache.data_ptr();
  }
  return c;
}

void check_contiguous_append(const at::Tensor& k_cache, const at::Tensor& key, const at::Tensor& seq_lens) {
  TORCH_CHECK(key.size(0) == k_cache.size(0), "decodekit: key has ", key.size(0),
              " rows but the cache has B=", k_cache.size(0));
  TORCH_CHECK(seq_lens.size(0) == k_cache.size(0), "decodekit: seq_lens must have length B=", k_cache.size(0), ", got ",
              seq_lens.size(0));
}

void check_paged_append(const at::Tensor& key, const at::Tensor& slot_mapping) {
  TORCH_CHECK(slot_mapping.size(0) <= key.size(0), "decodekit: slot_mapping has ", slot_mapping.size(0),
              " entries but key has only ", key.size(0), " rows");
}

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

}  // namespace

TORCH_LIBRARY_IMPL(decodekit, CPU, m) {
  m.impl("append_kv_cache", &append_kv_cache_cpu);
  m.impl("append_paged_kv_cache", &append_paged_kv_cache_cpu);
}

TORCH_LIBRARY_IMPL(decodekit, Meta, m) {
  m.impl("append_kv_cache", &append_kv_cache_meta);
  m.impl("append_paged_kv_cache", &append_paged_kv_cache_meta);
}
