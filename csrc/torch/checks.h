// Tensor checks and tensor -> view conversions shared by the torch bindings of
// every family (csrc/torch/<family>.cpp, fast_entries.cpp). The kernels are
// framework-free; this layer checks shapes, dtypes, devices and storage with
// TORCH_CHECK, allocates outputs and passes raw pointers. It never reads data
// to validate it (DESIGN.md, "Errors").
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "cpu/kv_cache.h"
#include "cpu/layers.h"
#include "cpu/linear.h"
#include "cpu/speculative/speculative.h"
#include "decodekit/types.h"

namespace decodekit {
namespace torch_ops {

// True when every element of t lies inside its storage: a storage resized to 0
// (or shrunk) under a tensor must not be read.
bool storage_holds(const at::Tensor& t);
void check_storage(const at::Tensor& t, const char* name);

// The kernels' element type for a logits dtype; false for any other dtype.
bool kind_of(at::ScalarType dtype, ScalarKind* kind);
ScalarKind logits_kind(const at::Tensor& t);

void check_logits(const at::Tensor& logits, int64_t vocab_size);
LogitsView logits_view(const at::Tensor& logits, int64_t vocab_size);
void check_probs(const at::Tensor& probs, int64_t vocab_size);
ProbsView probs_view(const at::Tensor& probs, int64_t vocab_size);

void check_same_device(const at::Tensor& like, const std::optional<at::Tensor>& t, const char* name);

// A per-row parameter: the tensor (1-D, length B, `dtype`, contiguous) or the scalar.
template <typename T>
RowParam<T> row_param(const std::optional<at::Tensor>& t, T scalar, at::ScalarType dtype, int64_t B, const char* name) {
  RowParam<T> p;
  p.scalar = scalar;
  if (t.has_value()) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B, "decodekit: ", name, " must be a 1-D tensor of length B=", B);
    TORCH_CHECK(t->scalar_type() == dtype, "decodekit: ", name, " must have dtype ", dtype, ", got ", t->scalar_type());
    TORCH_CHECK(t->is_contiguous(), "decodekit: ", name, " must be contiguous");
    check_storage(*t, name);
    p.values = t->data_ptr<T>();
  }
  return p;
}

// A [B, N] tensor of the given dtype on `like`'s device (N = cols unless cols < 0), or null.
template <typename T>
const T* matrix_or_null(const std::optional<at::Tensor>& t, const at::Tensor& like, at::ScalarType dtype, int64_t cols,
                        const char* name, int64_t* cols_out = nullptr) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->dim() == 2 && t->size(0) == like.size(0) && (cols < 0 || t->size(1) == cols), "decodekit: ", name,
              " must be 2-D [B=", like.size(0), ", ", cols < 0 ? std::string("N") : std::to_string(cols), "], got ",
              t->sizes());
  TORCH_CHECK(t->scalar_type() == dtype, "decodekit: ", name, " must have dtype ", dtype, ", got ", t->scalar_type());
  TORCH_CHECK(t->is_contiguous(), "decodekit: ", name, " must be contiguous");
  check_same_device(like, t, name);
  if (cols_out) *cols_out = t->size(1);
  return t->data_ptr<T>();
}

// top_k / top_p / min_p of the filter ops (same device as `like`).
FilterParams filter_params(const at::Tensor& like, const std::optional<at::Tensor>& top_k, int64_t top_k_val,
                           const std::optional<at::Tensor>& top_p, double top_p_val,
                           const std::optional<at::Tensor>& min_p, double min_p_val);

// Output tensors of the optional logprobs: [B] (or [0]), [B, n], [B, n].
struct LogprobTensors {
  at::Tensor logprobs, top_ids, top_logprobs;
  LogprobRequest request;
};
LogprobTensors logprob_outputs(const at::Tensor& like, bool return_logprobs, int64_t top_logprobs, bool raw);

using SampleResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// ------------------------------------------------------------- KV cache ----
// Checks of append_kv_cache / append_paged_kv_cache (CPU, CUDA and Meta): the
// caches (4-D, same shape and dtype float32 / float16 / bfloat16, contiguous),
// the new rows (key_dims-D ending in the cache's [H, D], the cache's dtype,
// last dimension contiguous) and the index (contiguous 1-D int64), all on one
// device. Returns the kernels' view of the caches (null pointers on meta).
cpu::KVLayout kv_layout_of(const std::string& s);
// The two caches alone (4-D, one shape, dtype float32 / float16 / bfloat16,
// contiguous, one device).
cpu::KVCacheTensors check_kv_caches(const at::Tensor& k_cache, const at::Tensor& v_cache, const std::string& kv_layout);
cpu::KVCacheTensors check_kv_append(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& key,
                                    const at::Tensor& value, const at::Tensor& index, const char* index_name,
                                    int64_t key_dims, const char* key_shape, const std::string& kv_layout);
void check_contiguous_append(const at::Tensor& k_cache, const at::Tensor& key, const at::Tensor& seq_lens);
void check_paged_append(const at::Tensor& key, const at::Tensor& slot_mapping);
// compact_kv_cache / compact_paged_kv_cache: accepted_nodes contiguous int64
// [B, L], start contiguous int64 [B], block_tables (paged) contiguous int64
// [B, max_blocks], else B = the contiguous cache's rows; all on k_cache's
// device. Returns B.
int64_t check_kv_compact(const at::Tensor& k_cache, const std::optional<at::Tensor>& block_tables,
                         const at::Tensor& start, const at::Tensor& accepted_nodes);

// ------------------------------------------------------------ attention ----
// Checks of paged_attention (CPU and CUDA): query contiguous float32 [B, Q,
// H_q, D]; k_cache / v_cache contiguous 4-D of one shape and dtype (float32,
// float16 or bfloat16) with the query's D and H_q a multiple of H_kv;
// block_tables contiguous int64 [B, max_blocks]; seq_lens contiguous int64
// [B]; all on the query's device; kv_layout "NHD" or "HND".
struct PagedAttentionDims {
  int64_t B = 0, Q = 0, Hq = 0, D = 0, Hkv = 0, num_blocks = 0, block_size = 0, max_blocks = 0;
  bool hnd = false;
};
PagedAttentionDims check_paged_attention(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                         const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                         const std::string& kv_layout);
// The optional tree mask of paged_attention: contiguous bool [B, Q, Q] on the
// query's device (its values are not read here).
void check_tree_mask(const std::optional<at::Tensor>& tree_mask, const at::Tensor& query);

// --------------------------------------------------------------- layers ----
// The GGML block type of a quantized weight ("q4_1", "q8_0"): false for any
// other name. *bytes: bytes per block of 32 weights.
bool block_type_of(const std::string& name, cpu::BlockType* type, int64_t* bytes);

// One weight [N, K] of decoder_layer, named `name` (its type argument is
// `type_name`): type "f32" wants a contiguous float32 [N, K] tensor; "q4_1" /
// "q8_0" a contiguous uint8 tensor of N * K / 32 blocks (K a multiple of 32).
// ValueError / TypeError naming the argument. Works on meta tensors with
// symbolic sizes. Returns the kernel's view (data null on meta).
cpu::LayerWeight check_layer_weight(const at::Tensor& w, const std::string& type, const c10::SymInt& N,
                                    const c10::SymInt& K, const char* name, const char* type_name, const at::Tensor& x);

// Checks of decoder_layer (CPU and Meta): shapes, dtypes, contiguity, devices
// and the scalar arguments (see the schema in schemas.cpp and the wrapper in
// python/decodekit/ops/layers.py). With `data` (real CPU tensors) also the
// data the kernels index with, in O(B * T): positions inside the RoPE tables,
// slots inside the pool (negative: padding, not written), seq_lens in
// [T, max_blocks * block_size]. Returns the kernel's parameters (pointers null
// on meta).
cpu::DecoderLayerParams check_decoder_layer(
    const at::Tensor& x, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slot_mapping,
    const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& positions,
    const at::Tensor& cos_table, const at::Tensor& sin_table, const at::Tensor& attn_norm, const at::Tensor& wqkv,
    const std::string& wqkv_type, const at::Tensor& wo, const std::string& wo_type, const at::Tensor& ffn_norm,
    const at::Tensor& w_gate_up, const std::string& gate_up_type, const at::Tensor& w_down,
    const std::string& down_type, int64_t num_heads, int64_t num_kv_heads, int64_t intermediate_size, double eps,
    double scale, const std::string& kv_layout, bool data, const std::optional<at::Tensor>& tree_mask = std::nullopt);

