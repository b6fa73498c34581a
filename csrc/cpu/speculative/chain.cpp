// Lossless speculative sampling of a draft chain (see speculative.h).
//
// Source: Leviathan, Kalman & Matias, "Fast Inference from Transformers via
// Speculative Decoding" (ICML 2023); Chen et al., "Accelerating Large Language
// Model Decoding with Speculative Sampling" (2023). Draft x at position j is
// accepted with probability min(1, p(x) / q(x)); on rejection the token comes
// from the normalised residual max(0, p - q), so every emitted position has
// exactly the target's distribution. Random numbers are Philox streams keyed
// per row (DESIGN.md): a row's result never depends on the batch.
#include "cpu/speculative/speculative.h"

#include <algorithm>
#include <cstdint>

#include "cpu/common/draw.h"
#include "cpu/common/isa.h"
#include "cpu/common/parallel.h"
#include "cpu/common/scratch.h"
#include "cpu/speculative/residual.h"
#include "decodekit/philox.h"
#include "decodekit/reduce.h"

namespace decodekit {
namespace cpu {
namespace DK_ISA {

using namespace detail;

void chain_speculative_sampling(const float* draft_probs, const int64_t* draft_ids, const float* target_probs,
                                int64_t B, int64_t K, int64_t V, int64_t vocab_size, RowParam<int64_t> seed,
                                RowParam<int64_t> offset, int num_threads, int64_t* out, int64_t* num_accepted,
                                int64_t* num_emitted) {
  parallel_rows(B, num_threads, Schedule::kStatic, [&](int64_t b) {
    thread_local Buf<double> sums;
    const uint64_t s = static_cast<uint64_t>(seed.at(b)), o = static_cast<uint64_t>(offset.at(b));
    int64_t* row_out = out + b * (K + 1);
    std::fill(row_out, row_out + K + 1, int64_t{-1});
    const int64_t* d = draft_ids + b * K;
    int64_t n = 0;  // real drafts: the leading ids in [0, vocab_size)
    while (n < K && d[n] >= 0 && d[n] < vocab_size) ++n;
    const PhiloxStreamRef accept{s, o, kStreamSpecAccept};
    int64_t j = 0;
    bool invalid = false;  // a row read here holds NaN, inf or a negative entry: the request is marked
    for (; j < n; ++j) {
      const float* p = target_probs + (b * (K + 1) + j) * V;
      const float* q = draft_probs ? draft_probs + (b * K + j) * V : nullptr;
      const int64_t x = d[j];
      if (!row_valid(p, vocab_size) || (q && !row_valid(q, vocab_size))) {
        invalid = true;
        break;
      }
      // Normalise over the vocabulary so unnormalised rows and padding columns are handled.
      const double mp = row_mass(p, vocab_size);
      const double mq = q ? row_mass(q, vocab_size) : 1.0;
      const double px = mp > 0.0 ? clean(p[x]) / mp : 0.0;
      const double qx = q ? (mq > 0.0 ? clean(q[x]) / mq : 0.0) : 1.0;
      // A draft the draft distribution gives probability 0 cannot have been drawn from it: it is
      // rejected (accepting it whatever u would bias the output), and the residual decides.
      if (qx > 0.0 && accept.uniform_double(static_cast<uint64_t>(j)) * qx < px) {
        row_out[j] = x;
        continue;
      }
      const double u = PhiloxStreamRef{s, o, static_cast<uint32_t>(kStreamSpecResidual + j)}.uniform_double(0);
      Residual res{p, q, x, true};
      res.sp = mp > 0.0 ? static_cast<float>(1.0 / mp) : 0.0f;
      res.sq = mq > 0.0 ? static_cast<float>(1.0 / mq) : 0.0f;
      int64_t t = draw(res, vocab_size, u, sums);
      if (t < 0) t = draw(Residual{p, nullptr, -1, false}, vocab_size, u, sums);
      row_out[j] = t;  // -1 only when the target row has no mass at all
      break;
    }
    if (invalid) {
      num_accepted[b] = j;
      num_emitted[b] = j;  // row_out[j] stays -1
      return;
    }
    if (j == n) {  // every real draft accepted: the bonus token
      const float* p = target_probs + (b * (K + 1) + n) * V;
      if (!row_valid(p, vocab_size)) {
        num_accepted[b] = n;
        num_emitted[b] = n;
        return;
      }
      const double u = PhiloxStreamRef{s, o, static_cast<uint32_t>(kStreamSpecResidual + n)}.uniform_double(0);
      row_out[n] = draw(Residual{p, nullptr, -1, false}, vocab_size, u, sums);
      num_accepted[b] = n;
    } else {
      num_accepted[b] = j;
    }
    num_emitted[b] = num_accepted[b] + (row_out[num_accepted[b]] >= 0 ? 1 : 0);
  });
}

void greedy_verify(const int64_t* draft_ids, const int64_t* target_ids, int64_t B, int64_t K, int num_threads,
                   int64_t* out, int64_t* num_accepted, int64_t* num_emitted) {
  parallel_rows(B, threads_for(B, num_threads, B * (K + 1), int64_t{1} << 14), Schedule::kStatic, [&](int64_t b) {
    const int64_t* d = draft_ids + b * K;
    const int64_t* top = target_ids + b * (K + 1);
    int64_t* row_out = out + b * (K + 1);
    int64_t a = 0;
    while (a < K && d[a] >= 0 && d[a] == top[a]) {
      row_out[a] = d[a];
      ++a;
    }
    row_out[a] = top[a] >= 0 ? top[a] : -1;
    for (int64_t j = a + 1; j <= K; ++j) row_out[j] = -1;
    num_accepted[b] = a;
    num_emitted[b] = a + (row_out[a] >= 0 ? 1 : 0);
  });
}

}  // namespace DK_ISA
}  // namespace cpu
}  // namespace decodekit
