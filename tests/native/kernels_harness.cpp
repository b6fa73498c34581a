// A torch-free harness that runs every CPU kernel of every instruction-set
// build the CPU supports over awkward sizes (vector tails, one token, rows past
// the capture cap), dtypes and parameters, and checks that all builds give the
// same bits. Built by `make sanitize` with -fsanitize=address,undefined (see
// CMakeLists.txt, DECODEKIT_SANITIZE): a clean run means no out-of-bounds
// access, leak or undefined behaviour on these inputs.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cpu/common/isa.h"
#include "cpu/speculative/residual.h"
#include "decodekit/math.h"

namespace dk = decodekit;
namespace cpu = decodekit::cpu;

namespace {

uint64_t fnv(uint64_t h, const void* p, size_t n) {
  const auto* b = static_cast<const unsigned char*>(p);
  for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  return h;
}
template <typename T>
uint64_t fnv(uint64_t h, const std::vector<T>& v) {
  return fnv(h, v.data(), v.size() * sizeof(T));
}

uint16_t to_half_bits(float f) {  // round toward zero is enough for test data
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const int e = static_cast<int>((x >> 23) & 0xff) - 127 + 15;
  if (e <= 0) return static_cast<uint16_t>(sign);
  if (e >= 31) return static_cast<uint16_t>(sign | 0x7c00u);
  return static_cast<uint16_t>(sign | (e << 10) | ((x >> 13) & 0x3ffu));
}

// Runs every kernel of one table; returns a hash of all outputs.
uint64_t run_all(const cpu::CpuKernels& k, int threads) {
  uint64_t h = 1469598103934665603ull;
  std::mt19937_64 rng(7);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (int64_t V : {1, 15, 17, 300, 1025, 5003, 40000, 70001}) {
    const int64_t B = 5;
    std::vector<float> x(B * V);
    for (auto& v : x) v = normal(rng);
    if (V == 70001) {  // flat rows (top-p's flat cut), one with a periodic structure (every 256th run of 16)
      for (auto& v : x) v *= 0.25f;
      for (int64_t i = 0; i < V; ++i) x[4 * V + i] += (i % 256) < 16 ? 0.3f : 0.0f;
    }
    x[1 * V] = NAN;                                            // an invalid row
    for (int64_t i = 0; i < V; ++i) x[2 * V + i] = -INFINITY;  // no finite logit
    if (V > 3) x[3 * V + 3] = INFINITY;
    std::vector<uint16_t> xh(x.size()), xb(x.size());
    for (size_t i = 0; i < x.size(); ++i) {
      xh[i] = to_half_bits(x[i]);
      uint32_t u;
      std::memcpy(&u, &x[i], 4);
      xb[i] = static_cast<uint16_t>(u >> 16);
    }
    const int64_t vs = V > 2 ? V - 2 : V;
    std::vector<float> temps = {0.0f, 0.7f, 1.0f, 1e-6f, 2.0f};
    for (int kind = 0; kind < 3; ++kind) {
      const void* data = kind == 0   ? static_cast<const void*>(x.data())
                         : kind == 1 ? static_cast<const void*>(xh.data())
                                     : xb.data();
      const dk::LogitsView lv{data, static_cast<dk::ScalarKind>(kind), B, V, V, vs};
      std::vector<float> probs(B * V);
      std::vector<int64_t> ids(B);
      bool valid[8];
      dk::RowParam<float> t{temps.data(), 0.0f};
      k.softmax(lv, t, true, threads, probs.data());
      h = fnv(h, probs);
      k.argmax(lv, threads, ids.data(), valid);
      h = fnv(h, ids);
      struct Prm {
        int64_t k;
        double p;
        float m;
      };
      for (const Prm& prm : {Prm{0, 1.0, 0.0f}, Prm{40, 1.0, 0.0f}, Prm{0, 0.9, 0.0f}, Prm{0, 1.0, 0.05f},
                             Prm{300, 0.95, 0.01f}, Prm{1, 1.0, 0.0f}, Prm{0, 0.0, 0.0f}, Prm{0, 0.5, 0.2f}}) {
        dk::SamplingParams sp;
        sp.temperature = t;
        sp.top_k.scalar = prm.k;
        sp.top_p.scalar = prm.p;
        sp.min_p.scalar = prm.m;
        sp.seed.scalar = 1234;
        sp.offset.scalar = 5;
        const int64_t n_top = std::min<int64_t>(3, vs);
        std::vector<float> lp(B), top_lp(B * n_top);
        std::vector<int64_t> top_ids(B * n_top);
        for (bool raw : {false, true}) {
          dk::LogprobRequest req{lp.data(), n_top, top_ids.data(), top_lp.data(), raw};
          for (bool det : {true, false}) {
            k.sample_from_logits(lv, sp, req, det, threads, ids.data(), valid);
            h = fnv(h, ids);
            h = fnv(h, lp);
            h = fnv(h, top_lp);
          }
        }
        k.processed_probs(lv, sp, true, threads, probs.data(), valid);
        h = fnv(h, probs);
        std::vector<float> masked(B * V);
        k.top_k_mask_logits(lv, sp.top_k, threads, masked.data(), valid);
        if (kind == 0) h = fnv(h, masked);
        if (kind == 0) {
          std::vector<float> pr(B * V), out(B * V);
          dk::RowParam<float> one{nullptr, 1.0f};
          k.softmax(lv, one, true, threads, pr.data());
          const dk::ProbsView pv{pr.data(), B, V, V, vs};
          dk::FilterParams fp;
          fp.top_k = sp.top_k;
          fp.top_p = sp.top_p;
          fp.min_p = sp.min_p;
          k.filter_probs(pv, fp, threads, out.data(), valid);
          h = fnv(h, out);
          dk::LogprobRequest req{lp.data(), n_top, top_ids.data(), top_lp.data(), false};
          k.sample_from_probs(pv, fp, sp.seed, sp.offset, req, true, threads, ids.data(), valid);
          h = fnv(h, ids);
        }
      }
      if (kind == 0) {
        std::vector<float> out(B * V);
        std::vector<int64_t> hist = {0, 1, -1, V - 1, V + 5, 2};
        cpu::PenaltyInputs in;
        in.repetition.scalar = 1.3f;
        in.frequency.scalar = 0.2f;
        in.presence.scalar = 0.1f;
        std::vector<int64_t> tok(B * 6);
        for (int64_t b = 0; b < B; ++b)
          for (int j = 0; j < 6; ++j) tok[b * 6 + j] = hist[j];
        in.token_ids = tok.data();
        in.token_ids_len = 6;
        k.apply_penalties(lv, in, threads, out.data());
        h = fnv(h, out);
      }
    }
    // Speculative: chain verification, greedy verification, the row check.
    const int64_t K = 3;
    std::vector<float> tp(B * (K + 1) * V), dp(B * K * V);
    for (auto& v : tp) v = std::abs(normal(rng));
    for (auto& v : dp) v = std::abs(normal(rng));
    std::vector<int64_t> drafts(B * K);
    for (auto& d : drafts) d = static_cast<int64_t>(rng() % static_cast<uint64_t>(V + 1)) - 1;
    std::vector<int64_t> out(B * (K + 1)), acc(B), emit(B);
    dk::RowParam<int64_t> seed{nullptr, 99}, offset{nullptr, 3};
    k.chain_speculative_sampling(dp.data(), drafts.data(), tp.data(), B, K, V, vs, seed, offset, threads, out.data(),
                                 acc.data(), emit.data());
    h = fnv(h, out);
    k.chain_speculative_sampling(nullptr, drafts.data(), tp.data(), B, K, V, vs, seed, offset, threads, out.data(),
                                 acc.data(), emit.data());
    h = fnv(h, out);
    std::vector<int64_t> top(B * (K + 1));
    for (auto& v : top) v = static_cast<int64_t>(rng() % 3) - 1;
    k.greedy_verify(drafts.data(), top.data(), B, K, threads, out.data(), acc.data(), emit.data());
    h = fnv(h, out);
    const int st = k.check_probability_rows(tp.data(), B * (K + 1), V, vs, true, threads);
    h = fnv(h, &st, sizeof st);
  }
  // Layers, linear, attention, KV cache.
  {
    const int64_t N = 7, H = 96;
    std::vector<float> xx(N * H), w(H), y(N * H);
    for (auto& v : xx) v = normal(rng);
    for (auto& v : w) v = normal(rng);
    k.rms_norm(xx.data(), N, H, H, w.data(), 1e-6f, y.data(), H, threads);
    h = fnv(h, y);
    k.silu_and_mul(xx.data(), N, H / 2, H, y.data(), H / 2, threads);
    h = fnv(h, y);
    std::vector<float> cs(50 * 32), sn(50 * 32);
    for (auto& v : cs) v = normal(rng);
    for (auto& v : sn) v = normal(rng);
    std::vector<int64_t> pos = {0, 3, 49, 7, 1, 2, 9};
    k.rope_inplace(xx.data(), N, 3, 32, H, cs.data(), sn.data(), pos.data(), threads);
    h = fnv(h, xx);
    std::vector<float> wl(37 * 150), xl(5 * 150), bl(37), yl(5 * 37);
    for (auto& v : wl) v = normal(rng);
    for (auto& v : xl) v = normal(rng);
    for (auto& v : bl) v = normal(rng);
    k.linear(xl.data(), 5, 150, 150, wl.data(), 37, 150, bl.data(), yl.data(), 37, threads);
    h = fnv(h, yl);
    const int64_t nb = 12, bs = 16, Hkv = 2, D = 64;
    std::vector<float> kc(nb * bs * Hkv * D), vc(kc.size()), q(2 * 3 * 6 * D), ao(q.size());
    for (auto& v : kc) v = normal(rng);
    for (auto& v : vc) v = normal(rng);
    for (auto& v : q) v = normal(rng);
    std::vector<int64_t> tables(12), lens = {70, 33};
    for (int i = 0; i < 12; ++i) tables[i] = i;
    tables[11] = 99;  // out of range: never read
    const cpu::PagedKV kv{kc.data(), vc.data(), dk::ScalarKind::kFloat32, nb, bs, Hkv, D, false};
    k.paged_attention(q.data(), 2, 3, 6, kv, tables.data(), 6, lens.data(), nullptr, 0.125f, threads, ao.data());
    h = fnv(h, ao);
    // a tree mask [2, 3, 3] (entries above the diagonal set: never read), one row reading nothing
    std::vector<uint8_t> tree = {1, 1, 1, 1, 1, 0, 1, 0, 1, 0, 0, 0, 1, 1, 0, 0, 1, 1};
    k.paged_attention(q.data(), 2, 3, 6, kv, tables.data(), 6, lens.data(), tree.data(), 0.125f, threads, ao.data());
    h = fnv(h, ao);
    cpu::KVCacheTensors c;
    c.k = kc.data();
    c.v = vc.data();
    c.elem_size = 4;
    c.num_heads = Hkv;
    c.head_dim = D;
    std::vector<float> key(5 * Hkv * D), val(key.size());
    for (auto& v : key) v = normal(rng);
    cpu::KVRows r;
    r.key = key.data();
    r.value = val.data();
    r.key_stride_t = r.value_stride_t = Hkv * D;
    r.key_stride_h = r.value_stride_h = D;
    std::vector<int64_t> slots = {0, -1, nb * bs - 1, nb * bs, 17};
    k.append_paged_kv_cache(c, nb, bs, r, slots.data(), 5, threads);
    c.layout = cpu::KVLayout::kHND;
    k.append_paged_kv_cache(c, nb, bs, r, slots.data(), 5, threads);
    h = fnv(h, kc);
    // compactions with awkward data: a non-increasing index, one past the table, a bad block id,
    // negative and huge starts; nothing may be touched out of bounds
    std::vector<int64_t> ctables = {3, 7, 99, 0, 5, -1, 11, 2, 4, 1, 6, 8};  // [3, 4]
    std::vector<int64_t> cstart = {2, -4, (int64_t{1} << 62)}, cacc = {0, 3, 5, 2, 1, 9, -1, 4, 0, 1, 2, 3};
    for (auto layout : {cpu::KVLayout::kNHD, cpu::KVLayout::kHND}) {
      c.layout = layout;
      k.compact_paged_kv_cache(c, nb, bs, ctables.data(), 4, 3, cstart.data(), cacc.data(), 4, threads);
      cstart[1] = 5;
      k.compact_paged_kv_cache(c, nb, bs, ctables.data(), 4, 3, cstart.data(), cacc.data(), 4, threads);
      // the pool seen as a contiguous cache of 3 rows of nb * bs / 3 positions
      k.compact_kv_cache(c, 3, nb * bs / 3, cstart.data(), cacc.data(), 4, threads);
      cstart[1] = -4;
    }
    h = fnv(h, kc);
    h = fnv(h, vc);
  }
  // One decoder block: 2 sequences x 3 new tokens (6 and 0 cached), float32 then Q8_0 weights
  // (random scales and quants), NHD then HND.
  {
    const int64_t B = 2, T = 3, H = 64, Hq = 4, Hkv = 2, D = 16, I = 96, nb = 6, bs = 4, P = 16;
    const int64_t qkv = (Hq + 2 * Hkv) * D;
    auto floats = [&](int64_t n, float scale) {
      std::vector<float> v(n);
      for (auto& e : v) e = scale * normal(rng);
      return v;
    };
    auto q8 = [&](int64_t N, int64_t K) {  // Q8_0 blocks: binary16 scale (2^-8 .. 2^-6), 32 int8
      std::vector<uint8_t> b(N * K / 32 * cpu::kQ8_0BlockBytes);
      for (size_t i = 0; i < b.size(); i += cpu::kQ8_0BlockBytes) {
        const uint16_t d = static_cast<uint16_t>((7 + rng() % 3) << 10);
        std::memcpy(&b[i], &d, 2);
        for (int j = 2; j < cpu::kQ8_0BlockBytes; ++j) b[i + j] = static_cast<uint8_t>(rng());
      }
      return b;
    };
    const auto an = floats(H, 1.0f), fn = floats(H, 1.0f), cs = floats(P * D, 1.0f), sn = floats(P * D, 1.0f);
    const auto wqkv = floats(qkv * H, 0.1f), wo = floats(H * Hq * D, 0.1f), wgu = floats(2 * I * H, 0.1f),
               wd = floats(H * I, 0.1f);
    const auto bqkv = q8(qkv, H), bo = q8(H, Hq * D), bgu = q8(2 * I, H), bd = q8(H, I);
    std::vector<int64_t> pos = {6, 7, 8, 0, 1, 2}, slots = {14, 15, 20, 16, 17, 18}, tables = {1, 3, 5, 4, -1, -1},
                         lens = {9, 3};
    for (int quant = 0; quant < 2; ++quant)
      for (int hnd = 0; hnd < 2; ++hnd) {
        auto x = floats(B * T * H, 1.0f), kc = floats(nb * bs * Hkv * D, 1.0f), vc = floats(kc.size(), 1.0f);
        cpu::DecoderLayerParams p;
        p.B = B, p.T = T, p.hidden = H, p.num_heads = Hq, p.num_kv_heads = Hkv, p.head_dim = D, p.intermediate = I;
        p.eps = 1e-5f, p.scale = 0.25f;
        p.attn_norm = an.data(), p.ffn_norm = fn.data();
        const void* wf[4] = {wqkv.data(), wo.data(), wgu.data(), wd.data()};
        const void* wq[4] = {bqkv.data(), bo.data(), bgu.data(), bd.data()};
        cpu::LayerWeight* lw[4] = {&p.wqkv, &p.wo, &p.w_gate_up, &p.w_down};
        for (int i = 0; i < 4; ++i) {
          lw[i]->data = quant ? wq[i] : wf[i];
          lw[i]->quantized = quant;
          lw[i]->type = cpu::BlockType::kQ8_0;
        }
        p.cos_table = cs.data(), p.sin_table = sn.data(), p.positions = pos.data();
        p.cache.k = kc.data(), p.cache.v = vc.data(), p.cache.elem_size = 4, p.cache.num_heads = Hkv;
        p.cache.head_dim = D, p.cache.layout = hnd ? cpu::KVLayout::kHND : cpu::KVLayout::kNHD;
        p.num_blocks = nb, p.block_size = bs, p.slot_mapping = slots.data(), p.block_tables = tables.data();
        p.max_blocks = 3, p.seq_lens = lens.data();
        k.decoder_layer(x.data(), p, threads);
        h = fnv(h, x);
        h = fnv(h, kc);
        h = fnv(h, vc);
      }
    // The embedding lookup on blocks; id 99 is outside the weight (zeros).
    std::vector<int64_t> ids = {3, 0, 63, 99, 3};
    std::vector<float> rows(ids.size() * H);
    k.dequantize_rows(bgu.data(), cpu::BlockType::kQ8_0, 2 * I, H, ids.data(), 5, rows.data(), threads);
    h = fnv(h, rows);
  }
  return h;
}

bool supported(const char* isa) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (!std::strcmp(isa, "avx512"))
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  if (!std::strcmp(isa, "avx2")) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return !std::strcmp(isa, "baseline");
}

