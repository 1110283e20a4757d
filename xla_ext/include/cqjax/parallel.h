// Splitting a kernel call's work over XLA's intra-op thread pool.
#ifndef CQJAX_PARALLEL_H_
#define CQJAX_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <memory>
#include <thread>
#include <utility>

#include "cqjax/ffi_handlers.h"
#include "xla/ffi/api/ffi.h"

namespace cqjax {

// Runs fn(i) for i in [0, ntasks) on the caller plus up to nthreads-1 pool
// tasks. The pool does not wake sleeping workers on Schedule, so the caller
// never waits for a task to start: it claims work from the same atomic
// counter and only waits for chunks that a helper has already claimed.
template <typename F>
void ParallelFor(xla::ffi::ThreadPool* pool, int nthreads, int ntasks, const F& fn) {
  if (!pool || nthreads <= 1 || ntasks <= 1) {
    for (int i = 0; i < ntasks; ++i) fn(i);
    return;
  }
  struct State {
    std::atomic<int> next{0};
    std::atomic<int> done{0};
  };
  auto st = std::make_shared<State>();
  const F* f = &fn;
  auto work = [st, ntasks, f]() {
    int i;
    while ((i = st->next.fetch_add(1, std::memory_order_relaxed)) < ntasks) {
      (*f)(i);  // only reached while the caller waits below, so fn is alive
      st->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int helpers = std::min(nthreads, ntasks) - 1;
  for (int t = 0; t < helpers; ++t) {
    auto task = work;
    pool->Schedule(std::move(task));
  }
  work();
  while (st->done.load(std::memory_order_acquire) < ntasks) std::this_thread::yield();
}

// The threads a kernel call may use: the pool's, capped by cq::MaxThreads().
inline int PoolThreads(xla::ffi::ThreadPool& pool) {
  const int n = std::max(static_cast<int>(pool.num_threads()), 1);
  const int cap = cq::MaxThreads();
  return cap > 0 ? std::min(n, cap) : n;
}

}  // namespace cqjax

#endif  // CQJAX_PARALLEL_H_
