// A small persistent thread pool for the CPU kernels.
//
// Why not OpenMP: torch wheels ship their own OpenMP runtime, and two runtimes in one process oversubscribe
// the cores or deadlock after fork. This pool is k2's own, sized by K2_NUM_THREADS (default: all cores), runs
// nested calls inline, and is rebuilt in a forked child (DataLoader workers, multiprocessing).
#pragma once

#include <cstdint>
#include <functional>

namespace k2 {

// Calls fn(begin, end) over disjoint chunks covering [0, n), each at least `grain` long except the last, on the
// pool's threads and the caller's. Returns when all chunks are done; rethrows the first exception thrown.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

// The grain that runs a job of n items and about `work` multiply-adds in total inline on the caller's thread when it is
// too small to pay for waking the pool (microseconds on an idle machine, up to a scheduler time slice on a loaded
// one: a decode step of a small model is a few dozen such jobs), and one item per chunk otherwise.
constexpr int64_t kMinParallelWork = int64_t(1) << 20;  // multiply-adds
inline int64_t grain_for_work(int64_t n, int64_t work) {
    return work < kMinParallelWork && n > 1 ? n : 1;
}

int num_threads();            // threads parallel_for uses, the caller included
void set_num_threads(int n);  // n >= 1; rebuilds the pool

}  // namespace k2
