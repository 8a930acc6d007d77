// Bounded selection of the k largest logits of one row.
//
// Candidates at or above the current threshold (found by a vectorised scan)
// are appended to a buffer;
// when it holds 2k entries, a branch-free quickselect finds the k-th value,
// the best k are kept and the threshold rises to that value. Each candidate
// costs an append plus O(1) amortised selection work, with no data-dependent
// branches (a heap or std::nth_element mispredicts about every other
// comparison). "Better" means a larger value, or an equal value with a
// smaller index, so the result does not depend on the tile order or thread
// count.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "tiles.hpp"

namespace mapa {

// The value at position k (0-based) of a[0, n) in descending order, for
// k < n and no NaN; a and b (room for n) are overwritten. Quickselect whose
// partitions copy between the two buffers without branches, so no load
// waits on the previous element's comparison.
inline double kth_largest(double* a, double* b, std::size_t n, std::size_t k) {
    for (;;) {
        const double x = a[0], y = a[n / 2], z = a[n - 1];
        const double p = std::max(std::min(x, y), std::min(std::max(x, y), z));  // median of three
        // b[0, g): > p, b[g, n): <= p
        std::size_t g = 0, l = n;
        for (std::size_t j = 0; j < n; ++j) {
            const double v = a[j];
            const bool above = v > p;
            b[g] = v;
            b[l - 1] = v;
            g += above;
            l -= !above;
        }
        if (k < g) {
            std::swap(a, b);
            n = g;
            continue;
        }
        // b[g, n) holds p itself at least once; keep what is below p
        std::size_t e = 0, m = 0;
        for (std::size_t j = g; j < n; ++j) {
            const double v = b[j];
            a[m] = v;
            m += v < p;
            e += v == p;
        }
        if (k < g + e) return p;
        k -= g + e;
        n = m;
    }
}

// Of the n > k entries (val, idx), keep the best k in val[0, k), idx[0, k),
// given kth, the k-th largest value: every entry above it, in place, then,
// of the entries equal to it (at least one), those with the smallest
// indices. ties needs room for n indices.
template <class Index>
void keep_best_k(double* val, Index* idx, std::size_t n, std::size_t k, double kth, std::int64_t* ties) {
    std::size_t m = 0, t = 0;
    for (std::size_t i = 0; i < n; ++i) {
        const double v = val[i];
        const Index id = idx[i];
        val[m] = v;
        idx[m] = id;
        ties[t] = id;
        m += v > kth;
        t += v == kth;
    }
    const std::size_t need = k - m;
    if (t > need) std::nth_element(ties, ties + need - 1, ties + t);
    for (std::size_t i = 0; i < need; ++i, ++m) {
        val[m] = kth;
        idx[m] = static_cast<Index>(ties[i]);
    }
}

class TopK {
public:
    using Entry = std::pair<double, std::int64_t>;

    // Keeps the best k of the values offered, in runs of at most `stride`;
    // with keep_ties, also every entry tied with the k-th best value.
    TopK(std::int64_t k, std::int64_t stride, bool keep_ties = false)
        : k_(static_cast<std::size_t>(k)), keep_ties_(keep_ties), pos_(static_cast<std::size_t>(stride)) {
        grow(2 * k_);
    }

    void reset() {
        n_ = 0;
        thr_ = -std::numeric_limits<double>::infinity();
    }

    // Start from a known lower bound on the k-th best value (nothing below it
    // can be among the best k), so far fewer early candidates are buffered.
    void seed(double lower_bound) { thr_ = lower_bound; }

    // The k-th best value offered so far, or -inf if fewer than k were offered.
    double kth_value() {
        if (n_ < k_) return -std::numeric_limits<double>::infinity();
        shrink();
        return thr_;
    }

    // Offer a run of values (len <= the stride given at construction): entry
    // j has index base + j, or ids[j] when ids is given.
    void offer(const double* v, std::int64_t len, std::int64_t base) { offer_run(v, len, base, nullptr); }
    void offer(const double* v, std::int64_t len, const std::int64_t* ids) { offer_run(v, len, 0, ids); }

