// The persistent thread pool behind parallel_rows (see thread_pool.h).
// Compiled once, not per instruction set.
//
// Protocol. One 64-bit atomic `state` packs (generation, next chunk, chunk
// count). A region's caller writes the job, resets `done`, stores a new state
// (generation + 1, next 0, count) and bumps `wake_seq`, the word the workers
// wait on. Every participant, the caller included, claims a chunk with a
// compare-and-swap that succeeds only while the generation is the one it read
// and chunks are left; a participant that claims nothing touches nothing else.
// A worker adds the number of chunks it ran to `done` after its last chunk and
// its on_exit; the caller, once no chunk is left to claim, waits until `done`
// holds every chunk it did not run itself. So the caller never waits for a
// worker that has claimed nothing (one the OS has not scheduled), and the job
// (on the caller's stack) is not reused while a worker still holds a claim.
#include "cpu/common/thread_pool.h"

#include <pthread.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <exception>
#include <mutex>
#include <thread>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "cpu/common/fpenv.h"

namespace decodekit {
namespace cpu {
namespace pool {
namespace {

constexpr int kCountBits = 22;  // chunk index and chunk count: < 2^22 chunks (parallel.h sizes chunks so)
constexpr uint64_t kCountMask = (uint64_t{1} << kCountBits) - 1;
constexpr uint64_t kGenMask = (uint64_t{1} << (64 - 2 * kCountBits)) - 1;
constexpr int kMaxWorkers = 255;
// How long a worker spins for the next region before it sleeps, and how long
// a caller spins for claimed chunks still running before it sleeps.
constexpr std::chrono::microseconds kWorkerSpin{20};
constexpr std::chrono::microseconds kCallerSpin{20};

inline uint64_t pack(uint64_t gen, uint64_t next, uint64_t count) {
  return (gen << (2 * kCountBits)) | (next << kCountBits) | count;
}
inline uint64_t gen_of(uint64_t s) { return s >> (2 * kCountBits); }
inline uint64_t next_of(uint64_t s) { return (s >> kCountBits) & kCountMask; }
inline uint64_t count_of(uint64_t s) { return s & kCountMask; }

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// Sleeps while *word == expected (returns at once if it differs; spurious
// returns are allowed). Off Linux a short sleep stands in for the futex.
inline void wait_word(std::atomic<uint32_t>* word, uint32_t expected) {
#if defined(__linux__)
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT_PRIVATE, expected, nullptr, nullptr, 0);
#else
  if (word->load(std::memory_order_acquire) == expected) std::this_thread::sleep_for(std::chrono::microseconds(50));
#endif
}
inline void wake_word(std::atomic<uint32_t>* word, int n) {
#if defined(__linux__)
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE_PRIVATE, n, nullptr, nullptr, 0);
#else
  (void)word;
  (void)n;
#endif
}

// Spins up to `spin` while *word == seen; true if it changed.
inline bool spin_while_equal(const std::atomic<uint32_t>& word, uint32_t seen, std::chrono::microseconds spin) {
  const auto until = std::chrono::steady_clock::now() + spin;
  for (;;) {
    for (int k = 0; k < 64; ++k) {
      if (word.load(std::memory_order_acquire) != seen) return true;
      cpu_relax();
    }
    if (std::chrono::steady_clock::now() >= until) return false;
  }
}

thread_local bool t_in_region = false;

struct Pool {
  std::mutex submit;  // one region at a time; a second caller runs serially
  alignas(64) std::atomic<uint64_t> state{0};
  alignas(64) std::atomic<uint32_t> wake_seq{0};
  std::atomic<int> sleepers{0};
  std::atomic<int> wanted{0};  // workers 0 .. wanted-1 take part in the current region
  alignas(64) std::atomic<uint32_t> done{0};
  std::atomic<int> caller_waiting{0};
  // The current job: written by the caller before it publishes the state,
  // read by a worker only after it claimed a chunk of that state's generation.
  Job job{};
  int64_t n = 0;
  int64_t chunk = 1;
  bool guided = false;
  uint64_t guided_divisor = 2;
  std::mutex error_mutex;
  std::exception_ptr error;
  std::atomic<int> size{0};  // workers started (grown under `submit`)
};

// Claims and runs chunks of generation `gen` until none is left; returns how
// many it ran. Runs on_exit after the last one if it ran any.
int64_t participate(Pool& p, uint64_t gen) {
  int64_t ran = 0;
  const IeeeDenormals ieee;
  uint64_t s = p.state.load(std::memory_order_acquire);
  for (;;) {
    if (gen_of(s) != gen || next_of(s) >= count_of(s)) break;
    // Guided: a claim takes 1 / (2 nt) of the chunks left (at least one), so a region of
    // equal items costs a few claims per thread and every thread reads one long stretch
    // at a time, while a thread that arrives late still finds work and one that never
    // arrives leaves the caller nothing to wait for.
    const uint64_t take = p.guided ? std::max<uint64_t>(1, (count_of(s) - next_of(s)) / p.guided_divisor) : uint64_t{1};
    if (!p.state.compare_exchange_weak(s, s + (take << kCountBits), std::memory_order_acq_rel,
                                       std::memory_order_acquire))
      continue;
    const int64_t begin = static_cast<int64_t>(next_of(s)) * p.chunk;
    const int64_t end = std::min(p.n, begin + static_cast<int64_t>(take) * p.chunk);
    try {
      p.job.run(p.job.ctx, begin, end);
    } catch (...) {
      std::lock_guard<std::mutex> g(p.error_mutex);
      if (!p.error) p.error = std::current_exception();
    }
    ran += static_cast<int64_t>(take);
    s = p.state.load(std::memory_order_acquire);
  }
  if (ran > 0 && p.job.on_exit != nullptr) {
    try {
      p.job.on_exit(p.job.ctx);
    } catch (...) {
      std::lock_guard<std::mutex> g(p.error_mutex);
      if (!p.error) p.error = std::current_exception();
    }
  }
  return ran;
}

void worker_main(Pool* pp, int index, uint32_t seen) {
  Pool& p = *pp;
  t_in_region = true;  // an item that calls parallel_rows runs it serially
  for (;;) {
    if (!spin_while_equal(p.wake_seq, seen, kWorkerSpin)) {
      p.sleepers.fetch_add(1, std::memory_order_seq_cst);
      while (p.wake_seq.load(std::memory_order_seq_cst) == seen) wait_word(&p.wake_seq, seen);
      p.sleepers.fetch_sub(1, std::memory_order_relaxed);
    }
    seen = p.wake_seq.load(std::memory_order_acquire);
    if (index >= p.wanted.load(std::memory_order_relaxed)) continue;
    const uint64_t gen = gen_of(p.state.load(std::memory_order_acquire));
    const int64_t ran = participate(p, gen);
    if (ran > 0) {
      p.done.fetch_add(static_cast<uint32_t>(ran), std::memory_order_seq_cst);
      if (p.caller_waiting.load(std::memory_order_seq_cst) != 0) wake_word(&p.done, 1);
    }
  }
}

// Starts workers until there are `want` (fewer if the system refuses a
// thread). Called under p.submit, before the region is published.
void grow(Pool& p, int want) {
  want = std::min(want, kMaxWorkers);
  int size = p.size.load(std::memory_order_relaxed);
  if (size >= want) return;
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);  // workers inherit a mask blocking every signal
  const uint32_t seen = p.wake_seq.load(std::memory_order_acquire);
  for (; size < want; ++size) {
    try {
      std::thread(worker_main, &p, size, seen).detach();
    } catch (...) {
      break;
    }
  }
  p.size.store(size, std::memory_order_relaxed);
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
}

// The process's pool, created on first use and never destroyed (its workers
// are detached and sleep in the kernel at exit). After fork() the child drops
// it (its workers do not exist in the child) and creates a fresh one.
std::atomic<Pool*> g_pool{nullptr};
std::mutex g_create;

void atfork_prepare() { g_create.lock(); }
void atfork_parent() { g_create.unlock(); }
void atfork_child() {
  g_pool.store(nullptr, std::memory_order_relaxed);  // the parent's pool is left as it was (leaked)
  t_in_region = false;
  g_create.unlock();
}

Pool& get_pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p != nullptr) return *p;
  static std::once_flag atfork_once;
  std::call_once(atfork_once, [] { pthread_atfork(atfork_prepare, atfork_parent, atfork_child); });
  std::lock_guard<std::mutex> g(g_create);
  p = g_pool.load(std::memory_order_acquire);
  if (p == nullptr) {
    p = new Pool();
    g_pool.store(p, std::memory_order_release);
  }
  return *p;
}

