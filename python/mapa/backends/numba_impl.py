"""Numba backend: tiled distances, streaming log-sum-exp, heap top-k, targets.

Same contract as :mod:`mapa.backends.numpy_ref` (see the package docstring).
All arithmetic is float64 whatever the input dtype, except the symmetric
normaliser of float32 input (single precision, below): the references are
copied once into a transposed float64 array ``XT`` (D, N), so that the squared
distances of a query to a tile of references form a contiguous loop over the
references (explicit differences, no ||x||^2 + ||y||^2 - 2 x.y expansion).
Queries go in pairs, sharing each load of ``XT``.

The one-sided passes (separate queries, the dense matrix's writing pass,
the fallbacks below) split the work as blocks of query rows x tiles of
references (``block_size`` references per tile). Each query row keeps its smallest squared distance so
far, ``dmin``, and ``s = sum_j exp(-scale (d_j - dmin))``, rescaled when
``dmin`` drops; then ``log_norm = -scale dmin + log s`` and
``log q = scale (dmin - d) - log s``, formed without cancellation however
large the distances (data offsets, tiny bandwidths, isolated points). The
tile's smallest distance is a min-reduction over the bit patterns of the
(non-negative) distances as int64, which LLVM vectorises without fast-math.
Tiles whose every term is below exp(-708) skip the exponentials.

``exp`` is our own, branch-free and vectorisable (Numba has no SVML here):
Cody-Waite reduction ``x = k ln2 + r`` with ``|r| <= ln2/2``, a degree-11
polynomial for ``exp(r)`` (Chebyshev fit on that interval, ~2e-16 relative),
and ``2^k`` assembled as the int64 bit pattern ``(k + 1023) << 52`` viewed as
float64. Arguments below -708 give exactly 0 (also -inf, the excluded self
term). Fast-math is limited to 'contract' (FMA) for the arithmetic and
'reassoc' for the plain reductions; no 'nnan'/'ninf' anywhere.

Single precision: the symmetric normaliser (``log_normalizer`` with the
queries the references, the first pass of ``targets``) of float32 input with
D <= 32 runs in float32 as the cpp kernel does, where the squared distances
can neither overflow float32 nor lose digits that matter to its subnormal
range (the cpp rule, ``_float_distances``; anything else keeps float64).
``XT`` and the rows are then float32, each squared distance is summed in
float32 from explicit differences, multiplied by -scale in float32, and
``exp`` is the float counterpart (``k`` rounded by adding and subtracting
1.5 * 2^23, a degree-6 Taylor polynomial, ~1.2e-7 relative, ``2^k`` as the
int32 bits ``(k + 127) << 23``; arguments below -87 give 0). Each row's
terms are summed over one tile, and each column's over 16 rows, in float32;
those partial sums go into the float64 sums. Twice the SIMD width of
float64, and half the bytes. With exclude_self, a row whose log Z then lies
below ``_drift_floor`` (an isolated point, whose logits' float32 error
would reach log q) is redone alone, one-sided in float64.

Top-k keeps a bounded max-heap per row on (distance, index), so ties in
distance go to the lower index; the reference sorts by log-probability, which
can differ only where two distinct distances round to the same float64 logit.

When the queries are the references (``Y is X``), the normaliser, top-k,
targets and the dense matrix's normalisers take each unordered pair of
points once: tile pair (ta, tb), ta <= tb, computes d(i, n) for the rows i
of ta against the columns n of tb and serves both orders, i's row with
column n and, off the diagonal, n's row with column i. The pairs go in rounds (round-robin tournament, circle method):
first the diagonal (ta, ta) of every tile, then P - 1 rounds of P / 2 pairs
that share no tile (P = tiles rounded up to even; a pair with the padding
tile is a bye). A round is one ``prange`` over its pairs, one pair per
thread at a time, and rounds run one after the other, so no row is written
by two threads at once and every row's sums take their terms in one fixed
order: shared sums, reproducible bit for bit for any ``num_threads`` (the
tiles depend on N, D and Numba's thread pool size, not on ``num_threads``;
at least 4 tiles per pool thread, so small problems parallelise).
Where the data spreads far beyond the bandwidth, the points first go in
the locality order (below, top-k), and a pair of distinct tiles whose
bounding boxes lie so far apart that every term between them is exactly 0
is left out whole (``_gap_bound``, the cpp kernel's rule: sorted when a
quarter of the tile pairs then go, ``_pair_order``); dropping such pairs
changes no bit. On ``fold`` at the "nn" bandwidth (N = 20 000, float32,
exclude_self, one thread) the normaliser went from 450 to 27 ms and the
targets from 780 to 120 ms (with the rows near exp's floor redone alone,
not the whole normaliser).

- Normaliser (``log_normalizer``, and the first pass of ``targets`` and
  top-k): sums of exp(-scale d), each term added to its row and its column,
  no running minimum (every logit is <= 0, the self term is 0). With
  exclude_self, a row whose sum is near exp's floor (an isolated point) is
  redone alone, one-sided with the streaming minimum (in float64, also
  after the single-precision pass, whose floor is e^-87).
- Dense matrix (``log_posterior``), the cpp kernel's two steps: the
  normalisers as above, then one pass over blocks of rows (``_dense_rows``)
  writes every entry once, final, as scale (dmin - d) - log s: float64
  distances, no exponentials, no running minimum. Each entry depends only
  on its row's normaliser, so the bits do not depend on ``num_threads``.
  Separate queries keep the one-sided pass (streaming minimum, then the
  rows written in a second pass over the references).
- ``targets``: e = exp(-scale d) once per pair; with V[:, n] = u_n / Z_n,
  u_n = (1, x_n, ||x_n||^2), row i gathers e V[:, n] and column n receives
  e V[:, i], all in one (D + 2, N) accumulator. e <= 1, and where
  log Z_n >= -400 any term lost to exp's floor is below exp(-308); rows with
  a smaller normaliser (only with exclude_self) are left out of the
  symmetric pass and added one-sided, with q(i|n) = exp(log q) directly.
- top-k: the points are first sorted along a Z-order curve over their
  coordinates on the data's two principal axes (_principal_coords; the raw
  features up to D = 2), so that a tile holds nearby points. Every row's heap is
  live at once ((N, k) distances and indices, while N k 16 bytes stay
  under 1 GiB; otherwise, and for separate queries, the one-sided pass), with
  its root mirrored in a threshold array. A row's first pair is its own
  tile: a quickselect finds the tile's k-th smallest distance and the heap
  is built from the entries up to it. Later pairs offer only entries at or
  below a row's threshold, found by vectorised tests over runs of 16 (and
  by the tile minimum, for the row direction). The kept set does not depend
  on the order of the offers.

Parallelism: ``prange`` over blocks of query rows for the one-sided passes,
over the pairs of a round for the symmetric ones. Large problems are cut
into calls of bounded work (about 0.1 s each: chunks of rows, or runs of
rounds or of a round's pairs), between which ``progress`` is called and
Ctrl-C is seen. Compiled signatures: the row kernel and ``_dense_rows`` for
a float64 and a float32 dense output, the other kernels once, and the
single-precision normaliser ``_sums_rounds_f`` on first float32 use (all cached on disk).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

__all__ = ["log_normalizer", "log_posterior", "topk", "targets"]

_FM = {"contract"}  # FMA only: keeps the Cody-Waite split and inf semantics
_FM_SUM = {"contract", "reassoc"}  # reordered sums, for pure reductions only

_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # low 32 bits zero: k * _LN2_HI is exact
_LN2_LO = 1.90821492927058770002e-10
_EXP_MIN = -708.0  # below this exp(x) is set to 0 (2^k stays a normal number)
# exp(r) on [-ln2/2, ln2/2], highest degree first (mpmath.chebyfit, degree 11)
_C11 = 2.5110049204818658e-08
_C10 = 2.763265472252779e-07
_C9 = 2.755724088722987e-06
_C8 = 2.4801485441561313e-05
_C7 = 0.00019841269890076403
_C6 = 0.0013888888952352863
_C5 = 0.008333333333319589
_C4 = 0.04166666666648795
_C3 = 0.1666666666666668
_C2 = 0.5000000000000019
_C1 = 1.0
_C0 = 1.0

# The single-precision normaliser (see _float_distances): csrc/mapa/exp.hpp's
# float exp_nonpos. Every constant is an np.float32, which Numba keeps as
# float32; a Python float would promote the arithmetic to float64.
_F32_MAX_FEATURES = 32  # the cpp kernel's kDirectMaxFeatures
_LOG2E_F = np.float32(1.44269504)
_LN2_HI_F = np.float32(0.693359375)  # 9 significant bits: k * _LN2_HI_F is exact for |k| <= 126
_LN2_LO_F = np.float32(-2.12194440e-4)
_SHIFT_F = np.float32(12582912.0)  # 1.5 * 2^23: (x + _SHIFT_F) - _SHIFT_F is x rounded to an integer
_EXP_MIN_F = np.float32(-87.0)  # below this exp(x) is set to 0 (2^k stays a normal number)
_EXP_FLOOR_F = -88.0  # a row whose largest logit is below this has every float32 term 0 (margin for rounding)
# exp(r) on [-ln2/2, ln2/2]: Taylor polynomial of degree 6 (~1.2e-7 relative, about one float ulp)
_E6 = np.float32(1.0) / np.float32(720.0)
_E5 = np.float32(1.0) / np.float32(120.0)
_E4 = np.float32(1.0) / np.float32(24.0)
_E3 = np.float32(1.0) / np.float32(6.0)
_E2 = np.float32(0.5)
_E1 = np.float32(1.0)
_E0 = np.float32(1.0)
_ZERO_F = np.float32(0.0)
_BIAS_F = np.int32(127)
_MANT_F = np.int32(23)
_COL_ROWS = 16  # rows (even) whose column terms are summed in float32 before the float64 sums

_QUERY_BLOCK = 32  # query rows per parallel task (upper bound)
_CHUNK_WORK = 1 << 29  # pairs * (8 + D) per chunk: ~0.1 s, so Ctrl-C is seen quickly
_TOPK_TILE = 256  # longest default tile of the symmetric top-k


# --------------------------------------------------------------------------
# tile primitives (serial; each is one or a few simple vectorisable loops)
# --------------------------------------------------------------------------


@njit(cache=True, nogil=True, fastmath=_FM)
def _sq_dists2(XT, j0, nb, ya, yb, da, db):
    """da[j], db[j] = ||ya - x_{j0+j}||^2, ||yb - x_{j0+j}||^2 for j < nb.

    Two queries share each load of the transposed references XT (D, N);
    dimensions go in groups of up to 4 per pass over the tile.
    """
    D = XT.shape[0]
    rem = D % 4
    if rem == 0:
        for j in range(nb):
            da[j] = 0.0
            db[j] = 0.0
    elif rem == 1:
        r0 = XT[0, j0 : j0 + nb]
        a0 = ya[0]
        b0 = yb[0]
        for j in range(nb):
            x0 = r0[j]
            t0 = a0 - x0
            da[j] = t0 * t0
            t0 = b0 - x0
            db[j] = t0 * t0
    elif rem == 2:
        r0 = XT[0, j0 : j0 + nb]
        r1 = XT[1, j0 : j0 + nb]
        a0 = ya[0]
        a1 = ya[1]
        b0 = yb[0]
        b1 = yb[1]
        for j in range(nb):
            x0 = r0[j]
            x1 = r1[j]
            t0 = a0 - x0
            t1 = a1 - x1
            da[j] = t0 * t0 + t1 * t1
            t0 = b0 - x0
            t1 = b1 - x1
            db[j] = t0 * t0 + t1 * t1
    else:
        r0 = XT[0, j0 : j0 + nb]
        r1 = XT[1, j0 : j0 + nb]
        r2 = XT[2, j0 : j0 + nb]
        a0 = ya[0]
        a1 = ya[1]
        a2 = ya[2]
        b0 = yb[0]
        b1 = yb[1]
        b2 = yb[2]
        for j in range(nb):
            x0 = r0[j]
            x1 = r1[j]
            x2 = r2[j]
            t0 = a0 - x0
            t1 = a1 - x1
            t2 = a2 - x2
            da[j] = t0 * t0 + t1 * t1 + t2 * t2
            t0 = b0 - x0
            t1 = b1 - x1
            t2 = b2 - x2
            db[j] = t0 * t0 + t1 * t1 + t2 * t2
    for d in range(rem, D, 4):
        r0 = XT[d, j0 : j0 + nb]
        r1 = XT[d + 1, j0 : j0 + nb]
        r2 = XT[d + 2, j0 : j0 + nb]
        r3 = XT[d + 3, j0 : j0 + nb]
        a0 = ya[d]
        a1 = ya[d + 1]
        a2 = ya[d + 2]
        a3 = ya[d + 3]
        b0 = yb[d]
        b1 = yb[d + 1]
        b2 = yb[d + 2]
        b3 = yb[d + 3]
        for j in range(nb):
            x0 = r0[j]
            x1 = r1[j]
            x2 = r2[j]
            x3 = r3[j]
            t0 = a0 - x0
            t1 = a1 - x1
            t2 = a2 - x2
            t3 = a3 - x3
            da[j] += (t0 * t0 + t1 * t1) + (t2 * t2 + t3 * t3)
            t0 = b0 - x0
            t1 = b1 - x1
            t2 = b2 - x2
            t3 = b3 - x3
            db[j] += (t0 * t0 + t1 * t1) + (t2 * t2 + t3 * t3)


@njit(cache=True, nogil=True)
def _ref_pair_dists(XT, X, ip, i1, j0, nb, excl, dbuf):
    """dbuf[h, j] = ||x_{ip+h} - x_{j0+j}||^2 for the references ip and ip + 1
    as queries (a lone last row, ip + 1 == i1, repeats ip), each one's own
    column set to inf when ``excl``.
    """
    _sq_dists2(XT, j0, nb, X[ip], X[min(ip + 1, i1 - 1)], dbuf[0], dbuf[1])
    if excl:
        for h in range(min(2, i1 - ip)):
            if j0 <= ip + h < j0 + nb:
                dbuf[h, ip + h - j0] = np.inf


@njit(cache=True, nogil=True)
def _min_bits(d2i, nb, mn):
    """Minimum of mn and non-negative floats d2i[:nb], compared as their integer bit patterns."""
    for j in range(nb):
        v = d2i[j]
        mn = v if v < mn else mn
    return mn


@njit(cache=True, nogil=True, fastmath=_FM)
def _exp_terms(d2, nb, a, b, p, ik):
    """exp(a * (b - d2[j])) = p[j] * 2^k, with 2^k as float64 bits in ik[j].

    Meant for arguments <= 0 (valid up to ~700); arguments below -708, -inf
    included, give p[j] = 0.
    """
    for j in range(nb):
        x = a * (b - d2[j])
        ok = x >= _EXP_MIN
        xc = x if ok else _EXP_MIN
        kf = math.floor(xc * _LOG2E + 0.5)
        r = xc - kf * _LN2_HI
        r = r - kf * _LN2_LO
        q = _C11 * r + _C10
        q = q * r + _C9
        q = q * r + _C8
        q = q * r + _C7
        q = q * r + _C6
        q = q * r + _C5
        q = q * r + _C4
        q = q * r + _C3
        q = q * r + _C2
        q = q * r + _C1
        q = q * r + _C0
        p[j] = q if ok else 0.0
        ik[j] = (np.int64(kf) + 1023) << 52


@njit(cache=True, nogil=True, fastmath=_FM_SUM)
def _sum_terms(p, f, nb):
    s = 0.0
    for j in range(nb):
        s += p[j] * f[j]
    return s


@njit(cache=True, nogil=True, fastmath=_FM)
def _write_logq(d2, nb, scale, dmin, logs, orow, j0):
    """orow[j0+j] = scale * (dmin - d2[j]) - logs (cast to the output dtype)."""
    o = orow[j0 : j0 + nb]
    for j in range(nb):
        o[j] = scale * (dmin - d2[j]) - logs


@njit(cache=True, nogil=True)
def _worse(da, ia, db, ib):
    """Entry a ranks after entry b: larger distance, or equal and larger index."""
    return da > db or (da == db and ia > ib)


@njit(cache=True, nogil=True)
def _sift_down(hd, hi, pos, size):
    """Restore the heap (root = worst entry) below ``pos`` in hd/hi[:size]."""
    key = hd[pos]
    idx = hi[pos]
    while True:
        c = 2 * pos + 1
        if c >= size:
            break
        if c + 1 < size and _worse(hd[c + 1], hi[c + 1], hd[c], hi[c]):
            c += 1
        if not _worse(hd[c], hi[c], key, idx):
            break
        hd[pos] = hd[c]
        hi[pos] = hi[c]
        pos = c
    hd[pos] = key
    hi[pos] = idx


@njit(cache=True, nogil=True)
def _replace_root(top_d, top_i, n, key, idx, size):
    """_sift_down of (key, idx) from the root of row n's heap in top_d/top_i (no views)."""
    pos = 0
    while True:
        c = 2 * pos + 1
        if c >= size:
            break
        if c + 1 < size and _worse(top_d[n, c + 1], top_i[n, c + 1], top_d[n, c], top_i[n, c]):
            c += 1
        if not _worse(top_d[n, c], top_i[n, c], key, idx):
            break
        top_d[n, pos] = top_d[n, c]
        top_i[n, pos] = top_i[n, c]
        pos = c
    top_d[n, pos] = key
    top_i[n, pos] = idx


