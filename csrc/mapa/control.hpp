// Cooperative cancellation, progress and exception capture for parallel loops.
//
// The kernel knows nothing of Python: the bindings pass a `poll` callback that
// the calling thread (OpenMP thread 0) invokes every ~100 ms with the work
// done so far; returning false stops every thread at its next block. Any C++
// exception thrown inside a parallel region is captured here and rethrown by
// the caller after the region, never allowed to escape it.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>

namespace mapa {

using PollFn = std::function<bool(std::int64_t done, std::int64_t total)>;

class Control {
public:
    explicit Control(const PollFn* poll = nullptr) : poll_(poll) {}

    void set_total(std::int64_t total) { total_ = total; }
    std::int64_t total() const { return total_; }

    bool stopped() const { return stop_.load(std::memory_order_relaxed); }

    // Called by every thread after each unit of work; only the calling
    // thread (thread 0) talks to the poll callback.
    void advance(std::int64_t units, bool is_master) {
        done_.fetch_add(units, std::memory_order_relaxed);
        if (!is_master || poll_ == nullptr || !*poll_) return;
        const auto now = std::chrono::steady_clock::now();
        if (now - last_ < std::chrono::milliseconds(100)) return;
        last_ = now;
        poll_now();
    }

    void poll_now() {
        if (poll_ == nullptr || !*poll_ || stopped()) return;
        bool keep_going = true;
        try {
            keep_going = (*poll_)(done_.load(), total_);
        } catch (...) {
            capture(std::current_exception());
            return;
        }
        if (!keep_going) stop_.store(true);
    }

    void capture(std::exception_ptr e) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) error_ = e;
        stop_.store(true);
    }

    // Rethrow a captured exception (after the parallel region).
    void rethrow() {
        if (error_) std::rethrow_exception(error_);
    }

    bool cancelled_without_error() const { return stopped() && !error_; }

private:
    const PollFn* poll_;
    std::atomic<bool> stop_{false};
    std::atomic<std::int64_t> done_{0};
    std::int64_t total_ = 0;
    std::chrono::steady_clock::time_point last_ = std::chrono::steady_clock::now();
    std::mutex mutex_;
    std::exception_ptr error_;
};

// Thrown after a region when the poll callback asked to stop without an error
// of its own (the bindings turn it into the pending Python exception).
struct Cancelled : std::exception {
    const char* what() const noexcept override { return "mapa kernel call cancelled"; }
};

}  // namespace mapa
