// Work sharing for the CPU kernels: items handed out a chunk at a time from a shared counter.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace tierserve_par {

// [0, n) in chunks of `chunk` items, each thread of torch's pool taking the next chunk as it finishes one, where
// at::parallel_for hands each thread one fixed share up front. Shares of unequal cost (sequences of different
// lengths; a GEMM's row blocks when the rows do not split evenly: 2048 rows in 224-row blocks gave one thread 1120
// and the other 928) and threads of unequal speed (these machines are shared: a vCPU slowed by another tenant) then
// finish together instead of the call waiting for the slowest share.
//
// thread_body(each) runs once per thread (per-thread setup and teardown around the loop: AMX tile configuration,
// scratch buffers) and calls each(f) to run f(begin, end) on every chunk it gets.
template <typename Body>
inline void dynamic_for(int64_t n, int64_t chunk, Body&& thread_body) {
  if (n <= 0) return;
  chunk = std::max<int64_t>(1, chunk);
  const int64_t chunks = (n + chunk - 1) / chunk;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), chunks);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    thread_body([&](auto&& f) {
      for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < chunks;
           c = next.fetch_add(1, std::memory_order_relaxed)) {
        f(c * chunk, std::min(n, (c + 1) * chunk));
      }
    });
  });
}

}  // namespace tierserve_par
