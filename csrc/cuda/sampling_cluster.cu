// The fast path of sample_from_logits on Hopper: one thread-block cluster of
// kC blocks per row (sm_90 distributed shared memory). Each block reads its
// slice of the row from memory once into shared memory, and everything after
// that works on shared memory:
//   1. slice maximum, lowest argmax, flags, and the k-th largest per-thread
//      maximum (a lower bound tau_r of the slice's k-th largest value);
//      published, then combined by every block in rank order;
//   2. the slice's fixed-point mass (weights >= min_w) and, for top-p alone,
//      the mass above 2^-4, 2^-8, 2^-12, 2^-16; published and combined;
//   3a. plain / min-p rows: the block whose slice holds the draw target scans
//       its slice (exact integer running sums);
//   3b. top-k / top-p rows: the candidates (>= tau = max_r tau_r, or weights
//       above the nucleus bound of sampling.cu) are gathered into block 0's
//       shared memory, sorted by rank word and cut there; the draw runs over
//       the kept candidates in index order.
// The masses, cuts and draw are the integer arithmetic of sampling.cu, so the
// token ids are those of the one-block-per-row kernel bit for bit. Rows this
// path does not finish (top-k above kThreads, candidate overflow, a nucleus
// short of p by rounding, logprob requests) are flagged and handled by that
// kernel, launched right after on the same stream.
#include <cooperative_groups.h>

#include <cstdint>

#include "cuda/sampling_cluster.h"
#include "cuda/sampling_row.cuh"
#include "decodekit/fixed.h"
#include "decodekit/math.h"
#include "decodekit/philox.h"

