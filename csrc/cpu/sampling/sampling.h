// CPU kernels of the sampling family: softmax with temperature, argmax and the
// fused sampler (temperature -> top-k -> top-p -> min-p -> inverse-CDF draw).
//
// Framework-free: raw pointers, sizes and strides in, results out. The torch
// binding layer (csrc/torch/) validates tensors and calls these.
#pragma once

#include <cstdint>

#include "decodekit/types.h"

namespace decodekit {
namespace cpu {

// The views and parameter structs are shared with the CUDA kernels.
using decodekit::FilterParams;
using decodekit::LogitsView;
using decodekit::LogprobRequest;
using decodekit::ProbsView;
using decodekit::RowParam;
using decodekit::SamplingParams;
using decodekit::ScalarKind;

// Each kernel is a function type here; every instruction-set build defines one
// function of that type per kernel (namespace DK_ISA) and the kernel table
// (cpu/common/isa.h) holds pointers to them: call cpu::kernels().softmax(...).

// probs[b, :] = softmax(logits[b, :vocab_size] / T_b), 0 in padding columns.
// T_b == 0 gives one-hot at the argmax. Rows that cannot be normalised (a NaN,
// no finite logit, or +inf with T > 0) are all NaN.
using SoftmaxKernel = void(const LogitsView& logits, RowParam<float> temperature, bool deterministic, int num_threads,
                           float* probs /* [B, V] contiguous */);

// ids[b] = lowest index of the maximum of logits[b, :vocab_size]; valid[b] is
// false (and ids[b] == -1) for rows with a NaN or with every entry -inf.
using ArgmaxKernel = void(const LogitsView& logits, int num_threads, int64_t* ids, bool* valid);

// The fused sampler. ids[b] in [0, vocab_size) for valid rows, -1 otherwise.
// With lp active, also the logprobs of the processed distribution (after
// temperature and filters, renormalised; a greedy row is one-hot: 0 / -inf)
// or, with lp.raw, of log_softmax(logits).
using SampleFromLogitsKernel = void(const LogitsView& logits, const SamplingParams& params, const LogprobRequest& lp,
                                    bool deterministic, int num_threads, int64_t* ids, bool* valid);

// Samples from probability rows after top-k -> top-p -> min-p (ranked by
// probability). Rows with a NaN, negative or infinite entry, or no positive
// entry, are invalid (-1).
using SampleFromProbsKernel = void(const ProbsView& probs, const FilterParams& params, RowParam<int64_t> seed,
                                   RowParam<int64_t> offset, const LogprobRequest& lp, bool deterministic,
                                   int num_threads, int64_t* ids, bool* valid);

// out = the filtered, renormalised probabilities [B, V] (0 in padding; a row
// from which no positive entry is removed is copied bit for bit; invalid rows NaN).
using FilterProbsKernel = void(const ProbsView& probs, const FilterParams& params, int num_threads, float* out,
                               bool* valid);

// out (same dtype as logits, [B, V] contiguous) = logits with every entry
// outside the row's top-k (lowest index wins ties) set to -inf. Rows with a
// NaN are copied and marked invalid.
using TopKMaskLogitsKernel = void(const LogitsView& logits, RowParam<int64_t> top_k, int num_threads, void* out,
                                  bool* valid);

// probs[b, :] (float32 [B, V] contiguous) = the distribution sample_from_logits
// draws row b from: temperature -> top-k -> top-p (the float64 rule) -> min-p,
// the kernel's own kept set, each kept weight exp((x - max) / T) divided by
// the kept set's float64 total, 0 elsewhere and in padding. A greedy row
// (T == 0, top_k == 1, top_p == 0) is one-hot at the argmax. Invalid rows (as
// sample_from_logits: a NaN, no finite logit, +inf with T > 0, a parameter
// out of range) are all NaN with valid[b] false. params.seed / offset are unused.
using ProcessedProbsKernel = void(const LogitsView& logits, const SamplingParams& params, bool deterministic,
                                  int num_threads, float* probs, bool* valid);

}  // namespace cpu
}  // namespace decodekit
