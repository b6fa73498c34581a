// The torch binding layer: every op schema in one place, then the CPU and Meta
// (fake) kernels. The kernels themselves are framework-free (csrc/cpu, csrc/cuda);
// this file only checks tensors, allocates outputs and passes raw pointers.
//
// Data-dependent checks (NaN rows, parameter values) belong to the Python
// wrappers; kernels here never raise on data: invalid rows come back marked.
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <c10/util/Exception.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <string>

#include "cpu/attention.h"
#include "cpu/fpenv.h"
#include "cpu/kv_cache.h"
#include "cpu/linear.h"
#include "cpu/penalties.h"
#include "cpu/sampling.h"
#include "cpu/speculative.h"
#include "cpu/layers.h"
#include "decodekit/philox.h"

namespace dk = decodekit;

namespace {

// ------------------------------------------------------------- helpers ----
// True when every element of t lies inside its storage: a storage resized to 0
// (or shrunk) under a tensor must not be read.
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
    TORCH_CHECK(storage_holds(t), "decodekit: the storage of ", name, " is smaller than the tensor (resized or not allocated)");
}

// The kernels' element type for a logits dtype; false for any other dtype.
bool kind_of(at::ScalarType dtype, dk::cpu::ScalarKind* kind) {
  switch (dtype) {
    case at::kFloat: *kind = dk::cpu::ScalarKind::kFloat32; return true;
    case at::kHalf: *kind = dk::cpu::ScalarKind::kFloat16; return true;
    case at::kBFloat16: *kind = dk::cpu::ScalarKind::kBFloat16; return true;
    default: return false;
  }
}

dk::cpu::ScalarKind logits_kind(const at::Tensor& t) {
  dk::cpu::ScalarKind kind;
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

dk::cpu::LogitsView logits_view(const at::Tensor& logits, int64_t vocab_size) {
  return dk::cpu::LogitsView{logits.data_ptr(), logits_kind(logits), logits.size(0), logits.size(1),
                             logits.stride(0), vocab_size};
}

template <typename T>
dk::cpu::RowParam<T> row_param(const std::optional<at::Tensor>& t, T scalar, at::ScalarType dtype,
                               int64_t B, const char* name) {
  dk::cpu::RowParam<T> p;
  p.scalar = scalar;
  if (t.has_value()) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B, "decodekit: ", name, " must be a 1-D tensor of length B=", B);
    TORCH_CHECK(t->scalar_type() == dtype, "decodekit: ", name, " must have dtype ", dtype, ", got ",
                t->scalar_type());
    TORCH_CHECK(t->is_contiguous(), "decodekit: ", name, " must be contiguous");
    check_storage(*t, name);
    p.values = t->data_ptr<T>();
  }
  return p;
}

void check_same_device(const at::Tensor& logits, const std::optional<at::Tensor>& t, const char* name) {
  if (t.has_value())
    TORCH_CHECK(t->device() == logits.device(), "decodekit: ", name, " is on ", t->device(),
                " but logits are on ", logits.device());
}

// Output tensors of the optional logprobs: [B] (or [0]), [B, n], [B, n].
struct LogprobTensors {
  at::Tensor logprobs, top_ids, top_logprobs;
  dk::cpu::LogprobRequest request;
};

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

using SampleResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// ------------------------------------------------------------ CPU ops ----
at::Tensor softmax_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& temperature,
                       double temperature_val, int64_t vocab_size, bool deterministic) {
  // Parameters become float32 here: convert them with IEEE denormals whatever the caller set.
  const dk::cpu::IeeeDenormals ieee;
  check_logits(logits, vocab_size);
  check_same_device(logits, temperature, "temperature");
  const int64_t B = logits.size(0);
  auto probs = at::empty({B, logits.size(1)}, logits.options().dtype(at::kFloat));
  const auto temp = row_param<float>(temperature, static_cast<float>(temperature_val), at::kFloat, B, "temperature");
  dk::cpu::softmax(logits_view(logits, vocab_size), temp, deterministic, at::get_num_threads(),
                   probs.data_ptr<float>());
  return probs;
}

std::tuple<at::Tensor, at::Tensor> argmax_cpu(const at::Tensor& logits, int64_t vocab_size) {
  check_logits(logits, vocab_size);
  const int64_t B = logits.size(0);
  auto ids = at::empty({B}, logits.options().dtype(at::kLong));
  auto valid = at::empty({B}, logits.options().dtype(at::kBool));
  dk::cpu::argmax(logits_view(logits, vocab_size), at::get_num_threads(), ids.data_ptr<int64_t>(),
                  valid.data_ptr<bool>());
  return {ids, valid};
}

SampleResult sample_from_logits_cpu(
    const at::Tensor& logits, const std::optional<at::Tensor>& temperature, double temperature_val,
    const std::optional<at::Tensor>& top_k, int64_t top_k_val, const std::optional<at::Tensor>& top_p,
    double top_p_val, const std::optional<at::Tensor>& min_p, double min_p_val,
    const std::optional<at::Tensor>& seed, int64_t seed_val, const std::optional<at::Tensor>& offset,
    int64_t offset_val, int64_t vocab_size, bool deterministic, bool return_logprobs, int64_t top_logprobs,
    bool raw_logprobs) {
  // Parameters become float32 here: convert them with IEEE denormals whatever the caller set.
  const dk::cpu::IeeeDenormals ieee;
  check_logits(logits, vocab_size);
  for (auto [t, name] : {std::pair{&temperature, "temperature"}, {&top_k, "top_k"}, {&top_p, "top_p"},
                         {&min_p, "min_p"}, {&seed, "seed"}, {&offset, "offset"}})
    check_same_device(logits, *t, name);
  const int64_t B = logits.size(0);
  dk::cpu::SamplingParams prm;
  prm.temperature = row_param<float>(temperature, static_cast<float>(temperature_val), at::kFloat, B, "temperature");
  prm.top_k = row_param<int64_t>(top_k, top_k_val, at::kLong, B, "top_k");
  prm.top_p = row_param<double>(top_p, top_p_val, at::kDouble, B, "top_p");
  prm.min_p = row_param<float>(min_p, static_cast<float>(min_p_val), at::kFloat, B, "min_p");
  prm.seed = row_param<int64_t>(seed, seed_val, at::kLong, B, "seed");
  prm.offset = row_param<int64_t>(offset, offset_val, at::kLong, B, "offset");
  TORCH_CHECK(top_logprobs <= vocab_size, "decodekit: top_logprobs must be <= vocab_size=", vocab_size);
  auto lp = logprob_outputs(logits, return_logprobs, top_logprobs, raw_logprobs);
  auto ids = at::empty({B}, logits.options().dtype(at::kLong));
  auto valid = at::empty({B}, logits.options().dtype(at::kBool));
  dk::cpu::sample_from_logits(logits_view(logits, vocab_size), prm, lp.request, deterministic, at::get_num_threads(),
                              ids.data_ptr<int64_t>(), valid.data_ptr<bool>());
  return {ids, valid, lp.logprobs, lp.top_ids, lp.top_logprobs};
}