namespace decodekit {
namespace cuda {
namespace {

using namespace row;
namespace cg = cooperative_groups;

constexpr int kC = 8;              // blocks per row (a portable cluster size)
constexpr int kClusterCap = 2048;  // candidates gathered in block 0
struct ClusterShared {
  uint64_t cand[kClusterCap];
  float tmax[kThreads];
  unsigned long long red_a[kWarps], red_b[kWarps];
  float red_f[kWarps];
  long long red_i[kWarps];
  int red_flags[kWarps];
  long long found;
  int ncand;
  // published to the other blocks of the cluster
  float pub_max;
  long long pub_arg;
  int pub_flags;
  float pub_tau;
  unsigned long long pub_hi, pub_lo;
  unsigned long long pub_thr_hi[4], pub_thr_lo[4];
};

struct ClusterArgs {
  const void* data;
  int64_t row_stride, vocab_size, slice;
  SamplingParams prm;
  int64_t* ids;
  bool* valid;
  unsigned char* fallback;
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr float kTwo62 = 4611686018427387904.0f;

__device__ __forceinline__ bool params_ok(float T, double p, float min_p) {
  return T >= 0.0f && T < kInf && p >= 0.0 && p <= 1.0 && min_p >= 0.0f && min_p <= 1.0f;
}

// Descending bitonic sort of sh.tmax (kThreads floats).
__device__ void sort_tmax(ClusterShared& sh) {
  for (int size = 2; size <= kThreads; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      const int t = threadIdx.x;
      if (t < kThreads / 2) {
        const int i = 2 * t - (t & (stride - 1)), j = i + stride;
        const bool desc = (i & size) == 0;
        const float a = sh.tmax[i], b = sh.tmax[j];
        if ((a < b) == desc) {
          sh.tmax[i] = b;
          sh.tmax[j] = a;
        }
      }
      __syncthreads();
    }
  }
}
#endif

template <int K>
__global__ void __launch_bounds__(kThreads, 2) sample_cluster_kernel(ClusterArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ float slice[];
  __shared__ ClusterShared sh;
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned r = cluster.block_rank();
  const int64_t b = blockIdx.y;
  constexpr int64_t kElem = K == kF32 ? 4 : 2;
  constexpr int W = kVec<K>;
  const int64_t V = a.vocab_size;
  const int64_t lo = static_cast<int64_t>(r) * a.slice;
  const int64_t n = V - lo < a.slice ? (V - lo > 0 ? V - lo : 0) : a.slice;
  const char* base = static_cast<const char*>(a.data) + (b * a.row_stride + lo) * kElem;
  const float T = a.prm.temperature.at(b);
  const int64_t k = a.prm.top_k.at(b);
  const double p = a.prm.top_p.at(b);
  const float min_p = a.prm.min_p.at(b);
  const bool use_k = T > 0.0f && k > 0 && k < V;
  const bool use_p = p < 1.0;
  if (threadIdx.x == 0) sh.ncand = 0;

  // 1. The slice into shared memory, with its statistics.
  float m = -kInf, tm = -kInf;
  int64_t arg = kNoIdx;
  int flags = 0;
  auto visit = [&](float x, int64_t i) {
    slice[i] = x;
    if (x > m || (x == m && lo + i < arg)) {
      m = x;
      arg = lo + i;
    }
    tm = x > tm ? x : tm;
    flags |= (x != x) ? 1 : 0;
    flags |= (x == kInf) ? 2 : 0;
  };
  int64_t tail = 0;
  if ((reinterpret_cast<uintptr_t>(base) & 15u) == 0) {
    const int64_t nv = n / W;
    int64_t v = threadIdx.x;
    for (; v + 3 * kThreads < nv; v += 4 * kThreads) {
      float x0[W], x1[W], x2[W], x3[W];
      load_vec<K>(base, v, x0);
      load_vec<K>(base, v + kThreads, x1);
      load_vec<K>(base, v + 2 * kThreads, x2);
      load_vec<K>(base, v + 3 * kThreads, x3);
#pragma unroll
      for (int j = 0; j < W; ++j) {
        visit(x0[j], v * W + j);
        visit(x1[j], (v + kThreads) * W + j);
        visit(x2[j], (v + 2 * kThreads) * W + j);
        visit(x3[j], (v + 3 * kThreads) * W + j);
      }
    }
    for (; v < nv; v += kThreads) {
      float x0[W];
      load_vec<K>(base, v, x0);
#pragma unroll
      for (int j = 0; j < W; ++j) visit(x0[j], v * W + j);
    }
    tail = nv * W;
  }
  for (int64_t i = tail + threadIdx.x; i < n; i += kThreads) visit(load_x<K>(base, i), i);
  sh.tmax[threadIdx.x] = tm;
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(kFull, m, o);
    const long long a2 = __shfl_xor_sync(kFull, static_cast<long long>(arg), o);
    if (m2 > m || (m2 == m && a2 < arg)) {
      m = m2;
      arg = a2;
    }
    flags |= __shfl_xor_sync(kFull, flags, o);
  }
  if (lane() == 0) {
    sh.red_f[warp()] = m;
    sh.red_i[warp()] = arg;
    sh.red_flags[warp()] = flags;
  }
  __syncthreads();
  if (use_k && k <= kThreads) sort_tmax(sh);
  if (threadIdx.x == 0) {
    float bm = -kInf;
    int64_t ba = kNoIdx;
    int bf = 0;
    for (int j = 0; j < kWarps; ++j) {
      if (sh.red_f[j] > bm || (sh.red_f[j] == bm && sh.red_i[j] < ba)) {
        bm = sh.red_f[j];
        ba = sh.red_i[j];
      }
      bf |= sh.red_flags[j];
    }
    sh.pub_max = bm;
    sh.pub_arg = ba;
    sh.pub_flags = bf;
    sh.pub_tau = (use_k && k <= kThreads) ? sh.tmax[k - 1] : -kInf;
  }
  cluster.sync();  // #1: the slices' statistics are published

  Stats s{-kInf, kNoIdx, 0, 0};
  float tau = -kInf;
  for (int j = 0; j < kC; ++j) {
    const ClusterShared* o = cluster.map_shared_rank(&sh, j);
    const float mj = o->pub_max;
    const int64_t aj = o->pub_arg;
    if (mj > s.max || (mj == s.max && aj < s.argmax)) {
      s.max = mj;
      s.argmax = aj;
    }
    s.flags |= o->pub_flags;
    tau = o->pub_tau > tau ? o->pub_tau : tau;
  }
  const bool ok = T >= 0.0f && T < kInf && !(s.flags & 1) && s.max > -kInf && !(T > 0.0f && (s.flags & 2)) &&
                  params_ok(T, p, min_p);
  const bool greedy = T == 0.0f || (use_k && k == 1) || p <= 0.0;
  if (!ok || greedy || (use_k && k > kThreads)) {
    if (r == 0 && threadIdx.x == 0) {
      const bool later = ok && !greedy;  // top-k above kThreads: the one-block kernel
      a.fallback[b] = later ? 1 : 0;
      if (!later) {
        a.ids[b] = ok ? s.argmax : -1;
        a.valid[b] = ok;
      }
    }
    cluster.sync();  // no block leaves while another may read its shared memory
    return;
  }

