#include "kernel.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <limits>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "tiles.hpp"
#include "topk.hpp"

namespace mapa {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();
constexpr index_t kRows = 16;  // query rows per unit of parallel work
static_assert(kRows <= kTargetRows, "targets take a whole row block at once");

// References cut into feature-major tiles of `tb` points (see tiles.hpp).
struct PackedRefs {
    index_t n = 0, d = 0, tb = 0, ld = 0, ntiles = 0;
    bool expand = false;
    // float32 problems on the direct path keep tiles (and rows) in float and
    // take the single-precision leaves; data is then empty
    bool single = false;
    std::vector<double> data;   // ntiles * d * ld
    std::vector<float> fdata;   // the same layout, when single
    std::vector<double> norms;  // ntiles * ld, when expand
    // The expansion ||y||^2 + ||x||^2 - 2 y.x loses precision far from the
    // origin, so that path works on data shifted by the reference mean.
    std::vector<double> center;  // d, when expand; empty otherwise
    // Each tile's bounding box in the packed coordinates, and the largest
    // squared norm there (for the expansion's rounding error); set by
    // add_boxes for the symmetric passes, empty otherwise.
    std::vector<double> lo, hi;  // ntiles * d
    std::vector<double> blo, bhi;  // the same per row block (blocks_per_tile per tile)
    double r2max = 0.0;

    const double* shift() const { return center.empty() ? nullptr : center.data(); }

    const double* tile(index_t t) const { return data.data() + t * d * ld; }
    const float* ftile(index_t t) const { return fdata.data() + t * d * ld; }
    const double* norm(index_t t) const { return expand ? norms.data() + t * ld : nullptr; }
    index_t len(index_t t) const { return std::min(tb, n - t * tb); }
};

index_t tile_length(index_t n, index_t d, index_t tile, bool single) {
    // A requested tile longer than the data would only waste memory.
    return tile > 0 ? std::min({tile, kMaxTile, (n + kTileAlign - 1) / kTileAlign * kTileAlign})
                    : default_tile(n, d, single);
}

// Whether a problem takes the single-precision distances: float32 data on
// the direct path, whose squared distances can neither overflow float (every
// coordinate below 4e18 / sqrt(d)) nor lose digits that matter to float's
// subnormal range (scale <= 1e30: an absolute error of 2^-149 per term then
// moves a logit by under 1e-14 d). Anything else keeps float64 distances.
template <class T>
bool float_distances(const Args& a) {
    if (!std::is_same_v<T, float> || a.d > kDirectMaxFeatures || !(a.scale <= 1e30)) return false;
    const float limit = static_cast<float>(4e18 / std::sqrt(static_cast<double>(a.d)));
    const auto within = [&](const void* data, index_t rows) {
        const float* v = static_cast<const float*>(data);
        float top = 0.0f;
        for (index_t i = 0; i < rows * a.d; ++i) top = std::max(top, std::fabs(v[i]));
        return top < limit;
    };
    return within(a.x, a.n) && (a.y == a.x || within(a.y, a.m));
}

// `perm` (or nullptr): packed position i holds reference perm[i]; `single`:
// float tiles (see float_distances).
template <class T>
PackedRefs pack(const T* x, index_t n, index_t d, index_t tile, int threads, bool single,
                const index_t* perm = nullptr) {
    PackedRefs p;
    p.n = n;
    p.d = d;
    p.tb = tile_length(n, d, tile, single);
    p.ld = (p.tb + kTileAlign - 1) / kTileAlign * kTileAlign;
    p.ntiles = (n + p.tb - 1) / p.tb;
    p.expand = d > kDirectMaxFeatures;
    p.single = single && !p.expand;
    if (p.single) {
        p.fdata.assign(static_cast<std::size_t>(p.ntiles * d * p.ld), 0.0f);
    } else {
        p.data.assign(static_cast<std::size_t>(p.ntiles * d * p.ld), 0.0);
    }
    if (p.expand) {
        p.norms.assign(static_cast<std::size_t>(p.ntiles * p.ld), 0.0);
        p.center.assign(static_cast<std::size_t>(d), 0.0);
        for (index_t i = 0; i < n; ++i)
            for (index_t k = 0; k < d; ++k) p.center[k] += static_cast<double>(x[i * d + k]);
        for (auto& c : p.center) c /= static_cast<double>(n);
    }
    const double* c = p.shift();
    // Packing is O(n d): not worth waking threads for small inputs.
    const int pack_threads = n * d >= (1 << 20) ? threads : 1;
#pragma omp parallel for num_threads(pack_threads) schedule(dynamic, 16)
    for (index_t t = 0; t < p.ntiles; ++t) {
        const index_t len = p.len(t);
        if (p.single) {
            float* dst = p.fdata.data() + t * d * p.ld;
            for (index_t j = 0; j < len; ++j) {
                const index_t i = t * p.tb + j;
                const T* row = x + (perm ? perm[i] : i) * d;
                for (index_t k = 0; k < d; ++k) dst[k * p.ld + j] = static_cast<float>(row[k]);
            }
            continue;
        }
        double* dst = p.data.data() + t * d * p.ld;
        for (index_t j = 0; j < len; ++j) {
            const index_t i = t * p.tb + j;
            const T* row = x + (perm ? perm[i] : i) * d;
            double sq = 0.0;
            for (index_t k = 0; k < d; ++k) {
                const double v = static_cast<double>(row[k]) - (c ? c[k] : 0.0);
                dst[k * p.ld + j] = v;
                sq += v * v;
            }
            if (p.expand) p.norms[t * p.ld + j] = sq;
        }
    }
    return p;
}

// Row blocks of kRows per tile: the passes cut each tile's rows into
// blocks from its first row (a tile's length need not be a multiple of
// kRows when block_size is given).
index_t blocks_per_tile(const PackedRefs& p) { return (p.tb + kRows - 1) / kRows; }

// Fills p.lo, p.hi, p.blo, p.bhi and p.r2max (see PackedRefs).
void add_boxes(PackedRefs& p) {
    const index_t d = p.d, nb = p.ntiles * blocks_per_tile(p);
    constexpr double kInf = std::numeric_limits<double>::infinity();
    p.lo.assign(static_cast<std::size_t>(p.ntiles * d), kInf);
    p.hi.assign(static_cast<std::size_t>(p.ntiles * d), -kInf);
    p.blo.assign(static_cast<std::size_t>(nb * d), kInf);
    p.bhi.assign(static_cast<std::size_t>(nb * d), -kInf);
    for (index_t t = 0; t < p.ntiles; ++t) {
        for (index_t j = 0; j < p.len(t); ++j) {
            const std::size_t b = static_cast<std::size_t>((t * blocks_per_tile(p) + j / kRows) * d);
            double sq = 0.0;
            for (index_t k = 0; k < d; ++k) {
                const double v = p.single ? static_cast<double>(p.ftile(t)[k * p.ld + j]) : p.tile(t)[k * p.ld + j];
                const std::size_t i = static_cast<std::size_t>(t * d + k);
                p.lo[i] = std::min(p.lo[i], v);
                p.hi[i] = std::max(p.hi[i], v);
                p.blo[b + k] = std::min(p.blo[b + k], v);
                p.bhi[b + k] = std::max(p.bhi[b + k], v);
                sq += v * v;
            }
            p.r2max = std::max(p.r2max, sq);
        }
    }
}

// An upper bound on every computed logit between the points in box a
// (alo, ahi) and those in box b: the boxes' gap bounds each pair's squared
// distance from below; the computed distances may fall short of the exact
// ones by a relative (d + 1) 2^-24 (float sums, d <= 32) or, on the
// expansion path, an absolute (d + 3) 2^-50 r2max, both covered by the
// slack.
double box_logit_bound(const PackedRefs& p, const double* alo, const double* ahi, const double* blo,
                       const double* bhi, double scale) {
    double gap2 = 0.0;
    for (index_t k = 0; k < p.d; ++k) {
        const double g = std::max({0.0, blo[k] - ahi[k], alo[k] - bhi[k]});
        gap2 += g * g;
    }
    const double slack = gap2 * 0x1p-16 + (p.expand ? static_cast<double>(p.d + 3) * 0x1p-50 * p.r2max : 0.0);
    return -scale * (gap2 - slack);
}

// The same between tiles ta and tb (p has its boxes, add_boxes).
double logit_bound(const PackedRefs& p, index_t ta, index_t tb, double scale) {
    const std::size_t a = static_cast<std::size_t>(ta * p.d), b = static_cast<std::size_t>(tb * p.d);
    return box_logit_bound(p, p.lo.data() + a, p.hi.data() + a, p.lo.data() + b, p.hi.data() + b, scale);
}

// The same between the row block from packed row r0 (a tile's first row
// plus a multiple of kRows) and tile t.
double block_logit_bound(const PackedRefs& p, index_t r0, index_t t, double scale) {
    const index_t ta = r0 / p.tb, block = ta * blocks_per_tile(p) + (r0 - ta * p.tb) / kRows;
    const std::size_t a = static_cast<std::size_t>(block * p.d), b = static_cast<std::size_t>(t * p.d);
    return box_logit_bound(p, p.blo.data() + a, p.bhi.data() + a, p.lo.data() + b, p.hi.data() + b, scale);
}

// Whether every exponential between tiles ta and tb is exactly 0: `floor`
// is the logit under which exp_nonpos of the precision used gives 0 (with a
// margin).
bool tiles_apart(const PackedRefs& p, index_t ta, index_t tb, double scale, double floor) {
    return logit_bound(p, ta, tb, scale) < floor;
}

// Logit below which exp_nonpos gives exactly 0 in the precision T picks
// (float: under -87, double: under -708), with a margin for rounding.
template <class T>
constexpr double exp_floor() {
    return std::is_same_v<T, float> ? -88.0 : -709.0;
}

// Query rows as doubles, with their squared norms: the rows at positions
// [r0, r0 + rows), which are rows order[r0 ..] of the input when an order is
// given. orig[r] is the input row of loaded row r and self[r] the packed
// position of the same point among the references (for exclude_self).
struct RowBlock {
    std::vector<double> y, ynorm, logits, tmax;
    std::vector<float> yf;  // the rows in float, for float32 input
    index_t orig[kRows], self[kRows];
    RowBlock(index_t d, index_t ld) : y(kRows * d), ynorm(kRows), logits(kRows * ld), tmax(kRows), yf(kRows * d) {}

