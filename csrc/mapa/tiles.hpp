// Tile-level leaf loops of the kernel: the only code that runs per pair.
//
// Every leaf works on tile-packed data and is compiled once per x86-64 level
// (AVX-512, AVX2+FMA and baseline), picked at load time by the CPU it runs
// on, so one wheel runs on any x86-64 and uses the widest vectors
// available: the leaves that hold vectors are templates on the native
// width (lanes.hpp), run through MAPA_BY_WIDTH; the plain loops are GCC
// target clones.
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

// out[r * cols + j] = -scale * ||y_r - x_j||^2 by explicit differences, for
// rows r < rows and columns j < cols (a multiple of 16) of a tile with row
// stride ld (accurate for any offset). A column's value does not depend on
// `rows` or `cols`. Unless row_max is null, row_max[r] = max of row r over
// the columns j < len, found in passing.
void logits_direct(const double* xt, index_t ld, index_t cols, index_t d, const double* y,
                   index_t rows, double scale, double* out, index_t len = 0, double* row_max = nullptr);

// Same quantity from the expansion ||y||^2 + ||x||^2 - 2 y.x (clamped at 0),
// register-blocked over four rows: the fast path for many features. Where
// the expansion's rounding (relative to the norms) could swamp a distance,
// the column is recomputed by explicit differences as logits_direct sums
// them (tiles.cpp, kRefineShare): close points far from the mean at a small
// bandwidth keep logits_direct's accuracy.
void logits_expand(const double* xt, const double* xnorm, index_t ld, index_t cols, index_t d,
                   const double* y, const double* ynorm, index_t rows, double scale, double* out);

// n <= 4 visits at once: visit v is one row y[v] against the 16 columns at
// xt[v] (row stride ld), written to out[16 v, 16 v + 16). The expansion
// when xnorm is given (xnorm[v]: those columns' squared norms, ynorm[v]:
// the row's, refined as logits_expand refines), explicit differences
// otherwise; the same values, bit for bit, as logits_expand / logits_direct.
void logits_visits(const double* const* xt, const double* const* xnorm, index_t ld, index_t d,
                   const double* const* y, const double* ynorm, index_t n, double scale, double* out);

// Single-precision counterparts of logits_direct and logits_visits (direct
// path only) for float32 problems: packed tiles and rows in float, each
// squared distance summed in float (relative error at most about
// (d + 1) 2^-24: each difference is rounded once, relative to itself, so
// an offset shared by the points costs nothing), then widened
// to double and scaled; the same outputs and contracts as above, and the two
// agree bit for bit.
void logits_direct(const float* xt, index_t ld, index_t cols, index_t d, const float* y, index_t rows,
                   double scale, double* out, index_t len = 0, double* row_max = nullptr);
void logits_visits(const float* const* xt, index_t ld, index_t d, const float* const* y, index_t n, double scale,
                   double* out);

// Fused logits_direct (float) and exp_sums(float) for float32 problems, the
// logits never stored: q_rj = exp(-scale ||y_r - x_j||^2) with the squared
// distance as logits_direct sums it and the product and exponential in
// single precision; rowsum[r] += sum_{j < len} q_rj (each row's sum over the
// tile in float) and, unless colsum is null, colsum[j] += sum_{r < rows} q_rj
// (over the rows in float), both added in double. rows <= 16 is not
// required; len <= min(ld, kMaxTile). Unless dist is null, the squared
// distances (s, in float, as logits_direct sums them: its logit is
// double(s) * -scale) are also written to dist[r * ld + j] for the columns
// j < len (rounded up to 32) and each row's least over j < len to
// row_min[r]. self0 >= 0 drops row r's term at column self0 + r: no
// exponential, and distance +inf (the diagonal with exclude_self).
void direct_exp_sums(const float* xt, index_t ld, index_t d, const float* y, index_t rows, index_t len,
                     double scale, double* rowsum, double* colsum, float* dist = nullptr, float* row_min = nullptr,
                     index_t self0 = -1);

// The double-precision form for float64 problems (direct path): the
// distances and logits as logits_direct(double) computes them, the
// exponentials (exp_nonpos, double) and both sums in double; self0 as above.
void direct_exp_sums(const double* xt, index_t ld, index_t d, const double* y, index_t rows, index_t len,
                     double scale, double* rowsum, double* colsum, index_t self0);

// The same q_rj for every column j < ld (padding included), written to
// q[r * qld + j].
void direct_exp(const float* xt, index_t ld, index_t d, const float* y, index_t rows, double scale, float* q,
                index_t qld);

// max_j v[j] (-inf when len == 0 or all entries are -inf).
double tile_max(const double* v, index_t len);

// Writes the positions j < len with v[j] >= thr to out, ascending; returns
// how many (out needs room for len entries).
index_t positions_at_least(const double* v, index_t len, double thr, std::int32_t* out);

