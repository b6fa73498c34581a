// Tensor checks shared by the torch bindings (see checks.h).
#include "torch/checks.h"

#include <ATen/ops/empty.h>

#include <cmath>
#include <initializer_list>
#include <utility>

namespace decodekit {
namespace torch_ops {

bool storage_holds(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  if (!t.has_storage()) return false;
  int64_t last = t.storage_offset();
  const auto sizes = t.sizes(), strides = t.strides();
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (strides[d] < 0) return false;
    last += (sizes[d] - 1) * strides[d];
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

// --------------------------------------------------------------- layers ----
bool block_type_of(const std::string& name, cpu::BlockType* type, int64_t* bytes) {
  if (name == "q4_1") {
    *type = cpu::BlockType::kQ4_1;
    *bytes = cpu::kQ4_1BlockBytes;
    return true;
  }
  if (name == "q8_0") {
    *type = cpu::BlockType::kQ8_0;
    *bytes = cpu::kQ8_0BlockBytes;
    return true;
  }
  return false;
}

namespace {
constexpr const char* kLayer = "decodekit: decoder_layer ";

// A contiguous 1-D float32 [n] tensor on x's device (the norm weights).
void check_vector(const at::Tensor& t, const c10::SymInt& n, const char* name, const at::Tensor& x) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, kLayer, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.sym_size(0) == n, kLayer, name, " must be [H=", n, "], got ", t.sym_sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), kLayer, name, " must be contiguous");
  TORCH_CHECK_VALUE(t.device() == x.device(), kLayer, name, " is on ", t.device(), " but x is on ", x.device());
  check_storage(t, name);
}

// A contiguous int64 tensor of `dims` dimensions whose leading sizes are `lead` (on x's device).
void check_index(const at::Tensor& t, std::initializer_list<c10::SymInt> lead, int64_t dims, const char* name,
                 const char* shape, const at::Tensor& x) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, kLayer, name, " must be int64, got ", t.scalar_type());
  bool ok = t.dim() == dims;
  int64_t d = 0;
  for (const auto& n : lead) ok = ok && t.sym_size(d++) == n;
  TORCH_CHECK_VALUE(ok, kLayer, name, " must be ", shape, ", got ", t.sym_sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), kLayer, name, " must be contiguous");
  TORCH_CHECK_VALUE(t.device() == x.device(), kLayer, name, " is on ", t.device(), " but x is on ", x.device());
  check_storage(t, name);
}
}  // namespace

cpu::LayerWeight check_layer_weight(const at::Tensor& w, const std::string& type, const c10::SymInt& N,
                                    const c10::SymInt& K, const char* name, const char* type_name,
                                    const at::Tensor& x) {
  cpu::LayerWeight lw;
  int64_t bytes = 0;
  if (type == "f32") {
    TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat, kLayer, name, " must be float32 for ", type_name, "='f32', got ",
                     w.scalar_type());
    TORCH_CHECK_VALUE(w.dim() == 2 && w.sym_size(0) == N && w.sym_size(1) == K, kLayer, name, " must be [N=", N,
                      ", K=", K, "], got ", w.sym_sizes());
  } else if (block_type_of(type, &lw.type, &bytes)) {
    lw.quantized = true;
    TORCH_CHECK_TYPE(w.scalar_type() == at::kByte, kLayer, name, " must be uint8 blocks for ", type_name, "='", type,
                     "', got ", w.scalar_type());
    TORCH_CHECK_VALUE(K % 32 == 0, kLayer, name, ": ", type, " needs K a multiple of 32 (the block size), got K=", K);
    const c10::SymInt want = N * (K / 32) * bytes;
    TORCH_CHECK_VALUE(w.sym_numel() == want, kLayer, name, " must hold N * K / 32 * ", bytes, " = ", want,
                      " bytes for ", type, " [N=", N, ", K=", K, "], got ", w.sym_numel());
  } else {
    TORCH_CHECK_VALUE(false, kLayer, type_name, " must be 'f32', 'q4_1' or 'q8_0', got '", type, "'");
  }
  TORCH_CHECK_VALUE(w.is_contiguous(), kLayer, name, " must be contiguous");
  TORCH_CHECK_VALUE(w.device() == x.device(), kLayer, name, " is on ", w.device(), " but x is on ", x.device());
  check_storage(w, name);
  if (!w.is_meta()) lw.data = w.data_ptr();
  return lw;
}

