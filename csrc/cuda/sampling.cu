// CUDA kernels of the sampling family (see sampling.h and DESIGN.md).
//
// One thread block per row (row::kThreads threads), so a row's result never
// depends on the batch. Each kernel reads the row once from memory (pass A:
// maximum, lowest argmax, flags, per-thread maxima) and then works from L2:
//   top-k    k <= kThreads: the k-th largest per-thread maximum bounds the
//            k-th largest value from below, so the tokens at or above it
//            (usually a few times k) are gathered into shared memory and
//            sorted by rank word (value desc, index asc): the first k are the
//            top-k set. Otherwise (or when they overflow kCap) a histogram
//            radix selection over rank keys finds the boundary.
//   top-p    the candidates of the nucleus (weights above max(the largest of
//            2^-4, 2^-8, 2^-12, 2^-16 whose mass reaches p W, (1 - p) W / 2V),
//            the CPU's bounds) are gathered and sorted the same way; the
//            running fixed-point mass in rank order finds the shortest prefix
//            reaching p W. Flat rows whose candidates overflow fall back to a
//            radix selection by mass.
//   draw     inverse CDF in ascending index order over the kept tokens with
//            the float64 Philox uniform of stream 0 (DESIGN.md), exact integer
//            running sums (find_in_index_order).
// Built with --fmad=false like the CPU code (-ffp-contract=off), so the
// weights are the CPU's bits.
#include "cuda/sampling.h"

#include <cstdint>
#include <type_traits>

#include "cuda/sampling_cluster.h"
#include "cuda/sampling_row.cuh"
#include "decodekit/fixed.h"
#include "decodekit/math.h"
#include "decodekit/philox.h"

