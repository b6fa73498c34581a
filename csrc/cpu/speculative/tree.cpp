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

namespace decodekit {
namespace cpu {
namespace DK_ISA {

using namespace detail;

namespace {

// The tree of one row: depth[n] (-1: node n does not take part), and the
// children of each node in ascending index order (first[n], then next[]).
struct Tree {
  int64_t* depth;
  int64_t* first;
  int64_t* next;
  int64_t* last;
  int64_t* aux;  // per-node scratch of the kernels (rejected tokens, acceptance flags)

  static Tree build(const int64_t* cand, const int64_t* par, int64_t N, int64_t vocab_size, int64_t max_depth,
                    Buf<int64_t>& buf) {
    int64_t* m = buf.get(5 * N);
    Tree t{m, m + N, m + 2 * N, m + 3 * N, m + 4 * N};
    std::fill(m, m + 5 * N, int64_t{-1});
    t.depth[0] = 0;  // the root always takes part; its token is not read
    for (int64_t n = 1; n < N; ++n) {
      const int64_t x = cand[n], p = par[n];
      if (x < 0 || x >= vocab_size || p < 0 || p >= n || t.depth[p] < 0 || t.depth[p] >= max_depth) continue;
      t.depth[n] = t.depth[p] + 1;
      if (t.last[p] < 0)
        t.first[p] = n;
      else
        t.next[t.last[p]] = n;
      t.last[p] = n;
    }
    return t;
  }
};

// Writes row b's outputs for a walk that ended at node `end` and emitted `token`
// (-1: none): the path root -> end (excluding the root), its tokens, the token.
void finish(const Tree& t, const int64_t* cand, const int64_t* par, int64_t end, int64_t token, int64_t b, int64_t D,
            const TreeOutputs& out) {
  int64_t* tokens = out.tokens + b * (D + 1);
  int64_t* nodes = out.nodes + b * (D + 1);
  std::fill(tokens, tokens + D + 1, int64_t{-1});
  std::fill(nodes, nodes + D + 1, int64_t{-1});
  const int64_t a = t.depth[end];
  for (int64_t n = end, j = a - 1; j >= 0; n = par[n], --j) {
    nodes[j] = n;
    tokens[j] = cand[n];
  }
  tokens[a] = token;
  out.num_accepted[b] = a;
  out.num_emitted[b] = a + (token >= 0 ? 1 : 0);
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
    const Tree t = Tree::build(cand, par, N, vocab_size, max_depth, buf);
    int64_t* rejected = t.aux;  // the distinct tokens rejected at the current node
    int64_t c = 0;              // the current node
    for (;;) {
      const float* p = target_probs + (b * N + c) * V;
      if (!row_valid(p, vocab_size)) return finish(t, cand, par, c, -1, b, max_depth, out);
      if (t.first[c] < 0) {  // an accepted leaf (or a root without children): the bonus token
        const double u = PhiloxStreamRef{s, o, kStreamTreeBonus}.uniform_double(0);
        return finish(t, cand, par, c, draw(Residual{p, nullptr, -1, false}, vocab_size, u, sums), b, max_depth, out);
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
      return finish(t, cand, par, c, tok, b, max_depth, out);
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
    const Tree t = Tree::build(cand, par, N, vocab_size, max_depth, buf);
    int64_t* accepted = t.aux;  // 1: node accepted (the root counts as accepted)
    ParentRow* info = rows.get(N);
    std::fill(info, info + N, ParentRow{false, false, 0.0, 0.0});
    const double eps = epsilon.at(b), log_delta = log_double(delta.at(b));  // -inf for delta = 0
    accepted[0] = 1;
    int64_t end = 0;
    for (int64_t n = 1; n < N; ++n) {
      accepted[n] = 0;
      if (t.depth[n] < 0) continue;
      const int64_t p = par[n];
      if (!accepted[p]) continue;
      const float* row = target_probs + (b * N + p) * V;
      ParentRow& r = info[p];
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
      if (!r.valid) continue;
      const double q = clean(row[cand[n]]) / r.mass;
      // q > min(eps, delta exp(-H)), the second test in logs (no exp): ln q > ln delta - H.
      if (q > eps || (q > 0.0 && log_double(q) > log_delta - r.entropy)) {
        accepted[n] = 1;
        if (t.depth[n] > t.depth[end]) end = n;  // ascending n: the lowest index among the deepest
      }
    }
    const float* row = target_probs + (b * N + end) * V;
    int64_t tok = -1;
    if (row_valid(row, vocab_size)) {
      const uint64_t s = static_cast<uint64_t>(seed.at(b)), o = static_cast<uint64_t>(offset.at(b));
      const double u = PhiloxStreamRef{s, o, kStreamTreeBonus}.uniform_double(0);
      tok = draw(Residual{row, nullptr, -1, false}, vocab_size, u, sums);
    }
    finish(t, cand, par, end, tok, b, max_depth, out);
  });
}

void greedy_tree_verify(const int64_t* candidates, const int64_t* parents, const int64_t* target_ids, int64_t B,
                        int64_t N, int64_t vocab_size, int64_t max_depth, int num_threads, TreeOutputs out) {
  parallel_rows(B, threads_for(B, num_threads, B * N, int64_t{1} << 12), Schedule::kStatic, [&](int64_t b) {
    thread_local Buf<int64_t> buf;
    const int64_t* cand = candidates + b * N;
    const int64_t* par = parents + b * N;
    const int64_t* top = target_ids + b * N;
    const Tree t = Tree::build(cand, par, N, vocab_size, max_depth, buf);
    int64_t* accepted = t.aux;
    accepted[0] = 1;
    int64_t end = 0;
    for (int64_t n = 1; n < N; ++n) {
      accepted[n] = 0;
      if (t.depth[n] < 0) continue;
      const int64_t p = par[n];
      if (accepted[p] && top[p] >= 0 && cand[n] == top[p]) {
        accepted[n] = 1;
        if (t.depth[n] > t.depth[end]) end = n;
      }
    }
    finish(t, cand, par, end, top[end] >= 0 && top[end] < vocab_size ? top[end] : -1, b, max_depth, out);
  });
}

}  // namespace DK_ISA
}  // namespace cpu
}  // namespace decodekit
