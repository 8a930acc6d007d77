#include "tiles.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

// v8d values passed between always-inline helpers (and exp.hpp's vector
// forms) never cross a real call, so the note that their ABI differs
// between clones does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

#include "exp.hpp"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(MAPA_NO_CLONES)
#define MAPA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define MAPA_HAVE_CLONES 1
#else
#define MAPA_CLONES
#define MAPA_HAVE_CLONES 0
#endif

namespace mapa {

// Eight doubles: one AVX-512 register, two AVX2 or four SSE2 registers,
// depending on the clone the compiler is building.
typedef double v8d __attribute__((vector_size(64)));
typedef std::int64_t v8l64 __attribute__((vector_size(64)));

[[gnu::always_inline]] static inline v8d load8(const double* p) {
    v8d v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
[[gnu::always_inline]] static inline void store8(double* p, v8d v) { std::memcpy(p, &v, sizeof v); }

// Sixteen floats: the single-precision counterpart of v8d.
typedef float v16f __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));

[[gnu::always_inline]] static inline v16f load16(const float* p) {
    v16f v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

// The low and high eight lanes of x, widened to double.
[[gnu::always_inline]] static inline void widen(v16f x, v8d& lo, v8d& hi) {
    v8f a, b;
    std::memcpy(&a, &x, sizeof a);
    std::memcpy(&b, reinterpret_cast<const char*>(&x) + sizeof a, sizeof b);
    lo = __builtin_convertvector(a, v8d);
    hi = __builtin_convertvector(b, v8d);
}

// Whether the 64-byte vectors above are native registers: where the
// x86-64-v4 (AVX-512) clone runs. Elsewhere GCC gives them no register mode
// and keeps every such variable on the stack (the AVX2 clone ran its dot
// products 5-16x slower than numba), so the loops over the features below
// work on 32-byte pieces there. Either way each lane sees the same
// operations in the same order: the results are the same, bit for bit.
typedef double v4d __attribute__((vector_size(32)));

// Whether the loader picks the x86-64-v4 clone on this CPU: the clone
// resolver's own test (selected_isa reports it too).
static bool v4_clone() {
#if MAPA_HAVE_CLONES
    __builtin_cpu_init();  // this runs among static initialisers
    return __builtin_cpu_supports("x86-64-v4");
#else
    return false;
#endif
}
static const bool kWideVectors = v4_clone();

// f applied to the two 32-byte halves of the 64-byte vector x.
template <class H, class W, class F>
[[gnu::always_inline]] static inline W by_halves(W x, F f) {
    H h[2];
    std::memcpy(h, &x, sizeof h);
    h[0] = f(h[0]);
    h[1] = f(h[1]);
    std::memcpy(&x, h, sizeof h);
    return x;
}

// Pointers to rows r0 .. r0 + 3 of y (row stride `stride`) for a four-row
// block of which nr >= 1 rows exist; missing rows repeat the last one, and
// their results are not stored.
template <class E>
[[gnu::always_inline]] static inline void four_rows(const E* y, index_t stride, index_t r0, index_t nr,
                                                    const E* (&rows)[4]) {
    for (index_t i = 0; i < 4; ++i) rows[i] = y + (r0 + (i < nr ? i : nr - 1)) * stride;
}

// The first four of the n >= 1 pointers v, missing ones repeating the last.
template <class E>
[[gnu::always_inline]] static inline void four_visits(const E* const* v, index_t n, const E* (&out)[4]) {
    for (index_t i = 0; i < 4; ++i) out[i] = v[i < n ? i : n - 1];
}

// For R rows ys[r] against 16 columns of a tile with row stride ld, sums over
// the d features of squared differences (Expand false) or of products
// (Expand true): acc[r][h] holds columns 8h .. 8h + 7. Row r's columns start
// at xs[r], or at xs[0] for every row when Shared (one load serves all rows).
// The block-of-four leaves and the (row, block) visits both go through here,
// so every logit is accumulated the same way, bit for bit.
template <class H, int R, bool Expand, bool Shared>
[[gnu::always_inline]] static inline void column_sums_in(const double* const* xs, index_t ld, index_t d,
                                                         const double* const* ys, v8d (&acc)[R][2]) {
    // local accumulators, indexed only by unrolled constants: kept in registers
    constexpr int P = 2 * sizeof(v8d) / sizeof(H);  // pieces of 16 columns
    H a[R][P];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int q = 0; q < P; ++q) a[r][q] = H{};
    for (index_t k = 0; k < d; ++k) {
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
            H x[P];
            std::memcpy(x, xs[Shared ? 0 : r] + k * ld, sizeof x);
            const double yk = ys[r][k];
#pragma GCC unroll 4
            for (int q = 0; q < P; ++q) {
                if constexpr (Expand) {
                    a[r][q] += yk * x[q];
                } else {
                    const H e = x[q] - yk;
                    a[r][q] += e * e;
                }
            }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) std::memcpy(acc[r], a[r], sizeof acc[r]);
}

template <int R, bool Expand, bool Shared>
[[gnu::always_inline]] static inline void column_sums(const double* const* xs, index_t ld, index_t d,
                                                      const double* const* ys, v8d (&acc)[R][2]) {
    if (kWideVectors) {
        column_sums_in<v8d, R, Expand, Shared>(xs, ld, d, ys, acc);
    } else {
        column_sums_in<v4d, R, Expand, Shared>(xs, ld, d, ys, acc);
    }
}

// The expansion ||y||^2 + ||x||^2 - 2 y.x rounds relative to the norms, not
// to the distance: its error, up to about (d + 3) 2^-53 (||y||^2 + ||x||^2),
// swamps the distance of two close points far from the mean (clusters of
// width 1.3e-4, about 38 from the mean in 81 dimensions, at h = 1.4e-4 moved log Z
// by 5e-5). A column is recomputed by explicit differences, as
// logits_direct sums them, where its distance is under kRefineShare of
// ||y||^2 + ||x||^2 (so that the expansion's bound would exceed 8 (d + 3) /
// (d + 1) times explicit differences' own, relative, one) and that bound,
// scaled, exceeds 2^-46 in the logit: ||y||^2 + ||x||^2 > refine_floor(..).
// Other columns' logits then carry at most 8 times the relative error of
// explicit differences, or 2^-46 absolute.
constexpr double kRefineShare = 0.125;

static inline double refine_floor(double scale, index_t d) { return 0x1p7 / (scale * static_cast<double>(d + 3)); }

