// Run-time choice of the instruction set for the CPU kernels. Each kernel file
// is compiled once per instruction set (CMakeLists.txt); this file forwards
// the public API to the build the CPU supports. DECODEKIT_CPU_ISA=avx2 (or
// avx512, baseline) forces one, e.g. to check that every build gives the same
// bits; a value the CPU cannot run falls back to the best supported one.
#include <cstdlib>
#include <cstring>

#include "kv_cache.h"
#include "attention.h"
#include "linear.h"
#include "penalties.h"
#include "sampling.h"
#include "speculative.h"
#include "layers.h"

namespace decodekit {
namespace cpu {
namespace {

enum class Isa { kBaseline, kAvx2, kAvx512 };

bool cpu_supports(Isa isa) {
#if defined(__x86_64__) && defined(DK_MULTI_ISA)
  __builtin_cpu_init();
  switch (isa) {
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2") &&
             __builtin_cpu_supports("f16c");
    case Isa::kBaseline:
      return true;
  }
  return false;
#else
  return isa == Isa::kBaseline;
#endif
}

Isa choose() {
  const char* env = std::getenv("DECODEKIT_CPU_ISA");
  if (env) {
    if (!std::strcmp(env, "avx512") && cpu_supports(Isa::kAvx512)) return Isa::kAvx512;
    if (!std::strcmp(env, "avx2") && cpu_supports(Isa::kAvx2)) return Isa::kAvx2;
    if (!std::strcmp(env, "baseline")) return Isa::kBaseline;
  }
  if (cpu_supports(Isa::kAvx512)) return Isa::kAvx512;
  if (cpu_supports(Isa::kAvx2)) return Isa::kAvx2;
  return Isa::kBaseline;
}

Isa isa() {
  static const Isa chosen = choose();
  return chosen;
}

}  // namespace

#if defined(DK_MULTI_ISA)
#define DK_DISPATCH(fn, ...)                                \
  switch (isa()) {                                          \
    case Isa::kAvx512: return avx512::fn(__VA_ARGS__);      \
    case Isa::kAvx2: return avx2::fn(__VA_ARGS__);          \
    case Isa::kBaseline: return baseline::fn(__VA_ARGS__);  \
  }
#else
#define DK_DISPATCH(fn, ...) return baseline::fn(__VA_ARGS__);
#endif

const char* active_isa() {
  switch (isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kBaseline: return "baseline";
  }
  return "baseline";
}

void softmax(const LogitsView& lv, RowParam<float> t, bool det, int nt, float* probs) {
  DK_DISPATCH(softmax, lv, t, det, nt, probs)
}

void argmax(const LogitsView& lv, int nt, int64_t* ids, bool* valid) { DK_DISPATCH(argmax, lv, nt, ids, valid) }

void sample_from_logits(const LogitsView& lv, const SamplingParams& p, const LogprobRequest& lp, bool det, int nt,
                        int64_t* ids, bool* valid) {
  DK_DISPATCH(sample_from_logits, lv, p, lp, det, nt, ids, valid)
}

void sample_from_probs(const ProbsView& pv, const FilterParams& fp, RowParam<int64_t> seed, RowParam<int64_t> offset,
                       const LogprobRequest& lp, bool det, int nt, int64_t* ids, bool* valid) {
  DK_DISPATCH(sample_from_probs, pv, fp, seed, offset, lp, det, nt, ids, valid)
}

void filter_probs(const ProbsView& pv, const FilterParams& fp, int nt, float* out, bool* valid) {
  DK_DISPATCH(filter_probs, pv, fp, nt, out, valid)
}

void top_k_mask_logits(const LogitsView& lv, RowParam<int64_t> k, int nt, void* out, bool* valid) {
  DK_DISPATCH(top_k_mask_logits, lv, k, nt, out, valid)
}

void apply_penalties(const LogitsView& lv, const PenaltyInputs& in, int nt, float* out) {
  DK_DISPATCH(apply_penalties, lv, in, nt, out)
}

void paged_attention(const float* q, int64_t B, int64_t Q, int64_t Hq, const PagedKV& kv, const int64_t* tables,
                     int64_t max_blocks, const int64_t* seq_lens, float scale, int nt, float* out) {
  DK_DISPATCH(paged_attention, q, B, Q, Hq, kv, tables, max_blocks, seq_lens, scale, nt, out)
}

void chain_speculative_sampling(const float* dp, const int64_t* ids, const float* tp, int64_t B, int64_t K, int64_t V,
                                int64_t vs, RowParam<int64_t> seed, RowParam<int64_t> offset, int nt, int64_t* out,
                                int64_t* acc, int64_t* emit) {
  DK_DISPATCH(chain_speculative_sampling, dp, ids, tp, B, K, V, vs, seed, offset, nt, out, acc, emit)
}

void rms_norm(const float* x, int64_t N, int64_t H, int64_t ldx, const float* w, float eps, float* y, int64_t ldy,
              int nt) {
  DK_DISPATCH(rms_norm, x, N, H, ldx, w, eps, y, ldy, nt)
}

void silu_and_mul(const float* x, int64_t N, int64_t I, int64_t ldx, float* y, int64_t ldy, int nt) {
  DK_DISPATCH(silu_and_mul, x, N, I, ldx, y, ldy, nt)
}

void rope_inplace(float* x, int64_t N, int64_t H, int64_t D, int64_t ldx, const float* c, const float* s,
                  const int64_t* pos, int nt) {
  DK_DISPATCH(rope_inplace, x, N, H, D, ldx, c, s, pos, nt)
}

int check_probability_rows(const float* rows, int64_t nrows, int64_t V, int64_t vs, bool need_mass, int nt) {
  DK_DISPATCH(check_probability_rows, rows, nrows, V, vs, need_mass, nt)
  return 0;
}

void linear(const float* x, int64_t M, int64_t K, int64_t ldx, const float* w, int64_t N, int64_t ldw,
            const float* bias, float* y, int64_t ldy, int nt) {
  DK_DISPATCH(linear, x, M, K, ldx, w, N, ldw, bias, y, ldy, nt)
}

// ------------------------------------------------------------- KV cache ----
void append_kv_cache(const KVCacheTensors& c, int64_t batch, int64_t max_seq_len, const KVRows& r, int64_t tokens,
                     const int64_t* seq_lens, int nt) {
  DK_DISPATCH(append_kv_cache, c, batch, max_seq_len, r, tokens, seq_lens, nt)
}

void append_paged_kv_cache(const KVCacheTensors& c, int64_t num_blocks, int64_t block_size, const KVRows& r,
                           const int64_t* slot_mapping, int64_t num_slots, int nt) {
  DK_DISPATCH(append_paged_kv_cache, c, num_blocks, block_size, r, slot_mapping, num_slots, nt)
}

}  // namespace cpu
}  // namespace decodekit