void check_probs(const at::Tensor& probs, int64_t vocab_size) {
  TORCH_CHECK(probs.dim() == 2, "decodekit: probs must be 2-D [B, V], got ", probs.dim(), "-D");
  TORCH_CHECK(probs.scalar_type() == at::kFloat, "decodekit: probs must be float32, got ", probs.scalar_type());
  TORCH_CHECK(probs.stride(1) == 1 || probs.size(1) == 1 || probs.size(0) == 0,
              "decodekit: probs rows must be contiguous (stride(1) == 1)");
  TORCH_CHECK(probs.size(1) > 0 && probs.size(1) < (int64_t{1} << 31), "decodekit: probs must have 1 <= V < 2^31");
  check_storage(probs, "probs");
  TORCH_CHECK(vocab_size >= 1 && vocab_size <= probs.size(1),
              "decodekit: vocab_size must be in [1, V=", probs.size(1), "], got ", vocab_size);
}

dk::cpu::ProbsView probs_view(const at::Tensor& probs, int64_t vocab_size) {
  return dk::cpu::ProbsView{probs.data_ptr<float>(), probs.size(0), probs.size(1), probs.stride(0), vocab_size};
}

dk::cpu::FilterParams filter_params(const at::Tensor& like, const std::optional<at::Tensor>& top_k, int64_t top_k_val,
                                    const std::optional<at::Tensor>& top_p, double top_p_val,
                                    const std::optional<at::Tensor>& min_p, double min_p_val) {
  const int64_t B = like.size(0);
  for (auto [t, name] : {std::pair{&top_k, "top_k"}, {&top_p, "top_p"}, {&min_p, "min_p"}})
    check_same_device(like, *t, name);
  dk::cpu::FilterParams fp;
  fp.top_k = row_param<int64_t>(top_k, top_k_val, at::kLong, B, "top_k");
  fp.top_p = row_param<double>(top_p, top_p_val, at::kDouble, B, "top_p");
  fp.min_p = row_param<float>(min_p, static_cast<float>(min_p_val), at::kFloat, B, "min_p");
  return fp;
}

SampleResult sample_from_probs_cpu(
    const at::Tensor& probs, const std::optional<at::Tensor>& top_k, int64_t top_k_val,
    const std::optional<at::Tensor>& top_p, double top_p_val, const std::optional<at::Tensor>& min_p,
    double min_p_val, const std::optional<at::Tensor>& seed, int64_t seed_val,
    const std::optional<at::Tensor>& offset, int64_t offset_val, int64_t vocab_size, bool deterministic,
    bool return_logprobs, int64_t top_logprobs, bool raw_logprobs) {
  // Parameters become float32 here: convert them with IEEE denormals whatever the caller set.
  const dk::cpu::IeeeDenormals ieee;
  check_probs(probs, vocab_size);
  check_same_device(probs, seed, "seed");
  check_same_device(probs, offset, "offset");
  const int64_t B = probs.size(0);
  const auto fp = filter_params(probs, top_k, top_k_val, top_p, top_p_val, min_p, min_p_val);
  const auto s = row_param<int64_t>(seed, seed_val, at::kLong, B, "seed");
  const auto o = row_param<int64_t>(offset, offset_val, at::kLong, B, "offset");
  TORCH_CHECK(top_logprobs <= vocab_size, "decodekit: top_logprobs must be <= vocab_size=", vocab_size);
  auto lp = logprob_outputs(probs, return_logprobs, top_logprobs, raw_logprobs);
  auto ids = at::empty({B}, probs.options().dtype(at::kLong));
  auto valid = at::empty({B}, probs.options().dtype(at::kBool));
  dk::cpu::sample_from_probs(probs_view(probs, vocab_size), fp, s, o, lp.request, deterministic,
                             at::get_num_threads(), ids.data_ptr<int64_t>(), valid.data_ptr<bool>());
  return {ids, valid, lp.logprobs, lp.top_ids, lp.top_logprobs};
}

std::tuple<at::Tensor, at::Tensor> filter_probs_cpu(const at::Tensor& probs, const std::optional<at::Tensor>& top_k,
                                                    int64_t top_k_val, const std::optional<at::Tensor>& top_p,
                                                    double top_p_val, const std::optional<at::Tensor>& min_p,
                                                    double min_p_val, int64_t vocab_size) {
  // Parameters become float32 here: convert them with IEEE denormals whatever the caller set.
  const dk::cpu::IeeeDenormals ieee;
  check_probs(probs, vocab_size);
  const auto fp = filter_params(probs, top_k, top_k_val, top_p, top_p_val, min_p, min_p_val);
  auto out = at::empty({probs.size(0), probs.size(1)}, probs.options());
  auto valid = at::empty({probs.size(0)}, probs.options().dtype(at::kBool));
  dk::cpu::filter_probs(probs_view(probs, vocab_size), fp, at::get_num_threads(), out.data_ptr<float>(),
                        valid.data_ptr<bool>());
  return {out, valid};
}

std::tuple<at::Tensor, at::Tensor> top_k_mask_logits_cpu(const at::Tensor& logits,
                                                         const std::optional<at::Tensor>& top_k, int64_t top_k_val,
                                                         int64_t vocab_size) {
  check_logits(logits, vocab_size);
  check_same_device(logits, top_k, "top_k");
  const auto k = row_param<int64_t>(top_k, top_k_val, at::kLong, logits.size(0), "top_k");
  auto out = at::empty({logits.size(0), logits.size(1)}, logits.options());
  auto valid = at::empty({logits.size(0)}, logits.options().dtype(at::kBool));
  dk::cpu::top_k_mask_logits(logits_view(logits, vocab_size), k, at::get_num_threads(), out.data_ptr(),
                             valid.data_ptr<bool>());
  return {out, valid};
}

