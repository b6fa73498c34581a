// Lossless speculative sampling of a draft chain, and greedy verification, on
// the GPU (see speculative.h and csrc/cpu/speculative/chain.cpp, whose steps
// this kernel follows one by one).
//
// Source: Leviathan, Kalman & Matias, "Fast Inference from Transformers via
// Speculative Decoding" (ICML 2023); Chen et al., "Accelerating Large Language
// Model Decoding with Speculative Sampling" (2023).
#include "cuda/speculative.h"

#include <cstdint>

#include "decodekit/math.h"
#include "decodekit/philox.h"
#include "decodekit/reduce.h"
#include "decodekit/tree.h"

namespace decodekit {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int64_t kBlock = reduce::kBlock;

__device__ __forceinline__ double clean(float x) { return x > 0.0f ? static_cast<double>(x) : 0.0; }

// The weights of a draw, as the CPU's Residual::at: max(0, p sp - q sq) (q
// one-hot at x when null), or max(0, p) when subtract is false.
struct Residual {
  const float* p;
  const float* q;
  int64_t x;
  bool subtract;
  float sp, sq;
  __device__ __forceinline__ float at(int64_t i) const {
    const float pi = p[i];
    const float pc = pi > 0.0f ? pi : 0.0f;
    if (!subtract) return pc;
    float qc;
    if (q) {
      const float qi = q[i];
      qc = (qi > 0.0f ? qi : 0.0f) * sq;
    } else {
      qc = i == x ? 1.0f : 0.0f;
    }
    const float w = pc * sp - qc;
    return w > 0.0f ? w : 0.0f;
  }
};

// The weights of a tree node whose rejected candidates ex[0, nex) are removed:
// clean(p) with those tokens at 0 (the CPU's Excluding, cpu/speculative/residual.h).
// ex lies in shared memory when it fits (kSharedRejected tokens), else in global.
constexpr int kSharedRejected = 64;
struct Excluding {
  const float* p;
  const int64_t* ex;
  int64_t nex;
  __device__ __forceinline__ float at(int64_t i) const {
    for (int64_t k = 0; k < nex; ++k)
      if (ex[k] == i) return 0.0f;
    const float pi = p[i];
    return pi > 0.0f ? pi : 0.0f;
  }
};

struct Shared {
  double red[kThreads];
  float stage[kBlock];
  double cum;
  int64_t blk;
  int64_t result;
};

// Whether every entry of p[0, n) is finite and >= 0, and its mass (clean
// entries, float64, thread-strided partial sums then a fixed tree). Every
// thread gets both.
__device__ bool row_check_mass(const float* p, int64_t n, Shared& sh, double* mass) {
  bool bad = false;
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const float v = p[i];
    bad |= !(v >= 0.0f && v < __builtin_huge_valf());
    s += clean(v);
  }
  sh.red[threadIdx.x] = s;
  const int any_bad = __syncthreads_or(bad ? 1 : 0);
  for (int w = kThreads / 2; w >= 1; w /= 2) {
    if (static_cast<int>(threadIdx.x) < w) sh.red[threadIdx.x] += sh.red[threadIdx.x + w];
    __syncthreads();
  }
  *mass = sh.red[0];
  __syncthreads();  // sh.red is reused
  return any_bad == 0;
}

// Pass 1, every row in parallel (one block per row of target_probs [B, K + 1]
// and of draft_probs [B, K]): stats[b * (2K + 1) + r] = the row's mass, or -1
// when it holds a negative, NaN or infinite entry in [0, vocab_size). The chain
// kernel then reads each row's check and mass where the CPU computes them (the
// same values: a row's stats depend only on the row).
__global__ void __launch_bounds__(kThreads)
    row_stats_kernel(const float* __restrict__ draft_probs, const float* __restrict__ target_probs, int64_t K,
                     int64_t V, int64_t vocab_size, double* __restrict__ stats) {
  __shared__ Shared sh;
  const int64_t per = draft_probs ? 2 * K + 1 : K + 1;
  const int64_t b = blockIdx.x / per, r = blockIdx.x % per;
  const float* row = r <= K ? target_probs + (b * (K + 1) + r) * V : draft_probs + (b * K + (r - K - 1)) * V;
  double mass = 0.0;
  const bool ok = row_check_mass(row, vocab_size, sh, &mass);
  if (threadIdx.x == 0) stats[b * (2 * K + 1) + r] = ok ? mass : -1.0;
}