  // 2. Weights of the slice (from shared memory).
  const Weight wt{false, s.max, exp_scale(inverse_temperature(T)), 1.0f, kTwo62};
  const float min_w = min_p > 0.0f ? min_p : 0.0f;  // the top weight is exactly 1
  const bool plain = !use_k && !use_p;
  Mass mine, thr[4];
  if (!use_k) {
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const float x = slice[i];
      const uint64_t q = wt.q(x);
      if (!plain || wt.w(x) >= min_w) mine.add(q);
      if (!plain) {
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (q > (uint64_t{1} << (58 - 4 * j))) thr[j].add(q);
      }
    }
  }
  const Mass Wr = block_sum(mine, sh);
  Mass Tr[4];
  if (!use_k && !plain)
    for (int j = 0; j < 4; ++j) Tr[j] = block_sum(thr[j], sh);
  if (threadIdx.x == 0) {
    sh.pub_hi = Wr.hi;
    sh.pub_lo = Wr.lo;
    for (int j = 0; j < 4; ++j) {
      sh.pub_thr_hi[j] = Tr[j].hi;
      sh.pub_thr_lo[j] = Tr[j].lo;
    }
  }
  cluster.sync();  // #2: the slices' masses are published

  Mass Wall, before_me, M[4];
  for (int j = 0; j < kC; ++j) {
    const ClusterShared* o = cluster.map_shared_rank(&sh, j);
    const Mass mj{o->pub_hi, o->pub_lo};
    if (j < static_cast<int>(r)) before_me.add(mj);
    Wall.add(mj);
    for (int t = 0; t < 4; ++t) M[t].add(Mass{o->pub_thr_hi[t], o->pub_thr_lo[t]});
  }
  const double u =
      PhiloxStreamRef{static_cast<uint64_t>(a.prm.seed.at(b)), static_cast<uint64_t>(a.prm.offset.at(b)), kStreamSample}
          .uniform_double(0);
  auto target_of = [&](Mass tot) {
    const u128 total = tot.value();
    const u128 tg = u128_of_double(u * u128_to_double(total));
    return tg < total ? tg : total - 1;
  };

