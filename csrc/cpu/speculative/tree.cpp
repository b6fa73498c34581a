// Verification of a draft tree (see speculative.h): lossless rejection sampling
// of one-hot candidates, typical acceptance, greedy verification.
//
// Sources: lossless tree verification is recursive rejection sampling of
// deterministic candidates (Miao et al., "SpecInfer", ASPLOS 2024; Chen et al.,
// "Sequoia", 2024): at a node with residual r, candidate x is accepted with
// probability r(x) / sum(r), and on rejection r(x) = 0; if every candidate is
// rejected the token comes from the renormalised r, so the emitted token has
// exactly the target's distribution. Typical acceptance is the Medusa criterion
// (Cai et al., "Medusa", ICML 2024): a candidate is kept when the target gives it
// probability above min(epsilon, delta * exp(-entropy)). Random numbers are
// Philox streams keyed per row (DESIGN.md): a row's result never depends on the
// batch.
#include <algorithm>
#include <cstdint>

#include "cpu/common/isa.h"
#include "cpu/common/parallel.h"
#include "cpu/common/scratch.h"
#include "cpu/common/vec.h"
#include "cpu/speculative/residual.h"
#include "cpu/speculative/speculative.h"
#include "decodekit/math.h"
#include "decodekit/philox.h"
#include "decodekit/tree.h"

