// CPU kernels of the speculative family: lossless rejection sampling of a chain
// or a tree of drafted tokens against the target model's probabilities, typical
// acceptance and greedy verification. Framework-free.
#pragma once

#include <cstdint>

#include "cpu/sampling/sampling.h"  // RowParam

namespace decodekit {
namespace cpu {

// For each row b with drafts draft_ids[b, :K] (-1 padding after the last real
// one), draft_probs[b, j, :] (or null: one-hot drafts) and target_probs[b, j, :]
// for j = 0..K (float32, probabilities over [0, vocab_size); columns past
// vocab_size ignored): accept draft j while u_j q(x) < p(x) in float64 (u_j the
// float64 uniform j of stream 1); at the first rejection emit a token drawn from
// max(0, p - q) normalised by its sum (or from p when that has no mass), with
// stream 2 + j; if every real draft passes, emit a bonus token from the target's
// next distribution with stream 2 + n (n real drafts). out [B, K + 1] holds the
// emitted tokens then -1; num_accepted and num_emitted are [B].
using ChainSpeculativeSamplingKernel = void(const float* draft_probs, const int64_t* draft_ids,
                                            const float* target_probs, int64_t B, int64_t K, int64_t V,
                                            int64_t vocab_size, RowParam<int64_t> seed, RowParam<int64_t> offset,
                                            int num_threads, int64_t* out, int64_t* num_accepted, int64_t* num_emitted);

// Greedy verification: for each row b, draft j (of the leading drafts
// draft_ids[b, j] >= 0; -1 pads after the last real one) is accepted while it
// equals target_ids[b, j], the target's argmax at position j (-1 for an
// invalid target row, which no draft equals). out[b, :] (int64 [B, K + 1])
// holds the accepted drafts, then target_ids[b, a] (a = num_accepted[b]: the
// target's token at the first mismatch, or the bonus token after every real
// draft), then -1; num_emitted[b] = a + 1, or a when that token is -1.
using GreedyVerifyKernel = void(const int64_t* draft_ids, const int64_t* target_ids, int64_t B, int64_t K,
                                int num_threads, int64_t* out, int64_t* num_accepted, int64_t* num_emitted);

// ------------------------------------------------------------------ trees ----
// A draft tree per row b: candidates[b, n] (int64 [B, N]) is the token of node n
// (node 0 the root: the last accepted token, whose id is not read), -1 a padding
// node; parents[b, n] the index of node n's parent (-1 for the root). A node n >= 1
// takes part when its token is in [0, vocab_size), its parent p satisfies
// 0 <= p < n and takes part, and its depth (levels below the root) is at most
// max_depth; every other node is ignored, so malformed trees are read safely (the
// Python wrappers reject them first). The children of a node are tried in
// ascending node index. target_probs[b, n, :] (float32 [B, N, V]) is the target's
// distribution after node n's token (only [0, vocab_size) is read; rows need not
// be normalised).
//
// Every tree kernel writes out[b, :] (int64 [B, D + 1], D = max_depth): the
// accepted tokens then the emitted token, -1 after; nodes[b, :] ([B, D + 1]): the
// accepted non-root nodes in depth order, -1 after (column j is the node whose
// token is out[b, j]); num_accepted[b] and num_emitted[b] = num_accepted[b] + 1
// (or num_accepted[b] when a row read holds NaN, inf or a negative entry, or has
// no mass: the emitted token is then -1).
struct TreeOutputs {
  int64_t* tokens;
  int64_t* nodes;
  int64_t* num_accepted;
  int64_t* num_emitted;
};

// Lossless verification of a tree of deterministic (one-hot) candidates. At the
// current node c (first the root) the residual r starts as c's distribution; its
// children are tried in index order: child n with token x is accepted when
// u_n * sum(r) < r(x) in float64 (u_n the float64 uniform 0 of Philox stream
// 2^16 + n), else r(x) = 0 and the next child is tried. After an accepted child
// the walk continues from it. When every child of c is rejected, the emitted token
// is drawn from r with uniform 1 of stream 2^16 + c; when c has no children (an
// accepted leaf, or a root without children), from c's distribution with uniform
// 0 of stream 2^17 (the bonus token).
using TreeSpeculativeSamplingKernel = void(const int64_t* candidates, const int64_t* parents, const float* target_probs,
                                           int64_t B, int64_t N, int64_t V, int64_t vocab_size, int64_t max_depth,
                                           RowParam<int64_t> seed, RowParam<int64_t> offset, int num_threads,
                                           TreeOutputs out);

// Typical acceptance (lossy): node n with token x and parent p is accepted when p
// is the root or accepted and q(x) > min(epsilon, delta * exp(-H(q))), q the
// normalised distribution of p and H its entropy in nats (float64 comparison).
// The path ends at the deepest accepted node (lowest index among equally deep
// ones; the root when none is accepted); the emitted token is drawn from the end
// node's distribution with uniform 0 of stream 2^17.
using TypicalAcceptanceKernel = void(const int64_t* candidates, const int64_t* parents, const float* target_probs,
                                     int64_t B, int64_t N, int64_t V, int64_t vocab_size, int64_t max_depth,
                                     RowParam<double> epsilon, RowParam<double> delta, RowParam<int64_t> seed,
                                     RowParam<int64_t> offset, int num_threads, TreeOutputs out);

// Greedy tree verification: node n with parent p is accepted when p is the root
// or accepted and its token equals target_ids[b, p] (the target's argmax after p;
// -1 for an invalid row, which no token equals). The path ends at the deepest
// accepted node (lowest index among equally deep ones); the emitted token is
// target_ids[b, end] (-1 when invalid: num_emitted = num_accepted).
using GreedyTreeVerifyKernel = void(const int64_t* candidates, const int64_t* parents, const int64_t* target_ids,
                                    int64_t B, int64_t N, int64_t vocab_size, int64_t max_depth, int num_threads,
                                    TreeOutputs out);

// Status of check_probability_rows.
enum ProbabilityRowsStatus : int { kProbabilityRowsOk = 0, kProbabilityRowsBadEntry = 1, kProbabilityRowsNoMass = 2 };

// Checks nrows probability rows of V floats in one parallel pass: returns 1 when
// an entry is negative, NaN or infinite (any column), else 2 when need_mass and a
// row has no positive entry in [0, vocab_size), else 0.
using CheckProbabilityRowsKernel = int(const float* rows, int64_t nrows, int64_t V, int64_t vocab_size, bool need_mass,
                                       int num_threads);

}  // namespace cpu
}  // namespace decodekit
