// Lossless speculative sampling of a draft chain (see speculative.h).
//
// Source: Leviathan, Kalman & Matias, "Fast Inference from Transformers via
// Speculative Decoding" (ICML 2023); Chen et al., "Accelerating Large Language
// Model Decoding with Speculative Sampling" (2023). Draft x at position j is
// accepted with probability min(1, p(x) / q(x)); on rejection the token comes
// from the normalised residual max(0, p - q), so every emitted position has
// exactly the target's distribution. Random numbers are Philox streams keyed
// per row (DESIGN.md): a row's result never depends on the batch.
#include "speculative.h"

#include <algorithm>

#include "decodekit/philox.h"

#ifndef DK_ISA
#define DK_ISA baseline
#endif

namespace decodekit {
namespace cpu {
namespace DK_ISA {
namespace {

// Inverse CDF in ascending index order over weights w(i) >= 0 with one float64
// uniform; returns -1 when the total is 0. Zero-weight tokens are never drawn.
template <class W>
int64_t draw(int64_t n, W&& w, double u) {
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) total += w(i);
  if (!(total > 0.0)) return -1;
  const double target = u * total;
  double cum = 0.0;
  int64_t last = -1;
  for (int64_t i = 0; i < n; ++i) {
    const double wi = w(i);
    if (!(wi > 0.0)) continue;
    last = i;
    cum += wi;
    if (cum > target) return i;
  }
  return last;
}

inline double clean(float x) { return x > 0.0f ? static_cast<double>(x) : 0.0; }

}  // namespace

void chain_speculative_sampling(const float* draft_probs, const int64_t* draft_ids, const float* target_probs,
                                int64_t B, int64_t K, int64_t V, int64_t vocab_size, RowParam<int64_t> seed,
                                RowParam<int64_t> offset, int num_threads, int64_t* out, int64_t* num_accepted,
                                int64_t* num_emitted) {
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, B)));
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t b = 0; b < B; ++b) {
    const uint64_t s = static_cast<uint64_t>(seed.at(b)), o = static_cast<uint64_t>(offset.at(b));
    int64_t* row_out = out + b * (K + 1);
    std::fill(row_out, row_out + K + 1, int64_t{-1});
    const int64_t* d = draft_ids + b * K;
    int64_t n = 0;  // real drafts: the leading ids in [0, vocab_size)
    while (n < K && d[n] >= 0 && d[n] < vocab_size) ++n;
    const PhiloxStreamRef accept{s, o, kStreamSpecAccept};
    int64_t j = 0;
    for (; j < n; ++j) {
      const float* p = target_probs + (b * (K + 1) + j) * V;
      const float* q = draft_probs ? draft_probs + (b * K + j) * V : nullptr;
      const int64_t x = d[j];
      const double px = clean(p[x]);
      const double qx = q ? clean(q[x]) : 1.0;
      if (accept.uniform_double(static_cast<uint64_t>(j)) * qx < px) {
        row_out[j] = x;
        continue;
      }
      const double u = PhiloxStreamRef{s, o, static_cast<uint32_t>(kStreamSpecResidual + j)}.uniform_double(0);
      int64_t t = draw(vocab_size, [&](int64_t i) {
        const double qi = q ? clean(q[i]) : (i == x ? 1.0 : 0.0);
        return std::max(0.0, clean(p[i]) - qi);
      }, u);
      if (t < 0) t = draw(vocab_size, [&](int64_t i) { return clean(p[i]); }, u);
      row_out[j] = t;  // -1 only when the target row has no mass at all
      break;
    }
    if (j == n) {  // every real draft accepted: the bonus token
      const float* p = target_probs + (b * (K + 1) + n) * V;
      const double u = PhiloxStreamRef{s, o, static_cast<uint32_t>(kStreamSpecResidual + n)}.uniform_double(0);
      row_out[n] = draw(vocab_size, [&](int64_t i) { return clean(p[i]); }, u);
      num_accepted[b] = n;
    } else {
      num_accepted[b] = j;
    }
    num_emitted[b] = num_accepted[b] + (row_out[num_accepted[b]] >= 0 ? 1 : 0);
  }
}

}  // namespace DK_ISA
}  // namespace cpu
}  // namespace decodekit
