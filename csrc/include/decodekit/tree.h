// The draft tree of one row for the tree verification ops (speculative.h):
// which nodes take part, their children in ascending index order, the walk to
// the deepest accepted node, and the row's outputs. Shared by the CPU and CUDA
// kernels (one thread per row walks the tree), so both build and walk the same
// tree in the same order.
//
// Framework-free and header-only (DK_FN), so CUDA code can include it.
#pragma once

#include <cstdint>

#include "decodekit/math.h"
#include "decodekit/philox.h"  // DK_FN

namespace decodekit {

// Per-row int64 scratch of 5 N: depth[n] (-1: node n does not take part), the
// children of each node (first[n], then next[] in ascending index order;
// last[n] while building), and aux, the kernels' per-node scratch (rejected
// tokens, acceptance flags).
struct TreeView {
  int64_t* depth;
  int64_t* first;
  int64_t* next;
  int64_t* last;
  int64_t* aux;
};

// The five arrays of N nodes laid out from m.
DK_FN TreeView tree_view(int64_t* m, int64_t N) { return TreeView{m, m + N, m + 2 * N, m + 3 * N, m + 4 * N}; }

// Node n takes part when its token is in [0, vocab_size), its parent is an
// earlier node that takes part, and its depth is at most max_depth; the root
// always takes part (its token is not read). m: 5 N int64 of scratch.
DK_FN TreeView build_tree(const int64_t* cand, const int64_t* par, int64_t N, int64_t vocab_size, int64_t max_depth,
                          int64_t* m) {
  const TreeView t = tree_view(m, N);
  for (int64_t i = 0; i < 5 * N; ++i) m[i] = -1;
  t.depth[0] = 0;
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

// Typical acceptance and greedy verification: node n (parent p) is accepted when
// p is the root or accepted and accept(n, p) holds (asked only then, in ascending
// n). Returns the deepest accepted node, the lowest index among equally deep
// ones (the root when none is accepted); t.aux holds the acceptance flags.
template <class Accept>
DK_FN int64_t deepest_accepted(const TreeView& t, const int64_t* par, int64_t N, Accept accept) {
  int64_t* accepted = t.aux;
  accepted[0] = 1;
  int64_t end = 0;
  for (int64_t n = 1; n < N; ++n) {
    accepted[n] = 0;
    if (t.depth[n] < 0) continue;
    const int64_t p = par[n];
    if (!accepted[p] || !accept(n, p)) continue;
    accepted[n] = 1;
    if (t.depth[n] > t.depth[end]) end = n;  // ascending n: the lowest index among the deepest
  }
  return end;
}

// Medusa's typical test: q > min(epsilon, delta exp(-H)), the second part in logs
// (no exp): ln q > ln delta - H (log_delta = -inf for delta = 0).
DK_FN bool typical_accepts(double q, double epsilon, double log_delta, double entropy) {
  return q > epsilon || (q > 0.0 && log_double(q) > log_delta - entropy);
}

// Writes row b's outputs (Out: tokens, nodes, num_accepted, num_emitted) for a
// walk that ended at node `end` and emitted `token` (-1: none): the path root ->
// end (root excluded), its tokens, then the token; D = max_depth.
template <class Out>
DK_FN void finish_tree(const TreeView& t, const int64_t* cand, const int64_t* par, int64_t end, int64_t token,
                       int64_t b, int64_t D, const Out& out) {
  int64_t* tokens = out.tokens + b * (D + 1);
  int64_t* nodes = out.nodes + b * (D + 1);
  for (int64_t j = 0; j <= D; ++j) tokens[j] = nodes[j] = -1;
  const int64_t a = t.depth[end];
  for (int64_t n = end, j = a - 1; j >= 0; n = par[n], --j) {
    nodes[j] = n;
    tokens[j] = cand[n];
  }
  tokens[a] = token;
  out.num_accepted[b] = a;
  out.num_emitted[b] = a + (token >= 0 ? 1 : 0);
}

}  // namespace decodekit
