// Torch bindings of the sampling family: softmax, argmax, sample_from_logits,
// sample_from_probs, filter_probs, top_k_mask_logits, processed_probs (CPU and
// Meta kernels side by side; the schemas are in schemas.cpp).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "cpu/common/fpenv.h"
#include "cpu/common/isa.h"
#include "torch/checks.h"
#include "torch/threads.h"

namespace dk = decodekit;
using namespace decodekit::torch_ops;

namespace {
// ------------------------------------------------------------ CPU ops ----
at::Tensor softmax_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& temperature, double temperature_val,
                       int64_t vocab_size, bool deterministic) {
  // Parameters become float32 here: convert them with IEEE denormals whatever the caller set.
  const dk::cpu::IeeeDenormals ieee;
  check_logits(logits, vocab_size);
  check_same_device(logits, temperature, "temperature");
  const int64_t B = logits.size(0);
  auto probs = at::empty({B, logits.size(1)}, logits.options().dtype(at::kFloat));
  const auto temp = row_param<float>(temperature, static_cast<float>(temperature_val), at::kFloat, B, "temperature");
  dk::cpu::kernels().softmax(logits_view(logits, vocab_size), temp, deterministic, dk::torch_ops::num_threads(),
                             probs.data_ptr<float>());
  return probs;
}

std::tuple<at::Tensor, at::Tensor> argmax_cpu(const at::Tensor& logits, int64_t vocab_size) {
  check_logits(logits, vocab_size);
  const int64_t B = logits.size(0);
  auto ids = at::empty({B}, logits.options().dtype(at::kLong));
  auto valid = at::empty({B}, logits.options().dtype(at::kBool));
  dk::cpu::kernels().argmax(logits_view(logits, vocab_size), dk::torch_ops::num_threads(), ids.data_ptr<int64_t>(),
                            valid.data_ptr<bool>());
  return {ids, valid};
}

SampleResult sample_from_logits_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& temperature,
                                    double temperature_val, const std::optional<at::Tensor>& top_k, int64_t top_k_val,
                                    const std::optional<at::Tensor>& top_p, double top_p_val,
                                    const std::optional<at::Tensor>& min_p, double min_p_val,
                                    const std::optional<at::Tensor>& seed, int64_t seed_val,
                                    const std::optional<at::Tensor>& offset, int64_t offset_val, int64_t vocab_size,
                                    bool deterministic, bool return_logprobs, int64_t top_logprobs, bool raw_logprobs) {
  // Parameters become float32 here: convert them with IEEE denormals whatever the caller set.
  const dk::cpu::IeeeDenormals ieee;
  check_logits(logits, vocab_size);
  for (auto [t, name] : {std::pair{&temperature, "temperature"},
                         {&top_k, "top_k"},
                         {&top_p, "top_p"},
                         {&min_p, "min_p"},
                         {&seed, "seed"},
                         {&offset, "offset"}})
    check_same_device(logits, *t, name);
  const int64_t B = logits.size(0);
  dk::SamplingParams prm;
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
  dk::cpu::kernels().sample_from_logits(logits_view(logits, vocab_size), prm, lp.request, deterministic,
                                        dk::torch_ops::num_threads(), ids.data_ptr<int64_t>(), valid.data_ptr<bool>());
  return {ids, valid, lp.logprobs, lp.top_ids, lp.top_logprobs};
}

SampleResult sample_from_probs_cpu(const at::Tensor& probs, const std::optional<at::Tensor>& top_k, int64_t top_k_val,
                                   const std::optional<at::Tensor>& top_p, double top_p_val,
                                   const std::optional<at::Tensor>& min_p, double min_p_val,
                                   const std::optional<at::Tensor>& seed, int64_t seed_val,
                                   const std::optional<at::Tensor>& offset, int64_t offset_val, int64_t vocab_size,
                                   bool deterministic, bool return_logprobs, int64_t top_logprobs, bool raw_logprobs) {
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
  dk::cpu::kernels().sample_from_probs(probs_view(probs, vocab_size), fp, s, o, lp.request, deterministic,
                                       dk::torch_ops::num_threads(), ids.data_ptr<int64_t>(), valid.data_ptr<bool>());
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
  dk::cpu::kernels().filter_probs(probs_view(probs, vocab_size), fp, dk::torch_ops::num_threads(),
                                  out.data_ptr<float>(), valid.data_ptr<bool>());
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
  dk::cpu::kernels().top_k_mask_logits(logits_view(logits, vocab_size), k, dk::torch_ops::num_threads(), out.data_ptr(),
                                       valid.data_ptr<bool>());
  return {out, valid};
}

// A [B, N] tensor of the given dtype on the logits' device, or null.

