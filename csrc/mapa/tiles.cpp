#include "tiles.hpp"

#include <cmath>
#include <cstring>
#include <limits>

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

[[gnu::always_inline]] static inline v8d load8(const double* p) {
    v8d v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
[[gnu::always_inline]] static inline void store8(double* p, v8d v) { std::memcpy(p, &v, sizeof v); }

// Pointers to rows r0 .. r0 + 3 of y (row length d) for a four-row block of
// which nr >= 1 rows exist; missing rows repeat the last one, and their
// results are not stored.
[[gnu::always_inline]] static inline void four_rows(const double* y, index_t d, index_t r0, index_t nr,
                                                    const double*& y0, const double*& y1,
                                                    const double*& y2, const double*& y3) {
    y0 = y + r0 * d;
    y1 = y + (r0 + (nr > 1 ? 1 : 0)) * d;
    y2 = y + (r0 + (nr > 2 ? 2 : nr - 1)) * d;
    y3 = y + (r0 + (nr > 3 ? 3 : nr - 1)) * d;
}

MAPA_CLONES
void logits_direct(const double* xt, index_t ld, index_t d, const double* y, index_t rows,
                   double scale, double* out) {
    static_assert(kTileAlign % 16 == 0, "two vectors per column block");
    // Four rows at a time share each loaded column vector.
    constexpr index_t kBlockRows = 4;
    for (index_t r0 = 0; r0 < rows; r0 += kBlockRows) {
        const index_t nr = rows - r0 < kBlockRows ? rows - r0 : kBlockRows;
        const double *y0, *y1, *y2, *y3;
        four_rows(y, d, r0, nr, y0, y1, y2, y3);
        for (index_t j0 = 0; j0 < ld; j0 += 16) {
            v8d a00 = {}, a01 = {}, a10 = {}, a11 = {}, a20 = {}, a21 = {}, a30 = {}, a31 = {};
            const double* xk = xt + j0;
            for (index_t k = 0; k < d; ++k, xk += ld) {
                const v8d x0 = load8(xk), x1 = load8(xk + 8);
                v8d e0 = x0 - y0[k], e1 = x1 - y0[k];
                a00 += e0 * e0;
                a01 += e1 * e1;
                e0 = x0 - y1[k];
                e1 = x1 - y1[k];
                a10 += e0 * e0;
                a11 += e1 * e1;
                e0 = x0 - y2[k];
                e1 = x1 - y2[k];
                a20 += e0 * e0;
                a21 += e1 * e1;
                e0 = x0 - y3[k];
                e1 = x1 - y3[k];
                a30 += e0 * e0;
                a31 += e1 * e1;
            }
            const v8d acc[kBlockRows][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}};
            for (index_t r = 0; r < nr; ++r) {
                double* o = out + (r0 + r) * ld + j0;
                store8(o, acc[r][0] * -scale);
                store8(o + 8, acc[r][1] * -scale);
            }
        }
    }
}

