// The task loop the CPU kernels share (causal_attention.cc, bf16_matmul.cc, f32_matmul.cc):
// fn(task, scratch) for every task in [0, tasks), on the calling thread and on XLA's intra-op
// thread pool, one Scratch per participating thread. The caller waits only for tasks that
// were claimed: a pool thread that starts after the work is gone returns at once, so a
// busy pool never holds the call up. Helpers are capped by the CPUs this process may run on.
// build_library (warm_jax/cpu_attention.py) hashes this header into every kernel's cache key.
#pragma once

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace warm_jax {

struct Progress {
  std::atomic<int64_t> next{0}, done{0};
};

template <typename Scratch, typename F>
void parallel_tasks(xla::ffi::ThreadPool& pool, int64_t tasks, F&& fn) {
  cpu_set_t set;
  int64_t ncpu = 1;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) ncpu = std::max(1, CPU_COUNT(&set));
  const int64_t helpers = std::min<int64_t>({ncpu, tasks, pool.num_threads() + 1}) - 1;
  auto progress = std::make_shared<Progress>();
  auto work = [tasks, &fn](Progress& pr) {
    Scratch scratch;
    for (int64_t t; (t = pr.next.fetch_add(1)) < tasks;) {
      fn(t, scratch);
      pr.done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 0; t < helpers; ++t)
    pool.Schedule([progress, tasks, work] {
      if (progress->next.load() < tasks) work(*progress);
    });
  work(*progress);
  while (progress->done.load(std::memory_order_acquire) < tasks) std::this_thread::yield();
}

}  // namespace warm_jax