// The CPU's block sum of block k ([k kBlock, min(n, (k + 1) kBlock))): lane j
// of 16 takes the elements j mod 16 of each vector of 16; vectors 2v and
// 2v + 1 of each full pair go to the even and odd accumulators, the vectors
// after the last full pair to the even one; the two merged lane by lane, then
// the fixed tree. Called by a whole warp; every lane returns the sum.
template <class W>
__device__ double exact_block_sum(const W& r, int64_t k, int64_t n) {
  const int lane = threadIdx.x & 31, l = lane & 15, par = lane >> 4;
  const int64_t b0 = k * kBlock, end = b0 + kBlock < n ? b0 + kBlock : n;
  const int64_t len = end - b0;
  const int64_t nv = (len + 15) / 16, np = len / 32;  // vectors, full pairs (the CPU's pair loop)
  double acc = 0.0;
  for (int64_t v = par; v < 2 * np; v += 2) acc += static_cast<double>(r.at(b0 + v * 16 + l));
  if (par == 0)
    for (int64_t v = 2 * np; v < nv; ++v) {
      const int64_t i = b0 + v * 16 + l;
      if (i < end) acc += static_cast<double>(r.at(i));  // the zero padding adds nothing
    }
  acc += __shfl_xor_sync(kFull, acc, 16);  // even + odd
  for (int off = 8; off >= 1; off /= 2) acc += __shfl_xor_sync(kFull, acc, off);
  return acc;
}

// The CPU's draw (chain.cpp detail::draw over cpu/common/draw.h): block sums,
// their total in order, the walk over the block sums and the scan of the
// chosen block; -1 when the total is 0. Called by the whole block; every
// thread returns the token.
template <class W>
__device__ int64_t draw(const W& r, int64_t n, double u, double* sums, Shared& sh) {
  const int64_t nb = reduce::num_blocks(n);
  const int warp = threadIdx.x / 32;
  for (int64_t k = warp; k < nb; k += kWarps) {
    const double s = exact_block_sum(r, k, n);
    if ((threadIdx.x & 31) == 0) sums[k] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int64_t k = 0; k < nb; ++k) total += sums[k];
    int64_t blk = -1;
    double cum = 0.0;
    if (total > 0.0) {
      const double target = u * total;
      blk = 0;
      for (; blk < nb; ++blk) {
        if (cum + sums[blk] > target) break;
        cum += sums[blk];
      }
      blk = blk < nb - 1 ? blk : nb - 1;
    }
    sh.blk = blk;
    sh.cum = cum;
    sh.result = -1;
  }
  __syncthreads();
  const int64_t blk = sh.blk;
  if (blk < 0) {  // no mass
    __syncthreads();
    return -1;
  }
  const int64_t start = blk * kBlock, stop = start + kBlock < n ? start + kBlock : n;
  for (int64_t i = start + threadIdx.x; i < stop; i += kThreads) sh.stage[i - start] = r.at(i);
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int64_t k = 0; k < nb; ++k) total += sums[k];
    const double target = u * total;
    double cum = sh.cum;
    int64_t last_positive = -1, found = -1;
    for (int64_t i = start; i < stop && found < 0; ++i) {
      const float e = sh.stage[i - start];
      if (!(e > 0.0f)) continue;
      last_positive = i;
      cum += static_cast<double>(e);
      if (cum > target) found = i;
    }
    for (int64_t i = stop; i < n && found < 0; ++i) {  // rounding left the chosen block short (rare)
      const float e = r.at(i);
      if (!(e > 0.0f)) continue;
      last_positive = i;
      cum += static_cast<double>(e);
      if (cum > target) found = i;
    }
    sh.result = found >= 0 ? found : last_positive;
  }
  __syncthreads();
  int64_t t = sh.result;
  __syncthreads();
  if (t >= 0) return t;
  // Rounding put the target past every positive weight of the later blocks:
  // the last positive weight of the row (a max-index reduction).
  int64_t best = -1;
  for (int64_t i = threadIdx.x; i < n; i += kThreads)
    if (r.at(i) > 0.0f) best = i;
  sh.red[threadIdx.x] = static_cast<double>(best);  // exact: indices < 2^31
  __syncthreads();
  for (int w = kThreads / 2; w >= 1; w /= 2) {
    if (static_cast<int>(threadIdx.x) < w && sh.red[threadIdx.x + w] > sh.red[threadIdx.x])
      sh.red[threadIdx.x] = sh.red[threadIdx.x + w];
    __syncthreads();
  }
  t = static_cast<int64_t>(sh.red[0]);
  __syncthreads();
  return t;
}