// A [B, N] tensor of the given dtype on the logits' device, or null.
template <typename T>
const T* matrix_or_null(const std::optional<at::Tensor>& t, const at::Tensor& logits, at::ScalarType dtype,
                        int64_t cols, const char* name, int64_t* cols_out = nullptr) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->dim() == 2 && t->size(0) == logits.size(0) && (cols < 0 || t->size(1) == cols), "decodekit: ", name,
              " must be 2-D [B=", logits.size(0), ", ", cols < 0 ? std::string("N") : std::to_string(cols),
              "], got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == dtype, "decodekit: ", name, " must have dtype ", dtype, ", got ", t->scalar_type());
  TORCH_CHECK(t->is_contiguous(), "decodekit: ", name, " must be contiguous");
  check_same_device(logits, t, name);
  if (cols_out) *cols_out = t->size(1);
  return t->data_ptr<T>();
}

at::Tensor apply_penalties_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& repetition,
                               double repetition_val, const std::optional<at::Tensor>& frequency, double frequency_val,
                               const std::optional<at::Tensor>& presence, double presence_val,
                               const std::optional<at::Tensor>& token_ids, const std::optional<at::Tensor>& token_counts,
                               const std::optional<at::Tensor>& logit_bias, const std::optional<at::Tensor>& bias_ids,
                               const std::optional<at::Tensor>& bias_values, const std::optional<at::Tensor>& mask,
                               bool mask_allows, int64_t vocab_size) {
  // Parameters become float32 here: convert them with IEEE denormals whatever the caller set.
  const dk::cpu::IeeeDenormals ieee;
  check_logits(logits, vocab_size);
  const int64_t B = logits.size(0), V = logits.size(1);
  for (auto [t, name] : {std::pair{&repetition, "repetition_penalty"}, {&frequency, "frequency_penalty"},
                         {&presence, "presence_penalty"}})
    check_same_device(logits, *t, name);
  dk::cpu::PenaltyInputs in;
  in.repetition = row_param<float>(repetition, static_cast<float>(repetition_val), at::kFloat, B, "repetition_penalty");
  in.frequency = row_param<float>(frequency, static_cast<float>(frequency_val), at::kFloat, B, "frequency_penalty");
  in.presence = row_param<float>(presence, static_cast<float>(presence_val), at::kFloat, B, "presence_penalty");
  TORCH_CHECK(!(token_ids.has_value() && token_counts.has_value()), "decodekit: pass token_ids or token_counts, not both");
  in.token_ids = matrix_or_null<int64_t>(token_ids, logits, at::kLong, -1, "token_ids", &in.token_ids_len);
  in.token_counts = matrix_or_null<int64_t>(token_counts, logits, at::kLong, V, "token_counts");
  in.bias_dense = matrix_or_null<float>(logit_bias, logits, at::kFloat, V, "logit_bias");
  TORCH_CHECK(bias_ids.has_value() == bias_values.has_value(), "decodekit: bias_ids and bias_values go together");
  in.bias_ids = matrix_or_null<int64_t>(bias_ids, logits, at::kLong, -1, "bias_ids", &in.bias_len);
  in.bias_values = matrix_or_null<float>(bias_values, logits, at::kFloat, in.bias_len, "bias_values");
  in.mask = matrix_or_null<bool>(mask, logits, at::kBool, V, "mask");
  in.mask_allows = mask_allows;
  auto out = at::empty({B, V}, logits.options().dtype(at::kFloat));
  dk::cpu::apply_penalties(logits_view(logits, vocab_size), in, at::get_num_threads(), out.data_ptr<float>());
  return out;
}

// ---------------------------------------------------------- attention ----
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
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == B && seq_lens.scalar_type() == at::kLong &&
                  seq_lens.is_contiguous(),
              "decodekit: seq_lens must be a contiguous int64 [B] tensor");
  for (const at::Tensor* t : {&k_cache, &v_cache, &block_tables, &seq_lens})
    TORCH_CHECK(t->device() == query.device(), "decodekit: all tensors must be on the query's device");
  const dk::cpu::PagedKV kv{k_cache.data_ptr(), v_cache.data_ptr(), logits_kind(k_cache), k_cache.size(0),
                            hnd ? k_cache.size(2) : k_cache.size(1), Hkv, D, hnd};
  auto out = at::empty({B, Q, Hq, D}, query.options());
  if (out.numel() == 0) return out;
  dk::cpu::paged_attention(query.data_ptr<float>(), B, Q, Hq, kv, block_tables.data_ptr<int64_t>(),
                           block_tables.size(1), seq_lens.data_ptr<int64_t>(), static_cast<float>(scale),
                           at::get_num_threads(), out.data_ptr<float>());
  return out;
}

// -------------------------------------------------------- speculative ----
std::tuple<at::Tensor, at::Tensor, at::Tensor> chain_speculative_sampling_cpu(
    const std::optional<at::Tensor>& draft_probs, const at::Tensor& draft_token_ids, const at::Tensor& target_probs,
    const std::optional<at::Tensor>& seed, int64_t seed_val, const std::optional<at::Tensor>& offset,
    int64_t offset_val, int64_t vocab_size) {
  TORCH_CHECK(draft_token_ids.dim() == 2 && draft_token_ids.scalar_type() == at::kLong && draft_token_ids.is_contiguous(),
              "decodekit: draft_token_ids must be a contiguous int64 [B, K] tensor");
  const int64_t B = draft_token_ids.size(0), K = draft_token_ids.size(1);
  TORCH_CHECK(target_probs.dim() == 3 && target_probs.size(0) == B && target_probs.size(1) == K + 1 &&
                  target_probs.scalar_type() == at::kFloat && target_probs.is_contiguous(),
              "decodekit: target_probs must be a contiguous float32 [B, K + 1, V] tensor");
  const int64_t V = target_probs.size(2);
  TORCH_CHECK(vocab_size >= 1 && vocab_size <= V, "decodekit: vocab_size must be in [1, V=", V, "]");
  const float* dp = nullptr;
  if (draft_probs.has_value()) {
    TORCH_CHECK(draft_probs->dim() == 3 && draft_probs->size(0) == B && draft_probs->size(1) == K &&
                    draft_probs->size(2) == V && draft_probs->scalar_type() == at::kFloat &&
                    draft_probs->is_contiguous(),
                "decodekit: draft_probs must be a contiguous float32 [B, K, V] tensor");
    check_same_device(target_probs, draft_probs, "draft_probs");
    dp = draft_probs->data_ptr<float>();
  }
  TORCH_CHECK(draft_token_ids.device() == target_probs.device(), "decodekit: tensors must be on one device");
  check_same_device(target_probs, seed, "seed");
  check_same_device(target_probs, offset, "offset");
  const auto s = row_param<int64_t>(seed, seed_val, at::kLong, B, "seed");
  const auto o = row_param<int64_t>(offset, offset_val, at::kLong, B, "offset");
  auto out = at::empty({B, K + 1}, draft_token_ids.options());
  auto acc = at::empty({B}, draft_token_ids.options());
  auto emit = at::empty({B}, draft_token_ids.options());
  dk::cpu::chain_speculative_sampling(dp, draft_token_ids.data_ptr<int64_t>(), target_probs.data_ptr<float>(), B, K,
                                      V, vocab_size, s, o, at::get_num_threads(), out.data_ptr<int64_t>(),
                                      acc.data_ptr<int64_t>(), emit.data_ptr<int64_t>());
  return {out, acc, emit};
}