cpu::DecoderLayerParams check_decoder_layer(
    const at::Tensor& x, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slot_mapping,
    const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& positions,
    const at::Tensor& cos_table, const at::Tensor& sin_table, const at::Tensor& attn_norm, const at::Tensor& wqkv,
    const std::string& wqkv_type, const at::Tensor& wo, const std::string& wo_type, const at::Tensor& ffn_norm,
    const at::Tensor& w_gate_up, const std::string& gate_up_type, const at::Tensor& w_down,
    const std::string& down_type, int64_t num_heads, int64_t num_kv_heads, int64_t intermediate_size, double eps,
    double scale, const std::string& kv_layout, bool data, const std::optional<at::Tensor>& tree_mask) {
  TORCH_CHECK_VALUE(kv_layout == "NHD" || kv_layout == "HND", kLayer, "kv_layout must be 'NHD' or 'HND', got '",
                    kv_layout, "'");
  const bool hnd = kv_layout == "HND";
  // x: the residual stream, written in place.
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, kLayer, "x must be float32, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 3, kLayer, "x must be [B, T, H], got ", x.sym_sizes());
  TORCH_CHECK_VALUE(x.is_contiguous(), kLayer, "x must be contiguous (it is updated in place)");
  check_storage(x, "x");
  const c10::SymInt B = x.sym_size(0), T = x.sym_size(1), H = x.sym_size(2);
  TORCH_CHECK_VALUE(H > 0, kLayer, "x must have a hidden size H >= 1, got ", x.sym_sizes());
  TORCH_CHECK_VALUE(num_heads > 0 && num_kv_heads > 0 && num_heads % num_kv_heads == 0, kLayer, "num_heads (",
                    num_heads, ") must be a positive multiple of num_kv_heads (", num_kv_heads, ")");
  TORCH_CHECK_VALUE(intermediate_size > 0, kLayer, "intermediate_size must be > 0, got ", intermediate_size);
  TORCH_CHECK_VALUE(eps >= 0.0 && eps <= 3.4028234663852886e38, kLayer,
                    "eps must be a finite float32 number >= 0, got ", eps);
  TORCH_CHECK_VALUE(std::isfinite(scale) && std::abs(scale) <= 3.4028234663852886e38, kLayer,
                    "scale must be a finite float32 number, got ", scale);
  // The caches: float32, contiguous, one shape, [num_blocks, block_size, Hkv, D] or [num_blocks, Hkv, block_size, D].
  for (auto [t, name] : {std::pair{&k_cache, "k_cache"}, {&v_cache, "v_cache"}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, kLayer, name, " must be float32 (the model's dtype), got ",
                     t->scalar_type());
    TORCH_CHECK_VALUE(t->dim() == 4, kLayer, name, " must be 4-D (", kv_layout, "), got ", t->sym_sizes());
    TORCH_CHECK_VALUE(t->is_contiguous(), kLayer, name, " must be contiguous");
    TORCH_CHECK_VALUE(t->device() == x.device(), kLayer, name, " is on ", t->device(), " but x is on ", x.device());
    check_storage(*t, name);
  }
  TORCH_CHECK_VALUE(v_cache.sym_sizes() == k_cache.sym_sizes(), kLayer, "v_cache must have the shape of k_cache ",
                    k_cache.sym_sizes(), ", got ", v_cache.sym_sizes());
  const c10::SymInt Hkv = k_cache.sym_size(hnd ? 1 : 2), D = k_cache.sym_size(3);
  TORCH_CHECK_VALUE(Hkv == num_kv_heads, kLayer, "k_cache holds ", Hkv, " KV heads (", kv_layout,
                    ") but num_kv_heads is ", num_kv_heads);
  TORCH_CHECK_VALUE(D > 0 && D % 2 == 0, kLayer, "the head_dim of k_cache must be even for RoPE, got ", D);
  // Indices: slots and positions per token, tables and lengths per sequence.
  check_index(slot_mapping, {B, T}, 2, "slot_mapping", "[B, T] (B, T of x)", x);
  check_index(positions, {B, T}, 2, "positions", "[B, T] (B, T of x)", x);
  check_index(block_tables, {B}, 2, "block_tables", "[B, max_blocks] (B of x)", x);
  check_index(seq_lens, {B}, 1, "seq_lens", "[B] (B of x)", x);
  // RoPE tables [P, D].
  for (auto [t, name] : {std::pair{&cos_table, "cos_table"}, {&sin_table, "sin_table"}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, kLayer, name, " must be float32, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->dim() == 2 && t->sym_size(1) == D, kLayer, name, " must be [P, D=", D, "], got ",
                      t->sym_sizes());
    TORCH_CHECK_VALUE(t->is_contiguous(), kLayer, name, " must be contiguous");
    TORCH_CHECK_VALUE(t->device() == x.device(), kLayer, name, " is on ", t->device(), " but x is on ", x.device());
    check_storage(*t, name);
  }
  TORCH_CHECK_VALUE(sin_table.sym_sizes() == cos_table.sym_sizes(), kLayer,
                    "sin_table must have the shape of cos_table ", cos_table.sym_sizes(), ", got ",
                    sin_table.sym_sizes());
  // Weights.
  check_vector(attn_norm, H, "attn_norm", x);
  check_vector(ffn_norm, H, "ffn_norm", x);
  const c10::SymInt q_size = D * num_heads, qkv_size = D * (num_heads + 2 * num_kv_heads);
  cpu::DecoderLayerParams p;
  p.wqkv = check_layer_weight(wqkv, wqkv_type, qkv_size, H, "wqkv", "wqkv_type", x);
  p.wo = check_layer_weight(wo, wo_type, H, q_size, "wo", "wo_type", x);
  p.w_gate_up = check_layer_weight(w_gate_up, gate_up_type, c10::SymInt(2 * intermediate_size), H, "w_gate_up",
                                   "gate_up_type", x);
  p.w_down = check_layer_weight(w_down, down_type, H, c10::SymInt(intermediate_size), "w_down", "down_type", x);
  // The tree mask (paged_attention's): bool [B, T, T], the new tokens' ancestor-or-self closure.
  if (tree_mask.has_value()) {
    const at::Tensor& m = *tree_mask;
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, kLayer, "tree_mask must be bool, got ", m.scalar_type());
    TORCH_CHECK_VALUE(m.dim() == 3 && m.sym_size(0) == B && m.sym_size(1) == T && m.sym_size(2) == T, kLayer,
                      "tree_mask must be [B=", B, ", T=", T, ", T=", T, "] (B, T of x), got ", m.sym_sizes());
    TORCH_CHECK_VALUE(m.is_contiguous(), kLayer, "tree_mask must be contiguous");
    TORCH_CHECK_VALUE(m.device() == x.device(), kLayer, "tree_mask is on ", m.device(), " but x is on ", x.device());
    check_storage(m, "tree_mask");
  }
  if (!data) return p;

  // Real tensors: the sizes, the pointers, and the data the kernels index with.
  p.B = x.size(0), p.T = x.size(1), p.hidden = x.size(2);
  p.num_heads = num_heads, p.num_kv_heads = num_kv_heads, p.head_dim = k_cache.size(3);
  p.intermediate = intermediate_size;
  p.eps = static_cast<float>(eps);
  p.scale = static_cast<float>(scale);
  p.attn_norm = attn_norm.data_ptr<float>();
  p.ffn_norm = ffn_norm.data_ptr<float>();
  p.cos_table = cos_table.data_ptr<float>();
  p.sin_table = sin_table.data_ptr<float>();
  p.positions = positions.data_ptr<int64_t>();
  p.cache.k = k_cache.data_ptr();
  p.cache.v = v_cache.data_ptr();
  p.cache.elem_size = 4;
  p.cache.num_heads = num_kv_heads;
  p.cache.head_dim = p.head_dim;
  p.cache.layout = hnd ? cpu::KVLayout::kHND : cpu::KVLayout::kNHD;
  p.num_blocks = k_cache.size(0);
  p.block_size = k_cache.size(hnd ? 2 : 1);
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.block_tables = block_tables.data_ptr<int64_t>();
  p.max_blocks = block_tables.size(1);
  p.seq_lens = seq_lens.data_ptr<int64_t>();
  const int64_t M = p.B * p.T, P = cos_table.size(0), pool = p.num_blocks * p.block_size;
  for (int64_t i = 0; i < M; ++i) {
    TORCH_CHECK_VALUE(p.positions[i] >= 0 && p.positions[i] < P, kLayer, "positions[", i / p.T, ", ", i % p.T,
                      "] = ", p.positions[i], " is outside the RoPE tables [0, P=", P, ")");
    TORCH_CHECK_VALUE(p.slot_mapping[i] < pool, kLayer, "slot_mapping[", i / p.T, ", ", i % p.T,
                      "] = ", p.slot_mapping[i], " is past the pool (num_blocks * block_size = ", pool,
                      "; negative slots are padding)");
  }
  const int64_t capacity = p.max_blocks * p.block_size;
  for (int64_t b = 0; b < p.B; ++b)
    TORCH_CHECK_VALUE(p.seq_lens[b] >= p.T && p.seq_lens[b] <= capacity, kLayer, "seq_lens[", b, "] = ", p.seq_lens[b],
                      " must count the T=", p.T,
                      " new tokens and fit the row's block table (max_blocks * block_size = ", capacity, ")");
  if (tree_mask.has_value()) {  // a node reads itself and only earlier nodes: O(B T^2) bytes
    const bool* m = tree_mask->data_ptr<bool>();
    for (int64_t b = 0; b < p.B; ++b)
      for (int64_t i = 0; i < p.T; ++i)
        for (int64_t j = 0; j < p.T; ++j) {
          const bool set = m[(b * p.T + i) * p.T + j];
          TORCH_CHECK_VALUE(j > i ? !set : (j < i || set), kLayer, "tree_mask[", b, ", ", i, ", ", j, "] must be ",
                            j == i ? "True (a node reads itself)" : "False (ancestors come before descendants)");
        }
    p.tree_mask = reinterpret_cast<const uint8_t*>(m);
  }
  return p;
}

