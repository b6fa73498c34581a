// Microbenchmarks of the CPU sampling kernels, called directly (raw pointers,
// no torch dispatch, no Python). Each iteration reads a different buffer from a
// pool larger than the last-level cache, so the numbers are for cold logits, and
// the reported bytes_per_second is the logits read (B x V x 4 bytes).
//
//   build/native/bench/native/bench_sampling --benchmark_filter=Sample
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "cpu/common/isa.h"

namespace dk = decodekit::cpu;

namespace {

constexpr int64_t kPoolBytes = int64_t{96} << 20;  // 3x a 32 MiB L3

struct Pool {
  int64_t B, V;
  std::vector<std::vector<float>> bufs;
  size_t next = 0;
  // Logits N(0, sd^2); at T = 0.7, sd = 4 gives a top-p 0.9 nucleus of a few tokens (peaked),
  // sd = 1 one of ~56,000 tokens at V = 128256 (flat: randn logits).
  Pool(int64_t b, int64_t v, bool probs, float sd = 4.0f) : B(b), V(v) {
    const int64_t n = std::max<int64_t>(2, kPoolBytes / (B * V * 4));
    std::mt19937 gen(1234);
    std::normal_distribution<float> normal(0.0f, sd);
    bufs.resize(static_cast<size_t>(std::min<int64_t>(n, 64)));
    for (auto& buf : bufs) {
      buf.resize(static_cast<size_t>(B * V));
      for (auto& x : buf) x = normal(gen);
      if (probs) {  // softmax rows
        for (int64_t r = 0; r < B; ++r) {
          float m = -1e30f;
          for (int64_t i = 0; i < V; ++i) m = std::max(m, buf[r * V + i]);
          double s = 0;
          for (int64_t i = 0; i < V; ++i) s += (buf[r * V + i] = std::exp(buf[r * V + i] - m));
          for (int64_t i = 0; i < V; ++i) buf[r * V + i] = static_cast<float>(buf[r * V + i] / s);
        }
      }
    }
  }
  const float* take() { return bufs[next++ % bufs.size()].data(); }
  dk::LogitsView logits(const float* d) const { return dk::LogitsView{d, dk::ScalarKind::kFloat32, B, V, V, V}; }
};

int threads() { return 2; }

void SampleFromLogits(benchmark::State& state, int64_t top_k, double top_p, float min_p, float sd = 4.0f) {
  Pool pool(state.range(0), state.range(1), false, sd);
  dk::SamplingParams p;
  p.temperature.scalar = 0.7f;
  p.top_k.scalar = top_k;
  p.top_p.scalar = top_p;
  p.min_p.scalar = min_p;
  p.seed.scalar = 1;
  std::vector<int64_t> ids(pool.B);
  std::unique_ptr<bool[]> valid(new bool[pool.B]);
  for (auto _ : state) {
    dk::kernels().sample_from_logits(pool.logits(pool.take()), p, dk::LogprobRequest{}, true, threads(), ids.data(),
                           valid.get());
    benchmark::DoNotOptimize(ids.data());
  }
  state.SetBytesProcessed(state.iterations() * pool.B * pool.V * 4);
  state.SetLabel(dk::active_isa());
}

void BM_Sample_k50_p09(benchmark::State& s) { SampleFromLogits(s, 50, 0.9, 0.0f); }
void BM_Sample_p09(benchmark::State& s) { SampleFromLogits(s, 0, 0.9, 0.0f); }
void BM_Sample_p09_flat(benchmark::State& s) { SampleFromLogits(s, 0, 0.9, 0.0f, 1.0f); }  // the hard case
void BM_Sample_plain(benchmark::State& s) { SampleFromLogits(s, 0, 1.0, 0.0f); }
void BM_Sample_minp(benchmark::State& s) { SampleFromLogits(s, 0, 1.0, 0.05f); }

void BM_Softmax(benchmark::State& state) {
  Pool pool(state.range(0), state.range(1), false);
  std::vector<float> out(static_cast<size_t>(pool.B * pool.V));
  dk::RowParam<float> t;
  t.scalar = 0.7f;
  for (auto _ : state) {
    dk::kernels().softmax(pool.logits(pool.take()), t, true, threads(), out.data());
    benchmark::DoNotOptimize(out.data());
  }
  state.SetBytesProcessed(state.iterations() * pool.B * pool.V * 4);
}

void BM_Argmax(benchmark::State& state) {
  Pool pool(state.range(0), state.range(1), false);
  std::vector<int64_t> ids(pool.B);
  std::unique_ptr<bool[]> valid(new bool[pool.B]);
  for (auto _ : state) {
    dk::kernels().argmax(pool.logits(pool.take()), threads(), ids.data(), valid.get());
    benchmark::DoNotOptimize(ids.data());
  }
  state.SetBytesProcessed(state.iterations() * pool.B * pool.V * 4);
}

void BM_FilterProbs_k50_p09(benchmark::State& state) {
  Pool pool(state.range(0), state.range(1), true);
  std::vector<float> out(static_cast<size_t>(pool.B * pool.V));
  std::unique_ptr<bool[]> valid(new bool[pool.B]);
  dk::FilterParams fp;
  fp.top_k.scalar = 50;
  fp.top_p.scalar = 0.9;
  for (auto _ : state) {
    const float* d = pool.take();
    dk::kernels().filter_probs(dk::ProbsView{d, pool.B, pool.V, pool.V, pool.V}, fp, threads(), out.data(), valid.get());
    benchmark::DoNotOptimize(out.data());
  }
  state.SetBytesProcessed(state.iterations() * pool.B * pool.V * 4);
}

void BM_SampleFromProbs_p09(benchmark::State& state) {
  Pool pool(state.range(0), state.range(1), true);
  std::vector<int64_t> ids(pool.B);
  std::unique_ptr<bool[]> valid(new bool[pool.B]);
  dk::FilterParams fp;
  fp.top_k.scalar = 0;
  fp.top_p.scalar = 0.9;
  dk::RowParam<int64_t> seed, offset;
  seed.scalar = 1;
  for (auto _ : state) {
    const float* d = pool.take();
    dk::kernels().sample_from_probs(dk::ProbsView{d, pool.B, pool.V, pool.V, pool.V}, fp, seed, offset, dk::LogprobRequest{},
                          true, threads(), ids.data(), valid.get());
    benchmark::DoNotOptimize(ids.data());
  }
  state.SetBytesProcessed(state.iterations() * pool.B * pool.V * 4);
}

void BM_ApplyPenalties(benchmark::State& state) {
  Pool pool(state.range(0), state.range(1), false);
  std::vector<float> out(static_cast<size_t>(pool.B * pool.V));
  std::vector<int64_t> ids(static_cast<size_t>(pool.B * 256));
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int64_t>((i * 7919) % pool.V);
  dk::PenaltyInputs in;
  in.repetition.scalar = 1.2f;
  in.frequency.scalar = 0.1f;
  in.token_ids = ids.data();
  in.token_ids_len = 256;
  for (auto _ : state) {
    dk::kernels().apply_penalties(pool.logits(pool.take()), in, threads(), out.data());
    benchmark::DoNotOptimize(out.data());
  }
  state.SetBytesProcessed(state.iterations() * pool.B * pool.V * 4);
}

void Shapes(benchmark::internal::Benchmark* b) {
  for (int64_t B : {1, 8, 64})
    for (int64_t V : {32000, 128256}) b->Args({B, V});
  b->ArgNames({"B", "V"})->Unit(benchmark::kMicrosecond)->UseRealTime();
}

}  // namespace

BENCHMARK(BM_Sample_k50_p09)->Apply(Shapes);
BENCHMARK(BM_Sample_p09)->Apply(Shapes);
BENCHMARK(BM_Sample_p09_flat)->Apply(Shapes);
BENCHMARK(BM_Sample_plain)->Apply(Shapes);
BENCHMARK(BM_Sample_minp)->Apply(Shapes);
BENCHMARK(BM_Softmax)->Apply(Shapes);
BENCHMARK(BM_Argmax)->Apply(Shapes);
BENCHMARK(BM_FilterProbs_k50_p09)->Apply(Shapes);
BENCHMARK(BM_SampleFromProbs_p09)->Apply(Shapes);
BENCHMARK(BM_ApplyPenalties)->Apply(Shapes);

BENCHMARK_MAIN();
