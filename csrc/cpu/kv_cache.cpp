// CPU kernels of the KV-cache family (see kv_cache.h). Compiled once per
// instruction set like sampling.cpp (the work is memcpy, so the builds differ
// only in how the C library copies). Each cache row is written by at most one
// thread (given distinct slots), so the result never depends on the thread count.
//
// Semantics: the contiguous append writes each row's new tokens right after
// its cached ones (a [B, S_max, H, D] cache indexed by per-row lengths); the
// paged append scatters token rows to (block, offset) slots of a block pool,
// as in vLLM's reshape_and_cache and FlashInfer's append_paged_kv_cache. The
// compactions move a verified token tree's accepted path to consecutive
// positions, in place (the order that makes that safe is explained in kv_cache.h).
#include "kv_cache.h"
#include "cpu/common/isa.h"
#include "cpu/common/parallel.h"

#include <algorithm>
#include <cstring>

namespace decodekit {
namespace cpu {
namespace DK_ISA {
namespace {

// Below this many bytes per thread, starting threads costs more than it saves.
constexpr int64_t kMinBytesPerThread = 32 * 1024;

// Copies n rows of D elements: source rows src_step elements apart (starting at
// element src_off), destination rows dst_step elements apart (starting at
// dst_off). One memcpy when both sides hold the n rows back to back.
// One head row of the common sizes (64 or 128 elements of 2 or 4 bytes) as a fixed-size
// copy the compiler inlines into vector moves: the HND layouts copy one head row at a
// time, and a library memcpy call per 128-512 bytes costs as much as the copy itself.
inline void copy_row(char* d, const char* s, size_t row) {
  switch (row) {
    case 128:
      __builtin_memcpy(d, s, 128);
      break;
    case 256:
      __builtin_memcpy(d, s, 256);
      break;
    case 512:
      __builtin_memcpy(d, s, 512);
      break;
    default:
      std::memcpy(d, s, row);
      break;
  }
}

inline void copy_rows(void* dst, int64_t dst_off, int64_t dst_step, const void* src, int64_t src_off, int64_t src_step,
                      int64_t n, int64_t D, int64_t es) {
  char* d = static_cast<char*>(dst) + dst_off * es;
  const char* s = static_cast<const char*>(src) + src_off * es;
  const size_t row = static_cast<size_t>(D * es);
  if (n == 1) {
    copy_row(d, s, row);
  } else if (dst_step == D && src_step == D) {
    std::memcpy(d, s, row * static_cast<size_t>(n));
  } else {
    for (int64_t j = 0; j < n; ++j) copy_row(d + j * dst_step * es, s + j * src_step * es, row);
  }
}

// Moves row b's accepted path (see kv_cache.h) for heads [h0, h1): `at(pos, h)`
// gives the element offset of (pos, head h) in a cache tensor, or -1 when pos
// cannot be addressed; positions at or past `cap` end the path. `heads_per_row`
// heads of a position are copied as one run (all H in NHD, 1 in HND).
template <typename At>
void compact_row(const KVCacheTensors& c, int64_t s0, const int64_t* acc, int64_t L, int64_t cap, int64_t h0,
                 int64_t h1, int64_t heads_per_row, At at) {
  const int64_t D = c.head_dim, es = c.elem_size;
  if (s0 < 0 || s0 >= cap) return;
  int64_t prev = -1;
  for (int64_t k = 0; k < L; ++k) {
    const int64_t node = acc[k];
    if (node <= prev) break;      // -1 padding (or a bogus, non-increasing index) ends the path
    if (node >= cap - s0) break;  // past the cache (so is every later node)
    prev = node;
    if (node == k) continue;  // already in place
    for (int64_t h = h0; h < h1; h += heads_per_row) {
      const int64_t src = at(s0 + node, h), dst = at(s0 + k, h);
      if (src < 0 || dst < 0) continue;
      copy_rows(c.k, dst, D, c.k, src, D, heads_per_row, D, es);
      copy_rows(c.v, dst, D, c.v, src, D, heads_per_row, D, es);
    }
  }
}

}  // namespace

void append_kv_cache(const KVCacheTensors& c, int64_t batch, int64_t max_seq_len, const KVRows& r, int64_t tokens,
                     const int64_t* seq_lens, int num_threads) {
  const int64_t H = c.num_heads, D = c.head_dim, S = max_seq_len, es = c.elem_size;
  if (batch <= 0 || tokens <= 0 || H <= 0 || D <= 0 || S <= 0) return;
  const int64_t bytes = batch * tokens * 2 * H * D * es;
  if (c.layout == KVLayout::kNHD) {
    // One item per (b, t): the H rows of a position are back to back in the cache.
    const int64_t items = batch * tokens;
    const int nt = threads_for(items, num_threads, bytes, kMinBytesPerThread);
    parallel_rows(items, nt, Schedule::kStatic, [&](int64_t i) {
      const int64_t b = i / tokens, t = i % tokens;
      const int64_t s = seq_lens[b];
      if (s < 0 || s >= S || t >= S - s) return;  // past the cache: skipped, never written
      const int64_t dst = (b * S + s + t) * H * D;
      copy_rows(c.k, dst, D, r.key, b * r.key_stride_b + t * r.key_stride_t, r.key_stride_h, H, D, es);
      copy_rows(c.v, dst, D, r.value, b * r.value_stride_b + t * r.value_stride_t, r.value_stride_h, H, D, es);
    });
  } else {
    // One item per (b, h): the new positions of a head are back to back in the cache, so
    // each thread writes one run of memory.
    const int64_t items = batch * H;
    const int nt = threads_for(items, num_threads, bytes, kMinBytesPerThread);
    parallel_rows(items, nt, Schedule::kStatic, [&](int64_t i) {
      const int64_t b = i / H, h = i % H;
      const int64_t s = seq_lens[b];
      if (s < 0 || s >= S) return;
      const int64_t n = std::min(tokens, S - s);  // positions past the cache are skipped
      const int64_t dst = ((b * H + h) * S + s) * D;
      copy_rows(c.k, dst, D, r.key, b * r.key_stride_b + h * r.key_stride_h, r.key_stride_t, n, D, es);
      copy_rows(c.v, dst, D, r.value, b * r.value_stride_b + h * r.value_stride_h, r.value_stride_t, n, D, es);
    });
  }
}

void append_paged_kv_cache(const KVCacheTensors& c, int64_t num_blocks, int64_t block_size, const KVRows& r,
                           const int64_t* slot_mapping, int64_t num_slots, int num_threads) {
  const int64_t H = c.num_heads, D = c.head_dim, bs = block_size, es = c.elem_size;
  if (num_slots <= 0 || num_blocks <= 0 || bs <= 0 || H <= 0 || D <= 0) return;
  const int64_t total = num_blocks * bs;
  const int64_t bytes = num_slots * 2 * H * D * es;
  if (c.layout == KVLayout::kNHD) {
    // One item per row: a slot's H rows are back to back in the cache.
    const int nt = threads_for(num_slots, num_threads, bytes, kMinBytesPerThread);
    parallel_rows(num_slots, nt, Schedule::kStatic, [&](int64_t i) {
      const int64_t slot = slot_mapping[i];
      if (slot < 0 || slot >= total) return;  // padding, or outside the pool: skipped
      copy_rows(c.k, slot * H * D, D, r.key, i * r.key_stride_t, r.key_stride_h, H, D, es);
      copy_rows(c.v, slot * H * D, D, r.value, i * r.value_stride_t, r.value_stride_h, H, D, es);
    });
  } else {
    // One item per (h, row), head-major: consecutive slots of a block are consecutive
    // rows of a head in the cache, so each thread writes runs of memory.
    const int64_t items = H * num_slots;
    const int nt = threads_for(items, num_threads, bytes, kMinBytesPerThread);
    parallel_rows(items, nt, Schedule::kStatic, [&](int64_t j) {
      const int64_t h = j / num_slots, i = j % num_slots;
      const int64_t slot = slot_mapping[i];
      if (slot < 0 || slot >= total) return;
      const int64_t dst = (((slot / bs) * H + h) * bs + slot % bs) * D;
      copy_rows(c.k, dst, D, r.key, i * r.key_stride_t + h * r.key_stride_h, 0, 1, D, es);
      copy_rows(c.v, dst, D, r.value, i * r.value_stride_t + h * r.value_stride_h, 0, 1, D, es);
    });
  }
}

void compact_kv_cache(const KVCacheTensors& c, int64_t batch, int64_t max_seq_len, const int64_t* start,
                      const int64_t* accepted_nodes, int64_t max_accepted, int num_threads) {
  const int64_t H = c.num_heads, D = c.head_dim, S = max_seq_len, L = max_accepted;
  if (batch <= 0 || L <= 0 || H <= 0 || D <= 0 || S <= 0) return;
  const int64_t bytes = batch * L * 2 * H * D * c.elem_size;
  if (c.layout == KVLayout::kNHD) {
    // One item per row: a position's H heads are one run.
    const int nt = threads_for(batch, num_threads, bytes, kMinBytesPerThread);
    parallel_rows(batch, nt, Schedule::kStatic, [&](int64_t b) {
      compact_row(c, start[b], accepted_nodes + b * L, L, S, 0, H, H,
                  [&](int64_t pos, int64_t) { return (b * S + pos) * H * D; });
    });
  } else {
    const int64_t items = batch * H;
    const int nt = threads_for(items, num_threads, bytes, kMinBytesPerThread);
    parallel_rows(items, nt, Schedule::kStatic, [&](int64_t i) {
      const int64_t b = i / H, h = i % H;
      compact_row(c, start[b], accepted_nodes + b * L, L, S, h, h + 1, 1,
                  [&](int64_t pos, int64_t hh) { return ((b * H + hh) * S + pos) * D; });
    });
  }
}

void compact_paged_kv_cache(const KVCacheTensors& c, int64_t num_blocks, int64_t block_size,
                            const int64_t* block_tables, int64_t max_blocks, int64_t batch, const int64_t* start,
                            const int64_t* accepted_nodes, int64_t max_accepted, int num_threads) {
  const int64_t H = c.num_heads, D = c.head_dim, bs = block_size, L = max_accepted;
  if (batch <= 0 || L <= 0 || H <= 0 || D <= 0 || bs <= 0 || num_blocks <= 0 || max_blocks <= 0) return;
  const int64_t cap = max_blocks * bs;
  const int64_t bytes = batch * L * 2 * H * D * c.elem_size;
  const bool nhd = c.layout == KVLayout::kNHD;
  auto block_of = [&](int64_t b, int64_t pos) {
    const int64_t blk = block_tables[b * max_blocks + pos / bs];  // pos < cap, so the column is in the table
    return blk >= 0 && blk < num_blocks ? blk : int64_t{-1};
  };
  if (nhd) {
    const int nt = threads_for(batch, num_threads, bytes, kMinBytesPerThread);
    parallel_rows(batch, nt, Schedule::kStatic, [&](int64_t b) {
      compact_row(c, start[b], accepted_nodes + b * L, L, cap, 0, H, H, [&](int64_t pos, int64_t) {
        const int64_t blk = block_of(b, pos);
        return blk < 0 ? int64_t{-1} : (blk * bs + pos % bs) * H * D;
      });
    });
  } else {
    const int64_t items = batch * H;
    const int nt = threads_for(items, num_threads, bytes, kMinBytesPerThread);
    parallel_rows(items, nt, Schedule::kStatic, [&](int64_t i) {
      const int64_t b = i / H, h = i % H;
      compact_row(c, start[b], accepted_nodes + b * L, L, cap, h, h + 1, 1, [&](int64_t pos, int64_t hh) {
        const int64_t blk = block_of(b, pos);
        return blk < 0 ? int64_t{-1} : ((blk * H + hh) * bs + pos % bs) * D;
      });
    });
  }
}

}  // namespace DK_ISA
}  // namespace cpu
}  // namespace decodekit
