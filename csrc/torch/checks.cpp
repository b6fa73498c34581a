// Tensor checks shared by the torch bindings (see checks.h).
#include "torch/checks.h"

#include <ATen/ops/empty.h>

namespace decodekit {
namespace torch_ops {

bool storage_holds(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  if (!t.has_storage()) return false;
  int64_t last = t.storage_offset();
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.stride(d) < 0) return false;
    last += (t.size(d) - 1) * t.stride(d);
  }
  return t.storage().data() != nullptr &&
         static_cast<uint64_t>(last + 1) * t.element_size() <= static_cast<uint64_t>(t.storage().nbytes());
}

void check_storage(const at::Tensor& t, const char* name) {
  if (t.device().is_cpu())
    TORCH_CHECK(storage_holds(t), "decodekit: the storage of ", name,
                " is smaller than the tensor (resized or not allocated)");
}

bool kind_of(at::ScalarType dtype, ScalarKind* kind) {
  switch (dtype) {
    case at::kFloat:
      *kind = ScalarKind::kFloat32;
      return true;
    case at::kHalf:
      *kind = ScalarKind::kFloat16;
      return true;
    case at::kBFloat16:
      *kind = ScalarKind::kBFloat16;
      return true;
    default:
      return false;
  }
}

ScalarKind logits_kind(const at::Tensor& t) {
  ScalarKind kind;
  TORCH_CHECK(kind_of(t.scalar_type(), &kind), "decodekit: logits must be float32, float16 or bfloat16, got ",
              t.scalar_type());
  return kind;
}

void check_logits(const at::Tensor& logits, int64_t vocab_size) {
  TORCH_CHECK(logits.dim() == 2, "decodekit: logits must be 2-D [B, V], got ", logits.dim(), "-D");
  TORCH_CHECK(logits.stride(1) == 1 || logits.size(1) == 1 || logits.size(0) == 0,
              "decodekit: logits rows must be contiguous (stride(1) == 1)");
  TORCH_CHECK(logits.size(1) > 0, "decodekit: logits must have V >= 1 columns");
  check_storage(logits, "logits");
  TORCH_CHECK(logits.size(1) < (int64_t{1} << 31), "decodekit: V must be < 2^31");
  TORCH_CHECK(vocab_size >= 1 && vocab_size <= logits.size(1),
              "decodekit: vocab_size must be in [1, V=", logits.size(1), "], got ", vocab_size);
  logits_kind(logits);
}

LogitsView logits_view(const at::Tensor& logits, int64_t vocab_size) {
  return LogitsView{logits.data_ptr(), logits_kind(logits), logits.size(0),
                    logits.size(1),    logits.stride(0),    vocab_size};
}

void check_probs(const at::Tensor& probs, int64_t vocab_size) {
  TORCH_CHECK(probs.dim() == 2, "decodekit: probs must be 2-D [B, V], got ", probs.dim(), "-D");
  TORCH_CHECK(probs.scalar_type() == at::kFloat, "decodekit: probs must be float32, got ", probs.scalar_type());
  TORCH_CHECK(probs.stride(1) == 1 || probs.size(1) == 1 || probs.size(0) == 0,
              "decodekit: probs rows must be contiguous (stride(1) == 1)");
  TORCH_CHECK(probs.size(1) > 0 && probs.size(1) < (int64_t{1} << 31), "decodekit: probs must have 1 <= V < 2^31");
  check_storage(probs, "probs");
  TORCH_CHECK(vocab_size >= 1 && vocab_size <= probs.size(1), "decodekit: vocab_size must be in [1, V=", probs.size(1),
              "], got ", vocab_size);
}

ProbsView probs_view(const at::Tensor& probs, int64_t vocab_size) {
  return ProbsView{probs.data_ptr<float>(), probs.size(0), probs.size(1), probs.stride(0), vocab_size};
}

void check_same_device(const at::Tensor& like, const std::optional<at::Tensor>& t, const char* name) {
  if (t.has_value())
    TORCH_CHECK(t->device() == like.device(), "decodekit: ", name, " is on ", t->device(), " but logits are on ",
                like.device());
}

