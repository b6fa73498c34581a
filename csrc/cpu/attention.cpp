// Paged decode attention on the CPU (see attention.h). Compiled once per
// instruction set; all builds give the same bits.
//
// One task per (sequence, KV head): every query row that reads this KV head
// (the group's query heads times the Q new tokens) walks its own positions in
// tiles of 16 aligned at position 0: scores by 16-lane FMA dot products with a
// fixed tree, the tile max, one rescale of the running sum and accumulator
// (online softmax, Milakov & Gimelshein 2018; Dao et al., FlashAttention,
// 2022), exp by our own polynomial, then the weighted value rows added in
// position order. The operations for a query row depend only on that row's
// query and cached keys/values, so its result is the same for any B and Q.
// A tree mask only removes positions from a row's walk (they are neither
// scored nor added, exactly like positions past the row's last one), so a
// mask allowing every earlier new token gives the causal bits.
#include "attention.h"
#include "cpu/common/isa.h"
#include "cpu/common/parallel.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "decodekit/math.h"
#include "cpu/common/scratch.h"
#include "cpu/common/vec.h"

namespace decodekit {
namespace cpu {
namespace DK_ISA {
namespace {

constexpr int kL = kVecLanes;
constexpr int kTile = 16;
constexpr float kInf = std::numeric_limits<float>::infinity();
// Stands in for the keys of positions a row does not read in the batched dot products.
alignas(64) const float kZeroRow[64] = {};

// A row of D elements of the cache as float32, zero-padded to Dp (a multiple of 16).
void load_row(const PagedKV& kv, const void* base, int64_t elem, int64_t D, float* dst, int64_t Dp) {
  if (kv.kind == ScalarKind::kFloat32) {
    std::memcpy(dst, static_cast<const float*>(base) + elem, static_cast<size_t>(D) * sizeof(float));
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(base) + elem;
    if (kv.kind == ScalarKind::kFloat16)
      for (int64_t d = 0; d < D; ++d) dst[d] = half_bits_to_float(s[d]);
    else
      for (int64_t d = 0; d < D; ++d) dst[d] = bf16_bits_to_float(s[d]);
  }
  for (int64_t d = D; d < Dp; ++d) dst[d] = 0.0f;
}

DK_VINLINE float dot(const float* a, const float* b, int64_t Dp) {
  VF acc = splat(0.0f);
  for (int64_t d = 0; d < Dp; d += kL) acc = fma16(load_f32(a + d), load_f32(b + d), acc);
  return tree_sum16(acc);
}

// acc = acc * alpha + sum_j p_j v_j with the accumulator of NV vectors held in
// registers across the tile (the same operations as the in-memory loop).
template <int NV>
DK_VINLINE void accumulate(float* a, float alpha, int64_t upto, const bool* present, const float* pa,
                           const float* const* vp) {
  VF ar[NV];
  for (int c = 0; c < NV; ++c) ar[c] = load_f32(a + c * kL) * splat(alpha);
  for (int64_t j = 0; j < upto; ++j) {
    if (!present[j]) continue;
    const VF pj = splat(pa[j]);
    for (int c = 0; c < NV; ++c) ar[c] = fma16(pj, load_f32(vp[j] + c * kL), ar[c]);
  }
  for (int c = 0; c < NV; ++c) store_f32(a + c * kL, ar[c]);
}

// accumulate() for R rows at once over a whole tile (positions j with seen[i * 16 + j]): row i's
// accumulator is scaled by alphas[i], then gets p_ij v_j added in position order, exactly as
// accumulate() does it; the R rows' independent FMA chains interleave.
template <int NV, int R>
DK_VINLINE void accumulate_rows(float* const* a, const float* alphas, const bool* seen, const float* pa,
                                const float* const* vp) {
  VF ar[R][NV];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < NV; ++c) ar[i][c] = load_f32(a[i] + c * kL) * splat(alphas[i]);
  for (int j = 0; j < kTile; ++j) {
    bool any = false;
    for (int i = 0; i < R; ++i) any |= seen[i * kTile + j];
    if (!any) continue;
    VF v[NV];
    for (int c = 0; c < NV; ++c) v[c] = load_f32(vp[j] + c * kL);
    for (int i = 0; i < R; ++i) {
      if (!seen[i * kTile + j]) continue;
      const VF pj = splat(pa[i * kTile + j]);
      for (int c = 0; c < NV; ++c) ar[i][c] = fma16(pj, v[c], ar[i][c]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < NV; ++c) store_f32(a[i] + c * kL, ar[i][c]);
}

// accumulate_rows() for R rows that all read the whole tile (every seen flag set): the same
// operations without the per-position checks.
template <int NV, int R>
DK_VINLINE void accumulate_rows_full(float* const* a, const float* alphas, const float* pa, const float* const* vp) {
  VF ar[R][NV];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < NV; ++c) ar[i][c] = load_f32(a[i] + c * kL) * splat(alphas[i]);
  for (int j = 0; j < kTile; ++j) {
    VF v[NV];
    for (int c = 0; c < NV; ++c) v[c] = load_f32(vp[j] + c * kL);
    for (int i = 0; i < R; ++i) {
      const VF pj = splat(pa[i * kTile + j]);
      for (int c = 0; c < NV; ++c) ar[i][c] = fma16(pj, v[c], ar[i][c]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < NV; ++c) store_f32(a[i] + c * kL, ar[i][c]);
}

struct RowState {
  float m = -kInf;  // running max of the scores
  float l = 0.0f;   // running sum of exp(score - m)
};

// Per-thread scratch of attend_group (scratch.h), trimmed after a call that needed a lot.
thread_local Buf<float> fbuf;
thread_local Buf<RowState> sbuf;
thread_local Buf<int64_t> lbuf;
thread_local Buf<char> nbuf;
thread_local Buf<float> pbuf;
thread_local Buf<char> bbuf;
thread_local Buf<int64_t> ibuf;  // paged_attention's item list, on the calling thread

// mask: this sequence's [Q, Q] tree mask (0 / 1 bytes), or null for the causal rule.
// Rows [r_begin, r_end) of the Q * group query rows that read KV head kvh (row r is new token
// r / group, query head kvh * group + r % group).
void attend_group(const float* q, int64_t Q, int64_t Hq, const PagedKV& kv, const int64_t* table, int64_t max_blocks,
                  int64_t n, int64_t kvh, int64_t r_begin, int64_t r_end, const uint8_t* mask, float scale,
                  float* out) {
  const int64_t D = kv.head_dim, Dp = (D + kL - 1) / kL * kL;
  const int64_t group = Hq / kv.num_kv_heads;
  const int64_t rows = r_end - r_begin;  // query rows of this task (local index r - r_begin)
  // Per-thread scratch kept between calls: the queries and accumulators of the rows (zero-padded
  // to Dp), a tile of converted keys and values, and each row's state.
  float* qbuf = fbuf.get(2 * rows * Dp + 2 * kTile * Dp);
  float* acc = qbuf + rows * Dp;
  float* kt = acc + rows * Dp;
  float* vt = kt + kTile * Dp;
  std::fill(qbuf, kt, 0.0f);
  // float32 caches with D a multiple of 16 are read in place; others are converted per tile.
  const bool direct = kv.kind == ScalarKind::kFloat32 && Dp == D;
  const float* kp[kTile];
  const float* vp[kTile];
  RowState* st = sbuf.get(rows);
  std::fill(st, st + rows, RowState{});
  char* nan_row = nbuf.get(2 * rows);  // then, per active row of a tile: it reads the whole tile
  std::fill(nan_row, nan_row + rows, 0);
  char* full_row = nan_row + rows;
  int64_t* last = lbuf.get(2 * rows);  // last position each row attends to, then the tile's active rows
  int64_t* active = last + rows;
  // Per tile: each active row's weights, readable positions and rescale factor.
  float* pa_all = pbuf.get(rows * (kTile + 1));
  float* alpha_all = pa_all + rows * kTile;
  bool* seen_all = reinterpret_cast<bool*>(bbuf.get(rows * kTile));
  for (int64_t lr = 0; lr < rows; ++lr) {
    const int64_t r = r_begin + lr, i = r / group, h = kvh * group + r % group;
    std::memcpy(&qbuf[lr * Dp], q + (i * Hq + h) * D, static_cast<size_t>(D) * sizeof(float));
    last[lr] = n - Q + i;
  }
  const int64_t end = n;            // positions [0, n)
  const int64_t first_new = n - Q;  // position of new token 0 (the tree's root)
  // Position t0 + j sits at offset `off` of table entry `blk_idx`, stepped along (no division
  // per position).
  int64_t blk_idx = 0, off = 0;
  // float32 in place with tiles that each lie in one block: a tile's rows are one pointer and a
  // fixed stride apart (no per-position lookup).
  const bool tile_in_block = direct && kv.block_size % kTile == 0;
  const int64_t pos_stride = kv.hnd ? D : kv.num_kv_heads * D;
  for (int64_t t0 = 0; t0 < end; t0 += kTile) {
    const int64_t cnt = std::min<int64_t>(kTile, end - t0);
    bool present[kTile];
    bool all_present = cnt == kTile;  // every position of a whole tile is readable
    if (tile_in_block) {
      const int64_t bi = t0 / kv.block_size, off0 = t0 % kv.block_size;
      const int64_t blk = bi < max_blocks ? table[bi] : -1;
      const bool ok = blk >= 0 && blk < kv.num_blocks;
      all_present = all_present && ok;
      const int64_t elem0 = kv.hnd ? ((blk * kv.num_kv_heads + kvh) * kv.block_size + off0) * D
                                   : ((blk * kv.block_size + off0) * kv.num_kv_heads + kvh) * D;
      for (int64_t j = 0; j < cnt; ++j) {
        present[j] = ok;
        kp[j] = ok ? static_cast<const float*>(kv.k) + elem0 + j * pos_stride : kZeroRow;
        vp[j] = ok ? static_cast<const float*>(kv.v) + elem0 + j * pos_stride : kZeroRow;
      }
    } else {
      for (int64_t j = 0; j < cnt; ++j, off = off + 1 == kv.block_size ? (++blk_idx, 0) : off + 1) {
        const int64_t blk = blk_idx < max_blocks ? table[blk_idx] : -1;
        present[j] = blk >= 0 && blk < kv.num_blocks;
        all_present = all_present && present[j];
        if (!present[j]) continue;
        const int64_t elem = kv.hnd ? ((blk * kv.num_kv_heads + kvh) * kv.block_size + off) * D
                                    : ((blk * kv.block_size + off) * kv.num_kv_heads + kvh) * D;
        if (direct) {
          kp[j] = static_cast<const float*>(kv.k) + elem;
          vp[j] = static_cast<const float*>(kv.v) + elem;
        } else {
          load_row(kv, kv.k, elem, D, &kt[j * Dp], Dp);
          load_row(kv, kv.v, elem, D, &vt[j * Dp], Dp);
          kp[j] = &kt[j * Dp];
          vp[j] = &vt[j * Dp];
        }
      }
    }
    // Phase 1, per row: the tile's scores, the running max and sum, the weights p_j and alpha.
    int64_t n_active = 0;
    for (int64_t r = 0; r < rows; ++r) {                              // local row index
      const int64_t upto = std::min<int64_t>(cnt, last[r] - t0 + 1);  // positions of this tile the row sees
      if (upto <= 0) continue;
      // The positions of the tile this row reads: the readable ones, less those its tree mask
      // leaves out (query i = r / group; only new tokens j <= i are looked up).
      bool* seen = &seen_all[n_active * kTile];
      const bool masked = mask != nullptr && t0 + upto > first_new;
      const bool full = all_present && upto == kTile && !masked;  // the row reads the whole tile
      if (full) {
        std::memset(seen, 1, kTile);
      } else {
        for (int64_t j = 0; j < kTile; ++j) seen[j] = j < upto && present[j];
      }
      if (masked) {
        const uint8_t* mrow = mask + ((r_begin + r) / group) * Q;
        for (int64_t j = 0; j < upto; ++j) {
          const int64_t pos = t0 + j;
          seen[j] = present[j] && (pos < first_new || mrow[pos - first_new] != 0);
        }
      }
      float s[kTile];
      if (Dp == 64) {
        // The 16 dot products of the tile together (dot()'s operations, one reduction for all).
        const float* qr = &qbuf[r * Dp];
        const VF q0 = load_f32(qr), q1 = load_f32(qr + kL), q2 = load_f32(qr + 2 * kL), q3 = load_f32(qr + 3 * kL);
        VF acc16[kTile];
        for (int j = 0; j < kTile; ++j) {
          const float* k = full || seen[j] ? kp[j] : kZeroRow;
          VF a = fma16(q0, load_f32(k), splat(0.0f));
          a = fma16(q1, load_f32(k + kL), a);
          a = fma16(q2, load_f32(k + 2 * kL), a);
          acc16[j] = fma16(q3, load_f32(k + 3 * kL), a);
        }
        if (full) {  // the same products as below, lane-wise
          store_f32(s, tree_sum16x16(acc16) * splat(scale));
        } else {
          float dots[kTile];
          store_f32(dots, tree_sum16x16(acc16));
          for (int j = 0; j < kTile; ++j) s[j] = seen[j] ? dots[j] * scale : -kInf;
        }
      } else {
        for (int j = 0; j < kTile; ++j) s[j] = seen[j] ? dot(&qbuf[r * Dp], kp[j], Dp) * scale : -kInf;
      }
      // The tile max, NaN scores left out (a NaN score, from NaN or inf in q or k, makes the
      // output NaN); max is exact, so the lane order does not matter.
      const VF sv = load_f32(s);
      const VI is_nan = sv != sv;
      if (any_lane(is_nan)) nan_row[r] = 1;
      const float tmax = max_lane(select(is_nan, splat(-kInf), sv));
      if (tmax == -kInf) continue;  // nothing readable in this tile
      RowState& rs = st[r];
      const float m_new = rs.m > tmax ? rs.m : tmax;
      const float alpha = exp_nonpositive(rs.m - m_new);  // exp(-inf) = 0 on the first tile
      const VF p = exp16(load_f32(s) - splat(m_new));
      to_array(p, &pa_all[n_active * kTile]);
      rs.l = rs.l * alpha + tree_sum16(p);
      rs.m = m_new;
      alpha_all[n_active] = alpha;
      full_row[n_active] = full;
      active[n_active++] = r;
    }
    // Phase 2: acc = acc * alpha + sum_j p_j v_j in position order, for up to 4 rows at a time
    // (each row's operations as alone; the rows' FMA chains interleave).
    for (int64_t a0 = 0; a0 < n_active; a0 += 4) {
      const int nr = static_cast<int>(std::min<int64_t>(4, n_active - a0));
      float* accs[4];
      for (int i = 0; i < nr; ++i) accs[i] = &acc[active[a0 + i] * Dp];
      const float* pas = &pa_all[a0 * kTile];
      const bool* seens = &seen_all[a0 * kTile];
      const float* alphas = &alpha_all[a0];
      bool all_full = true;
      for (int i = 0; i < nr; ++i) all_full = all_full && full_row[a0 + i];
      if (Dp == 64 && all_full) {
        switch (nr) {
          case 4:
            accumulate_rows_full<4, 4>(accs, alphas, pas, vp);
            break;
          case 3:
            accumulate_rows_full<4, 3>(accs, alphas, pas, vp);
            break;
          case 2:
            accumulate_rows_full<4, 2>(accs, alphas, pas, vp);
            break;
          default:
            accumulate_rows_full<4, 1>(accs, alphas, pas, vp);
            break;
        }
        continue;
      }
      if (Dp == 64) {
        switch (nr) {
          case 4:
            accumulate_rows<4, 4>(accs, alphas, seens, pas, vp);
            break;
          case 3:
            accumulate_rows<4, 3>(accs, alphas, seens, pas, vp);
            break;
          case 2:
            accumulate_rows<4, 2>(accs, alphas, seens, pas, vp);
            break;
          default:
            accumulate_rows<4, 1>(accs, alphas, seens, pas, vp);
            break;
        }
        continue;
      }
      for (int i = 0; i < nr; ++i) {
        float* a = accs[i];
        const float* pa = pas + i * kTile;
        const bool* seen = seens + i * kTile;
        if (Dp == 128) {
          accumulate<8>(a, alphas[i], kTile, seen, pa, vp);
        } else if (Dp == 32) {
          accumulate<2>(a, alphas[i], kTile, seen, pa, vp);
        } else {
          const VF va = splat(alphas[i]);
          for (int64_t d = 0; d < Dp; d += kL) store_f32(a + d, load_f32(a + d) * va);
          for (int64_t j = 0; j < kTile; ++j) {
            if (!seen[j]) continue;
            const VF pj = splat(pa[j]);
            for (int64_t d = 0; d < Dp; d += kL) store_f32(a + d, fma16(pj, load_f32(vp[j] + d), load_f32(a + d)));
          }
        }
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t gr = r_begin + r, i = gr / group, h = kvh * group + gr % group;
    float* o = out + (i * Hq + h) * D;
    const float inv = st[r].l > 0.0f ? 1.0f / st[r].l : 0.0f;
    if (nan_row[r]) {
      for (int64_t d = 0; d < D; ++d) o[d] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    for (int64_t d = 0; d < D; ++d) o[d] = acc[r * Dp + d] * inv;
  }
}

// Reads one byte of every 64-byte line of the keys and values of blocks [blk_begin, blk_end) of
// a block table (its invalid entries skipped), in address order within each block.
void warm_blocks(const PagedKV& kv, const int64_t* table, int64_t blk_begin, int64_t blk_end) {
  const int64_t esz = kv.kind == ScalarKind::kFloat32 ? 4 : 2;
  const int64_t bytes = kv.block_size * kv.num_kv_heads * kv.head_dim * esz;  // a block, NHD or HND
  unsigned sum = 0;
  for (int64_t i = blk_begin; i < blk_end; ++i) {
    const int64_t blk = table[i];
    if (blk < 0 || blk >= kv.num_blocks) continue;
    const unsigned char* kb = static_cast<const unsigned char*>(kv.k) + blk * bytes;
    const unsigned char* vb = static_cast<const unsigned char*>(kv.v) + blk * bytes;
    for (int64_t c = 0; c < bytes; c += 64) sum += kb[c] + vb[c];
  }
  static thread_local volatile unsigned sink;
  sink = sum;
}

// Bytes of keys and values per warm-up item (see paged_attention).
constexpr int64_t kWarmBytes = 32 * 1024;

}  // namespace

void paged_attention(const float* q, int64_t B, int64_t Q, int64_t Hq, const PagedKV& kv, const int64_t* block_tables,
                     int64_t max_blocks, const int64_t* seq_lens, const uint8_t* tree_mask, float scale,
                     int num_threads, float* out) {
  const int64_t D = kv.head_dim;
  // A task is a (sequence, KV head) pair (its query rows' FMA chains interleave), or a part of
  // its query rows when there are fewer pairs than threads. A row's operations are the same
  // whichever task runs it.
  const int64_t rows = Q * (Hq / kv.num_kv_heads);
  const int64_t groups = B * kv.num_kv_heads;
  const int64_t split = groups >= num_threads ? 1 : std::min<int64_t>(rows, (num_threads + groups - 1) / groups);
  const int64_t per_seq = kv.num_kv_heads * split;  // tasks of one sequence
  // In a decode step the cache is cold (the layers' weights have passed through L3 since this
  // layer last ran), and a task's keys and values are runs of a few lines (one head's rows)
  // that the hardware prefetcher does not follow: measured on the 2-core EPYC, such a task read
  // them at 10-15 GB/s, and software prefetches did not help. A plain read of each whole block,
  // line by line, runs at stream speed and leaves the block in L2 for the tasks. So each
  // sequence's blocks are first read by up to num_threads warm-up items of about kWarmBytes
  // each, listed just before that sequence's tasks (items are claimed in order). Reads change
  // no bits.
  const int64_t esz = kv.kind == ScalarKind::kFloat32 ? 4 : 2;
  const int64_t block_bytes = 2 * kv.block_size * kv.num_kv_heads * D * esz;
  auto seq_n = [&](int64_t b) {
    // Positions past the block table cannot be read; clamp so a bogus length cannot make the loop long.
    return std::min<int64_t>(std::max<int64_t>(0, seq_lens[b]), max_blocks * kv.block_size);
  };
  auto seq_blocks = [&](int64_t b) { return (seq_n(b) + kv.block_size - 1) / kv.block_size; };
  auto warm_parts = [&](int64_t b) {
    const int64_t nb = seq_blocks(b);
    return nb == 0 ? int64_t{0}
                   : std::max<int64_t>(1, std::min<int64_t>({num_threads, nb, nb * block_bytes / kWarmBytes}));
  };
  // Item i -> (sequence, warm-up part or task): first[b] is sequence b's first item (in the
  // caller's scratch; the workers reach it through the pointer).
  int64_t* first = ibuf.get(B + 1);
  first[0] = 0;
  for (int64_t b = 0; b < B; ++b) first[b + 1] = first[b] + warm_parts(b) + per_seq;
  const int64_t items = first[B];
  const int nt = threads_for(B * per_seq, num_threads);
  parallel_rows(
      items, nt, Schedule::kDynamic,
      [&](int64_t it) {
        const int64_t b = std::upper_bound(first, first + B + 1, it) - first - 1;
        const int64_t wp = warm_parts(b), k = it - first[b];
        const int64_t* table = block_tables + b * max_blocks;
        if (k < wp) {
          const int64_t nb = seq_blocks(b);
          warm_blocks(kv, table, nb * k / wp, nb * (k + 1) / wp);
          return;
        }
        const int64_t t = k - wp;
        const int64_t kvh = t / split, part = t % split;
        const int64_t r_begin = rows * part / split, r_end = rows * (part + 1) / split;
        const uint8_t* mask = tree_mask != nullptr ? tree_mask + b * Q * Q : nullptr;
        attend_group(q + b * Q * Hq * D, Q, Hq, kv, table, max_blocks, seq_n(b), kvh, r_begin, r_end, mask, scale,
                     out + b * Q * Hq * D);
      },
      [] {
        trim(fbuf);
        trim(sbuf);
        trim(lbuf);
        trim(nbuf);
        trim(pbuf);
        trim(bbuf);
      });
  trim(ibuf);
}

}  // namespace DK_ISA
}  // namespace cpu
}  // namespace decodekit
