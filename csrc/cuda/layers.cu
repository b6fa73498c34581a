// CUDA kernels of the layer family (see layers.h). Every value is computed by
// the CPU kernels' operations in their order (csrc/cpu/layers.cpp, linear.cpp):
//   16-lane sums    lane j (a thread of a half-warp) accumulates the elements
//                   j, j + 16, ... with fmaf in ascending order, zero-padded to
//                   a multiple of 16 like the CPU's tail loads;
//   tree_sum16      the lanes combined by xor-butterfly shuffles 8, 4, 2, 1:
//                   lane 0 ends with ((s0 + s8) + (s4 + s12)) + ... exactly as
//                   the CPU's fixed tree (float addition is commutative, so
//                   each pair gives the same bits from either side);
//   elementwise     the same expressions, products rounded before sums
//                   (--fmad=false, as the CPU's -ffp-contract=off).
#include "cuda/layers.h"

#include <cstdint>

#include "decodekit/math.h"

namespace decodekit {
namespace cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;

// tree_sum16 of the 16 lanes of this thread's half-warp (every lane gets the sum).
__device__ __forceinline__ float half_warp_tree_sum(float v) {
  for (int off = 8; off >= 1; off /= 2) v += __shfl_xor_sync(kFull, v, off);
  return v;
}

// ------------------------------------------------------------- rms_norm ----
constexpr int kNormThreads = 128;  // 8 half-warps: 8 rows per block

__global__ void __launch_bounds__(kNormThreads)
    rms_norm_kernel(const float* __restrict__ x, int64_t N, int64_t H, int64_t ldx, const float* __restrict__ w,
                    float eps, float* __restrict__ y, int64_t ldy) {
  const int lane = threadIdx.x & 15;
  const int64_t r = blockIdx.x * int64_t{kNormThreads / 16} + threadIdx.x / 16;
  const bool live = r < N;  // every lane takes part in the shuffles
  const float* xr = x + (live ? r : 0) * ldx;
  float acc = 0.0f;
  if (live)
    for (int64_t c = lane; c < (H + 15) / 16 * 16; c += 16) {
      const float v = c < H ? xr[c] : 0.0f;
      acc = fmaf(v, v, acc);
    }
  const float mean = half_warp_tree_sum(acc) / static_cast<float>(H);
  const float inv = 1.0f / sqrtf(mean + eps);
  if (!live) return;
  float* yr = y + r * ldy;
  for (int64_t c = lane; c < H; c += 16) yr[c] = w[c] * (xr[c] * inv);
}

// --------------------------------------------------------- silu_and_mul ----
constexpr int kEltThreads = 256;

// silu(g) * u as the CPU's silu_mul16, lane by lane.
__device__ __forceinline__ float silu_mul(float g, float u) {
  const bool pos = g >= 0.0f;
  const float neg_abs = pos ? 0.0f - g : g;
  const float e = exp_nonpositive(neg_abs);
  const float num = pos ? 1.0f : e;
  const float sig = num / (1.0f + e);
  return (g * sig) * u;
}

__global__ void __launch_bounds__(kEltThreads) silu_and_mul_kernel(const float* __restrict__ x, int64_t N, int64_t I,
                                                                   int64_t ldx, float* __restrict__ y, int64_t ldy) {
  const int64_t total = N * I;
  for (int64_t t = blockIdx.x * int64_t{kEltThreads} + threadIdx.x; t < total; t += int64_t{gridDim.x} * kEltThreads) {
    const int64_t r = t / I, i = t % I;
    const float* g = x + r * ldx;
    y[r * ldy + i] = silu_mul(g[i], g[I + i]);
  }
}

// ----------------------------------------------------------------- RoPE ----
__global__ void __launch_bounds__(kEltThreads)
    rope_kernel(float* __restrict__ x, int64_t N, int64_t H, int64_t D, int64_t ldx, const float* __restrict__ cos_t,
                const float* __restrict__ sin_t, int64_t P, const int64_t* __restrict__ positions) {
  const int64_t half = D / 2, total = N * H * half;
  for (int64_t t = blockIdx.x * int64_t{kEltThreads} + threadIdx.x; t < total; t += int64_t{gridDim.x} * kEltThreads) {
    const int64_t i = t % half, nh = t / half;
    const int64_t h = nh % H, n = nh / H;
    const int64_t pos = positions[n];
    if (pos < 0 || pos >= P) continue;  // outside the table: left unchanged (never read out of bounds)
    const float* c = cos_t + pos * D;
    const float* s = sin_t + pos * D;
    float* a = x + n * ldx + h * D;
    const float av = a[i], bv = a[half + i];
    const float p1 = av * c[i], p2 = bv * s[i];
    const float p3 = bv * c[half + i], p4 = av * s[half + i];
    a[i] = p1 - p2;
    a[half + i] = p3 + p4;
  }
}

// --------------------------------------------------------------- linear ----
// Block: 8 warps; warp w's half-warp hw computes column n = blockIdx.x * 16 +
// 2 w + hw for the rows m0 .. m0 + kTileM - 1 (m0 = blockIdx.y * kTileM). Lane
// j of the half-warp holds the 16-lane accumulator j of each of those outputs.
// The weight row is read once per row tile; x rows come from L1/L2.
constexpr int kLinThreads = 256;
constexpr int kTileM = 8;
constexpr int kColsPerBlock = kLinThreads / 16;

__global__ void __launch_bounds__(kLinThreads)
    linear_kernel(const float* __restrict__ x, int64_t M, int64_t K, int64_t ldx, const float* __restrict__ w,
                  int64_t N, int64_t ldw, const float* __restrict__ bias, float* __restrict__ y, int64_t ldy) {
  const int lane = threadIdx.x & 15;
  const int64_t n = blockIdx.x * int64_t{kColsPerBlock} + threadIdx.x / 16;
  const int64_t m0 = blockIdx.y * int64_t{kTileM};
  const bool live = n < N;
  const int rows = static_cast<int>(M - m0 < kTileM ? M - m0 : kTileM);
  const float* wr = w + (live ? n : 0) * ldw;
  float acc[kTileM];
#pragma unroll
  for (int i = 0; i < kTileM; ++i) acc[i] = 0.0f;
  const int64_t K16 = K - K % 16;
  if (live) {
#pragma unroll 4
    for (int64_t k = lane; k < K16; k += 16) {
      const float wv = wr[k];
#pragma unroll
      for (int i = 0; i < kTileM; ++i)
        if (i < rows) acc[i] = fmaf(x[(m0 + i) * ldx + k], wv, acc[i]);
    }
    if (K16 < K) {  // the CPU's zero-padded tail vector
      const int64_t k = K16 + lane;
      const bool in = k < K;
      const float wv = in ? wr[k] : 0.0f;
#pragma unroll
      for (int i = 0; i < kTileM; ++i)
        if (i < rows) acc[i] = fmaf(in ? x[(m0 + i) * ldx + k] : 0.0f, wv, acc[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < kTileM; ++i) acc[i] = half_warp_tree_sum(acc[i]);
  if (!live || lane != 0) return;
  const float b = bias ? bias[n] : 0.0f;
  for (int i = 0; i < rows; ++i) y[(m0 + i) * ldy + n] = acc[i] + b;
}

unsigned grid_1d(int64_t items, int threads) {
  const int64_t blocks = (items + threads - 1) / threads;
  return static_cast<unsigned>(blocks < (int64_t{1} << 20) ? blocks : (int64_t{1} << 20));
}

}  // namespace

cudaError_t rms_norm(const float* x, int64_t N, int64_t H, int64_t ldx, const float* w, float eps, float* y,
                     int64_t ldy, cudaStream_t stream) {
  if (N <= 0 || H <= 0) return cudaSuccess;
  const int64_t blocks = (N + kNormThreads / 16 - 1) / (kNormThreads / 16);
  if (blocks > 2147483647) return cudaErrorInvalidValue;
  rms_norm_kernel<<<static_cast<unsigned>(blocks), kNormThreads, 0, stream>>>(x, N, H, ldx, w, eps, y, ldy);
  return cudaGetLastError();
}

cudaError_t silu_and_mul(const float* x, int64_t N, int64_t I, int64_t ldx, float* y, int64_t ldy,
                         cudaStream_t stream) {
  if (N <= 0 || I <= 0) return cudaSuccess;
  silu_and_mul_kernel<<<grid_1d(N * I, kEltThreads), kEltThreads, 0, stream>>>(x, N, I, ldx, y, ldy);
  return cudaGetLastError();
}

cudaError_t rope_inplace(float* x, int64_t N, int64_t H, int64_t D, int64_t ldx, const float* cos_table,
                         const float* sin_table, int64_t P, const int64_t* positions, cudaStream_t stream) {
  if (N <= 0 || H <= 0 || D < 2) return cudaSuccess;
  rope_kernel<<<grid_1d(N * H * (D / 2), kEltThreads), kEltThreads, 0, stream>>>(x, N, H, D, ldx, cos_table, sin_table,
                                                                                 P, positions);
  return cudaGetLastError();
}

cudaError_t linear(const float* x, int64_t M, int64_t K, int64_t ldx, const float* w, int64_t N, int64_t ldw,
                   const float* bias, float* y, int64_t ldy, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  const int64_t gx = (N + kColsPerBlock - 1) / kColsPerBlock, gy = (M + kTileM - 1) / kTileM;
  if (gx > 2147483647 || gy > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  linear_kernel<<<grid, kLinThreads, 0, stream>>>(x, M, K, ldx, w, N, ldw, bias, y, ldy);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace decodekit
