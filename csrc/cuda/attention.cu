// Paged decode attention on the GPU (see attention.h): the CPU kernel's
// operations (csrc/cpu/attention.cpp) in the CPU's order, so the same bits.
//
// Grid: (sequence b, KV head) x query position i x groups of up to 8 query
// heads. A block stages 1 to 4 tiles of 16 positions of its KV head at a time
// in shared memory (keys and values converted to float32 and zero-padded to
// Dp, a multiple of 16), then each warp updates one query row (b, i, h) tile
// by tile:
//   scores    half-warp hw takes the positions 2 jj + hw; lane j of it
//             accumulates fmaf(q[d], k[d], acc) over d = j, j + 16, ...;
//             the 16 lanes are combined by xor shuffles 8, 4, 2, 1, the
//             CPU's tree_sum16; then * scale (-inf for an absent position);
//   softmax   the tile maximum in position order, the NaN flag, the running
//             max m and sum l updated as the CPU does (exp_nonpositive of
//             decodekit/math.h, the scalar twin of the CPU's exp16), the 16
//             weights summed by the same tree;
//   values    lane t owns the dimensions t, t + 32, ...: acc * alpha, then
//             fmaf(p_j, v_j[d], acc) in position order.
// Online softmax: Milakov & Gimelshein (2018); Dao et al., FlashAttention (2022).
#include "cuda/attention.h"

#include <cstdint>

#include "decodekit/math.h"

