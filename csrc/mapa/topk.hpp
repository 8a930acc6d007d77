// Bounded selection of the k largest logits of one row.
//
// A heap of at most k (value, index) entries whose top is the worst kept
// entry; "better" means a larger value, or an equal value with a smaller
// index, so the result does not depend on the tile order or thread count.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

namespace mapa {

class TopK {
public:
    using Entry = std::pair<double, std::int64_t>;

    explicit TopK(std::int64_t k) : k_(k) { heap_.reserve(static_cast<std::size_t>(k)); }

    void reset() { heap_.clear(); }

    // Values strictly below this cannot enter (once the heap is full).
    double threshold() const {
        return full() ? heap_.front().first : -std::numeric_limits<double>::infinity();
    }

    // Offer the columns of one tile whose first global index is `base`.
    void offer(const double* v, std::int64_t len, std::int64_t base) {
        double thr = threshold();
        for (std::int64_t j = 0; j < len; ++j) {
            const double x = v[j];
            if (x < thr || x == -std::numeric_limits<double>::infinity()) continue;
            const Entry e{x, base + j};
            if (!full()) {
                heap_.push_back(e);
                std::push_heap(heap_.begin(), heap_.end(), better);
                if (full()) thr = threshold();
            } else if (better(e, heap_.front())) {
                std::pop_heap(heap_.begin(), heap_.end(), better);
                heap_.back() = e;
                std::push_heap(heap_.begin(), heap_.end(), better);
                thr = threshold();
            }
        }
    }

    // Entries from best to worst.
    const std::vector<Entry>& sorted() {
        std::sort(heap_.begin(), heap_.end(), better);
        return heap_;
    }

private:
    static bool better(const Entry& a, const Entry& b) {
        return a.first > b.first || (a.first == b.first && a.second < b.second);
    }
    bool full() const { return static_cast<std::int64_t>(heap_.size()) >= k_; }

    std::int64_t k_;
    std::vector<Entry> heap_;
};

}  // namespace mapa