namespace decodekit {
namespace cuda {
namespace {

using namespace row;

constexpr float kTwo62 = 4611686018427387904.0f;

enum Mode : int { kSample = 0, kFilter = 1, kMask = 2, kProcessed = 3 };

struct Args {
  const void* data;
  int64_t vocab, row_stride, vocab_size;
  SamplingParams prm;  // temperature unused for probabilities
  LogprobRequest lp;
  int64_t* ids;
  bool* valid;
  void* out;                       // filter_probs: float [B, vocab]; top_k_mask_logits: logits dtype [B, vocab]
  const unsigned char* only_rows;  // when set, rows with only_rows[b] == 0 are left as they are
};

__device__ __forceinline__ bool params_ok(float T, double p, float min_p) {
  return T >= 0.0f && T < kInf && p >= 0.0 && p <= 1.0 && min_p >= 0.0f && min_p <= 1.0f;
}

__device__ __forceinline__ uint64_t word_at_or_below(uint32_t key) { return static_cast<uint64_t>(key) << 32; }

// rank word of the boundary for "the top n tokens": the n-th in rank order.
// Leaves the n best sorted in sh.cand[0, n) when n <= kCap.
template <int K>
__device__ uint64_t top_n_boundary(const void* row, int64_t V, int64_t n, const Weight& wt, Shared& sh, bool* sorted) {
  *sorted = false;
  if (n <= kThreads) {
    // tau = the n-th largest per-thread maximum: at least n values are >= tau.
    const float v = sh.tmax[threadIdx.x];
    int gt = 0, ge = 0;
    for (int s = 0; s < kThreads; ++s) {
      const float u = sh.tmax[s];
      gt += u > v;
      ge += u >= v;
    }
    if (threadIdx.x == 0) sh.red_f[0] = -kInf;
    __syncthreads();
    if (gt < n && n <= ge) sh.red_f[0] = v;  // every writer writes the same value
    __syncthreads();
    const float tau = sh.red_f[0];
    __syncthreads();
    const int c = gather<K>(row, V, [&](int64_t, float x) { return x >= tau; }, sh);
    if (c <= kCap) {
      sort_desc(c, sh);
      *sorted = true;
      return sh.cand[n - 1];
    }
  }
  uint32_t key;
  Mass above, at;
  radix_select<K, false>(row, V, wt, [](int64_t, float) { return true; }, static_cast<u128>(n), &key, &above, &at, sh);
  const int64_t need = n - static_cast<int64_t>(above.value());  // ties at key to take, in index order
  uint64_t bnd = word_at_or_below(key);
  if (static_cast<int64_t>(at.value()) > need) {
    Mass tot;
    const int64_t idx = find_in_index_order<K>(
        row, V, [&](int64_t, float x) { return static_cast<uint64_t>(rank_key(x) == key); },
        [&](Mass) { return static_cast<u128>(need - 1); }, &tot, sh);
    bnd = (static_cast<uint64_t>(key) << 32) | (0xffffffffu - static_cast<uint32_t>(idx));
  }
  if (n <= kCap) {
    const int c = gather<K>(row, V, [&](int64_t i, float x) { return rank_word(x, i) >= bnd; }, sh);
    sort_desc(c, sh);
    *sorted = true;
  }
  return bnd;
}

// The top-p boundary over the set {word >= set_bnd} (all tokens when 0):
// the rank word of the last token of the shortest rank-order prefix whose
// mass reaches p times the set's mass; set_bnd when the prefix never does.
// When sorted_n > 0, sh.cand[0, sorted_n) already holds the set in rank order.
// *kept_n: when > 0, the kept tokens are sh.cand[0, *kept_n) in rank order.
template <int K>
__device__ uint64_t top_p_boundary(const void* row, int64_t V, double p, const Weight& wt, uint64_t set_bnd,
                                   int sorted_n, int* kept_n, Shared& sh) {
  Mass W;
  *kept_n = 0;
  if (sorted_n > 0) {
    prefix_reaching(sorted_n, wt, 0, false, &W, sh);
    const u128 target = u128_ceil_of_double(p * u128_to_double(W.value()));
    const int L = prefix_reaching(sorted_n, wt, target > 0 ? target : 1, true, &W, sh);
    *kept_n = L > 0 ? L : sorted_n;
    return L > 0 ? sh.cand[L - 1] : set_bnd;
  }
  // The set's mass and, for the whole row, the mass above four thresholds.
  Mass mine, above_t[4];
  for_each<K>(row, V, [&](float x, int64_t i) {
    if (rank_word(x, i) < set_bnd) return;
    const uint64_t q = wt.q(x);
    mine.add(q);
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (q > (uint64_t{1} << (58 - 4 * j))) above_t[j].add(q);
  });
  W = block_sum(mine, sh);
  Mass M[4];
  for (int j = 0; j < 4; ++j) M[j] = block_sum(above_t[j], sh);
  const double Wd = u128_to_double(W.value());
  u128 target = u128_ceil_of_double(p * Wd);
  if (target == 0) target = 1;
  uint64_t bound = static_cast<uint64_t>(u128_of_double(0.5 * (1.0 - p) * Wd / static_cast<double>(V)));
  if (set_bnd == 0) {
    for (int j = 3; j >= 0; --j)
      if (M[j].value() >= target) bound = bound > (uint64_t{1} << (58 - 4 * j)) ? bound : (uint64_t{1} << (58 - 4 * j));
  }
  const int c =
      gather<K>(row, V, [&](int64_t i, float x) { return rank_word(x, i) >= set_bnd && wt.q(x) > bound; }, sh);
  if (c <= kCap) {
    sort_desc(c, sh);
    Mass part;
    const int L = prefix_reaching(c, wt, target, true, &part, sh);
    *kept_n = L;
    return L > 0 ? sh.cand[L - 1] : set_bnd;
  }
  // Flat row: radix selection by mass over the set.
  uint32_t key;
  Mass above, at;
  auto in_set = [&](int64_t i, float x) { return rank_word(x, i) >= set_bnd; };
  if (!radix_select<K, true>(row, V, wt, in_set, target, &key, &above, &at, sh)) return set_bnd;
  // Ties at key share one weight q_b: the first j of them (index order) complete the prefix.
  const uint64_t qb = wt.q(bits_to_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key));
  if (qb == 0) return set_bnd;
  const u128 rest = target - above.value();
  const u128 j = (rest + qb - 1) / qb;
  if (j * qb >= at.value()) return word_at_or_below(key) > set_bnd ? word_at_or_below(key) : set_bnd;
  Mass tot;
  const int64_t idx = find_in_index_order<K>(
      row, V, [&](int64_t i, float x) { return static_cast<uint64_t>(rank_key(x) == key && in_set(i, x)); },
      [&](Mass) { return j - 1; }, &tot, sh);
  return idx < 0 ? set_bnd : ((static_cast<uint64_t>(key) << 32) | (0xffffffffu - static_cast<uint32_t>(idx)));
}

template <int K, int M>
__global__ void __launch_bounds__(kThreads, 1) sampling_kernel(Args a) {
  __shared__ Shared sh;
  const int64_t b = blockIdx.x;
  if (a.only_rows && !a.only_rows[b]) return;  // finished by the cluster path
  constexpr bool kProbs = K == kProb;
  constexpr int64_t kElem = (K == kF32 || K == kProb) ? 4 : 2;
  const void* row = static_cast<const char*>(a.data) + b * a.row_stride * kElem;
  const int64_t V = a.vocab_size;
  const float T = kProbs ? 1.0f : a.prm.temperature.at(b);
  const int64_t k = a.prm.top_k.at(b);
  const double p = M == kMask ? 1.0 : a.prm.top_p.at(b);
  const float min_p = M == kMask ? 0.0f : a.prm.min_p.at(b);
  const Stats s = pass_a<K>(row, V, sh);

  bool ok;
  if (M == kMask) {
    ok = !(s.flags & 1);
  } else if (kProbs) {
    ok = !(s.flags & 7) && s.max > 0.0f && params_ok(0.0f, p, min_p);
  } else {
    ok = T >= 0.0f && T < kInf && !(s.flags & 1) && s.max > -kInf && !(T > 0.0f && (s.flags & 2)) &&
         params_ok(T, p, min_p);
  }
  const bool use_k = (kProbs || M == kMask || T > 0.0f) && k > 0 && k < V;
  const bool use_p = p < 1.0;
  const bool greedy = (!kProbs && M != kMask && T == 0.0f) || (use_k && k == 1) || p <= 0.0;
  // Rows of probabilities below 2^-60 are lifted by an exact 2^100 first, so their fixed-point weights keep 61 bits.
  const float pre = kProbs && s.max < 8.673617379884035e-19f ? 1.2676506002282294e30f : 1.0f;
  Weight wt{kProbs, s.max, exp_scale(greedy || kProbs ? 1.0f : inverse_temperature(T)), pre,
            kProbs ? (s.max > 0.0f ? fixed_scale_for(s.max * pre) : 1.0f) : kTwo62};

  if (M == kMask) {
    const unsigned short* in16 = static_cast<const unsigned short*>(row);
    char* out = static_cast<char*>(a.out) + b * a.vocab * kElem;
    uint64_t bnd = 0;
    if (ok && use_k) {
      if (k == 1) {
        bnd = rank_word(load_x<K>(row, s.argmax), s.argmax);
      } else {
        bool sorted;
        bnd = top_n_boundary<K>(row, V, k, wt, sh, &sorted);
      }
    }
    for (int64_t i = threadIdx.x; i < a.vocab; i += kThreads) {
      const bool keep = i < V && (!ok || !use_k || rank_word(load_x<K>(row, i), i) >= bnd);
      if (kElem == 4) {
        reinterpret_cast<float*>(out)[i] = keep ? static_cast<const float*>(row)[i] : -kInf;
      } else {
        const unsigned short ninf = K == kF16 ? 0xFC00u : 0xFF80u;
        reinterpret_cast<unsigned short*>(out)[i] = keep ? in16[i] : ninf;
      }
    }
    if (threadIdx.x == 0) a.valid[b] = ok;
    return;
  }

  float* fout = (M == kFilter || M == kProcessed) ? static_cast<float*>(a.out) + b * a.vocab : nullptr;
  if (M == kFilter || M == kProcessed)
    for (int64_t i = V + threadIdx.x; i < a.vocab; i += kThreads) fout[i] = 0.0f;
  if (!ok) {
    if (threadIdx.x == 0) {
      a.valid[b] = false;
      if (M == kSample) {
        a.ids[b] = -1;
        if (a.lp.logprobs) a.lp.logprobs[b] = __int_as_float(0x7fc00000);
      }
    }
    if (M == kSample)
      for (int64_t j = threadIdx.x; j < a.lp.n_top; j += kThreads) {
        a.lp.top_ids[b * a.lp.n_top + j] = -1;
        a.lp.top_logprobs[b * a.lp.n_top + j] = __int_as_float(0x7fc00000);
      }
    if (M == kFilter || M == kProcessed)
      for (int64_t i = threadIdx.x; i < V; i += kThreads) fout[i] = __int_as_float(0x7fc00000);
    return;
  }

  // The kept set: rank word >= bnd and weight >= min_w. When kept_n > 0 the
  // tokens with rank word >= bnd are also sh.cand[0, kept_n), in rank order.
  uint64_t bnd = 0;
  int kept_n = 0;
  float min_w = min_p > 0.0f ? min_p * (kProbs ? s.max : 1.0f) : 0.0f;
  if (greedy) {
    bnd = rank_word(load_x<K>(row, s.argmax), s.argmax);
    min_w = 0.0f;
  } else {
    int sorted_n = 0;
    if (use_k) {
      bool sorted;
      bnd = top_n_boundary<K>(row, V, k, wt, sh, &sorted);
      sorted_n = sorted ? static_cast<int>(k) : 0;
      kept_n = sorted_n;
    }
    if (use_p) bnd = top_p_boundary<K>(row, V, p, wt, bnd, sorted_n, &kept_n, sh);
  }
  auto kept = [&](int64_t i, float x) { return rank_word(x, i) >= bnd && wt.w(x) >= min_w; };

  if (M == kProcessed) {  // the distribution the draw uses: kept weights over their total
    if (greedy) {
      for (int64_t i = threadIdx.x; i < V; i += kThreads) fout[i] = i == s.argmax ? 1.0f : 0.0f;
    } else {
      Mass mine;
      for_each<K>(row, V, [&](float x, int64_t i) {
        if (kept(i, x)) mine.add(wt.q(x));
      });
      const double Wd = u128_to_double(block_sum(mine, sh).value()) / wt.unit();
      for_each<K>(row, V, [&](float x, int64_t i) {
        fout[i] = kept(i, x) ? static_cast<float>(static_cast<double>(wt.w(x)) / Wd) : 0.0f;
      });
    }
    if (threadIdx.x == 0) a.valid[b] = true;
    return;
  }

  if (M == kFilter) {
    if (!greedy && !use_k && !use_p && !(min_w > 0.0f)) {
      for (int64_t i = threadIdx.x; i < V; i += kThreads) fout[i] = static_cast<const float*>(row)[i];
      if (threadIdx.x == 0) a.valid[b] = true;
      return;
    }
    Mass mine;
    long long cnt = 0;
    for_each<K>(row, V, [&](float x, int64_t i) {
      if (kept(i, x) && x > 0.0f) {
        mine.add(wt.q(x));
        ++cnt;
      }
    });
    const Mass W = block_sum(mine, sh);
    const Mass C = block_sum(Mass{0, static_cast<uint64_t>(cnt)}, sh);
    const bool copy = static_cast<int64_t>(C.value()) == s.npos;
    const double Wd = u128_to_double(W.value()) / wt.unit();
    for_each<K>(row, V, [&](float x, int64_t i) {
      fout[i] = copy ? x : (kept(i, x) ? static_cast<float>(static_cast<double>(x) / Wd) : 0.0f);
    });
    if (threadIdx.x == 0) a.valid[b] = true;
    return;
  }

  // Draw (inverse CDF in index order) unless greedy.
  int64_t token = s.argmax;
  Mass W;
  if (!greedy) {
    const double u = PhiloxStreamRef{static_cast<uint64_t>(a.prm.seed.at(b)), static_cast<uint64_t>(a.prm.offset.at(b)),
                                     kStreamSample}
                         .uniform_double(0);
    auto target_of = [&](Mass tot) {
      const u128 total = tot.value();
      const u128 tg = u128_of_double(u * u128_to_double(total));
      return tg < total ? tg : total - 1;
    };
    int64_t t;
    if (kept_n > 0) {  // the kept tokens are in shared memory: min-p keeps a rank prefix of them
      long long n = 0;
      for (int j = threadIdx.x; j < kept_n; j += kThreads) n += wt.w(word_value(sh.cand[j])) >= min_w;
      const int kept_after_min_p = static_cast<int>(block_sum(Mass{0, static_cast<uint64_t>(n)}, sh).value());
      t = draw_sorted(kept_after_min_p, wt, target_of, &W, sh);
    } else {
      t = find_in_index_order<K>(
          row, V, [&](int64_t i, float x) { return kept(i, x) ? wt.q(x) : uint64_t{0}; }, target_of, &W, sh);
    }
    token = t >= 0 ? t : s.argmax;
  }
  if (threadIdx.x == 0) {
    a.ids[b] = token;
    a.valid[b] = true;
  }
  if (!a.lp.active()) return;

  // Logprobs: of the processed distribution, or raw (log_softmax of the input).
  double log_total = 0.0;
  const Weight raw{kProbs, s.max, exp_scale(1.0f), wt.pre, wt.qscale};
  if (a.lp.raw) {
    Mass mine;
    for_each<K>(row, V, [&](float x, int64_t) { mine.add(raw.q(x)); });
    const Mass R = block_sum(mine, sh);
    log_total = log_double(u128_to_double(R.value()) / wt.unit());
  } else if (!greedy) {
    log_total = log_double(u128_to_double(W.value()) / wt.unit());
  }
  const float inv_t = greedy || kProbs ? 1.0f : inverse_temperature(T);
  auto logprob = [&](int64_t i) -> float {
    const float x = load_x<K>(row, i);
    if (a.lp.raw)
      return static_cast<float>(kProbs ? log_double(x) - log_total : static_cast<double>(x - s.max) - log_total);
    if (greedy) return i == s.argmax ? 0.0f : -kInf;
    if (!kept(i, x)) return -kInf;
    return static_cast<float>(kProbs ? log_double(x) - log_total
                                     : static_cast<double>((x - s.max) * inv_t) - log_total);
  };
  if (a.lp.logprobs && threadIdx.x == 0) a.lp.logprobs[b] = logprob(token);
  const int64_t n = a.lp.n_top;
  if (n > 0) {
    bool sorted;
    top_n_boundary<K>(row, V, n, wt, sh, &sorted);  // n <= kMaxTopLogprobs <= kCap: sorted
    for (int64_t j = threadIdx.x; j < n; j += kThreads) {
      const int64_t id = word_index(sh.cand[j]);
      a.lp.top_ids[b * n + j] = id;
      a.lp.top_logprobs[b * n + j] = logprob(id);
    }
  }
}

template <int K>
__global__ void __launch_bounds__(kThreads) softmax_kernel(Args a) {
  __shared__ Shared sh;
  const int64_t b = blockIdx.x;
  constexpr int64_t kElem = K == kF32 ? 4 : 2;
  const void* row = static_cast<const char*>(a.data) + b * a.row_stride * kElem;
  const int64_t V = a.vocab_size;
  float* out = static_cast<float*>(a.out) + b * a.vocab;
  const float T = a.prm.temperature.at(b);
  const Stats s = pass_a<K>(row, V, sh);
  for (int64_t i = V + threadIdx.x; i < a.vocab; i += kThreads) out[i] = 0.0f;
  const bool ok = T >= 0.0f && T < kInf && !(s.flags & 1) && s.max > -kInf && !(T > 0.0f && (s.flags & 2));
  if (!ok) {
    for (int64_t i = threadIdx.x; i < V; i += kThreads) out[i] = __int_as_float(0x7fc00000);
    return;
  }
  if (T == 0.0f) {
    for (int64_t i = threadIdx.x; i < V; i += kThreads) out[i] = i == s.argmax ? 1.0f : 0.0f;
    return;
  }
  const Weight wt{false, s.max, exp_scale(inverse_temperature(T)), 1.0f, kTwo62};
  Mass mine;
  for_each<K>(row, V, [&](float x, int64_t) { mine.add(wt.q(x)); });
  const Mass W = block_sum(mine, sh);
  const double inv = 1.0 / (u128_to_double(W.value()) / static_cast<double>(kTwo62));
  for_each<K>(row, V, [&](float x, int64_t i) { out[i] = static_cast<float>(static_cast<double>(wt.w(x)) * inv); });
}

template <int K>
__global__ void __launch_bounds__(kThreads) argmax_kernel(Args a) {
  __shared__ Shared sh;
  const int64_t b = blockIdx.x;
  constexpr int64_t kElem = K == kF32 ? 4 : 2;
  const void* row = static_cast<const char*>(a.data) + b * a.row_stride * kElem;
  const Stats s = pass_a<K>(row, a.vocab_size, sh);
  if (threadIdx.x == 0) {
    const bool ok = !(s.flags & 1) && s.max > -kInf;
    a.valid[b] = ok;
    a.ids[b] = ok ? s.argmax : -1;
  }
}

// Launches kernel<K> for the view's element kind on B blocks.
template <class F>
cudaError_t launch(int64_t batch, ScalarKind kind, F&& f) {
  if (batch == 0) return cudaSuccess;
  if (batch > 2147483647) return cudaErrorInvalidValue;
  switch (kind) {
    case ScalarKind::kFloat32:
      f(std::integral_constant<int, kF32>{});
      break;
    case ScalarKind::kFloat16:
      f(std::integral_constant<int, kF16>{});
      break;
    case ScalarKind::kBFloat16:
      f(std::integral_constant<int, kBF16>{});
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

Args args_of(const LogitsView& v) {
  Args a{};
  a.data = v.data;
  a.vocab = v.vocab;
  a.row_stride = v.row_stride;
  a.vocab_size = v.vocab_size;
  return a;
}

Args args_of(const ProbsView& v) {
  Args a{};
  a.data = v.data;
  a.vocab = v.vocab;
  a.row_stride = v.row_stride;
  a.vocab_size = v.vocab_size;
  return a;
}

}  // namespace

cudaError_t softmax(const LogitsView& logits, RowParam<float> temperature, float* probs, cudaStream_t stream) {
  Args a = args_of(logits);
  a.prm.temperature = temperature;
  a.out = probs;
  const dim3 grid(static_cast<unsigned>(logits.batch));
  return launch(logits.batch, logits.kind, [&](auto k) { softmax_kernel<k()><<<grid, kThreads, 0, stream>>>(a); });
}

cudaError_t argmax(const LogitsView& logits, int64_t* ids, bool* valid, cudaStream_t stream) {
  Args a = args_of(logits);
  a.ids = ids;
  a.valid = valid;
  const dim3 grid(static_cast<unsigned>(logits.batch));
  return launch(logits.batch, logits.kind, [&](auto k) { argmax_kernel<k()><<<grid, kThreads, 0, stream>>>(a); });
}

cudaError_t sample_from_logits(const LogitsView& logits, const SamplingParams& params, const LogprobRequest& lp,
                               int64_t* ids, bool* valid, unsigned char* scratch, cudaStream_t stream) {
  if (lp.n_top > kMaxTopLogprobs || lp.n_top > logits.vocab_size) return cudaErrorInvalidValue;
  Args a = args_of(logits);
  a.prm = params;
  a.lp = lp;
  a.ids = ids;
  a.valid = valid;
  if (scratch && cluster_path_applies(logits, lp)) {
    const cudaError_t e = sample_from_logits_cluster(logits, params, ids, valid, scratch, stream);
    if (e != cudaSuccess) return e;
    a.only_rows = scratch;
  }
  const dim3 grid(static_cast<unsigned>(logits.batch));
  return launch(logits.batch, logits.kind,
                [&](auto k) { sampling_kernel<k(), kSample><<<grid, kThreads, 0, stream>>>(a); });
}

cudaError_t sample_from_probs(const ProbsView& probs, const FilterParams& params, RowParam<int64_t> seed,
                              RowParam<int64_t> offset, const LogprobRequest& lp, int64_t* ids, bool* valid,
                              cudaStream_t stream) {
  if (lp.n_top > kMaxTopLogprobs || lp.n_top > probs.vocab_size) return cudaErrorInvalidValue;
  if (probs.batch == 0) return cudaSuccess;
  if (probs.batch > 2147483647) return cudaErrorInvalidValue;
  Args a = args_of(probs);
  a.prm.top_k = params.top_k;
  a.prm.top_p = params.top_p;
  a.prm.min_p = params.min_p;
  a.prm.seed = seed;
  a.prm.offset = offset;
  a.lp = lp;
  a.ids = ids;
  a.valid = valid;
  sampling_kernel<kProb, kSample><<<dim3(static_cast<unsigned>(probs.batch)), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t filter_probs(const ProbsView& probs, const FilterParams& params, float* out, bool* valid,
                         cudaStream_t stream) {
  if (probs.batch == 0) return cudaSuccess;
  if (probs.batch > 2147483647) return cudaErrorInvalidValue;
  Args a = args_of(probs);
  a.prm.top_k = params.top_k;
  a.prm.top_p = params.top_p;
  a.prm.min_p = params.min_p;
  a.valid = valid;
  a.out = out;
  sampling_kernel<kProb, kFilter><<<dim3(static_cast<unsigned>(probs.batch)), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t processed_probs(const LogitsView& logits, const SamplingParams& params, float* probs, bool* valid,
                            cudaStream_t stream) {
  Args a = args_of(logits);
  a.prm = params;
  a.valid = valid;
  a.out = probs;
  const dim3 grid(static_cast<unsigned>(logits.batch));
  return launch(logits.batch, logits.kind,
                [&](auto k) { sampling_kernel<k(), kProcessed><<<grid, kThreads, 0, stream>>>(a); });
}

cudaError_t top_k_mask_logits(const LogitsView& logits, RowParam<int64_t> top_k, void* out, bool* valid,
                              cudaStream_t stream) {
  Args a = args_of(logits);
  a.prm.top_k = top_k;
  a.valid = valid;
  a.out = out;
  const dim3 grid(static_cast<unsigned>(logits.batch));
  return launch(logits.batch, logits.kind,
                [&](auto k) { sampling_kernel<k(), kMask><<<grid, kThreads, 0, stream>>>(a); });
}

}  // namespace cuda
}  // namespace decodekit
