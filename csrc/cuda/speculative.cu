// Lossless speculative sampling of a draft chain, and greedy verification, on
// the GPU (see speculative.h and csrc/cpu/speculative/chain.cpp, whose steps
// this kernel follows one by one).
//
// Source: Leviathan, Kalman & Matias, "Fast Inference from Transformers via
// Speculative Decoding" (ICML 2023); Chen et al., "Accelerating Large Language
// Model Decoding with Speculative Sampling" (2023).
#include "cuda/speculative.h"

#include <cstdint>

#include "decodekit/philox.h"
#include "decodekit/reduce.h"

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
__device__ double exact_block_sum(const Residual& r, int64_t k, int64_t n) {
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
__device__ int64_t draw(const Residual& r, int64_t n, double u, double* sums, Shared& sh) {
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

}  // namespace cuda
}  // namespace decodekit
