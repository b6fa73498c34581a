// Pass A of the sampling kernels: one streaming read of a row for its maximum,
// argmax, NaN/+inf flags and chunk maxima (logits or probabilities), the span
// helpers of the one-read passes, and the plain one-read draw's block sums.
#include "cpu/sampling/internal.h"
#include "cpu/sampling/top_k.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace decodekit {
namespace cpu {
namespace DK_ISA {
namespace detail {

// Pass A: one streaming read. Records each chunk's maximum in cmax (the top-k
// gather uses them; the argmax is the first index of the row maximum in the
// first chunk that reaches it) and a NaN flag; optionally converts to float32
// into xbuf (which then holds the row for the argmax). The chunk maximum is a
// tree over four vectors at a time, so no long dependency chain runs through
// the stream; +inf is seen as the maximum.
template <typename L>
DK_INLINE RowStats pass_a_impl(const typename L::T* row, int64_t V, float* xbuf, float* cmax) {
  VI vnan = splati(0);
  // One prefetch per 4 KiB page of the row before streaming it, so that the
  // page walks of a cold row overlap instead of stalling the stream one page
  // at a time (see kPrefetchElems).
  for (int64_t q = 0; q < V; q += kPageElems<typename L::T>) __builtin_prefetch(row + q, 0, 0);
  int64_t c = 0;
  auto vmax2 = [](VF a, VF b) __attribute__((always_inline)) { return select(a > b, a, b); };
  float m = -kInf;
  for (; c + kChunk <= V; c += kChunk) {
    VF cm = splat(-kInf);
    for (int64_t j = c; j < c + kChunk; j += 4 * kLanes) {
      VF xs[4];
      for (int q = 0; q < 4; ++q) __builtin_prefetch(row + j + q * kLanes + kPrefetchElems<typename L::T>, 0, 0);
      for (int q = 0; q < 4; ++q) {
        xs[q] = L::load16(row + j + q * kLanes);
        if (xbuf) store_f32(xbuf + j + q * kLanes, xs[q]);
      }
      vnan |= (xs[0] != xs[0]) | (xs[1] != xs[1]) | (xs[2] != xs[2]) | (xs[3] != xs[3]);
      cm = vmax2(cm, vmax2(vmax2(xs[0], xs[1]), vmax2(xs[2], xs[3])));
    }
    const float chunk_max = max_lane(cm);
    cmax[c / kChunk] = chunk_max;
    m = chunk_max > m ? chunk_max : m;
  }
  if (c < V) {  // the last, partial chunk
    VF cm = splat(-kInf);
    for (; c < V; c += kLanes) {
      VF xs;
      if (c + kLanes <= V) {
        xs = L::load16(row + c);
      } else {
        float tmp[kLanes];
        for (int j = 0; j < kLanes; ++j) tmp[j] = c + j < V ? L::load(row, c + j) : -kInf;
        xs = load_f32(tmp);
      }
      if (xbuf) {
        float tmp[kLanes];
        to_array(xs, tmp);
        for (int64_t j = 0; j < kLanes && c + j < V; ++j) xbuf[c + j] = tmp[j];
      }
      vnan |= xs != xs;
      cm = vmax2(cm, xs);
    }
    const float chunk_max = max_lane(cm);
    cmax[V / kChunk] = chunk_max;
    m = chunk_max > m ? chunk_max : m;
  }
  RowStats s{m, 0, any_lane(vnan), m == kInf};
  if (!s.has_nan && m > -kInf) {
    const float* x = xbuf ? xbuf : reinterpret_cast<const float*>(row);  // float32 rows are read in place
    s.argmax = first_index_of_max(x, V, cmax, kChunk, m);
  }
  return s;
}

RowStats pass_a_f32(const float* r, int64_t V, float* xb, float* cmax) { return pass_a_impl<LoadF32>(r, V, xb, cmax); }
RowStats pass_a_f16(const uint16_t* r, int64_t V, float* xb, float* cmax) {
  return pass_a_impl<LoadF16>(r, V, xb, cmax);
}
RowStats pass_a_bf16(const uint16_t* r, int64_t V, float* xb, float* cmax) {
  return pass_a_impl<LoadBF16>(r, V, xb, cmax);
}

// Loads row b into float32: returns a pointer to float32 logits (the input
// itself for float32, else the converted copy in xbuf) and the row stats.
RowStats load_row(const LogitsView& lv, int64_t b, Buf<float>& xbuf, TopKGather* g, const float** x_out) {
  const int64_t V = lv.vocab_size;
  thread_local Buf<float> own_cmax;
  float* cmax = g ? g->chunk_max_for(V) : nullptr;
  if (!cmax) {
    own_cmax.resize((V + kChunk - 1) / kChunk);
    cmax = own_cmax.data();
  }
  RowStats s;
  if (lv.kind == ScalarKind::kFloat32) {
    const float* row = static_cast<const float*>(lv.data) + b * lv.row_stride;
    *x_out = row;
    s = pass_a_f32(row, V, nullptr, cmax);
  } else {
    if (static_cast<int64_t>(xbuf.size()) < V) xbuf.resize(V);
    const uint16_t* row = static_cast<const uint16_t*>(lv.data) + b * lv.row_stride;
    *x_out = xbuf.data();
    s = lv.kind == ScalarKind::kFloat16 ? pass_a_f16(row, V, xbuf.data(), cmax)
                                        : pass_a_bf16(row, V, xbuf.data(), cmax);
  }
  if (g && !s.has_nan) g->gather_chunks(*x_out, V);
  return s;
}

// Pass A over a probability row: max, argmax, a "bad" flag (NaN, negative or
// infinite entries) and the number of positive entries; optionally the exact
// top-k candidates (ranked by probability, lowest index on ties).
RowStats pass_a_probs(const float* row, int64_t V, TopKGather* g, int64_t* npos) {
  VF vmax = splat(-kInf);
  VI vidx = iota16();
  VI vbad = splati(0), vpos = splati(0);
  const VF inf = splat(kInf), zero = splat(0.0f);
  float* cmax = g ? g->chunk_max_for(V) : nullptr;
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    VF cm = splat(-kInf);
    const int64_t end = std::min(V, c0 + kChunk);
    for (int64_t c = c0; c < end; c += kLanes) {
      const VF xs = c + kLanes <= V ? load_f32(row + c) : load_tail(row, c, V);
      const VI valid_lane = iota16() + splati(static_cast<int32_t>(c)) < splati(static_cast<int32_t>(V));
      const VI gt = xs > vmax;
      vmax = select(gt, xs, vmax);
      vidx = select(gt, iota16() + splati(static_cast<int32_t>(c)), vidx);
      vbad |= select(valid_lane, (xs != xs) | (xs == inf) | (zero > xs), splati(0));
      vpos = vpos + select(xs > zero, splati(1), splati(0));
      cm = select(xs > cm, xs, cm);
    }
    if (cmax) cmax[c0 / kChunk] = max_lane(cm);
  }
  RowStats s{-kInf, 0, any_lane(vbad), false};
  if (g && !s.has_nan) g->gather_chunks(row, V);
  float ma[kLanes];
  int32_t ia[kLanes], pa[kLanes];
  to_array(vmax, ma);
  to_array(vidx, ia);
  to_array(vpos, pa);
  int64_t count = 0;
  for (int j = 0; j < kLanes; ++j) {
    count += pa[j];
    if (ma[j] > s.max) s.max = ma[j];
  }
  int64_t best = std::numeric_limits<int64_t>::max();
  for (int j = 0; j < kLanes; ++j)
    if (ma[j] == s.max && ia[j] < best) best = ia[j];
  s.argmax = best;
  *npos = count;
  return s;
}

// ahead: the first, memory-bound read of a span in the one-read passes.
float span_max(const float* row, int64_t c0, int64_t n, int64_t V, VI& vnan) {
  if (c0 + kPrefetchElems<float> < V) __builtin_prefetch(row + c0 + kPrefetchElems<float>, 0, 0);
  const Span sp{row + c0, n};
  VF cm = splat(-kInf);
  for (int64_t k = 0; k < n; k += kLanes) {
    const VF xs = sp.load(k);
    cm = select(xs > cm, xs, cm);
    vnan |= xs != xs;
  }
  return max_lane(cm);
}

// The lowest index holding the row maximum m, in the first span (of `span`
// tokens) whose recorded maximum is m.
int64_t first_index_of_max(const float* row, int64_t V, const float* span_maxima, int64_t span, float m) {
  for (int64_t s0 = 0, i = 0; s0 < V; s0 += span, ++i) {
    if (span_maxima[i] != m) continue;
    const int64_t end = std::min(V, s0 + span);
    for (int64_t j = s0; j < end; ++j)
      if (row[j] == m) return j;
  }
  return 0;
}

// read of a float32 row. Each kBlock-token block is loaded once: its maximum
// (kept for the argmax) and NaN flag from memory, then its weights relative
// to the running maximum m_b from L1, summed in float64 lanes (even and odd
// vectors apart, as block_sums). With the row maximum m the block's sum is
// rescaled by exp((m_b - m) / T); the draw then walks these sums and, inside
// the chosen block, the weights relative to m (draw_from_blocks). Returns the
// row stats; W and the sums only for a valid row.
RowStats plain_online(const float* row, int64_t V, float inv_t, Buf<float>& bmax_buf, Buf<double>& sums_buf,
                      double* W_out) {
  const int64_t nb = (V + kBlock - 1) / kBlock;
  bmax_buf.resize(2 * nb);  // block maximum, then the running maximum the block used
  sums_buf.resize(nb);
  float* bmax = bmax_buf.data();
  float* bref = bmax + nb;
  double* sums = sums_buf.data();
  float m = -kInf;
  VI vnan = splati(0);
  const ExpScale ec = exp_scale(inv_t);
  const VF vch = splat(ec.hi), vcl = splat(ec.lo);
  for (int64_t blk = 0; blk < nb; ++blk) {
    const int64_t c0 = blk * kBlock;
    const Span sp{row + c0, std::min(kBlock, V - c0)};
    const int64_t n = sp.n;
    auto load = [&](int64_t k) __attribute__((always_inline)) { return sp.load(k); };
    const float block_max = span_max(row, c0, n, V, vnan);
    bmax[blk] = block_max;
    m = block_max > m ? block_max : m;
    bref[blk] = m;
    sums[blk] = 0.0;
    if (!(m > -kInf) || m == kInf) continue;  // nothing finite yet, or +inf (the row is invalid)
    const VF vm = splat(m);
    auto weight = [&](VF xs) __attribute__((always_inline)) { return exp16_scaled(xs - vm, vch, vcl); };  // 0 at -inf
    Acc16d acc, acc_odd;
    int64_t k = 0;
    for (; k + 2 * kLanes <= n; k += 2 * kLanes) {
      acc.add(weight(load(k)));
      acc_odd.add(weight(load(k + kLanes)));
    }
    for (; k < n; k += kLanes) acc.add(weight(load(k)));
    acc.merge(acc_odd);
    sums[blk] = acc.sum();
  }
  RowStats st{m, 0, any_lane(vnan), m == kInf};
  if (st.has_nan || !(m > -kInf) || m == kInf) return st;
  st.argmax = first_index_of_max(row, V, bmax, kBlock, m);
  double W = 0.0;
  float f_ref = kInf, f = 1.0f;
  for (int64_t blk = 0; blk < nb; ++blk) {
    if (bref[blk] != f_ref) {
      f_ref = bref[blk];
      f = f_ref == m ? 1.0f : exp_scaled_nonpositive(f_ref - m, ec.hi, ec.lo);
    }
    if (f != 1.0f) sums[blk] *= static_cast<double>(f);
    W += sums[blk];
  }
  *W_out = W;
  return st;
}

}  // namespace detail
}  // namespace DK_ISA
}  // namespace cpu
}  // namespace decodekit