    // `shift` (or nullptr) is subtracted from every row, as in PackedRefs;
    // `order` and `position` (input row -> packed position) may be nullptr.
    template <class T>
    void load(const T* src, index_t r0, index_t rows, index_t d, const double* shift, const index_t* order,
              const index_t* position) {
        for (index_t r = 0; r < rows; ++r) {
            const index_t g = order ? order[r0 + r] : r0 + r;
            orig[r] = g;
            self[r] = position ? position[g] : g;
            double sq = 0.0;
            for (index_t k = 0; k < d; ++k) {
                const double v = static_cast<double>(src[g * d + k]) - (shift ? shift[k] : 0.0);
                y[r * d + k] = v;
                sq += v * v;
                if constexpr (std::is_same_v<T, float>) yf[r * d + k] = src[g * d + k];
            }
            ynorm[r] = sq;
        }
    }
};

// Queries are the references themselves (Y is X).
bool self_queries(const Args& a) { return a.y == a.x && a.m == a.n; }

// What tile_logits does with a row's own column (RowBlock::self) where it
// falls in the tile: nothing (kOther: the rows are not the references'
// points, or the tile cannot hold their columns), -inf (kDrop,
// exclude_self), or exactly 0 (kZero, on the expansion path: ||y||^2 +
// ||x||^2 - 2 x.y leaves ~1e-16 ||x||^2 there, which moved log Z by up to
// 2e-10, past the float64 tolerance, where the bandwidth is small against
// the spread; the direct paths give 0 already).
enum class SelfTerm { kOther, kDrop, kZero };

// The rule for a's rows; `own`: their own columns may be in the tile.
SelfTerm self_term(const Args& a, bool own) {
    return !own ? SelfTerm::kOther : a.exclude_self ? SelfTerm::kDrop : SelfTerm::kZero;
}

// Logits of the loaded rows against tile t, the self terms as `self` says,
// and (when with_max) each row's maximum over the tile in b.tmax.
void tile_logits(const PackedRefs& p, RowBlock& b, index_t rows, index_t t, double scale, SelfTerm self,
                 bool with_max = true) {
    const index_t len = p.len(t);
    if (p.expand) {
        logits_expand(p.tile(t), p.norm(t), p.ld, p.ld, p.d, b.y.data(), b.ynorm.data(), rows, scale,
                      b.logits.data());
        for (index_t r = 0; with_max && r < rows; ++r) b.tmax[r] = tile_max(b.logits.data() + r * p.ld, len);
    } else if (p.single) {
        logits_direct(p.ftile(t), p.ld, p.ld, p.d, b.yf.data(), rows, scale, b.logits.data(), len,
                      with_max ? b.tmax.data() : nullptr);
    } else {
        logits_direct(p.tile(t), p.ld, p.ld, p.d, b.y.data(), rows, scale, b.logits.data(), len,
                      with_max ? b.tmax.data() : nullptr);
    }
    if (self == SelfTerm::kOther || (self == SelfTerm::kZero && !p.expand)) return;
    const bool drop = self == SelfTerm::kDrop;
    const index_t c0 = t * p.tb, c1 = c0 + len;
    for (index_t r = 0; r < rows; ++r) {
        const index_t g = b.self[r];
        if (g < c0 || g >= c1) continue;
        double* row = b.logits.data() + r * p.ld;
        row[g - c0] = drop ? kNegInf : 0.0;
        if (with_max) b.tmax[r] = drop ? tile_max(row, len) : std::max(b.tmax[r], 0.0);
    }
}

// Streaming log-sum-exp state of one row; T picks the precision of the
// exponentials (single for float32 problems, double otherwise).
template <class T>
struct Lse {
    double max = kNegInf;
    double sum = 0.0;

    static constexpr double kFloor = exp_floor<T>();

