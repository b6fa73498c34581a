// Per-token layer operations (see layers.h). Compiled once per instruction set;
// every build gives the same bits (lane-wise operations, explicit FMAs, no
// contraction).
#include "layers.h"
#include "cpu/common/isa.h"
#include "cpu/common/parallel.h"

#include <algorithm>
#include <cmath>
#include <cstring>

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

}  // namespace DK_ISA
}  // namespace cpu
}  // namespace decodekit