std::tuple<at::Tensor, at::Tensor> processed_probs_cpu(const at::Tensor& logits,
                                                       const std::optional<at::Tensor>& temperature,
                                                       double temperature_val, const std::optional<at::Tensor>& top_k,
                                                       int64_t top_k_val, const std::optional<at::Tensor>& top_p,
                                                       double top_p_val, const std::optional<at::Tensor>& min_p,
                                                       double min_p_val, int64_t vocab_size, bool deterministic) {
  // Parameters become float32 here: convert them with IEEE denormals whatever the caller set.
  const dk::cpu::IeeeDenormals ieee;
  check_logits(logits, vocab_size);
  check_same_device(logits, temperature, "temperature");
  const int64_t B = logits.size(0);
  dk::SamplingParams prm;
  prm.temperature = row_param<float>(temperature, static_cast<float>(temperature_val), at::kFloat, B, "temperature");
  const auto fp = filter_params(logits, top_k, top_k_val, top_p, top_p_val, min_p, min_p_val);
  prm.top_k = fp.top_k;
  prm.top_p = fp.top_p;
  prm.min_p = fp.min_p;
  auto probs = at::empty({B, logits.size(1)}, logits.options().dtype(at::kFloat));
  auto valid = at::empty({B}, logits.options().dtype(at::kBool));
  dk::cpu::kernels().processed_probs(logits_view(logits, vocab_size), prm, deterministic, dk::torch_ops::num_threads(),
                                     probs.data_ptr<float>(), valid.data_ptr<bool>());
  return {probs, valid};
}

// ------------------------------------------------------------- Meta ----
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

std::tuple<at::Tensor, at::Tensor> argmax_meta(const at::Tensor& logits, int64_t) { return ids_and_valid_meta(logits); }

SampleResult sample_meta(const at::Tensor& x, bool return_logprobs, int64_t top_logprobs) {
  auto [ids, valid] = ids_and_valid_meta(x);
  auto lp = logprob_outputs(x, return_logprobs, top_logprobs, false);
  return {ids, valid, lp.logprobs, lp.top_ids, lp.top_logprobs};
}

SampleResult sample_from_logits_meta(const at::Tensor& logits, const std::optional<at::Tensor>&, double,
                                     const std::optional<at::Tensor>&, int64_t, const std::optional<at::Tensor>&,
                                     double, const std::optional<at::Tensor>&, double, const std::optional<at::Tensor>&,
                                     int64_t, const std::optional<at::Tensor>&, int64_t, int64_t, bool,
                                     bool return_logprobs, int64_t top_logprobs, bool) {
  return sample_meta(logits, return_logprobs, top_logprobs);
}

SampleResult sample_from_probs_meta(const at::Tensor& probs, const std::optional<at::Tensor>&, int64_t,
                                    const std::optional<at::Tensor>&, double, const std::optional<at::Tensor>&, double,
                                    const std::optional<at::Tensor>&, int64_t, const std::optional<at::Tensor>&,
                                    int64_t, int64_t, bool, bool return_logprobs, int64_t top_logprobs, bool) {
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

std::tuple<at::Tensor, at::Tensor> processed_probs_meta(const at::Tensor& logits, const std::optional<at::Tensor>&,
                                                        double, const std::optional<at::Tensor>&, int64_t,
                                                        const std::optional<at::Tensor>&, double,
                                                        const std::optional<at::Tensor>&, double, int64_t, bool) {
  require_meta(logits, "logits");
  TORCH_CHECK(logits.dim() == 2, "decodekit: logits must be 2-D [B, V]");
  return {at::empty({logits.size(0), logits.size(1)}, logits.options().dtype(at::kFloat)),
          at::empty({logits.size(0)}, logits.options().dtype(at::kBool))};
}

}  // namespace

TORCH_LIBRARY_IMPL(decodekit, CPU, m) {
  m.impl("softmax", &softmax_cpu);
  m.impl("argmax", &argmax_cpu);
  m.impl("sample_from_logits", &sample_from_logits_cpu);
  m.impl("sample_from_probs", &sample_from_probs_cpu);
  m.impl("filter_probs", &filter_probs_cpu);
  m.impl("top_k_mask_logits", &top_k_mask_logits_cpu);
  m.impl("processed_probs", &processed_probs_cpu);
}

TORCH_LIBRARY_IMPL(decodekit, Meta, m) {
  m.impl("softmax", &softmax_meta);
  m.impl("argmax", &argmax_meta);
  m.impl("sample_from_logits", &sample_from_logits_meta);
  m.impl("sample_from_probs", &sample_from_probs_meta);
  m.impl("filter_probs", &filter_probs_meta);
  m.impl("top_k_mask_logits", &top_k_mask_logits_meta);
  m.impl("processed_probs", &processed_probs_meta);
}