__global__ void __launch_bounds__(kThreads, 1)
    chain_kernel(const float* __restrict__ draft_probs, const int64_t* __restrict__ draft_ids,
                 const float* __restrict__ target_probs, int64_t K, int64_t V, int64_t vocab_size,
                 RowParam<int64_t> seed, RowParam<int64_t> offset, const double* __restrict__ stats, double* sums_all,
                 int64_t* out, int64_t* num_accepted, int64_t* num_emitted) {
  __shared__ Shared sh;
  const int64_t b = blockIdx.x;
  const uint64_t s = static_cast<uint64_t>(seed.at(b)), o = static_cast<uint64_t>(offset.at(b));
  double* sums = sums_all + b * reduce::num_blocks(vocab_size);
  const double* row_stats = stats + b * (2 * K + 1);  // target rows 0..K, then draft rows
  int64_t* row_out = out + b * (K + 1);
  for (int64_t j = threadIdx.x; j <= K; j += kThreads) row_out[j] = -1;
  const int64_t* d = draft_ids + b * K;
  int64_t n = 0;  // real drafts: the leading ids in [0, vocab_size)
  while (n < K && d[n] >= 0 && d[n] < vocab_size) ++n;
  __syncthreads();  // row_out's -1 before the writes below
  const PhiloxStreamRef accept{s, o, kStreamSpecAccept};
  int64_t j = 0;
  bool invalid = false;
  int64_t emitted_at = -1;  // the residual token's position, when one was drawn
  int64_t token = -1;
  for (; j < n; ++j) {
    const float* p = target_probs + (b * (K + 1) + j) * V;
    const float* q = draft_probs ? draft_probs + (b * K + j) * V : nullptr;
    const int64_t x = d[j];
    const double mp = row_stats[j], mq = q ? row_stats[K + 1 + j] : 1.0;
    if (mp < 0.0 || mq < 0.0) {  // a row holding a negative, NaN or infinite entry
      invalid = true;
      break;
    }
    const double px = mp > 0.0 ? clean(p[x]) / mp : 0.0;
    const double qx = q ? (mq > 0.0 ? clean(q[x]) / mq : 0.0) : 1.0;
    if (qx > 0.0 && accept.uniform_double(static_cast<uint64_t>(j)) * qx < px) {
      if (threadIdx.x == 0) row_out[j] = x;
      continue;
    }
    const double u = PhiloxStreamRef{s, o, static_cast<uint32_t>(kStreamSpecResidual + j)}.uniform_double(0);
    Residual res{
        p, q, x, true, mp > 0.0 ? static_cast<float>(1.0 / mp) : 0.0f, mq > 0.0 ? static_cast<float>(1.0 / mq) : 0.0f};
    token = draw(res, vocab_size, u, sums, sh);
    if (token < 0) token = draw(Residual{p, nullptr, -1, false, 1.0f, 1.0f}, vocab_size, u, sums, sh);
    emitted_at = j;
    break;
  }
  int64_t acc, emit;
  if (invalid) {
    acc = j;
    emit = j;  // row_out[j] stays -1
  } else if (emitted_at >= 0) {
    acc = j;
    emit = j + (token >= 0 ? 1 : 0);
  } else {  // every real draft accepted: the bonus token
    const float* p = target_probs + (b * (K + 1) + n) * V;
    acc = n;
    if (row_stats[n] < 0.0) {
      emit = n;
    } else {
      const double u = PhiloxStreamRef{s, o, static_cast<uint32_t>(kStreamSpecResidual + n)}.uniform_double(0);
      token = draw(Residual{p, nullptr, -1, false, 1.0f, 1.0f}, vocab_size, u, sums, sh);
      emitted_at = n;
      emit = n + (token >= 0 ? 1 : 0);
    }
  }
  if (threadIdx.x == 0) {
    if (emitted_at >= 0) row_out[emitted_at] = token;
    num_accepted[b] = acc;
    num_emitted[b] = emit;
  }
}

