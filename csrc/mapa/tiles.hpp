// Tile-level leaf loops of the kernel: the only code that runs per pair.
//
// Every leaf works on double-precision, tile-packed data and is compiled as
// GCC target clones (AVX-512, AVX2+FMA and baseline x86-64), picked at load
// time by the CPU it runs on, so one wheel runs on any x86-64 and uses the
// widest vectors available.
//
// Packed layout: references are cut into tiles of `tb` points; tile t holds
// `d` rows of `ld` doubles (feature-major, ld = tb rounded up to kTileAlign),
// so the loops over references are contiguous. Padding columns are zero;
// leaves compute all `ld` columns and callers ignore the padding.
#pragma once

#include <cstdint>

namespace mapa {

using index_t = std::int64_t;

// Row stride of packed tiles and logit buffers is a multiple of this.
constexpr index_t kTileAlign = 32;

// out[r * ld + j] = -scale * ||y_r - x_j||^2 by explicit differences, for
// rows r < rows and every column j < ld of the tile (accurate for any offset).
void logits_direct(const double* xt, index_t ld, index_t d, const double* y, index_t rows,
                   double scale, double* out);

// Same quantity from the expansion ||y||^2 + ||x||^2 - 2 y.x (clamped at 0),
// register-blocked over four rows: the fast path for many features.
void logits_expand(const double* xt, const double* xnorm, index_t ld, index_t d, const double* y,
                   const double* ynorm, index_t rows, double scale, double* out);

// max_j v[j] (-inf when len == 0 or all entries are -inf).
double tile_max(const double* v, index_t len);

// Smallest j in [start, len) with v[j] >= thr, or len if there is none.
index_t next_at_least(const double* v, index_t start, index_t len, double thr);

// out[b] = max of v[16 b .. 16 b + 16) clipped to len; returns the block count.
index_t block_max16(const double* v, index_t len, double* out);

// sum_j exp(v[j] - shift) for v[j] <= shift. The float overload evaluates
// the exponentials in single precision (for float32 problems, where a
// relative error of ~1e-7 is below the output's resolution).
double sum_exp_shifted(const double* v, index_t len, double shift, double);
double sum_exp_shifted(const double* v, index_t len, double shift, float);

// dst[j] = v[j] - shift, converted to the output type.
void store_shifted(const double* v, index_t len, double shift, double* dst);
void store_shifted(const double* v, index_t len, double shift, float* dst);

// dst[j] += offset, computed in double.
void add_offset(double* dst, index_t len, double offset);
void add_offset(float* dst, index_t len, double offset);

// With q_j = exp(v[j] - log_norm): w[j] += q_j, s2[j] += q_j * sq,
// s1t[k * ld + j] += q_j * y[k] for every feature k.
// The last argument picks the precision of the exponentials, as above.
void accumulate_targets(const double* v, index_t ld, double log_norm, const double* y, index_t d,
                        double sq, double* w, double* s1t, double* s2, double);
void accumulate_targets(const double* v, index_t ld, double log_norm, const double* y, index_t d,
                        double sq, double* w, double* s1t, double* s2, float);

// Name of the clone the loader picked on this CPU ("avx512", "avx2", "baseline").
const char* selected_isa();

}  // namespace mapa
