#include "tiles.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "exp.hpp"
#include "lanes.hpp"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(MAPA_NO_CLONES)
#define MAPA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define MAPA_AT64 __attribute__((target("arch=x86-64-v4")))
#define MAPA_AT32 __attribute__((target("arch=x86-64-v3")))
#define MAPA_HAVE_CLONES 1
#else
#define MAPA_CLONES
#define MAPA_AT64
#define MAPA_AT32
#define MAPA_HAVE_CLONES 0
#endif

namespace mapa {

// Widest native vector, in bytes, of the code this CPU runs: 64 where the
// x86-64-v4 (AVX-512) code runs, 32 for x86-64-v3 (AVX2 + FMA), 16 below.
// The clone resolver's own test, so the loops over 64-byte lanes (lanes.hpp)
// and the clones of the simple loops (MAPA_CLONES) agree.
static int cpu_piece_bytes() {
#if MAPA_HAVE_CLONES
    __builtin_cpu_init();  // this runs among static initialisers
    if (__builtin_cpu_supports("x86-64-v4")) return 64;
    if (__builtin_cpu_supports("x86-64-v3")) return 32;
    return 16;
#elif defined(__AVX512F__)
    return 64;
#elif defined(__AVX__)
    return 32;
#else
    return 16;
#endif
}

// The width the leaves use: the CPU's, or less where the environment
// variable MAPA_VECTOR_BYTES (16, 32 or 64; the Python layer refuses other
// values) asks for less, so that a test can run the narrower code on a
// wider CPU. The results are the same, bit for bit, at every width.
static int piece_bytes() {
    const int cpu = cpu_piece_bytes();
    const char* cap = std::getenv("MAPA_VECTOR_BYTES");
    if (!cap) return cpu;
    const int want = std::atoi(cap);
    return (want == 16 || want == 32 || want == 64) && want < cpu ? want : cpu;
}
static const int kPieceBytes = piece_bytes();

// Runs the expression, in which B names the width of the native pieces
// (kPieceBytes), compiled for the matching x86-64 level: the leaves are
// always-inline templates on B, so each is built once per level, in the
// lambda that calls it. Returns what the expression returns.
#define MAPA_BY_WIDTH(...)                                      \
    switch (kPieceBytes) {                                      \
        case 64:                                                \
            return [&]() MAPA_AT64 {                            \
                constexpr int B = 64;                           \
                return __VA_ARGS__;                             \
            }();                                                \
        case 32:                                                \
            return [&]() MAPA_AT32 {                            \
                constexpr int B = 32;                           \
                return __VA_ARGS__;                             \
            }();                                                \
        default:                                                \
            return [&]() {                                      \
                constexpr int B = 16;                           \
                return __VA_ARGS__;                             \
            }();                                                \
    }

// Eight doubles and sixteen floats, from native pieces of B bytes.
template <int B>
using D8 = lanes64<double, B>;
template <int B>
using F16 = lanes64<float, B>;

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

// Rows a pass of the column sums below takes: its accumulators (pieces per
// row, each a native vector) at most 8 where there are 16 vector registers
// (AVX2, SSE2) and 16 where there are 32 (AVX-512), so that they, the column
// pieces and the row's feature stay in registers.
template <int B, int R, int PiecesPerRow>
constexpr int rows_per_pass() {
    constexpr int most = (B == 64 ? 16 : 8) / PiecesPerRow;
    constexpr int g = most < 1 ? 1 : most < R ? most : R;
    static_assert(R % g == 0, "whole passes");
    return g;
}

// For R rows ys[r] against C lane groups of columns of a tile with row
// stride ld (V = lanes64<E, B>: eight doubles or sixteen floats per group),
// sums over the d features of squared differences (Expand false) or of
// products (Expand true), in E: acc[r][c] holds columns c L .. c L + L - 1.
// Row r's columns start at xs[r], or at xs[0] for every row when Shared
// (one load serves all rows of a pass). With From, the sums start at acc's
// values rather than at zero (the features before xs and ys, summed in
// order, stored and reloaded exactly). Every leaf of a precision goes
// through here, so a logit's value depends only on its row and column, bit
// for bit: each (row, column) sum runs over the features in order, whichever
// rows share its pass.
template <int B, int R, bool Expand, bool Shared, bool From = false, class E, int C>
[[gnu::always_inline]] static inline void column_sums(const E* const* xs, index_t ld, index_t d, const E* const* ys,
                                                      lanes64<E, B> (&acc)[R][C]) {
    using H = vec<E, B>;
    constexpr int Q = 64 / B;                    // pieces per lane group
    constexpr int P = C * Q;                     // pieces per row
    constexpr int L = sizeof(H) / sizeof(E);     // lanes per piece
    constexpr int G = rows_per_pass<B, R, P>();  // rows per pass
#pragma GCC unroll 4
    for (int g = 0; g < R; g += G) {
        // local accumulators, indexed only by unrolled constants: kept in registers
        H a[G][P];
#pragma GCC unroll 4
        for (int r = 0; r < G; ++r)
#pragma GCC unroll 16
            for (int q = 0; q < P; ++q) a[r][q] = From ? piece(acc[g + r][q / Q], q % Q) : H{};
        for (index_t k = 0; k < d; ++k) {
#pragma GCC unroll 16
            for (int r = 0; r < G; ++r) {
                const E* x = xs[Shared ? 0 : g + r] + k * ld;
                const E yk = ys[g + r][k];
#pragma GCC unroll 16
                for (int q = 0; q < P; ++q) {
                    H xq;  // piece by piece: one memcpy of the whole would go through the stack
                    std::memcpy(&xq, x + q * L, sizeof xq);
                    if constexpr (Expand) {
                        a[r][q] += yk * xq;
                    } else {
                        const H e = xq - yk;
                        a[r][q] += e * e;
                    }
                }
            }
        }
#pragma GCC unroll 4
        for (int r = 0; r < G; ++r)
#pragma GCC unroll 16
            for (int q = 0; q < P; ++q) piece(acc[g + r][q / Q], q % Q) = a[r][q];
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

// -scale * max(0, ||y||^2 + ||x||^2 - 2 y.x) for n <= 4 rows ys[r] (norm
// yn[r]) against 16 columns each (from xs[r] with norms xn[r], or xs[0] and
// xn[0] for all when Shared; row stride ld), from their dot products
// acc[r], stored at o[r]. The columns the rule above picks are recomputed
// by explicit differences, all n rows in one pass: its eight accumulator
// chains run side by side, so a block costs one pass whether one row needs
// it or four.
template <int B, int R, bool Shared>
[[gnu::always_inline]] static inline void expand_store(const D8<B> (&acc)[R][2], const double (&yn)[R],
                                                       const D8<B> (*xn)[2], index_t n, double scale,
                                                       double refine_above, const double* const* xs, index_t ld,
                                                       index_t d, const double* const* ys, double* const (&o)[R]) {
    using V = D8<B>;
    using M = decltype(V{} < V{});
    V dist[R][2];
    M mask[R][2], any = {};
    for (index_t r = 0; r < R; ++r) {
        for (int h = 0; h < 2; ++h) {
            const V s = yn[r] + xn[Shared ? 0 : r][h];
            const V e = s - 2.0 * acc[r][h];
            dist[r][h] = select(e > 0.0, e, V{});
            mask[r][h] = (s > refine_above) & (dist[r][h] < kRefineShare * s);
            if (r < n) any |= mask[r][h];
        }
    }
    if (any_lane(any)) [[unlikely]] {
        V e[R][2];
        column_sums<B, R, false, Shared>(xs, ld, d, ys, e);
        for (index_t r = 0; r < n; ++r)
            for (int h = 0; h < 2; ++h) dist[r][h] = select(mask[r][h], e[r][h], dist[r][h]);
    }
    for (index_t r = 0; r < n; ++r) {
        store_lanes(o[r], dist[r][0] * -scale);
        store_lanes(o[r] + 8, dist[r][1] * -scale);
    }
}

// top = max(top, v[0], .., v[N - 1]), where v[i] holds columns j0 + 8i ..
// j0 + 8i + 7 and columns >= len (padding) do not count.
template <class V, int N>
[[gnu::always_inline]] static inline void fold_max(V& top, V (&v)[N], index_t j0, index_t len) {
    constexpr double kNegInf = -std::numeric_limits<double>::infinity();
    if (j0 + 8 * N > len) {
        const V iota = lane_index<V>();
        for (int i = 0; i < N; ++i)
            v[i] = select(iota + static_cast<double>(j0 + 8 * i) < static_cast<double>(len), v[i], splat<V>(kNegInf));
    }
    for (int i = 0; i < N; ++i) top = select(top > v[i], top, v[i]);
}

template <int B>
[[gnu::always_inline]] static inline void logits_direct_at(const double* xt, index_t ld, index_t cols, index_t d,
                                                           const double* y, index_t rows, double scale, double* out,
                                                           index_t len, double* row_max) {
    using V = D8<B>;
    static_assert(kTileAlign % 16 == 0, "two vectors per column block");
    constexpr double kNegInf = -std::numeric_limits<double>::infinity();
    // Four rows at a time share each loaded column vector.
    constexpr index_t kBlockRows = 4;
    for (index_t r0 = 0; r0 < rows; r0 += kBlockRows) {
        const index_t nr = rows - r0 < kBlockRows ? rows - r0 : kBlockRows;
        const double* ys[kBlockRows];
        four_rows(y, d, r0, nr, ys);
        V top[kBlockRows];  // running maxima of the rows, over columns < len
        for (auto& m : top) m = splat<V>(kNegInf);
        for (index_t j0 = 0; j0 < cols; j0 += 16) {
            const double* xs[1] = {xt + j0};
            V acc[kBlockRows][2];
            column_sums<B, kBlockRows, false, true>(xs, ld, d, ys, acc);
            for (index_t r = 0; r < nr; ++r) {
                double* o = out + (r0 + r) * cols + j0;
                V v[2] = {acc[r][0] * -scale, acc[r][1] * -scale};
                store_lanes(o, v[0]);
                store_lanes(o + 8, v[1]);
                if (row_max) fold_max(top[r], v, j0, len);
            }
        }
        for (index_t r = 0; row_max && r < nr; ++r) row_max[r0 + r] = lane_max(top[r]);
    }
}

void logits_direct(const double* xt, index_t ld, index_t cols, index_t d, const double* y, index_t rows,
                   double scale, double* out, index_t len, double* row_max) {
    MAPA_BY_WIDTH(logits_direct_at<B>(xt, ld, cols, d, y, rows, scale, out, len, row_max));
}

// Features per pass over a 16-column panel in logits_expand: 64 x 16
// doubles (8 KiB) stay in L1 while every block of four rows reads them; the
// partial dot products are kept in the output between passes.
constexpr index_t kExpandChunk = 64;

template <int B>
[[gnu::always_inline]] static inline void logits_expand_at(const double* xt, const double* xnorm, index_t ld,
                                                           index_t cols, index_t d, const double* y,
                                                           const double* ynorm, index_t rows, double scale,
                                                           double* out) {
    using V = D8<B>;
    // Each block keeps its 4 x 16 dot products in registers over a chunk of
    // the features; between chunks they wait, exactly, in the output.
    constexpr index_t kBlockRows = 4;
    const double refine_above = refine_floor(scale, d);
    for (index_t j0 = 0; j0 < cols; j0 += 16) {
        const V xn[1][2] = {{load_lanes<V>(xnorm + j0), load_lanes<V>(xnorm + j0 + 8)}};
        for (index_t k0 = 0; k0 < d; k0 += kExpandChunk) {
            const index_t k1 = d - k0 < kExpandChunk ? d : k0 + kExpandChunk;
            for (index_t r0 = 0; r0 < rows; r0 += kBlockRows) {
                const index_t nr = rows - r0 < kBlockRows ? rows - r0 : kBlockRows;
                const double* ys[kBlockRows];
                four_rows(y, d, r0, nr, ys);
                const double* xs[1] = {xt + j0};
                double* o[kBlockRows];
                for (index_t r = 0; r < kBlockRows; ++r) o[r] = out + (r0 + (r < nr ? r : nr - 1)) * cols + j0;
                const double* ysk[kBlockRows] = {ys[0] + k0, ys[1] + k0, ys[2] + k0, ys[3] + k0};
                const double* xsk[1] = {xs[0] + k0 * ld};
                V acc[kBlockRows][2] = {};
                if (k0 > 0) {
                    for (index_t r = 0; r < kBlockRows; ++r)
                        acc[r][0] = load_lanes<V>(o[r]), acc[r][1] = load_lanes<V>(o[r] + 8);
                }
                column_sums<B, kBlockRows, true, true, true>(xsk, ld, k1 - k0, ysk, acc);
                if (k1 < d) {
                    for (index_t r = 0; r < nr; ++r) store_lanes(o[r], acc[r][0]), store_lanes(o[r] + 8, acc[r][1]);
                    continue;
                }
                double yn[kBlockRows];
                for (index_t r = 0; r < kBlockRows; ++r) yn[r] = ynorm[r0 + (r < nr ? r : nr - 1)];
                expand_store<B, kBlockRows, true>(acc, yn, xn, nr, scale, refine_above, xs, ld, d, ys, o);
            }
        }
    }
}

void logits_expand(const double* xt, const double* xnorm, index_t ld, index_t cols, index_t d, const double* y,
                   const double* ynorm, index_t rows, double scale, double* out) {
    MAPA_BY_WIDTH(logits_expand_at<B>(xt, xnorm, ld, cols, d, y, ynorm, rows, scale, out));
}

template <int B>
[[gnu::always_inline]] static inline void logits_visits_at(const double* const* xt, const double* const* xnorm,
                                                           index_t ld, index_t d, const double* const* y,
                                                           const double* ynorm, index_t n, double scale,
                                                           double* out) {
    using V = D8<B>;
    // Up to four (row, block) visits at once: eight independent accumulator
    // chains hide the multiply-add latency that one visit alone would wait on.
    // Missing visits repeat the last one; their results are not stored.
    const double *xs[4], *ys[4];
    four_visits(xt, n, xs);
    four_visits(y, n, ys);
    V acc[4][2];
    if (xnorm) {
        column_sums<B, 4, true, false>(xs, ld, d, ys, acc);
    } else {
        column_sums<B, 4, false, false>(xs, ld, d, ys, acc);
    }
    if (!xnorm) {
        for (index_t v = 0; v < n; ++v) {
            store_lanes(out + 16 * v, acc[v][0] * -scale);
            store_lanes(out + 16 * v + 8, acc[v][1] * -scale);
        }
        return;
    }
    double yn[4];
    V xn[4][2];
    double* o[4];
    for (index_t v = 0; v < 4; ++v) {
        const index_t i = v < n ? v : n - 1;
        yn[v] = ynorm[i];
        xn[v][0] = load_lanes<V>(xnorm[i]), xn[v][1] = load_lanes<V>(xnorm[i] + 8);
        o[v] = out + 16 * i;
    }
    expand_store<B, 4, false>(acc, yn, xn, n, scale, refine_floor(scale, d), xs, ld, d, ys, o);
}

void logits_visits(const double* const* xt, const double* const* xnorm, index_t ld, index_t d,
                   const double* const* y, const double* ynorm, index_t n, double scale, double* out) {
    MAPA_BY_WIDTH(logits_visits_at<B>(xt, xnorm, ld, d, y, ynorm, n, scale, out));
}

// -scale * s for 16 columns of squared distances s, widened to double.
template <int B>
[[gnu::always_inline]] static inline void scaled16(const F16<B>& s, double scale, D8<B>& lo, D8<B>& hi) {
    widen<B>(s, lo, hi);
    lo = lo * -scale;
    hi = hi * -scale;
}

template <int B>
[[gnu::always_inline]] static inline void logits_direct_f_at(const float* xt, index_t ld, index_t cols, index_t d,
                                                             const float* y, index_t rows, double scale, double* out,
                                                             index_t len, double* row_max) {
    using V = D8<B>;
    static_assert(kTileAlign % 32 == 0, "two float vectors per column block");
    constexpr double kNegInf = -std::numeric_limits<double>::infinity();
    constexpr index_t kBlockRows = 4;
    for (index_t r0 = 0; r0 < rows; r0 += kBlockRows) {
        const index_t nr = rows - r0 < kBlockRows ? rows - r0 : kBlockRows;
        const float* ys[kBlockRows];
        four_rows(y, d, r0, nr, ys);
        V top[kBlockRows];
        for (auto& m : top) m = splat<V>(kNegInf);
        for (index_t j0 = 0; j0 < cols; j0 += 32) {
            const float* xs[1] = {xt + j0};
            F16<B> acc[kBlockRows][2];
            column_sums<B, kBlockRows, false, true>(xs, ld, d, ys, acc);
            for (index_t r = 0; r < nr; ++r) {
                double* o = out + (r0 + r) * cols + j0;
                V v[4];
                scaled16<B>(acc[r][0], scale, v[0], v[1]);
                scaled16<B>(acc[r][1], scale, v[2], v[3]);
                for (int i = 0; i < 4; ++i) store_lanes(o + 8 * i, v[i]);
                if (row_max) fold_max(top[r], v, j0, len);
            }
        }
        for (index_t r = 0; row_max && r < nr; ++r) row_max[r0 + r] = lane_max(top[r]);
    }
}

void logits_direct(const float* xt, index_t ld, index_t cols, index_t d, const float* y, index_t rows,
                   double scale, double* out, index_t len, double* row_max) {
    MAPA_BY_WIDTH(logits_direct_f_at<B>(xt, ld, cols, d, y, rows, scale, out, len, row_max));
}

// The fused leaf, in E (64 bytes of lanes, V: sixteen floats or eight
// doubles): distances, logits (-scale s, in E), exponentials and both sums;
// with Store also the squared distances (all columns up to len rounded up
// to 2 L) and each row's least over the first len. self0 >= 0 drops row r's
// term at column self0 + r: its distance is +inf, so its exponential is
// exactly 0.
template <class E, int B, bool Store>
[[gnu::always_inline]] static inline void direct_exp_sums_at(const E* xt, index_t ld, index_t d, const E* y,
                                                            index_t rows, index_t len, double scale,
                                                            double* rowsum, double* colsum, E* dist, E* row_min,
                                                            index_t self0) {
    using V = lanes64<E, B>;
    constexpr index_t L = lanes_of<V>, W = 2 * L;  // lanes; columns per step
    static_assert(kTileAlign % W == 0, "two vectors per column block");
    constexpr E kInf = std::numeric_limits<E>::infinity();
    constexpr index_t kBlockRows = 4;
    const index_t cols = (len + W - 1) / W * W;  // <= ld
    const E ms = static_cast<E>(-scale);
    const V iota = lane_index<V>();
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
        for (auto& m : low) m = splat<V>(kInf);
        for (index_t j0 = 0; j0 < cols; j0 += W) {
            V acc[kBlockRows][2];
            const E* xs[1] = {xt + j0};
            column_sums<B, kBlockRows, false, true>(xs, ld, d, ys, acc);
            if (self0 >= 0 && self0 + r0 + kBlockRows > j0 && self0 + r0 < j0 + W) {
                for (index_t r = 0; r < kBlockRows; ++r)
                    for (int h = 0; h < 2; ++h)
                        acc[r][h] = select(iota + static_cast<E>(j0 + L * h) == static_cast<E>(self0 + r0 + r),
                                           splat<V>(kInf), acc[r][h]);
            }
            // columns at or beyond len (padding) take no part
            const bool tail = j0 + W > len;
            const auto in0 = iota + static_cast<E>(j0) < static_cast<E>(len);
            const auto in1 = iota + static_cast<E>(j0 + L) < static_cast<E>(len);
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
                        a = select(in0, a, splat<V>(kInf));
                        b = select(in1, b, splat<V>(kInf));
                    }
                    const V m = select(a < b, a, b);
                    low[r] = select(m < low[r], m, low[r]);
                }
                V q0 = exp_lanes(acc[r][0] * ms), q1 = exp_lanes(acc[r][1] * ms);
                if (tail) {
                    q0 = select(in0, q0, V{});
                    q1 = select(in1, q1, V{});
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
            for (index_t i = 0; i < L; ++i) s += lane(rs[r], static_cast<int>(i));
            rowsum[r0 + r] += static_cast<double>(s);
            if constexpr (Store) row_min[r0 + r] = lane_min(low[r]);
        }
    }
    if (!colsum) return;
#pragma omp simd
    for (index_t j = 0; j < len; ++j) colsum[j] += static_cast<double>(cs[j]);
}

void direct_exp_sums(const float* xt, index_t ld, index_t d, const float* y, index_t rows, index_t len,
                     double scale, double* rowsum, double* colsum, float* dist, float* row_min, index_t self0) {
    if (dist) {
        MAPA_BY_WIDTH(direct_exp_sums_at<float, B, true>(xt, ld, d, y, rows, len, scale, rowsum, colsum, dist,
                                                         row_min, self0));
    } else {
        MAPA_BY_WIDTH(direct_exp_sums_at<float, B, false>(xt, ld, d, y, rows, len, scale, rowsum, colsum, nullptr,
                                                          nullptr, self0));
    }
}

void direct_exp_sums(const double* xt, index_t ld, index_t d, const double* y, index_t rows, index_t len,
                     double scale, double* rowsum, double* colsum, index_t self0) {
    MAPA_BY_WIDTH(direct_exp_sums_at<double, B, false>(xt, ld, d, y, rows, len, scale, rowsum, colsum, nullptr,
                                                       nullptr, self0));
}

template <int B>
[[gnu::always_inline]] static inline void direct_exp_at(const float* xt, index_t ld, index_t d, const float* y,
                                                        index_t rows, double scale, float* q, index_t qld) {
    constexpr index_t kBlockRows = 4;
    const float ms = static_cast<float>(-scale);
    for (index_t r0 = 0; r0 < rows; r0 += kBlockRows) {
        const index_t nr = rows - r0 < kBlockRows ? rows - r0 : kBlockRows;
        const float* ys[kBlockRows];
        four_rows(y, d, r0, nr, ys);
        for (index_t j0 = 0; j0 < ld; j0 += 32) {
            const float* xs[1] = {xt + j0};
            F16<B> acc[kBlockRows][2];
            column_sums<B, kBlockRows, false, true>(xs, ld, d, ys, acc);
            for (index_t r = 0; r < nr; ++r) {
                float* o = q + (r0 + r) * qld + j0;
                store_lanes(o, exp_lanes(acc[r][0] * ms));
                store_lanes(o + 16, exp_lanes(acc[r][1] * ms));
            }
        }
    }
}

void direct_exp(const float* xt, index_t ld, index_t d, const float* y, index_t rows, double scale, float* q,
                index_t qld) {
    MAPA_BY_WIDTH(direct_exp_at<B>(xt, ld, d, y, rows, scale, q, qld));
}

template <int B>
[[gnu::always_inline]] static inline void logits_visits_f_at(const float* const* xt, index_t ld, index_t d,
                                                             const float* const* y, index_t n, double scale,
                                                             double* out) {
    const float *xs[4], *ys[4];
    four_visits(xt, n, xs);
    four_visits(y, n, ys);
    F16<B> acc[4][1];
    column_sums<B, 4, false, false>(xs, ld, d, ys, acc);
    for (int v = 0; v < static_cast<int>(n); ++v) {
        D8<B> lo, hi;
        scaled16<B>(acc[v][0], scale, lo, hi);
        store_lanes(out + 16 * v, lo);
        store_lanes(out + 16 * v + 8, hi);
    }
}

void logits_visits(const float* const* xt, index_t ld, index_t d, const float* const* y, index_t n, double scale,
                   double* out) {
    MAPA_BY_WIDTH(logits_visits_f_at<B>(xt, ld, d, y, n, scale, out));
}

MAPA_CLONES
double tile_max(const double* v, index_t len) {
    double m = -std::numeric_limits<double>::infinity();
#pragma omp simd reduction(max : m)
    for (index_t j = 0; j < len; ++j) m = v[j] > m ? v[j] : m;
    return m;
}

// The tests the scans below take, on vectors (giving lane masks) and on
// scalars alike.
struct AtLeast {
    template <class A, class T>
    [[gnu::always_inline]] auto operator()(const A& a, const T& t) const {
        return a >= t;
    }
};
struct AtMost {
    template <class A, class T>
    [[gnu::always_inline]] auto operator()(const A& a, const T& t) const {
        return a <= t;
    }
};

// Writes the positions j < len with hit(v[j], t) to out, ascending; returns
// how many. Runs of 16 with no hit are skipped by one vector test; a run
// with hits is compacted without branches.
template <int B, class E, class Hit>
[[gnu::always_inline]] static inline index_t positions_where(const E* v, index_t len, E t, Hit hit,
                                                             std::int32_t* out) {
    using V = lanes64<E, B>;
    constexpr index_t L = lanes_of<V>;  // 8 doubles or 16 floats
    static_assert(16 % L == 0, "runs of 16");
    index_t c = 0, j = 0;
    for (; j + 16 <= len; j += 16) {
        auto any = hit(load_lanes<V>(v + j), t);
        for (index_t i = L; i < 16; i += L) any = any | hit(load_lanes<V>(v + j + i), t);
        if (!any_lane(any)) continue;
        for (index_t i = j; i < j + 16; ++i) {
            out[c] = static_cast<std::int32_t>(i);
            c += hit(v[i], t);
        }
    }
    for (; j < len; ++j) {
        out[c] = static_cast<std::int32_t>(j);
        c += hit(v[j], t);
    }
    return c;
}

index_t positions_at_least(const double* v, index_t len, double thr, std::int32_t* out) {
    MAPA_BY_WIDTH(positions_where<B>(v, len, thr, AtLeast{}, out));
}

index_t positions_at_most(const float* s, index_t len, float bound, std::int32_t* out) {
    MAPA_BY_WIDTH(positions_where<B>(s, len, bound, AtMost{}, out));
}

// Writes the columns j < len at which some row r < rows of v (row stride
// ld) has hit(v[r * ld + j], t[j]) to cols, ascending, and the set of those
// rows (bit r) to masks; returns how many. A lane group of columns at a
// time: one test per row against the columns' t, or-ed over the rows; only
// a group with a hit is tested again for each column's row mask.
template <int B, class E, class Hit>
[[gnu::always_inline]] static inline index_t columns_where(const E* v, index_t ld, index_t rows, index_t len,
                                                           const E* t, Hit hit, std::int32_t* cols,
                                                           std::uint32_t* masks) {
    using V = lanes64<E, B>;
    using M = decltype(V{} < V{});
    using Bit = lane_t<M>;
    constexpr index_t L = lanes_of<V>;
    index_t c = 0, j = 0;
    for (; j + L <= len; j += L) {
        const V tj = load_lanes<V>(t + j);
        M any = {};
        for (index_t r = 0; r < rows; ++r) any |= hit(load_lanes<V>(v + r * ld + j), tj);
        if (!any_lane(any)) continue;
        M bits = {};
        for (index_t r = 0; r < rows; ++r)
            bits |= hit(load_lanes<V>(v + r * ld + j), tj) & static_cast<Bit>(std::uint64_t{1} << r);
        for (int i = 0; i < static_cast<int>(L); ++i) {
            cols[c] = static_cast<std::int32_t>(j + i);
            masks[c] = static_cast<std::uint32_t>(lane(bits, i));
            c += lane(bits, i) != 0;
        }
    }
    for (; j < len; ++j) {
        std::uint32_t bits = 0;
        for (index_t r = 0; r < rows; ++r) bits |= static_cast<std::uint32_t>(hit(v[r * ld + j], t[j])) << r;
        cols[c] = static_cast<std::int32_t>(j);
        masks[c] = bits;
        c += bits != 0;
    }
    return c;
}

index_t columns_at_least(const double* v, index_t ld, index_t rows, index_t len, const double* thr,
                         std::int32_t* cols, std::uint32_t* masks) {
    MAPA_BY_WIDTH(columns_where<B>(v, ld, rows, len, thr, AtLeast{}, cols, masks));
}

index_t columns_at_most(const float* s, index_t ld, index_t rows, index_t len, const float* bound,
                        std::int32_t* cols, std::uint32_t* masks) {
    MAPA_BY_WIDTH(columns_where<B>(s, ld, rows, len, bound, AtMost{}, cols, masks));
}

// Lane b of the result is op over the 8 lanes of m[b]: a butterfly of three
// shuffle-and-op levels, 7 + 7 operations for 8 horizontal reductions (one
// AVX-512 register per vector). Lane b's value is
// ((m0 op m1) op (m2 op m3)) op ((m4 op m5) op (m6 op m7)) over m[b]'s lanes.
typedef double v8d __attribute__((vector_size(64)));
template <class Op>
[[gnu::always_inline]] static inline v8d lane_reduce(const v8d m[8], Op op) {
    typedef long long v8l __attribute__((vector_size(64)));
    const auto level = [&](v8d a, v8d b, v8l lo, v8l hi) __attribute__((always_inline)) {
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

// The same tree over the eight lanes of one vector, for narrower pieces.
template <class V, class Op>
[[gnu::always_inline]] static inline double lane_tree(const V& m, Op op) {
    double t[8];
    for (int i = 0; i < 8; ++i) t[i] = lane(m, i);
    return op(op(op(t[0], t[1]), op(t[2], t[3])), op(op(t[4], t[5]), op(t[6], t[7])));
}

template <int B>
[[gnu::always_inline]] static inline index_t block_max16_at(const double* v, index_t len, double* out) {
    using V = D8<B>;
    const index_t full = len / 16;
    index_t b = 0;
    for (; b + 8 <= full; b += 8) {
        V m[8];
        for (int i = 0; i < 8; ++i) {
            const V a = load_lanes<V>(v + 16 * (b + i)), c = load_lanes<V>(v + 16 * (b + i) + 8);
            m[i] = select(a > c, a, c);
        }
        if constexpr (B == 64) {
            store_lanes(out + b, lane_reduce(m, [](v8d x, v8d y) __attribute__((always_inline)) { return x > y ? x : y; }));
        } else {
            for (int i = 0; i < 8; ++i) out[b + i] = lane_tree(m[i], [](double x, double y) __attribute__((always_inline)) { return x > y ? x : y; });
        }
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

index_t block_max16(const double* v, index_t len, double* out) { MAPA_BY_WIDTH(block_max16_at<B>(v, len, out)); }

// Up to this many entries rank_order compares all pairs; beyond it, sorts.
constexpr index_t kRankAllPairs = 256;

template <int B>
[[gnu::always_inline]] static inline void rank_order_at(const double* val, const std::int64_t* idx, index_t n,
                                                        std::int64_t* rank) {
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
    // a native vector at a time (less than the mispredictions of a sort).
    // Rounding to float keeps order (v_j > v_i gives key_j >= key_i), so only
    // entries whose keys are equal need the exact comparison; NaN pads
    // compare false.
    using H = vec<float, B>;
    using HI = vec<std::int32_t, B>;
    constexpr index_t lanes = lanes_of<H>;
    H key[kRankAllPairs / lanes];
    const index_t blocks = (n + lanes - 1) / lanes;
    for (index_t j = 0; j < blocks * lanes; ++j)
        key[j / lanes][j % lanes] = j < n ? static_cast<float>(val[j]) : std::numeric_limits<float>::quiet_NaN();
    for (index_t i = 0; i < n; ++i) {
        const float ki = key[i / lanes][i % lanes];
        HI above = {}, same = {};
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

void rank_order(const double* val, const std::int64_t* idx, index_t n, std::int64_t* rank) {
    MAPA_BY_WIDTH(rank_order_at<B>(val, idx, n, rank));
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

template <class E, int B>
[[gnu::always_inline]] static inline void accumulate_targets_at(const double* v, index_t ld, const double* log_norm,
                                                               const double* y, const double* sq, index_t rows,
                                                               index_t d, double* w, double* s1t, double* s2) {
    using V = D8<B>;
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
            V aw[4], as[4];
#pragma GCC unroll 4
            for (int i = 0; i < 4; ++i)
                aw[i] = load_lanes<V>(w + j0 + j + 8 * i), as[i] = load_lanes<V>(s2 + j0 + j + 8 * i);
            for (index_t r = 0; r < rows; ++r) {
#pragma GCC unroll 4
                for (int i = 0; i < 4; ++i) {
                    const V qr = load_lanes<V>(&q[r][j + 8 * i]);
                    aw[i] += qr;
                    as[i] += qr * sq[r];
                }
            }
#pragma GCC unroll 4
            for (int i = 0; i < 4; ++i)
                store_lanes(w + j0 + j + 8 * i, aw[i]), store_lanes(s2 + j0 + j + 8 * i, as[i]);
        }
        for (index_t k = 0; k < d; ++k) {
            double* row = s1t + k * ld + j0;
            for (index_t j = 0; j < n; j += 32) {
                V a[4];
#pragma GCC unroll 4
                for (int i = 0; i < 4; ++i) a[i] = load_lanes<V>(row + j + 8 * i);
                for (index_t r = 0; r < rows; ++r) {
                    const double yk = y[r * d + k];
#pragma GCC unroll 4
                    for (int i = 0; i < 4; ++i) a[i] += load_lanes<V>(&q[r][j + 8 * i]) * yk;
                }
#pragma GCC unroll 4
                for (int i = 0; i < 4; ++i) store_lanes(row + j + 8 * i, a[i]);
            }
        }
    }
}

void accumulate_targets(const double* v, index_t ld, const double* log_norm, const double* y, const double* sq,
                        index_t rows, index_t d, double* w, double* s1t, double* s2, double) {
    MAPA_BY_WIDTH(accumulate_targets_at<double, B>(v, ld, log_norm, y, sq, rows, d, w, s1t, s2));
}

void accumulate_targets(const double* v, index_t ld, const double* log_norm, const double* y, const double* sq,
                        index_t rows, index_t d, double* w, double* s1t, double* s2, float) {
    MAPA_BY_WIDTH(accumulate_targets_at<float, B>(v, ld, log_norm, y, sq, rows, d, w, s1t, s2));
}

// rowacc[(k0 + c) * ld + r0 + i] += the lane sum of t[i][c], for the nr
// rows and nk features of a four-row, two-feature block; each lane sum in
// lane_reduce's order at every width.
template <int B>
[[gnu::always_inline]] static inline void add_row_sums(const D8<B> (&t)[4][2], index_t nr, index_t nk, index_t k0,
                                                       index_t r0, index_t ld, double* rowacc) {
    const auto add = [](double x, double y) __attribute__((always_inline)) { return x + y; };
    double sum[8];
    if constexpr (B == 64) {
        const v8d m[8] = {t[0][0], t[0][1], t[1][0], t[1][1], t[2][0], t[2][1], t[3][0], t[3][1]};
        store_lanes(sum, lane_reduce(m, [](v8d x, v8d y) __attribute__((always_inline)) { return x + y; }));
    } else {
        for (int i = 0; i < 8; ++i) sum[i] = lane_tree(t[i / 2][i % 2], add);
    }
    for (index_t i = 0; i < nr; ++i)
        for (index_t c = 0; c < nk; ++c) rowacc[(k0 + c) * ld + r0 + i] += sum[2 * i + c];
}

template <int B>
[[gnu::always_inline]] static inline void pair_targets_at(const double* v, index_t ld, index_t rows, const double* u,
                                                         const double* ut, index_t dw, double* colacc,
                                                         double* rowacc, double* q0) {
    using V = D8<B>;
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
            V a[4];
#pragma GCC unroll 4
            for (int i = 0; i < 4; ++i) a[i] = load_lanes<V>(c + 8 * i);
            for (index_t r = 0; r < rows; ++r) {
                const double w = u[r * dw + k];
                const double* q = q0 + r * qld + j;
#pragma GCC unroll 4
                for (int i = 0; i < 4; ++i) a[i] += load_lanes<V>(q + 8 * i) * w;
            }
#pragma GCC unroll 4
            for (int i = 0; i < 4; ++i) store_lanes(c + 8 * i, a[i]);
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
            V s[4][2] = {};
            for (index_t j = 0; j < ld; j += 8) {
                const V a = load_lanes<V>(uk[0] + j), b = load_lanes<V>(uk[1] + j);
#pragma GCC unroll 4
                for (int i = 0; i < 4; ++i) {
                    const V qi = load_lanes<V>(q[i] + j);
                    s[i][0] += qi * a;
                    s[i][1] += qi * b;
                }
            }
            add_row_sums<B>(s, nr, nk, k0, r0, ld, rowacc);
        }
    }
}

void pair_targets(const double* v, index_t ld, index_t rows, const double* u, const double* ut, index_t dw,
                  double* colacc, double* rowacc, double* q0) {
    MAPA_BY_WIDTH(pair_targets_at<B>(v, ld, rows, u, ut, dw, colacc, rowacc, q0));
}

// The products of the float pair_targets, from q (row stride qld): as the
// double version, with q and the products in single precision: each
// column's terms summed over the block's rows, and each row's over 256
// columns at a time (16 terms per lane either way), in float, then added in
// double.
template <int B>
[[gnu::always_inline]] static inline void pair_products(const float* q0, index_t qld, index_t ld, index_t rows,
                                                       const float* u, const float* ut, index_t dw,
                                                       double* colacc, double* rowacc) {
    using V = D8<B>;
    using F = F16<B>;
    static_assert(kTileAlign % 32 == 0, "two float vectors per column group");
    for (index_t j = 0; j < ld; j += 32) {
        // four features at a time: eight independent sums; missing features
        // repeat the last one and are not stored
        for (index_t k0 = 0; k0 < dw; k0 += 4) {
            const index_t nk = dw - k0 < 4 ? dw - k0 : 4;
            const index_t kk[4] = {k0, k0 + (nk > 1 ? 1 : 0), k0 + (nk > 2 ? 2 : nk - 1), k0 + (nk > 3 ? 3 : nk - 1)};
            F p[4][2] = {};
            for (index_t r = 0; r < rows; ++r) {
                const float* q = q0 + r * qld + j;
                const F a = load_lanes<F>(q), b = load_lanes<F>(q + 16);
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
                    V lo, hi;
                    widen<B>(p[c][h], lo, hi);
                    store_lanes(o + 16 * h, load_lanes<V>(o + 16 * h) + lo);
                    store_lanes(o + 16 * h + 8, load_lanes<V>(o + 16 * h + 8) + hi);
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
            V t[4][2] = {};
            for (index_t c0 = 0; c0 < ld; c0 += 256) {
                const index_t c1 = c0 + 256 < ld ? c0 + 256 : ld;
                F s[4][2] = {};
                for (index_t j = c0; j < c1; j += 16) {
                    const F a = load_lanes<F>(uk[0] + j), b = load_lanes<F>(uk[1] + j);
#pragma GCC unroll 4
                    for (int i = 0; i < 4; ++i) {
                        const F qi = load_lanes<F>(q[i] + j);
                        s[i][0] += qi * a;
                        s[i][1] += qi * b;
                    }
                }
                for (int i = 0; i < 4; ++i)
                    for (int c = 0; c < 2; ++c) {
                        V lo, hi;
                        widen<B>(s[i][c], lo, hi);
                        t[i][c] += lo + hi;
                    }
            }
            add_row_sums<B>(t, nr, nk, k0, r0, ld, rowacc);
        }
    }
}

template <int B>
[[gnu::always_inline]] static inline void pair_targets_f_at(const double* v, index_t ld, index_t rows, const float* u,
                                                           const float* ut, index_t dw, double* colacc,
                                                           double* rowacc, float* q0) {
    const index_t qld = ld + 16;
    for (index_t r = 0; r < rows; ++r) {
        const double* vr = v + r * ld;
        float* qr = q0 + r * qld;
#pragma omp simd
        for (index_t j = 0; j < ld; ++j) qr[j] = exp_nonpos(static_cast<float>(vr[j]));
    }
    pair_products<B>(q0, qld, ld, rows, u, ut, dw, colacc, rowacc);
}

void pair_targets(const double* v, index_t ld, index_t rows, const float* u, const float* ut, index_t dw,
                  double* colacc, double* rowacc, float* q0) {
    MAPA_BY_WIDTH(pair_targets_f_at<B>(v, ld, rows, u, ut, dw, colacc, rowacc, q0));
}

void pair_targets(const float* q, index_t qld, index_t ld, index_t rows, const float* u, const float* ut,
                  index_t dw, double* colacc, double* rowacc) {
    MAPA_BY_WIDTH(pair_products<B>(q, qld, ld, rows, u, ut, dw, colacc, rowacc));
}

int vector_bytes() { return kPieceBytes; }
int cpu_vector_bytes() { return cpu_piece_bytes(); }

const char* selected_isa() {
#if MAPA_HAVE_CLONES
    const int cpu = cpu_piece_bytes();
    if (kPieceBytes < cpu) {
        return kPieceBytes == 32 ? "avx2+fma (x86-64-v3, capped by MAPA_VECTOR_BYTES)"
                                 : "baseline x86-64 (capped by MAPA_VECTOR_BYTES)";
    }
    if (cpu == 64) return "avx512 (x86-64-v4 clone)";
    if (cpu == 32) return "avx2+fma (x86-64-v3 clone)";
    return "baseline x86-64 (default clone)";
#else
    return "single build (no target clones on this compiler/arch)";
#endif
}

}  // namespace mapa