    // Fold in one tile of logits whose maximum is `tm`. A tile whose every
    // term is exactly 0 adds nothing and is skipped.
    void update(const double* v, index_t len, double tm) {
        if (tm == kNegInf) return;
        if (tm > max) {
            sum *= std::exp(max - tm);
            max = tm;
        }
        if (tm - max < kFloor) return;
        sum += sum_exp_shifted(v, len, max, T{});
    }
    double value() const { return max + std::log(sum); }
};

// A locality order: references and queries sorted along a Z-order (Morton)
// curve over their coordinates along the references' two principal axes,
// and each block of queries starting its sweep at the tile where its first
// query would sit. Near neighbours then come first (top-k's threshold is
// almost final after one tile, and tiles of near points leave more tile
// pairs whose every term is 0), also when the data's spread is not along
// its raw features.
struct Order {
    std::vector<index_t> refs;      // packed position -> reference index
    std::vector<index_t> position;  // reference index -> packed position (empty: the same)
    std::vector<index_t> queries;   // processing position -> query row
    std::vector<index_t> start;     // per block of kRows queries: first tile
};

// Each feature's smallest (lo) and largest (hi) value over the n points x.
template <class T>
void feature_ranges(const T* x, index_t n, index_t d, std::vector<double>& lo, std::vector<double>& hi) {
    lo.assign(static_cast<std::size_t>(d), std::numeric_limits<double>::infinity());
    hi.assign(static_cast<std::size_t>(d), -std::numeric_limits<double>::infinity());
    for (index_t i = 0; i < n; ++i)
        for (index_t k = 0; k < d; ++k) {
            const double v = static_cast<double>(x[i * d + k]);
            lo[static_cast<std::size_t>(k)] = std::min(lo[static_cast<std::size_t>(k)], v);
            hi[static_cast<std::size_t>(k)] = std::max(hi[static_cast<std::size_t>(k)], v);
        }
}

// The references' two principal axes (unit vectors, d each, in axes[0 .. 2d))
// and their mean, for locality_order. Power iteration on an evenly spaced
// sample of m points, the second axis after deflating the first, from a
// fixed start (the direction of largest variance among the features) for a
// fixed number of steps, so the order is deterministic; where two
// variances are close the axes found are some mix of theirs, which serves
// the order as well. The sample is sized to cost at most ~n^2 d / 2048
// multiply-adds (these scalar loops run ~30x slower per multiply-add than
// the kernel's leaves, so ~3% of one symmetric pass): up to 64 features through the
// covariance (m d^2, m <= 4096, 64 steps), above through the sample itself
// (v <- S^T S v, 128 m d, m <= 256, 32 steps). Up to two features, or when
// that leaves fewer than 16 points, the raw features of widest range
// (widest first, the one twice when d == 1) with mean 0: the coordinates
// are then the features themselves, exactly.
template <class T>
void principal_axes(const T* x, index_t n, index_t d, std::vector<double>& mean, std::vector<double>& axes) {
    mean.assign(static_cast<std::size_t>(d), 0.0);
    axes.assign(static_cast<std::size_t>(2 * d), 0.0);
    const bool cov = d <= 64;
    const double budget = static_cast<double>(n) * static_cast<double>(n) / 2048.0;  // per feature
    const index_t m = static_cast<index_t>(std::min<double>(
        {static_cast<double>(n), cov ? 4096.0 : 256.0, cov ? budget / static_cast<double>(d) : budget / 128.0}));
    if (d <= 2 || m < 16) {
        std::vector<double> lo, hi;
        feature_ranges(x, n, d, lo, hi);
        index_t f[2] = {0, 0};
        for (index_t k = 1; k < d; ++k)
            if (hi[k] - lo[k] > hi[f[0]] - lo[f[0]]) f[0] = k;
        f[1] = f[0] == 0 && d > 1 ? 1 : 0;
        for (index_t k = 0; k < d; ++k)
            if (k != f[0] && hi[k] - lo[k] > hi[f[1]] - lo[f[1]]) f[1] = k;
        axes[static_cast<std::size_t>(f[0])] = 1.0;
        axes[static_cast<std::size_t>(d + f[1])] = 1.0;
        return;
    }
    const auto at = [](index_t i) { return static_cast<std::size_t>(i); };
    for (index_t i = 0; i < n; ++i)
        for (index_t k = 0; k < d; ++k) mean[at(k)] += static_cast<double>(x[i * d + k]);
    for (auto& e : mean) e /= static_cast<double>(n);
    const index_t step = n / m;
    std::vector<double> smp(at(m * d));  // the centred sample, row-major
    for (index_t s = 0; s < m; ++s)
        for (index_t k = 0; k < d; ++k) smp[at(s * d + k)] = static_cast<double>(x[s * step * d + k]) - mean[at(k)];
    std::vector<double> c;  // the sample's scatter matrix (cov), minus the axes found
    if (cov) {
        c.assign(at(d * d), 0.0);
        for (index_t s = 0; s < m; ++s) {
            const double* v = smp.data() + s * d;
            for (index_t a = 0; a < d; ++a)
                for (index_t b = 0; b < d; ++b) c[at(a * d + b)] += v[a] * v[b];
        }
    }
    std::vector<double> u(at(d)), w(at(d));
    // w = (S^T S - lambda0 u0 u0^T) u: through c, or through the sample
    const auto apply = [&](int axis, double lambda0) {
        if (cov) {
            for (index_t a = 0; a < d; ++a) {
                double t = 0.0;
                for (index_t b = 0; b < d; ++b) t += c[at(a * d + b)] * u[at(b)];
                w[at(a)] = t;
            }
            return;
        }
        std::fill(w.begin(), w.end(), 0.0);
        for (index_t s = 0; s < m; ++s) {
            const double* v = smp.data() + s * d;
            double t = 0.0;
            for (index_t k = 0; k < d; ++k) t += v[k] * u[at(k)];
            for (index_t k = 0; k < d; ++k) w[at(k)] += t * v[k];
        }
        if (axis == 1) {
            double t = 0.0;
            for (index_t k = 0; k < d; ++k) t += axes[at(k)] * u[at(k)];
            for (index_t k = 0; k < d; ++k) w[at(k)] -= lambda0 * t * axes[at(k)];
        }
    };
    double lambda0 = 0.0;
    for (int axis = 0; axis < 2; ++axis) {
        // start: the feature of largest remaining variance, as a unit vector
        index_t top = 0;
        double best = -1.0;
        for (index_t k = 0; k < d; ++k) {
            double var = 0.0;
            for (index_t s = 0; s < m; ++s) var += smp[at(s * d + k)] * smp[at(s * d + k)];
            if (axis == 1) var -= lambda0 * axes[at(k)] * axes[at(k)];
            if (var > best) best = var, top = k;
        }
        std::fill(u.begin(), u.end(), 0.0);
        u[at(top)] = 1.0;
        double lambda = 0.0;
        for (int it = 0, steps = cov ? 64 : 32; it < steps; ++it) {
            apply(axis, lambda0);
            double norm = 0.0;
            for (index_t k = 0; k < d; ++k) norm += w[at(k)] * w[at(k)];
            norm = std::sqrt(norm);
            if (!(norm > 0.0)) break;  // no spread left: the start serves
            lambda = norm;
            for (index_t k = 0; k < d; ++k) u[at(k)] = w[at(k)] / norm;
        }
        std::copy(u.begin(), u.end(), axes.begin() + axis * d);
        if (axis == 0 && cov) {
            for (index_t a = 0; a < d; ++a)
                for (index_t b = 0; b < d; ++b) c[at(a * d + b)] -= lambda * u[at(a)] * u[at(b)];
        }
        lambda0 = lambda;
    }
}

// Without queries, only refs and position are filled.
template <class T>
Order locality_order(const Args& a, index_t tb, bool with_queries = true) {
    const T* x = static_cast<const T*>(a.x);
    const T* y = static_cast<const T*>(a.y);
    const index_t n = a.n, m = a.m, d = a.d;
    std::vector<double> mean, axes;
    principal_axes(x, n, d, mean, axes);
    const auto coords = [&](const T* row, double out[2]) {
        out[0] = out[1] = 0.0;
        for (index_t k = 0; k < d; ++k) {
            const double v = static_cast<double>(row[k]) - mean[static_cast<std::size_t>(k)];
            out[0] += v * axes[static_cast<std::size_t>(k)];
            out[1] += v * axes[static_cast<std::size_t>(d + k)];
        }
    };
    double lo[2] = {std::numeric_limits<double>::infinity(), std::numeric_limits<double>::infinity()};
    double hi[2] = {-lo[0], -lo[1]};
    for (index_t i = 0; i < n; ++i) {
        double c[2];
        coords(x + i * d, c);
        for (int k = 0; k < 2; ++k) lo[k] = std::min(lo[k], c[k]), hi[k] = std::max(hi[k], c[k]);
    }
    const auto key = [&](const T* row) {
        double c[2];
        coords(row, c);
        std::uint32_t q[2];
        for (int k = 0; k < 2; ++k) {
            const double w = hi[k] - lo[k];
            const double u = w > 0.0 ? (c[k] - lo[k]) / w : 0.0;
            q[k] = static_cast<std::uint32_t>(std::clamp(u, 0.0, 1.0) * 65535.0);
        }
        std::uint32_t z = 0;
        for (int bit = 0; bit < 16; ++bit) z |= ((q[0] >> bit & 1u) << (2 * bit)) | ((q[1] >> bit & 1u) << (2 * bit + 1));
        return z;
    };
    const auto sorted = [&](const T* pts, index_t count, std::vector<std::uint32_t>& keys) {
        std::vector<std::pair<std::uint32_t, index_t>> kv(static_cast<std::size_t>(count));
        for (index_t i = 0; i < count; ++i) kv[static_cast<std::size_t>(i)] = {key(pts + i * d), i};
        std::sort(kv.begin(), kv.end());
        std::vector<index_t> perm(static_cast<std::size_t>(count));
        keys.resize(static_cast<std::size_t>(count));
        for (std::size_t i = 0; i < kv.size(); ++i) keys[i] = kv[i].first, perm[i] = kv[i].second;
        return perm;
    };
    Order o;
    std::vector<std::uint32_t> xkeys, ykeys;
    o.refs = sorted(x, n, xkeys);
    o.position.resize(static_cast<std::size_t>(n));
    for (index_t i = 0; i < n; ++i) o.position[static_cast<std::size_t>(o.refs[static_cast<std::size_t>(i)])] = i;
    if (!with_queries) return o;
    o.queries = sorted(y, m, ykeys);
    const index_t ntiles = (n + tb - 1) / tb;
    for (index_t r0 = 0; r0 < m; r0 += kRows) {
        const auto at = std::lower_bound(xkeys.begin(), xkeys.end(), ykeys[static_cast<std::size_t>(r0)]);
        o.start.push_back(std::min<index_t>((at - xkeys.begin()) / tb, ntiles - 1));
    }
    return o;
}

// Inside a parallel region: this thread's state from make_state() (empty
// when that threw; the error is captured), and in `master` whether this is
// the calling thread (the one that may talk to the poll callback).
template <class State, class MakeState>
std::optional<State> thread_state(Control& ctl, MakeState& make_state, bool& master) {
#ifdef _OPENMP
    master = omp_get_thread_num() == 0;
#else
    master = true;
#endif
    std::optional<State> state;
    try {
        state.emplace(make_state());
    } catch (...) {
        ctl.capture(std::current_exception());
    }
    return state;
}

// Run body(state, block) over blocks [0, nblocks) on `threads` threads,
// each block going to whichever thread is free. Exceptions are captured
// inside the region and rethrown after it; a stop request from the poll
// callback ends the loop at the next block.
template <class State, class MakeState, class Body, class Units>
void parallel_blocks(index_t nblocks, int threads, Control& ctl, MakeState make_state, Body body, Units units) {
#pragma omp parallel num_threads(threads)
    {
        bool master;
        std::optional<State> state = thread_state<State>(ctl, make_state, master);
#pragma omp for schedule(dynamic, 1)
        for (index_t b = 0; b < nblocks; ++b) {
            if (ctl.stopped() || !state) continue;
            try {
                body(*state, b);
            } catch (...) {
                ctl.capture(std::current_exception());
            }
            ctl.advance(units(b), master);
        }
    }
    ctl.rethrow();
    if (ctl.stopped()) throw Cancelled();
}

// Visit every query block: load its rows, stream every tile through
// visit_tile(block, r0, rows, t), then finish(block, r0, rows).
template <class T, class State, class MakeState, class Visit, class Finish>
void over_query_blocks(const Args& a, const PackedRefs& p, Control& ctl, MakeState make_state,
                       Visit visit_tile, Finish finish, const Order* order = nullptr) {
    const T* y = static_cast<const T*>(a.y);
    const index_t nblocks = (a.m + kRows - 1) / kRows;
    parallel_blocks<State>(
        nblocks, a.threads, ctl, make_state,
        [&](State& s, index_t b) {
            const index_t r0 = b * kRows, rows = std::min(kRows, a.m - r0);
            s.block.load(y, r0, rows, a.d, p.shift(), order ? order->queries.data() : nullptr,
                         order && !order->position.empty() ? order->position.data() : nullptr);
            s.reset(rows);
            const index_t t0 = order ? order->start[static_cast<std::size_t>(b)] : 0;
            for (index_t i = 0; i < p.ntiles; ++i) {
                const index_t t = (t0 + i) % p.ntiles;
                tile_logits(p, s.block, rows, t, a.scale, self_term(a, a.exclude_self || self_queries(a)));
                visit_tile(s, r0, rows, t);
            }
            finish(s, r0, rows);
        },
        [&](index_t b) { return std::min(kRows, a.m - b * kRows) * a.n; });
}

template <class T>
struct NormState {
    RowBlock block;
    Lse<T> lse[kRows];
    NormState(index_t d, index_t ld) : block(d, ld) {}
    void reset(index_t) {
        for (auto& l : lse) l = Lse<T>{};
    }
};

// With an order, out[i] belongs to query row order->queries[i].
template <class T, class Out>
void normalizer_into(const Args& a, const PackedRefs& p, Out* out, Control& ctl, const Order* order = nullptr) {
    over_query_blocks<T, NormState<T>>(
        a, p, ctl, [&] { return NormState<T>(a.d, p.ld); },
        [&](NormState<T>& s, index_t, index_t rows, index_t t) {
            for (index_t r = 0; r < rows; ++r)
                s.lse[r].update(s.block.logits.data() + r * p.ld, p.len(t), s.block.tmax[r]);
        },
        [&](NormState<T>& s, index_t r0, index_t rows) {
            for (index_t r = 0; r < rows; ++r) out[r0 + r] = static_cast<Out>(s.lse[r].value());
        },
        order);
}

inline void spin_pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

// Run visit(state, ta, tb) for every pair of tiles ta <= tb of nt tiles,
// never two pairs that share a tile at once, and each tile's pairs in one
// fixed order: its diagonal pair first, then the rounds of the circle
// method of round-robin tournaments (P - 1 rounds of P / 2 pairs that share
// no tile, P = nt rounded up to even; a pair with tile nt, when P > nt, is
// a bye). A pair may start once the previous pairs of both its tiles are
// done, and a free thread takes the earliest pair that may start: no
// barrier between rounds, and a thread held up (by another process) holds
// up only the pairs of its two tiles. Whatever visit writes for the rows of
// its two tiles is thus written by one thread at a time, in the same order
// on every call, whatever the thread count. make_state() builds each
// thread's state; units(ta, tb) is the pair's progress count. A stop
// request ends the loop at the next pair.
// The tile pairs of over_tile_rounds in their order, computed on demand (a
// table of the pairs and of their predecessors took 33 bytes per pair: 250
// MB for top-k's 7.6 million pairs at N = 10^6). Pairs 0 .. nt - 1 are the
// diagonals (t, t); then round r < P - 1 has S pairs, slot i of the circle
// method joining P - 1 (i = 0) or (r + i) mod (P - 1) with
// (r - i) mod (P - 1). With nt odd, tile P - 1 = nt does not exist: slot 0,
// tile r's bye, is left out.
struct TileRounds {
    index_t nt, P, skip, S;
    explicit TileRounds(index_t n) : nt(n), P(n + n % 2), skip(n % 2), S((n + n % 2) / 2 - n % 2) {}
    index_t count() const { return nt + (P - 1) * S; }
    // (ta, tb), ta <= tb, of pair g
    std::pair<index_t, index_t> pair(index_t g) const {
        if (g < nt) return {g, g};
        const index_t r = (g - nt) / S, i = (g - nt) % S + skip;
        const index_t u = i == 0 ? P - 1 : (r + i) % (P - 1), v = (r - i + P - 1) % (P - 1);
        return {std::min(u, v), std::max(u, v)};
    }
    // the pair of round r that holds tile t (not t's bye)
    index_t at(index_t r, index_t t) const {
        index_t i = 0;
        if (t != P - 1) {
            const index_t m = P - 1, a = ((t - r) % m + m) % m;
            i = a >= 1 && a < P / 2 ? a : ((r - t) % m + m) % m;
        }
        return nt + r * S + (i - skip);
    }
    // the pair before pair g that holds t, one of g's tiles (-1: none): the
    // previous round's, or the one before if t had its bye there, or t's
    // diagonal
    index_t prev(index_t g, index_t t) const {
        if (g < nt) return -1;
        index_t r = (g - nt) / S - 1;
        if (skip && r == t) --r;
        return r < 0 ? t : at(r, t);
    }
};

template <class State, class MakeState, class Visit, class Units>
void over_tile_rounds(index_t nt, int threads, Control& ctl, MakeState make_state, Visit visit, Units units) {
    const TileRounds rounds(nt);
    const index_t n = rounds.count();
    // each pair's stage: 0 free, 1 taken, 2 done; no lock (a contended
    // mutex puts the waiting thread to sleep, and waking it costs more than
    // a small pair)
    enum : char { kFree = 0, kTaken = 1, kDone = 2 };
    const std::unique_ptr<std::atomic<char>[]> stage(new std::atomic<char>[static_cast<std::size_t>(n)]);
    for (index_t i = 0; i < n; ++i) stage[i].store(kFree, std::memory_order_relaxed);
    std::atomic<index_t> head{0};  // every pair before it is taken
    const auto after = [&](index_t q) { return q < 0 || stage[q].load(std::memory_order_acquire) == kDone; };
#pragma omp parallel num_threads(threads)
    {
        bool master;
        std::optional<State> state = thread_state<State>(ctl, make_state, master);
        while (!ctl.stopped()) {
            index_t h = head.load(std::memory_order_relaxed);
            while (h < n && stage[h].load(std::memory_order_relaxed) != kFree) ++h;
            if (h == n) break;
            for (index_t seen = head.load(std::memory_order_relaxed); seen < h;)
                if (head.compare_exchange_weak(seen, h, std::memory_order_relaxed)) break;
            index_t got = -1;
            // pairs further on than one round past the head wait anyway
            for (index_t i = h; got < 0 && i < std::min(n, h + nt + 1); ++i) {
                if (stage[i].load(std::memory_order_relaxed) != kFree) continue;
                const auto [ta, tb] = rounds.pair(i);
                char expect = kFree;
                if (after(rounds.prev(i, ta)) && (ta == tb || after(rounds.prev(i, tb))) &&
                    stage[i].compare_exchange_strong(expect, kTaken, std::memory_order_acq_rel))
                    got = i;
            }
            if (got < 0) {
                // a short wait: the pairs ahead finish within microseconds
                // to milliseconds, and yielding the core to another process
                // could cost a whole time slice
                for (int i = 0; i < 64; ++i) spin_pause();
                continue;
            }
            const auto [ta, tb] = rounds.pair(got);
            try {
                if (state) visit(*state, ta, tb);
            } catch (...) {
                ctl.capture(std::current_exception());
            }
            stage[got].store(kDone, std::memory_order_release);
            ctl.advance(units(ta, tb), master);
        }
    }
    ctl.rethrow();
    if (ctl.stopped()) throw Cancelled();
}

// The ordered pairs the tile pair (ta, tb), ta <= tb, stands for (progress).
index_t pair_units(const PackedRefs& p, index_t ta, index_t tb) {
    return p.len(ta) * p.len(tb) * (ta == tb ? 1 : 2);
}

// Run body(state, ta, tb, r0, rows) for every block of at most kRows rows
// r0 .. r0 + rows of tile ta against tile tb, over the tile pairs ta <= tb
// on over_tile_rounds: what body adds to the rows of ta and tb is added by
// one thread at a time, in the same order on every call, whatever the
// thread count. Pairs of distinct tiles whose every exponential is exactly
// 0 (tiles_apart at `floor`) are left out, and so are the row blocks of the
// others whose own box puts them that far from tb (block_logit_bound: on
// fold at the "nn" bandwidth a fifth of the blocks left; one thread, N =
// 20 000, the normaliser went from 36.5 to 30.3 ms). Progress counts the
// ordered pairs each tile pair stands for.
template <class State, class MakeState, class Body>
void over_tile_pairs(const PackedRefs& p, int threads, double scale, double floor, Control& ctl,
                     MakeState make_state, Body body) {
    over_tile_rounds<State>(
        p.ntiles, threads, ctl, make_state,
        [&](State& s, index_t ta, index_t tb) {
            if (ta != tb && tiles_apart(p, ta, tb, scale, floor)) return;
            const index_t end = ta * p.tb + p.len(ta);
            for (index_t r0 = ta * p.tb; r0 < end; r0 += kRows)
                if (ta == tb || !(block_logit_bound(p, r0, tb, scale) < floor))
                    body(s, ta, tb, r0, std::min(kRows, end - r0));
        },
        [&](index_t ta, index_t tb) { return pair_units(p, ta, tb); });
}

// A one-sided pass over just the query rows `rows` (input rows, in that
// order, every block starting at tile 0): their Order, and Args with m the
// row count; the progress total grows by their pairs.
struct RowsPass {
    Args args;
    Order order;
};
RowsPass rows_pass(const Args& a, std::vector<index_t> rows, Control& ctl) {
    RowsPass r{a, Order{}};
    r.args.m = static_cast<index_t>(rows.size());
    r.order.queries = std::move(rows);
    r.order.start.assign(static_cast<std::size_t>((r.args.m + kRows - 1) / kRows), 0);
    ctl.set_total(ctl.total() + r.args.m * a.n);
    return r;
}

// Float distances (PackedRefs::single) are within (d + 2) 2^-24 of
// themselves (float differences, squares and sums), and so is each logit
// l = -scale s. An entry of log q above -30 has l within 30 + H of log Z
// (H <= log n, the row's entropy), so log q = l - log Z is off by up to
// (d + 2) 2^-24 (2 |log Z| + 30 + H): within the float32 tolerance (1e-4)
// while log Z >= 0, as always without exclude_self, but an isolated point's
// log Z can be -1e5. Rows whose log Z lies below drift_floor(d), where the
// 2 |log Z| part passes 2e-5, are redone with double distances.
double drift_floor(index_t d) { return -1e-5 / (static_cast<double>(d + 2) * 0x1p-24); }

// Separate queries on float distances: those whose log Z (lnz, by query
// row) is below drift_floor, as a one-sided pass over just them to redo
// in double, or nothing when there are none.
template <class V>
std::optional<RowsPass> drifting_queries(const Args& a, const V* lnz, Control& ctl) {
    std::vector<index_t> rows;
    for (index_t i = 0; i < a.m; ++i)
        if (static_cast<double>(lnz[i]) < drift_floor(a.d)) rows.push_back(i);
    if (rows.empty()) return std::nullopt;
    return rows_pass(a, std::move(rows), ctl);
}

// Double tiles of the references (packed in `perm`, or in input order), for
// rows redone with double distances; tile 0 takes the default length.
template <class T>
PackedRefs double_pack(const Args& a, index_t tile, const std::vector<index_t>* perm) {
    return pack(static_cast<const T*>(a.x), a.n, a.d, tile, a.threads, /*single=*/false,
                perm ? perm->data() : nullptr);
}

// out[refs[i]] = log(total[i]), total[i] the sum of the exponentials of
// packed row i (refs: order->refs, or the identity). Terms below exp's range
// are flushed to 0 (float: e^-87, double: e^-708); a sum of at least
// n * 2^-100 (2^-960) leaves them below 2^-26 (2^-61) of it. Rows with a
// smaller sum (only possible with exclude_self) are redone with the
// streaming maximum, and so are the rows of float distances whose log Z is
// below drift_floor, with double distances (unless the caller redoes them
// whole: !redo_drift). Returns those (input rows, ascending): the other
// passes must redo their entries in double too.
template <class T>
std::vector<index_t> self_logs(const Args& a, const PackedRefs& p, const double* total, double* out, Control& ctl,
                               const Order* order, bool redo_drift = true) {
    const index_t n = a.n;
    const index_t* refs = order ? order->refs.data() : nullptr;
    const double floor = n * (std::is_same_v<T, float> ? std::ldexp(1.0, -100) : std::ldexp(1.0, -960));
    const double low = p.single && a.exclude_self ? drift_floor(a.d) : kNegInf;
    std::vector<index_t> drift, again_rows;
    for (index_t i = 0; i < n; ++i) {
        const index_t g = refs ? refs[i] : i;
        out[g] = std::log(total[i]);
        if (out[g] < low) drift.push_back(g);
        if (out[g] < low ? redo_drift : total[i] < floor) again_rows.push_back(g);
    }
    std::sort(drift.begin(), drift.end());
    if (again_rows.empty()) return drift;
    RowsPass r = rows_pass(a, std::move(again_rows), ctl);
    if (order) r.order.position = order->position;
    std::vector<double> again(static_cast<std::size_t>(r.args.m));
    if (drift.empty() || !redo_drift) {
        normalizer_into<T>(r.args, p, again.data(), ctl, &r.order);
    } else {
        normalizer_into<T>(r.args, double_pack<T>(a, 0, order ? &order->refs : nullptr), again.data(), ctl,
                           &r.order);
    }
    for (std::size_t i = 0; i < again.size(); ++i) out[r.order.queries[i]] = again[i];
    return drift;
}

// log-normalisers of the references as their own queries, in double, with
// each unordered pair's distance and exponential computed once: work unit
// (ta, tb), ta <= tb, takes the rows of tile ta against the columns of tile
// tb and adds exp(logit) to both the row's and the column's sum (to the
// row's only on the diagonal ta == tb, which meets both orders). No running
// maximum is needed: every logit is <= 0 and, with the self term, each row's
// maximum is exactly 0. Only with exclude_self can a row's sum be so small
// that terms were lost below the exponential's range; such rows (isolated
// points) are redone with the streaming maximum. With an order, p was
// packed in order->refs, xrows holds the points in that order, and out is
// still indexed by the input rows. Returns the rows redone for the float
// distances' sake (self_logs).
template <class T>
std::vector<index_t> self_normalizer(const Args& a, const PackedRefs& p, double* out, Control& ctl, const Order* order = nullptr,
                     const T* xrows = nullptr) {
    std::vector<double> sums(static_cast<std::size_t>(a.n), 0.0);  // by packed position
    const T* x = xrows ? xrows : static_cast<const T*>(a.x);
    over_tile_pairs<RowBlock>(
        p, a.threads, a.scale, exp_floor<T>(), ctl, [&] { return RowBlock(a.d, p.ld); },
        [&](RowBlock& b, index_t ta, index_t tb, index_t r0, index_t rows) {
            double* colsum = ta == tb ? nullptr : sums.data() + tb * p.tb;
            if constexpr (std::is_same_v<T, float>) {
                // float distances: the fused leaf, the rows read in place (x
                // is in packed order), a dropped self term left out there
                if (p.single) {
                    direct_exp_sums(p.ftile(tb), p.ld, a.d, x + r0 * a.d, rows, p.len(tb), a.scale,
                                    sums.data() + r0, colsum, nullptr, nullptr,
                                    a.exclude_self && ta == tb ? r0 - tb * p.tb : -1);
                    return;
                }
            }
            b.load(x, r0, rows, a.d, p.shift(), nullptr, nullptr);
            if (!p.single && !p.expand) {
                // float64 distances by differences: the double fused leaf
                direct_exp_sums(p.tile(tb), p.ld, a.d, b.y.data(), rows, p.len(tb), a.scale, sums.data() + r0,
                                colsum, a.exclude_self && ta == tb ? r0 - tb * p.tb : -1);
                return;
            }
            tile_logits(p, b, rows, tb, a.scale, self_term(a, ta == tb), /*with_max=*/false);
            exp_sums(b.logits.data(), p.ld, rows, p.len(tb), sums.data() + r0, colsum, T{});
        });
    return self_logs<T>(a, p, sums.data(), out, ctl, order);
}

}  // namespace