FilterParams filter_params(const at::Tensor& like, const std::optional<at::Tensor>& top_k, int64_t top_k_val,
                           const std::optional<at::Tensor>& top_p, double top_p_val,
                           const std::optional<at::Tensor>& min_p, double min_p_val) {
  const int64_t B = like.size(0);
  for (auto [t, name] : {std::pair{&top_k, "top_k"}, {&top_p, "top_p"}, {&min_p, "min_p"}})
    check_same_device(like, *t, name);
  FilterParams fp;
  fp.top_k = row_param<int64_t>(top_k, top_k_val, at::kLong, B, "top_k");
  fp.top_p = row_param<double>(top_p, top_p_val, at::kDouble, B, "top_p");
  fp.min_p = row_param<float>(min_p, static_cast<float>(min_p_val), at::kFloat, B, "min_p");
  return fp;
}

LogprobTensors logprob_outputs(const at::Tensor& like, bool return_logprobs, int64_t top_logprobs, bool raw) {
  TORCH_CHECK(top_logprobs >= 0, "decodekit: top_logprobs must be >= 0, got ", top_logprobs);
  const int64_t B = like.size(0);
  LogprobTensors t;
  t.logprobs = at::empty({return_logprobs ? B : 0}, like.options().dtype(at::kFloat));
  t.top_ids = at::empty({B, top_logprobs}, like.options().dtype(at::kLong));
  t.top_logprobs = at::empty({B, top_logprobs}, like.options().dtype(at::kFloat));
  if (like.device().is_meta()) return t;
  t.request.logprobs = return_logprobs ? t.logprobs.data_ptr<float>() : nullptr;
  t.request.n_top = top_logprobs;
  t.request.top_ids = top_logprobs ? t.top_ids.data_ptr<int64_t>() : nullptr;
  t.request.top_logprobs = top_logprobs ? t.top_logprobs.data_ptr<float>() : nullptr;
  t.request.raw = raw;
  return t;
}

// ------------------------------------------------------------- KV cache ----
// append_kv_cache / append_paged_kv_cache write into k_cache and v_cache in
// place (Tensor(a!) / Tensor(b!) in the schema) and return nothing. Positions
// past the cache and out-of-pool slots are skipped by the kernels; the Python
// wrappers reject them before anything is written.
cpu::KVLayout kv_layout_of(const std::string& s) {
  if (s == "NHD") return cpu::KVLayout::kNHD;
  TORCH_CHECK(s == "HND", "decodekit: kv_layout must be \"NHD\" or \"HND\", got \"", s, "\"");
  return cpu::KVLayout::kHND;
}

// Checks the caches (4-D, same shape and dtype, contiguous) and the new rows
// (key_dims-D, ending in the cache's [H, D], same dtype, last dimension
// contiguous), all on one device. Returns the kernel's view of the caches
// (pointers left null for meta tensors).
cpu::KVCacheTensors check_kv_caches(const at::Tensor& k_cache, const at::Tensor& v_cache,
                                    const std::string& kv_layout) {
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
  TORCH_CHECK(v_cache.device() == k_cache.device(), "decodekit: v_cache is on ", v_cache.device(),
              " but k_cache is on ", k_cache.device());
  cpu::KVCacheTensors c;
  c.elem_size = static_cast<int64_t>(k_cache.element_size());
  c.num_heads = k_cache.size(layout == cpu::KVLayout::kNHD ? 2 : 1);
  c.head_dim = k_cache.size(3);
  c.layout = layout;
  if (!k_cache.is_meta()) {
    check_storage(k_cache, "k_cache");
    check_storage(v_cache, "v_cache");
    c.k = k_cache.data_ptr();
    c.v = v_cache.data_ptr();
  }
  return c;
}

cpu::KVCacheTensors check_kv_append(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& key,
                                    const at::Tensor& value, const at::Tensor& index, const char* index_name,
                                    int64_t key_dims, const char* key_shape, const std::string& kv_layout) {
  const cpu::KVCacheTensors c = check_kv_caches(k_cache, v_cache, kv_layout);
  const auto dtype = k_cache.scalar_type();
  const int64_t H = c.num_heads, D = c.head_dim;
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
  for (auto [t, name] : {std::pair{&key, "key"}, {&value, "value"}, {&index, index_name}})
    TORCH_CHECK(t->device() == k_cache.device(), "decodekit: ", name, " is on ", t->device(), " but k_cache is on ",
                k_cache.device());
  return c;
}

