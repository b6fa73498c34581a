// The one-read softmax of a row (T > 0).
#include "cpu/sampling/internal.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace decodekit {
namespace cpu {
namespace DK_ISA {
namespace detail {

// m_c, and e = exp((x - m_c) / T) computed from L1 and stored. Chunks that
// share m_c form a segment (a handful per row: the running maximum rises
// about ln(#chunks) times); each chunk adds its values in runs of 16 per lane
// in float32 (relative error <= 16 u ~ 1e-6) into its segment's float64
// lanes. With the row maximum m, f = exp((m_seg - m) / T) and S = sum over
// segments of S_seg f (float64, in order), the final pass scales each chunk
// by f / S. From the chunk holding the maximum on, that is e / S exactly as a
// two-pass softmax gives; earlier chunks carry one more rounding. Returns
// false for an invalid row (NaN, no finite logit, +inf).
template <typename L>
bool softmax_online(const typename L::T* row, int64_t V, float inv_t, float* out, Buf<float>& mref_buf,
                    Buf<double>& seg_buf) {
  const int64_t nch = (V + kChunk - 1) / kChunk;
  mref_buf.resize(nch);
  seg_buf.resize(2 * nch + 2);  // (m_seg, S_seg) pairs
  float* mref = mref_buf.data();
  double* seg = seg_buf.data();
  int64_t nseg = 0;
  float m = -kInf;
  VI vnan = splati(0);  // +inf needs no flag: it becomes the running maximum
  const ExpScale ec = exp_scale(inv_t);
  const VF vch = splat(ec.hi), vcl = splat(ec.lo);
  Acc16d acc;
  auto flush = [&]() {
    if (m > -kInf) {
      seg[2 * nseg] = static_cast<double>(m);
      seg[2 * nseg + 1] = acc.sum();
      ++nseg;
    }
    acc = Acc16d{};
  };
  for (int64_t ch = 0; ch < nch; ++ch) {
    const int64_t c0 = ch * kChunk;
    const int64_t n = std::min(kChunk, V - c0);
    const typename L::T* r = row + c0;
    float* o = out + c0;
    auto load = [&](int64_t k) __attribute__((always_inline)) {
      if (k + kLanes <= n) return L::load16(r + k);
      float tmp[kLanes];
      for (int j = 0; j < kLanes; ++j) tmp[j] = k + j < n ? L::load(r, k + j) : -kInf;
      return load_f32(tmp);
    };
    if (c0 + kPrefetchElems<typename L::T> < V) __builtin_prefetch(row + c0 + kPrefetchElems<typename L::T>, 0, 0);
    VF cm = splat(-kInf);
    for (int64_t k = 0; k < n; k += kLanes) {
      const VF xs = load(k);
      cm = select(xs > cm, xs, cm);
      vnan |= xs != xs;
    }
    const float chunk_max = max_lane(cm);
    if (chunk_max > m) {
      flush();
      m = chunk_max;
    }
    mref[ch] = m;
    if (!(m > -kInf) || m == kInf) {  // nothing finite yet (or +inf: the row is invalid)
      std::fill(o, o + n, 0.0f);
      continue;
    }
    const VF vm = splat(m);
    VF run = splat(0.0f);
    int64_t k = 0;
    for (; k + kLanes <= n; k += kLanes) {
      const VF e = exp16_scaled(load(k) - vm, vch, vcl);
      store_f32(o + k, e);
      run = run + e;
    }
    if (k < n) {
      const VF e = exp16_scaled(load(k) - vm, vch, vcl);
      float ea[kLanes];
      to_array(e, ea);
      for (int64_t j = 0; k + j < n; ++j) o[k + j] = ea[j];
      run = run + e;
    }
    acc.add(run);
  }
  flush();
  if (any_lane(vnan) || !(m > -kInf) || m == kInf) return false;
  double S = 0.0;
  for (int64_t i = 0; i < nseg; ++i)
    S += seg[2 * i + 1] * static_cast<double>(exp_scaled_nonpositive(static_cast<float>(seg[2 * i]) - m, ec.hi, ec.lo));
  const double inv_S = 1.0 / S;
  float g = 0.0f, g_ref = kInf;
  for (int64_t ch = 0; ch < nch; ++ch) {
    const int64_t c0 = ch * kChunk;
    const int64_t n = std::min(kChunk, V - c0);
    if (mref[ch] != g_ref) {
      g_ref = mref[ch];
      g = g_ref == m ? static_cast<float>(inv_S)
                     : static_cast<float>(static_cast<double>(exp_scaled_nonpositive(g_ref - m, ec.hi, ec.lo)) * inv_S);
    }
    if (!(g_ref > -kInf)) continue;  // the leading chunks with no finite logit stay 0
    float* o = out + c0;
    const VF vg = splat(g);
    int64_t k = 0;
    for (; k + kLanes <= n; k += kLanes) store_f32(o + k, load_f32(o + k) * vg);
    for (; k < n; ++k) o[k] *= g;
  }
  return true;
}

bool softmax_row(const LogitsView& lv, int64_t b, float inv_t, float* out, Scratch& sc) {
  const int64_t V = lv.vocab_size;
  if (lv.kind == ScalarKind::kFloat32)
    return softmax_online<LoadF32>(static_cast<const float*>(lv.data) + b * lv.row_stride, V, inv_t, out, sc.cmax,
                                   sc.sums);
  if (lv.kind == ScalarKind::kFloat16)
    return softmax_online<LoadF16>(static_cast<const uint16_t*>(lv.data) + b * lv.row_stride, V, inv_t, out, sc.cmax,
                                   sc.sums);
  return softmax_online<LoadBF16>(static_cast<const uint16_t*>(lv.data) + b * lv.row_stride, V, inv_t, out, sc.cmax,
                                  sc.sums);
}

}  // namespace detail
}  // namespace DK_ISA
}  // namespace cpu
}  // namespace decodekit