// Status of probability rows [..., V] (see check_probability_rows): 0 ok, 1 a negative /
// NaN / infinite entry, 2 a row without positive mass in [0, vocab_size) (need_mass).
int64_t check_probability_rows_cpu(const at::Tensor& probs, int64_t vocab_size, bool need_mass) {
  TORCH_CHECK(probs.scalar_type() == at::kFloat && probs.is_contiguous() && probs.dim() >= 1,
              "decodekit: check_probability_rows wants a contiguous float32 tensor");
  const int64_t V = probs.size(-1);
  TORCH_CHECK(vocab_size >= 0 && vocab_size <= V, "decodekit: vocab_size must be in [0, V]");
  if (probs.numel() == 0) return 0;
  return dk::cpu::check_probability_rows(probs.data_ptr<float>(), probs.numel() / V, V, vocab_size, need_mass,
                                         at::get_num_threads());
}

// -------------------------------------------------------------- layers ----
at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  // Parameters become float32 here: convert them with IEEE denormals whatever the caller set.
  const dk::cpu::IeeeDenormals ieee;
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && x.dim() >= 1 &&
                  weight.dim() == 1 && x.size(-1) == weight.size(0) && weight.is_contiguous(),
              "decodekit: rms_norm wants float32 x [..., H] and weight [H]");
  auto xc = x.contiguous();
  auto y = at::empty(xc.sizes(), xc.options());
  const int64_t H = xc.size(-1);
  if (xc.numel() == 0) return y;
  dk::cpu::rms_norm(xc.data_ptr<float>(), xc.numel() / H, H, H, weight.data_ptr<float>(), static_cast<float>(eps),
                    y.data_ptr<float>(), H, at::get_num_threads());
  return y;
}

at::Tensor silu_and_mul_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() >= 1 && x.size(-1) % 2 == 0,
              "decodekit: silu_and_mul wants float32 x [..., 2 * I]");
  auto xc = x.contiguous();
  auto sizes = xc.sizes().vec();
  const int64_t I = sizes.back() / 2;
  sizes.back() = I;
  auto y = at::empty(sizes, xc.options());
  if (y.numel() == 0) return y;
  dk::cpu::silu_and_mul(xc.data_ptr<float>(), xc.numel() / (2 * I), I, 2 * I, y.data_ptr<float>(), I,
                        at::get_num_threads());
  return y;
}

void rope_inplace_cpu(const at::Tensor& x, int64_t num_heads, const at::Tensor& cos_table,
                      const at::Tensor& sin_table, const at::Tensor& positions) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1,
              "decodekit: rope_ wants float32 x [N, C] with unit column stride");
  TORCH_CHECK(cos_table.scalar_type() == at::kFloat && sin_table.scalar_type() == at::kFloat &&
                  cos_table.dim() == 2 && cos_table.sizes() == sin_table.sizes() && cos_table.is_contiguous() &&
                  sin_table.is_contiguous(),
              "decodekit: rope_ wants contiguous float32 cos/sin tables [P, D] of one shape");
  const int64_t D = cos_table.size(1), P = cos_table.size(0), N = x.size(0);
  TORCH_CHECK(D % 2 == 0 && num_heads >= 0 && num_heads * D <= x.size(1),
              "decodekit: rope_ needs an even head_dim and num_heads * head_dim <= x.size(1)");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1 && positions.size(0) == N &&
                  positions.is_contiguous(),
              "decodekit: rope_ wants int64 positions [N]");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n)
    TORCH_CHECK(pos[n] >= 0 && pos[n] < P, "decodekit: rope_ position ", pos[n], " outside the table [0, ", P, ")");
  if (N == 0 || num_heads == 0) return;
  dk::cpu::rope_inplace(x.data_ptr<float>(), N, num_heads, D, x.stride(0), cos_table.data_ptr<float>(),
                        sin_table.data_ptr<float>(), pos, at::get_num_threads());
}

// ------------------------------------------------------------- linear ----
at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "decodekit: linear wants x [M, K] and weight [N, K] with the same K, got ", x.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "decodekit: linear is float32");
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) <= 1, "decodekit: x rows must be contiguous");
  TORCH_CHECK(weight.stride(1) == 1 || weight.size(1) <= 1, "decodekit: weight rows must be contiguous");
  TORCH_CHECK(weight.device() == x.device(), "decodekit: weight is on ", weight.device(), ", x on ", x.device());
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == at::kFloat &&
                    bias->is_contiguous() && bias->device() == x.device(),
                "decodekit: bias must be a contiguous float32 [N] tensor on x's device");
    b = bias->data_ptr<float>();
  }
  auto y = at::empty({x.size(0), weight.size(0)}, x.options());
  if (x.size(0) == 0 || weight.size(0) == 0) return y;
  dk::cpu::linear(x.data_ptr<float>(), x.size(0), x.size(1), x.stride(0), weight.data_ptr<float>(), weight.size(0),
                  weight.stride(0), b, y.data_ptr<float>(), y.stride(0), at::get_num_threads());
  return y;
}

// ----------------------------------------------------- Meta (fake) ops ----
// The dispatcher picks these when any tensor argument is on the meta device.
// Shape inference only makes sense when the main input is on meta too; a
// single meta parameter beside real logits is a device mismatch.
void require_meta(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_meta(), "decodekit: all tensor arguments must be on one device; ", name, " are on ", x.device(),
              " but another argument is on meta");
}

