// The one parallel loop of the CPU kernels: n independent items (rows, tiles,
// tasks) over OpenMP threads, each thread running with IEEE denormals
// (fpenv.h). Items are independent, so which thread takes an item never changes
// its bits; the thread count only changes speed.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "cpu/common/fpenv.h"

namespace decodekit {
namespace cpu {

// Threads for `items` independent items with `work` units in all: at most
// num_threads and items, and at least min_work_per_thread units per thread
// (waking a thread costs more than a little work). At least 1.
inline int threads_for(int64_t items, int num_threads, int64_t work = 0, int64_t min_work_per_thread = 0) {
  int64_t nt = std::min<int64_t>(num_threads, items);
  if (min_work_per_thread > 0) nt = std::min<int64_t>(nt, work / min_work_per_thread);
  return static_cast<int>(std::max<int64_t>(1, nt));
}

// kStatic: equal contiguous shares (items of equal cost). kDynamic: one item
// at a time, so the calling thread starts at once and a worker that was asleep
// joins when it wakes instead of making the call wait for its share.
enum class Schedule { kStatic, kDynamic };

struct NoThreadExit {
  void operator()() const {}
};

// f(i) for i in [0, n) on nt threads; on_exit() once per thread after its items
// (e.g. to trim per-thread scratch).
template <typename F, typename Exit = NoThreadExit>
void parallel_rows(int64_t n, int nt, Schedule schedule, F&& f, Exit&& on_exit = Exit{}) {
  nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nt, n)));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const IeeeDenormals ieee;
    if (schedule == Schedule::kDynamic) {
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < n; ++i) f(i);
    } else {
#pragma omp for schedule(static)
      for (int64_t i = 0; i < n; ++i) f(i);
    }
    on_exit();
  }
}

}  // namespace cpu
}  // namespace decodekit
