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

namespace mapa {

class TopK {
public:
    using Entry = std::pair<double, std::int64_t>;

    explicit TopK(std::int64_t k) : k_(static_cast<std::size_t>(k)) { buf_.reserve(2 * k_ + 16); }

    void reset() {
        buf_.clear();
        thr_ = -std::numeric_limits<double>::infinity();
    }

    // Offer the columns of one tile whose first global index is `base`.
    // Blocks of 16 columns whose maximum is below the threshold are skipped
    // after one comparison.
    void offer(const double* v, std::int64_t len, std::int64_t base) {
        constexpr std::int64_t kBlock = 16;
        constexpr double kNegInf = -std::numeric_limits<double>::infinity();
        for (std::int64_t j0 = 0; j0 < len; j0 += kBlock) {
            const std::int64_t j1 = std::min(len, j0 + kBlock);
            double m = kNegInf;
            for (std::int64_t j = j0; j < j1; ++j) m = v[j] > m ? v[j] : m;
            if (m < thr_ || m == kNegInf) continue;
            for (std::int64_t j = j0; j < j1; ++j) {
                if (v[j] < thr_ || v[j] == kNegInf) continue;
                buf_.emplace_back(v[j], base + j);
                if (buf_.size() >= 2 * k_) shrink();
            }
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