// Whether any lane of the masks is set.
[[gnu::always_inline]] static inline bool any_lane(v8l64 m) {
    std::int64_t a = 0;
    for (int i = 0; i < 8; ++i) a |= m[i];
    return a != 0;
}

// -scale * max(0, ||y||^2 + ||x||^2 - 2 y.x) for n <= 4 rows ys[r] (norm
// yn[r]) against 16 columns each (from xs[r] with norms xn[r], or xs[0] and
// xn[0] for all when Shared; row stride ld), from their dot products
// acc[r], stored at o[r]. The columns the rule above picks are recomputed
// by explicit differences, all n rows in one pass: its eight accumulator
// chains run side by side, so a block costs one pass whether one row needs
// it or four.
template <int R, bool Shared>
[[gnu::always_inline]] static inline void expand_store(const v8d (&acc)[R][2], const double (&yn)[R],
                                                       const v8d (*xn)[2], index_t n, double scale,
                                                       double refine_above, const double* const* xs, index_t ld,
                                                       index_t d, const double* const* ys, double* const (&o)[R]) {
    v8d dist[R][2];
    v8l64 mask[R][2], any = {};
    for (index_t r = 0; r < R; ++r) {
        for (int h = 0; h < 2; ++h) {
            const v8d s = yn[r] + xn[Shared ? 0 : r][h];
            const v8d e = s - 2.0 * acc[r][h];
            dist[r][h] = e > 0.0 ? e : 0.0;
            mask[r][h] = (s > refine_above) & (dist[r][h] < kRefineShare * s);
            if (r < n) any |= mask[r][h];
        }
    }
    if (any_lane(any)) [[unlikely]] {
        v8d e[R][2];
        column_sums<R, false, Shared>(xs, ld, d, ys, e);
        for (index_t r = 0; r < n; ++r)
            for (int h = 0; h < 2; ++h) dist[r][h] = mask[r][h] ? e[r][h] : dist[r][h];
    }
    for (index_t r = 0; r < n; ++r) {
        store8(o[r], dist[r][0] * -scale);
        store8(o[r] + 8, dist[r][1] * -scale);
    }
}

// top = max(top, v[0], .., v[N - 1]), where v[i] holds columns j0 + 8i ..
// j0 + 8i + 7 and columns >= len (padding) do not count.
template <int N>
[[gnu::always_inline]] static inline void fold_max(v8d& top, v8d (&v)[N], index_t j0, index_t len) {
    constexpr double kNegInf = -std::numeric_limits<double>::infinity();
    const v8d lane = {0, 1, 2, 3, 4, 5, 6, 7};
    if (j0 + 8 * N > len) {
        for (int i = 0; i < N; ++i)
            v[i] = lane + static_cast<double>(j0 + 8 * i) < static_cast<double>(len) ? v[i] : kNegInf;
    }
    for (int i = 0; i < N; ++i) top = top > v[i] ? top : v[i];
}

// Largest of the eight lanes.
[[gnu::always_inline]] static inline double lane_max(v8d v) {
    double m = v[0];
    for (int i = 1; i < 8; ++i) m = v[i] > m ? v[i] : m;
    return m;
}

MAPA_CLONES
void logits_direct(const double* xt, index_t ld, index_t cols, index_t d, const double* y,
                   index_t rows, double scale, double* out, index_t len, double* row_max) {
    static_assert(kTileAlign % 16 == 0, "two vectors per column block");
    constexpr double kNegInf = -std::numeric_limits<double>::infinity();
    // Four rows at a time share each loaded column vector.
    constexpr index_t kBlockRows = 4;
    for (index_t r0 = 0; r0 < rows; r0 += kBlockRows) {
        const index_t nr = rows - r0 < kBlockRows ? rows - r0 : kBlockRows;
        const double* ys[kBlockRows];
        four_rows(y, d, r0, nr, ys);
        v8d top[kBlockRows];  // running maxima of the rows, over columns < len
        for (auto& m : top) m = v8d{} + kNegInf;
        for (index_t j0 = 0; j0 < cols; j0 += 16) {
            const double* xs[1] = {xt + j0};
            v8d acc[kBlockRows][2];
            column_sums<kBlockRows, false, true>(xs, ld, d, ys, acc);
            for (index_t r = 0; r < nr; ++r) {
                double* o = out + (r0 + r) * cols + j0;
                v8d v[2] = {acc[r][0] * -scale, acc[r][1] * -scale};
                store8(o, v[0]);
                store8(o + 8, v[1]);
                if (row_max) fold_max(top[r], v, j0, len);
            }
        }
        for (index_t r = 0; row_max && r < nr; ++r) row_max[r0 + r] = lane_max(top[r]);
    }
}

// exp_nonpos (exp.hpp, double) on eight lanes: lane by lane the scalar's bits.
// (In 32-byte halves where 64-byte vectors are not native: kWideVectors.)
typedef std::int64_t v4l64 __attribute__((vector_size(32)));
[[gnu::always_inline]] static inline v8d exp8(v8d x) {
    if (kWideVectors) return exp_nonpos_f64<v8d, v8l64>(x);
    return by_halves<v4d>(x, [](v4d h) __attribute__((always_inline)) { return exp_nonpos_f64<v4d, v4l64>(h); });
}

MAPA_CLONES
void logits_expand(const double* xt, const double* xnorm, index_t ld, index_t cols, index_t d,
                   const double* y, const double* ynorm, index_t rows, double scale, double* out) {
    // A 16-column panel of the tile (d x 16 doubles) is reused by every block
    // of four rows before moving on, so it is read from L1, not L2; each
    // block keeps its 4 x 16 dot products in eight vector registers.
    constexpr index_t kBlockRows = 4;
    const double refine_above = refine_floor(scale, d);
    for (index_t j0 = 0; j0 < cols; j0 += 16) {
        const v8d xn[1][2] = {{load8(xnorm + j0), load8(xnorm + j0 + 8)}};
        for (index_t r0 = 0; r0 < rows; r0 += kBlockRows) {
            const index_t nr = rows - r0 < kBlockRows ? rows - r0 : kBlockRows;
            const double* ys[kBlockRows];
            four_rows(y, d, r0, nr, ys);
            const double* xs[1] = {xt + j0};
            v8d acc[kBlockRows][2];
            column_sums<kBlockRows, true, true>(xs, ld, d, ys, acc);
            double yn[kBlockRows];
            double* o[kBlockRows];
            for (index_t r = 0; r < kBlockRows; ++r) {
                const index_t i = r < nr ? r : nr - 1;
                yn[r] = ynorm[r0 + i];
                o[r] = out + (r0 + i) * cols + j0;
            }
            expand_store<kBlockRows, true>(acc, yn, xn, nr, scale, refine_above, xs, ld, d, ys, o);
        }
    }
}