constexpr int kVerifyThreads = 128;

__global__ void __launch_bounds__(kVerifyThreads)
    greedy_verify_kernel(const int64_t* __restrict__ draft_ids, const int64_t* __restrict__ target_ids, int64_t B,
                         int64_t K, int64_t* __restrict__ out, int64_t* __restrict__ num_accepted,
                         int64_t* __restrict__ num_emitted) {
  const int64_t b = blockIdx.x * int64_t{kVerifyThreads} + threadIdx.x;
  if (b >= B) return;
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
}

// ------------------------------------------------------------------ trees ----
// The tree ops (csrc/cpu/speculative/tree.cpp, step by step). Two launches
// each: every node row's check, mass (and for typical acceptance its sum of
// w ln w) in parallel, one block per (row, node), as the chain's row_stats;
// then one block per row, where thread 0 builds the tree and walks it (the
// walk reads only the node stats, one probability per candidate and the
// Philox uniforms), and the whole block makes the one draw of the row
// (bonus token, residual token) in the CPU's block-sum order.

// stats[(b N + n) * 2]: node row (b, n)'s mass over [0, vocab_size), or -1 when it holds a
// negative, NaN or infinite entry there; [.. + 1]: with `entropy`, sum of w ln w over its
// weights w >= float32's smallest normal (float32 terms, as the CPU's sum_w_log_w), else 0.
// The sums are float64 over the block's threads in a fixed tree: batch-invariant, and
// equal to the CPU's 16-lane sums up to the last bits (see speculative.h).
__global__ void __launch_bounds__(kThreads)
    tree_stats_kernel(const float* __restrict__ target_probs, int64_t V, int64_t vocab_size, bool entropy,
                      double* __restrict__ stats) {
  __shared__ Shared sh;
  const int64_t row = blockIdx.x;
  const float* p = target_probs + row * V;
  double mass = 0.0;
  const bool ok = row_check_mass(p, vocab_size, sh, &mass);
  double swl = 0.0;
  if (entropy && ok) {
    double s = 0.0;
    for (int64_t i = threadIdx.x; i < vocab_size; i += kThreads) {
      const float w = p[i];
      if (w >= 1.17549435e-38f) s += static_cast<double>(w * log_positive_normal(w));
    }
    sh.red[threadIdx.x] = s;
    __syncthreads();
    for (int w = kThreads / 2; w >= 1; w /= 2) {
      if (static_cast<int>(threadIdx.x) < w) sh.red[threadIdx.x] += sh.red[threadIdx.x + w];
      __syncthreads();
    }
    swl = sh.red[0];
  }
  if (threadIdx.x == 0) {
    stats[2 * row] = ok ? mass : -1.0;
    stats[2 * row + 1] = swl;
  }
}

enum TreeEnd : int { kEndNone = 0, kEndBonus = 1, kEndResidual = 2 };