index_t default_tile(index_t n, index_t d, bool single) {
    // Keep a packed tile (d * tb doubles) within about 16 KiB, half of L1, for the
    // direct path; the expansion path streams longer rows from L2. Float
    // tiles (single) measured fastest at 512 to 1024 columns for every d up
    // to kDirectMaxFeatures (fewer row reductions per pair).
    index_t tb = d > kDirectMaxFeatures ? 128
                 : single               ? (d <= 8 ? 1024 : 512)
                                        : std::max<index_t>(64, 2048 / std::max<index_t>(d, 1));
    tb = std::min<index_t>(tb, kMaxTile);
    tb = (tb + kTileAlign - 1) / kTileAlign * kTileAlign;
    // Small problems: no tile longer than the data (rounded to the stride).
    const index_t nr = (n + kTileAlign - 1) / kTileAlign * kTileAlign;
    return std::max<index_t>(kTileAlign, std::min(tb, nr));
}

namespace {
// The references for the symmetric passes, packed in the locality order
// when that lets at least a quarter of the tile pairs be left out whole
// (their every exponential 0): nearby points then share tiles. Otherwise in
// the input order (measured faster when few pairs are left out), with
// order.refs and order.position the identity. The sort is only tried when
// the data's diameter is more than twice the distance beyond which every
// exponential is 0; with always_sort, in the locality order whatever the
// data. With the default tile, at least `per_thread` tiles per thread (so
// that pairs sharing no tile keep every thread busy in small problems) and
// at most `longest` columns.
template <class T>
struct SortedRefs {
    Order order;
    PackedRefs p;
    std::vector<T> copy;   // the points in order.refs, when sorted
    const T* x = nullptr;  // the points in packed order
    bool sorted() const { return !copy.empty(); }
};

template <class T>
SortedRefs<T> sorted_refs(const Args& given, bool always_sort = false, index_t per_thread = 4,
                          index_t longest = kMaxTile) {
    Args a = given;
    const bool single = float_distances<T>(a);
    if (a.tile == 0) {
        const index_t most = (a.n + per_thread * a.threads - 1) / (per_thread * a.threads);
        a.tile = std::max<index_t>(2 * kTileAlign,
                                   std::min({default_tile(a.n, a.d, single), longest,
                                             (most + kTileAlign - 1) / kTileAlign * kTileAlign}));
    }
    const T* x = static_cast<const T*>(a.x);
    std::vector<double> lo, hi;
    feature_ranges(x, a.n, a.d, lo, hi);
    double diam2 = 0.0;
    for (std::size_t k = 0; k < lo.size(); ++k) diam2 += (hi[k] - lo[k]) * (hi[k] - lo[k]);
    const double reach2 = -exp_floor<T>() / a.scale;  // squared distance beyond which exp(logit) = 0
    SortedRefs<T> s;
    s.x = x;
    if (always_sort || diam2 > 4.0 * reach2) {
        s.order = locality_order<T>(a, tile_length(a.n, a.d, a.tile, single), /*with_queries=*/false);
        s.p = pack(x, a.n, a.d, a.tile, a.threads, single, s.order.refs.data());
        add_boxes(s.p);
        const index_t nt = s.p.ntiles;
        index_t apart = 0;
        for (index_t ta = 0; !always_sort && ta < nt; ++ta)
            for (index_t tb = ta + 1; tb < nt; ++tb) apart += tiles_apart(s.p, ta, tb, a.scale, exp_floor<T>());
        if (always_sort || 4 * apart >= nt * (nt + 1) / 2) {
            s.copy.resize(static_cast<std::size_t>(a.n * a.d));
            for (index_t i = 0; i < a.n; ++i)
                std::copy_n(x + s.order.refs[static_cast<std::size_t>(i)] * a.d, a.d, s.copy.data() + i * a.d);
            s.x = s.copy.data();
            return s;
        }
    }
    s.order.refs.resize(static_cast<std::size_t>(a.n));
    for (index_t i = 0; i < a.n; ++i) s.order.refs[static_cast<std::size_t>(i)] = i;
    s.order.position = s.order.refs;
    s.p = pack(x, a.n, a.d, a.tile, a.threads, single, nullptr);
    add_boxes(s.p);
    return s;
}
}  // namespace

