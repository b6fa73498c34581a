// The thread count of the CPU kernels: one function, num_threads(), that every
// binding passes to the kernels. It is decodekit's own setting
// (decodekit.set_num_threads, or the DECODEKIT_NUM_THREADS environment variable
// read by python/decodekit/_threads.py) when one is set, else torch's
// at::get_num_threads(). The kernels run on decodekit's pool
// (cpu/common/thread_pool.h); torch's setting only supplies the default.
#pragma once

#include <ATen/Parallel.h>

#include <atomic>

namespace decodekit {
namespace torch_ops {

// 0: follow at::get_num_threads(); n >= 1: n threads.
inline std::atomic<int> g_num_threads_setting{0};

inline void set_num_threads_setting(int n) { g_num_threads_setting.store(n < 0 ? 0 : n, std::memory_order_relaxed); }
inline int num_threads_setting() { return g_num_threads_setting.load(std::memory_order_relaxed); }

// The threads a CPU kernel call may use (>= 1).
inline int num_threads() {
  const int n = g_num_threads_setting.load(std::memory_order_relaxed);
  if (n > 0) return n;
  const int t = at::get_num_threads();
  return t > 0 ? t : 1;
}

}  // namespace torch_ops
}  // namespace decodekit
