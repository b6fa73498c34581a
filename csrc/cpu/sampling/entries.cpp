// The kernels of the sampling family (see sampling.h): one row per task.
#include "cpu/common/parallel.h"
#include "cpu/sampling/internal.h"
#include "cpu/sampling/plan.h"
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

Scratch& thread_scratch() {
  thread_local Scratch s;
  return s;
}

// Per-thread scratch is kept between calls unless a call needed more than
// kKeepScratch entries (cpu/common/scratch.h).
void trim_scratch() {
  Scratch& s = thread_scratch();
  trim(s.xbuf);
  trim(s.sums);
  if (static_cast<int64_t>(s.cands.capacity()) > kKeepScratch) std::vector<Cand>().swap(s.cands);
  if (static_cast<int64_t>(s.topn.capacity()) > kKeepScratch) std::vector<Cand>().swap(s.topn);
}

// Every row on its own (dynamic schedule: see cpu/common/parallel.h), the
// thread's scratch trimmed after its rows.
template <typename F>
void for_each_row(int64_t B, int num_threads, F&& f) {
  parallel_rows(B, num_threads, Schedule::kDynamic, f, [] { trim_scratch(); });
}

}  // namespace detail

using namespace detail;

void softmax(const LogitsView& lv, RowParam<float> temperature, bool /*deterministic*/, int num_threads, float* probs) {
  for_each_row(lv.batch, num_threads, [&](int64_t b) {
    Scratch& sc = thread_scratch();
    float* out = probs + b * lv.vocab;
    const float T = temperature.at(b);
    const int64_t V = lv.vocab_size;
    std::fill(out + V, out + lv.vocab, 0.0f);
    if (T > 0.0f && T < kInf) {
      const float inv_t = inverse_temperature(T);
      const bool ok = softmax_row(lv, b, inv_t, out, sc);
      if (!ok) std::fill(out, out + V, std::numeric_limits<float>::quiet_NaN());
      return;
    }
    const float* x = nullptr;
    const RowStats s = load_row(lv, b, sc.xbuf, nullptr, &x);
    if (!row_is_valid(s, T)) {
      std::fill(out, out + V, std::numeric_limits<float>::quiet_NaN());
      return;
    }
    std::fill(out, out + V, 0.0f);  // T == 0: one-hot at the argmax of the raw logits
    out[s.argmax] = 1.0f;
  });
}

void argmax(const LogitsView& lv, int num_threads, int64_t* ids, bool* valid) {
  for_each_row(lv.batch, num_threads, [&](int64_t b) {
    Scratch& sc = thread_scratch();
    const float* x = nullptr;
    const RowStats s = load_row(lv, b, sc.xbuf, nullptr, &x);
    valid[b] = row_is_valid(s, 0.0f);
    ids[b] = valid[b] ? s.argmax : -1;
  });
}

void sample_from_logits(const LogitsView& lv, const SamplingParams& params, const LogprobRequest& lp,
                        bool deterministic, int num_threads, int64_t* ids, bool* valid) {
  for_each_row(lv.batch, num_threads, [&](int64_t b) {
    bool ok = false;
    const int64_t id = sample_row(lv, b, params, lp, !deterministic, &ok);
    valid[b] = ok;
    ids[b] = ok ? id : -1;
  });
}

void sample_from_probs(const ProbsView& pv, const FilterParams& fp, RowParam<int64_t> seed, RowParam<int64_t> offset,
                       const LogprobRequest& lp, bool deterministic, int num_threads, int64_t* ids, bool* valid) {
  for_each_row(pv.batch, num_threads, [&](int64_t b) {
    Scratch& sc = thread_scratch();
    const ProbRow r = prepare_probs_row(pv, b, fp, sc);
    valid[b] = r.valid;
    if (!r.valid) {
      ids[b] = -1;
      write_invalid_logprobs(lp, b);
      return;
    }
    const int64_t V = pv.vocab_size;
    const double u =
        PhiloxStreamRef{static_cast<uint64_t>(seed.at(b)), static_cast<uint64_t>(offset.at(b)), kStreamSample}
            .uniform_double(0);
    double W = 1.0;
    const int64_t token = draw_kept(r.x, V, ProbWeight{}, r.kept, sc.cands, sc.sums, u, r.s.argmax, &W, !deterministic);
    ids[b] = token;
    if (!lp.active()) return;
    const float* x = r.x;
    if (lp.raw) {
      const RowWeights<ProbWeight> all{x, ProbWeight{}, 0.0f};
      const double log_total = log_double(block_sums(all, V, sc.sums.get(reduce::num_blocks(V))));
      write_logprobs(lp, b, token, x, V, [&](int64_t i) { return log_double(x[i]) - log_total; }, sc.topn);
    } else {
      const double logW = log_double(W);
      write_logprobs(
          lp, b, token, x, V,
          [&](int64_t i) {
            return is_kept(i, x, ProbWeight{}, r.kept, sc.cands) ? log_double(x[i]) - logW
                                                                 : -std::numeric_limits<double>::infinity();
          },
          sc.topn);
    }
  });
}

