// CUDA kernels of the KV-cache family (see kv_cache.h and csrc/cpu/kv_cache.h).
//
// One thread per (token row, head, vector) of the new rows: a head row of D
// elements is copied as D * elem_size / W vectors of W bytes (W = 16, 8, 4 or
// 2, the widest that divides every base address, stride and row length in
// bytes), so consecutive threads read and write consecutive bytes of a head
// row. Each destination element is written by at most one thread (given
// distinct slots), and the kernels are pure copies: the result is the CPU's.
//
// The compactions (after tree verification): one block per (row, head); the
// block walks the accepted path in ascending k as the CPU does, its threads
// copy the head row's vectors of step k, and a barrier separates the steps,
// so a source is read before any later step overwrites it (kv_cache.h explains
// why ascending k is safe in place).
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

// Calls f(V{}) with the vector type of w bytes (16, 8, 4, else 2): one launch site per kernel.
template <class F>
void with_vector(int w, F&& f) {
  switch (w) {
    case 16:
      f(V16{});
      break;
    case 8:
      f(V8{});
      break;
    case 4:
      f(V4{});
      break;
    default:
      f(V2{});
      break;
  }
}

unsigned grid_for(int64_t items) {
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65536 * 16 ? blocks : 65536 * 16);  // grid-stride past ~268M items
}

// Compaction: block (b, h) moves row b's accepted path for head h. `at(pos)`: the element offset
// (in vectors) of (pos, h) in a cache tensor, or -1 when pos cannot be addressed.
template <class Vec, class At>
__device__ void compact_head(Vec* __restrict__ kc, Vec* __restrict__ vc, int64_t vpr, int64_t s0,
                             const int64_t* __restrict__ acc, int64_t L, int64_t cap, At at) {
  if (s0 < 0 || s0 >= cap) return;
  int64_t prev = -1;
  for (int64_t k = 0; k < L; ++k) {
    const int64_t node = acc[k];
    if (node <= prev) break;      // -1 padding (or a non-increasing index) ends the path
    if (node >= cap - s0) break;  // past the cache (so is every later node)
    prev = node;
    if (node == k) continue;  // already in place
    const int64_t src = at(s0 + node), dst = at(s0 + k);
    if (src >= 0 && dst >= 0)
      for (int64_t c = threadIdx.x; c < vpr; c += blockDim.x) {
        kc[dst + c] = kc[src + c];
        vc[dst + c] = vc[src + c];
      }
    __syncthreads();  // step k's reads before a later step's writes (uniform: every thread takes each step)
  }
}

template <class Vec>
__global__ void __launch_bounds__(kThreads)
    compact_contiguous_kernel(Vec* __restrict__ kc, Vec* __restrict__ vc, int64_t H, int64_t vpr, int64_t S, bool hnd,
                              const int64_t* __restrict__ start, const int64_t* __restrict__ accepted, int64_t L) {
  const int64_t b = blockIdx.x / H, h = blockIdx.x % H;
  compact_head(kc, vc, vpr, start[b], accepted + b * L, L, S,
               [&](int64_t pos) { return hnd ? ((b * H + h) * S + pos) * vpr : ((b * S + pos) * H + h) * vpr; });
}

template <class Vec>
__global__ void __launch_bounds__(kThreads)
    compact_paged_kernel(Vec* __restrict__ kc, Vec* __restrict__ vc, int64_t H, int64_t vpr, int64_t num_blocks,
                         int64_t bs, bool hnd, const int64_t* __restrict__ block_tables, int64_t max_blocks,
                         const int64_t* __restrict__ start, const int64_t* __restrict__ accepted, int64_t L) {
  const int64_t b = blockIdx.x / H, h = blockIdx.x % H;
  const int64_t* table = block_tables + b * max_blocks;
  compact_head(kc, vc, vpr, start[b], accepted + b * L, L, max_blocks * bs, [&](int64_t pos) {
    const int64_t blk = table[pos / bs];  // pos < max_blocks * bs: the column is in the table
    if (blk < 0 || blk >= num_blocks) return int64_t{-1};
    return hnd ? ((blk * H + h) * bs + pos % bs) * vpr : ((blk * bs + pos % bs) * H + h) * vpr;
  });
}

