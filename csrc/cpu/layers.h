// CPU kernels of the layer family: the per-token operations around a decoder
// block's matrix products (RMSNorm, the SwiGLU activation, rotary embeddings),
// and one whole Llama block composed of the family's kernels (DecoderLayerKernel).
// Each row's result depends only on that row (batch-invariant). Framework-free.
#pragma once

#include <cstdint>

#include "cpu/kv_cache.h"
#include "cpu/linear.h"

namespace decodekit {
namespace cpu {

// y[r, :] = w * (x[r, :] * (1 / sqrt(mean(x[r, :]^2) + eps))) for r < N rows of H
// floats (row strides ldx, ldy). The sum of squares uses 16 float32 lanes (lane
// j takes the columns j mod 16, fused multiply-adds in ascending order, the
// tail zero-padded), combined in the fixed tree of tree_sum16.
using RmsNormKernel = void(const float* x, int64_t N, int64_t H, int64_t ldx, const float* w, float eps, float* y,
                           int64_t ldy, int num_threads);

// y[r, i] = silu(x[r, i]) * x[r, I + i] for i < I (gate then up, as a fused
// gate/up projection writes them); silu(g) = g * sigmoid(g), with the sigmoid
// from exp(-|g|) so the exponential never overflows.
using SiluAndMulKernel = void(const float* x, int64_t N, int64_t I, int64_t ldx, float* y, int64_t ldy,
                              int num_threads);

// Rotary embedding in place, "rotate half" layout: for token n (row stride
// ldx) and each of the first H heads of D floats, with c = cos_table[pos[n]],
// s = sin_table[pos[n]] (tables [P, D]): x[i] <- x[i] c[i] - x[i + D/2] s[i] and
// x[i + D/2] <- x[i + D/2] c[i + D/2] + x[i] s[i + D/2], each product rounded
// before the sum (the bits of x * cos + rotate_half(x) * sin in float32).
using RopeInplaceKernel = void(float* x, int64_t N, int64_t H, int64_t D, int64_t ldx, const float* cos_table,
                               const float* sin_table, const int64_t* positions, int num_threads);

// One weight matrix [N, K] of a decoder block: float32 rows (contiguous,
// row stride K) or GGML blocks of `type` (N rows of K / 32 blocks).
struct LayerWeight {
  const void* data = nullptr;
  bool quantized = false;
  BlockType type = BlockType::kQ4_1;  // when quantized
};

// Everything one Llama block of the paged forward reads and writes besides the
// residual stream. M = B * T token rows, row b * T + t is token t of sequence b.
struct DecoderLayerParams {
  int64_t B = 0, T = 0;                // sequences, new tokens per sequence
  int64_t hidden = 0;                  // H
  int64_t num_heads = 0;               // Hq
  int64_t num_kv_heads = 0;            // Hkv (divides Hq)
  int64_t head_dim = 0;                // D (even)
  int64_t intermediate = 0;            // I
  float eps = 0.0f;                    // RMSNorm epsilon
  float scale = 0.0f;                  // attention score scale
  const float* attn_norm = nullptr;    // [H]
  LayerWeight wqkv;                    // [(Hq + 2 Hkv) D, H]: q, then k, then v rows
  LayerWeight wo;                      // [H, Hq D]
  const float* ffn_norm = nullptr;     // [H]
  LayerWeight w_gate_up;               // [2 I, H]: gate rows, then up rows
  LayerWeight w_down;                  // [H, I]
  const float* cos_table = nullptr;    // [P, D]
  const float* sin_table = nullptr;    // [P, D]
  const int64_t* positions = nullptr;  // [M] in [0, P)
  // The layer's paged cache: float32 [num_blocks, block_size, Hkv, D] (NHD) or
  // [num_blocks, Hkv, block_size, D] (HND); cache.num_heads = Hkv, cache.head_dim = D.
  KVCacheTensors cache;
  int64_t num_blocks = 0, block_size = 0;
  const int64_t* slot_mapping = nullptr;  // [M]: the slot of each new token (negative: not written)
  const int64_t* block_tables = nullptr;  // [B, max_blocks]
  int64_t max_blocks = 0;
  const int64_t* seq_lens = nullptr;  // [B]: cached tokens, the T new ones included
  // [B, T, T] 0/1 bytes: the new tokens form a tree (paged_attention's tree mask), or null for
  // the causal rule. Not reachable from the op's schema yet (kernel-level only).
  const uint8_t* tree_mask = nullptr;
};

// One Llama block in place on the residual stream x [M, H] (float32, contiguous):
//   h = rms_norm(x, attn_norm); qkv = h Wqkv^T; RoPE on the q and k heads of qkv
//   (positions); k, v -> the paged cache at slot_mapping; a = paged attention of q
//   over block_tables / seq_lens; x += a Wo^T;
//   h = rms_norm(x, ffn_norm); x += silu_and_mul(h Wgate_up^T) Wdown^T.
// Each step is the family's kernel of that name (RmsNormKernel, LinearKernel or
// LinearQuantizedKernel, RopeInplaceKernel, AppendPagedKVCacheKernel,
// PagedAttentionKernel, SiluAndMulKernel) called as the per-op path calls it, and
// the residual adds are float32 additions, so x and the cache get exactly the bits
// of that sequence of ops. Intermediates live in per-thread scratch kept between
// calls. The caller has checked the sizes, the positions against the tables and
// the slots against the pool.
using DecoderLayerKernel = void(float* x, const DecoderLayerParams& p, int num_threads);

// Phase timers of DecoderLayerKernel, off by default (a diagnostic for
// bench/anchors/e2e/profile_step.py, through decodekit._C._layer_profile): while
// on, every call adds the wall nanoseconds of each of its phases, as the calling
// thread sees them, to process-wide counters. Off, a call reads one flag.
// Compiled once (csrc/cpu/layers_profile.cpp), shared by every instruction set.
namespace layer_profile {
enum Phase : int {
  kNorm,        // both RMSNorms
  kProjectQKV,  // the four weight products
  kProjectO,
  kProjectGateUp,
  kProjectDown,
  kRope,
  kKVAppend,
  kAttention,    // including the copy of q out of the fused projection
  kActivation,   // SiLU-and-mul
  kResidual,     // both residual adds
  kHeadNorm,     // the final RMSNorm (when the fast layer loop also runs the LM head)
  kProjectHead,  // the LM head's product (idem)
  kNumPhases
};
bool enabled();
void set_enabled(bool on);  // also resets the counters
void add(Phase phase, int64_t ns);
void read(int64_t* ns, int64_t* calls);  // ns[kNumPhases]; calls: decoder_layer calls timed
void count_call();
}  // namespace layer_profile

}  // namespace cpu
}  // namespace decodekit
