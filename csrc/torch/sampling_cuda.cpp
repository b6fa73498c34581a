// CUDA registrations of the sampling family: check tensors, pass raw device
// pointers and the current stream to the framework-free kernels of
// csrc/cuda/sampling.cu. No host synchronisation (CUDA-graph capturable).
//
// Includes no c10/cuda header: the stream comes through the device guard
// interface, so this file also compiles against the CPU torch wheel (CI
// compiles it with warnings as errors; it is linked only into CUDA builds).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <cstdlib>
#include <optional>
#include <tuple>

#include "cuda/sampling.h"
#include "torch/cuda_common.h"

namespace dk = decodekit;
using namespace decodekit::torch_ops;

namespace {

dk::LogitsView cuda_logits_view(const at::Tensor& logits, int64_t vocab_size) {
  check_logits(logits, vocab_size);
  check_cuda_batch(logits);
  return logits_view(logits, vocab_size);
}

dk::ProbsView cuda_probs_view(const at::Tensor& probs, int64_t vocab_size) {
  check_probs(probs, vocab_size);
  check_cuda_batch(probs);
  return probs_view(probs, vocab_size);
}

LogprobTensors cuda_logprob_outputs(const at::Tensor& like, bool return_logprobs, int64_t top_logprobs, bool raw,
                                    int64_t vocab_size) {
  TORCH_CHECK(top_logprobs <= vocab_size, "decodekit: top_logprobs must be <= vocab_size=", vocab_size);
  TORCH_CHECK(top_logprobs <= dk::cuda::kMaxTopLogprobs,
              "decodekit: top_logprobs must be <= ", dk::cuda::kMaxTopLogprobs, " on CUDA, got ", top_logprobs);
  return logprob_outputs(like, return_logprobs, top_logprobs, raw);
}

// temperature, top_k, top_p, min_p on the logits' device (seed and offset left unset).
dk::SamplingParams chain_params(const at::Tensor& logits, const std::optional<at::Tensor>& temperature,
                                double temperature_val, const std::optional<at::Tensor>& top_k, int64_t top_k_val,
                                const std::optional<at::Tensor>& top_p, double top_p_val,
                                const std::optional<at::Tensor>& min_p, double min_p_val) {
  dk::SamplingParams prm;
  prm.temperature =
      device_row_param<float>(temperature, static_cast<float>(temperature_val), at::kFloat, logits, "temperature");
  const dk::FilterParams fp = filter_params(logits, top_k, top_k_val, top_p, top_p_val, min_p, min_p_val);
  prm.top_k = fp.top_k;
  prm.top_p = fp.top_p;
  prm.min_p = fp.min_p;
  return prm;
}

at::Tensor softmax_cuda(const at::Tensor& logits, const std::optional<at::Tensor>& temperature, double temperature_val,
                        int64_t vocab_size, bool /*deterministic*/) {
  const c10::DeviceGuard guard(logits.device());
  const auto view = cuda_logits_view(logits, vocab_size);
  const auto temp =
      device_row_param<float>(temperature, static_cast<float>(temperature_val), at::kFloat, logits, "temperature");
  auto probs = at::empty({logits.size(0), logits.size(1)}, logits.options().dtype(at::kFloat));
  check_ok(dk::cuda::softmax(view, temp, probs.data_ptr<float>(), current_stream(logits.device())), "softmax");
  return probs;
}

std::tuple<at::Tensor, at::Tensor> argmax_cuda(const at::Tensor& logits, int64_t vocab_size) {
  const c10::DeviceGuard guard(logits.device());
  const auto view = cuda_logits_view(logits, vocab_size);
  auto ids = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  auto valid = at::empty({logits.size(0)}, logits.options().dtype(at::kBool));
  check_ok(dk::cuda::argmax(view, ids.data_ptr<int64_t>(), valid.data_ptr<bool>(), current_stream(logits.device())),
           "argmax");
  return {ids, valid};
}

SampleResult sample_from_logits_cuda(const at::Tensor& logits, const std::optional<at::Tensor>& temperature,
                                     double temperature_val, const std::optional<at::Tensor>& top_k, int64_t top_k_val,
                                     const std::optional<at::Tensor>& top_p, double top_p_val,
                                     const std::optional<at::Tensor>& min_p, double min_p_val,
                                     const std::optional<at::Tensor>& seed, int64_t seed_val,
                                     const std::optional<at::Tensor>& offset, int64_t offset_val, int64_t vocab_size,
                                     bool /*deterministic*/, bool return_logprobs, int64_t top_logprobs,
                                     bool raw_logprobs) {
  const c10::DeviceGuard guard(logits.device());
  const auto view = cuda_logits_view(logits, vocab_size);
  dk::SamplingParams prm =
      chain_params(logits, temperature, temperature_val, top_k, top_k_val, top_p, top_p_val, min_p, min_p_val);
  prm.seed = device_row_param<int64_t>(seed, seed_val, at::kLong, logits, "seed");
  prm.offset = device_row_param<int64_t>(offset, offset_val, at::kLong, logits, "offset");
  auto lp = cuda_logprob_outputs(logits, return_logprobs, top_logprobs, raw_logprobs, vocab_size);
  auto ids = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  auto valid = at::empty({logits.size(0)}, logits.options().dtype(at::kBool));
  // DECODEKIT_CUDA_CLUSTER=0 turns the cluster fast path off (the same ids either way).
  const char* env = std::getenv("DECODEKIT_CUDA_CLUSTER");
  const bool cluster = !(env && env[0] == '0');
  at::Tensor scratch;
  if (cluster && logits.size(0) > 0) scratch = at::empty({logits.size(0)}, logits.options().dtype(at::kByte));
  check_ok(dk::cuda::sample_from_logits(view, prm, lp.request, ids.data_ptr<int64_t>(), valid.data_ptr<bool>(),
                                        scratch.defined() ? scratch.data_ptr<uint8_t>() : nullptr,
                                        current_stream(logits.device())),
           "sample_from_logits");
  return {ids, valid, lp.logprobs, lp.top_ids, lp.top_logprobs};
}

SampleResult sample_from_probs_cuda(const at::Tensor& probs, const std::optional<at::Tensor>& top_k, int64_t top_k_val,
                                    const std::optional<at::Tensor>& top_p, double top_p_val,
                                    const std::optional<at::Tensor>& min_p, double min_p_val,
                                    const std::optional<at::Tensor>& seed, int64_t seed_val,
                                    const std::optional<at::Tensor>& offset, int64_t offset_val, int64_t vocab_size,
                                    bool /*deterministic*/, bool return_logprobs, int64_t top_logprobs,
                                    bool raw_logprobs) {
  const c10::DeviceGuard guard(probs.device());
  const auto view = cuda_probs_view(probs, vocab_size);
  const auto fp = filter_params(probs, top_k, top_k_val, top_p, top_p_val, min_p, min_p_val);
  const auto s = device_row_param<int64_t>(seed, seed_val, at::kLong, probs, "seed");
  const auto o = device_row_param<int64_t>(offset, offset_val, at::kLong, probs, "offset");
  auto lp = cuda_logprob_outputs(probs, return_logprobs, top_logprobs, raw_logprobs, vocab_size);
  auto ids = at::empty({probs.size(0)}, probs.options().dtype(at::kLong));
  auto valid = at::empty({probs.size(0)}, probs.options().dtype(at::kBool));
  check_ok(dk::cuda::sample_from_probs(view, fp, s, o, lp.request, ids.data_ptr<int64_t>(), valid.data_ptr<bool>(),
                                       current_stream(probs.device())),
           "sample_from_probs");
  return {ids, valid, lp.logprobs, lp.top_ids, lp.top_logprobs};
}

std::tuple<at::Tensor, at::Tensor> filter_probs_cuda(const at::Tensor& probs, const std::optional<at::Tensor>& top_k,
                                                     int64_t top_k_val, const std::optional<at::Tensor>& top_p,
                                                     double top_p_val, const std::optional<at::Tensor>& min_p,
                                                     double min_p_val, int64_t vocab_size) {
  const c10::DeviceGuard guard(probs.device());
  const auto view = cuda_probs_view(probs, vocab_size);
  const auto fp = filter_params(probs, top_k, top_k_val, top_p, top_p_val, min_p, min_p_val);
  auto out = at::empty({probs.size(0), probs.size(1)}, probs.options());
  auto valid = at::empty({probs.size(0)}, probs.options().dtype(at::kBool));
  check_ok(
      dk::cuda::filter_probs(view, fp, out.data_ptr<float>(), valid.data_ptr<bool>(), current_stream(probs.device())),
      "filter_probs");
  return {out, valid};
}

std::tuple<at::Tensor, at::Tensor> processed_probs_cuda(const at::Tensor& logits,
                                                        const std::optional<at::Tensor>& temperature,
                                                        double temperature_val, const std::optional<at::Tensor>& top_k,
                                                        int64_t top_k_val, const std::optional<at::Tensor>& top_p,
                                                        double top_p_val, const std::optional<at::Tensor>& min_p,
                                                        double min_p_val, int64_t vocab_size, bool /*deterministic*/) {
  const c10::DeviceGuard guard(logits.device());
  const auto view = cuda_logits_view(logits, vocab_size);
  dk::SamplingParams prm =
      chain_params(logits, temperature, temperature_val, top_k, top_k_val, top_p, top_p_val, min_p, min_p_val);
  auto probs = at::empty({logits.size(0), logits.size(1)}, logits.options().dtype(at::kFloat));
  auto valid = at::empty({logits.size(0)}, logits.options().dtype(at::kBool));
  check_ok(dk::cuda::processed_probs(view, prm, probs.data_ptr<float>(), valid.data_ptr<bool>(),
                                     current_stream(logits.device())),
           "processed_probs");
  return {probs, valid};
}

std::tuple<at::Tensor, at::Tensor> top_k_mask_logits_cuda(const at::Tensor& logits,
                                                          const std::optional<at::Tensor>& top_k, int64_t top_k_val,
                                                          int64_t vocab_size) {
  const c10::DeviceGuard guard(logits.device());
  const auto view = cuda_logits_view(logits, vocab_size);
  const auto k = device_row_param<int64_t>(top_k, top_k_val, at::kLong, logits, "top_k");
  auto out = at::empty({logits.size(0), logits.size(1)}, logits.options());
  auto valid = at::empty({logits.size(0)}, logits.options().dtype(at::kBool));
  check_ok(
      dk::cuda::top_k_mask_logits(view, k, out.data_ptr(), valid.data_ptr<bool>(), current_stream(logits.device())),
      "top_k_mask_logits");
  return {out, valid};
}

}  // namespace

TORCH_LIBRARY_IMPL(decodekit, CUDA, m) {
  m.impl("softmax", &softmax_cuda);
  m.impl("argmax", &argmax_cuda);
  m.impl("sample_from_logits", &sample_from_logits_cuda);
  m.impl("sample_from_probs", &sample_from_probs_cuda);
  m.impl("filter_probs", &filter_probs_cuda);
  m.impl("top_k_mask_logits", &top_k_mask_logits_cuda);
  m.impl("processed_probs", &processed_probs_cuda);
}