  if (plain) {
    const u128 target = target_of(Wall);
    const u128 start = before_me.value();
    cluster.sync();  // #3: every remote read is done
    if (!(start <= target && target < start + Wr.value())) return;
    // This slice holds the target: exact running sums over it, in index order.
    const u128 rem = target - start;
    const int64_t per = (n + kThreads - 1) / kThreads;
    const int64_t i0 = threadIdx.x * per, i1 = i0 + per < n ? i0 + per : n;
    Mass run;
    for (int64_t i = i0; i < i1; ++i)
      if (wt.w(slice[i]) >= min_w) run.add(wt.q(slice[i]));
    Mass tot;
    Mass acc = block_exclusive_scan(run, &tot, sh);
    if (threadIdx.x == 0) sh.found = -1;
    __syncthreads();
    if (acc.value() <= rem && acc.value() + run.value() > rem) {
      for (int64_t i = i0; i < i1; ++i) {
        if (wt.w(slice[i]) >= min_w) acc.add(wt.q(slice[i]));
        if (acc.value() > rem) {
          sh.found = lo + i;
          break;
        }
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      a.ids[b] = sh.found >= 0 ? sh.found : s.argmax;
      a.valid[b] = true;
      a.fallback[b] = 0;
    }
    return;
  }

  // 3. Candidates into block 0.
  const double Wd = u128_to_double(Wall.value());
  u128 target_p = u128_ceil_of_double(p * Wd);
  if (target_p == 0) target_p = 1;
  uint64_t bound = 0;
  if (!use_k) {
    bound = static_cast<uint64_t>(u128_of_double(0.5 * (1.0 - p) * Wd / static_cast<double>(V)));
    for (int j = 3; j >= 0; --j)
      if (M[j].value() >= target_p && bound < (uint64_t{1} << (58 - 4 * j))) bound = uint64_t{1} << (58 - 4 * j);
  }
  ClusterShared* s0 = cluster.map_shared_rank(&sh, 0);
  const int64_t rounds = (n + kThreads - 1) / kThreads;
  for (int64_t rd = 0; rd < rounds; ++rd) {
    const int64_t i = rd * kThreads + threadIdx.x;
    const float x = i < n ? slice[i] : 0.0f;
    const bool take = i < n && (use_k ? x >= tau : wt.q(x) > bound);
    const unsigned bal = __ballot_sync(kFull, take);
    if (bal == 0) continue;
    int slot0 = 0;
    if (lane() == 0) slot0 = atomicAdd(&s0->ncand, __popc(bal));
    slot0 = __shfl_sync(kFull, slot0, 0);
    const int slot = slot0 + __popc(bal & ((1u << lane()) - 1u));
    if (take && slot < kClusterCap) s0->cand[slot] = rank_word(x, lo + i);
  }
  cluster.sync();  // #3: the candidates are in block 0; no remote access after this
  if (r != 0) return;

  const int c = sh.ncand;
  bool done = c <= kClusterCap;
  int kept_n = 0;
  if (done) {
    sort_desc(c, sh);
    Mass WS;
    if (use_k) {
      kept_n = static_cast<int>(k);
      if (use_p) {
        prefix_reaching(kept_n, wt, 0, false, &WS, sh);
        u128 t = u128_ceil_of_double(p * u128_to_double(WS.value()));
        const int L = prefix_reaching(kept_n, wt, t > 0 ? t : 1, true, &WS, sh);
        if (L > 0) kept_n = L;
      }
    } else {
      const int L = prefix_reaching(c, wt, target_p, true, &WS, sh);
      kept_n = L;
      done = L > 0;  // short of p by rounding: every token stays, left to the one-block kernel
    }
  }
  if (!done) {
    if (threadIdx.x == 0) a.fallback[b] = 1;
    return;
  }
  long long cnt = 0;
  for (int j = threadIdx.x; j < kept_n; j += kThreads) cnt += wt.w(word_value(sh.cand[j])) >= min_w;
  const int n2 = static_cast<int>(block_sum(Mass{0, static_cast<uint64_t>(cnt)}, sh).value());
  Mass Wk;
  const int64_t t = draw_sorted(n2, wt, target_of, &Wk, sh);
  if (threadIdx.x == 0) {
    a.ids[b] = t >= 0 ? t : s.argmax;
    a.valid[b] = true;
    a.fallback[b] = 0;
  }
#endif
}

int compute_major(int device) {
  static int cache[64] = {0};
  if (device < 0 || device >= 64) return 0;
  if (cache[device] == 0) {
    int major = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return 0;
    cache[device] = major;
  }
  return cache[device];
}

template <int K>
cudaError_t launch_cluster(const LogitsView& logits, const ClusterArgs& a, size_t smem, cudaStream_t stream) {
  static bool configured = false;  // the dynamic shared-memory limit is raised once per kernel
  if (!configured) {
    const cudaError_t e = cudaFuncSetAttribute(sample_cluster_kernel<K>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(kMaxClusterSliceBytes));
    if (e != cudaSuccess) return e;
    configured = true;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(kC, static_cast<unsigned>(logits.batch), 1);
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = kC;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, sample_cluster_kernel<K>, a);
}

}  // namespace

bool cluster_path_applies(const LogitsView& logits, const LogprobRequest& lp) {
  if (lp.active() || logits.batch == 0 || logits.batch > 65535) return false;
  const int64_t slice = ((logits.vocab_size + kC - 1) / kC + 7) / 8 * 8;
  if (static_cast<size_t>(slice) * sizeof(float) > kMaxClusterSliceBytes) return false;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  return compute_major(device) >= 9;
}

cudaError_t sample_from_logits_cluster(const LogitsView& logits, const SamplingParams& params, int64_t* ids,
                                       bool* valid, unsigned char* fallback, cudaStream_t stream) {
  ClusterArgs a{};
  a.data = logits.data;
  a.row_stride = logits.row_stride;
  a.vocab_size = logits.vocab_size;
  a.slice = ((logits.vocab_size + kC - 1) / kC + 7) / 8 * 8;  // a multiple of 8: 16-byte aligned slices
  a.prm = params;
  a.ids = ids;
  a.valid = valid;
  a.fallback = fallback;
  const size_t smem = static_cast<size_t>(a.slice) * sizeof(float);
  switch (logits.kind) {
    case ScalarKind::kFloat32:
      return launch_cluster<kF32>(logits, a, smem, stream);
    case ScalarKind::kFloat16:
      return launch_cluster<kF16>(logits, a, smem, stream);
    case ScalarKind::kBFloat16:
      return launch_cluster<kBF16>(logits, a, smem, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace decodekit