// A later block of the same step, after check_decoder_layer passed for the first
// block (first, first_k_cache): its caches must be float32, contiguous, on x's
// device and of the first block's shape; its norms and weights are checked as
// check_decoder_layer checks them. Returns the first block's parameters with this
// block's pointers. (The one-call layer loop of fast_entries.cpp.)
cpu::DecoderLayerParams check_decoder_layer_next(const cpu::DecoderLayerParams& first, const at::Tensor& first_k_cache,
                                                 const at::Tensor& x, const at::Tensor& k_cache,
                                                 const at::Tensor& v_cache, const at::Tensor& attn_norm,
                                                 const at::Tensor& wqkv, const std::string& wqkv_type,
                                                 const at::Tensor& wo, const std::string& wo_type,
                                                 const at::Tensor& ffn_norm, const at::Tensor& w_gate_up,
                                                 const std::string& gate_up_type, const at::Tensor& w_down,
                                                 const std::string& down_type);

// ---------------------------------------------------------- speculative ----
// The per-row int64 seed and offset of a random op (1-D [B] tensors on `like`'s
// device, or the scalars).
struct SeedOffset {
  RowParam<int64_t> seed, offset;
};
SeedOffset seed_offset(const at::Tensor& like, const std::optional<at::Tensor>& seed, int64_t seed_val,
                       const std::optional<at::Tensor>& offset, int64_t offset_val, int64_t B);
// typical_acceptance's per-row float64 epsilon and delta (on `like`'s device).
struct TypicalParams {
  RowParam<double> epsilon, delta;
};
TypicalParams typical_params(const at::Tensor& like, const std::optional<at::Tensor>& epsilon, double epsilon_val,
                             const std::optional<at::Tensor>& delta, double delta_val, int64_t B);

// Checks of chain_speculative_sampling (CPU and CUDA): draft_token_ids
// contiguous int64 [B, K]; target_probs contiguous float32 [B, K + 1, V];
// draft_probs (optional) contiguous float32 [B, K, V]; vocab_size in [1, V];
// seed / offset per-row int64 [B] or scalars; all on one device. Returns the
// sizes and the raw pointers (draft_probs null when absent).
struct ChainDims {
  int64_t B = 0, K = 0, V = 0;
  const float* draft_probs = nullptr;
  RowParam<int64_t> seed, offset;
};
ChainDims check_chain_speculative(const std::optional<at::Tensor>& draft_probs, const at::Tensor& draft_token_ids,
                                  const at::Tensor& target_probs, const std::optional<at::Tensor>& seed,
                                  int64_t seed_val, const std::optional<at::Tensor>& offset, int64_t offset_val,
                                  int64_t vocab_size);

// Checks of the tree ops (CPU and CUDA): candidates and parents contiguous int64
// [B, N] on one device with 1 <= N <= 2^16 (node n's Philox stream is 2^16 + n);
// max_depth in [0, N - 1]. Returns B and N.
struct TreeDims {
  int64_t B = 0, N = 0;
};
TreeDims check_tree(const at::Tensor& candidates, const at::Tensor& parents, int64_t max_depth);
// The outputs of a tree op, allocated like `like` (CPU and CUDA): tokens [B, max_depth + 1],
// num_accepted [B], num_emitted [B], accepted nodes [B, max_depth + 1]; and their pointers.
using TreeResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
TreeResult tree_outputs(const at::Tensor& like, int64_t B, int64_t max_depth);
cpu::TreeOutputs tree_pointers(TreeResult& r);
// target_probs contiguous float32 [B, N, V] on the tree's device, vocab_size in [1, V]; returns V.
int64_t check_tree_probs(const TreeDims& t, const at::Tensor& candidates, const at::Tensor& target_probs,
                         int64_t vocab_size);

// Meta kernels: shape inference only makes sense when the main input is on
// meta too; a single meta parameter beside real tensors is a device mismatch.
void require_meta(const at::Tensor& x, const char* name);

}  // namespace torch_ops
}  // namespace decodekit