// The CPU's 16-lane log16 (typical acceptance's entropy terms) against its scalar twin
// decodekit::log_positive_normal, which the CUDA kernels use: the same bits for every positive
// normal float tested (a sweep of exponents and mantissas, and the f = sqrt(2) boundary).
bool log_twins_agree() {
  std::vector<float> xs;
  for (uint32_t e = 1; e < 255; ++e)
    for (uint32_t m : {0u, 1u, 0x3504f3u, 0x3504f4u, 0x2aaaabu, 0x400000u, 0x7fffffu, 0x123457u})
      xs.push_back(dk::bits_to_float((e << 23) | m));
  std::mt19937 rng(3);
  std::uniform_int_distribution<uint32_t> bits(0x00800000u, 0x7f7fffffu);
  for (int i = 0; i < 100000; ++i) xs.push_back(dk::bits_to_float(bits(rng)));
  while (xs.size() % 16) xs.push_back(1.0f);
  int64_t bad = 0;
  for (size_t c = 0; c < xs.size(); c += 16) {
    float lanes[16];
    cpu::DK_ISA::to_array(cpu::DK_ISA::detail::log16(cpu::DK_ISA::load_f32(&xs[c])), lanes);
    for (int j = 0; j < 16; ++j)
      if (dk::float_to_bits(lanes[j]) != dk::float_to_bits(dk::log_positive_normal(xs[c + j]))) ++bad;
  }
  std::printf("log16 vs log_positive_normal: %zu values, %lld differ\n", xs.size(), static_cast<long long>(bad));
  return bad == 0;
}

}  // namespace

int main() {
  struct Entry {
    const char* name;
    const cpu::CpuKernels* table;
  };
  const Entry entries[] = {
#if defined(DK_MULTI_ISA)
      {"avx512", &cpu::avx512::kTable},
      {"avx2", &cpu::avx2::kTable},
#endif
      {"baseline", &cpu::baseline::kTable}};
  uint64_t first = 0;
  bool have = false, same = true;
  for (const Entry& e : entries) {
    if (!supported(e.name)) continue;
    for (int threads : {1, 2}) {
      const uint64_t h = run_all(*e.table, threads);
      std::printf("%-8s threads=%d %016llx\n", e.name, threads, static_cast<unsigned long long>(h));
      if (have && h != first) same = false;
      first = have ? first : h;
      have = true;
    }
  }
  std::printf(same ? "every build gives the same bits\n" : "MISMATCH between builds\n");
  const bool logs = log_twins_agree();
  return same && logs ? 0 : 1;
}