void filter_probs(const ProbsView& pv, const FilterParams& fp, int num_threads, float* out, bool* valid) {
  for_each_row(pv.batch, num_threads, [&](int64_t b) {
    Scratch& sc = thread_scratch();
    float* o = out + b * pv.vocab;
    std::fill(o + pv.vocab_size, o + pv.vocab, 0.0f);
    const ProbRow r = prepare_probs_row(pv, b, fp, sc);
    valid[b] = r.valid;
    if (!r.valid) {
      std::fill(o, o + pv.vocab_size, std::numeric_limits<float>::quiet_NaN());
      return;
    }
    write_filtered_row(r, pv.vocab_size, sc.cands, o);
  });
}

void processed_probs(const LogitsView& lv, const SamplingParams& params, bool deterministic, int num_threads,
                     float* probs, bool* valid) {
  for_each_row(lv.batch, num_threads, [&](int64_t b) {
    float* out = probs + b * lv.vocab;
    std::fill(out + lv.vocab_size, out + lv.vocab, 0.0f);
    valid[b] = processed_row(lv, b, params, !deterministic, out);
  });
}

void top_k_mask_logits(const LogitsView& lv, RowParam<int64_t> top_k, int num_threads, void* out, bool* valid) {
  const size_t esize = lv.kind == ScalarKind::kFloat32 ? 4 : 2;
  const uint32_t ninf =
      lv.kind == ScalarKind::kFloat32 ? 0xFF800000u : (lv.kind == ScalarKind::kFloat16 ? 0xFC00u : 0xFF80u);
  auto fill_ninf = [&](char* dst, int64_t n) {
    if (esize == 4) {
      float v;
      std::memcpy(&v, &ninf, 4);
      std::fill(reinterpret_cast<float*>(dst), reinterpret_cast<float*>(dst) + n, v);
    } else {
      std::fill(reinterpret_cast<uint16_t*>(dst), reinterpret_cast<uint16_t*>(dst) + n, static_cast<uint16_t>(ninf));
    }
  };
  for_each_row(lv.batch, num_threads, [&](int64_t b) {
    Scratch& sc = thread_scratch();
    const int64_t V = lv.vocab_size;
    const char* in_row = static_cast<const char*>(lv.data) + b * lv.row_stride * static_cast<int64_t>(esize);
    char* o = static_cast<char*>(out) + b * lv.vocab * static_cast<int64_t>(esize);
    fill_ninf(o + V * esize, lv.vocab - V);
    const int64_t k = top_k.at(b);
    const bool use_k = k > 0 && k < V;
    TopKGather g;
    if (use_k && k > 1) g.init(k, &sc.cands, &sc.cmax, &sc.ctmp);
    const float* x = nullptr;
    const RowStats s = load_row(lv, b, sc.xbuf, (use_k && k > 1) ? &g : nullptr, &x);
    valid[b] = !s.has_nan;
    if (!use_k || s.has_nan) {
      std::memcpy(o, in_row, static_cast<size_t>(V) * esize);
      return;
    }
    fill_ninf(o, V);
    if (k == 1) {
      std::memcpy(o + s.argmax * esize, in_row + s.argmax * esize, esize);
      return;
    }
    g.finish();
    for (int64_t i = 0; i < g.n; ++i) {
      const int64_t idx = (*g.buf)[i].idx;
      std::memcpy(o + idx * esize, in_row + idx * esize, esize);
    }
  });
}

}  // namespace DK_ISA
}  // namespace cpu
}  // namespace decodekit