@njit(cache=True, nogil=True)
def _heap_scan(d2, nb, j0, self_col, hd, hi):
    """Offer the tile's entries to the bounded heap hd/hi (root = current k-th best).

    A plain scalar scan: the first test (d <= k-th best distance) is almost
    always false and well predicted; a vectorised pre-filter over short runs
    measured slower.
    """
    k = hd.shape[0]
    td = hd[0]
    ti = hi[0]
    for j in range(nb):
        d = d2[j]
        if d <= td:
            col = j0 + j
            if (d < td or col < ti) and col != self_col:
                hd[0] = d
                hi[0] = col
                _sift_down(hd, hi, 0, k)
                td = hd[0]
                ti = hi[0]


@njit(cache=True, nogil=True)
def _any_le(d2, j0, t):
    """Whether any of d2[j0 : j0 + 16] is <= t (branch-free, vectorised)."""
    blk = d2[j0 : j0 + 16]
    hit = False
    for j in range(16):
        hit |= blk[j] <= t
    return hit


@njit(cache=True, nogil=True)
def _any_le_each(d2, j0, thr, c0):
    """Whether any d2[j0 + j] <= thr[c0 + j] for j < 16 (branch-free, vectorised)."""
    blk = d2[j0 : j0 + 16]
    tb = thr[c0 : c0 + 16]
    hit = False
    for j in range(16):
        hit |= blk[j] <= tb[j]
    return hit


@njit(cache=True, nogil=True)
def _heap_scan_ids(d2, nb, j0, self_pos, ids, hd, hi):
    """_heap_scan for columns at positions j0 + j holding the points ids[j0 + j].

    Ties in distance go to the lower index ids[.]; the column at position
    ``self_pos`` is left out. Runs of 16 entries none of which reaches the
    k-th best are passed over by a vectorised test.
    """
    k = hd.shape[0]
    cols = ids[j0 : j0 + nb]
    td = hd[0]
    ti = hi[0]
    for b0 in range(0, nb, 16):
        b1 = min(nb, b0 + 16)
        if b1 - b0 == 16 and not _any_le(d2, b0, td):
            continue
        for j in range(b0, b1):
            d = d2[j]
            if d <= td:
                col = cols[j]
                if (d < td or col < ti) and j0 + j != self_pos:
                    hd[0] = d
                    hi[0] = col
                    _sift_down(hd, hi, 0, k)
                    td = hd[0]
                    ti = hi[0]