template <class T>
void log_normalizer(const Args& a, T* out, Control& ctl) {
    ctl.set_total(a.m * a.n);
    if (!self_queries(a)) {
        const PackedRefs p = pack(static_cast<const T*>(a.x), a.n, a.d, a.tile, a.threads, float_distances<T>(a));
        normalizer_into<T>(a, p, out, ctl);
        if (!p.single) return;
        // float distances: queries far from every reference (drift_floor)
        // again, in double
        const std::optional<RowsPass> r = drifting_queries(a, out, ctl);
        if (!r) return;
        std::vector<double> again(r->order.queries.size());
        normalizer_into<T>(r->args, double_pack<T>(a, 0, nullptr), again.data(), ctl, &r->order);
        for (std::size_t i = 0; i < again.size(); ++i) out[r->order.queries[i]] = static_cast<T>(again[i]);
        return;
    }
    const SortedRefs<T> s = sorted_refs<T>(a);
    std::vector<double> ln(static_cast<std::size_t>(a.n));
    self_normalizer<T>(a, s.p, ln.data(), ctl, &s.order, s.x);
    for (index_t i = 0; i < a.n; ++i) out[i] = static_cast<T>(ln[static_cast<std::size_t>(i)]);
}

namespace {
template <class T>
struct DenseState : NormState<T> {
    std::vector<double> shift;  // kRows * ntiles: the max each tile was stored against
    DenseState(index_t d, index_t ld, index_t ntiles) : NormState<T>(d, ld), shift(kRows * ntiles) {}
};
}  // namespace

template <class T>
void log_posterior(const Args& a, T* out, Control& ctl) {
    ctl.set_total(a.m * a.n);
    if (self_queries(a)) {
        // The normalisers first (each pair once), then every entry is
        // written once, final, as its logit minus the row's normaliser; the
        // writing pass takes the references in input order, as the
        // normalisers did unless they were sorted.
        ctl.set_total(2 * a.m * a.n);
        std::vector<double> ln(static_cast<std::size_t>(a.n));
        SortedRefs<T> s = sorted_refs<T>(a);
        const std::vector<index_t> drift = self_normalizer<T>(a, s.p, ln.data(), ctl, &s.order, s.x);
        const PackedRefs p = s.sorted() ? pack(static_cast<const T*>(a.x), a.n, a.d, a.tile, a.threads, s.p.single)
                                        : std::move(s.p);
        // the rows of order->queries (all rows without), p in input order
        const auto write_rows = [&](const Args& b, const PackedRefs& q, const Order* order) {
            over_query_blocks<T, NormState<T>>(
                b, q, ctl, [&] { return NormState<T>(b.d, q.ld); },
                [&](NormState<T>& s, index_t, index_t rows, index_t t) {
                    for (index_t r = 0; r < rows; ++r) {
                        const index_t g = s.block.orig[r];
                        store_shifted(s.block.logits.data() + r * q.ld, q.len(t), ln[static_cast<std::size_t>(g)],
                                      out + g * b.n + t * q.tb);
                    }
                },
                [](NormState<T>&, index_t, index_t) {}, order);
        };
        write_rows(a, p, nullptr);
        if (drift.empty()) return;
        // rows of float distances too coarse for their log Z: again, in double
        const RowsPass r = rows_pass(a, drift, ctl);
        write_rows(r.args, double_pack<T>(a, 0, nullptr), &r.order);
        return;
    }
    const PackedRefs p = pack(static_cast<const T*>(a.x), a.n, a.d, a.tile, a.threads, float_distances<T>(a));
    // Each tile is stored relative to the row's running max at that time;
    // the exact normaliser is folded in once the row is complete, in double.
    // The rows of order->queries (all rows without), q in input order; each
    // row's log Z goes to ln.
    std::vector<double> ln(static_cast<std::size_t>(a.m));
    const auto dense_rows = [&](const Args& b, const PackedRefs& q, const Order* order) {
        over_query_blocks<T, DenseState<T>>(
            b, q, ctl, [&] { return DenseState<T>(b.d, q.ld, q.ntiles); },
            [&](DenseState<T>& s, index_t, index_t rows, index_t t) {
                for (index_t r = 0; r < rows; ++r) {
                    const double* v = s.block.logits.data() + r * q.ld;
                    s.lse[r].update(v, q.len(t), s.block.tmax[r]);
                    const double sh = s.lse[r].max == kNegInf ? 0.0 : s.lse[r].max;
                    s.shift[r * q.ntiles + t] = sh;
                    store_shifted(v, q.len(t), sh, out + s.block.orig[r] * b.n + t * q.tb);
                }
            },
            [&](DenseState<T>& s, index_t, index_t rows) {
                for (index_t r = 0; r < rows; ++r) {
                    const double lg = s.lse[r].value();
                    ln[static_cast<std::size_t>(s.block.orig[r])] = lg;
                    T* row = out + s.block.orig[r] * b.n;
                    for (index_t t = 0; t < q.ntiles; ++t)
                        add_offset(row + t * q.tb, q.len(t), s.shift[r * q.ntiles + t] - lg);
                }
            },
            order);
    };
    dense_rows(a, p, nullptr);
    if (!p.single) return;
    // float distances: queries far from every reference (drift_floor)
    // again, in double
    if (const std::optional<RowsPass> r = drifting_queries(a, ln.data(), ctl))
        dense_rows(r->args, double_pack<T>(a, 0, nullptr), &r->order);
}