at::Tensor softmax_meta(const at::Tensor& logits, const std::optional<at::Tensor>&, double, int64_t, bool) {
  require_meta(logits, "logits");
  TORCH_CHECK(logits.dim() == 2, "decodekit: logits must be 2-D [B, V]");
  return at::empty({logits.size(0), logits.size(1)}, logits.options().dtype(at::kFloat));
}

std::tuple<at::Tensor, at::Tensor> ids_and_valid_meta(const at::Tensor& logits) {
  require_meta(logits, "logits/probs");
  TORCH_CHECK(logits.dim() == 2, "decodekit: logits must be 2-D [B, V]");
  return {at::empty({logits.size(0)}, logits.options().dtype(at::kLong)),
          at::empty({logits.size(0)}, logits.options().dtype(at::kBool))};
}

std::tuple<at::Tensor, at::Tensor> argmax_meta(const at::Tensor& logits, int64_t) {
  return ids_and_valid_meta(logits);
}

SampleResult sample_meta(const at::Tensor& x, bool return_logprobs, int64_t top_logprobs) {
  auto [ids, valid] = ids_and_valid_meta(x);
  auto lp = logprob_outputs(x, return_logprobs, top_logprobs, false);
  return {ids, valid, lp.logprobs, lp.top_ids, lp.top_logprobs};
}

SampleResult sample_from_logits_meta(
    const at::Tensor& logits, const std::optional<at::Tensor>&, double, const std::optional<at::Tensor>&,
    int64_t, const std::optional<at::Tensor>&, double, const std::optional<at::Tensor>&, double,
    const std::optional<at::Tensor>&, int64_t, const std::optional<at::Tensor>&, int64_t, int64_t, bool,
    bool return_logprobs, int64_t top_logprobs, bool) {
  return sample_meta(logits, return_logprobs, top_logprobs);
}

SampleResult sample_from_probs_meta(
    const at::Tensor& probs, const std::optional<at::Tensor>&, int64_t, const std::optional<at::Tensor>&, double,
    const std::optional<at::Tensor>&, double, const std::optional<at::Tensor>&, int64_t,
    const std::optional<at::Tensor>&, int64_t, int64_t, bool, bool return_logprobs, int64_t top_logprobs, bool) {
  return sample_meta(probs, return_logprobs, top_logprobs);
}

std::tuple<at::Tensor, at::Tensor> filter_probs_meta(const at::Tensor& probs, const std::optional<at::Tensor>&, int64_t,
                                                     const std::optional<at::Tensor>&, double,
                                                     const std::optional<at::Tensor>&, double, int64_t) {
  require_meta(probs, "probs");
  TORCH_CHECK(probs.dim() == 2, "decodekit: probs must be 2-D [B, V]");
  return {at::empty({probs.size(0), probs.size(1)}, probs.options()),
          at::empty({probs.size(0)}, probs.options().dtype(at::kBool))};
}

std::tuple<at::Tensor, at::Tensor> top_k_mask_logits_meta(const at::Tensor& logits, const std::optional<at::Tensor>&,
                                                          int64_t, int64_t) {
  require_meta(logits, "logits");
  TORCH_CHECK(logits.dim() == 2, "decodekit: logits must be 2-D [B, V]");
  return {at::empty({logits.size(0), logits.size(1)}, logits.options()),
          at::empty({logits.size(0)}, logits.options().dtype(at::kBool))};
}

at::Tensor apply_penalties_meta(const at::Tensor& logits, const std::optional<at::Tensor>&, double,
                                const std::optional<at::Tensor>&, double, const std::optional<at::Tensor>&, double,
                                const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, int64_t) {
  require_meta(logits, "logits");
  TORCH_CHECK(logits.dim() == 2, "decodekit: logits must be 2-D [B, V]");
  return at::empty({logits.size(0), logits.size(1)}, logits.options().dtype(at::kFloat));
}

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
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "decodekit: v_cache must have the shape of k_cache ",
              k_cache.sizes(), ", got ", v_cache.sizes());
  const auto dtype = k_cache.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "decodekit: k_cache must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(v_cache.scalar_type() == dtype, "decodekit: v_cache must have the dtype of k_cache (", dtype,
              "), got ", v_cache.scalar_type());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "decodekit: k_cache and v_cache must be contiguous");
  const int64_t H = k_cache.size(layout == dk::cpu::KVLayout::kNHD ? 2 : 1), D = k_cache.size(3);
  for (auto [t, name] : {std::pair{&key, "key"}, {&value, "value"}}) {
    TORCH_CHECK(t->dim() == key_dims, "decodekit: ", name, " must be ", key_dims, "-D ", key_shape, ", got ",
                t->sizes());
    TORCH_CHECK(t->size(key_dims - 2) == H && t->size(key_dims - 1) == D, "decodekit: ", name,
                " must end in [H=", H, ", D=", D, "] (the cache's heads and head_dim), got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == dtype, "decodekit: ", name, " must have the cache's dtype ", dtype, ", got ",
                t->scalar_type());
    TORCH_CHECK(t->stride(key_dims - 1) == 1 || D <= 1, "decodekit: ", name,
                " must have a contiguous last dimension (stride 1)");
  }
  TORCH_CHECK(value.sizes() == key.sizes(), "decodekit: value must have the shape of key ", key.sizes(), ", got ",
              value.sizes());
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong && index.is_contiguous(), "decodekit: ",
              index_name, " must be a contiguous 1-D int64 tensor, got ", index.sizes(), " ", index.scalar_type());
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
  TORCH_CHECK(key.size(0) == k_cache.size(0), "decodekit: key has ", key.size(0), " rows but the cache has B=",
              k_cache.size(0));
  TORCH_CHECK(seq_lens.size(0) == k_cache.size(0), "decodekit: seq_lens must have length B=", k_cache.size(0),
              ", got ", seq_lens.size(0));
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
  dk::cpu::append_kv_cache(c, k_cache.size(0), S, r, key.size(1), seq_lens.data_ptr<int64_t>(),
                           at::get_num_threads());
}

