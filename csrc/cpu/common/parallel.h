// The one parallel loop of the CPU kernels: n independent items (rows, tiles,
// tasks) over the threads of decodekit's pool (thread_pool.h), each thread
// running with IEEE denormals (fpenv.h). Items are independent, so which thread
// takes an item never changes its bits; the thread count only changes speed.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu/common/fpenv.h"
#include "cpu/common/thread_pool.h"

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

// kStatic: items of equal cost, claimed in guided chunks: each claim takes 1 / (2 nt) of
// the items left, so each thread runs a few long contiguous stretches (few claims on the
// shared counter, and the weight prefetch of the linear layers stays in one stream).
// kDynamic: one item at a time. Either way the calling thread starts at once
// and claims items from a shared counter with the workers; a worker that is
// asleep or not scheduled joins when it wakes instead of making the call wait
// for a share, and the caller waits only for items already claimed and running.
enum class Schedule { kStatic, kDynamic };

struct NoThreadExit {
  void operator()() const {}
};

// f(i) for i in [0, n) on up to nt threads (the caller included); on_exit()
// once on each thread that ran items, after its items (e.g. to trim per-thread
// scratch). A call from inside an item, or while another thread's region
// runs, runs serially on the calling thread.
template <typename F, typename Exit = NoThreadExit>
void parallel_rows(int64_t n, int nt, Schedule schedule, F&& f, Exit&& on_exit = Exit{}) {
  nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nt, n)));
  struct Ctx {
    std::remove_reference_t<F>* f;
    std::remove_reference_t<Exit>* on_exit;
  } ctx{&f, &on_exit};
  pool::Job job;
  job.run = [](void* c, int64_t begin, int64_t end) {
    auto& fn = *static_cast<Ctx*>(c)->f;
    for (int64_t i = begin; i < end; ++i) fn(i);
  };
  if constexpr (std::is_same_v<std::decay_t<Exit>, NoThreadExit>) {
    job.on_exit = nullptr;
  } else {
    job.on_exit = [](void* c) { (*static_cast<Ctx*>(c)->on_exit)(); };
  }
  job.ctx = &ctx;
  if (n <= 0) {  // as before: no item, on_exit once on the caller
    const IeeeDenormals ieee;
    on_exit();
    return;
  }
  // At most 2^22 - 1 chunks (thread_pool.cpp packs the counter).
  const int64_t min_chunk = n / ((int64_t{1} << 22) - 1) + 1;
  // kStatic: guided claims of single items (pool::run takes 1 / (2 nt) of what is left per
  // claim); kDynamic: one item per claim.
  pool::run(job, n, nt, min_chunk, schedule == Schedule::kStatic);
}

}  // namespace cpu
}  // namespace decodekit