int64_t check_kv_compact(const at::Tensor& k_cache, const std::optional<at::Tensor>& block_tables,
                         const at::Tensor& start, const at::Tensor& accepted_nodes) {
  const int64_t B = accepted_nodes.dim() == 2 ? accepted_nodes.size(0) : -1;
  TORCH_CHECK_VALUE(B >= 0 && accepted_nodes.scalar_type() == at::kLong && accepted_nodes.is_contiguous(),
                    "decodekit: accepted_nodes must be a contiguous int64 [B, L] tensor, got ", accepted_nodes.sizes(),
                    " ", accepted_nodes.scalar_type());
  TORCH_CHECK_VALUE(start.dim() == 1 && start.size(0) == B && start.scalar_type() == at::kLong && start.is_contiguous(),
                    "decodekit: start must be a contiguous int64 [B=", B, "] tensor, got ", start.sizes(), " ",
                    start.scalar_type());
  if (block_tables.has_value()) {
    TORCH_CHECK_VALUE(block_tables->dim() == 2 && block_tables->size(0) == B &&
                          block_tables->scalar_type() == at::kLong && block_tables->is_contiguous(),
                      "decodekit: block_tables must be a contiguous int64 [B=", B, ", max_blocks] tensor, got ",
                      block_tables->sizes(), " ", block_tables->scalar_type());
  } else {
    TORCH_CHECK_VALUE(k_cache.size(0) == B, "decodekit: accepted_nodes has ", B,
                      " rows but the cache has B=", k_cache.size(0));
  }
  for (auto [t, name] : {std::pair{&start, "start"}, {&accepted_nodes, "accepted_nodes"}})
    TORCH_CHECK_VALUE(t->device() == k_cache.device(), "decodekit: ", name, " is on ", t->device(),
                      " but k_cache is on ", k_cache.device());
  if (block_tables.has_value()) {
    TORCH_CHECK_VALUE(block_tables->device() == k_cache.device(), "decodekit: block_tables is on ",
                      block_tables->device(), " but k_cache is on ", k_cache.device());
    check_storage(*block_tables, "block_tables");
  }
  for (auto [t, name] : {std::pair{&start, "start"}, {&accepted_nodes, "accepted_nodes"}}) check_storage(*t, name);
  return B;
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

// ------------------------------------------------------------ attention ----
PagedAttentionDims check_paged_attention(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                         const at::Tensor& block_tables, const at::Tensor& seq_lens,
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
  logits_kind(k_cache);
  PagedAttentionDims g;
  g.B = B, g.Q = Q, g.Hq = Hq, g.D = D, g.Hkv = Hkv, g.hnd = hnd;
  g.num_blocks = k_cache.size(0);
  g.block_size = hnd ? k_cache.size(2) : k_cache.size(1);
  g.max_blocks = block_tables.size(1);
  return g;
}

void check_tree_mask(const std::optional<at::Tensor>& tree_mask, const at::Tensor& query) {
  if (!tree_mask.has_value()) return;
  const at::Tensor& m = *tree_mask;
  const int64_t B = query.size(0), Q = query.size(1);
  TORCH_CHECK_VALUE(m.dim() == 3 && m.size(0) == B && m.size(1) == Q && m.size(2) == Q,
                    "decodekit: tree_mask must be [B=", B, ", Q=", Q, ", Q=", Q, "], got ", m.sizes());
  TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, "decodekit: tree_mask must be bool, got ", m.scalar_type());
  TORCH_CHECK_VALUE(m.is_contiguous(), "decodekit: tree_mask must be contiguous");
  TORCH_CHECK_VALUE(m.device() == query.device(), "decodekit: tree_mask is on ", m.device(), " but query is on ",
                    query.device());
  check_storage(m, "tree_mask");
}