// Lossless tree verification of one row (block b); see speculative.h.
__global__ void __launch_bounds__(kThreads, 1)
    tree_sampling_kernel(const int64_t* __restrict__ candidates, const int64_t* __restrict__ parents,
                         const float* __restrict__ target_probs, int64_t N, int64_t V, int64_t vocab_size,
                         int64_t max_depth, RowParam<int64_t> seed, RowParam<int64_t> offset,
                         const double* __restrict__ stats, int64_t* tree_scratch, double* sums_all, TreeOutputs out) {
  __shared__ Shared sh;
  __shared__ int64_t end_node, end_nrej;
  __shared__ int end_kind;
  __shared__ int64_t rejected_sh[kSharedRejected];
  const int64_t b = blockIdx.x;
  const uint64_t s = static_cast<uint64_t>(seed.at(b)), o = static_cast<uint64_t>(offset.at(b));
  const int64_t* cand = candidates + b * N;
  const int64_t* par = parents + b * N;
  const double* st = stats + 2 * b * N;
  int64_t* m = tree_scratch + 5 * b * N;
  if (threadIdx.x == 0) {
    const TreeView t = build_tree(cand, par, N, vocab_size, max_depth, m);
    int64_t* rejected = t.aux;  // the distinct tokens rejected at the current node
    int64_t c = 0, nrej = 0;
    int kind = kEndNone;
    for (;;) {
      const double mass = st[2 * c];
      if (mass < 0.0) break;  // an invalid row: nothing emitted
      if (t.first[c] < 0) {   // an accepted leaf (or a root without children)
        kind = kEndBonus;
        break;
      }
      const float* p = target_probs + (b * N + c) * V;
      double rest = mass;
      nrej = 0;
      int64_t next = -1;
      for (int64_t n = t.first[c]; n >= 0; n = t.next[n]) {
        const int64_t x = cand[n];
        bool seen = false;
        for (int64_t k = 0; k < nrej; ++k) seen |= rejected[k] == x;
        const double rx = seen ? 0.0 : clean(p[x]);
        const double u = PhiloxStreamRef{s, o, kStreamTreeNode + static_cast<uint32_t>(n)}.uniform_double(0);
        if (u * rest < rx) {
          next = n;
          break;
        }
        if (!seen) {
          rejected[nrej++] = x;
          rest -= rx;
        }
      }
      if (next < 0) {
        kind = kEndResidual;
        break;
      }
      c = next;
    }
    end_node = c;
    end_nrej = nrej;
    end_kind = kind;
  }
  __syncthreads();  // the walk's result and the rejected tokens (global scratch) for every thread
  const int64_t c = end_node;
  const int kind = end_kind;
  const float* p = target_probs + (b * N + c) * V;
  double* sums = sums_all + b * reduce::num_blocks(vocab_size);
  int64_t token = -1;
  if (kind == kEndBonus) {
    const double u = PhiloxStreamRef{s, o, kStreamTreeBonus}.uniform_double(0);
    token = draw(Residual{p, nullptr, -1, false, 1.0f, 1.0f}, vocab_size, u, sums, sh);
  } else if (kind == kEndResidual) {
    // A token from r (p without the rejected tokens), or from p when only float64 rounding
    // left r without mass.
    const double u = PhiloxStreamRef{s, o, kStreamTreeNode + static_cast<uint32_t>(c)}.uniform_double(1);
    // Every element of the row tests the rejected tokens: from shared memory when they fit.
    const int64_t nrej = end_nrej;
    const int64_t* ex = m + 4 * N;
    if (nrej <= kSharedRejected) {
      for (int64_t k = threadIdx.x; k < nrej; k += kThreads) rejected_sh[k] = ex[k];
      __syncthreads();
      ex = rejected_sh;
    }
    token = draw(Excluding{p, ex, nrej}, vocab_size, u, sums, sh);
    if (token < 0) token = draw(Residual{p, nullptr, -1, false, 1.0f, 1.0f}, vocab_size, u, sums, sh);
  }
  if (threadIdx.x == 0) {
    const TreeView t = tree_view(m, N);
    finish_tree(t, cand, par, c, token, b, max_depth, out);
  }
}