// The widest vector dividing both cache addresses and the head row (compactions).
int cache_vector_bytes(const cpu::KVCacheTensors& c) {
  const uint64_t bits = (static_cast<uint64_t>(c.head_dim) * static_cast<uint64_t>(c.elem_size)) |
                        reinterpret_cast<uintptr_t>(c.k) | reinterpret_cast<uintptr_t>(c.v);
  for (int w : {16, 8, 4})
    if (bits % static_cast<uint64_t>(w) == 0) return w;
  return 2;
}

// The compactions' launch: one block per (row, head) of warps covering a head's
// vectors of w bytes (vpr per position).
struct CompactLaunch {
  int w;
  int64_t vpr;
  bool hnd;
  unsigned grid, threads;
};
CompactLaunch compact_launch(const cpu::KVCacheTensors& c, int64_t batch) {
  const int w = cache_vector_bytes(c);
  const int64_t vpr = c.head_dim * c.elem_size / w;
  return CompactLaunch{w, vpr, c.layout == cpu::KVLayout::kHND, static_cast<unsigned>(batch * c.num_heads),
                       static_cast<unsigned>(vpr < kThreads ? (vpr + 31) / 32 * 32 : kThreads)};
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
  with_vector(w, [&](auto tag) {
    using V = decltype(tag);
    append_contiguous_kernel<V>
        <<<grid, kThreads, 0, stream>>>(static_cast<V*>(c.k), static_cast<V*>(c.v), static_cast<const V*>(r.key),
                                        static_cast<const V*>(r.value), g, tokens, max_seq_len, hnd, seq_lens, items);
  });
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
  with_vector(w, [&](auto tag) {
    using V = decltype(tag);
    append_paged_kernel<V><<<grid, kThreads, 0, stream>>>(static_cast<V*>(c.k), static_cast<V*>(c.v),
                                                          static_cast<const V*>(r.key), static_cast<const V*>(r.value),
                                                          g, total, block_size, hnd, slot_mapping, items);
  });
  return cudaGetLastError();
}

cudaError_t compact_kv_cache(const cpu::KVCacheTensors& c, int64_t batch, int64_t max_seq_len, const int64_t* start,
                             const int64_t* accepted_nodes, int64_t max_accepted, cudaStream_t stream) {
  const int64_t H = c.num_heads;
  if (batch <= 0 || max_accepted <= 0 || H <= 0 || c.head_dim <= 0 || max_seq_len <= 0) return cudaSuccess;
  if ((c.elem_size != 2 && c.elem_size != 4) || batch * H > 2147483647) return cudaErrorInvalidValue;
  const CompactLaunch l = compact_launch(c, batch);
  with_vector(l.w, [&](auto tag) {
    using V = decltype(tag);
    compact_contiguous_kernel<V><<<l.grid, l.threads, 0, stream>>>(
        static_cast<V*>(c.k), static_cast<V*>(c.v), H, l.vpr, max_seq_len, l.hnd, start, accepted_nodes, max_accepted);
  });
  return cudaGetLastError();
}

cudaError_t compact_paged_kv_cache(const cpu::KVCacheTensors& c, int64_t num_blocks, int64_t block_size,
                                   const int64_t* block_tables, int64_t max_blocks, int64_t batch, const int64_t* start,
                                   const int64_t* accepted_nodes, int64_t max_accepted, cudaStream_t stream) {
  const int64_t H = c.num_heads;
  if (batch <= 0 || max_accepted <= 0 || H <= 0 || c.head_dim <= 0 || block_size <= 0 || num_blocks <= 0 ||
      max_blocks <= 0)
    return cudaSuccess;
  if ((c.elem_size != 2 && c.elem_size != 4) || batch * H > 2147483647) return cudaErrorInvalidValue;
  const CompactLaunch l = compact_launch(c, batch);
  with_vector(l.w, [&](auto tag) {
    using V = decltype(tag);
    compact_paged_kernel<V><<<l.grid, l.threads, 0, stream>>>(static_cast<V*>(c.k), static_cast<V*>(c.v), H, l.vpr,
                                                              num_blocks, block_size, l.hnd, block_tables, max_blocks,
                                                              start, accepted_nodes, max_accepted);
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace decodekit