    // Keep only the best entries (see the constructor); returns how many.
    std::size_t keep_best() {
        shrink();
        return n_;
    }
    std::int64_t index(std::size_t i) const { return idx_[i]; }
    double value(std::size_t i) const { return val_[i]; }

    // Nothing below this value can still enter.
    double threshold() const { return thr_; }

    // rank[i] = place of kept entry i from best to worst (room for keep_best()).
    void rank_into(std::int64_t* rank) const {
        rank_order(val_.data(), idx_.data(), static_cast<std::int64_t>(n_), rank);
    }

    // The best k entries, from best to worst.
    const std::vector<Entry>& sorted() {
        shrink();
        sorted_.resize(n_);
        rank_order(val_.data(), idx_.data(), static_cast<std::int64_t>(n_), ties_.data());
        for (std::size_t i = 0; i < n_; ++i) sorted_[static_cast<std::size_t>(ties_[i])] = {val_[i], idx_[i]};
        return sorted_;
    }

private:
    void offer_run(const double* v, std::int64_t len, std::int64_t base, const std::int64_t* ids) {
        const std::int64_t found = positions_at_least(v, len, thr_, pos_.data());
        for (std::int64_t i = 0; i < found; ++i) {
            const std::int32_t j = pos_[static_cast<std::size_t>(i)];
            const double x = v[j];
            // the threshold may have risen since the scan; -inf is an excluded self term
            if (x < thr_ || x == -std::numeric_limits<double>::infinity()) continue;
            val_[n_] = x;
            idx_[n_] = ids ? ids[j] : base + j;
            if (++n_ == k_) {
                // the first k entries at or above the threshold are the k best
                // so far: their minimum is a threshold, without a selection
                const double low = *std::min_element(val_.begin(), val_.begin() + static_cast<std::ptrdiff_t>(k_));
                thr_ = std::max(thr_, low);
            } else if (n_ == val_.size()) {
                shrink();
            }
        }
    }

    void grow(std::size_t cap) {
        val_.resize(cap);
        idx_.resize(cap);
        scratch_.resize(cap);
        scratch2_.resize(cap);
        ties_.resize(cap);
    }

    void shrink() {
        if (n_ <= k_) return;
        std::copy(val_.begin(), val_.begin() + static_cast<std::ptrdiff_t>(n_), scratch_.begin());
        const double kth = kth_largest(scratch_.data(), scratch2_.data(), n_, k_ - 1);
        thr_ = kth;  // entries below the k-th best can never enter
        if (keep_ties_) {
            // keep everything at or above the k-th value; room for as many again
            std::size_t m = 0;
            for (std::size_t i = 0; i < n_; ++i) {
                val_[m] = val_[i];
                idx_[m] = idx_[i];
                m += val_[i] >= kth;
            }
            n_ = m;
            if (2 * n_ > val_.size()) grow(2 * n_);
            return;
        }
        keep_best_k(val_.data(), idx_.data(), n_, k_, kth, ties_.data());
        n_ = k_;
    }

    std::size_t k_, n_ = 0;
    bool keep_ties_;
    std::vector<double> val_;
    std::vector<std::int64_t> idx_;
    std::vector<double> scratch_, scratch2_;
    std::vector<std::int64_t> ties_;
    std::vector<Entry> sorted_;
    std::vector<std::int32_t> pos_;  // positions found by one scan
    double thr_ = -std::numeric_limits<double>::infinity();
};

// The best k entries of every row of a problem at once, for passes that
// offer each row's entries from many places (the symmetric top-k): per
// row, a buffer of 2k (value, index) entries and a threshold, in flat
// arrays (no allocation per row). Same rules as TopK: "better" is a larger
// value, or an equal one with a smaller index, so the result does not
// depend on the order of the offers; -inf entries are never taken. A row
// must only be touched by one thread at a time; each thread brings its own
// Scratch.
class RowSelect {
public:
    struct Scratch {
        std::vector<double> a, b;
        std::vector<std::int64_t> ids, rank;
        explicit Scratch(std::int64_t k)
            : a(2 * static_cast<std::size_t>(k)), b(2 * static_cast<std::size_t>(k)),
              ids(2 * static_cast<std::size_t>(k)), rank(2 * static_cast<std::size_t>(k)) {}
    };