namespace {
template <class T>
struct TopKState : NormState<T> {
    std::vector<TopK> heaps;  // the k best entries of each row
    std::vector<TopK> bound;  // the k best 16-column blocks of each row, by their maxima
    std::vector<double> maxima, cand;
    std::vector<std::int64_t> rank;  // of the kept blocks, best maximum first
    std::vector<std::size_t> order;
    TopKState(index_t d, index_t ld, index_t k)
        : NormState<T>(d, ld), heaps(kRows, TopK(k, 16)), bound(kRows, TopK(k, ld / 16 + 1, /*keep_ties=*/true)),
          maxima(ld / 16 + 1), cand(64) {}
    void reset(index_t rows) {
        NormState<T>::reset(rows);
        for (auto& h : heaps) h.reset();
        for (auto& h : bound) h.reset();
    }
};
}  // namespace

namespace {
// Top-k of the query rows order.queries (all of them, a.m), one-sided: the
// references packed in order.refs (p), each block of rows sweeping the tiles
// from order.start. Outputs are indexed by input row.
template <class T>
void one_sided_topk(const Args& a, const PackedRefs& p, const Order& order, index_t k, index_t* indices, T* log_prob,
                    T* log_norm, Control& ctl) {
    // One pass over the references streams the normaliser and keeps, per row,
    // the 16-column blocks whose maxima are among the k largest, ties at the
    // k-th value L included. L is a lower bound on the k-th best entry (k
    // distinct blocks reach it), and every entry at or above L sits in a block
    // whose maximum is >= L, so the k best (ties broken by index) all lie in
    // the kept blocks. Only those are recomputed, with the same arithmetic
    // and hence bit for bit the same values, and searched for the k best.
    const index_t per_tile = p.ld / 16;  // block ids: t * per_tile + column / 16
    const index_t* refs = order.refs.data();
    over_query_blocks<T, TopKState<T>>(
        a, p, ctl, [&] { return TopKState<T>(a.d, p.ld, k); },
        [&](TopKState<T>& s, index_t, index_t rows, index_t t) {
            for (index_t r = 0; r < rows; ++r) {
                const double* v = s.block.logits.data() + r * p.ld;
                s.lse[r].update(v, p.len(t), s.block.tmax[r]);
                // a tile whose maximum is below the bound's threshold has no
                // block that could enter; with the locality order most are
                if (s.block.tmax[r] < s.bound[r].threshold()) continue;
                const index_t nb = block_max16(v, p.len(t), s.maxima.data());
                s.bound[r].offer(s.maxima.data(), nb, t * per_tile);
            }
        },
        [&](TopKState<T>& s, index_t, index_t rows) {
            // Each row's candidate blocks, best maximum first, four per leaf
            // call; once the row's k-th best so far exceeds the next block's
            // maximum, no later block can contribute.
            for (index_t r = 0; r < rows; ++r) {
                TopK& best = s.heaps[r];
                TopK& bound = s.bound[r];
                best.seed(bound.kth_value());
                const std::size_t nb = bound.keep_best();
                s.rank.resize(nb);
                s.order.resize(nb);
                bound.rank_into(s.rank.data());
                for (std::size_t i = 0; i < nb; ++i) s.order[static_cast<std::size_t>(s.rank[i])] = i;
                const double* y = s.block.y.data() + r * a.d;
                const float* yf = s.block.yf.data() + r * a.d;
                for (std::size_t i0 = 0; i0 < nb; i0 += 4) {
                    const double *xt[4], *xn[4], *ys[4] = {y, y, y, y};
                    const float *xf[4], *ysf[4] = {yf, yf, yf, yf};
                    const double yn[4] = {s.block.ynorm[r], s.block.ynorm[r], s.block.ynorm[r], s.block.ynorm[r]};
                    index_t c0s[4], ts[4], n = 0;
                    for (; n < 4 && i0 + n < nb; ++n) {
                        const std::size_t e = s.order[i0 + n];
                        if (bound.value(e) < best.threshold()) break;
                        const index_t id = bound.index(e);
                        ts[n] = id / per_tile;
                        c0s[n] = (id % per_tile) * 16;
                        if (p.single) {
                            xf[n] = p.ftile(ts[n]) + c0s[n];
                        } else {
                            xt[n] = p.tile(ts[n]) + c0s[n];
                            xn[n] = p.expand ? p.norm(ts[n]) + c0s[n] : nullptr;
                        }
                    }
                    if (n == 0) break;
                    if (p.single) {
                        logits_visits(xf, p.ld, a.d, ysf, n, a.scale, s.cand.data());
                    } else {
                        logits_visits(xt, p.expand ? xn : nullptr, p.ld, a.d, ys, yn, n, a.scale, s.cand.data());
                    }
                    for (index_t i = 0; i < n; ++i) {
                        const index_t t = ts[i], c0 = c0s[i];
                        const index_t len = std::min<index_t>(16, p.len(t) - c0);
                        double* vals = s.cand.data() + 16 * i;
                        const index_t self = s.block.self[r] - t * p.tb - c0;
                        if (a.exclude_self && self >= 0 && self < len) vals[self] = kNegInf;
                        best.offer(vals, len, refs + t * p.tb + c0);
                    }
                    if (n < 4) break;
                }
            }
            for (index_t r = 0; r < rows; ++r) {
                const index_t g = s.block.orig[r];
                TopK& best = s.heaps[r];
                const double ln = s.lse[r].value();
                log_norm[g] = static_cast<T>(ln);
                const auto& sorted = best.sorted();
                for (index_t j = 0; j < k; ++j) {
                    const auto& e = sorted[static_cast<std::size_t>(j)];
                    indices[g * k + j] = e.second;
                    log_prob[g * k + j] = static_cast<T>(e.first - ln);
                }
            }
        },
        &order);
}

// Rows whose float distances are too coarse for their log Z (drift_floor),
// again, one-sided, with double distances. rows[i] is an input query row
// and near[i] the packed position (in ord.refs) of a reference near it,
// where its sweep starts; ord gives the references' order (refs, and
// position for exclude_self).
template <class T>
void redo_topk(const Args& a, index_t k, const std::vector<index_t>& rows, const std::vector<index_t>& near,
               const Order& ord, index_t* indices, T* log_prob, T* log_norm, Control& ctl) {
    if (rows.empty()) return;
    std::vector<std::pair<index_t, index_t>> by_near(rows.size());
    for (std::size_t i = 0; i < rows.size(); ++i) by_near[i] = {near[i], rows[i]};
    std::sort(by_near.begin(), by_near.end());
    std::vector<index_t> sorted(rows.size());
    for (std::size_t i = 0; i < rows.size(); ++i) sorted[i] = by_near[i].second;
    RowsPass r = rows_pass(a, std::move(sorted), ctl);
    r.order.refs = ord.refs;
    if (a.exclude_self) r.order.position = ord.position;
    const PackedRefs p = double_pack<T>(a, 0, &r.order.refs);
    for (std::size_t i = 0; i < by_near.size(); i += kRows) r.order.start[i / kRows] = by_near[i].first / p.tb;
    one_sided_topk<T>(r.args, p, r.order, k, indices, log_prob, log_norm, ctl);
}
}  // namespace

