#include "common/thread_pool.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace k2 {

namespace {

thread_local bool tls_in_parallel_region = false;

class ThreadPool {
  public:
    explicit ThreadPool(int threads) : num_threads_(std::max(1, threads)) {
        for (int i = 1; i < num_threads_; ++i) workers_.emplace_back([this] { work_loop(); });
    }

    ~ThreadPool() {
        {
            std::lock_guard<std::mutex> lock(mu_);
            stop_ = true;
        }
        wake_.notify_all();
        for (auto& t : workers_) t.join();
    }

    int size() const { return num_threads_; }

    void run(int64_t n, int64_t chunk, const std::function<void(int64_t, int64_t)>& fn) {
        std::lock_guard<std::mutex> one_job(run_mu_);
        {
            std::lock_guard<std::mutex> lock(mu_);
            fn_ = &fn;
            n_ = n;
            chunk_ = chunk;
            next_.store(0);
            error_ = nullptr;
            busy_workers_ = static_cast<int>(workers_.size());
            ++generation_;
        }
        wake_.notify_all();
        run_chunks();
        std::unique_lock<std::mutex> lock(mu_);
        done_.wait(lock, [this] { return busy_workers_ == 0; });
        fn_ = nullptr;
        if (error_) std::rethrow_exception(error_);
    }

  private:
    void run_chunks() {
        tls_in_parallel_region = true;
        for (;;) {
            int64_t begin = next_.fetch_add(chunk_);
            if (begin >= n_) break;
            try {
                (*fn_)(begin, std::min(n_, begin + chunk_));
            } catch (...) {
                std::lock_guard<std::mutex> lock(mu_);
                if (!error_) error_ = std::current_exception();
                next_.store(n_);
            }
        }
        tls_in_parallel_region = false;
    }

    void work_loop() {
        uint64_t seen = 0;
        for (;;) {
            {
                std::unique_lock<std::mutex> lock(mu_);
                wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
                if (stop_) return;
                seen = generation_;
            }
            run_chunks();
            std::lock_guard<std::mutex> lock(mu_);
            if (--busy_workers_ == 0) done_.notify_one();
        }
    }

    const int num_threads_;
    std::vector<std::thread> workers_;
    std::mutex run_mu_, mu_;
    std::condition_variable wake_, done_;
    const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
    int64_t n_ = 0, chunk_ = 1;
    std::atomic<int64_t> next_{0};
    std::exception_ptr error_;
    int busy_workers_ = 0;
    uint64_t generation_ = 0;
    bool stop_ = false;
};

std::mutex g_pool_mu;
ThreadPool* g_pool = nullptr;  // NOTE: leaked on purpose; a forked child drops it (its threads do not exist)
int g_requested_threads = 0;

int default_threads() {
    if (const char* env = std::getenv("K2_NUM_THREADS")) {
        int n = std::atoi(env);
        if (n > 0) return n;
    }
    return std::max(1u, std::thread::hardware_concurrency());
}

// fork() keeps only the calling thread: hold the pool lock across it, and let the child start a fresh pool.
void lock_before_fork() {
    g_pool_mu.lock();
}
void unlock_in_parent() {
    g_pool_mu.unlock();
}
void forget_pool_in_child() {
    g_pool = nullptr;
    g_pool_mu.unlock();
}

ThreadPool& pool() {
    static const bool registered = [] {
        return pthread_atfork(lock_before_fork, unlock_in_parent, forget_pool_in_child) == 0;
    }();
    (void)registered;
    std::lock_guard<std::mutex> lock(g_pool_mu);
    if (!g_pool) g_pool = new ThreadPool(g_requested_threads > 0 ? g_requested_threads : default_threads());
    return *g_pool;
}

}  // namespace

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
    if (n <= 0) return;
    grain = std::max<int64_t>(1, grain);
    if (tls_in_parallel_region || n <= grain) {
        fn(0, n);
        return;
    }
    ThreadPool& p = pool();
    if (p.size() == 1) {
        fn(0, n);
        return;
    }
    // About 4 chunks per thread balances uneven chunks without much scheduling overhead.
    int64_t chunk = std::max(grain, (n + 4 * p.size() - 1) / (4 * p.size()));
    p.run(n, chunk, fn);
}

int num_threads() {
    return pool().size();
}

void set_num_threads(int n) {
    std::lock_guard<std::mutex> lock(g_pool_mu);
    g_requested_threads = std::max(1, n);
    delete g_pool;
    g_pool = nullptr;
}

}  // namespace k2
