// Per-token layer operations and the decoder block composed of the family's
// kernels (see layers.h). Compiled once per instruction set; every build gives
// the same bits (lane-wise operations, explicit FMAs, no contraction).
#include "layers.h"
#include "cpu/common/isa.h"
#include "cpu/common/parallel.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/common/scratch.h"
#include "cpu/common/vec.h"

namespace decodekit {
namespace cpu {
namespace DK_ISA {
namespace {

constexpr int kL = kVecLanes;
// Floats per thread below which waking another thread costs more than it saves.
constexpr int64_t kMinWorkPerThread = 1 << 15;

DK_VINLINE VF load_tail(const float* p, int64_t n) {
  float t[kL] = {0};
  std::memcpy(t, p, static_cast<size_t>(n) * sizeof(float));
  return load_f32(t);
}

DK_VINLINE void store_tail(float* p, VF v, int64_t n) {
  float t[kL];
  store_f32(t, v);
  std::memcpy(p, t, static_cast<size_t>(n) * sizeof(float));
}

// silu(g) * u lane-wise: e = exp(-|g|) <= 1; sigmoid(g) = 1 / (1 + e) for g >= 0, e / (1 + e) otherwise.
DK_VINLINE VF silu_mul16(VF g, VF u) {
  const VF zero = splat(0.0f), one = splat(1.0f);
  const VI pos = g >= zero;
  const VF neg_abs = select(pos, zero - g, g);
  const VF e = exp16(neg_abs);
  const VF num = select(pos, one, e);
  const VF sig = num / (one + e);
  return (g * sig) * u;
}

}  // namespace

void rms_norm(const float* x, int64_t N, int64_t H, int64_t ldx, const float* w, float eps, float* y, int64_t ldy,
              int num_threads) {
  const int nt = threads_for(N, num_threads, N * H, kMinWorkPerThread);
  const int64_t H16 = H - H % kL;
  parallel_rows(N, nt, Schedule::kStatic, [&](int64_t r) {
    const float* xr = x + r * ldx;
    float* yr = y + r * ldy;
    VF acc = splat(0.0f);
    for (int64_t c = 0; c < H16; c += kL) {
      const VF v = load_f32(xr + c);
      acc = fma16(v, v, acc);
    }
    if (H16 < H) {
      const VF v = load_tail(xr + H16, H - H16);
      acc = fma16(v, v, acc);
    }
    const float mean = tree_sum16(acc) / static_cast<float>(H);
    const VF inv = splat(1.0f / std::sqrt(mean + eps));
    for (int64_t c = 0; c < H16; c += kL) store_f32(yr + c, load_f32(w + c) * (load_f32(xr + c) * inv));
    if (H16 < H) store_tail(yr + H16, load_tail(w + H16, H - H16) * (load_tail(xr + H16, H - H16) * inv), H - H16);
  });
}

void silu_and_mul(const float* x, int64_t N, int64_t I, int64_t ldx, float* y, int64_t ldy, int num_threads) {
  const int nt = threads_for(N, num_threads, N * I, kMinWorkPerThread);
  const int64_t I16 = I - I % kL;
  parallel_rows(N, nt, Schedule::kStatic, [&](int64_t r) {
    const float* g = x + r * ldx;
    const float* u = g + I;
    float* yr = y + r * ldy;
    for (int64_t c = 0; c < I16; c += kL) store_f32(yr + c, silu_mul16(load_f32(g + c), load_f32(u + c)));
    if (I16 < I) store_tail(yr + I16, silu_mul16(load_tail(g + I16, I - I16), load_tail(u + I16, I - I16)), I - I16);
  });
}

void rope_inplace(float* x, int64_t N, int64_t H, int64_t D, int64_t ldx, const float* cos_table,
                  const float* sin_table, const int64_t* positions, int num_threads) {
  const int64_t half = D / 2;
  const int nt = threads_for(N, num_threads, N * H * D, kMinWorkPerThread);
  parallel_rows(N, nt, Schedule::kStatic, [&](int64_t n) {
    const float* c = cos_table + positions[n] * D;
    const float* s = sin_table + positions[n] * D;
    for (int64_t h = 0; h < H; ++h) {
      float* a = x + n * ldx + h * D;
      float* b = a + half;
      int64_t i = 0;
      for (; i + kL <= half; i += kL) {
        const VF av = load_f32(a + i), bv = load_f32(b + i);
        const VF ra = av * load_f32(c + i) - bv * load_f32(s + i);
        const VF rb = bv * load_f32(c + half + i) + av * load_f32(s + half + i);
        store_f32(a + i, ra);
        store_f32(b + i, rb);
      }
      for (; i < half; ++i) {
        const float av = a[i], bv = b[i];
        const float p1 = av * c[i], p2 = bv * s[i];
        const float p3 = bv * c[half + i], p4 = av * s[half + i];
        a[i] = p1 - p2;
        b[i] = p3 + p4;
      }
    }
  });
}

// ------------------------------------------------------- decoder_layer ----
namespace {

// y [M, N] = x [M, K] W^T, as decodekit.linear / linear_quantized run it on contiguous rows.
void project(const LayerWeight& w, const float* x, int64_t M, int64_t K, int64_t N, float* y, int num_threads) {
  if (w.quantized)
    linear_quantized(x, M, K, K, static_cast<const uint8_t*>(w.data), w.type, N, nullptr, y, N, num_threads);
  else
    linear(x, M, K, K, static_cast<const float*>(w.data), N, K, nullptr, y, N, num_threads);
}

// x += y over n floats (the residual add: one float32 addition per element, as x + y in torch).
void add_inplace(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

// Rounds n floats up to a whole number of 64-byte lines, so every scratch region starts on one.
constexpr int64_t lines(int64_t n) { return (n + 15) / 16 * 16; }

// The phase timers (layers.h, layer_profile): lap(phase) adds the time since the previous lap.
struct Laps {
  bool on;
  std::chrono::steady_clock::time_point t;
  explicit Laps(bool enabled) : on(enabled) {
    if (on) {
      layer_profile::count_call();
      t = std::chrono::steady_clock::now();
    }
  }
  void lap(layer_profile::Phase phase) {
    if (!on) return;
    const auto now = std::chrono::steady_clock::now();
    layer_profile::add(phase, std::chrono::duration_cast<std::chrono::nanoseconds>(now - t).count());
    t = now;
  }
};

}  // namespace

void decoder_layer(float* x, const DecoderLayerParams& p, int num_threads) {
  const int64_t M = p.B * p.T, H = p.hidden, D = p.head_dim, I = p.intermediate;
  if (M <= 0) return;
  const int64_t q_size = p.num_heads * D, kv_size = p.num_kv_heads * D, qkv_size = q_size + 2 * kv_size;
  // Scratch, kept per thread between calls: h [M, H] (a norm's output, then a projection's before
  // its residual add), and one region used first by qkv [M, qkv_size], q [M, q_size] and the
  // attention output [M, q_size], then by gate/up [M, 2 I] and the activation [M, I].
  const int64_t n_h = lines(M * H);
  const int64_t n_qkv = lines(M * qkv_size), n_q = lines(M * q_size);
  const int64_t n_gu = lines(M * 2 * I), n_act = lines(M * I);
  const int64_t n_region = std::max(n_qkv + 2 * n_q, n_gu + n_act);
  static thread_local Buf<float> scratch;
  float* h = scratch.get(n_h + n_region + 16);
  h += (16 - (reinterpret_cast<uintptr_t>(h) / sizeof(float)) % 16) % 16;  // 64-byte aligned
  float* region = h + n_h;
  float* qkv = region;
  float* q = qkv + n_qkv;
  float* attn = q + n_q;
  float* gu = region;
  float* act = gu + n_gu;

  using layer_profile::Phase;
  Laps laps(layer_profile::enabled());

  // Attention half.
  rms_norm(x, M, H, H, p.attn_norm, p.eps, h, H, num_threads);
  laps.lap(Phase::kNorm);
  project(p.wqkv, h, M, H, qkv_size, qkv, num_threads);
  laps.lap(Phase::kProjectQKV);
  rope_inplace(qkv, M, p.num_heads + p.num_kv_heads, D, qkv_size, p.cos_table, p.sin_table, p.positions,
               num_threads);  // q and k heads are adjacent
  laps.lap(Phase::kRope);
  KVRows rows;
  rows.key = qkv + q_size;
  rows.value = qkv + q_size + kv_size;
  rows.key_stride_t = rows.value_stride_t = qkv_size;
  rows.key_stride_h = rows.value_stride_h = D;
  append_paged_kv_cache(p.cache, p.num_blocks, p.block_size, rows, p.slot_mapping, M, num_threads);
  laps.lap(Phase::kKVAppend);
  for (int64_t m = 0; m < M; ++m)
    std::memcpy(q + m * q_size, qkv + m * qkv_size, static_cast<size_t>(q_size) * sizeof(float));
  const PagedKV kv{p.cache.k,
                   p.cache.v,
                   ScalarKind::kFloat32,
                   p.num_blocks,
                   p.block_size,
                   p.num_kv_heads,
                   D,
                   p.cache.layout == KVLayout::kHND};
  paged_attention(q, p.B, p.T, p.num_heads, kv, p.block_tables, p.max_blocks, p.seq_lens, p.tree_mask, p.scale,
                  num_threads, attn);
  laps.lap(Phase::kAttention);
  project(p.wo, attn, M, q_size, H, h, num_threads);
  laps.lap(Phase::kProjectO);
  add_inplace(x, h, M * H);
  laps.lap(Phase::kResidual);

  // Feed-forward half.
  rms_norm(x, M, H, H, p.ffn_norm, p.eps, h, H, num_threads);
  laps.lap(Phase::kNorm);
  project(p.w_gate_up, h, M, H, 2 * I, gu, num_threads);
  laps.lap(Phase::kProjectGateUp);
  silu_and_mul(gu, M, I, 2 * I, act, I, num_threads);
  laps.lap(Phase::kActivation);
  project(p.w_down, act, M, I, H, h, num_threads);
  laps.lap(Phase::kProjectDown);
  add_inplace(x, h, M * H);
  trim(scratch);
  laps.lap(Phase::kResidual);
}

}  // namespace DK_ISA
}  // namespace cpu
}  // namespace decodekit