@njit(cache=True, nogil=True)
def _kth_smallest(a, b, n, k):
    """The value at position k (0-based) of a[:n] in ascending order (k < n, no NaN).

    a and b (room for n) are overwritten. Quickselect whose partitions copy
    between the two buffers without branches (a comparison's outcome only
    moves a write position).
    """
    while True:
        x = a[0]
        y = a[n // 2]
        z = a[n - 1]
        p = max(min(x, y), min(max(x, y), z))  # median of three
        lo = 0  # b[:lo] < p, b[hi:n] >= p
        hi = n
        for j in range(n):
            v = a[j]
            below = v < p
            b[lo] = v
            b[hi - 1] = v
            lo += below
            hi -= not below
        if k < lo:
            a, b = b, a
            n = lo
            continue
        m = 0  # a[:m] > p
        e = 0  # how many == p (p itself is among b[lo:n])
        for j in range(lo, n):
            v = b[j]
            a[m] = v
            m += v > p
            e += v == p
        if k < lo + e:
            return p
        k -= lo + e
        n = m


@njit(cache=True, nogil=True)
def _heap_build(d2, nb, j0, self_pos, ids, scratch, hd, hi):
    """Start an empty selection from one tile (nb > k): its k best entries as a heap.

    With v the tile's k-th smallest distance, the entries below v enter
    directly and the heap is built bottom-up; the entries equal to v (at
    least one) are then offered one by one, so ties go to the lower index.
    Much cheaper than k ln(nb / k) single insertions.
    """
    k = hd.shape[0]
    a = scratch[0]
    a[:nb] = d2[:nb]
    if 0 <= self_pos - j0 < nb:
        a[self_pos - j0] = np.inf
    v = _kth_smallest(a, scratch[1], nb, k - 1)
    cols = ids[j0 : j0 + nb]
    m = 0
    for j in range(nb):
        d = d2[j]
        if d < v and j0 + j != self_pos:
            hd[m] = d
            hi[m] = cols[j]
            m += 1
    for t in range(m, k):
        hd[t] = np.inf
        hi[t] = ids.shape[0]  # sentinel: ranks after every real column
    for pos in range(k // 2 - 1, -1, -1):
        _sift_down(hd, hi, pos, k)
    for j in range(nb):
        d = d2[j]
        if d == v and j0 + j != self_pos:
            col = cols[j]
            if d < hd[0] or col < hi[0]:
                hd[0] = d
                hi[0] = col
                _sift_down(hd, hi, 0, k)


@njit(cache=True, nogil=True)
def _heap_sort(hd, hi):
    """Heap (root = worst) -> sorted best first, in place."""
    for end in range(hd.shape[0] - 1, 0, -1):
        td = hd[0]
        ti = hi[0]
        hd[0] = hd[end]
        hi[0] = hi[end]
        hd[end] = td
        hi[end] = ti
        _sift_down(hd, hi, 0, end)

@njit(cache=True, nogil=True)
def _min_dist(d2i, nb, bits, bitsf):
    """Smallest of the distances d2i[:nb], given as their bit patterns, as a float (+inf for none).

    Either precision: d2i, bits int64 and bitsf float64, or int32 and
    float32 (_pair_buffers); the minimum starts at +inf's bit pattern in
    that type, written through bitsf.
    """
    bitsf[0] = np.inf
    bits[0] = _min_bits(d2i, nb, bits[0])
    return bitsf[0]


@njit(cache=True, nogil=True, fastmath=_FM)
def _neg_log_q_row(d2, nb, scale, dm, ls, out):
    """out[j] = -log q(n | i) = scale * (d2[j] - dm) + ls, with row i's normaliser (dm, ls)."""
    for j in range(nb):
        out[j] = scale * (d2[j] - dm) + ls


@njit(cache=True, nogil=True, fastmath=_FM)
def _mul_terms(p, f, nb):
    """p[j] <- p[j] * f[j]: the exponentials of _exp_terms as plain values."""
    for j in range(nb):
        p[j] *= f[j]


@njit(cache=True, nogil=True, fastmath=_FM_SUM)
def _gather_sums(e, nb, UT, j0, i, nh, acc):
    """acc[c, i + h] += sum_j e[h, j] UT[c, j0 + j] for h < nh (nh = 1 or 2), every row c of UT.

    The row direction of the targets: rows i, i + 1 take the weights
    u_n = UT[:, n] of the tile's columns. Both rows share each load of UT,
    whose rows go four per pass over e.
    """
    ea = e[0]
    eb = e[1]
    C = UT.shape[0]
    rem = C % 4
    for c in range(rem):
        row = UT[c, j0 : j0 + nb]
        sa = 0.0
        sb = 0.0
        for j in range(nb):
            x = row[j]
            sa += ea[j] * x
            sb += eb[j] * x
        acc[c, i] += sa
        if nh == 2:
            acc[c, i + 1] += sb
    for c in range(rem, C, 4):
        r0 = UT[c, j0 : j0 + nb]
        r1 = UT[c + 1, j0 : j0 + nb]
        r2 = UT[c + 2, j0 : j0 + nb]
        r3 = UT[c + 3, j0 : j0 + nb]
        a0 = 0.0
        a1 = 0.0
        a2 = 0.0
        a3 = 0.0
        b0 = 0.0
        b1 = 0.0
        b2 = 0.0
        b3 = 0.0
        for j in range(nb):
            x = ea[j]
            y = eb[j]
            a0 += x * r0[j]
            a1 += x * r1[j]
            a2 += x * r2[j]
            a3 += x * r3[j]
            b0 += y * r0[j]
            b1 += y * r1[j]
            b2 += y * r2[j]
            b3 += y * r3[j]
        acc[c, i] += a0
        acc[c + 1, i] += a1
        acc[c + 2, i] += a2
        acc[c + 3, i] += a3
        if nh == 2:
            acc[c, i + 1] += b0
            acc[c + 1, i + 1] += b1
            acc[c + 2, i + 1] += b2
            acc[c + 3, i + 1] += b3


@njit(cache=True, nogil=True, fastmath=_FM)
def _scatter_sums(e, nb, UT, ia, ib, acc, j0):
    """acc[c, j0 + j] += e[0, j] UT[c, ia] + e[1, j] UT[c, ib], every row c of UT.

    The column direction of the targets: each column n = j0 + j takes the
    weights u of rows ia and ib (a row with nothing to add has e = 0).
    Rows of acc go four per pass over e.
    """
    ea = e[0]
    eb = e[1]
    C = UT.shape[0]
    rem = C % 4
    for c in range(rem):
        a = acc[c, j0 : j0 + nb]
        ua = UT[c, ia]
        ub = UT[c, ib]
        for j in range(nb):
            a[j] += ea[j] * ua + eb[j] * ub
    for c in range(rem, C, 4):
        a0 = acc[c, j0 : j0 + nb]
        a1 = acc[c + 1, j0 : j0 + nb]
        a2 = acc[c + 2, j0 : j0 + nb]
        a3 = acc[c + 3, j0 : j0 + nb]
        ua0 = UT[c, ia]
        ua1 = UT[c + 1, ia]
        ua2 = UT[c + 2, ia]
        ua3 = UT[c + 3, ia]
        ub0 = UT[c, ib]
        ub1 = UT[c + 1, ib]
        ub2 = UT[c + 2, ib]
        ub3 = UT[c + 3, ib]
        for j in range(nb):
            x = ea[j]
            y = eb[j]
            a0[j] += x * ua0 + y * ub0
            a1[j] += x * ua1 + y * ub1
            a2[j] += x * ua2 + y * ub2
            a3[j] += x * ua3 + y * ub3


# single-precision counterparts (float32 input on the symmetric normaliser)


@njit(cache=True, nogil=True, fastmath=_FM)
def _exp_terms_f(d2, nb, ms, p, ik):
    """exp(ms * d2[j]) = p[j] * 2^k in float32, with 2^k as float32 bits in ik[j] (int32).

    The float32 _exp_terms: ms = -scale as a float32, Cody-Waite reduction
    with k rounded by adding and subtracting 1.5 * 2^23, a degree-6 Taylor
    polynomial. Arguments below -87, -inf included, give p[j] = 0.
    """
    for j in range(nb):
        x = ms * d2[j]
        ok = x >= _EXP_MIN_F
        xc = x if ok else _EXP_MIN_F
        t = xc * _LOG2E_F + _SHIFT_F
        kf = t - _SHIFT_F
        r = xc - kf * _LN2_HI_F
        r = r - kf * _LN2_LO_F
        q = _E6 * r + _E5
        q = q * r + _E4
        q = q * r + _E3
        q = q * r + _E2
        q = q * r + _E1
        q = q * r + _E0
        p[j] = q if ok else _ZERO_F
        ik[j] = (np.int32(kf) + _BIAS_F) << _MANT_F


@njit(cache=True, nogil=True, fastmath=_FM_SUM)
def _sum_terms_f(p, f, nb):
    """sum_j p[j] f[j] in float32 (the row's sum over one tile)."""
    s = _ZERO_F
    for j in range(nb):
        s += p[j] * f[j]
    return s


@njit(cache=True, nogil=True, fastmath=_FM_SUM)
def _sum_add_terms_f(p, f, nb, cs):
    """_sum_terms_f, each term p[j] f[j] also added to the float32 column sum cs[j]."""
    s = _ZERO_F
    for j in range(nb):
        e = p[j] * f[j]
        s += e
        cs[j] += e
    return s


@njit(cache=True, nogil=True)
def _flush_cols(cs, nb, acc, j0):
    """acc[j0 + j] += cs[j] (float32 partial sums into float64), then cs[j] = 0."""
    a = acc[j0 : j0 + nb]
    for j in range(nb):
        a[j] += cs[j]
        cs[j] = _ZERO_F


@njit(cache=True, nogil=True, fastmath=_FM)
def _add_terms(p, f, nb, acc, j0):
    """acc[j0 + j] += p[j] * f[j]: the column sums of the symmetric normaliser."""
    a = acc[j0 : j0 + nb]
    for j in range(nb):
        a[j] += p[j] * f[j]


@njit(cache=True, nogil=True)
def _count_le(d2, nb, thr, j0):
    """How many j < nb have d2[j] <= thr[j0 + j] (vectorised; no early exit)."""
    t = thr[j0 : j0 + nb]
    c = 0
    for j in range(nb):
        if d2[j] <= t[j]:
            c += 1
    return c


@njit(cache=True, nogil=True)
def _offer_cols(d2, nb, j0, i, thr, top_d, top_i):
    """Offer (d2[j], column i) to the selection of each row n = j0 + j.

    thr[n] mirrors the root of row n's heap (its k-th best distance); the
    entry enters where it ranks before that root: a smaller distance, or an
    equal one and a smaller index. Runs of 16 rows none of which it reaches
    are passed over by a vectorised test.
    """
    k = top_d.shape[1]
    t = thr[j0 : j0 + nb]
    for b0 in range(0, nb, 16):
        b1 = min(nb, b0 + 16)
        if b1 - b0 == 16 and not _any_le_each(d2, b0, t, b0):
            continue
        for j in range(b0, b1):
            d = d2[j]
            if d <= t[j]:
                n = j0 + j
                if d < top_d[n, 0] or i < top_i[n, 0]:
                    _replace_root(top_d, top_i, n, d, i, k)
                    t[j] = top_d[n, 0]


@njit(cache=True, nogil=True)
def _round_pair(nt, r, s):
    """Tile pair (ta, tb), ta <= tb, in slot s of round r of nt tiles; (-1, -1) for a bye.

    Round 0 is the diagonal, (s, s) for s < nt. Rounds 1 .. P - 1 (P = nt
    rounded up to even) are the circle method of round-robin tournaments:
    tile P - 1 stays put while the others turn, P / 2 slots per round, no
    tile twice in a round; a slot with tile P - 1 = nt (odd nt) is a bye.
    """
    if r == 0:
        return s, s
    P = nt + nt % 2
    rr = r - 1
    u = P - 1 if s == 0 else (rr + s) % (P - 1)
    v = (rr - s + P - 1) % (P - 1)
    if u >= nt or v >= nt:
        return -1, -1
    return min(u, v), max(u, v)


@njit(cache=True, nogil=True)
def _round_slots(nt, r, s1):
    """End of the slots to run in round r: s1, cut to the round's nt (diagonal) or P / 2 slots."""
    return min(s1, nt if r == 0 else (nt + nt % 2) // 2)


@njit(cache=True, nogil=True)
def _pair_span(nt, r, s, tile, N):
    """Slot s of round r as (ta, tb, i0, i1, j0, nb): rows [i0, i1) of tile ta
    against columns [j0, j0 + nb) of tile tb; ta = -1 for a bye."""
    ta, tb = _round_pair(nt, r, s)
    i0 = ta * tile
    j0 = tb * tile
    return ta, tb, i0, min(N, i0 + tile), j0, min(tile, N - j0)


@njit(cache=True, nogil=True)
def _pair_buffers(tile, ft=np.float64, it=np.int64):
    """One tile pair's buffers in float type ft (it: the integer type of its
    width): the distances of two rows (dbuf, and its bits for _min_dist),
    the exponentials' 2^k factors (ik, and as floats f), and the cell
    _min_dist reads its result through (bits, bitsf)."""
    dbuf = np.empty((2, tile), dtype=ft)
    ik = np.empty(tile, dtype=it)
    bits = np.empty(1, dtype=it)
    return dbuf, dbuf.view(it), ik, ik.view(ft), bits, bits.view(ft)


@njit(cache=True, nogil=True)
def _gap_bound(lo, hi, ta, tb):
    """A lower bound on every computed squared distance between tiles ta and tb.

    lo, hi (tiles, D) are each tile's bounding box (_tile_boxes); the boxes'
    gap bounds the exact distances from below, and the computed ones fall
    short of those by at most a relative (D + 2) 2^-24 (float32 sums, D <=
    32) or (D + 1) 2^-53 (float64), both covered by the 2^-16 slack (the
    cpp kernel's logit_bound).
    """
    g2 = 0.0
    for k in range(lo.shape[1]):
        g = max(0.0, lo[tb, k] - hi[ta, k], lo[ta, k] - hi[tb, k])
        g2 += g * g
    return g2 - g2 * 2.0**-16


# --------------------------------------------------------------------------
# parallel kernels
# --------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _write_block(XT, Y, scale, excl, row0, q0, nq, tile, dm, ls, dense, dbuf):
    """dense[q0 + qq] = log q of query rows q0 <= q0 + qq < q0 + nq, every reference.

    The row's normaliser is given as (dm[qq], ls[qq]): each entry is
    scale * (dm - d) - ls, written once (_write_logq), its self column -inf
    with ``excl``. Tiles outer, rows inner: a tile of XT is loaded once for
    the whole block.
    """
    N = XT.shape[1]
    for j0 in range(0, N, tile):
        nb = min(tile, N - j0)
        for qp in range(0, nq, 2):
            _sq_dists2(XT, j0, nb, Y[q0 + qp], Y[q0 + min(qp + 1, nq - 1)], dbuf[0], dbuf[1])
            for h in range(min(2, nq - qp)):
                qq = qp + h
                r = q0 + qq
                d2 = dbuf[h]
                if excl and j0 <= row0 + r < j0 + nb:
                    d2[row0 + r - j0] = np.inf
                _write_logq(d2, nb, scale, dm[qq], ls[qq], dense[r], j0)


@njit(parallel=True, cache=True, nogil=True)
def _rows_kernel(XT, Y, scale, excl, row0, sidx, tile, qb, mode, dmin_out, logs_out, dense, top_i, top_d):
    """One pass over all references per block of query rows.

    Per query row r: dmin_out[r] = smallest squared distance and logs_out[r] =
    log sum_j exp(-scale (d_j - dmin)) >= 0, so log_norm = -scale dmin + logs;
    keeping the two apart lets log q = scale (dmin - d) - logs be formed
    without cancellation, however large the distances.
    mode 0: just that; 1: also the dense rows log q into ``dense`` (second
    pass, distances recomputed; separate queries only, self-queries take
    the symmetric normaliser and _dense_rows); 2: also the top-k
    (k = top_d.shape[1]) by a bounded heap on (distance, index), returned sorted, top_d as log q.
    Query row r of Y has global index row0 + r, or sidx[r] when sidx is not
    empty (its self column with ``excl``; mode 0 only with sidx).
    """
    N = XT.shape[1]
    M = Y.shape[0]
    nblk = (M + qb - 1) // qb
    for b in prange(nblk):
        q0 = b * qb
        nq = min(M, q0 + qb) - q0
        dbuf = np.empty((2, tile), dtype=np.float64)  # distances of a pair of rows
        ibuf = dbuf.view(np.int64)
        p = np.empty(tile, dtype=np.float64)
        ik = np.empty(tile, dtype=np.int64)
        f = ik.view(np.float64)
        bits = np.empty(1, dtype=np.int64)
        bitsf = bits.view(np.float64)
        dm = np.full(nq, np.inf)
        s = np.zeros(nq)
        if mode == 2:
            for qq in range(nq):
                top_d[q0 + qq, :] = np.inf
                top_i[q0 + qq, :] = N  # sentinel: ranks after every real column
        for j0 in range(0, N, tile):
            nb = min(tile, N - j0)
            for qp in range(0, nq, 2):
                # a lone last row is paired with itself
                _sq_dists2(XT, j0, nb, Y[q0 + qp], Y[q0 + min(qp + 1, nq - 1)], dbuf[0], dbuf[1])
                for h in range(min(2, nq - qp)):
                    qq = qp + h
                    d2 = dbuf[h]
                    d2i = ibuf[h]
                    r = q0 + qq
                    self_col = (sidx[r] if sidx.shape[0] > 0 else row0 + r) if excl else -1
                    if j0 <= self_col < j0 + nb:
                        d2[self_col - j0] = np.inf
                    dt = _min_dist(d2i, nb, bits, bitsf)
                    if dt == np.inf:
                        continue  # the tile is only the excluded self
                    if dt < dm[qq]:
                        s[qq] *= math.exp(scale * (dt - dm[qq]))
                        dm[qq] = dt
                    if scale * (dm[qq] - dt) >= _EXP_MIN:  # else every term is exp(< -708) = 0
                        _exp_terms(d2, nb, scale, dm[qq], p, ik)
                        s[qq] += _sum_terms(p, f, nb)
                    if mode == 2:
                        hd = top_d[r]
                        hi = top_i[r]
                        if dt < hd[0] or (dt == hd[0] and j0 < hi[0]):
                            _heap_scan(d2, nb, j0, self_col, hd, hi)
        for qq in range(nq):
            dmin_out[q0 + qq] = dm[qq]
            logs_out[q0 + qq] = math.log(s[qq])
        if mode == 1:
            _write_block(XT, Y, scale, excl, row0, q0, nq, tile, dm, logs_out[q0 : q0 + nq], dense, dbuf)
        elif mode == 2:
            for qq in range(nq):
                r = q0 + qq
                hd = top_d[r]
                _heap_sort(hd, top_i[r])
                for t in range(hd.shape[0]):
                    hd[t] = scale * (dm[qq] - hd[t]) - logs_out[r]


@njit(parallel=True, cache=True, nogil=True)
def _dense_rows(XT, Y, scale, excl, row0, tile, qb, dmin, logs, dense):
    """The dense rows log q of queries whose normalisers are known (dmin, logs).

    The second step of the dense matrix with the queries the references:
    the normalisers come from the symmetric pass, so each row is one pass
    over the references, every entry written once (_write_block), without
    the exponentials and the streaming minimum of _rows_kernel's mode 1.
    Rows are independent, so the bits do not depend on the thread count.
    """
    M = Y.shape[0]
    nblk = (M + qb - 1) // qb
    for b in prange(nblk):
        q0 = b * qb
        nq = min(M, q0 + qb) - q0
        dbuf = np.empty((2, tile), dtype=np.float64)
        _write_block(XT, Y, scale, excl, row0, q0, nq, tile, dmin[q0 : q0 + nq], logs[q0 : q0 + nq], dense, dbuf)


@njit(parallel=True, cache=True, nogil=True)
def _sums_rounds(XT, X, scale, excl, tile, nt, r0, r1, s0, s1, lo, hi, sums):
    """Row sums of exp(-scale d(i, j)) over rounds r0 <= r < r1 (slots s0 <= s < s1).

    The queries are the references: tile pair (ta, tb) takes the rows of ta
    against the columns of tb and adds each term to its row's sum and, off
    the diagonal, to its column's, so every unordered pair is computed once.
    Every logit is <= 0, so no running minimum is needed. The slots of a
    round share no tile and rounds run one after the other, so each row's
    sum takes its terms in one fixed order, whatever the thread count.
    Pairs of distinct tiles whose boxes (lo, hi) lie so far apart that every
    term is below exp(-708), hence 0, are left out whole (_gap_bound).
    """
    N = XT.shape[1]
    for r in range(r0, r1):
        for s in prange(s0, _round_slots(nt, r, s1)):
            ta, tb, i0, i1, j0, nb = _pair_span(nt, r, s, tile, N)
            if ta < 0:
                continue
            diag = ta == tb
            if not diag and -scale * _gap_bound(lo, hi, ta, tb) < _EXP_MIN:
                continue
            dbuf, ibuf, ik, f, bits, bitsf = _pair_buffers(tile)
            p = np.empty(tile, dtype=np.float64)
            for ip in range(i0, i1, 2):
                _ref_pair_dists(XT, X, ip, i1, j0, nb, excl and diag, dbuf)
                for h in range(min(2, i1 - ip)):
                    d2 = dbuf[h]
                    if scale * (0.0 - _min_dist(ibuf[h], nb, bits, bitsf)) < _EXP_MIN:
                        continue  # every term is exp(< -708) = 0
                    _exp_terms(d2, nb, scale, 0.0, p, ik)
                    sums[ip + h] += _sum_terms(p, f, nb)
                    if not diag:
                        _add_terms(p, f, nb, sums, j0)


@njit(parallel=True, cache=True, nogil=True)
def _sums_rounds_f(XT, X, scale, excl, tile, nt, r0, r1, s0, s1, lo, hi, sums):
    """_sums_rounds in single precision, for float32 XT and X (see _float_distances).

    Squared distances, exponentials and each row's sum over the tile in
    float32, added to the float64 sums; a column's terms are summed in
    float32 over _COL_ROWS rows at a time, then added likewise. The order of
    every sum is fixed by the tiles alone, as in _sums_rounds, and tile
    pairs whose every float32 term is 0 are left out likewise.
    """
    N = XT.shape[1]
    ms = np.float32(-scale)
    for r in range(r0, r1):
        for s in prange(s0, _round_slots(nt, r, s1)):
            ta, tb, i0, i1, j0, nb = _pair_span(nt, r, s, tile, N)
            if ta < 0:
                continue
            diag = ta == tb
            if not diag and -scale * _gap_bound(lo, hi, ta, tb) < _EXP_FLOOR_F:
                continue
            dbuf, ibuf, ik, f, bits, bitsf = _pair_buffers(tile, np.float32, np.int32)
            p = np.empty(tile, dtype=np.float32)
            cs = np.zeros(tile, dtype=np.float32)
            for ip in range(i0, i1, 2):
                _ref_pair_dists(XT, X, ip, i1, j0, nb, excl and diag, dbuf)
                for h in range(min(2, i1 - ip)):
                    if -scale * _min_dist(ibuf[h], nb, bits, bitsf) < _EXP_FLOOR_F:
                        continue  # every term is exp(< -87) = 0
                    _exp_terms_f(dbuf[h], nb, ms, p, ik)
                    if diag:
                        sums[ip + h] += _sum_terms_f(p, f, nb)
                    else:
                        sums[ip + h] += _sum_add_terms_f(p, f, nb, cs)
                if not diag and ((ip - i0) % _COL_ROWS == _COL_ROWS - 2 or ip + 2 >= i1):
                    _flush_cols(cs, nb, sums, j0)


@njit(parallel=True, cache=True, nogil=True)
def _topk_rounds(XT, X, ids, scale, excl, tile, nt, r0, r1, s0, s1, lo, hi, sums, thr, top_d, top_i):
    """Symmetric top-k: the sums of _sums_rounds and every row's selection at once.

    The points are in a locality order: position p holds point ids[p].
    Row p's selection is a bounded max-heap top_d[p], top_i[p] on
    (distance, point index) whose root, mirrored in thr[p], is its k-th
    best so far. Tile pair (ta, tb) computes d(i, n) once for i in ta, n
    in tb and offers it to row i (as point ids[n]) and, off the diagonal,
    to row n (as point ids[i]); only entries at or below the row's
    threshold are looked at, and a row whose tile minimum is above it is
    skipped. A row's first pair is its own tile (the diagonal round runs
    first), which builds its heap at once (_heap_build). A row's heap is
    touched by one thread at a time (the slots of a round share no tile),
    and the kept set does not depend on the order of the offers. A pair of
    distinct tiles is left out whole when its boxes' gap (_gap_bound) puts
    every term below exp(-708) and every distance above the thresholds of
    both tiles' rows (thresholds only fall, so nothing would be offered).
    """
    N = XT.shape[1]
    k = top_d.shape[1]
    for r in range(r0, r1):
        for s in prange(s0, _round_slots(nt, r, s1)):
            ta, tb, i0, i1, j0, nb = _pair_span(nt, r, s, tile, N)
            if ta < 0:
                continue
            diag = ta == tb
            if not diag:
                g2 = _gap_bound(lo, hi, ta, tb)
                if -scale * g2 < _EXP_MIN and g2 > max(thr[i0:i1].max(), thr[j0 : j0 + nb].max()):
                    continue
            dbuf, ibuf, ik, f, bits, bitsf = _pair_buffers(tile)
            p = np.empty(tile, dtype=np.float64)
            scratch = np.empty((2, tile), dtype=np.float64)
            for ip in range(i0, i1, 2):
                _ref_pair_dists(XT, X, ip, i1, j0, nb, excl and diag, dbuf)
                for h in range(min(2, i1 - ip)):
                    i = ip + h
                    d2 = dbuf[h]
                    dt = _min_dist(ibuf[h], nb, bits, bitsf)
                    if scale * (0.0 - dt) >= _EXP_MIN:  # else every term is exp(< -708) = 0
                        _exp_terms(d2, nb, scale, 0.0, p, ik)
                        sums[i] += _sum_terms(p, f, nb)
                        if not diag:
                            _add_terms(p, f, nb, sums, j0)
                    if diag and nb > k:
                        # the row's first pair (the diagonal runs first)
                        _heap_build(d2, nb, j0, i if excl else -1, ids, scratch, top_d[i], top_i[i])
                        thr[i] = top_d[i, 0]
                    elif dt <= thr[i]:
                        _heap_scan_ids(d2, nb, j0, i if excl else -1, ids, top_d[i], top_i[i])
                        thr[i] = top_d[i, 0]
                    if not diag and _count_le(d2, nb, thr, j0) > 0:
                        _offer_cols(d2, nb, j0, ids[i], thr, top_d, top_i)


@njit(parallel=True, cache=True, nogil=True)
def _finish_topk(scale, dmin, logs, ids, top_d, top_i, logp, idx):
    """Row p's heap sorted best first, as log q, into row ids[p] of logp and idx."""
    for r in prange(top_d.shape[0]):
        hd = top_d[r]
        hi = top_i[r]
        _heap_sort(hd, hi)
        g = ids[r]
        for t in range(hd.shape[0]):
            logp[g, t] = scale * (dmin[r] - hd[t]) - logs[r]
            idx[g, t] = hi[t]


@njit(parallel=True, cache=True, nogil=True)
def _targets_rounds(XT, X, V, neg_a_max, scale, excl, tile, nt, r0, r1, s0, s1, lo, hi, acc):
    """Targets over rounds r0 <= r < r1 (slots s0 <= s < s1), each unordered pair once.

    acc (C, N) gathers, per reference i, sum_n q(i|n) u_n with
    q(i|n) = e_in / Z_n, e_in = exp(-scale d(i, n)), and V[:, n] = u_n / Z_n
    (zero for the rows left to _targets_rest). Tile pair (ta, tb) computes
    d(i, n) and e_in once for i in ta, n in tb: i takes e_in V[:, n] (the
    row direction) and, off the diagonal, n takes e_in V[:, i] (the column
    direction). e_in <= 1 always (its exponent is <= 0). ``neg_a_max[t]``,
    the largest -log Z over tile t's rows, bounds log q: a row whose terms
    are all below exp(-708) in both directions skips the exponentials, and
    a pair of distinct tiles where that holds for every row (by the boxes'
    gap, _gap_bound) is left out whole. Rows of acc are written in a fixed
    order (see _sums_rounds): the sums do not depend on the thread count.
    """
    N = XT.shape[1]
    for r in range(r0, r1):
        for s in prange(s0, _round_slots(nt, r, s1)):
            ta, tb, i0, i1, j0, nb = _pair_span(nt, r, s, tile, N)
            if ta < 0:
                continue
            diag = ta == tb
            bound = max(neg_a_max[ta], neg_a_max[tb])
            if not diag:
                x = -scale * _gap_bound(lo, hi, ta, tb)
                if x < _EXP_MIN or x + bound < _EXP_MIN:
                    continue
            dbuf, ibuf, ik, f, bits, bitsf = _pair_buffers(tile)
            e = np.empty((2, tile), dtype=np.float64)
            for ip in range(i0, i1, 2):
                nh = min(2, i1 - ip)
                _ref_pair_dists(XT, X, ip, i1, j0, nb, excl and diag, dbuf)
                on = False
                for h in range(2):
                    if h < nh:
                        x = -scale * _min_dist(ibuf[h], nb, bits, bitsf)
                        if x >= _EXP_MIN and x + bound >= _EXP_MIN:
                            _exp_terms(dbuf[h], nb, scale, 0.0, e[h], ik)
                            _mul_terms(e[h], f, nb)
                            on = True
                            continue
                    e[h, :nb] = 0.0
                if on:
                    _gather_sums(e, nb, V, j0, ip, nh, acc)
                    if not diag:
                        _scatter_sums(e, nb, V, ip, ip + nh - 1, acc, j0)


@njit(parallel=True, cache=True, nogil=True)
def _targets_rest(XT, X, UT, rest, dmin, logs, scale, excl, tile, acc):
    """The terms q(i|n) u_n of the rows n in ``rest``, for every reference i, one-sided.

    For rows whose normaliser is too small (log Z_n < -_LOGZ_MARGIN) for
    e_in / Z_n to keep every term above exp(-708): here
    q(i|n) = exp(scale (dmin[n] - d(n, i)) - logs[n]) directly. Each thread
    owns a tile of references; the rows go in order.
    """
    N = XT.shape[1]
    m = rest.shape[0]
    for t in prange((N + tile - 1) // tile):
        j0 = t * tile
        nb = min(tile, N - j0)
        dbuf = np.empty((2, tile), dtype=np.float64)
        nl = np.empty(tile, dtype=np.float64)
        e = np.empty((2, tile), dtype=np.float64)
        ik = np.empty(tile, dtype=np.int64)
        f = ik.view(np.float64)
        for a in range(0, m, 2):
            na = rest[a]
            nb_ = rest[min(a + 1, m - 1)]
            _sq_dists2(XT, j0, nb, X[na], X[nb_], dbuf[0], dbuf[1])
            for h in range(2):
                n = na if h == 0 else nb_
                if h == 1 and a + 1 >= m:
                    e[h, :nb] = 0.0
                    continue
                if excl and j0 <= n < j0 + nb:
                    dbuf[h, n - j0] = np.inf
                _neg_log_q_row(dbuf[h], nb, scale, dmin[n], logs[n], nl)
                _exp_terms(nl, nb, 1.0, 0.0, e[h], ik)
                _mul_terms(e[h], f, nb)
            _scatter_sums(e, nb, UT, na, nb_, acc, j0)


# --------------------------------------------------------------------------
# Python side: conversion, threads, chunks, progress
# --------------------------------------------------------------------------


def _default_tile(D: int) -> int:
    # keep one XT tile (D x tile float64) around 256 KiB so it stays in L2
    return int(min(1024, max(128, ((1 << 15) // max(1, D)) // 16 * 16)))


def _pair_tile(N: int, D: int, block_size: int, longest: int = 1024) -> int:
    """Tile length of the symmetric passes.

    ``block_size`` when given; else the default tile, at most ``longest``,
    cut so that there are at least 4 tiles per thread Numba may use
    (``numba.config.NUMBA_NUM_THREADS``, not the call's ``num_threads``: the
    tiles, hence the order of every sum, do not depend on it), so that the
    rounds of tile pairs keep every thread busy in small problems.
    """
    if block_size > 0:
        return int(min(block_size, N))
    most = -(-N // (4 * max(1, numba.config.NUMBA_NUM_THREADS)))
    tile = min(_default_tile(D), longest, max(64, -(-most // 16) * 16))
    return int(max(1, min(tile, N)))


def _round_units(nt: int, r: int, s0: int, s1: int) -> int:
    """Progress units of slots s0 <= s < s1 of round r: a diagonal pair 1, any other 2 (nt^2 in all)."""
    if r == 0:
        return s1 - s0
    bye = 1 if nt % 2 and s0 == 0 else 0  # slot 0 holds tile nt when nt is odd
    return 2 * (s1 - s0 - bye)


_ALL_SLOTS = 1 << 62


def _round_calls(nt: int, tile: int, D: int, threads: int):
    """Kernel calls (r0, r1, s0, s1, units) covering every tile pair once, in order.

    Whole rounds are grouped up to about _CHUNK_WORK per call; a round above
    twice that is cut into runs of slots (at least ``threads`` each), so
    that progress is reported and Ctrl-C is seen about every 0.1 s.
    """
    P = nt + nt % 2
    per_pair = tile * tile * (8 + D)
    calls = []
    r = 0
    while r < P:
        slots = _round_slots(nt, r, _ALL_SLOTS)
        if slots * per_pair > 2 * _CHUNK_WORK and slots > threads:
            step = max(threads, _CHUNK_WORK // per_pair)
            for s0 in range(0, slots, step):
                s1 = min(slots, s0 + step)
                calls.append((r, r + 1, s0, s1, _round_units(nt, r, s0, s1)))
            r += 1
            continue
        r1, work, units = r, 0, 0
        while r1 < P:
            n = _round_slots(nt, r1, _ALL_SLOTS)
            if r1 > r and (work + n * per_pair > _CHUNK_WORK or n * per_pair > 2 * _CHUNK_WORK):
                break
            work += n * per_pair
            units += _round_units(nt, r1, 0, n)
            r1 += 1
        calls.append((r, r1, 0, _ALL_SLOTS, units))
        r = r1
    return calls


def _over_rounds(N: int, D: int, tile: int, threads: int, run, progress, offset: int = 0, total: int = 0):
    """run(r0, r1, s0, s1) over every tile pair; progress(offset + N * done // all, total or N)."""
    nt = -(-N // tile)
    done = 0
    # one pair at a time per thread: a thread held up (by another process)
    # delays only its own pair, not a fixed share of the round
    prev = numba.set_parallel_chunksize(1)
    try:
        for r0, r1, s0, s1, units in _round_calls(nt, tile, D, threads):
            run(nt, r0, r1, s0, s1)
            done += units
            if progress is not None:
                progress(offset + N * done // (nt * nt), total or N)
    finally:
        numba.set_parallel_chunksize(prev)


def _query_block(rows: int, threads: int) -> int:
    # enough tasks for load balance, few enough rows to reuse each tile in cache
    return int(max(1, min(_QUERY_BLOCK, -(-rows // (4 * max(1, threads))))))


def _chunks(rows: int, N: int, D: int, threads: int):
    n = max(1, rows * N * (8 + D) // _CHUNK_WORK)
    n = max(1, min(n, rows // max(1, 4 * threads)))
    bounds = np.linspace(0, rows, n + 1).astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


class _Threads:
    """Set Numba's thread count for the duration of a call, then restore it."""

    def __init__(self, num_threads):
        self.n = max(1, min(int(num_threads or 1), numba.config.NUMBA_NUM_THREADS))

    def __enter__(self):
        self.prev = numba.get_num_threads()
        numba.set_num_threads(self.n)
        return self.n

    def __exit__(self, *exc):
        numba.set_num_threads(self.prev)
        return False


def _as_f64(X, Y):
    X64 = np.ascontiguousarray(X, dtype=np.float64)
    XT = np.ascontiguousarray(X64.T)
    Y64 = X64 if Y is X else np.ascontiguousarray(Y, dtype=np.float64)
    return X64, XT, Y64


_NO_DENSE = np.empty((0, 0), dtype=np.float64)
_NO_IDX = np.empty((0, 0), dtype=np.int64)


_NO_ROWS = np.empty(0, dtype=np.int64)


def _run_rows(
    XT, Y64, scale, exclude_self, block_size, num_threads, progress, mode, dense, top_i, top_d, rows=_NO_ROWS
):
    """Run the row kernel in chunks; returns (dmin, logs), float64 (M,).

    ``rows`` (mode 0): Y64 holds the references ``rows`` (int64), whose self
    columns those are with ``exclude_self``; empty: row r is reference r.
    """
    M, N, D = Y64.shape[0], XT.shape[1], XT.shape[0]
    tile = min(int(block_size) if block_size > 0 else _default_tile(D), N)
    dmin = np.empty(M, dtype=np.float64)
    logs = np.empty(M, dtype=np.float64)
    with _Threads(num_threads) as nt:
        for a, b in _chunks(M, N, D, nt):
            _rows_kernel(
                XT,
                Y64[a:b],
                float(scale),
                bool(exclude_self),
                a,
                rows[a:b],
                tile,
                _query_block(b - a, nt),
                mode,
                dmin[a:b],
                logs[a:b],
                dense[a:b] if mode == 1 else dense,
                top_i[a:b] if mode == 2 else top_i,
                top_d[a:b] if mode == 2 else top_d,
            )
            if progress is not None:
                progress(b, M)
    return dmin, logs


def _log_norm(dmin, logs, scale, dtype):
    return (logs - float(scale) * dmin).astype(dtype, copy=False)


# A row sum (exclude_self) below N * 2^-960 may have lost terms under exp's
# floor of e^-708 that the streaming minimum would keep: such problems are
# redone row by row. In single precision the floor is e^-87 and the bound
# N * 2^-100 (lost terms below 2^-25 of the sum).
_SELF_SUM_FLOOR = 2.0**-960
_SELF_SUM_FLOOR_F = 2.0**-100


def _float_distances(X, scale) -> bool:
    """Whether the symmetric normaliser of X runs in single precision (_sums_rounds_f).

    The cpp kernel's rule (float_distances in csrc/mapa/kernel.cpp): float32
    input with at most _F32_MAX_FEATURES features, every coordinate below
    4e18 / sqrt(D) in magnitude (no squared distance overflows float32), and
    scale <= 1e30 (float32's subnormal spacing 2^-149 then moves a logit by
    under 1e-14 D). Anything else keeps float64.
    """
    D = X.shape[1]
    if X.dtype != np.float32 or D > _F32_MAX_FEATURES or not float(scale) <= 1e30:
        return False
    return bool(np.abs(X).max() < np.float32(4e18 / math.sqrt(D)))


def _drift_floor(D: int) -> float:
    """log Z below which a row of float32 distances is redone in float64.

    The cpp rule (drift_floor in csrc/mapa/kernel.cpp): float32 squared
    distances are within (D + 2) 2^-24 of themselves, so a kept entry's
    log q = logit - log Z is off by up to (D + 2) 2^-24 (2 |log Z| + 30 + H).
    Below this floor the 2 |log Z| part passes 2e-5.
    """
    return -1e-5 * 2.0**24 / (D + 2)


def _from_self_sums(sums, X64, XT, scale, exclude_self, block_size, num_threads, floor=_SELF_SUM_FLOOR, single=False):
    """(dmin, logs) from the symmetric row sums of exp(-scale d).

    The log of the row sum is exact because every logit is <= 0 (the self
    term is 0). It goes to logs, with dmin = 0, where it is >= 0 (always,
    unless exclude_self), else to dmin = -log(sum) / scale with logs = 0:
    the targets pass needs logs >= 0 to bound log q by its tile test. With
    exclude_self, the rows whose sum is near the exponential's floor (below
    N * floor: isolated points, which may have lost terms under it) and,
    for sums of float32 distances (``single``), those whose log Z is below
    _drift_floor, are redone alone by the one-sided pass (streaming
    minimum, float64), without progress reports (they would go backwards).
    """
    N, D = X64.shape
    with np.errstate(divide="ignore"):  # a sum of 0 is redone below
        ln = np.log(sums)
    neg = ln < 0.0
    dmin, logs = np.where(neg, -ln / float(scale), 0.0), np.where(neg, 0.0, ln)
    rows = _NO_ROWS
    if exclude_self:
        rows = np.flatnonzero((sums < N * floor) | (ln < _drift_floor(D) if single else False))
    if rows.size:
        dmin[rows], logs[rows] = _run_rows(
            XT, X64[rows], scale, True, block_size, num_threads, None, 0, _NO_DENSE, _NO_IDX, _NO_DENSE, rows
        )
    return dmin, logs


def _tile_boxes(X64, tile):
    """Each tile's bounding box (lo, hi), (tiles, D), for _gap_bound."""
    starts = np.arange(0, X64.shape[0], tile)
    return np.minimum.reduceat(X64, starts, axis=0), np.maximum.reduceat(X64, starts, axis=0)


@njit(cache=True, nogil=True)
def _apart_share(lo, hi, scale, floor):
    """Share of the pairs of distinct tiles whose every logit is below ``floor`` (_gap_bound)."""
    nt = lo.shape[0]
    apart = 0
    for a in range(nt):
        for b in range(a + 1, nt):
            if -scale * _gap_bound(lo, hi, a, b) < floor:
                apart += 1
    return apart / max(1, nt * (nt - 1) // 2)


def _pair_order(X64, scale, single, tile):
    """The symmetric passes' order of the points and its tiles' boxes: (ids, Xo, lo, hi).

    ids is _locality_order, or None for the input order; Xo is X64 in that
    order (X64 itself when None), and lo, hi its tiles' boxes (_tile_boxes,
    tiles of length ``tile``). Sorted, a tile holds nearby points and
    pairs of tiles far apart have every term between them 0 (_gap_bound),
    which the passes leave out. The cpp kernel's rule (sorted_refs): tried
    when the data's diameter is over twice the distance at which exp's
    floor is reached (e^-709, or e^-88 in single precision), kept when at
    least a quarter of the pairs of tiles are then left out (else the sort
    costs more than it saves).
    """
    floor = _EXP_FLOOR_F if single else _EXP_MIN - 1.0
    span = X64.max(axis=0) - X64.min(axis=0)
    if float(span @ span) > 4.0 * -floor / float(scale):
        ids = _locality_order(X64)
        Xs = np.ascontiguousarray(X64[ids])
        lo, hi = _tile_boxes(Xs, tile)
        if _apart_share(lo, hi, float(scale), floor) >= 0.25:
            return ids, Xs, lo, hi
    return (None, X64) + _tile_boxes(X64, tile)


def _unsort(ids, a):
    """a by position in the order ids, as by input point (a[p] -> out[ids[p]])."""
    out = np.empty_like(a)
    out[..., ids] = a
    return out


def _self_log_norm(X, X64, XT, scale, exclude_self, block_size, num_threads, progress, boxes=None):
    """(dmin, logs) of every point as its own query, each unordered pair once.

    X is the input (its dtype picks the precision, see _float_distances),
    X64 and XT its float64 copies: _sums_rounds_f on float32 copies, or
    _sums_rounds on X64 and XT. The points go in _pair_order (the results
    are by input point), unless ``boxes`` is given: then X is already in
    the passes' order and boxes is its (lo, hi) from _pair_order.
    """
    N, D = X64.shape
    single = _float_distances(X, scale)
    tile = _pair_tile(N, D, block_size)
    ids = None
    if boxes is None:
        ids, X64, lo, hi = _pair_order(X64, scale, single, tile)
        if ids is not None:
            X = X[ids]
            XT = np.ascontiguousarray(X64.T)
    else:
        lo, hi = boxes
    sums = np.zeros(N)
    if single:
        Xk = np.ascontiguousarray(X, dtype=np.float32)
        XTk = np.ascontiguousarray(Xk.T)
        kernel, floor = _sums_rounds_f, _SELF_SUM_FLOOR_F
    else:
        Xk, XTk, kernel, floor = X64, XT, _sums_rounds, _SELF_SUM_FLOOR

    def run(nt, r0, r1, s0, s1):
        kernel(XTk, Xk, float(scale), bool(exclude_self), tile, nt, r0, r1, s0, s1, lo, hi, sums)

    with _Threads(num_threads) as threads:
        _over_rounds(N, D, tile, threads, run, progress)
    dmin, logs = _from_self_sums(sums, X64, XT, scale, exclude_self, block_size, num_threads, floor, single)
    return (dmin, logs) if ids is None else (_unsort(ids, dmin), _unsort(ids, logs))


def log_normalizer(X, Y, scale, exclude_self, block_size=0, num_threads=1, progress=None):
    X64, XT, Y64 = _as_f64(X, Y)
    if Y64 is X64:
        dmin, logs = _self_log_norm(X, X64, XT, scale, exclude_self, block_size, num_threads, progress)
    else:
        dmin, logs = _run_rows(
            XT, Y64, scale, exclude_self, block_size, num_threads, progress, 0, _NO_DENSE, _NO_IDX, _NO_DENSE
        )
    return _log_norm(dmin, logs, scale, X.dtype)


def _self_dense(X, X64, XT, scale, exclude_self, block_size, num_threads, progress, out):
    """The dense matrix with the queries the references, in two steps.

    The normalisers by the symmetric pass (each unordered pair once, in
    single precision where _float_distances allows), then every entry
    written once, final (_dense_rows, float64 distances, in chunks of rows).
    Progress runs over 2 N: 0 .. N for the first step, N .. 2 N the second.
    """
    N, D = X64.shape
    total = 2 * N
    dmin, logs = _self_log_norm(
        X, X64, XT, scale, exclude_self, block_size, num_threads,
        None if progress is None else (lambda done, _total: progress(done, total)),
    )
    tile = min(int(block_size) if block_size > 0 else _default_tile(D), N)
    with _Threads(num_threads) as nt:
        for a, b in _chunks(N, N, D, nt):
            _dense_rows(
                XT, X64[a:b], float(scale), bool(exclude_self), a, tile, _query_block(b - a, nt),
                dmin[a:b], logs[a:b], out[a:b],
            )
            if progress is not None:
                progress(N + b, total)


def log_posterior(X, Y, scale, exclude_self, block_size=0, num_threads=1, progress=None):
    X64, XT, Y64 = _as_f64(X, Y)
    out = np.empty((Y.shape[0], X.shape[0]), dtype=X.dtype)
    if Y64 is X64:
        _self_dense(X, X64, XT, scale, exclude_self, block_size, num_threads, progress, out)
    else:
        _run_rows(XT, Y64, scale, exclude_self, block_size, num_threads, progress, 1, out, _NO_IDX, _NO_DENSE)
    return out


# The symmetric top-k keeps every row's selection, N * k * 16 bytes, at
# once; above this it runs one-sided (one row block at a time).
_SYMMETRIC_TOPK_BYTES = 1 << 30


@njit(cache=True, nogil=True)
def _principal_coords(X64):
    """Each point's coordinates along the data's two principal axes, (N, 2).

    The cpp kernel's rule (principal_axes in csrc/mapa/kernel.cpp): power
    iteration on an evenly spaced sample of m points from the feature of
    largest variance, the second axis after deflating the first, sized to
    cost ~N^2 D / 2048 multiply-adds: up to 64 features through the
    covariance (m <= 4096, 64 steps), above through the sample itself
    (m <= 256, 32 steps). Up to two features, or when that leaves fewer
    than 16 points, the raw features of widest range (widest first, the one
    twice when D = 1). Deterministic. Compiled: at N = 2 000 the same steps
    as NumPy calls took 0.4 ms, a sixth of a normaliser.
    """
    N, D = X64.shape
    cov = D <= 64
    budget = N * N / 2048.0
    m = int(min(N, 4096 if cov else 256, budget / D if cov else budget / 128.0))
    out = np.empty((N, 2))
    if D <= 2 or m < 16:
        span = np.empty(D)
        for k in range(D):
            span[k] = X64[:, k].max() - X64[:, k].min()
        f0 = int(np.argmax(span))
        f1 = f0
        for k in range(D):
            if k != f0 and (f1 == f0 or span[k] > span[f1]):
                f1 = k
        out[:, 0] = X64[:, f0]
        out[:, 1] = X64[:, f1]
        return out
    mean = np.zeros(D)
    for i in range(N):
        for k in range(D):
            mean[k] += X64[i, k]
    mean /= N
    stride = N // m
    S = np.empty((m, D))
    for i in range(m):
        for k in range(D):
            S[i, k] = X64[i * stride, k] - mean[k]
    C = np.zeros((D, D))
    if cov:
        for i in range(m):
            for a in range(D):
                sa = S[i, a]
                for b in range(D):
                    C[a, b] += sa * S[i, b]
    axes = np.zeros((2, D))
    lam0 = 0.0
    w = np.empty(D)
    su = np.empty(m)
    for a in range(2):
        var = np.zeros(D)
        for i in range(m):
            for k in range(D):
                var[k] += S[i, k] * S[i, k]
        if a == 1:
            for k in range(D):
                var[k] -= lam0 * axes[0, k] ** 2
        u = np.zeros(D)
        u[np.argmax(var)] = 1.0
        lam = 0.0
        for _ in range(64 if cov else 32):
            if cov:
                for r in range(D):
                    t = 0.0
                    for c in range(D):
                        t += C[r, c] * u[c]
                    w[r] = t
            else:
                for i in range(m):
                    t = 0.0
                    for k in range(D):
                        t += S[i, k] * u[k]
                    su[i] = t
                w[:] = 0.0
                for i in range(m):
                    for k in range(D):
                        w[k] += S[i, k] * su[i]
                if a == 1:
                    t = lam0 * (axes[0] * u).sum()
                    for k in range(D):
                        w[k] -= t * axes[0, k]
            norm = np.sqrt((w * w).sum())
            if not norm > 0.0:
                break
            lam = norm
            u = w / norm
        axes[a] = u
        if a == 0 and cov:
            for r in range(D):
                for c in range(D):
                    C[r, c] -= lam * u[r] * u[c]
        lam0 = lam
    for i in range(N):
        p0 = 0.0
        p1 = 0.0
        for k in range(D):
            v = X64[i, k] - mean[k]
            p0 += v * axes[0, k]
            p1 += v * axes[1, k]
        out[i, 0] = p0
        out[i, 1] = p1
    return out


def _locality_order(X64):
    """Positions along a Z-order (Morton) curve over the two principal coordinates.

    Nearby points then share tiles, so a row's k best are mostly found in
    its own tile (the diagonal pairs run first) and its threshold rarely
    lets later tiles' entries through. Stable, so ties keep the input order.
    """
    return np.argsort(_morton_codes(_principal_coords(X64)), kind="stable")


@njit(cache=True, nogil=True)
def _morton_codes(P):
    """Z-order codes of the points P (N, 2): each coordinate scaled to 16 bits over its range, interleaved."""
    N = P.shape[0]
    code = np.zeros(N, dtype=np.uint32)
    for bit in range(2):
        lo = P[:, bit].min()
        span = P[:, bit].max() - lo
        f = 0.0 if span == 0 else 65535.0 / span
        for i in range(N):
            v = np.uint32(min(65535.0, max(0.0, (P[i, bit] - lo) * f)))
            v = (v | (v << np.uint32(8))) & np.uint32(0x00FF00FF)
            v = (v | (v << np.uint32(4))) & np.uint32(0x0F0F0F0F)
            v = (v | (v << np.uint32(2))) & np.uint32(0x33333333)
            v = (v | (v << np.uint32(1))) & np.uint32(0x55555555)
            code[i] |= v << np.uint32(bit)
    return code


def _symmetric_topk(X64, scale, k, exclude_self, block_size, num_threads, progress, idx, logp):
    """Top-k with the queries the references, each unordered pair once (_topk_rounds).

    The points go in _locality_order; idx, logp (N, k) and the returned
    (dmin, logs) are by input row.
    """
    N, D = X64.shape
    ids = _locality_order(X64)
    Xs = np.ascontiguousarray(X64[ids])
    XTs = np.ascontiguousarray(Xs.T)
    tile = _pair_tile(N, D, block_size, longest=_TOPK_TILE)
    lo, hi = _tile_boxes(Xs, tile)
    sums = np.zeros(N)
    thr = np.full(N, np.inf)
    top_d = np.full((N, k), np.inf)
    top_i = np.full((N, k), N, dtype=np.int64)  # sentinel: ranks after every real column

    def run(nt, r0, r1, s0, s1):
        _topk_rounds(
            XTs, Xs, ids, float(scale), bool(exclude_self), tile, nt, r0, r1, s0, s1, lo, hi, sums, thr, top_d, top_i
        )

    with _Threads(num_threads) as threads:
        _over_rounds(N, D, tile, threads, run, progress)
        dmin, logs = _from_self_sums(sums, Xs, XTs, scale, exclude_self, block_size, num_threads)
        _finish_topk(float(scale), dmin, logs, ids, top_d, top_i, logp, idx)
    out_dmin = np.empty(N)
    out_logs = np.empty(N)
    out_dmin[ids] = dmin
    out_logs[ids] = logs
    return out_dmin, out_logs


def topk(X, Y, scale, k, exclude_self, block_size=0, num_threads=1, progress=None):
    X64, XT, Y64 = _as_f64(X, Y)
    M = Y.shape[0]
    idx = np.empty((M, k), dtype=np.int64)
    logp = np.empty((M, k), dtype=np.float64)
    if Y64 is X64 and M * k * 16 <= _SYMMETRIC_TOPK_BYTES:
        dmin, logs = _symmetric_topk(X64, scale, k, exclude_self, block_size, num_threads, progress, idx, logp)
    else:
        dmin, logs = _run_rows(
            XT, Y64, scale, exclude_self, block_size, num_threads, progress, 2, _NO_DENSE, idx, logp
        )
    return idx, logp.astype(X.dtype, copy=False), _log_norm(dmin, logs, scale, X.dtype)


# Rows with log Z_n below -_LOGZ_MARGIN (only possible with exclude_self)
# take the one-sided _targets_rest: through e_in / Z_n, terms whose e_in
# falls below exp(-708) would be lost although q(i|n) = e_in / Z_n could be
# up to exp(-708 + _LOGZ_MARGIN); the margin keeps any such loss below
# exp(-308) ~ 1e-134.
_LOGZ_MARGIN = 400.0


def targets(X, scale, exclude_self, block_size=0, num_threads=1, progress=None):
    N, D = X.shape
    X64 = np.ascontiguousarray(X, dtype=np.float64)
    # every pass in _pair_order; acc's columns by input point at the end
    tile = _pair_tile(N, D, block_size)
    ids, X64, lo, hi = _pair_order(X64, scale, _float_distances(X, scale), tile)
    if ids is not None:
        X = X[ids]
    # UT = u_n = (1, x_n, ||x_n||^2) per point, feature-major; its rows 1 .. D are XT
    UT = np.empty((D + 2, N))
    UT[0] = 1.0
    UT[1 : D + 1] = X64.T
    UT[D + 1] = np.einsum("nd,nd->n", X64, X64)
    XT = UT[1 : D + 1]
    total = 2 * N
    # pass 1: normaliser of every row n (progress 0 .. N)
    dmin, logs = _self_log_norm(
        X, X64, XT, scale, exclude_self, block_size, num_threads,
        None if progress is None else (lambda done, _total: progress(done, total)), boxes=(lo, hi),
    )
    # pass 2: the sums, each unordered pair once (progress N .. 2N), with
    # V = u_n / Z_n; rows with too small a normaliser get V = 0 and go one-sided
    neg_a = float(scale) * dmin - logs  # -log Z_n
    safe = neg_a <= _LOGZ_MARGIN
    V = UT * np.where(safe, np.exp(np.minimum(neg_a, _LOGZ_MARGIN)), 0.0)
    neg_a_max = np.maximum.reduceat(np.where(safe, neg_a, -np.inf), np.arange(0, N, tile))
    acc = np.zeros((D + 2, N))

    def run(nt, r0, r1, s0, s1):
        _targets_rounds(
            XT, X64, V, neg_a_max, float(scale), bool(exclude_self), tile, nt, r0, r1, s0, s1, lo, hi, acc
        )

    with _Threads(num_threads) as threads:
        _over_rounds(N, D, tile, threads, run, progress, offset=N, total=total)
        rest = np.flatnonzero(~safe)
        # in chunks of about _CHUNK_WORK, between which Ctrl-C is seen
        step = max(2, _CHUNK_WORK // max(1, N * (8 + D)) // 2 * 2)
        for a in range(0, len(rest), step):
            _targets_rest(XT, X64, UT, rest[a : a + step], dmin, logs, float(scale), bool(exclude_self), tile, acc)
    if ids is not None:
        acc = _unsort(ids, acc)
    return acc[0].copy(), np.ascontiguousarray(acc[1 : D + 1].T), acc[D + 1].copy()