MAPA_CLONES
void logits_expand(const double* xt, const double* xnorm, index_t ld, index_t d, const double* y,
                   const double* ynorm, index_t rows, double scale, double* out) {
    // A 16-column panel of the tile (d x 16 doubles) is reused by every block
    // of four rows before moving on, so it is read from L1, not L2; each
    // block keeps its 4 x 16 dot products in eight vector registers.
    constexpr index_t kBlockRows = 4;
    for (index_t j0 = 0; j0 < ld; j0 += 16) {
        const v8d xn0 = load8(xnorm + j0), xn1 = load8(xnorm + j0 + 8);
        for (index_t r0 = 0; r0 < rows; r0 += kBlockRows) {
            const index_t nr = rows - r0 < kBlockRows ? rows - r0 : kBlockRows;
            const double *y0, *y1, *y2, *y3;
            four_rows(y, d, r0, nr, y0, y1, y2, y3);
            v8d a00 = {}, a01 = {}, a10 = {}, a11 = {}, a20 = {}, a21 = {}, a30 = {}, a31 = {};
            const double* xk = xt + j0;
            for (index_t k = 0; k < d; ++k, xk += ld) {
                const v8d x0 = load8(xk), x1 = load8(xk + 8);
                a00 += y0[k] * x0;
                a01 += y0[k] * x1;
                a10 += y1[k] * x0;
                a11 += y1[k] * x1;
                a20 += y2[k] * x0;
                a21 += y2[k] * x1;
                a30 += y3[k] * x0;
                a31 += y3[k] * x1;
            }
            const v8d acc[kBlockRows][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}};
            for (index_t r = 0; r < nr; ++r) {
                double* o = out + (r0 + r) * ld + j0;
                const double yn = ynorm[r0 + r];
                v8d d0 = yn + xn0 - 2.0 * acc[r][0];
                v8d d1 = yn + xn1 - 2.0 * acc[r][1];
                d0 = d0 > 0.0 ? d0 : 0.0;
                d1 = d1 > 0.0 ? d1 : 0.0;
                store8(o, d0 * -scale);
                store8(o + 8, d1 * -scale);
            }
        }
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
index_t next_at_least(const double* v, index_t start, index_t len, double thr) {
    index_t j = start;
    for (; j + 16 <= len; j += 16) {
        const v8d a = load8(v + j), b = load8(v + j + 8);
        const v8d m = a > b ? a : b;
        double top = m[0];
        for (int i = 1; i < 8; ++i) top = m[i] > top ? m[i] : top;
        if (top >= thr) break;
    }
    for (; j < len; ++j)
        if (v[j] >= thr) return j;
    return len;
}

MAPA_CLONES
index_t block_max16(const double* v, index_t len, double* out) {
    const index_t full = len / 16;
    for (index_t b = 0; b < full; ++b) {
        const v8d a = load8(v + 16 * b), c = load8(v + 16 * b + 8);
        const v8d m = a > c ? a : c;
        double r = m[0];
        for (int i = 1; i < 8; ++i) r = m[i] > r ? m[i] : r;
        out[b] = r;
    }
    if (full * 16 == len) return full;
    double r = -std::numeric_limits<double>::infinity();
    for (index_t j = full * 16; j < len; ++j) r = v[j] > r ? v[j] : r;
    out[full] = r;
    return full + 1;
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
[[gnu::always_inline]] static inline void accumulate_targets_impl(const double* v, index_t ld,
                                                                 double log_norm, const double* y,
                                                                 index_t d, double sq, double* w,
                                                                 double* s1t, double* s2) {
    // Exponentials first, in their own loop, so each loop vectorises at its
    // natural width; the sums stay in double.
    E qe[512];
    double q[512];
    for (index_t j0 = 0; j0 < ld; j0 += 512) {
        const index_t n = ld - j0 < 512 ? ld - j0 : 512;
#pragma omp simd
        for (index_t j = 0; j < n; ++j) qe[j] = exp_nonpos(static_cast<E>(v[j0 + j] - log_norm));
#pragma omp simd
        for (index_t j = 0; j < n; ++j) {
            const double qj = qe[j];
            q[j] = qj;
            w[j0 + j] += qj;
            s2[j0 + j] += qj * sq;
        }
        for (index_t k = 0; k < d; ++k) {
            const double yk = y[k];
            double* row = s1t + k * ld + j0;
#pragma omp simd
            for (index_t j = 0; j < n; ++j) row[j] += q[j] * yk;
        }
    }
}

MAPA_CLONES
void accumulate_targets(const double* v, index_t ld, double log_norm, const double* y, index_t d,
                        double sq, double* w, double* s1t, double* s2, double) {
    accumulate_targets_impl<double>(v, ld, log_norm, y, d, sq, w, s1t, s2);
}

MAPA_CLONES
void accumulate_targets(const double* v, index_t ld, double log_norm, const double* y, index_t d,
                        double sq, double* w, double* s1t, double* s2, float) {
    accumulate_targets_impl<float>(v, ld, log_norm, y, d, sq, w, s1t, s2);
}

const char* selected_isa() {
#if MAPA_HAVE_CLONES
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return "avx512 (x86-64-v4 clone)";
    if (__builtin_cpu_supports("x86-64-v3")) return "avx2+fma (x86-64-v3 clone)";
    return "baseline x86-64 (default clone)";
#else
    return "single build (no target clones on this compiler/arch)";
#endif
}

}  // namespace mapa
