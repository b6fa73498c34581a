// CUDA kernels of the KV-cache family (see kv_cache.h and csrc/cpu/kv_cache.h).
//
// One thread per (token row, head, vector) of the new rows: a head row of D
// elements is copied as D * elem_size / W vectors of W bytes (W = 16, 8, 4 or
// 2, the widest that divides every base address, stride and row length in
// bytes), so consecutive threads read and write consecutive bytes of a head
// row. Each destination element is written by at most one thread (given
// distinct slots), and the kernels are pure copies: the result is the CPU's.
#include "cuda/kv_cache.h"

#include <cstdint>

namespace decodekit {
namespace cuda {
namespace {

constexpr int kThreads = 256;

struct alignas(2) V2 {
  uint16_t x;
};
struct alignas(4) V4 {
  uint32_t x;
};
struct alignas(8) V8 {
  uint2 x;
};
struct alignas(16) V16 {
  uint4 x;
};

// Strides in vectors of the new rows and the cache geometry, for one call.
struct Geometry {
  int64_t H, vpr;                  // heads, vectors per head row
  int64_t kb, kt, kh, vb, vt, vh;  // key / value strides (b, t, h) in vectors
};

// Contiguous append: item = ((b * tokens + t) * H + h) * vpr + c.
template <class Vec>
__global__ void __launch_bounds__(kThreads)
    append_contiguous_kernel(Vec* __restrict__ kc, Vec* __restrict__ vc, const Vec* __restrict__ key,
                             const Vec* __restrict__ value, Geometry g, int64_t tokens, int64_t S, bool hnd,
                             const int64_t* __restrict__ seq_lens, int64_t items) {
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < items; i += int64_t{gridDim.x} * kThreads) {
    const int64_t c = i % g.vpr;
    int64_t r = i / g.vpr;
    const int64_t h = r % g.H;
    r /= g.H;
    const int64_t t = r % tokens, b = r / tokens;
    const int64_t s = seq_lens[b];
    if (s < 0 || s >= S || t >= S - s) continue;  // past the cache: skipped, never written
    const int64_t pos = s + t;
    const int64_t dst = hnd ? ((b * g.H + h) * S + pos) * g.vpr + c : ((b * S + pos) * g.H + h) * g.vpr + c;
    kc[dst] = key[b * g.kb + t * g.kt + h * g.kh + c];
    vc[dst] = value[b * g.vb + t * g.vt + h * g.vh + c];
  }
}

// Paged append: item = (n * H + h) * vpr + c for row n < num_slots.
template <class Vec>
__global__ void __launch_bounds__(kThreads)
    append_paged_kernel(Vec* __restrict__ kc, Vec* __restrict__ vc, const Vec* __restrict__ key,
                        const Vec* __restrict__ value, Geometry g, int64_t total, int64_t bs, bool hnd,
                        const int64_t* __restrict__ slot_mapping, int64_t items) {
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < items; i += int64_t{gridDim.x} * kThreads) {
    const int64_t c = i % g.vpr;
    const int64_t r = i / g.vpr;
    const int64_t h = r % g.H, n = r / g.H;
    const int64_t slot = slot_mapping[n];
    if (slot < 0 || slot >= total) continue;  // padding, or outside the pool: skipped
    const int64_t dst = hnd ? (((slot / bs) * g.H + h) * bs + slot % bs) * g.vpr + c : (slot * g.H + h) * g.vpr + c;
    kc[dst] = key[n * g.kt + h * g.kh + c];
    vc[dst] = value[n * g.vt + h * g.vh + c];
  }
}

// The widest vector (bytes) dividing every address, stride and the row length.
int vector_bytes(const cpu::KVCacheTensors& c, const cpu::KVRows& r) {
  const uint64_t es = static_cast<uint64_t>(c.elem_size);
  uint64_t bits = static_cast<uint64_t>(c.head_dim) * es;
  bits |= reinterpret_cast<uintptr_t>(c.k) | reinterpret_cast<uintptr_t>(c.v);
  bits |= reinterpret_cast<uintptr_t>(r.key) | reinterpret_cast<uintptr_t>(r.value);
  for (int64_t s :
       {r.key_stride_b, r.key_stride_t, r.key_stride_h, r.value_stride_b, r.value_stride_t, r.value_stride_h})
    bits |= static_cast<uint64_t>(s) * es;
  for (int w : {16, 8, 4})
    if (bits % static_cast<uint64_t>(w) == 0) return w;
  return 2;
}

Geometry geometry(const cpu::KVCacheTensors& c, const cpu::KVRows& r, int w) {
  Geometry g;  // w divides the row and every stride in bytes (vector_bytes)
  g.H = c.num_heads;
  g.vpr = c.head_dim * c.elem_size / w;
  const auto vec = [&](int64_t stride_elems) { return stride_elems * c.elem_size / w; };
  g.kb = vec(r.key_stride_b), g.kt = vec(r.key_stride_t), g.kh = vec(r.key_stride_h);
  g.vb = vec(r.value_stride_b), g.vt = vec(r.value_stride_t), g.vh = vec(r.value_stride_h);
  return g;
}

unsigned grid_for(int64_t items) {
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65536 * 16 ? blocks : 65536 * 16);  // grid-stride past ~268M items
}

}  // namespace