    RowSelect(std::int64_t rows, std::int64_t k)
        : k_(static_cast<std::size_t>(k)), cap_(2 * k_), count_(static_cast<std::size_t>(rows), 0),
          thr_(static_cast<std::size_t>(rows), -std::numeric_limits<double>::infinity()),
          // left uninitialised (a row's entries past count_ are never read):
          // the first touch of these pages happens in the parallel pass,
          // not in a serial zeroing here (31 MB at N = 20 000, k = 64)
          val_(new double[static_cast<std::size_t>(rows) * cap_]),
          idx_(new std::int32_t[static_cast<std::size_t>(rows) * cap_]) {}

    // Bytes held for `rows` rows at this k.
    static double bytes(std::int64_t rows, std::int64_t k) {
        return static_cast<double>(rows) * (2.0 * static_cast<double>(k) * 12.0 + 12.0);
    }

    // Start row `row` from a known lower bound on its k-th best value
    // (nothing below it can be among the best k).
    void seed(std::int64_t row, double lower_bound) {
        double& t = thr_[static_cast<std::size_t>(row)];
        t = std::max(t, lower_bound);
    }

    // Per row: nothing below this value can still enter.
    const double* thresholds() const { return thr_.data(); }

    void offer(std::int64_t row, double x, std::int32_t id, Scratch& s) {
        const std::size_t r = static_cast<std::size_t>(row);
        if (x < thr_[r] || x == -std::numeric_limits<double>::infinity()) return;
        double* val = val_.get() + r * cap_;
        std::int32_t* idx = idx_.get() + r * cap_;
        std::uint32_t& n = count_[r];
        val[n] = x;
        idx[n] = id;
        if (++n == k_) {
            // the first k entries at or above the threshold bound the k-th best
            thr_[r] = std::max(thr_[r], *std::min_element(val, val + k_));
        } else if (n == cap_) {
            shrink(r, s);
        }
    }

    // Row `row`'s best min(k, offered) entries, best first, into ids and
    // values; returns how many.
    std::size_t best(std::int64_t row, Scratch& s, std::int64_t* ids, double* values) {
        const std::size_t r = static_cast<std::size_t>(row);
        shrink(r, s);
        const std::size_t n = count_[r];
        const double* val = val_.get() + r * cap_;
        const std::int32_t* idx = idx_.get() + r * cap_;
        for (std::size_t i = 0; i < n; ++i) s.ids[i] = idx[i];
        rank_order(val, s.ids.data(), static_cast<std::int64_t>(n), s.rank.data());
        for (std::size_t i = 0; i < n; ++i) {
            const std::size_t at = static_cast<std::size_t>(s.rank[i]);
            ids[at] = s.ids[i];
            values[at] = val[i];
        }
        return n;
    }

private:
    // Keep the best k of a row's entries (when it holds more).
    void shrink(std::size_t r, Scratch& s) {
        std::uint32_t& n = count_[r];
        if (n <= k_) return;
        double* val = val_.get() + r * cap_;
        std::int32_t* idx = idx_.get() + r * cap_;
        std::copy(val, val + n, s.a.begin());
        const double kth = kth_largest(s.a.data(), s.b.data(), n, k_ - 1);
        thr_[r] = kth;
        keep_best_k(val, idx, n, k_, kth, s.ids.data());
        n = static_cast<std::uint32_t>(k_);
    }

    std::size_t k_, cap_;
    std::vector<std::uint32_t> count_;
    std::vector<double> thr_;
    std::unique_ptr<double[]> val_;
    std::unique_ptr<std::int32_t[]> idx_;
};

}  // namespace mapa
