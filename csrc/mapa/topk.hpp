// Bounded selection of the k largest logits of one row.
//
// Candidates at or above the current threshold are appended to a buffer;
// when it holds 2k entries, nth_element keeps the best k and raises the
// threshold to the k-th value. Each candidate costs an append plus O(1)
// amortised selection work, far less than a heap update. "Better" means a
// larger value, or an equal value with a smaller index, so the result does
// not depend on the tile order or thread count.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "tiles.hpp"

namespace mapa {

class TopK {
public:
    using Entry = std::pair<double, std::int64_t>;

    explicit TopK(std::int64_t k) : k_(static_cast<std::size_t>(k)) { buf_.reserve(2 * k_ + 16); }

    void reset() {
        buf_.clear();
        thr_ = -std::numeric_limits<double>::infinity();
    }

    // Start from a known lower bound on the k-th best value (nothing below it
    // can be among the best k), so far fewer early candidates are buffered.
    void seed(double lower_bound) { thr_ = lower_bound; }

    // The k-th best value offered so far, or -inf if fewer than k were offered.
    double kth_value() {
        if (buf_.size() < k_) return -std::numeric_limits<double>::infinity();
        if (buf_.size() > k_) shrink();
        return thr_;
    }

    // Offer each value once, without indices (used for bounds).
    void offer_values(const double* v, std::int64_t len) { offer(v, len, 0); }

    // Offer the columns of one tile whose first global index is `base`; a
    // vectorised scan skips to the next column at or above the threshold.
    void offer(const double* v, std::int64_t len, std::int64_t base) {
        constexpr double kNegInf = -std::numeric_limits<double>::infinity();
        for (std::int64_t j = next_at_least(v, 0, len, thr_); j < len;
             j = next_at_least(v, j + 1, len, thr_)) {
            if (v[j] == kNegInf) continue;  // excluded self term
            buf_.emplace_back(v[j], base + j);
            if (buf_.size() >= 2 * k_) shrink();
        }
    }

    // The best k entries, from best to worst.
    const std::vector<Entry>& sorted() {
        if (buf_.size() > k_) shrink();
        std::sort(buf_.begin(), buf_.end(), Better{});
        return buf_;
    }

private:
    struct Better {
        bool operator()(const Entry& a, const Entry& b) const {
            return a.first > b.first || (a.first == b.first && a.second < b.second);
        }
    };

    void shrink() {
        std::nth_element(buf_.begin(), buf_.begin() + static_cast<std::ptrdiff_t>(k_ - 1), buf_.end(),
                         Better{});
        buf_.resize(k_);
        thr_ = buf_[k_ - 1].first;  // entries below the k-th best can never enter
    }

    std::size_t k_;
    std::vector<Entry> buf_;
    double thr_ = -std::numeric_limits<double>::infinity();
};

}  // namespace mapa