cpu::DecoderLayerParams check_decoder_layer_next(const cpu::DecoderLayerParams& first, const at::Tensor& first_k_cache,
                                                 const at::Tensor& x, const at::Tensor& k_cache,
                                                 const at::Tensor& v_cache, const at::Tensor& attn_norm,
                                                 const at::Tensor& wqkv, const std::string& wqkv_type,
                                                 const at::Tensor& wo, const std::string& wo_type,
                                                 const at::Tensor& ffn_norm, const at::Tensor& w_gate_up,
                                                 const std::string& gate_up_type, const at::Tensor& w_down,
                                                 const std::string& down_type) {
  for (auto [t, name] : {std::pair{&k_cache, "k_cache"}, {&v_cache, "v_cache"}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, kLayer, name, " must be float32 (the model's dtype), got ",
                     t->scalar_type());
    TORCH_CHECK_VALUE(t->sizes() == first_k_cache.sizes(), kLayer, name, " must have the first block's shape ",
                      first_k_cache.sizes(), ", got ", t->sizes());
    TORCH_CHECK_VALUE(t->is_contiguous(), kLayer, name, " must be contiguous");
    TORCH_CHECK_VALUE(t->device() == x.device(), kLayer, name, " is on ", t->device(), " but x is on ", x.device());
    check_storage(*t, name);
  }
  const c10::SymInt H(first.hidden), D(first.head_dim), I(first.intermediate);
  check_vector(attn_norm, H, "attn_norm", x);
  check_vector(ffn_norm, H, "ffn_norm", x);
  cpu::DecoderLayerParams p = first;
  p.wqkv =
      check_layer_weight(wqkv, wqkv_type, D * (first.num_heads + 2 * first.num_kv_heads), H, "wqkv", "wqkv_type", x);
  p.wo = check_layer_weight(wo, wo_type, H, D * first.num_heads, "wo", "wo_type", x);
  p.w_gate_up = check_layer_weight(w_gate_up, gate_up_type, I * 2, H, "w_gate_up", "gate_up_type", x);
  p.w_down = check_layer_weight(w_down, down_type, H, I, "w_down", "down_type", x);
  p.attn_norm = attn_norm.data_ptr<float>();
  p.ffn_norm = ffn_norm.data_ptr<float>();
  p.cache.k = k_cache.data_ptr();
  p.cache.v = v_cache.data_ptr();
  return p;
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
  const SeedOffset so = seed_offset(target_probs, seed, seed_val, offset, offset_val, B);
  g.seed = so.seed;
  g.offset = so.offset;
  g.B = B, g.K = K, g.V = V;
  return g;
}