namespace decodekit {
namespace cuda {
namespace {

constexpr int kTile = 16;
constexpr int kMaxWarps = 8;
constexpr int kMaxDp = static_cast<int>(kMaxAttentionHeadDim);
constexpr unsigned kFull = 0xffffffffu;
constexpr float kInf = __builtin_huge_valf();

__device__ __forceinline__ float half_warp_tree_sum(float v) {
  for (int off = 8; off >= 1; off /= 2) v += __shfl_xor_sync(kFull, v, off);
  return v;
}

// Tiles per stage: as many as fit in 48 KB of shared memory with the row stride Ds.
__host__ __device__ __forceinline__ int stage_tiles(int Dp) { return Dp <= 64 ? 4 : (Dp <= 128 ? 2 : 1); }

__host__ __device__ __forceinline__ int row_stride(int Dp) { return Dp % 32 == 0 ? Dp + 16 : Dp; }

template <int K>
__device__ __forceinline__ float load_elem(const void* base, int64_t i) {
  if constexpr (K == 0) {
    return static_cast<const float*>(base)[i];
  } else if constexpr (K == 1) {
    return half_bits_to_float(static_cast<const uint16_t*>(base)[i]);
  } else {
    return bf16_bits_to_float(static_cast<const uint16_t*>(base)[i]);
  }
}

template <int K>
__global__ void __launch_bounds__(kMaxWarps * 32, 1)
    paged_attention_kernel(const float* __restrict__ q, int64_t Q, int64_t Hq, PagedKVView kv,
                           const int64_t* __restrict__ block_tables, int64_t max_blocks,
                           const int64_t* __restrict__ seq_lens, const uint8_t* __restrict__ tree_mask, float scale,
                           float* __restrict__ out) {
  extern __shared__ float smem[];
  const int64_t Hkv = kv.num_kv_heads, D = kv.head_dim, bs = kv.block_size;
  const int Dp = static_cast<int>((D + 15) / 16 * 16);
  const int Ds = row_stride(Dp);            // the two half-warps read different banks
  const int nst = stage_tiles(Dp) * kTile;  // positions per stage
  float* ks = smem;
  float* vs = ks + nst * Ds;
  float* s_sh = vs + nst * Ds;                                   // [warps][16] scores
  float* p_sh = s_sh + kMaxWarps * kTile;                        // [warps][16] weights
  int* pres = reinterpret_cast<int*>(p_sh + kMaxWarps * kTile);  // [nst] present flags

  const int64_t b = blockIdx.x / Hkv, kvh = blockIdx.x % Hkv, i = blockIdx.y;
  const int64_t group = Hq / Hkv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, l16 = lane & 15, hw = lane >> 4;
  const int64_t g = int64_t{blockIdx.z} * kMaxWarps + warp;
  const bool live = g < group;
  const int64_t h = kvh * group + (live ? g : 0);
  const int64_t* table = block_tables + b * max_blocks;
  int64_t n = seq_lens[b];
  n = n < 0 ? 0 : n;
  n = n < max_blocks * bs ? n : max_blocks * bs;  // positions past the table cannot be read
  const int64_t last = n - Q + i;                 // the last position this query row attends to
  const int64_t end = last + 1;
  // A tree mask removes new tokens from this row's walk (never scored nor added), as on the CPU:
  // position pos >= first_new is new token pos - first_new (<= i, since pos <= last).
  const int64_t first_new = n - Q;
  const uint8_t* mrow = tree_mask != nullptr ? tree_mask + (b * Q + i) * Q : nullptr;

  const float* qrow = q + ((b * Q + i) * Hq + h) * D;
  const int nc = Dp / 16, nc2 = (Dp + 31) / 32;
  float qr[kMaxDp / 16];
  float ac[kMaxDp / 32];
#pragma unroll
  for (int c = 0; c < kMaxDp / 16; ++c) {
    const int64_t d = l16 + 16 * c;
    qr[c] = c < nc && d < D ? qrow[d] : 0.0f;
  }
#pragma unroll
  for (int c = 0; c < kMaxDp / 32; ++c) ac[c] = 0.0f;
  float m = -kInf, l = 0.0f;
  bool nan_row = false;

  // Stages of nsub tiles: more loads in flight per barrier; each tile is then
  // processed exactly as alone (the same operations, so the same bits).
  const int nsub = stage_tiles(Dp);
  for (int64_t t0 = 0; t0 < end; t0 += kTile * nsub) {
    // Stage the tiles: absent positions and padded dimensions are zeros.
    for (int idx = threadIdx.x; idx < nsub * kTile * Dp; idx += blockDim.x) {
      const int j = idx / Dp, d = idx % Dp;
      const int64_t pos = t0 + j;
      int64_t blk = -1;
      if (pos < n) blk = table[pos / bs];
      const bool present = blk >= 0 && blk < kv.num_blocks;
      float kx = 0.0f, vx = 0.0f;
      if (present && d < D) {
        const int64_t off = pos % bs;
        const int64_t elem = kv.hnd ? ((blk * Hkv + kvh) * bs + off) * D + d : ((blk * bs + off) * Hkv + kvh) * D + d;
        kx = load_elem<K>(kv.k, elem);
        vx = load_elem<K>(kv.v, elem);
      }
      ks[j * Ds + d] = kx;
      vs[j * Ds + d] = vx;
      if (d == 0) pres[j] = present ? 1 : 0;
    }
    __syncthreads();
    for (int sub = 0; sub < nsub && live; ++sub) {
      const int64_t t1 = t0 + sub * kTile;
      if (t1 >= end) break;
      const int64_t cnt = n - t1 < kTile ? n - t1 : kTile;
      const int64_t upto = cnt < last - t1 + 1 ? cnt : last - t1 + 1;  // >= 1: t1 <= last
      const float* kt = ks + sub * kTile * Ds;
      const float* vt = vs + sub * kTile * Ds;
      const int* pt = pres + sub * kTile;
      // The positions of the tile this row reads: present, at most its last, and allowed by its mask.
      unsigned seen = 0;
      for (int j = 0; j < kTile; ++j) {
        const int64_t pos = t1 + j;
        if (j < upto && pt[j] && (mrow == nullptr || pos < first_new || mrow[pos - first_new] != 0)) seen |= 1u << j;
      }
      // The 8 dot products of this half-warp side by side (independent chains,
      // then the 8 trees together): the same operations per product.
      float dots[kTile / 2];
#pragma unroll
      for (int jj = 0; jj < kTile / 2; ++jj) {
        const int j = 2 * jj + hw;
        float acc = 0.0f;
#pragma unroll
        for (int c = 0; c < kMaxDp / 16; ++c)
          if (c < nc) acc = fmaf(qr[c], kt[j * Ds + l16 + 16 * c], acc);
        dots[jj] = acc;
      }
#pragma unroll
      for (int off = 8; off >= 1; off /= 2)
#pragma unroll
        for (int jj = 0; jj < kTile / 2; ++jj) dots[jj] += __shfl_xor_sync(kFull, dots[jj], off);
      if (l16 == 0)
#pragma unroll
        for (int jj = 0; jj < kTile / 2; ++jj) {
          const int j = 2 * jj + hw;
          s_sh[warp * kTile + j] = (seen >> j) & 1u ? dots[jj] * scale : -kInf;
        }
      __syncwarp();
      float tmax = -kInf;
      for (int j = 0; j < kTile; ++j) {
        const float sj = s_sh[warp * kTile + j];
        tmax = sj > tmax ? sj : tmax;
        if (sj != sj) nan_row = true;
      }
      if (tmax != -kInf) {
        const float m_new = m > tmax ? m : tmax;
        const float alpha = exp_nonpositive(m - m_new);
        const float pj = exp_nonpositive(s_sh[warp * kTile + l16] - m_new);
        const float psum = half_warp_tree_sum(pj);
        l = l * alpha + psum;
        m = m_new;
        if (hw == 0) p_sh[warp * kTile + l16] = pj;
        __syncwarp();
#pragma unroll
        for (int c = 0; c < kMaxDp / 32; ++c)
          if (c < nc2) ac[c] = ac[c] * alpha;
        for (int j = 0; j < upto; ++j) {
          if (!((seen >> j) & 1u)) continue;
          const float w = p_sh[warp * kTile + j];
#pragma unroll
          for (int c = 0; c < kMaxDp / 32; ++c) {
            const int d = lane + 32 * c;
            if (c < nc2 && d < Dp) ac[c] = fmaf(w, vt[j * Ds + d], ac[c]);
          }
        }
      }
      __syncwarp();  // s_sh / p_sh are rewritten by the next tile
    }
    __syncthreads();  // the stage buffers are rewritten by the next stage
  }
  if (!live) return;
  float* o = out + ((b * Q + i) * Hq + h) * D;
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
  for (int c = 0; c < kMaxDp / 32; ++c) {
    const int64_t d = lane + 32 * c;
    if (c < nc2 && d < D) o[d] = nan_row ? __int_as_float(0x7fc00000) : ac[c] * inv;
  }
}

}  // namespace

cudaError_t paged_attention(const float* q, int64_t B, int64_t Q, int64_t Hq, const PagedKVView& kv,
                            const int64_t* block_tables, int64_t max_blocks, const int64_t* seq_lens,
                            const uint8_t* tree_mask, float scale, float* out, cudaStream_t stream) {
  if (B <= 0 || Q <= 0 || Hq <= 0 || kv.head_dim <= 0) return cudaSuccess;
  if (kv.num_kv_heads <= 0 || Hq % kv.num_kv_heads != 0 || kv.head_dim > kMaxAttentionHeadDim || kv.block_size <= 0)
    return cudaErrorInvalidValue;
  const int64_t group = Hq / kv.num_kv_heads;
  const int64_t gx = B * kv.num_kv_heads, gz = (group + kMaxWarps - 1) / kMaxWarps;
  if (gx > 2147483647 || Q > 65535 || gz > 65535) return cudaErrorInvalidValue;
  const int warps = static_cast<int>(group < kMaxWarps ? group : kMaxWarps);
  const int Dp = static_cast<int>((kv.head_dim + 15) / 16 * 16);
  const int Ds = row_stride(Dp), nst = stage_tiles(Dp) * kTile;
  const size_t shmem = sizeof(float) * (2 * nst * Ds + 2 * kMaxWarps * kTile) + sizeof(int) * nst;
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(Q), static_cast<unsigned>(gz));
  const unsigned threads = static_cast<unsigned>(warps * 32);
  switch (kv.kind) {
    case ScalarKind::kFloat32:
      paged_attention_kernel<0>
          <<<grid, threads, shmem, stream>>>(q, Q, Hq, kv, block_tables, max_blocks, seq_lens, tree_mask, scale, out);
      break;
    case ScalarKind::kFloat16:
      paged_attention_kernel<1>
          <<<grid, threads, shmem, stream>>>(q, Q, Hq, kv, block_tables, max_blocks, seq_lens, tree_mask, scale, out);
      break;
    case ScalarKind::kBFloat16:
      paged_attention_kernel<2>
          <<<grid, threads, shmem, stream>>>(q, Q, Hq, kv, block_tables, max_blocks, seq_lens, tree_mask, scale, out);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace decodekit
