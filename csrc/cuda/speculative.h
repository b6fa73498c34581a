// CUDA kernels of the speculative family: chain_speculative_sampling,
// greedy_verify and the tree ops (tree_speculative_sampling,
// typical_acceptance, greedy_tree_verify) with the semantics of
// csrc/cpu/speculative/speculative.h and
// the same Philox streams (DESIGN.md, "Randomness"): acceptance uniform j of
// stream 1, the residual draw at position j with stream 2 + j, the bonus token
// with stream 2 + n. DEVICE pointers, the given stream, no host
// synchronisation (capturable in a CUDA graph). One thread block per row, so
// a row's result never depends on the batch.
//
// What equals the CPU bit for bit: the validity checks, the residual weights
// (float32, the CPU's expressions), the inverse-CDF block sums (each 1024-token
// block summed by one warp in the CPU's 16-lane float64 order, even and odd
// vectors apart) and the draw's scan. What can differ: the row masses m_p and
// m_q are float64 sums in a fixed tree over the block's threads, not the CPU's
// 16-lane order, so they can differ from the CPU's in the last bits. An
// acceptance then differs only when u q(x) lies within ~1e-15 relative of p(x),
// and a residual token only when float32(1 / m) rounds differently (both far
// below one in a million per draw). The tree ops likewise: node masses (and
// typical acceptance's sums of w ln w, whose float32 terms are the CPU's bits)
// are summed in the block's tree, so an acceptance can differ only when u sum(r)
// lies within ~1e-15 relative of r(x), or when q lies within ~1e-15 sum|w ln w| / m
// of its threshold (the entropy's rounding; rows need not be normalised).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "cpu/speculative/speculative.h"  // TreeOutputs
#include "decodekit/types.h"              // RowParam

namespace decodekit {
namespace cuda {

// Float64 scratch the chain kernels need: the draws' block sums, B *
// num_blocks(vocab_size) values, then each row's check and mass, B (2K + 1).
// Two launches: every probability row's check and mass in parallel (one block
// per row), then one block per request for the acceptances and the draw.
int64_t chain_scratch_size(int64_t B, int64_t K, int64_t vocab_size);

cudaError_t chain_speculative_sampling(const float* draft_probs, const int64_t* draft_ids, const float* target_probs,
                                       int64_t B, int64_t K, int64_t V, int64_t vocab_size, RowParam<int64_t> seed,
                                       RowParam<int64_t> offset, double* scratch, int64_t* out, int64_t* num_accepted,
                                       int64_t* num_emitted, cudaStream_t stream);

// The outputs of a tree op (the CPU's struct, holding DEVICE pointers here): tokens
// and nodes [B, max_depth + 1], num_accepted and num_emitted [B].
using cpu::TreeOutputs;

// Scratch of the tree ops: float64 (the draws' block sums, B num_blocks(vocab_size), then
// two stats per node, 2 B N) and int64 (each row's tree, 5 B N).
int64_t tree_scratch_doubles(int64_t B, int64_t N, int64_t vocab_size);
int64_t tree_scratch_ints(int64_t B, int64_t N);

// candidates / parents int64 [B, N], target_probs float32 [B, N, V] (device,
// contiguous): the CPU's TreeSpeculativeSamplingKernel, TypicalAcceptanceKernel
// and GreedyTreeVerifyKernel (target_ids int64 [B, N]: the target's argmax after
// each node, -1 for an invalid row). Two launches for the sampling ops (every node
// row's check and mass in parallel, then one block per row), one for greedy.
// Shapes as the bindings check them (N in [1, 65536], max_depth in [0, N - 1],
// vocab_size in [1, V]); other values return cudaErrorInvalidValue.
cudaError_t tree_speculative_sampling(const int64_t* candidates, const int64_t* parents, const float* target_probs,
                                      int64_t B, int64_t N, int64_t V, int64_t vocab_size, int64_t max_depth,
                                      RowParam<int64_t> seed, RowParam<int64_t> offset, double* scratch,
                                      int64_t* tree_scratch, TreeOutputs out, cudaStream_t stream);

cudaError_t typical_acceptance(const int64_t* candidates, const int64_t* parents, const float* target_probs, int64_t B,
                               int64_t N, int64_t V, int64_t vocab_size, int64_t max_depth, RowParam<double> epsilon,
                               RowParam<double> delta, RowParam<int64_t> seed, RowParam<int64_t> offset,
                               double* scratch, int64_t* tree_scratch, TreeOutputs out, cudaStream_t stream);

cudaError_t greedy_tree_verify(const int64_t* candidates, const int64_t* parents, const int64_t* target_ids, int64_t B,
                               int64_t N, int64_t vocab_size, int64_t max_depth, int64_t* tree_scratch, TreeOutputs out,
                               cudaStream_t stream);

cudaError_t greedy_verify(const int64_t* draft_ids, const int64_t* target_ids, int64_t B, int64_t K, int64_t* out,
                          int64_t* num_accepted, int64_t* num_emitted, cudaStream_t stream);

}  // namespace cuda
}  // namespace decodekit