namespace decodekit {
namespace cpu {
namespace DK_ISA {

using namespace detail;

namespace {

// The tree of one row (decodekit/tree.h) in this thread's scratch.
TreeView row_tree(const int64_t* cand, const int64_t* par, int64_t N, int64_t vocab_size, int64_t max_depth,
                  Buf<int64_t>& buf) {
  return build_tree(cand, par, N, vocab_size, max_depth, buf.get(5 * N));
}

// sum of w ln w over the weights w = clean(p) of [0, n): float32 terms in 16
// float64 lanes (fixed order). Weights below float32's smallest normal count 0
// (their term is below 1e-36).
double sum_w_log_w(const float* p, int64_t n) {
  Acc16d acc;
  const VF tiny = splat(1.17549435e-38f), zero = splat(0.0f);
  for (int64_t c = 0; c < n; c += 16) {
    const VF w = Residual::load_upto(p, c, n);
    const VI normal = w >= tiny;  // false for 0, subnormals, negatives and NaN
    const VF safe = select(normal, w, splat(1.0f));
    acc.add(select(normal, safe * log16(safe), zero));
  }
  return acc.sum();
}

// Typical acceptance's test at one parent row: mass, entropy and validity.
struct ParentRow {
  bool ready, valid;
  double mass, entropy;
};

}  // namespace

void tree_speculative_sampling(const int64_t* candidates, const int64_t* parents, const float* target_probs, int64_t B,
                               int64_t N, int64_t V, int64_t vocab_size, int64_t max_depth, RowParam<int64_t> seed,
                               RowParam<int64_t> offset, int num_threads, TreeOutputs out) {
  parallel_rows(B, num_threads, Schedule::kStatic, [&](int64_t b) {
    thread_local Buf<double> sums;
    thread_local Buf<int64_t> buf;
    const uint64_t s = static_cast<uint64_t>(seed.at(b)), o = static_cast<uint64_t>(offset.at(b));
    const int64_t* cand = candidates + b * N;
    const int64_t* par = parents + b * N;
    const TreeView t = row_tree(cand, par, N, vocab_size, max_depth, buf);
    int64_t* rejected = t.aux;  // the distinct tokens rejected at the current node
    int64_t c = 0;              // the current node
    for (;;) {
      const float* p = target_probs + (b * N + c) * V;
      if (!row_valid(p, vocab_size)) return finish_tree(t, cand, par, c, -1, b, max_depth, out);
      if (t.first[c] < 0) {  // an accepted leaf (or a root without children): the bonus token
        const double u = PhiloxStreamRef{s, o, kStreamTreeBonus}.uniform_double(0);
        return finish_tree(t, cand, par, c, draw(Residual{p, nullptr, -1, false}, vocab_size, u, sums), b, max_depth,
                           out);
      }
      double rest = row_mass(p, vocab_size);  // sum(r) (float64)
      int64_t nrej = 0;
      int64_t next = -1;
      for (int64_t n = t.first[c]; n >= 0; n = t.next[n]) {
        const int64_t x = cand[n];
        const bool seen = std::find(rejected, rejected + nrej, x) != rejected + nrej;
        const double rx = seen ? 0.0 : clean(p[x]);
        const double u = PhiloxStreamRef{s, o, kStreamTreeNode + static_cast<uint32_t>(n)}.uniform_double(0);
        if (u * rest < rx) {  // strict: a token with r(x) = 0 is never accepted
          next = n;
          break;
        }
        if (!seen) {
          rejected[nrej++] = x;
          rest -= rx;
        }
      }
      if (next >= 0) {
        c = next;
        continue;
      }
      // Every child rejected: a token from r (p without the rejected tokens), or from p when only
      // float64 rounding left r without mass.
      const double u = PhiloxStreamRef{s, o, kStreamTreeNode + static_cast<uint32_t>(c)}.uniform_double(1);
      int64_t tok = draw(Excluding{p, rejected, nrej}, vocab_size, u, sums);
      if (tok < 0) tok = draw(Residual{p, nullptr, -1, false}, vocab_size, u, sums);
      return finish_tree(t, cand, par, c, tok, b, max_depth, out);
    }
  });
}

void typical_acceptance(const int64_t* candidates, const int64_t* parents, const float* target_probs, int64_t B,
                        int64_t N, int64_t V, int64_t vocab_size, int64_t max_depth, RowParam<double> epsilon,
                        RowParam<double> delta, RowParam<int64_t> seed, RowParam<int64_t> offset, int num_threads,
                        TreeOutputs out) {
  parallel_rows(B, num_threads, Schedule::kStatic, [&](int64_t b) {
    thread_local Buf<double> sums;
    thread_local Buf<int64_t> buf;
    thread_local Buf<ParentRow> rows;
    const int64_t* cand = candidates + b * N;
    const int64_t* par = parents + b * N;
    const TreeView t = row_tree(cand, par, N, vocab_size, max_depth, buf);
    ParentRow* info = rows.get(N);
    std::fill(info, info + N, ParentRow{false, false, 0.0, 0.0});
    const double eps = epsilon.at(b), log_delta = log_double(delta.at(b));  // -inf for delta = 0
    const int64_t end = deepest_accepted(t, par, N, [&](int64_t n, int64_t p) {
      const float* row = target_probs + (b * N + p) * V;
      ParentRow& r = info[p];  // the parent's row, read once
      if (!r.ready) {
        r.ready = true;
        r.valid = row_valid(row, vocab_size);
        if (r.valid) {
          r.mass = row_mass(row, vocab_size);
          r.valid = r.mass > 0.0;
        }
        // H(q) for q = w / m: ln m - sum(w ln w) / m.
        if (r.valid) r.entropy = log_double(r.mass) - sum_w_log_w(row, vocab_size) / r.mass;
      }
      return r.valid && typical_accepts(clean(row[cand[n]]) / r.mass, eps, log_delta, r.entropy);
    });
    const float* row = target_probs + (b * N + end) * V;
    int64_t tok = -1;
    if (row_valid(row, vocab_size)) {
      const uint64_t s = static_cast<uint64_t>(seed.at(b)), o = static_cast<uint64_t>(offset.at(b));
      const double u = PhiloxStreamRef{s, o, kStreamTreeBonus}.uniform_double(0);
      tok = draw(Residual{row, nullptr, -1, false}, vocab_size, u, sums);
    }
    finish_tree(t, cand, par, end, tok, b, max_depth, out);
  });
}

void greedy_tree_verify(const int64_t* candidates, const int64_t* parents, const int64_t* target_ids, int64_t B,
                        int64_t N, int64_t vocab_size, int64_t max_depth, int num_threads, TreeOutputs out) {
  parallel_rows(B, threads_for(B, num_threads, B * N, int64_t{1} << 12), Schedule::kStatic, [&](int64_t b) {
    thread_local Buf<int64_t> buf;
    const int64_t* cand = candidates + b * N;
    const int64_t* par = parents + b * N;
    const int64_t* top = target_ids + b * N;
    const TreeView t = row_tree(cand, par, N, vocab_size, max_depth, buf);
    const int64_t end =
        deepest_accepted(t, par, N, [&](int64_t n, int64_t p) { return top[p] >= 0 && cand[n] == top[p]; });
    finish_tree(t, cand, par, end, top[end] >= 0 && top[end] < vocab_size ? top[end] : -1, b, max_depth, out);
  });
}

}  // namespace DK_ISA
}  // namespace cpu
}  // namespace decodekit
