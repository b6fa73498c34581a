// Block-wide building blocks of the CUDA sampling kernels (sampling.cu): one
// thread block owns one row. Everything here is deterministic: float maxima
// with the lowest-index tie rule, integer (fixed-point) sums, and sorts of
// unique 64-bit rank words, so a row's result never depends on thread timing.
#pragma once

#include <cooperative_groups.h>
#include <cooperative_groups/reduce.h>

#include <cstdint>

#include "decodekit/fixed.h"
#include "decodekit/math.h"

namespace decodekit {
namespace cuda {
namespace row {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kCap = 4096;  // candidates sorted in shared memory
constexpr unsigned kFull = 0xffffffffu;
constexpr int64_t kNoIdx = INT64_MAX;
constexpr float kInf = __builtin_huge_valf();

// Element kinds: logits float32 / float16 / bfloat16, or probabilities (float32).
enum Kind : int { kF32 = 0, kF16 = 1, kBF16 = 2, kProb = 3 };

template <int K>
__device__ __forceinline__ float load_x(const void* row, int64_t i) {
  if constexpr (K == kF32 || K == kProb) {
    return __ldg(static_cast<const float*>(row) + i);
  } else if constexpr (K == kF16) {
    return half_bits_to_float(__ldg(static_cast<const unsigned short*>(row) + i));
  } else {
    return bf16_bits_to_float(__ldg(static_cast<const unsigned short*>(row) + i));
  }
}

// Elements per 16-byte vector load.
template <int K>
constexpr int kVec = (K == kF32 || K == kProb) ? 4 : 8;

template <int K>
__device__ __forceinline__ bool row_aligned(const void* row) {
  return (reinterpret_cast<uintptr_t>(row) & 15u) == 0;
}

// The kVec<K> elements of vector v (16-byte aligned row) as floats.
template <int K>
__device__ __forceinline__ void load_vec(const void* row, int64_t v, float* x) {
  if constexpr (K == kF32 || K == kProb) {
    const float4 q = __ldg(static_cast<const float4*>(row) + v);
    x[0] = q.x;
    x[1] = q.y;
    x[2] = q.z;
    x[3] = q.w;
  } else {
    const uint4 q = __ldg(static_cast<const uint4*>(row) + v);
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const unsigned short lo = static_cast<unsigned short>(w[j] & 0xffffu),
                           hi = static_cast<unsigned short>(w[j] >> 16);
      x[2 * j] = K == kF16 ? half_bits_to_float(lo) : bf16_bits_to_float(lo);
      x[2 * j + 1] = K == kF16 ? half_bits_to_float(hi) : bf16_bits_to_float(hi);
    }
  }
}

// Calls f(x, i) for every index i < V this thread owns (vector v = thread +
// kThreads j, then a scalar tail), with 16-byte loads, two vectors in flight.
// The set of indices per thread depends only on V and the alignment.
template <int K, class F>
__device__ __forceinline__ void for_each(const void* row, int64_t V, F&& f) {
  constexpr int W = kVec<K>;
  int64_t tail = 0;
  if (row_aligned<K>(row)) {
    const int64_t nv = V / W;
    int64_t v = threadIdx.x;
    for (; v + kThreads < nv; v += 2 * kThreads) {
      float a[W], b[W];
      load_vec<K>(row, v, a);
      load_vec<K>(row, v + kThreads, b);
#pragma unroll
      for (int j = 0; j < W; ++j) f(a[j], v * W + j);
#pragma unroll
      for (int j = 0; j < W; ++j) f(b[j], (v + kThreads) * W + j);
    }
    if (v < nv) {
      float a[W];
      load_vec<K>(row, v, a);
#pragma unroll
      for (int j = 0; j < W; ++j) f(a[j], v * W + j);
    }
    tail = nv * W;
  }
  for (int64_t i = tail + threadIdx.x; i < V; i += kThreads) f(load_x<K>(row, i), i);
}

// A token's rank word: rank_key(x) above, then the inverted index, so that a
// larger word ranks first (value descending, index ascending on ties). Words
// are unique within a row.
__device__ __forceinline__ uint64_t rank_word(float x, int64_t i) {
  return (static_cast<uint64_t>(rank_key(x)) << 32) | (0xffffffffu - static_cast<uint32_t>(i));
}
__device__ __forceinline__ int64_t word_index(uint64_t w) { return 0xffffffffu - static_cast<uint32_t>(w); }
__device__ __forceinline__ float word_value(uint64_t w) {
  const uint32_t k = static_cast<uint32_t>(w >> 32);
  return bits_to_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// The sampling weight of a value: exp((x - m) / T) from logits (the CPU's own
// exp, so the same bits), the value itself from probabilities; and its
// fixed-point form (decodekit/fixed.h).
struct Weight {
  bool identity;
  float m;
  ExpScale c;
  float pre;     // an exact power of two lifting rows of tiny probabilities (1 otherwise)
  float qscale;  // 2^(62 - e): maps the row's largest weight (times pre) into (2^61, 2^62]
  __device__ __forceinline__ float w(float x) const { return identity ? x : exp_scaled_nonpositive(x - m, c.hi, c.lo); }
  __device__ __forceinline__ uint64_t q(float x) const { return fixed_of(w(x) * pre, qscale); }
  // One weight unit in fixed-point units: a mass M is the weight sum M / unit().
  __device__ __forceinline__ double unit() const { return static_cast<double>(qscale) * static_cast<double>(pre); }
};

struct Shared {
  uint64_t cand[kCap];
  unsigned long long hist_hi[256];
  unsigned long long hist_lo[256];
  float tmax[kThreads];
  unsigned long long red_a[kWarps], red_b[kWarps];
  float red_f[kWarps];
  long long red_i[kWarps];
  int red_flags[kWarps];
  int ncand;
  int sel_bucket;
  unsigned long long sel_hi, sel_lo;
  long long found;
};

__device__ __forceinline__ int lane() { return threadIdx.x & 31; }
__device__ __forceinline__ int warp() { return threadIdx.x >> 5; }

// Row statistics of pass A.
struct Stats {
  float max;
  int64_t argmax;  // lowest index of the maximum (kNoIdx: none)
  int flags;       // 1: a NaN; 2: +inf; 4: a negative value
  int64_t npos;    // entries > 0
};

// One read of the row: maximum and lowest argmax, flags, positive count, and
// each thread's own maximum in sh.tmax (the top-k candidate bound).
template <int K>
__device__ Stats pass_a(const void* row, int64_t V, Shared& sh) {
  float m = -kInf, tm = -kInf;
  int64_t arg = kNoIdx, npos = 0;
  int flags = 0;
  auto visit = [&](float x, int64_t i) {
    if (x > m || (x == m && i < arg)) {
      m = x;
      arg = i;
    }
    tm = x > tm ? x : tm;
    flags |= (x != x) ? 1 : 0;
    flags |= (x == kInf) ? 2 : 0;
    flags |= (x < 0.0f) ? 4 : 0;
    npos += x > 0.0f ? 1 : 0;
  };
  for_each<K>(row, V, visit);
  sh.tmax[threadIdx.x] = tm;
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(kFull, m, o);
    const long long a2 = __shfl_xor_sync(kFull, static_cast<long long>(arg), o);
    if (m2 > m || (m2 == m && a2 < arg)) {
      m = m2;
      arg = a2;
    }
    flags |= __shfl_xor_sync(kFull, flags, o);
    npos += __shfl_xor_sync(kFull, static_cast<long long>(npos), o);
  }
  if (lane() == 0) {
    sh.red_f[warp()] = m;
    sh.red_i[warp()] = arg;
    sh.red_flags[warp()] = flags;
    sh.red_a[warp()] = static_cast<unsigned long long>(npos);
  }
  __syncthreads();
  Stats s{-kInf, kNoIdx, 0, 0};
  for (int j = 0; j < kWarps; ++j) {
    const float mj = sh.red_f[j];
    const int64_t aj = sh.red_i[j];
    if (mj > s.max || (mj == s.max && aj < s.argmax)) {
      s.max = mj;
      s.argmax = aj;
    }
    s.flags |= sh.red_flags[j];
    s.npos += static_cast<int64_t>(sh.red_a[j]);
  }
  __syncthreads();
  return s;
}

__device__ __forceinline__ Mass warp_sum(Mass v) {
  for (int o = 16; o > 0; o >>= 1) {
    v.hi += __shfl_xor_sync(kFull, v.hi, o);
    v.lo += __shfl_xor_sync(kFull, v.lo, o);
  }
  return v;
}

template <class Sh>
__device__ Mass block_sum(Mass v, Sh& sh) {
  v = warp_sum(v);
  if (lane() == 0) {
    sh.red_a[warp()] = v.hi;
    sh.red_b[warp()] = v.lo;
  }
  __syncthreads();
  Mass r;
  for (int j = 0; j < kWarps; ++j) r.add(Mass{sh.red_a[j], sh.red_b[j]});
  __syncthreads();
  return r;
}

// Exclusive prefix (in thread order) of v; *total = the block's sum.
template <class Sh>
__device__ Mass block_exclusive_scan(Mass v, Mass* total, Sh& sh) {
  Mass inc = v;
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned long long hi = __shfl_up_sync(kFull, inc.hi, o), lo = __shfl_up_sync(kFull, inc.lo, o);
    if (lane() >= o) {
      inc.hi += hi;
      inc.lo += lo;
    }
  }
  if (lane() == 31) {
    sh.red_a[warp()] = inc.hi;
    sh.red_b[warp()] = inc.lo;
  }
  __syncthreads();
  Mass before, tot;
  for (int j = 0; j < kWarps; ++j) {
    const Mass mj{sh.red_a[j], sh.red_b[j]};
    if (j < warp()) before.add(mj);
    tot.add(mj);
  }
  __syncthreads();
  *total = tot;
  return Mass{before.hi + inc.hi - v.hi, before.lo + inc.lo - v.lo};
}

// The first index (ascending) whose inclusive running sum of measure(i, x)
// exceeds target_of(total), where total is the row's sum of the measure:
// the inverse CDF of DESIGN.md with exact integer sums. Each thread owns a
// contiguous chunk; the block scans the chunk sums and the one thread whose
// chunk holds the target walks it. Returns -1 when nothing exceeds the
// target (target >= total); *total_out = the total.
template <int K, class Measure, class TargetOf>
__device__ int64_t find_in_index_order(const void* row, int64_t V, Measure measure, TargetOf target_of, Mass* total_out,
                                       Shared& sh) {
  constexpr int W = kVec<K>;
  const bool aligned = row_aligned<K>(row);
  const int64_t chunk = ((V + kThreads - 1) / kThreads + W - 1) / W * W;
  const int64_t lo = threadIdx.x * chunk, hi = lo + chunk < V ? lo + chunk : V;
  // Visits [lo, hi) in ascending order until g returns true.
  auto walk = [&](auto&& g) {
    int64_t i = lo;
    if (aligned) {
      for (; i + W <= hi; i += W) {
        float a[W];
        load_vec<K>(row, i / W, a);
        bool stop = false;
#pragma unroll
        for (int j = 0; j < W; ++j) stop = stop || g(a[j], i + j);
        if (stop) return;
      }
    }
    for (; i < hi; ++i)
      if (g(load_x<K>(row, i), i)) return;
  };
  Mass mine;
  walk([&](float x, int64_t i) {
    mine.add(measure(i, x));
    return false;
  });
  Mass total;
  const Mass before = block_exclusive_scan(mine, &total, sh);
  *total_out = total;
  const u128 target = target_of(total);
  if (threadIdx.x == 0) sh.found = -1;
  __syncthreads();
  Mass run = before;
  if (run.value() <= target && run.value() + mine.value() > target) {
    walk([&](float x, int64_t i) {
      run.add(measure(i, x));
      if (run.value() > target) {
        sh.found = i;
        return true;
      }
      return false;
    });
  }
  __syncthreads();
  const int64_t r = sh.found;
  __syncthreads();
  return r;
}

// The value whose rank_key is key.
__device__ __forceinline__ float key_value(uint32_t k) {
  return bits_to_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Appends the rank words of the tokens with pred(i, x) to sh.cand (the first
// kCap of them); returns how many satisfied pred.
template <int K, class Pred>
__device__ int gather(const void* row, int64_t V, Pred pred, Shared& sh) {
  constexpr int W = kVec<K>;
  if (threadIdx.x == 0) sh.ncand = 0;
  __syncthreads();
  auto put = [&](bool take, float x, int64_t i) {  // every lane of the warp calls it together
    const unsigned bal = __ballot_sync(kFull, take);
    if (bal == 0) return;
    int base = 0;
    if (lane() == 0) base = atomicAdd(&sh.ncand, __popc(bal));
    base = __shfl_sync(kFull, base, 0);
    const int slot = base + __popc(bal & ((1u << lane()) - 1u));
    if (take && slot < kCap) sh.cand[slot] = rank_word(x, i);
  };
  int64_t tail = 0;
  if (row_aligned<K>(row)) {
    const int64_t nv = V / W;
    const int64_t rounds = (nv + kThreads - 1) / kThreads;
    for (int64_t r = 0; r < rounds; ++r) {
      const int64_t v = r * kThreads + threadIdx.x;
      float a[W];
      const bool in = v < nv;
      if (in) load_vec<K>(row, v, a);
#pragma unroll
      for (int j = 0; j < W; ++j) put(in && pred(v * W + j, a[j]), in ? a[j] : 0.0f, v * W + j);
    }
    tail = nv * W;
  }
  const int64_t rounds = (V - tail + kThreads - 1) / kThreads;
  for (int64_t r = 0; r < rounds; ++r) {
    const int64_t i = tail + r * kThreads + threadIdx.x;
    const float x = i < V ? load_x<K>(row, i) : 0.0f;
    put(i < V && pred(i, x), x, i);
  }
  __syncthreads();
  const int n = sh.ncand;
  __syncthreads();
  return n;
}

// Sorts sh.cand[0, n) descending (rank order); n <= kCap. Bitonic over the
// next power of two, padded with 0 (below every rank word).
template <class Sh>
__device__ void sort_desc(int n, Sh& sh) {
  int P = 1;
  while (P < n) P <<= 1;
  for (int i = n + threadIdx.x; i < P; i += kThreads) sh.cand[i] = 0;
  __syncthreads();
  for (int size = 2; size <= P; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < P / 2; t += kThreads) {
        const int i = 2 * t - (t & (stride - 1));
        const int j = i + stride;
        const bool desc = (i & size) == 0;
        const uint64_t a = sh.cand[i], b = sh.cand[j];
        if ((a < b) == desc) {
          sh.cand[i] = b;
          sh.cand[j] = a;
        }
      }
      __syncthreads();
    }
  }
}

// The position (1-based) in sh.cand[0, n) (rank order) where the running sum
// of q first reaches target; 0 if it never does. *total = sum over all n.
template <class Sh>
__device__ int prefix_reaching(int n, const Weight& wt, u128 target, bool use_target, Mass* total, Sh& sh) {
  // Each thread takes a contiguous run of the sorted candidates.
  const int per = (n + kThreads - 1) / kThreads;
  const int lo = threadIdx.x * per, hi = lo + per < n ? lo + per : n;
  Mass mine;
  for (int i = lo; i < hi; ++i) mine.add(wt.q(word_value(sh.cand[i])));
  Mass tot;
  const Mass before = block_exclusive_scan(mine, &tot, sh);
  *total = tot;
  if (!use_target) return 0;
  if (threadIdx.x == 0) sh.found = 0;
  __syncthreads();
  Mass run = before;
  if (run.value() < target && run.value() + mine.value() >= target) {
    for (int i = lo; i < hi; ++i) {
      run.add(wt.q(word_value(sh.cand[i])));
      if (run.value() >= target) {
        sh.found = i + 1;
        break;
      }
    }
  }
  __syncthreads();
  const int r = static_cast<int>(sh.found);
  __syncthreads();
  return r;
}

// Inverse CDF over the kept tokens sh.cand[0, n) (rank words, n <= kCap):
// they are re-sorted into ascending index order and the first whose running
// mass exceeds target_of(total) is returned (-1 if none); *total = their mass.
template <class TargetOf, class Sh>
__device__ int64_t draw_sorted(int n, const Weight& wt, TargetOf target_of, Mass* total, Sh& sh) {
  for (int j = threadIdx.x; j < n; j += kThreads) {
    const uint64_t w = sh.cand[j];
    sh.cand[j] = (static_cast<uint64_t>(0xffffffffu - static_cast<uint32_t>(word_index(w))) << 32) | (w >> 32);
  }
  __syncthreads();
  sort_desc(n, sh);  // descending inverted index: ascending index
  const int per = (n + kThreads - 1) / kThreads;
  const int lo = threadIdx.x * per, hi = lo + per < n ? lo + per : n;
  Mass mine;
  for (int j = lo; j < hi; ++j) mine.add(wt.q(key_value(static_cast<uint32_t>(sh.cand[j]))));
  Mass tot;
  const Mass before = block_exclusive_scan(mine, &tot, sh);
  *total = tot;
  const u128 target = target_of(tot);
  if (threadIdx.x == 0) sh.found = -1;
  __syncthreads();
  Mass run = before;
  if (run.value() <= target && run.value() + mine.value() > target) {
    for (int j = lo; j < hi; ++j) {
      run.add(wt.q(key_value(static_cast<uint32_t>(sh.cand[j]))));
      if (run.value() > target) {
        sh.found = 0xffffffffu - static_cast<uint32_t>(sh.cand[j] >> 32);
        break;
      }
    }
  }
  __syncthreads();
  const int64_t r = sh.found;
  __syncthreads();
  return r;
}

// Histogram radix selection over rank_key digits (the fallback when the
// candidates do not fit in shared memory): among tokens with in_set(i, x),
// the key at which the running measure from the top (1 per token, or q)
// first reaches target; *above = the measure strictly above that key and
// *at = the measure at it. Returns false if the target is never reached.
template <int K, bool kMass, class InSet>
__device__ bool radix_select(const void* row, int64_t V, const Weight& wt, InSet in_set, u128 target, uint32_t* key_out,
                             Mass* above, Mass* at, Shared& sh) {
  uint32_t prefix = 0;
  *above = Mass{};
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += kThreads) sh.hist_hi[b] = sh.hist_lo[b] = 0;
    __syncthreads();
    for_each<K>(row, V, [&](float x, int64_t i) {
      const uint32_t key = rank_key(x);
      if (shift < 24 && (key >> (shift + 8)) != prefix) return;
      if (!in_set(i, x)) return;
      const int b = (key >> shift) & 255;
      // Lanes of a warp that hit one bucket add together, then one atomic per
      // bucket: flat rows send nearly every token to one or two buckets.
      namespace cg = cooperative_groups;
      const auto grp = cg::labeled_partition(cg::coalesced_threads(), b);
      if constexpr (kMass) {
        const uint64_t q = wt.q(x);
        const unsigned long long hi =
            cg::reduce(grp, static_cast<unsigned long long>(q >> 31), cg::plus<unsigned long long>());
        const unsigned long long lo =
            cg::reduce(grp, static_cast<unsigned long long>(q & 0x7fffffffu), cg::plus<unsigned long long>());
        if (grp.thread_rank() == 0 && (hi | lo)) {
          atomicAdd(&sh.hist_hi[b], hi);
          atomicAdd(&sh.hist_lo[b], lo);
        }
      } else if (grp.thread_rank() == 0) {
        atomicAdd(&sh.hist_lo[b], static_cast<unsigned long long>(grp.size()));
      }
    });
    __syncthreads();
    if (threadIdx.x < 32) {  // one warp scans the 256 buckets from the top
      const u128 want = target - above->value();
      Mass local;
      for (int j = 0; j < 8; ++j) local.add(Mass{sh.hist_hi[255 - 8 * lane() - j], sh.hist_lo[255 - 8 * lane() - j]});
      Mass inc = local;
      for (int o = 1; o < 32; o <<= 1) {
        const unsigned long long h = __shfl_up_sync(kFull, inc.hi, o), l = __shfl_up_sync(kFull, inc.lo, o);
        if (lane() >= o) {
          inc.hi += h;
          inc.lo += l;
        }
      }
      Mass exc{inc.hi - local.hi, inc.lo - local.lo};
      const bool here = exc.value() < want && inc.value() >= want;
      const unsigned bal = __ballot_sync(kFull, here);
      if (lane() == 0 && bal == 0) sh.sel_bucket = -1;
      if (here && lane() == __ffs(bal) - 1) {
        for (int j = 0; j < 8; ++j) {
          const int b = 255 - 8 * lane() - j;
          Mass next = exc;
          next.add(Mass{sh.hist_hi[b], sh.hist_lo[b]});
          if (next.value() >= want) {
            sh.sel_bucket = b;
            sh.sel_hi = exc.hi;
            sh.sel_lo = exc.lo;
            break;
          }
          exc = next;
        }
      }
    }
    __syncthreads();
    const int b = sh.sel_bucket;
    if (b < 0) {
      __syncthreads();
      return false;
    }
    above->add(Mass{sh.sel_hi, sh.sel_lo});
    *at = Mass{sh.hist_hi[b], sh.hist_lo[b]};
    prefix = (prefix << 8) | static_cast<uint32_t>(b);
    __syncthreads();
  }
  *key_out = prefix;
  return true;
}

}  // namespace row
}  // namespace cuda
}  // namespace decodekit