// Typical acceptance of one row (block b); see speculative.h.
__global__ void __launch_bounds__(kThreads, 1)
    typical_kernel(const int64_t* __restrict__ candidates, const int64_t* __restrict__ parents,
                   const float* __restrict__ target_probs, int64_t N, int64_t V, int64_t vocab_size, int64_t max_depth,
                   RowParam<double> epsilon, RowParam<double> delta, RowParam<int64_t> seed, RowParam<int64_t> offset,
                   const double* __restrict__ stats, int64_t* tree_scratch, double* sums_all, TreeOutputs out) {
  __shared__ Shared sh;
  __shared__ int64_t end_node;
  const int64_t b = blockIdx.x;
  const int64_t* cand = candidates + b * N;
  const int64_t* par = parents + b * N;
  const double* st = stats + 2 * b * N;
  int64_t* m = tree_scratch + 5 * b * N;
  if (threadIdx.x == 0) {
    const TreeView t = build_tree(cand, par, N, vocab_size, max_depth, m);
    const double eps = epsilon.at(b), log_delta = log_double(delta.at(b));  // -inf for delta = 0
    end_node = deepest_accepted(t, par, N, [&](int64_t n, int64_t p) {
      const double mass = st[2 * p];
      if (!(mass > 0.0)) return false;  // an invalid parent row, or one without mass
      // H(q) for q = w / m: ln m - sum(w ln w) / m.
      const double entropy = log_double(mass) - st[2 * p + 1] / mass;
      return typical_accepts(clean(target_probs[(b * N + p) * V + cand[n]]) / mass, eps, log_delta, entropy);
    });
  }
  __syncthreads();
  const int64_t end = end_node;
  int64_t token = -1;
  if (st[2 * end] >= 0.0) {  // a valid row (a row without mass draws nothing: -1)
    const uint64_t s = static_cast<uint64_t>(seed.at(b)), o = static_cast<uint64_t>(offset.at(b));
    const double u = PhiloxStreamRef{s, o, kStreamTreeBonus}.uniform_double(0);
    token = draw(Residual{target_probs + (b * N + end) * V, nullptr, -1, false, 1.0f, 1.0f}, vocab_size, u,
                 sums_all + b * reduce::num_blocks(vocab_size), sh);
  }
  if (threadIdx.x == 0) {
    const TreeView t = tree_view(m, N);
    finish_tree(t, cand, par, end, token, b, max_depth, out);
  }
}

// Greedy tree verification, one thread per row; see speculative.h.
__global__ void __launch_bounds__(kVerifyThreads)
    greedy_tree_kernel(const int64_t* __restrict__ candidates, const int64_t* __restrict__ parents,
                       const int64_t* __restrict__ target_ids, int64_t B, int64_t N, int64_t vocab_size,
                       int64_t max_depth, int64_t* tree_scratch, TreeOutputs out) {
  const int64_t b = blockIdx.x * int64_t{kVerifyThreads} + threadIdx.x;
  if (b >= B) return;
  const int64_t* cand = candidates + b * N;
  const int64_t* par = parents + b * N;
  const int64_t* top = target_ids + b * N;
  const TreeView t = build_tree(cand, par, N, vocab_size, max_depth, tree_scratch + 5 * b * N);
  const int64_t end =
      deepest_accepted(t, par, N, [&](int64_t n, int64_t p) { return top[p] >= 0 && cand[n] == top[p]; });
  finish_tree(t, cand, par, end, top[end] >= 0 && top[end] < vocab_size ? top[end] : -1, b, max_depth, out);
}

}  // namespace

int64_t chain_scratch_size(int64_t B, int64_t K, int64_t vocab_size) {
  return B * reduce::num_blocks(vocab_size) + B * (2 * K + 1);
}

cudaError_t chain_speculative_sampling(const float* draft_probs, const int64_t* draft_ids, const float* target_probs,
                                       int64_t B, int64_t K, int64_t V, int64_t vocab_size, RowParam<int64_t> seed,
                                       RowParam<int64_t> offset, double* scratch, int64_t* out, int64_t* num_accepted,
                                       int64_t* num_emitted, cudaStream_t stream) {
  if (B <= 0) return cudaSuccess;
  if (B > 2147483647 || vocab_size < 1 || vocab_size > V) return cudaErrorInvalidValue;
  const int64_t rows = B * (draft_probs ? 2 * K + 1 : K + 1);
  if (rows > 2147483647) return cudaErrorInvalidValue;
  double* stats = scratch + B * reduce::num_blocks(vocab_size);
  row_stats_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(draft_probs, target_probs, K, V, vocab_size,
                                                                         stats);
  chain_kernel<<<static_cast<unsigned>(B), kThreads, 0, stream>>>(draft_probs, draft_ids, target_probs, K, V,
                                                                  vocab_size, seed, offset, stats, scratch, out,
                                                                  num_accepted, num_emitted);
  return cudaGetLastError();
}

