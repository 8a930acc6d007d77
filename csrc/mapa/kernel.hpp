// The MAPA posterior kernel: blocked distances and streaming log-sum-exp.
//
// Inputs are C-contiguous references X (n, d) and queries Y (m, d) of type T
// (float or double), already centred by the caller. All arithmetic is in
// double, except that float32 problems with at most kDirectMaxFeatures
// features form squared distances and the exponentials in float (rows whose
// log Z is too low for float distances are redone in double, drift_floor in
// kernel.cpp); results are converted to T only when written. No function holds an
// (m, n) matrix except log_posterior, whose output is that matrix.
#pragma once

#include <cstdint>

#include "control.hpp"

namespace mapa {

struct Args {
    const void* x;       // (n, d)
    std::int64_t n;
    const void* y;       // (m, d); equals x when exclude_self
    std::int64_t m;
    std::int64_t d;
    double scale;        // 1 / (2 h^2)
    bool exclude_self;   // drop the (i, i) terms; requires y == x
    std::int64_t tile;   // references per tile; 0 = default
    int threads;         // >= 1
};

// out (m,): log sum_j exp(-scale ||y_i - x_j||^2)
template <class T>
void log_normalizer(const Args& a, T* out, Control& ctl);

// out (m, n): log q(j | i)
template <class T>
void log_posterior(const Args& a, T* out, Control& ctl);

// indices/log_prob (m, k), log_norm (m,)
template <class T>
void topk(const Args& a, std::int64_t k, std::int64_t* indices, T* log_prob, T* log_norm, Control& ctl);

// w (n,), s1 (n, d), s2 (n,) in double; queries are the references.
template <class T>
void targets(const Args& a, double* w, double* s1, double* s2, Control& ctl);

// Tile length used for a problem of this shape when the caller passes 0;
// single: a float32 problem on the direct path (float tiles).
std::int64_t default_tile(std::int64_t n, std::int64_t d, bool single = false);

// Features above which distances use the ||y||^2 + ||x||^2 - 2 y.x form.
constexpr std::int64_t kDirectMaxFeatures = 32;

bool have_openmp();
int openmp_version();
int max_threads();

}  // namespace mapa