cudaError_t append_kv_cache(const cpu::KVCacheTensors& c, int64_t batch, int64_t max_seq_len, const cpu::KVRows& r,
                            int64_t tokens, const int64_t* seq_lens, cudaStream_t stream) {
  if (batch <= 0 || tokens <= 0 || c.num_heads <= 0 || c.head_dim <= 0 || max_seq_len <= 0) return cudaSuccess;
  if (c.elem_size != 2 && c.elem_size != 4) return cudaErrorInvalidValue;
  const int w = vector_bytes(c, r);
  const Geometry g = geometry(c, r, w);
  const int64_t items = batch * tokens * g.H * g.vpr;
  const bool hnd = c.layout == cpu::KVLayout::kHND;
  const unsigned grid = grid_for(items);
#define DK_LAUNCH(V)                                                                                            \
  append_contiguous_kernel<V>                                                                                   \
      <<<grid, kThreads, 0, stream>>>(static_cast<V*>(c.k), static_cast<V*>(c.v), static_cast<const V*>(r.key), \
                                      static_cast<const V*>(r.value), g, tokens, max_seq_len, hnd, seq_lens, items)
  switch (w) {
    case 16:
      DK_LAUNCH(V16);
      break;
    case 8:
      DK_LAUNCH(V8);
      break;
    case 4:
      DK_LAUNCH(V4);
      break;
    default:
      DK_LAUNCH(V2);
      break;
  }
#undef DK_LAUNCH
  return cudaGetLastError();
}

cudaError_t append_paged_kv_cache(const cpu::KVCacheTensors& c, int64_t num_blocks, int64_t block_size,
                                  const cpu::KVRows& r, const int64_t* slot_mapping, int64_t num_slots,
                                  cudaStream_t stream) {
  if (num_slots <= 0 || num_blocks <= 0 || block_size <= 0 || c.num_heads <= 0 || c.head_dim <= 0) return cudaSuccess;
  if (c.elem_size != 2 && c.elem_size != 4) return cudaErrorInvalidValue;
  const int w = vector_bytes(c, r);
  const Geometry g = geometry(c, r, w);
  const int64_t items = num_slots * g.H * g.vpr;
  const bool hnd = c.layout == cpu::KVLayout::kHND;
  const unsigned grid = grid_for(items);
  const int64_t total = num_blocks * block_size;
#define DK_LAUNCH(V)                                                                                                  \
  append_paged_kernel<V><<<grid, kThreads, 0, stream>>>(static_cast<V*>(c.k), static_cast<V*>(c.v),                   \
                                                        static_cast<const V*>(r.key), static_cast<const V*>(r.value), \
                                                        g, total, block_size, hnd, slot_mapping, items)
  switch (w) {
    case 16:
      DK_LAUNCH(V16);
      break;
    case 8:
      DK_LAUNCH(V8);
      break;
    case 4:
      DK_LAUNCH(V4);
      break;
    default:
      DK_LAUNCH(V2);
      break;
  }
#undef DK_LAUNCH
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace decodekit
