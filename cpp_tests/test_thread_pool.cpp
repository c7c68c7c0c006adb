// The thread pool's contract: every index visited exactly once, exceptions propagate, nesting runs inline.
#include <gtest/gtest.h>

#include <atomic>
#include <stdexcept>
#include <vector>

#include "common/thread_pool.h"

TEST(ThreadPool, VisitsEveryIndexOnce) {
    for (int64_t n : {0, 1, 7, 1000, 100003}) {
        std::vector<std::atomic<int>> hits(n);
        k2::parallel_for(n, 16, [&](int64_t b, int64_t e) {
            for (int64_t i = b; i < e; ++i) hits[i]++;
        });
        for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << "n=" << n << " i=" << i;
    }
}

TEST(ThreadPool, PropagatesExceptions) {
    EXPECT_THROW(k2::parallel_for(1000, 1,
                                  [](int64_t b, int64_t) {
                                      if (b >= 500) throw std::runtime_error("boom");
                                  }),
                 std::runtime_error);
    // The pool stays usable afterwards.
    std::atomic<int64_t> sum{0};
    k2::parallel_for(100, 1, [&](int64_t b, int64_t e) { sum += e - b; });
    EXPECT_EQ(sum.load(), 100);
}

TEST(ThreadPool, NestedCallsRunInline) {
    std::atomic<int64_t> sum{0};
    k2::parallel_for(64, 1, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) k2::parallel_for(10, 1, [&](int64_t b2, int64_t e2) { sum += e2 - b2; });
    });
    EXPECT_EQ(sum.load(), 640);
}

TEST(ThreadPool, ResizeKeepsWorking) {
    k2::set_num_threads(3);
    EXPECT_EQ(k2::num_threads(), 3);
    std::atomic<int64_t> sum{0};
    k2::parallel_for(1000, 10, [&](int64_t b, int64_t e) { sum += e - b; });
    EXPECT_EQ(sum.load(), 1000);
}
