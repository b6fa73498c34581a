// Phase timers of the decoder-layer kernel (see layers.h, layer_profile).
// Compiled once, not per instruction set: the counters are shared by every build.
#include <atomic>
#include <cstdint>

#include "cpu/layers.h"

namespace decodekit {
namespace cpu {
namespace layer_profile {
namespace {
std::atomic<bool> g_on{false};
std::atomic<int64_t> g_ns[kNumPhases];
std::atomic<int64_t> g_calls{0};
}  // namespace

bool enabled() { return g_on.load(std::memory_order_relaxed); }

void set_enabled(bool on) {
  for (auto& c : g_ns) c.store(0, std::memory_order_relaxed);
  g_calls.store(0, std::memory_order_relaxed);
  g_on.store(on, std::memory_order_relaxed);
}

void add(Phase phase, int64_t ns) { g_ns[phase].fetch_add(ns, std::memory_order_relaxed); }

void count_call() { g_calls.fetch_add(1, std::memory_order_relaxed); }

void read(int64_t* ns, int64_t* calls) {
  for (int i = 0; i < kNumPhases; ++i) ns[i] = g_ns[i].load(std::memory_order_relaxed);
  *calls = g_calls.load(std::memory_order_relaxed);
}

}  // namespace layer_profile
}  // namespace cpu
}  // namespace decodekit