// ---------------------------------------------------------- speculative ----
ChainDims check_chain_speculative(const std::optional<at::Tensor>& draft_probs, const at::Tensor& draft_token_ids,
                                  const at::Tensor& target_probs, const std::optional<at::Tensor>& seed,
                                  int64_t seed_val, const std::optional<at::Tensor>& offset, int64_t offset_val,
                                  int64_t vocab_size) {
  TORCH_CHECK(
      draft_token_ids.dim() == 2 && draft_token_ids.scalar_type() == at::kLong && draft_token_ids.is_contiguous(),
      "decodekit: draft_token_ids must be a contiguous int64 [B, K] tensor");
  const int64_t B = draft_token_ids.size(0), K = draft_token_ids.size(1);
  TORCH_CHECK(target_probs.dim() == 3 && target_probs.size(0) == B && target_probs.size(1) == K + 1 &&
                  target_probs.scalar_type() == at::kFloat && target_probs.is_contiguous(),
              "decodekit: target_probs must be a contiguous float32 [B, K + 1, V] tensor");
  const int64_t V = target_probs.size(2);
  TORCH_CHECK(vocab_size >= 1 && vocab_size <= V, "decodekit: vocab_size must be in [1, V=", V, "]");
  ChainDims g;
  if (draft_probs.has_value()) {
    TORCH_CHECK(draft_probs->dim() == 3 && draft_probs->size(0) == B && draft_probs->size(1) == K &&
                    draft_probs->size(2) == V && draft_probs->scalar_type() == at::kFloat &&
                    draft_probs->is_contiguous(),
                "decodekit: draft_probs must be a contiguous float32 [B, K, V] tensor");
    check_same_device(target_probs, draft_probs, "draft_probs");
    g.draft_probs = draft_probs->data_ptr<float>();
  }
  TORCH_CHECK(draft_token_ids.device() == target_probs.device(), "decodekit: tensors must be on one device");
  check_same_device(target_probs, seed, "seed");
  check_same_device(target_probs, offset, "offset");
  g.seed = row_param<int64_t>(seed, seed_val, at::kLong, B, "seed");
  g.offset = row_param<int64_t>(offset, offset_val, at::kLong, B, "offset");
  g.B = B, g.K = K, g.V = V;
  return g;
}

TreeDims check_tree(const at::Tensor& candidates, const at::Tensor& parents, int64_t max_depth) {
  TORCH_CHECK_TYPE(candidates.scalar_type() == at::kLong && parents.scalar_type() == at::kLong,
                   "decodekit: candidates and parents must be int64, got ", candidates.scalar_type(), " and ",
                   parents.scalar_type());
  TORCH_CHECK_VALUE(candidates.dim() == 2 && parents.sizes() == candidates.sizes(),
                    "decodekit: candidates and parents must both be [B, N], got ", candidates.sizes(), " and ",
                    parents.sizes());
  TORCH_CHECK_VALUE(candidates.is_contiguous() && parents.is_contiguous(),
                    "decodekit: candidates and parents must be contiguous");
  TORCH_CHECK_VALUE(parents.device() == candidates.device(), "decodekit: parents are on ", parents.device(),
                    " but candidates on ", candidates.device());
  const int64_t B = candidates.size(0), N = candidates.size(1);
  TORCH_CHECK_VALUE(N >= 1 && N <= (int64_t{1} << 16),
                    "decodekit: a tree has N in [1, 65536] nodes (node 0 the root), got N=", N);
  TORCH_CHECK_VALUE(max_depth >= 0 && max_depth <= N - 1, "decodekit: max_depth must be in [0, N - 1 = ", N - 1,
                    "], got ", max_depth);
  check_storage(candidates, "candidates");
  check_storage(parents, "parents");
  return TreeDims{B, N};
}

int64_t check_tree_probs(const TreeDims& t, const at::Tensor& candidates, const at::Tensor& target_probs,
                         int64_t vocab_size) {
  TORCH_CHECK_TYPE(target_probs.scalar_type() == at::kFloat, "decodekit: target_probs must be float32, got ",
                   target_probs.scalar_type());
  TORCH_CHECK_VALUE(target_probs.dim() == 3 && target_probs.size(0) == t.B && target_probs.size(1) == t.N &&
                        target_probs.is_contiguous(),
                    "decodekit: target_probs must be a contiguous float32 [B=", t.B, ", N=", t.N, ", V] tensor, got ",
                    target_probs.sizes());
  TORCH_CHECK_VALUE(target_probs.device() == candidates.device(), "decodekit: target_probs are on ",
                    target_probs.device(), " but candidates on ", candidates.device());
  const int64_t V = target_probs.size(2);
  TORCH_CHECK_VALUE(vocab_size >= 1 && vocab_size <= V, "decodekit: vocab_size must be in [1, V=", V, "], got ",
                    vocab_size);
  check_storage(target_probs, "target_probs");
  return V;
}

void require_meta(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_meta(), "decodekit: all tensor arguments must be on one device; ", name, " are on ", x.device(),
              " but another argument is on meta");
}

}  // namespace torch_ops
}  // namespace decodekit