MAPA_CLONES
void logits_visits(const double* const* xt, const double* const* xnorm, index_t ld, index_t d,
                   const double* const* y, const double* ynorm, index_t n, double scale, double* out) {
    // Up to four (row, block) visits at once: eight independent accumulator
    // chains hide the multiply-add latency that one visit alone would wait on.
    // Missing visits repeat the last one; their results are not stored.
    const double *xs[4], *ys[4];
    four_visits(xt, n, xs);
    four_visits(y, n, ys);
    v8d acc[4][2];
    if (xnorm) {
        column_sums<4, true, false>(xs, ld, d, ys, acc);
    } else {
        column_sums<4, false, false>(xs, ld, d, ys, acc);
    }
    if (!xnorm) {
        for (index_t v = 0; v < n; ++v) {
            store8(out + 16 * v, acc[v][0] * -scale);
            store8(out + 16 * v + 8, acc[v][1] * -scale);
        }
        return;
    }
    double yn[4];
    v8d xn[4][2];
    double* o[4];
    for (index_t v = 0; v < 4; ++v) {
        const index_t i = v < n ? v : n - 1;
        yn[v] = ynorm[i];
        xn[v][0] = load8(xnorm[i]), xn[v][1] = load8(xnorm[i] + 8);
        o[v] = out + 16 * i;
    }
    expand_store<4, false>(acc, yn, xn, n, scale, refine_floor(scale, d), xs, ld, d, ys, o);
}

// Single-precision direct path (float32 problems, d <= kDirectMaxFeatures):
// for R rows ys[r] against 16 * C columns, the sum over the d features of
// squared differences, in float; acc[r][c] holds columns 16c .. 16c + 15.
// Row r's columns start at xs[r], or at xs[0] for every row when Shared.
// Every float leaf goes through here, so a logit's value depends only on
// its row and column.
template <class H, int R, int C, bool Shared>
[[gnu::always_inline]] static inline void column_sums_f_in(const float* const* xs, index_t ld, index_t d,
                                                           const float* const* ys, v16f (&acc)[R][C]) {
    constexpr int P = C * sizeof(v16f) / sizeof(H);  // pieces of 16 C columns
    H a[R][P];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int q = 0; q < P; ++q) a[r][q] = H{};
    for (index_t k = 0; k < d; ++k) {
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            H x[P];
            std::memcpy(x, xs[Shared ? 0 : r] + k * ld, sizeof x);
            const float yk = ys[r][k];
#pragma GCC unroll 4
            for (int q = 0; q < P; ++q) {
                const H e = x[q] - yk;
                a[r][q] += e * e;
            }
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) std::memcpy(acc[r], a[r], sizeof acc[r]);
}

template <int R, int C, bool Shared>
[[gnu::always_inline]] static inline void column_sums_f(const float* const* xs, index_t ld, index_t d,
                                                        const float* const* ys, v16f (&acc)[R][C]) {
    if (kWideVectors) {
        column_sums_f_in<v16f, R, C, Shared>(xs, ld, d, ys, acc);
    } else {
        column_sums_f_in<v8f, R, C, Shared>(xs, ld, d, ys, acc);
    }
}

// -scale * s for 16 columns of squared distances s, widened to double.
[[gnu::always_inline]] static inline void scaled16(v16f s, double scale, v8d& lo, v8d& hi) {
    widen(s, lo, hi);
    lo *= -scale;
    hi *= -scale;
}

MAPA_CLONES
void logits_direct(const float* xt, index_t ld, index_t cols, index_t d, const float* y, index_t rows,
                   double scale, double* out, index_t len, double* row_max) {
    static_assert(kTileAlign % 32 == 0, "two float vectors per column block");
    constexpr double kNegInf = -std::numeric_limits<double>::infinity();
    constexpr index_t kBlockRows = 4;
    for (index_t r0 = 0; r0 < rows; r0 += kBlockRows) {
        const index_t nr = rows - r0 < kBlockRows ? rows - r0 : kBlockRows;
        const float* ys[kBlockRows];
        four_rows(y, d, r0, nr, ys);
        v8d top[kBlockRows];
        for (auto& m : top) m = v8d{} + kNegInf;
        for (index_t j0 = 0; j0 < cols; j0 += 32) {
            const float* xs[1] = {xt + j0};
            v16f acc[kBlockRows][2];
            column_sums_f<kBlockRows, 2, true>(xs, ld, d, ys, acc);
            for (index_t r = 0; r < nr; ++r) {
                double* o = out + (r0 + r) * cols + j0;
                v8d v[4];
                scaled16(acc[r][0], scale, v[0], v[1]);
                scaled16(acc[r][1], scale, v[2], v[3]);
                for (int i = 0; i < 4; ++i) store8(o + 8 * i, v[i]);
                if (row_max) fold_max(top[r], v, j0, len);
            }
        }
        for (index_t r = 0; row_max && r < nr; ++r) row_max[r0 + r] = lane_max(top[r]);
    }
}

// exp_nonpos (exp.hpp, float) on sixteen lanes: lane by lane the scalar's bits.
typedef std::int32_t v16i __attribute__((vector_size(64)));
typedef std::int32_t v8i __attribute__((vector_size(32)));
[[gnu::always_inline]] static inline v16f exp16(v16f x) {
    if (kWideVectors) return exp_nonpos_f32<v16f, v16i>(x);
    return by_halves<v8f>(x, [](v8f h) __attribute__((always_inline)) { return exp_nonpos_f32<v8f, v8i>(h); });
}