void append_paged_kv_cache_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& key,
                               const at::Tensor& value, const at::Tensor& slot_mapping, const std::string& kv_layout) {
  const auto c =
      check_kv_append(k_cache, v_cache, key, value, slot_mapping, "slot_mapping", 3, "[N, H, D]", kv_layout);
  check_paged_append(key, slot_mapping);
  dk::cpu::KVRows r;
  r.key = key.data_ptr();
  r.value = value.data_ptr();
  r.key_stride_t = key.stride(0), r.key_stride_h = key.stride(1);
  r.value_stride_t = value.stride(0), r.value_stride_h = value.stride(1);
  const int64_t block_size = k_cache.size(c.layout == dk::cpu::KVLayout::kNHD ? 1 : 2);
  dk::cpu::append_paged_kv_cache(c, k_cache.size(0), block_size, r, slot_mapping.data_ptr<int64_t>(),
                                 slot_mapping.size(0), at::get_num_threads());
}

// Meta: the same shape checks, nothing to write.
void append_kv_cache_meta(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& key,
                          const at::Tensor& value, const at::Tensor& seq_lens, const std::string& kv_layout) {
  for (auto [t, name] : {std::pair{&k_cache, "k_cache"}, {&v_cache, "v_cache"}, {&key, "key"}, {&value, "value"},
                         {&seq_lens, "seq_lens"}})
    require_meta(*t, name);
  check_kv_append(k_cache, v_cache, key, value, seq_lens, "seq_lens", 4, "[B, T, H, D]", kv_layout);
  check_contiguous_append(k_cache, key, seq_lens);
}

void append_paged_kv_cache_meta(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& key,
                                const at::Tensor& value, const at::Tensor& slot_mapping, const std::string& kv_layout) {
  for (auto [t, name] : {std::pair{&k_cache, "k_cache"}, {&v_cache, "v_cache"}, {&key, "key"}, {&value, "value"},
                         {&slot_mapping, "slot_mapping"}})
    require_meta(*t, name);
  check_kv_append(k_cache, v_cache, key, value, slot_mapping, "slot_mapping", 3, "[N, H, D]", kv_layout);
  check_paged_append(key, slot_mapping);
}

at::Tensor paged_attention_meta(const at::Tensor& query, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, double, const std::string&) {
  require_meta(query, "query");
  TORCH_CHECK(query.dim() == 4, "decodekit: query must be [B, Q, H_q, D]");
  return at::empty(query.sizes(), query.options().dtype(at::kFloat));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> chain_speculative_sampling_meta(
    const std::optional<at::Tensor>&, const at::Tensor& draft_token_ids, const at::Tensor& target_probs,
    const std::optional<at::Tensor>&, int64_t, const std::optional<at::Tensor>&, int64_t, int64_t) {
  require_meta(target_probs, "target_probs");
  TORCH_CHECK(draft_token_ids.dim() == 2, "decodekit: draft_token_ids must be [B, K]");
  const int64_t B = draft_token_ids.size(0), K = draft_token_ids.size(1);
  const auto opts = target_probs.options().dtype(at::kLong);
  return {at::empty({B, K + 1}, opts), at::empty({B}, opts), at::empty({B}, opts)};
}

at::Tensor rms_norm_meta(const at::Tensor& x, const at::Tensor&, double) {
  require_meta(x, "x");
  return at::empty(x.sizes(), x.options());
}

at::Tensor silu_and_mul_meta(const at::Tensor& x) {
  require_meta(x, "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, "decodekit: silu_and_mul wants x [..., 2 * I]");
  auto sizes = x.sizes().vec();
  sizes.back() /= 2;
  return at::empty(sizes, x.options());
}

void rope_inplace_meta(const at::Tensor& x, int64_t, const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  require_meta(x, "x");
}

at::Tensor linear_meta(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>&) {
  require_meta(x, "x");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "decodekit: linear shape mismatch");
  return at::empty({x.size(0), weight.size(0)}, x.options());
}

}  // namespace