cudaError_t greedy_verify(const int64_t* draft_ids, const int64_t* target_ids, int64_t B, int64_t K, int64_t* out,
                          int64_t* num_accepted, int64_t* num_emitted, cudaStream_t stream) {
  if (B <= 0) return cudaSuccess;
  const int64_t blocks = (B + kVerifyThreads - 1) / kVerifyThreads;
  if (blocks > 2147483647) return cudaErrorInvalidValue;
  greedy_verify_kernel<<<static_cast<unsigned>(blocks), kVerifyThreads, 0, stream>>>(draft_ids, target_ids, B, K, out,
                                                                                     num_accepted, num_emitted);
  return cudaGetLastError();
}

int64_t tree_scratch_doubles(int64_t B, int64_t N, int64_t vocab_size) {
  return B * reduce::num_blocks(vocab_size) + 2 * B * N;
}

int64_t tree_scratch_ints(int64_t B, int64_t N) { return 5 * B * N; }

namespace {

// The bindings' checks (torch/checks.cpp check_tree), repeated for direct callers.
cudaError_t tree_launch_check(int64_t B, int64_t N, int64_t V, int64_t vocab_size, int64_t max_depth) {
  if (B > 2147483647 || N < 1 || N > 65536 || B * N > 2147483647 || vocab_size < 1 || vocab_size > V || max_depth < 0 ||
      max_depth > N - 1)
    return cudaErrorInvalidValue;
  return cudaSuccess;
}

}  // namespace

cudaError_t tree_speculative_sampling(const int64_t* candidates, const int64_t* parents, const float* target_probs,
                                      int64_t B, int64_t N, int64_t V, int64_t vocab_size, int64_t max_depth,
                                      RowParam<int64_t> seed, RowParam<int64_t> offset, double* scratch,
                                      int64_t* tree_scratch, TreeOutputs out, cudaStream_t stream) {
  if (B <= 0) return cudaSuccess;
  if (const cudaError_t e = tree_launch_check(B, N, V, vocab_size, max_depth); e != cudaSuccess) return e;
  double* stats = scratch + B * reduce::num_blocks(vocab_size);
  tree_stats_kernel<<<static_cast<unsigned>(B * N), kThreads, 0, stream>>>(target_probs, V, vocab_size, false, stats);
  tree_sampling_kernel<<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
      candidates, parents, target_probs, N, V, vocab_size, max_depth, seed, offset, stats, tree_scratch, scratch, out);
  return cudaGetLastError();
}

cudaError_t typical_acceptance(const int64_t* candidates, const int64_t* parents, const float* target_probs, int64_t B,
                               int64_t N, int64_t V, int64_t vocab_size, int64_t max_depth, RowParam<double> epsilon,
                               RowParam<double> delta, RowParam<int64_t> seed, RowParam<int64_t> offset,
                               double* scratch, int64_t* tree_scratch, TreeOutputs out, cudaStream_t stream) {
  if (B <= 0) return cudaSuccess;
  if (const cudaError_t e = tree_launch_check(B, N, V, vocab_size, max_depth); e != cudaSuccess) return e;
  double* stats = scratch + B * reduce::num_blocks(vocab_size);
  tree_stats_kernel<<<static_cast<unsigned>(B * N), kThreads, 0, stream>>>(target_probs, V, vocab_size, true, stats);
  typical_kernel<<<static_cast<unsigned>(B), kThreads, 0, stream>>>(candidates, parents, target_probs, N, V, vocab_size,
                                                                    max_depth, epsilon, delta, seed, offset, stats,
                                                                    tree_scratch, scratch, out);
  return cudaGetLastError();
}

cudaError_t greedy_tree_verify(const int64_t* candidates, const int64_t* parents, const int64_t* target_ids, int64_t B,
                               int64_t N, int64_t vocab_size, int64_t max_depth, int64_t* tree_scratch, TreeOutputs out,
                               cudaStream_t stream) {
  if (B <= 0) return cudaSuccess;
  const int64_t blocks = (B + kVerifyThreads - 1) / kVerifyThreads;
  if (blocks > 2147483647 || N < 1 || N > 65536 || vocab_size < 1 || max_depth < 0 || max_depth > N - 1)
    return cudaErrorInvalidValue;
  greedy_tree_kernel<<<static_cast<unsigned>(blocks), kVerifyThreads, 0, stream>>>(
      candidates, parents, target_ids, B, N, vocab_size, max_depth, tree_scratch, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace decodekit