// What the fused leaves need of their precision, by overload: the column
// sums of four rows against two vectors of columns (acc[r][h]: columns
// L h .. L h + L - 1 of the block at xt), the exponential on every lane, and
// unaligned loads and stores.
[[gnu::always_inline]] static inline void tile_sums(const double* xt, index_t ld, index_t d,
                                                    const double* const* ys, v8d (&acc)[4][2]) {
    const double* xs[1] = {xt};
    column_sums<4, false, true>(xs, ld, d, ys, acc);
}
[[gnu::always_inline]] static inline void tile_sums(const float* xt, index_t ld, index_t d, const float* const* ys,
                                                    v16f (&acc)[4][2]) {
    const float* xs[1] = {xt};
    column_sums_f<4, 2, true>(xs, ld, d, ys, acc);
}
[[gnu::always_inline]] static inline v8d exp_lanes(v8d x) { return exp8(x); }
[[gnu::always_inline]] static inline v16f exp_lanes(v16f x) { return exp16(x); }
template <class V, class E>
[[gnu::always_inline]] static inline V load_lanes(const E* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
template <class V, class E>
[[gnu::always_inline]] static inline void store_lanes(E* p, V v) {
    std::memcpy(p, &v, sizeof v);
}

// The fused leaf, in E (float: V = v16f, double: V = v8d): distances,
// logits (-scale s, in E), exponentials and both sums; with Store also the
// squared distances (all columns up to len rounded up to 2 L) and each
// row's least over the first len. self0 >= 0 drops row r's term at column
// self0 + r: its distance is +inf, so its exponential is exactly 0.
template <class E, class V, bool Store>
[[gnu::always_inline]] static inline void direct_exp_sums_impl(const E* xt, index_t ld, index_t d, const E* y,
                                                              index_t rows, index_t len, double scale,
                                                              double* rowsum, double* colsum, E* dist,
                                                              E* row_min, index_t self0) {
    constexpr index_t L = sizeof(V) / sizeof(E), W = 2 * L;  // lanes; columns per step
    static_assert(kTileAlign % W == 0, "two vectors per column block");
    constexpr E kInf = std::numeric_limits<E>::infinity();
    constexpr index_t kBlockRows = 4;
    const index_t cols = (len + W - 1) / W * W;  // <= ld
    const E ms = static_cast<E>(-scale);
    V lane;
    for (index_t i = 0; i < L; ++i) lane[i] = static_cast<E>(i);
    // each column's sum over the block's rows: four rows in register, in
    // row order, then added here in row-group order
    alignas(64) E cs[kMaxTile];
    if (colsum) std::memset(cs, 0, sizeof(E) * static_cast<std::size_t>(cols));
    for (index_t r0 = 0; r0 < rows; r0 += kBlockRows) {
        const index_t nr = rows - r0 < kBlockRows ? rows - r0 : kBlockRows;
        const E* ys[kBlockRows];
        four_rows(y, d, r0, nr, ys);
        V rs[kBlockRows] = {};
        V low[kBlockRows];
        for (auto& m : low) m = V{} + kInf;
        for (index_t j0 = 0; j0 < cols; j0 += W) {
            V acc[kBlockRows][2];
            tile_sums(xt + j0, ld, d, ys, acc);
            if (self0 >= 0 && self0 + r0 + kBlockRows > j0 && self0 + r0 < j0 + W) {
                for (index_t r = 0; r < kBlockRows; ++r)
                    for (int h = 0; h < 2; ++h)
                        acc[r][h] = lane + static_cast<E>(j0 + L * h) == static_cast<E>(self0 + r0 + r)
                                        ? V{} + kInf
                                        : acc[r][h];
            }
            // columns at or beyond len (padding) take no part
            const bool tail = j0 + W > len;
            const auto in0 = lane + static_cast<E>(j0) < static_cast<E>(len);
            const auto in1 = lane + static_cast<E>(j0 + L) < static_cast<E>(len);
            V c0 = V{}, c1 = V{};
#pragma GCC unroll 4
            for (index_t r = 0; r < kBlockRows; ++r) {
                if (r >= nr) break;  // repeated rows (last block only)
                if constexpr (Store) {
                    E* o = dist + (r0 + r) * ld + j0;
                    store_lanes(o, acc[r][0]);
                    store_lanes(o + L, acc[r][1]);
                    V a = acc[r][0], b = acc[r][1];
                    if (tail) {
                        a = in0 ? a : V{} + kInf;
                        b = in1 ? b : V{} + kInf;
                    }
                    const V m = a < b ? a : b;
                    low[r] = m < low[r] ? m : low[r];
                }
                V q0 = exp_lanes(acc[r][0] * ms), q1 = exp_lanes(acc[r][1] * ms);
                if (tail) {
                    q0 = in0 ? q0 : V{};
                    q1 = in1 ? q1 : V{};
                }
                rs[r] += q0 + q1;
                c0 += q0;
                c1 += q1;
            }
            if (colsum) {
                E* c = cs + j0;
                store_lanes(c, load_lanes<V>(c) + c0);
                store_lanes(c + L, load_lanes<V>(c + L) + c1);
            }
        }
        for (index_t r = 0; r < nr; ++r) {
            E s = 0;
            for (index_t i = 0; i < L; ++i) s += rs[r][i];
            rowsum[r0 + r] += static_cast<double>(s);
            if constexpr (Store) {
                E m = low[r][0];
                for (index_t i = 1; i < L; ++i) m = low[r][i] < m ? low[r][i] : m;
                row_min[r0 + r] = m;
            }
        }
    }
    if (!colsum) return;
#pragma omp simd
    for (index_t j = 0; j < len; ++j) colsum[j] += static_cast<double>(cs[j]);
}

MAPA_CLONES
void direct_exp_sums(const float* xt, index_t ld, index_t d, const float* y, index_t rows, index_t len,
                     double scale, double* rowsum, double* colsum, float* dist, float* row_min, index_t self0) {
    if (dist) {
        direct_exp_sums_impl<float, v16f, true>(xt, ld, d, y, rows, len, scale, rowsum, colsum, dist, row_min,
                                                self0);
    } else {
        direct_exp_sums_impl<float, v16f, false>(xt, ld, d, y, rows, len, scale, rowsum, colsum, nullptr, nullptr,
                                                 self0);
    }
}

MAPA_CLONES
void direct_exp_sums(const double* xt, index_t ld, index_t d, const double* y, index_t rows, index_t len,
                     double scale, double* rowsum, double* colsum, index_t self0) {
    direct_exp_sums_impl<double, v8d, false>(xt, ld, d, y, rows, len, scale, rowsum, colsum, nullptr, nullptr,
                                             self0);
}

MAPA_CLONES
void direct_exp(const float* xt, index_t ld, index_t d, const float* y, index_t rows, double scale, float* q,
                index_t qld) {
    constexpr index_t kBlockRows = 4;
    const float ms = static_cast<float>(-scale);
    for (index_t r0 = 0; r0 < rows; r0 += kBlockRows) {
        const index_t nr = rows - r0 < kBlockRows ? rows - r0 : kBlockRows;
        const float* ys[kBlockRows];
        four_rows(y, d, r0, nr, ys);
        for (index_t j0 = 0; j0 < ld; j0 += 32) {
            const float* xs[1] = {xt + j0};
            v16f acc[kBlockRows][2];
            column_sums_f<kBlockRows, 2, true>(xs, ld, d, ys, acc);
            for (index_t r = 0; r < nr; ++r) {
                float* o = q + (r0 + r) * qld + j0;
                const v16f q0 = exp16(acc[r][0] * ms), q1 = exp16(acc[r][1] * ms);
                std::memcpy(o, &q0, sizeof q0);
                std::memcpy(o + 16, &q1, sizeof q1);
            }
        }
    }
}

MAPA_CLONES
void logits_visits(const float* const* xt, index_t ld, index_t d, const float* const* y, index_t n, double scale,
                   double* out) {
    const float *xs[4], *ys[4];
    four_visits(xt, n, xs);
    four_visits(y, n, ys);
    v16f acc[4][1];
    column_sums_f<4, 1, false>(xs, ld, d, ys, acc);
    for (int v = 0; v < static_cast<int>(n); ++v) {
        v8d lo, hi;
        scaled16(acc[v][0], scale, lo, hi);
        store8(out + 16 * v, lo);
        store8(out + 16 * v + 8, hi);
    }
}

MAPA_CLONES
double tile_max(const double* v, index_t len) {
    double m = -std::numeric_limits<double>::infinity();
#pragma omp simd reduction(max : m)
    for (index_t j = 0; j < len; ++j) m = v[j] > m ? v[j] : m;
    return m;
}

MAPA_CLONES
index_t positions_at_least(const double* v, index_t len, double thr, std::int32_t* out) {
    // Runs of 16 with no hit are skipped by one vector test; a run with hits
    // is compacted without branches.
    index_t c = 0, j = 0;
    for (; j + 16 <= len; j += 16) {
        const v8d a = load8(v + j), b = load8(v + j + 8);
        const v8d m = a > b ? a : b;
        double top = m[0];
        for (int i = 1; i < 8; ++i) top = m[i] > top ? m[i] : top;
        if (!(top >= thr)) continue;
        for (index_t i = j; i < j + 16; ++i) {
            out[c] = static_cast<std::int32_t>(i);
            c += v[i] >= thr;
        }
    }
    for (; j < len; ++j) {
        out[c] = static_cast<std::int32_t>(j);
        c += v[j] >= thr;
    }
    return c;
}

MAPA_CLONES
index_t columns_at_least(const double* v, index_t ld, index_t rows, index_t len, const double* thr,
                         std::int32_t* cols, std::uint32_t* masks) {
    // Eight columns at a time: one compare per row against the columns'
    // thresholds, or-ed over the rows; only a group with a hit is scanned
    // again for each column's row mask.
    typedef long long v8l __attribute__((vector_size(64)));
    index_t c = 0, j = 0;
    for (; j + 8 <= len; j += 8) {
        const v8d t = load8(thr + j);
        v8l hit = v8l{};
        for (index_t r = 0; r < rows; ++r) hit |= load8(v + r * ld + j) >= t;
        long long any = hit[0];
        for (int i = 1; i < 8; ++i) any |= hit[i];
        if (!any) continue;
        v8l bits = v8l{};
        for (index_t r = 0; r < rows; ++r) bits |= (load8(v + r * ld + j) >= t) & (1LL << r);
        for (int i = 0; i < 8; ++i) {
            cols[c] = static_cast<std::int32_t>(j + i);
            masks[c] = static_cast<std::uint32_t>(bits[i]);
            c += bits[i] != 0;
        }
    }
    for (; j < len; ++j) {
        std::uint32_t bits = 0;
        for (index_t r = 0; r < rows; ++r) bits |= static_cast<std::uint32_t>(v[r * ld + j] >= thr[j]) << r;
        cols[c] = static_cast<std::int32_t>(j);
        masks[c] = bits;
        c += bits != 0;
    }
    return c;
}

MAPA_CLONES
index_t positions_at_most(const float* s, index_t len, float bound, std::int32_t* out) {
    // as positions_at_least: runs of 16 with no hit skipped by one test
    index_t c = 0, j = 0;
    for (; j + 16 <= len; j += 16) {
        const v16f a = load16(s + j);
        float low = a[0];
        for (int i = 1; i < 16; ++i) low = a[i] < low ? a[i] : low;
        if (!(low <= bound)) continue;
        for (index_t i = j; i < j + 16; ++i) {
            out[c] = static_cast<std::int32_t>(i);
            c += s[i] <= bound;
        }
    }
    for (; j < len; ++j) {
        out[c] = static_cast<std::int32_t>(j);
        c += s[j] <= bound;
    }
    return c;
}

MAPA_CLONES
index_t columns_at_most(const float* s, index_t ld, index_t rows, index_t len, const float* bound,
                        std::int32_t* cols, std::uint32_t* masks) {
    // as columns_at_least, sixteen columns at a time
    typedef std::int32_t v16i_t __attribute__((vector_size(64)));
    index_t c = 0, j = 0;
    for (; j + 16 <= len; j += 16) {
        const v16f t = load16(bound + j);
        v16i_t hit = v16i_t{};
        for (index_t r = 0; r < rows; ++r) hit |= load16(s + r * ld + j) <= t;
        std::int32_t any = hit[0];
        for (int i = 1; i < 16; ++i) any |= hit[i];
        if (!any) continue;
        v16i_t bits = v16i_t{};
        for (index_t r = 0; r < rows; ++r) bits |= (load16(s + r * ld + j) <= t) & static_cast<std::int32_t>(1u << r);
        for (int i = 0; i < 16; ++i) {
            cols[c] = static_cast<std::int32_t>(j + i);
            masks[c] = static_cast<std::uint32_t>(bits[i]);
            c += bits[i] != 0;
        }
    }
    for (; j < len; ++j) {
        std::uint32_t bits = 0;
        for (index_t r = 0; r < rows; ++r) bits |= static_cast<std::uint32_t>(s[r * ld + j] <= bound[j]) << r;
        cols[c] = static_cast<std::int32_t>(j);
        masks[c] = bits;
        c += bits != 0;
    }
    return c;
}

// Lane b of the result is op over the 8 lanes of m[b]: a butterfly of three
// shuffle-and-op levels, 7 + 7 operations for 8 horizontal reductions.
template <class Op>
[[gnu::always_inline]] static inline v8d lane_reduce(const v8d m[8], Op op) {
    typedef long long v8l __attribute__((vector_size(64)));
    const auto level = [&](v8d a, v8d b, v8l lo, v8l hi) {
        return op(__builtin_shuffle(a, b, lo), __builtin_shuffle(a, b, hi));
    };
    const v8l l1a = {0, 8, 2, 10, 4, 12, 6, 14}, l1b = {1, 9, 3, 11, 5, 13, 7, 15};
    const v8l l2a = {0, 1, 8, 9, 4, 5, 12, 13}, l2b = {2, 3, 10, 11, 6, 7, 14, 15};
    const v8l l3a = {0, 1, 2, 3, 8, 9, 10, 11}, l3b = {4, 5, 6, 7, 12, 13, 14, 15};
    const v8d t01 = level(m[0], m[1], l1a, l1b), t23 = level(m[2], m[3], l1a, l1b);
    const v8d t45 = level(m[4], m[5], l1a, l1b), t67 = level(m[6], m[7], l1a, l1b);
    const v8d u0 = level(t01, t23, l2a, l2b), u1 = level(t45, t67, l2a, l2b);
    return level(u0, u1, l3a, l3b);
}

[[gnu::always_inline]] static inline v8d lane_maxima(const v8d m[8]) {
    return lane_reduce(m, [](v8d x, v8d y) { return x > y ? x : y; });
}

[[gnu::always_inline]] static inline v8d lane_sums(const v8d m[8]) {
    return lane_reduce(m, [](v8d x, v8d y) { return x + y; });
}

MAPA_CLONES
index_t block_max16(const double* v, index_t len, double* out) {
    const index_t full = len / 16;
    index_t b = 0;
    for (; b + 8 <= full; b += 8) {
        v8d m[8];
        for (int i = 0; i < 8; ++i) {
            const v8d a = load8(v + 16 * (b + i)), c = load8(v + 16 * (b + i) + 8);
            m[i] = a > c ? a : c;
        }
        store8(out + b, lane_maxima(m));
    }
    for (; b < full; ++b) {
        double r = v[16 * b];
        for (index_t j = 16 * b + 1; j < 16 * b + 16; ++j) r = v[j] > r ? v[j] : r;
        out[b] = r;
    }
    if (full * 16 == len) return full;
    double r = -std::numeric_limits<double>::infinity();
    for (index_t j = full * 16; j < len; ++j) r = v[j] > r ? v[j] : r;
    out[full] = r;
    return full + 1;
}

// Up to this many entries rank_order compares all pairs; beyond it, sorts.
constexpr index_t kRankAllPairs = 256;

MAPA_CLONES
void rank_order(const double* val, const std::int64_t* idx, index_t n, std::int64_t* rank) {
    // Entry j is better than entry i when its value is larger, or equal with a
    // smaller index; the rank of i counts the better entries.
    const auto better = [&](index_t j, index_t i) {
        return val[j] > val[i] || (val[j] == val[i] && idx[j] < idx[i]);
    };
    if (n > kRankAllPairs) {
        std::vector<std::int64_t> order(static_cast<std::size_t>(n));
        for (index_t i = 0; i < n; ++i) order[static_cast<std::size_t>(i)] = i;
        std::sort(order.begin(), order.end(), better);
        for (index_t r = 0; r < n; ++r) rank[order[static_cast<std::size_t>(r)]] = r;
        return;
    }
    // Up to kRankAllPairs entries: n^2 compares, branch-free, on float keys
    // 16 to a vector (less than the mispredictions of a sort). Rounding to
    // float keeps order (v_j > v_i gives key_j >= key_i), so only entries
    // whose keys are equal need the exact comparison; NaN pads compare false.
    typedef std::int32_t v16i __attribute__((vector_size(64)));
    constexpr index_t lanes = 16;
    v16f key[kRankAllPairs / lanes];
    const index_t blocks = (n + lanes - 1) / lanes;
    for (index_t j = 0; j < blocks * lanes; ++j)
        key[j / lanes][j % lanes] = j < n ? static_cast<float>(val[j]) : std::numeric_limits<float>::quiet_NaN();
    for (index_t i = 0; i < n; ++i) {
        const float ki = key[i / lanes][i % lanes];
        v16i above = {}, same = {};
        for (index_t b = 0; b < blocks; ++b) {
            above -= key[b] > ki;  // true is -1
            same -= key[b] == ki;
        }
        std::int32_t a = 0, e = 0;
        for (index_t l = 0; l < lanes; ++l) {
            a += above[l];
            e += same[l];
        }
        if (e > 1)
            for (index_t j = 0; j < n; ++j) a += key[j / lanes][j % lanes] == ki && better(j, i);
        rank[i] = a;
    }
}

MAPA_CLONES
double sum_exp_shifted(const double* v, index_t len, double shift, double) {
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (index_t j = 0; j < len; ++j) s += exp_nonpos(v[j] - shift);
    return s;
}

MAPA_CLONES
double sum_exp_shifted(const double* v, index_t len, double shift, float) {
    // Partial sums in float over at most one tile, then added in double.
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (index_t j = 0; j < len; ++j) s += exp_nonpos(static_cast<float>(v[j] - shift));
    return s;
}

MAPA_CLONES
void store_shifted(const double* v, index_t len, double shift, double* dst) {
#pragma omp simd
    for (index_t j = 0; j < len; ++j) dst[j] = v[j] - shift;
}

MAPA_CLONES
void store_shifted(const double* v, index_t len, double shift, float* dst) {
#pragma omp simd
    for (index_t j = 0; j < len; ++j) dst[j] = static_cast<float>(v[j] - shift);
}

MAPA_CLONES
void add_offset(double* dst, index_t len, double offset) {
#pragma omp simd
    for (index_t j = 0; j < len; ++j) dst[j] += offset;
}

MAPA_CLONES
void add_offset(float* dst, index_t len, double offset) {
#pragma omp simd
    for (index_t j = 0; j < len; ++j) dst[j] = static_cast<float>(static_cast<double>(dst[j]) + offset);
}

template <class E>
[[gnu::always_inline]] static inline void exp_sums_impl(const double* v, index_t ld, index_t rows, index_t len,
                                                       double* rowsum, double* colsum) {
    // Exponentials first, in their own loop, at their natural width; each
    // row's sum over at most one tile in E, added in double; each column's
    // sum over the block's rows in E, in row order, then added in double.
    alignas(64) E q[kMaxTile];
    alignas(64) E cs[kMaxTile];
    if (colsum) {
#pragma omp simd
        for (index_t j = 0; j < len; ++j) cs[j] = 0;
    }
    for (index_t r = 0; r < rows; ++r) {
        const double* vr = v + r * ld;
#pragma omp simd
        for (index_t j = 0; j < len; ++j) q[j] = exp_nonpos(static_cast<E>(vr[j]));
        E s = 0;
#pragma omp simd reduction(+ : s)
        for (index_t j = 0; j < len; ++j) s += q[j];
        rowsum[r] += static_cast<double>(s);
        if (!colsum) continue;
#pragma omp simd
        for (index_t j = 0; j < len; ++j) cs[j] += q[j];
    }
    if (!colsum) return;
#pragma omp simd
    for (index_t j = 0; j < len; ++j) colsum[j] += static_cast<double>(cs[j]);
}

MAPA_CLONES
void exp_sums(const double* v, index_t ld, index_t rows, index_t len, double* rowsum, double* colsum, double) {
    exp_sums_impl<double>(v, ld, rows, len, rowsum, colsum);
}

MAPA_CLONES
void exp_sums(const double* v, index_t ld, index_t rows, index_t len, double* rowsum, double* colsum, float) {
    exp_sums_impl<float>(v, ld, rows, len, rowsum, colsum);
}

template <class E>
[[gnu::always_inline]] static inline void accumulate_targets_impl(const double* v, index_t ld,
                                                                 const double* log_norm,
                                                                 const double* y, const double* sq,
                                                                 index_t rows, index_t d, double* w,
                                                                 double* s1t, double* s2) {
    // Per panel of W columns: the q of every row first, then each output row of the
    // panel is read once, gets the rows' contributions added in register in
    // row order, and is written once.
    constexpr index_t W = 64;
    alignas(64) double q[kTargetRows][W];
    alignas(64) E qe[W];
    static_assert(kTileAlign == W / 2, "panels of W or W / 2 columns");
    for (index_t j0 = 0; j0 < ld; j0 += W) {
        const index_t n = ld - j0 < W ? ld - j0 : W;
        for (index_t r = 0; r < rows; ++r) {
            const double* vr = v + r * ld + j0;
            const double ln = log_norm[r];
            // whole panels of W or W / 2 (ld is a multiple of 32): no masked
            // remainder; exponentials and widening in separate loops, each
            // vectorised at its natural width
            if (n == W) {
#pragma omp simd
                for (index_t j = 0; j < W; ++j) qe[j] = exp_nonpos(static_cast<E>(vr[j] - ln));
#pragma omp simd
                for (index_t j = 0; j < W; ++j) q[r][j] = qe[j];
            } else {
#pragma omp simd
                for (index_t j = 0; j < W / 2; ++j) qe[j] = exp_nonpos(static_cast<E>(vr[j] - ln));
#pragma omp simd
                for (index_t j = 0; j < W / 2; ++j) q[r][j] = qe[j];
            }
        }
        // n is a multiple of 32 (ld is a multiple of kTileAlign): four vectors
        // at a time, so that several independent sums hide the add latency.
        static_assert(kTileAlign % 32 == 0, "four vectors per column group");
        for (index_t j = 0; j < n; j += 32) {
            v8d aw[4], as[4];
#pragma GCC unroll 4
            for (int i = 0; i < 4; ++i) aw[i] = load8(w + j0 + j + 8 * i), as[i] = load8(s2 + j0 + j + 8 * i);
            for (index_t r = 0; r < rows; ++r) {
#pragma GCC unroll 4
                for (int i = 0; i < 4; ++i) {
                    const v8d qr = load8(&q[r][j + 8 * i]);
                    aw[i] += qr;
                    as[i] += qr * sq[r];
                }
            }
#pragma GCC unroll 4
            for (int i = 0; i < 4; ++i) store8(w + j0 + j + 8 * i, aw[i]), store8(s2 + j0 + j + 8 * i, as[i]);
        }
        for (index_t k = 0; k < d; ++k) {
            double* row = s1t + k * ld + j0;
            for (index_t j = 0; j < n; j += 32) {
                v8d a[4];
#pragma GCC unroll 4
                for (int i = 0; i < 4; ++i) a[i] = load8(row + j + 8 * i);
                for (index_t r = 0; r < rows; ++r) {
                    const double yk = y[r * d + k];
#pragma GCC unroll 4
                    for (int i = 0; i < 4; ++i) a[i] += load8(&q[r][j + 8 * i]) * yk;
                }
#pragma GCC unroll 4
                for (int i = 0; i < 4; ++i) store8(row + j + 8 * i, a[i]);
            }
        }
    }
}

MAPA_CLONES
void accumulate_targets(const double* v, index_t ld, const double* log_norm, const double* y,
                        const double* sq, index_t rows, index_t d, double* w, double* s1t, double* s2,
                        double) {
    accumulate_targets_impl<double>(v, ld, log_norm, y, sq, rows, d, w, s1t, s2);
}

MAPA_CLONES
void accumulate_targets(const double* v, index_t ld, const double* log_norm, const double* y,
                        const double* sq, index_t rows, index_t d, double* w, double* s1t, double* s2,
                        float) {
    accumulate_targets_impl<float>(v, ld, log_norm, y, sq, rows, d, w, s1t, s2);
}

// rowacc[(k0 + c) * ld + r0 + i] += the lane sum of t[i][c], for the nr
// rows and nk features of a four-row, two-feature block.
[[gnu::always_inline]] static inline void add_row_sums(const v8d (&t)[4][2], index_t nr, index_t nk, index_t k0,
                                                       index_t r0, index_t ld, double* rowacc) {
    const v8d m[8] = {t[0][0], t[0][1], t[1][0], t[1][1], t[2][0], t[2][1], t[3][0], t[3][1]};
    const v8d sum = lane_sums(m);
    for (index_t i = 0; i < nr; ++i)
        for (index_t c = 0; c < nk; ++c) rowacc[(k0 + c) * ld + r0 + i] += sum[2 * i + c];
}

MAPA_CLONES
void pair_targets(const double* v, index_t ld, index_t rows, const double* u, const double* ut, index_t dw,
                  double* colacc, double* rowacc, double* q0) {
    // The exponentials of every row first, stored at row stride ld + 8: rows
    // a multiple of 4 KiB apart would share L1 sets, and the column sums
    // read 16 rows at once.
    const index_t qld = ld + 8;
    for (index_t r = 0; r < rows; ++r) {
        const double* vr = v + r * ld;
        double* qr = q0 + r * qld;
#pragma omp simd
        for (index_t j = 0; j < ld; ++j) qr[j] = exp_nonpos(vr[j]);
    }
    // Columns: 32 at a time (ld is a multiple of kTileAlign), each output
    // read once, the rows' terms added in register in row order, written once.
    static_assert(kTileAlign % 32 == 0, "four vectors per column group");
    for (index_t j = 0; j < ld; j += 32) {
        for (index_t k = 0; k < dw; ++k) {
            double* c = colacc + k * ld + j;
            v8d a[4];
#pragma GCC unroll 4
            for (int i = 0; i < 4; ++i) a[i] = load8(c + 8 * i);
            for (index_t r = 0; r < rows; ++r) {
                const double w = u[r * dw + k];
                const double* q = q0 + r * qld + j;
#pragma GCC unroll 4
                for (int i = 0; i < 4; ++i) a[i] += load8(q + 8 * i) * w;
            }
#pragma GCC unroll 4
            for (int i = 0; i < 4; ++i) store8(c + 8 * i, a[i]);
        }
    }
    if (!rowacc) return;
    // Rows: blocks of four rows times two features, eight independent sums
    // over the tile; missing rows or features repeat the last one and are
    // not stored.
    for (index_t r0 = 0; r0 < rows; r0 += 4) {
        const index_t nr = rows - r0 < 4 ? rows - r0 : 4;
        const double* q[4];
        four_rows(q0, qld, r0, nr, q);
        for (index_t k0 = 0; k0 < dw; k0 += 2) {
            const index_t nk = dw - k0 < 2 ? 1 : 2;
            const double* uk[2] = {ut + k0 * ld, ut + (k0 + nk - 1) * ld};
            v8d s[4][2];
            for (int i = 0; i < 4; ++i) s[i][0] = s[i][1] = v8d{};
            for (index_t j = 0; j < ld; j += 8) {
                const v8d a = load8(uk[0] + j), b = load8(uk[1] + j);
#pragma GCC unroll 4
                for (int i = 0; i < 4; ++i) {
                    const v8d qi = load8(q[i] + j);
                    s[i][0] += qi * a;
                    s[i][1] += qi * b;
                }
            }
            add_row_sums(s, nr, nk, k0, r0, ld, rowacc);
        }
    }
}

// The products of the float pair_targets, from q (row stride qld): as the
// double version, with q and the products in single precision: each
// column's terms summed over the block's rows, and each row's over 256
// columns at a time (16 terms per lane either way), in float, then added in
// double.
[[gnu::always_inline]] static inline void pair_products(const float* q0, index_t qld, index_t ld, index_t rows,
                                                       const float* u, const float* ut, index_t dw,
                                                       double* colacc, double* rowacc) {
    static_assert(kTileAlign % 32 == 0, "two float vectors per column group");
    for (index_t j = 0; j < ld; j += 32) {
        // four features at a time: eight independent sums; missing features
        // repeat the last one and are not stored
        for (index_t k0 = 0; k0 < dw; k0 += 4) {
            const index_t nk = dw - k0 < 4 ? dw - k0 : 4;
            const index_t kk[4] = {k0, k0 + (nk > 1 ? 1 : 0), k0 + (nk > 2 ? 2 : nk - 1), k0 + (nk > 3 ? 3 : nk - 1)};
            v16f p[4][2];
#pragma GCC unroll 4
            for (int c = 0; c < 4; ++c) p[c][0] = p[c][1] = v16f{};
            for (index_t r = 0; r < rows; ++r) {
                const float* q = q0 + r * qld + j;
                const v16f a = load16(q), b = load16(q + 16);
                const float* ur = u + r * dw;
#pragma GCC unroll 4
                for (int c = 0; c < 4; ++c) {
                    const float w = ur[kk[c]];
                    p[c][0] += a * w;
                    p[c][1] += b * w;
                }
            }
            for (index_t c = 0; c < nk; ++c) {
                double* o = colacc + (k0 + c) * ld + j;
                for (int h = 0; h < 2; ++h) {
                    v8d lo, hi;
                    widen(p[c][h], lo, hi);
                    store8(o + 16 * h, load8(o + 16 * h) + lo);
                    store8(o + 16 * h + 8, load8(o + 16 * h + 8) + hi);
                }
            }
        }
    }
    if (!rowacc) return;
    for (index_t r0 = 0; r0 < rows; r0 += 4) {
        const index_t nr = rows - r0 < 4 ? rows - r0 : 4;
        const float* q[4];
        four_rows(q0, qld, r0, nr, q);
        for (index_t k0 = 0; k0 < dw; k0 += 2) {
            const index_t nk = dw - k0 < 2 ? 1 : 2;
            const float* uk[2] = {ut + k0 * ld, ut + (k0 + nk - 1) * ld};
            v8d t[4][2];
            for (int i = 0; i < 4; ++i) t[i][0] = t[i][1] = v8d{};
            for (index_t c0 = 0; c0 < ld; c0 += 256) {
                const index_t c1 = c0 + 256 < ld ? c0 + 256 : ld;
                v16f s[4][2];
                for (int i = 0; i < 4; ++i) s[i][0] = s[i][1] = v16f{};
                for (index_t j = c0; j < c1; j += 16) {
                    const v16f a = load16(uk[0] + j), b = load16(uk[1] + j);
#pragma GCC unroll 4
                    for (int i = 0; i < 4; ++i) {
                        const v16f qi = load16(q[i] + j);
                        s[i][0] += qi * a;
                        s[i][1] += qi * b;
                    }
                }
                for (int i = 0; i < 4; ++i)
                    for (int c = 0; c < 2; ++c) {
                        v8d lo, hi;
                        widen(s[i][c], lo, hi);
                        t[i][c] += lo + hi;
                    }
            }
            add_row_sums(t, nr, nk, k0, r0, ld, rowacc);
        }
    }
}

MAPA_CLONES
void pair_targets(const double* v, index_t ld, index_t rows, const float* u, const float* ut, index_t dw,
                  double* colacc, double* rowacc, float* q0) {
    const index_t qld = ld + 16;
    for (index_t r = 0; r < rows; ++r) {
        const double* vr = v + r * ld;
        float* qr = q0 + r * qld;
#pragma omp simd
        for (index_t j = 0; j < ld; ++j) qr[j] = exp_nonpos(static_cast<float>(vr[j]));
    }
    pair_products(q0, qld, ld, rows, u, ut, dw, colacc, rowacc);
}

MAPA_CLONES
void pair_targets(const float* q, index_t qld, index_t ld, index_t rows, const float* u, const float* ut,
                  index_t dw, double* colacc, double* rowacc) {
    pair_products(q, qld, ld, rows, u, ut, dw, colacc, rowacc);
}

const char* selected_isa() {
#if MAPA_HAVE_CLONES
    if (kWideVectors) return "avx512 (x86-64-v4 clone)";
    if (__builtin_cpu_supports("x86-64-v3")) return "avx2+fma (x86-64-v3 clone)";
    return "baseline x86-64 (default clone)";
#else
    return "single build (no target clones on this compiler/arch)";
#endif
}

}  // namespace mapa
