// The persistent thread pool behind parallel_rows (parallel.h).
//
// One parallel region at a time runs n items in `num_chunks` chunks. The
// calling thread publishes the job, wakes the pool and then claims chunks from
// a shared atomic counter like any worker; workers that wake join in and claim
// chunks too. When every chunk is claimed, the caller waits only for chunks
// already claimed and still running. A worker the OS has not scheduled has
// claimed nothing, so it never delays the call: the caller runs its share.
//
// Workers wait passively: a brief spin (about 20 microseconds) for the next
// region, then a futex (Linux) or a condition variable. Nested calls (from
// inside an item), calls while another thread's region runs, and one-thread
// calls run serially on the calling thread. After fork() the child starts a
// fresh pool (the parent's workers do not exist there).
//
// This file and thread_pool.cpp are compiled once (not per instruction set):
// the job is type-erased (function pointers), so the per-ISA kernel objects
// share no symbol with it but these declarations.
#pragma once

#include <cstdint>

namespace decodekit {
namespace cpu {
namespace pool {

// A type-erased parallel region: run(ctx, begin, end) runs items [begin, end);
// on_exit(ctx), when not null, runs once on each thread that ran at least one
// item, after its last item (while the caller still waits).
struct Job {
  void (*run)(void* ctx, int64_t begin, int64_t end);
  void (*on_exit)(void* ctx);
  void* ctx;
};

// Runs items [0, n) on up to num_threads threads (the caller included), in
// chunks of `chunk` items (>= 1): one chunk per claim, or with `guided` as
// many chunks per claim as 1 / (2 * threads) of the chunks left (at least
// one). Every thread that runs items does so with IEEE denormals (fpenv.h).
// Returns after every item and every on_exit ran.
void run(const Job& job, int64_t n, int num_threads, int64_t chunk, bool guided = false);

// True on a pool worker, and on a caller inside its own region: a call from
// there runs serially.
bool in_parallel_region();

// Workers started so far (for tests and diagnostics).
int pool_size();

}  // namespace pool
}  // namespace cpu
}  // namespace decodekit
