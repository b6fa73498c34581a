// CPU kernels of the penalties family (see penalties.h). Compiled once per
// instruction set like sampling.cpp; every row is independent and processed by
// one thread, so the result never depends on the batch or the thread count.
//
// Sources: repetition penalty of CTRL (Keskar et al., 2019) as in HF
// transformers' RepetitionPenaltyLogitsProcessor; frequency and presence
// penalties as in the OpenAI API and vLLM.
#include "penalties.h"
#include "cpu/common/isa.h"
#include "cpu/common/parallel.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "decodekit/math.h"
#include "cpu/common/vec.h"

namespace decodekit {
namespace cpu {
namespace DK_ISA {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

struct IdCount {
  int64_t id;
  int64_t count;
};

std::vector<IdCount>& thread_counts() {
  thread_local std::vector<IdCount> v;
  return v;
}

DK_HOST_DEVICE float penalize(float x, float r, float f, float p, int64_t count) {
  if (r != 1.0f) x = x > 0.0f ? x / r : x * r;
  x -= f * static_cast<float>(count);
  x -= p;
  return x;
}

void penalize_row(const LogitsView& lv, const PenaltyInputs& in, int64_t b, float* o) {
  const int64_t V = lv.vocab_size;
  // 1. Load as float32, add the dense bias.
  if (lv.kind == ScalarKind::kFloat32) {
    std::memcpy(o, static_cast<const float*>(lv.data) + b * lv.row_stride, static_cast<size_t>(V) * sizeof(float));
  } else {
    const uint16_t* r = static_cast<const uint16_t*>(lv.data) + b * lv.row_stride;
    if (lv.kind == ScalarKind::kFloat16)
      for (int64_t i = 0; i < V; ++i) o[i] = half_bits_to_float(r[i]);
    else
      for (int64_t i = 0; i < V; ++i) o[i] = bf16_bits_to_float(r[i]);
  }
  std::fill(o + V, o + lv.vocab, -kInf);
  if (in.bias_dense) {
    const float* bias = in.bias_dense + b * lv.vocab;
    for (int64_t i = 0; i < V; ++i) o[i] += bias[i];
  }
  // 2. Sparse bias.
  if (in.bias_ids) {
    for (int64_t j = 0; j < in.bias_len; ++j) {
      const int64_t id = in.bias_ids[b * in.bias_len + j];
      if (id >= 0 && id < V) o[id] += in.bias_values[b * in.bias_len + j];
    }
  }
  // 3. Penalties on the counted tokens.
  const float r = in.repetition.at(b), f = in.frequency.at(b), p = in.presence.at(b);
  const bool any_penalty = r != 1.0f || f != 0.0f || p != 0.0f;
  if (any_penalty && in.token_counts) {
    const int64_t* counts = in.token_counts + b * lv.vocab;
    for (int64_t i = 0; i < V; ++i)
      if (counts[i] > 0) o[i] = penalize(o[i], r, f, p, counts[i]);
  } else if (any_penalty && in.token_ids) {
    std::vector<IdCount>& ids = thread_counts();
    ids.clear();
    for (int64_t j = 0; j < in.token_ids_len; ++j) {
      const int64_t id = in.token_ids[b * in.token_ids_len + j];
      if (id >= 0 && id < V) ids.push_back(IdCount{id, 1});
    }
    std::sort(ids.begin(), ids.end(), [](const IdCount& a, const IdCount& c) { return a.id < c.id; });
    for (size_t j = 0; j < ids.size();) {
      size_t e = j;
      while (e < ids.size() && ids[e].id == ids[j].id) ++e;
      o[ids[j].id] = penalize(o[ids[j].id], r, f, p, static_cast<int64_t>(e - j));
      j = e;
    }
  }
  // 4. Mask.
  if (in.mask) {
    const bool* m = in.mask + b * lv.vocab;
    if (in.mask_allows) {
      for (int64_t i = 0; i < V; ++i)
        if (!m[i]) o[i] = -kInf;
    } else {
      for (int64_t i = 0; i < V; ++i)
        if (m[i]) o[i] = -kInf;
    }
  }
}

}  // namespace

void apply_penalties(const LogitsView& lv, const PenaltyInputs& in, int num_threads, float* out) {
  const int nt = threads_for(lv.batch, num_threads);
  parallel_rows(lv.batch, nt, Schedule::kStatic, [&](int64_t b) { penalize_row(lv, in, b, out + b * lv.vocab); });
}

}  // namespace DK_ISA
}  // namespace cpu
}  // namespace decodekit