namespace {
// A float bound on the squared distances whose logit double(s) * -scale
// reaches thr: every such s is <= s_bound(thr, scale). The quotient -thr /
// scale is within a few 2^-53 of the largest such s; widened by 2^-20, its
// rounding to float (at most 2^-24 down) stays above it. The few entries
// between the two are offered and dropped by the exact comparison.
float s_bound(double thr, double scale) {
    if (!(thr > kNegInf)) return std::numeric_limits<float>::infinity();
    return static_cast<float>((-thr / scale) * (1.0 + 0x1p-20));
}

// The symmetric top-k's selection state is used while it takes at most
// this much memory; beyond it, the one-sided form runs.
constexpr double kSymmetricTopkBytes = 1024.0 * (1 << 20);

// Top-k with the queries the references themselves, each unordered pair's
// distance computed once. The references go in the locality order, and
// every row's selection (RowSelect) and sum of exponentials (as in
// self_normalizer) are live at once: tile pair (ta, tb) offers row i of ta
// the logits l_ij of tile tb's columns at or above i's threshold, and
// column j of tb the l_ij of ta's rows at or above j's. The pairs run on
// over_tile_rounds, so no row is touched by two threads at once and each
// row's sum is taken in the same order whatever the thread count; a row's
// first pair is its own tile's, which seeds its threshold. A pair is left
// out when its logits are all below the exponential's floor and every
// threshold of both tiles' rows.
template <class T>
void symmetric_topk(const Args& a, index_t k, index_t* indices, T* log_prob, T* log_norm, Control& ctl) {
    const index_t n = a.n;
    // Default tiles of at most 256 columns, so a row block's logits (16 x 256
    // doubles) stay in L1 through the sums and both scans (measured fastest,
    // D = 2 and 16), and at least 8 per thread.
    const SortedRefs<T> sr = sorted_refs<T>(a, /*always_sort=*/true, /*per_thread=*/8, /*longest=*/256);
    const PackedRefs& p = sr.p;
    const index_t nt = p.ntiles, ld = p.ld;
    std::vector<std::int32_t> refs(sr.order.refs.begin(), sr.order.refs.end());
    RowSelect sel(n, k);
    std::vector<double> sums(static_cast<std::size_t>(n), 0.0);
    struct Work {
        RowBlock block;
        RowSelect::Scratch scratch;
        std::vector<std::int32_t> pos;
        std::vector<double> copy, spare;  // a row's logits, for its seed
        std::vector<std::uint32_t> masks;
        std::vector<float> dist, smin, bound;  // float path: a block's squared distances, their bounds
    };
    const double* thr = sel.thresholds();
    // One block of rows r0 .. r0 + rows of tile ta against tile tb, its
    // values (logits, or float squared distances) already in view: each row
    // and, off the diagonal, each column offers its entries at or above its
    // threshold. The view gives a row's tile maximum (view.top(r)), an
    // entry's exact logit (view.logit(r, j)) and the two scans.
    const auto select_block = [&](Work& w, const auto& view, index_t r0, index_t rows, index_t tb, bool diag,
                                  double col_floor) {
        const index_t len = p.len(tb);
        const std::int32_t* cols = refs.data() + tb * p.tb;
        double top = kNegInf;
        for (index_t r = 0; r < rows; ++r) {
            top = std::max(top, view.top(r));
            if (view.top(r) < thr[r0 + r]) continue;
            if (diag && len >= k) {
                // The row's first pair, its own tile's (over_tile_rounds
                // runs the diagonal first): the k-th largest of its logits
                // here bounds its k-th best from below, so only the k best
                // of them (and ties) are offered.
                for (index_t j = 0; j < len; ++j) w.copy[static_cast<std::size_t>(j)] = view.logit(r, j);
                sel.seed(r0 + r, kth_largest(w.copy.data(), w.spare.data(), static_cast<std::size_t>(len),
                                             static_cast<std::size_t>(k - 1)));
            }
            const index_t found = view.scan_row(r, len, thr[r0 + r], w.pos.data());
            for (index_t i = 0; i < found; ++i) {
                const std::int32_t j = w.pos[static_cast<std::size_t>(i)];
                sel.offer(r0 + r, view.logit(r, j), cols[j], w.scratch);
            }
        }
        if (diag || top < col_floor) return;
        const index_t found = view.scan_cols(rows, len, thr + tb * p.tb, w.pos.data(), w.masks.data());
        for (index_t i = 0; i < found; ++i) {
            const std::int32_t j = w.pos[static_cast<std::size_t>(i)];
            for (std::uint32_t m = w.masks[static_cast<std::size_t>(i)]; m; m &= m - 1) {
                const int r = __builtin_ctz(m);
                sel.offer(tb * p.tb + j, view.logit(r, j), refs[static_cast<std::size_t>(r0 + r)], w.scratch);
            }
        }
    };
    // The double logits of a block (RowBlock, row stride ld).
    struct LogitView {
        const double *v, *tmax;
        index_t ld;
        double top(index_t r) const { return tmax[r]; }
        double logit(index_t r, index_t j) const { return v[r * ld + j]; }
        index_t scan_row(index_t r, index_t len, double t, std::int32_t* out) const {
            return positions_at_least(v + r * ld, len, t, out);
        }
        index_t scan_cols(index_t rows, index_t len, const double* t, std::int32_t* cols, std::uint32_t* masks) const {
            return columns_at_least(v, ld, rows, len, t, cols, masks);
        }
    };
    // float32 data with float distances: the leaf keeps each pair's squared
    // distance s (its logit is double(s) * -scale, the value the other
    // path computes) and the scans compare s with each threshold's bound
    // (s_bound: every s whose logit reaches the threshold is at or below
    // it); the few entries found are offered with their exact logits, and
    // offer() drops those below the threshold. Half the bytes of double
    // logits, sixteen lanes per compare, and the same selection.
    struct DistView {
        const float *s, *smin;
        float* bound;  // room for a tile's column bounds
        index_t ld;
        double scale;
        double to_logit(float sq) const { return static_cast<double>(sq) * -scale; }
        double top(index_t r) const { return to_logit(smin[r]); }
        double logit(index_t r, index_t j) const { return to_logit(s[r * ld + j]); }
        index_t scan_row(index_t r, index_t len, double t, std::int32_t* out) const {
            return positions_at_most(s + r * ld, len, s_bound(t, scale), out);
        }
        index_t scan_cols(index_t rows, index_t len, const double* t, std::int32_t* cols, std::uint32_t* masks) const {
            for (index_t j = 0; j < len; ++j) bound[j] = s_bound(t[j], scale);
            return columns_at_most(s, ld, rows, len, bound, cols, masks);
        }
    };
    const auto visit = [&](Work& w, index_t ta, index_t tb) {
        const bool diag = ta == tb;
        const index_t len = p.len(tb);
        if (!diag) {
            const double bound = logit_bound(p, ta, tb, a.scale);
            if (bound < exp_floor<T>()) {
                double lowest = std::numeric_limits<double>::infinity();
                for (index_t i = ta * p.tb; i < ta * p.tb + p.len(ta); ++i) lowest = std::min(lowest, thr[i]);
                for (index_t i = tb * p.tb; i < tb * p.tb + len; ++i) lowest = std::min(lowest, thr[i]);
                if (bound < lowest) return;
            }
        }
        const index_t end = ta * p.tb + p.len(ta);
        // thresholds only rise: the lowest of tb's now stays a lower bound
        const double col_floor = *std::min_element(thr + tb * p.tb, thr + tb * p.tb + len);
        double* colsum = diag ? nullptr : sums.data() + tb * p.tb;
        for (index_t r0 = ta * p.tb; r0 < end; r0 += kRows) {
            const index_t rows = std::min(kRows, end - r0);
            if (!diag) {
                // the block alone, as the pair above
                const double bound = block_logit_bound(p, r0, tb, a.scale);
                if (bound < exp_floor<T>() && bound < col_floor &&
                    bound < *std::min_element(thr + r0, thr + r0 + rows))
                    continue;
            }
            if constexpr (std::is_same_v<T, float>) {
                if (p.single) {
                    // logits' sums and the float distances from one leaf,
                    // the rows read in place (sr.x is in packed order)
                    direct_exp_sums(p.ftile(tb), ld, a.d, sr.x + r0 * a.d, rows, len, a.scale, sums.data() + r0,
                                    colsum, w.dist.data(), w.smin.data(),
                                    a.exclude_self && diag ? r0 - tb * p.tb : -1);
                    select_block(w, DistView{w.dist.data(), w.smin.data(), w.bound.data(), ld, a.scale}, r0, rows,
                                 tb, diag, col_floor);
                    continue;
                }
            }
            w.block.load(sr.x, r0, rows, a.d, p.shift(), nullptr, nullptr);
            tile_logits(p, w.block, rows, tb, a.scale, self_term(a, diag));
            exp_sums(w.block.logits.data(), ld, rows, len, sums.data() + r0, colsum, T{});
            select_block(w, LogitView{w.block.logits.data(), w.block.tmax.data(), ld}, r0, rows, tb, diag, col_floor);
        }
    };
    over_tile_rounds<Work>(
        nt, a.threads, ctl,
        [&] {
            return Work{RowBlock(a.d, ld),
                        RowSelect::Scratch(k),
                        std::vector<std::int32_t>(ld),
                        std::vector<double>(ld),
                        std::vector<double>(ld),
                        std::vector<std::uint32_t>(ld),
                        std::vector<float>(static_cast<std::size_t>(kRows * ld)),
                        std::vector<float>(kRows),
                        std::vector<float>(ld)};
        },
        visit, [&](index_t ta, index_t tb) { return pair_units(p, ta, tb); });
    std::vector<double> ln(static_cast<std::size_t>(n));
    // (rows redone for their float distances are redone whole below)
    const std::vector<index_t> drift = self_logs<T>(a, p, sums.data(), ln.data(), ctl, &sr.order, false);
    // Each row's best k, best first; fewer than k only if fewer finite
    // logits exist (the rest: index -1, log q = -inf).
    struct Out {
        RowSelect::Scratch scratch;
        std::vector<std::int64_t> ids;  // one row's result
        std::vector<double> vals;
    };
    parallel_blocks<Out>(
        (n + kRows - 1) / kRows, a.threads, ctl,
        [&] { return Out{RowSelect::Scratch(k), std::vector<std::int64_t>(k), std::vector<double>(k)}; },
        [&](Out& o, index_t blk) {
            const std::int64_t* ids = o.ids.data();
            const double* vals = o.vals.data();
            for (index_t i = blk * kRows; i < std::min(n, (blk + 1) * kRows); ++i) {
                const std::size_t got = sel.best(i, o.scratch, o.ids.data(), o.vals.data());
                const index_t g = sr.order.refs[static_cast<std::size_t>(i)];
                const double lg = ln[static_cast<std::size_t>(g)];
                log_norm[g] = static_cast<T>(lg);
                for (std::size_t j = 0; j < static_cast<std::size_t>(k); ++j) {
                    indices[g * k + static_cast<index_t>(j)] = j < got ? ids[j] : -1;
                    log_prob[g * k + static_cast<index_t>(j)] = static_cast<T>(j < got ? vals[j] - lg : kNegInf);
                }
            }
        },
        [](index_t) { return index_t{0}; });
    // rows of float distances too coarse for their log Z: again, in double
    std::vector<index_t> near(drift.size());
    for (std::size_t i = 0; i < drift.size(); ++i) near[i] = sr.order.position[static_cast<std::size_t>(drift[i])];
    redo_topk<T>(a, k, drift, near, sr.order, indices, log_prob, log_norm, ctl);
}
}  // namespace

template <class T>
void topk(const Args& a, index_t k, index_t* indices, T* log_prob, T* log_norm, Control& ctl) {
    ctl.set_total(a.m * a.n);
    if (self_queries(a) && a.n < (index_t{1} << 31) && RowSelect::bytes(a.n, k) <= kSymmetricTopkBytes)
        return symmetric_topk<T>(a, k, indices, log_prob, log_norm, ctl);
    // Queries other than the references (or a selection state over
    // kSymmetricTopkBytes) take the one-sided form.
    const bool single = float_distances<T>(a);
    const Order order = locality_order<T>(a, tile_length(a.n, a.d, a.tile, single));
    const PackedRefs p = pack(static_cast<const T*>(a.x), a.n, a.d, a.tile, a.threads, single, order.refs.data());
    one_sided_topk<T>(a, p, order, k, indices, log_prob, log_norm, ctl);
    if (!single) return;
    // float distances: rows whose log Z is too low for them (a query far
    // from every reference, or an isolated point with exclude_self), each
    // starting where its block did
    std::vector<index_t> rows, near;
    for (std::size_t i = 0; i < order.queries.size(); ++i) {
        const index_t g = order.queries[i];
        if (!(static_cast<double>(log_norm[g]) < drift_floor(a.d))) continue;
        rows.push_back(g);
        near.push_back(order.start[i / kRows] * p.tb);
    }
    redo_topk<T>(a, k, rows, near, order, indices, log_prob, log_norm, ctl);
}