SeedOffset seed_offset(const at::Tensor& like, const std::optional<at::Tensor>& seed, int64_t seed_val,
                       const std::optional<at::Tensor>& offset, int64_t offset_val, int64_t B) {
  check_same_device(like, seed, "seed");
  check_same_device(like, offset, "offset");
  return SeedOffset{row_param<int64_t>(seed, seed_val, at::kLong, B, "seed"),
                    row_param<int64_t>(offset, offset_val, at::kLong, B, "offset")};
}

TypicalParams typical_params(const at::Tensor& like, const std::optional<at::Tensor>& epsilon, double epsilon_val,
                             const std::optional<at::Tensor>& delta, double delta_val, int64_t B) {
  check_same_device(like, epsilon, "epsilon");
  check_same_device(like, delta, "delta");
  return TypicalParams{row_param<double>(epsilon, epsilon_val, at::kDouble, B, "epsilon"),
                       row_param<double>(delta, delta_val, at::kDouble, B, "delta")};
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

TreeResult tree_outputs(const at::Tensor& like, int64_t B, int64_t max_depth) {
  const auto opts = like.options().dtype(at::kLong);
  return {at::empty({B, max_depth + 1}, opts), at::empty({B}, opts), at::empty({B}, opts),
          at::empty({B, max_depth + 1}, opts)};
}

cpu::TreeOutputs tree_pointers(TreeResult& r) {
  return {std::get<0>(r).data_ptr<int64_t>(), std::get<3>(r).data_ptr<int64_t>(), std::get<1>(r).data_ptr<int64_t>(),
          std::get<2>(r).data_ptr<int64_t>()};
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