void run_serial(const Job& job, int64_t n) {
  const IeeeDenormals ieee;
  job.run(job.ctx, 0, n);
  if (job.on_exit != nullptr) job.on_exit(job.ctx);
}

struct RegionFlag {
  RegionFlag() { t_in_region = true; }
  ~RegionFlag() { t_in_region = false; }
};

}  // namespace

bool in_parallel_region() { return t_in_region; }

int pool_size() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  return p == nullptr ? 0 : p->size.load(std::memory_order_relaxed);
}

void run(const Job& job, int64_t n, int num_threads, int64_t chunk, bool guided) {
  if (n <= 0) return;
  chunk = std::max<int64_t>(1, chunk);
  const int64_t nchunks = (n + chunk - 1) / chunk;
  if (num_threads <= 1 || nchunks <= 1 || t_in_region || nchunks > static_cast<int64_t>(kCountMask)) {
    run_serial(job, n);
    return;
  }
  Pool& p = get_pool();
  std::unique_lock<std::mutex> lock(p.submit, std::try_to_lock);
  if (!lock.owns_lock()) {  // another thread's region is running: do not wait for it
    run_serial(job, n);
    return;
  }
  const RegionFlag region;
  const int workers = static_cast<int>(std::min<int64_t>(num_threads, nchunks)) - 1;
  grow(p, workers);
  p.job = job;
  p.n = n;
  p.chunk = chunk;
  p.guided = guided;
  p.guided_divisor = static_cast<uint64_t>(2 * (workers + 1));
  p.error = nullptr;
  p.done.store(0, std::memory_order_relaxed);
  p.wanted.store(workers, std::memory_order_relaxed);
  const uint64_t gen = (gen_of(p.state.load(std::memory_order_relaxed)) + 1) & kGenMask;
  p.state.store(pack(gen, 0, static_cast<uint64_t>(nchunks)), std::memory_order_release);
  p.wake_seq.fetch_add(1, std::memory_order_seq_cst);
  if (p.sleepers.load(std::memory_order_seq_cst) > 0) wake_word(&p.wake_seq, INT_MAX);

  const int64_t mine = participate(p, gen);
  // Every chunk is claimed; wait for the ones workers claimed (running now).
  const uint32_t target = static_cast<uint32_t>(nchunks - mine);
  if (p.done.load(std::memory_order_acquire) != target) {
    const auto until = std::chrono::steady_clock::now() + kCallerSpin;
    while (p.done.load(std::memory_order_acquire) != target && std::chrono::steady_clock::now() < until) {
      for (int k = 0; k < 64; ++k) cpu_relax();
    }
    if (p.done.load(std::memory_order_acquire) != target) {
      p.caller_waiting.store(1, std::memory_order_seq_cst);
      for (uint32_t v; (v = p.done.load(std::memory_order_seq_cst)) != target;) wait_word(&p.done, v);
      p.caller_waiting.store(0, std::memory_order_relaxed);
    }
  }
  if (p.error) {
    std::exception_ptr e = p.error;
    p.error = nullptr;
    std::rethrow_exception(e);
  }
}

}  // namespace pool
}  // namespace cpu
}  // namespace decodekit