namespace {
// Target sums of every reference, accumulated in `tot`: ntiles * dw * ld
// doubles, tile t's block holding dw = d + 2 feature-major rows of ld: the
// weight W (row 0), the first moment sum_i q_ij y_i (rows 1 .. d) and
// sum_i q_ij ||y_i||^2 (row d + 1), all in the packed (possibly shifted)
// coordinates.

// One-sided: the query rows `rows` (input rows) against each reference
// tile in turn (p packed in order.refs), q_ij = exp(l_ij - lnorm_i)
// computed directly. One reference tile per unit of work, so each thread
// owns the part of tot it writes.
template <class T>
void one_sided_targets(const Args& a, const PackedRefs& p, const Order& order, const double* lnorm,
                       const std::vector<index_t>& rows, double* tot, Control& ctl) {
    const index_t d = a.d, dw = d + 2, m = static_cast<index_t>(rows.size());
    std::vector<double> ln(static_cast<std::size_t>(m));
    for (index_t i = 0; i < m; ++i) ln[static_cast<std::size_t>(i)] = lnorm[rows[static_cast<std::size_t>(i)]];
    const T* x = static_cast<const T*>(a.x);
    parallel_blocks<RowBlock>(
        p.ntiles, a.threads, ctl, [&] { return RowBlock(d, p.ld); },
        [&](RowBlock& b, index_t t) {
            double* acc = tot + t * dw * p.ld;
            for (index_t r0 = 0; r0 < m; r0 += kRows) {
                const index_t nr = std::min(kRows, m - r0);
                b.load(x, r0, nr, d, p.shift(), rows.data(), order.position.data());
                tile_logits(p, b, nr, t, a.scale, self_term(a, true), /*with_max=*/false);
                accumulate_targets(b.logits.data(), p.ld, ln.data() + r0, b.y.data(), b.ynorm.data(), nr, d, acc,
                                   acc + p.ld, acc + (d + 1) * p.ld, T{});
            }
        },
        [&](index_t t) { return p.len(t) * m; });
}

// Symmetric: each unordered pair's distance and exponential e_ij = exp(l_ij)
// once, with q_ij = e_ij / Z_i: the pair adds e_ij u_i to reference j's sums
// and e_ij u_j to reference i's, where u_i = (1, y_i, ||y_i||^2) / Z_i.
// Tile pairs on over_tile_pairs, adding straight into tot.
//
// A term is lost here where e_ij falls under the exponential's floor
// (e^-87 in float, e^-708 in double), i.e. where q_ij < e^floor / Z_i. Rows
// join while log Z_i >= -targets_margin<T> (always when log Z_i >= 0, as
// without exclude_self), so what is lost stays under e^-47 in float and
// e^-308 in double, and while u_i stays far inside T's range (|u_i| <=
// 2^100 in float, 2^900 in double); on float distances also while log Z_i
// >= drift_floor (below it the logits' float error reaches q, see
// drift_floor). Other rows are returned in `rest`, with u_i = 0: their
// terms are left to one_sided_targets. At the "nn" bandwidth with
// exclude_self most rows have log Z_i < 0 (59% on fold), which all went
// one-sided, unpruned, when rows joined only from log Z_i >= 0. p is
// packed in order.refs (xrows: the points in that order); lnorm and rest
// are by input row, u and tot by packed position.
template <class T>
constexpr double targets_margin() {
    return std::is_same_v<T, float> ? 40.0 : 400.0;
}

template <class T>
void symmetric_targets(const Args& a, const PackedRefs& p, const Order& order, const T* xrows, const double* lnorm,
                       double* tot, std::vector<index_t>& rest, Control& ctl) {
    const index_t n = a.n, d = a.d, dw = d + 2, nt = p.ntiles, ld = p.ld, per = dw * ld;
    const T* x = static_cast<const T*>(a.x);
    const double* c = p.shift();
    // the weight vectors and products in T (see pair_targets), the sums in double
    std::vector<T> u(static_cast<std::size_t>(n * dw), T(0)), ut(static_cast<std::size_t>(nt * per), T(0));
    const bool single = std::is_same_v<T, float>;
    const double lowest = std::max(-targets_margin<T>(), p.single ? drift_floor(d) : kNegInf);
    const double largest = single ? 0x1p100 : 0x1p900;
    for (index_t i = 0; i < n; ++i) {
        const index_t g = order.refs[static_cast<std::size_t>(i)];
        const double w = std::exp(-lnorm[g]);
        double sq = 0.0;
        for (index_t k = 0; k < d; ++k) {
            const double v = static_cast<double>(x[g * d + k]) - (c ? c[k] : 0.0);
            sq += v * v;
        }
        if (!(lnorm[g] >= lowest) || !(w * (1.0 + sq) <= largest)) {
            rest.push_back(g);
            continue;
        }
        T* ui = u.data() + i * dw;
        for (index_t k = 0; k < d; ++k)
            ui[1 + k] = static_cast<T>(w * (static_cast<double>(x[g * d + k]) - (c ? c[k] : 0.0)));
        ui[0] = static_cast<T>(w);
        ui[d + 1] = static_cast<T>(w * sq);
        T* col = ut.data() + (i / p.tb) * per + i % p.tb;
        for (index_t k = 0; k < dw; ++k) col[k * ld] = ui[k];
    }
    struct State {
        RowBlock block;
        std::vector<T> q;
    };
    over_tile_pairs<State>(
        p, a.threads, a.scale, exp_floor<T>(), ctl,
        [&] { return State{RowBlock(d, ld), std::vector<T>(static_cast<std::size_t>(kTargetRows * (ld + 16)))}; },
        [&](State& s, index_t ta, index_t tb, index_t r0, index_t rows) {
            double* cols = tot + tb * per;
            double* rows_acc = ta == tb ? nullptr : tot + ta * per + (r0 - ta * p.tb);
            if constexpr (std::is_same_v<T, float>) {
                if (p.single) {
                    // float distances: q straight from them (fused leaf), the
                    // rows read in place (xrows is in packed order); a dropped
                    // self term is a zero q
                    const index_t qld = ld + 16;
                    direct_exp(p.ftile(tb), ld, d, xrows + r0 * d, rows, a.scale, s.q.data(), qld);
                    if (a.exclude_self && ta == tb)
                        for (index_t r = 0; r < rows; ++r)
                            s.q[static_cast<std::size_t>(r * qld + r0 + r - tb * p.tb)] = 0.0f;
                    pair_targets(s.q.data(), qld, ld, rows, u.data() + r0 * dw, ut.data() + tb * per, dw, cols,
                                 rows_acc);
                    return;
                }
            }
            s.block.load(xrows, r0, rows, d, c, nullptr, nullptr);
            tile_logits(p, s.block, rows, tb, a.scale, self_term(a, ta == tb), /*with_max=*/false);
            pair_targets(s.block.logits.data(), ld, rows, u.data() + r0 * dw, ut.data() + tb * per, dw, cols,
                         rows_acc, s.q.data());
        });
}
}  // namespace

template <class T>
void targets(const Args& a, double* w, double* s1, double* s2, Control& ctl) {
    const index_t n = a.n, d = a.d, dw = d + 2;
    ctl.set_total(2 * n * n);
    // Default tiles of at most 512 columns: the second pass's per-tile
    // weights (d + 2 rows of a tile) and exponentials then stay in L1
    // (one thread, N = 20 000: 183 against 190 ms at D = 2, 329 against
    // 360 ms at D = 8 with 1024; the normaliser does not mind).
    const SortedRefs<T> sr = sorted_refs<T>(a, /*always_sort=*/false, /*per_thread=*/4, /*longest=*/512);
    const PackedRefs& p = sr.p;
    // Pass 1: exact log-normaliser of every row (by input row), in double.
    std::vector<double> lnorm(static_cast<std::size_t>(n));
    const std::vector<index_t> drift = self_normalizer<T>(a, p, lnorm.data(), ctl, &sr.order, sr.x);
    // Pass 2: the sums, each pair once, and the rows left over one-sided
    // (log Z far below 0, see symmetric_targets), with double distances if
    // any of them needs them (drift_floor: they are among the rest).
    std::vector<double> tot(static_cast<std::size_t>(p.ntiles * dw * p.ld), 0.0);
    std::vector<index_t> rest;
    symmetric_targets<T>(a, p, sr.order, sr.x, lnorm.data(), tot.data(), rest, ctl);
    if (!rest.empty()) {
        ctl.set_total(ctl.total() + static_cast<index_t>(rest.size()) * n);
        if (drift.empty()) {
            one_sided_targets<T>(a, p, sr.order, lnorm.data(), rest, tot.data(), ctl);
        } else {
            // the same tiles (tot's layout), in double
            one_sided_targets<T>(a, double_pack<T>(a, p.tb, &sr.order.refs), sr.order, lnorm.data(), rest,
                                 tot.data(), ctl);
        }
    }
    // Back from shifted coordinates (x = x~ + c) when the tiles were shifted.
    const double* c = p.shift();
    double cc = 0.0;
    for (index_t k = 0; c && k < d; ++k) cc += c[k] * c[k];
    for (index_t t = 0; t < p.ntiles; ++t) {
        const double* acc = tot.data() + t * dw * p.ld;
        for (index_t j = 0; j < p.len(t); ++j) {
            const index_t g = sr.order.refs[static_cast<std::size_t>(t * p.tb + j)];
            const double wj = acc[j];
            double dot = 0.0;
            for (index_t k = 0; k < d; ++k) {
                const double m = acc[(1 + k) * p.ld + j];
                s1[g * d + k] = c ? m + wj * c[k] : m;
                if (c) dot += m * c[k];
            }
            w[g] = wj;
            const double sq = acc[(d + 1) * p.ld + j];
            s2[g] = c ? sq + 2.0 * dot + wj * cc : sq;
        }
    }
}

bool have_openmp() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
}

int openmp_version() {
#ifdef _OPENMP
    return _OPENMP;
#else
    return 0;
#endif
}

int max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

#define MAPA_INSTANTIATE(T)                                                                  \
    template void log_normalizer<T>(const Args&, T*, Control&);                             \
    template void log_posterior<T>(const Args&, T*, Control&);                              \
    template void topk<T>(const Args&, index_t, index_t*, T*, T*, Control&);                \
    template void targets<T>(const Args&, double*, double*, double*, Control&);

MAPA_INSTANTIATE(float)
MAPA_INSTANTIATE(double)

}  // namespace mapa