// ------------------------------------------------------------- schemas ----
TORCH_LIBRARY(decodekit, m) {
  m.def("softmax(Tensor logits, Tensor? temperature, float temperature_val, int vocab_size, "
        "bool deterministic) -> Tensor");
  m.def("argmax(Tensor logits, int vocab_size) -> (Tensor, Tensor)");
  m.def("sample_from_logits(Tensor logits, Tensor? temperature, float temperature_val, "
        "Tensor? top_k, int top_k_val, Tensor? top_p, float top_p_val, Tensor? min_p, float min_p_val, "
        "Tensor? seed, int seed_val, Tensor? offset, int offset_val, int vocab_size, "
        "bool deterministic, bool return_logprobs, int top_logprobs, bool raw_logprobs) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("sample_from_probs(Tensor probs, Tensor? top_k, int top_k_val, Tensor? top_p, float top_p_val, "
        "Tensor? min_p, float min_p_val, Tensor? seed, int seed_val, Tensor? offset, int offset_val, "
        "int vocab_size, bool deterministic, bool return_logprobs, int top_logprobs, bool raw_logprobs) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("filter_probs(Tensor probs, Tensor? top_k, int top_k_val, Tensor? top_p, float top_p_val, "
        "Tensor? min_p, float min_p_val, int vocab_size) -> (Tensor, Tensor)");
  m.def("top_k_mask_logits(Tensor logits, Tensor? top_k, int top_k_val, int vocab_size) -> (Tensor, Tensor)");
  m.def("apply_penalties(Tensor logits, Tensor? repetition_penalty, float repetition_val, "
        "Tensor? frequency_penalty, float frequency_val, Tensor? presence_penalty, float presence_val, "
        "Tensor? token_ids, Tensor? token_counts, Tensor? logit_bias, Tensor? bias_ids, Tensor? bias_values, "
        "Tensor? mask, bool mask_allows, int vocab_size) -> Tensor");
  // KV cache: write new keys/values into the caches in place.
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("check_probability_rows(Tensor probs, int vocab_size, bool need_mass) -> int");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("rope_(Tensor(a!) x, int num_heads, Tensor cos_table, Tensor sin_table, Tensor positions) -> ()");
  m.def("chain_speculative_sampling(Tensor? draft_probs, Tensor draft_token_ids, Tensor target_probs, Tensor? seed, "
        "int seed_val, Tensor? offset, int offset_val, int vocab_size) -> (Tensor, Tensor, Tensor)");
  m.def("paged_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
        "float scale, str kv_layout) -> Tensor");
  m.def("append_kv_cache(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor key, Tensor value, Tensor seq_lens, "
        "str kv_layout) -> ()");
  m.def("append_paged_kv_cache(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor key, Tensor value, "
        "Tensor slot_mapping, str kv_layout) -> ()");
}

TORCH_LIBRARY_IMPL(decodekit, CPU, m) {
  m.impl("softmax", &softmax_cpu);
  m.impl("argmax", &argmax_cpu);
  m.impl("sample_from_logits", &sample_from_logits_cpu);
  m.impl("sample_from_probs", &sample_from_probs_cpu);
  m.impl("filter_probs", &filter_probs_cpu);
  m.impl("top_k_mask_logits", &top_k_mask_logits_cpu);
  m.impl("apply_penalties", &apply_penalties_cpu);
  m.impl("linear", &linear_cpu);
  m.impl("check_probability_rows", &check_probability_rows_cpu);
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("silu_and_mul", &silu_and_mul_cpu);
  m.impl("rope_", &rope_inplace_cpu);
  m.impl("chain_speculative_sampling", &chain_speculative_sampling_cpu);
  m.impl("paged_attention", &paged_attention_cpu);
  m.impl("append_kv_cache", &append_kv_cache_cpu);
  m.impl("append_paged_kv_cache", &append_paged_kv_cache_cpu);
}

TORCH_LIBRARY_IMPL(decodekit, Meta, m) {
  m.impl("softmax", &softmax_meta);
  m.impl("argmax", &argmax_meta);
  m.impl("sample_from_logits", &sample_from_logits_meta);
  m.impl("sample_from_probs", &sample_from_probs_meta);
  m.impl("filter_probs", &filter_probs_meta);
  m.impl("top_k_mask_logits", &top_k_mask_logits_meta);
  m.impl("apply_penalties", &apply_penalties_meta);
  m.impl("linear", &linear_meta);
  m.impl("rms_norm", &rms_norm_meta);
  m.impl("silu_and_mul", &silu_and_mul_meta);
  m.impl("rope_", &rope_inplace_meta);
  m.impl("chain_speculative_sampling", &chain_speculative_sampling_meta);
  m.impl("paged_attention", &paged_attention_meta);
  m.impl("append_kv_cache", &append_kv_cache_meta);
  m.impl("append_paged_kv_cache", &append_paged_kv_cache_meta);
}

namespace {
// ------------------------------------------- sample_from_logits fast path ----
// decodekit.sample_from_logits runs once per decode step, usually right after a
// model forward has evicted the interpreter's and the dispatcher's code and data
// from the caches; calling the op through torch.ops then costs tens of
// microseconds before the kernel starts. For the common call (a plain CPU
// tensor, parameters that are plain numbers or CPU tensors of the kernel's
// dtypes, no extras) this entry checks the arguments and calls the CPU kernel
// directly, with one output allocation.
// It returns the ids, or None whenever anything is unusual (a tensor subclass,
// another device, requires_grad, a torch function or dispatch mode, a
// parameter out of range, a failed check, an invalid row): the Python wrapper
// then takes its full path, which raises the precise error.

// A tensor the fast entries may read through data_ptr(): dense CPU storage and no
// dispatch key beyond autograd's and autocast's (no functionalization, vmap
// batching, negative or conjugate bit, zero tensor, ...).
bool plain_cpu_tensor(const at::Tensor& t) {
  static const c10::DispatchKeySet allowed({c10::DispatchKey::CPU, c10::DispatchKey::ADInplaceOrView,
                                            c10::DispatchKey::AutogradCPU, c10::DispatchKey::AutocastCPU});
  const c10::DispatchKeySet ks = t.key_set();
  return ks.has(c10::DispatchKey::CPU) && allowed.isSupersetOf(ks) && t.layout() == at::kStrided && !t.is_neg() &&
         !t.is_conj() && storage_holds(t);
}

// One parameter of the fast entry: a plain Python int (not bool), a float
// unless `integer`, or an exact CPU tensor of `dtype` with B contiguous values.
// False: the caller takes the full path.
template <typename T>
bool fast_param(PyObject* o, bool integer, at::ScalarType dtype, int64_t B, dk::cpu::RowParam<T>& out,
                double* value = nullptr) {
  if (PyLong_CheckExact(o)) {
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow || (v == -1 && PyErr_Occurred())) {
      PyErr_Clear();
      return false;
    }
    out.scalar = static_cast<T>(v);
    if (value) *value = static_cast<double>(v);
    return true;
  }
  if (!integer && PyFloat_CheckExact(o)) {
    const double d = PyFloat_AS_DOUBLE(o);
    out.scalar = static_cast<T>(d);
    if (value) *value = d;
    return true;
  }
  if (THPVariable_CheckExact(o)) {
    const at::Tensor& t = THPVariable_Unpack(o);
    if (!plain_cpu_tensor(t) || t.scalar_type() != dtype || t.dim() != 1 || t.size(0) != B || !t.is_contiguous())
      return false;
    out.values = static_cast<const T*>(t.data_ptr());
    if (value) *value = std::numeric_limits<double>::quiet_NaN();  // no scalar range check
    return true;
  }
  return false;
}

// The logits of a fast entry: an exact, plain CPU tensor [B >= 1, V] of a
// kernel dtype with contiguous rows, no torch function or dispatch mode
// active, and deterministic a bool. False: the caller takes the full path.
bool fast_logits(pybind11::handle logits_obj, pybind11::handle deterministic, dk::cpu::LogitsView* view) {
  if (!THPVariable_CheckExact(logits_obj.ptr())) return false;
  if (deterministic.ptr() != Py_True && deterministic.ptr() != Py_False) return false;
  if (at::impl::PythonTorchFunctionTLS::stack_len() > 0 || c10::impl::TorchDispatchModeTLS::any_modes_set() ||
      c10::impl::tls_local_dispatch_key_set().included_.has_any(c10::DispatchKeySet(
          {c10::DispatchKey::FuncTorchDynamicLayerFrontMode, c10::DispatchKey::FuncTorchDynamicLayerBackMode})))
    return false;  // a torch.func transform is active
  const at::Tensor& logits = THPVariable_Unpack(logits_obj.ptr());
  if (!plain_cpu_tensor(logits) || logits.requires_grad() || logits.dim() != 2) return false;
  const int64_t B = logits.size(0), V = logits.size(1);
  dk::cpu::ScalarKind kind;
  if (!kind_of(logits.scalar_type(), &kind)) return false;
  if (B == 0 || V == 0 || V >= (int64_t{1} << 31) || (logits.stride(1) != 1 && V != 1)) return false;
  *view = dk::cpu::LogitsView{logits.data_ptr(), kind, B, V, logits.stride(0), V};
  return true;
}

constexpr double kFastFltMax = 3.4028234663852886e38, kFastTiny = 1.1754943508222875e-38;

// A plain-number temperature the full path would take as it is.
bool fast_temperature_ok(double t) { return t >= 0.0 && t <= kFastFltMax && !(t > 0.0 && t < kFastTiny); }

pybind11::object sample_from_logits_fast(pybind11::handle logits_obj, pybind11::handle temperature,
                                         pybind11::handle top_k, pybind11::handle top_p, pybind11::handle min_p,
                                         pybind11::handle seed, pybind11::handle offset,
                                         pybind11::handle deterministic) {
  dk::cpu::LogitsView view;
  if (!fast_logits(logits_obj, deterministic, &view)) return pybind11::none();
  const int64_t B = view.batch;
  dk::cpu::SamplingParams prm;
  double t = 0.0, p = 0.0, m = 0.0, o = 0.0;
  {
    // Parameters become float32 here: convert them with IEEE denormals whatever the caller set.
    const dk::cpu::IeeeDenormals ieee;
    if (!fast_param(temperature.ptr(), false, at::kFloat, B, prm.temperature, &t) ||
        !fast_param(top_k.ptr(), true, at::kLong, B, prm.top_k) ||
        !fast_param(top_p.ptr(), false, at::kDouble, B, prm.top_p, &p) ||
        !fast_param(min_p.ptr(), false, at::kFloat, B, prm.min_p, &m) ||
        !fast_param(seed.ptr(), true, at::kLong, B, prm.seed) ||
        !fast_param(offset.ptr(), true, at::kLong, B, prm.offset, &o))
      return pybind11::none();
  }
  // Plain numbers are range-checked here (the kernel sees them rounded to float32;
  // tensor values out of range make their rows invalid, and so the full path).
  if (!prm.temperature.values && !fast_temperature_ok(t)) return pybind11::none();
  if (!prm.top_p.values && !(p >= 0.0 && p <= 1.0)) return pybind11::none();
  if (!prm.min_p.values && !(m >= 0.0 && m <= 1.0)) return pybind11::none();
  if (!prm.offset.values && o < 0.0) return pybind11::none();
  if (prm.offset.values)
    for (int64_t i = 0; i < B; ++i)
      if (prm.offset.values[i] < 0) return pybind11::none();
  const bool det = deterministic.ptr() == Py_True;
  at::Tensor ids;
  bool all_valid = true;
  {
    pybind11::gil_scoped_release no_gil;
    try {
      ids = at::detail::empty_cpu({B}, at::kLong);
      bool valid_small[64];
      std::unique_ptr<bool[]> valid_big(B > 64 ? new bool[B] : nullptr);
      bool* valid = B > 64 ? valid_big.get() : valid_small;
      dk::cpu::sample_from_logits(view, prm, dk::cpu::LogprobRequest{}, det, at::get_num_threads(),
                                  ids.data_ptr<int64_t>(), valid);
      for (int64_t i = 0; i < B; ++i) all_valid = all_valid && valid[i];
    } catch (const std::exception&) {
      all_valid = false;
    }
  }
  if (!all_valid) return pybind11::none();
  return pybind11::reinterpret_steal<pybind11::object>(THPVariable_Wrap(std::move(ids)));
}

// decodekit.softmax(logits, temperature) in the same way: the probabilities,
// or None (then the full path runs, and raises for invalid rows).
pybind11::object softmax_fast(pybind11::handle logits_obj, pybind11::handle temperature,
                              pybind11::handle deterministic) {
  dk::cpu::LogitsView view;
  if (!fast_logits(logits_obj, deterministic, &view)) return pybind11::none();
  dk::cpu::RowParam<float> temp;
  double t = 0.0;
  {
    const dk::cpu::IeeeDenormals ieee;
    if (!fast_param(temperature.ptr(), false, at::kFloat, view.batch, temp, &t)) return pybind11::none();
  }
  if (!temp.values && !fast_temperature_ok(t)) return pybind11::none();
  const bool det = deterministic.ptr() == Py_True;
  at::Tensor probs;
  bool all_valid = true;
  {
    pybind11::gil_scoped_release no_gil;
    try {
      probs = at::detail::empty_cpu({view.batch, view.vocab}, at::kFloat);
      float* out = probs.data_ptr<float>();
      dk::cpu::softmax(view, temp, det, at::get_num_threads(), out);
      for (int64_t b = 0; b < view.batch; ++b) all_valid = all_valid && !std::isnan(out[b * view.vocab]);
    } catch (const std::exception&) {
      all_valid = false;
    }
  }
  if (!all_valid) return pybind11::none();
  return pybind11::reinterpret_steal<pybind11::object>(THPVariable_Wrap(std::move(probs)));
}

}  // namespace

// ------------------------------------------------------ Python module ----
// Importing decodekit._C runs the registrations above; the module itself only
// reports what it was built with.
PYBIND11_MODULE(_C, mod) {
  mod.doc() = "decodekit compiled ops (registered under torch.ops.decodekit)";
  mod.attr("built_with_torch") = DK_TORCH_VERSION;
  // The Philox header as compiled into the kernels, for known-answer tests.
  mod.def(
      "philox4x32_10",
      [](uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
        const auto r = dk::philox4x32_10(c0, c1, c2, c3, k0, k1);
        return pybind11::make_tuple(r.v[0], r.v[1], r.v[2], r.v[3]);
      },
      "One Philox4x32-10 block: (counter c0..c3, key k0, k1) -> 4 x uint32.");
  mod.def(
      "philox_uniform_double",
      [](uint64_t seed, uint64_t offset, uint32_t stream, uint64_t i) {
        return dk::PhiloxStreamRef{seed, offset, stream}.uniform_double(i);
      },
      "The float64 uniform number i of stream (seed, offset, stream), as the kernels draw it.");
  mod.def("_sample_from_logits_fast", &sample_from_logits_fast,
          "decodekit.sample_from_logits for plain arguments, or None for the full path.");
  mod.def("_softmax_fast", &softmax_fast, "decodekit.softmax for plain arguments, or None for the full path.");
  mod.def("cpu_isa", &dk::cpu::active_isa,
          "The instruction set the CPU kernels run with: avx512, avx2 or baseline (all give the same bits).");
#ifdef DK_WITH_CUDA
  mod.attr("has_cuda_ops") = true;
#else
  mod.attr("has_cuda_ops") = false;
#endif
}