// Writes the columns j < len at which some row r < rows (<= 32) of v (row
// stride ld) has v[r * ld + j] >= thr[j] to cols, ascending, and to masks
// the set of those rows (bit r); returns how many (cols and masks need room
// for len entries).
index_t columns_at_least(const double* v, index_t ld, index_t rows, index_t len, const double* thr,
                         std::int32_t* cols, std::uint32_t* masks);

// Float squared-distance forms of the two scans above: the positions
// j < len with s[j] <= bound, and the columns j < len at which some row r
// has s[r * ld + j] <= bound[j] (with its row mask).
index_t positions_at_most(const float* s, index_t len, float bound, std::int32_t* out);
index_t columns_at_most(const float* s, index_t ld, index_t rows, index_t len, const float* bound,
                        std::int32_t* cols, std::uint32_t* masks);

// out[b] = max of v[16 b .. 16 b + 16) clipped to len; returns the block count.
index_t block_max16(const double* v, index_t len, double* out);

// rank[i] = number of entries better than entry i (larger value, or equal
// value and smaller index); indices must be distinct, so ranks are 0 .. n-1.
void rank_order(const double* val, const std::int64_t* idx, index_t n, std::int64_t* rank);

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

// Longest tile any leaf accepts (default_tile never exceeds it; a requested
// block_size is capped to it).
constexpr index_t kMaxTile = 1024;

// For rows r < rows of logits v (row stride ld, all <= 0) and q = exp(v):
// rowsum[r] += sum_{j < len} q_rj and, unless colsum is null,
// colsum[j] += sum_r q_rj. The last argument picks the precision of the
// exponentials, as above, and of the sums over one tile's columns or the
// block's rows, which are then added in double.
void exp_sums(const double* v, index_t ld, index_t rows, index_t len, double* rowsum, double* colsum, double);
void exp_sums(const double* v, index_t ld, index_t rows, index_t len, double* rowsum, double* colsum, float);

// Most query rows accumulate_targets takes at once.
constexpr index_t kTargetRows = 16;

// For rows r < rows (<= kTargetRows) of logits v (row stride ld) and
// q_rj = exp(v[r * ld + j] - log_norm[r]): w[j] += sum_r q_rj,
// s2[j] += sum_r q_rj * sq[r], s1t[k * ld + j] += sum_r q_rj * y[r * d + k]
// for every feature k, each sum taken in row order.
// The last argument picks the precision of the exponentials, as above.
void accumulate_targets(const double* v, index_t ld, const double* log_norm, const double* y,
                        const double* sq, index_t rows, index_t d, double* w, double* s1t, double* s2,
                        double);
void accumulate_targets(const double* v, index_t ld, const double* log_norm, const double* y,
                        const double* sq, index_t rows, index_t d, double* w, double* s1t, double* s2,
                        float);

// Symmetric form of the targets' sums, for a block of rows r < rows
// (<= kTargetRows) against the columns j < ld of one tile, with logits v
// (row stride ld, all <= 0) and q_rj = exp(v_rj), kept in scratch
// (kTargetRows * (ld + 8) doubles):
// colacc[k * ld + j] += sum_r q_rj * u[r * dw + k] for every k < dw, each sum
// taken in row order, and, unless rowacc is null,
// rowacc[k * ld + r] += sum_{j < ld} q_rj * ut[k * ld + j]. u holds the rows'
// weight vectors (row-major, dw per row), ut the columns' (feature-major,
// row stride ld, zero in padding columns). The last argument picks the
// precision of the exponentials, as above.
void pair_targets(const double* v, index_t ld, index_t rows, const double* u, const double* ut, index_t dw,
                  double* colacc, double* rowacc, double* scratch);
// For float32 problems: u, ut and q (scratch: kTargetRows * (ld + 16)
// floats) in single precision, and so the products; each column's terms
// summed over the block's rows, and each row's over 256 columns, in float,
// then added in double.
void pair_targets(const double* v, index_t ld, index_t rows, const float* u, const float* ut, index_t dw,
                  double* colacc, double* rowacc, float* scratch);
// The same from q_rj given at q[r * qld + j] (j < ld; qld >= ld, a multiple
// of 16), e.g. by direct_exp.
void pair_targets(const float* q, index_t qld, index_t ld, index_t rows, const float* u, const float* ut,
                  index_t dw, double* colacc, double* rowacc);

// Name of the clone the loader picked on this CPU ("avx512", "avx2", "baseline").
const char* selected_isa();

// Bytes per native vector of the leaves' code: the CPU's widest (64 with
// AVX-512, 32 with AVX2 + FMA, 16 below), or less where the environment
// variable MAPA_VECTOR_BYTES asked for less when the module loaded.
int vector_bytes();
int cpu_vector_bytes();

}  // namespace mapa
