"""Numba backend: tiled distances, streaming log-sum-exp, heap top-k, targets.

Same contract as :mod:`mapa.backends.numpy_ref` (see the package docstring).
All arithmetic is float64 whatever the input dtype: the references are copied
once into a transposed float64 array ``XT`` (D, N), so that the squared
distances of a query to a tile of references form a contiguous loop over the
references (explicit differences, no ||x||^2 + ||y||^2 - 2 x.y expansion).
Queries go in pairs, sharing each load of ``XT``.

Work is split as blocks of query rows x tiles of references (``block_size``
references per tile). Each query row keeps its smallest squared distance so
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

Top-k keeps a bounded max-heap per row on (distance, index), so ties in
distance go to the lower index; the reference sorts by log-probability, which
can differ only where two distinct distances round to the same float64 logit.

When the queries are the references (``log_normalizer`` without queries,
and the first pass of ``targets``), the normalisers come from a symmetric
pass instead: each unordered pair of tiles once, every term added to its
row's and its column's sum, with no running minimum (every logit is <= 0,
the self term is 0); per-slot sums in a fixed unit order keep the result
reproducible.

Parallelism: ``prange`` over blocks of query rows (``targets``: blocks of
references, so each thread owns its output rows; the symmetric pass: one
slot of tile pairs per thread). Large problems are cut into
chunks of rows of bounded work (about 0.1 s each), between which ``progress``
is called and Ctrl-C is seen. Compiled signatures: the row kernel for a float64 and a float32 dense
output, and the targets kernel (all cached on disk).
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
_INF_BITS = 0x7FF0000000000000  # bit pattern of +inf as int64

_QUERY_BLOCK = 32  # query rows per parallel task (upper bound)
_CHUNK_WORK = 1 << 29  # pairs * (8 + D) per chunk: ~0.1 s, so Ctrl-C is seen quickly


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
def _min_bits(d2i, nb):
    """Minimum of non-negative float64 values, compared as their int64 bit patterns."""
    mn = _INF_BITS
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


@njit(cache=True, nogil=True, fastmath=_FM)
def _neg_log_q(d2, nb, scale, dmin, logs, j0):
    """d2[j] <- -log q = scale * (d2[j] - dmin[n]) + logs[n], n = j0 + j (>= 0)."""
    dm = dmin[j0 : j0 + nb]
    ls = logs[j0 : j0 + nb]
    for j in range(nb):
        d2[j] = scale * (d2[j] - dm[j]) + ls[j]


@njit(cache=True, nogil=True, fastmath=_FM_SUM)
def _accumulate(p, f, nb, j0, sq, XT, i, W, S1, S2):
    """Targets of reference i from the tile's q(i|n) = p*f: W, S1, S2 += ..."""
    w = 0.0
    s2 = 0.0
    sqt = sq[j0 : j0 + nb]
    for j in range(nb):
        e = p[j] * f[j]
        p[j] = e
        w += e
        s2 += e * sqt[j]
    W[i] += w
    S2[i] += s2
    D = XT.shape[0]
    rem = D % 4
    for d in range(rem):
        row = XT[d, j0 : j0 + nb]
        acc = 0.0
        for j in range(nb):
            acc += p[j] * row[j]
        S1[i, d] += acc
    for d in range(rem, D, 4):  # four dimensions per pass over p
        r0 = XT[d, j0 : j0 + nb]
        r1 = XT[d + 1, j0 : j0 + nb]
        r2 = XT[d + 2, j0 : j0 + nb]
        r3 = XT[d + 3, j0 : j0 + nb]
        a0 = 0.0
        a1 = 0.0
        a2 = 0.0
        a3 = 0.0
        for j in range(nb):
            e = p[j]
            a0 += e * r0[j]
            a1 += e * r1[j]
            a2 += e * r2[j]
            a3 += e * r3[j]
        S1[i, d] += a0
        S1[i, d + 1] += a1
        S1[i, d + 2] += a2
        S1[i, d + 3] += a3


# --------------------------------------------------------------------------
# parallel kernels
# --------------------------------------------------------------------------


@njit(parallel=True, cache=True, nogil=True)
def _rows_kernel(XT, Y, scale, excl, row0, tile, qb, mode, dmin_out, logs_out, dense, top_i, top_d):
    """One pass over all references per block of query rows.

    Per query row r: dmin_out[r] = smallest squared distance and logs_out[r] =
    log sum_j exp(-scale (d_j - dmin)) >= 0, so log_norm = -scale dmin + logs;
    keeping the two apart lets log q = scale (dmin - d) - logs be formed
    without cancellation, however large the distances.
    mode 0: just that; 1: also the dense rows log q into ``dense`` (second
    pass, distances recomputed); 2: also the top-k (k = top_d.shape[1]) by a
    bounded heap on (distance, index), returned sorted, top_d as log q.
    Query row r of Y has global index row0 + r (its self column with ``excl``).
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
                    self_col = row0 + r if excl else -1
                    if j0 <= self_col < j0 + nb:
                        d2[self_col - j0] = np.inf
                    bits[0] = _min_bits(d2i, nb)
                    dt = bitsf[0]
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
                        _write_logq(d2, nb, scale, dm[qq], logs_out[r], dense[r], j0)
        elif mode == 2:
            for qq in range(nq):
                r = q0 + qq
                hd = top_d[r]
                _heap_sort(hd, top_i[r])
                for t in range(hd.shape[0]):
                    hd[t] = scale * (dm[qq] - hd[t]) - logs_out[r]


@njit(parallel=True, cache=True, nogil=True)
def _targets_kernel(XT, X, dmin, logs, dmin_tile_max, sq, scale, excl, i_start, i_stop, tile, qb, W, S1, S2):
    """W, S1, S2 for references i in [i_start, i_stop), summing over all queries n.

    q(i|n) = exp(scale (dmin[n] - d(n,i)) - logs[n]) from the first pass.
    ``dmin_tile_max[t]`` is the largest dmin in column tile t, so
    scale (dmin_tile_max - min_n d(n,i)) bounds log q over the tile; tiles
    where it is below -708 (every term 0) are skipped.
    """
    N = XT.shape[1]
    nref = i_stop - i_start
    nblk = (nref + qb - 1) // qb
    for b in prange(nblk):
        i0 = i_start + b * qb
        i1 = min(i_stop, i0 + qb)
        dbuf = np.empty((2, tile), dtype=np.float64)
        ibuf = dbuf.view(np.int64)
        p = np.empty(tile, dtype=np.float64)
        ik = np.empty(tile, dtype=np.int64)
        f = ik.view(np.float64)
        bits = np.empty(1, dtype=np.int64)
        bitsf = bits.view(np.float64)
        for j0 in range(0, N, tile):
            nb = min(tile, N - j0)
            for ip in range(i0, i1, 2):
                _ref_pair_dists(XT, X, ip, i1, j0, nb, excl, dbuf)
                for h in range(min(2, i1 - ip)):
                    i = ip + h
                    d2 = dbuf[h]
                    bits[0] = _min_bits(ibuf[h], nb)
                    if scale * (dmin_tile_max[j0 // tile] - bitsf[0]) < _EXP_MIN:
                        continue
                    _neg_log_q(d2, nb, scale, dmin, logs, j0)
                    _exp_terms(d2, nb, 1.0, 0.0, p, ik)
                    _accumulate(p, f, nb, j0, sq, XT, i, W, S1, S2)


@njit(parallel=True, cache=True, nogil=True)
def _self_sums_kernel(XT, X, scale, excl, tile, ua, ub, u0, u1, sums):
    """Row sums of exp(-scale d(i, j)) over the tile pairs (ua[u], ub[u]), u0 <= u < u1.

    The queries are the references: unit u takes the rows of tile ua[u]
    against the columns of tile ub[u] >= ua[u], and adds each term to its
    row's sum and, off the diagonal, to its column's, so every unordered
    pair is computed once. Every logit is <= 0, so no running minimum is
    needed. Slot s of ``sums`` (slots, N) takes the units with u % slots == s,
    in order, whatever thread runs it: the result is reproducible.
    """
    N = XT.shape[1]
    slots = sums.shape[0]
    for s in prange(slots):
        dbuf = np.empty((2, tile), dtype=np.float64)
        p = np.empty(tile, dtype=np.float64)
        ik = np.empty(tile, dtype=np.int64)
        f = ik.view(np.float64)
        acc = sums[s]
        u = u0 + (s - u0) % slots
        while u < u1:
            ta = ua[u]
            tb = ub[u]
            u += slots
            i0 = ta * tile
            i1 = min(N, i0 + tile)
            j0 = tb * tile
            nb = min(tile, N - j0)
            for ip in range(i0, i1, 2):
                _ref_pair_dists(XT, X, ip, i1, j0, nb, excl, dbuf)
                for h in range(min(2, i1 - ip)):
                    i = ip + h
                    d2 = dbuf[h]
                    _exp_terms(d2, nb, scale, 0.0, p, ik)
                    acc[i] += _sum_terms(p, f, nb)
                    if ta != tb:
                        _add_terms(p, f, nb, acc, j0)


@njit(cache=True, nogil=True, fastmath=_FM)
def _add_terms(p, f, nb, acc, j0):
    a = acc[j0 : j0 + nb]
    for j in range(nb):
        a[j] += p[j] * f[j]


# --------------------------------------------------------------------------
# Python side: conversion, threads, chunks, progress
# --------------------------------------------------------------------------


def _default_tile(D: int) -> int:
    # keep one XT tile (D x tile float64) around 256 KiB so it stays in L2
    return int(min(1024, max(128, ((1 << 15) // max(1, D)) // 16 * 16)))


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


def _run_rows(XT, Y64, scale, exclude_self, block_size, num_threads, progress, mode, dense, top_i, top_d):
    """Run the row kernel in chunks; returns (dmin, logs), float64 (M,)."""
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
# redone row by row.
_SELF_SUM_FLOOR = 2.0**-960


def _self_log_norm(X64, XT, scale, exclude_self, block_size, num_threads, progress):
    """(dmin, logs) of every point as its own query, each unordered pair once.

    The log of the row sum is exact because every logit is <= 0 (the self
    term is 0). It goes to logs, with dmin = 0, where it is >= 0 (always,
    unless exclude_self), else to dmin = -log(sum) / scale with logs = 0:
    the targets pass needs logs >= 0 to bound log q by its tile test. With
    exclude_self and a row sum near the exponential's floor, the one-sided
    pass is run instead.
    """
    N, D = X64.shape
    tile = min(int(block_size) if block_size > 0 else _default_tile(D), N)
    nt = -(-N // tile)
    ua, ub = (a.astype(np.int64) for a in np.triu_indices(nt))
    units = len(ua)
    with _Threads(num_threads) as threads:
        sums = np.zeros((threads, N))
        # chunks of about _CHUNK_WORK, between which progress is reported
        per_unit = tile * tile * (8 + D)
        step = max(1, _CHUNK_WORK // per_unit)
        step = max(threads, step // threads * threads)
        for u0 in range(0, units, step):
            u1 = min(units, u0 + step)
            _self_sums_kernel(XT, X64, float(scale), bool(exclude_self), tile, ua, ub, u0, u1, sums)
            if progress is not None:
                progress(N * u1 // units, N)
    total = sums.sum(axis=0)
    if exclude_self and total.min() < N * _SELF_SUM_FLOOR:
        return _run_rows(
            XT, X64, scale, exclude_self, block_size, num_threads, progress, 0, _NO_DENSE, _NO_IDX, _NO_DENSE
        )
    ln = np.log(total)
    neg = ln < 0.0
    return np.where(neg, -ln / float(scale), 0.0), np.where(neg, 0.0, ln)


def log_normalizer(X, Y, scale, exclude_self, block_size=0, num_threads=1, progress=None):
    X64, XT, Y64 = _as_f64(X, Y)
    if Y64 is X64:
        dmin, logs = _self_log_norm(X64, XT, scale, exclude_self, block_size, num_threads, progress)
    else:
        dmin, logs = _run_rows(
            XT, Y64, scale, exclude_self, block_size, num_threads, progress, 0, _NO_DENSE, _NO_IDX, _NO_DENSE
        )
    return _log_norm(dmin, logs, scale, X.dtype)


def log_posterior(X, Y, scale, exclude_self, block_size=0, num_threads=1, progress=None):
    _, XT, Y64 = _as_f64(X, Y)
    out = np.empty((Y.shape[0], X.shape[0]), dtype=X.dtype)
    _run_rows(XT, Y64, scale, exclude_self, block_size, num_threads, progress, 1, out, _NO_IDX, _NO_DENSE)
    return out


def topk(X, Y, scale, k, exclude_self, block_size=0, num_threads=1, progress=None):
    _, XT, Y64 = _as_f64(X, Y)
    M = Y.shape[0]
    idx = np.empty((M, k), dtype=np.int64)
    logp = np.empty((M, k), dtype=np.float64)
    dmin, logs = _run_rows(
        XT, Y64, scale, exclude_self, block_size, num_threads, progress, 2, _NO_DENSE, idx, logp
    )
    return idx, logp.astype(X.dtype, copy=False), _log_norm(dmin, logs, scale, X.dtype)


def targets(X, scale, exclude_self, block_size=0, num_threads=1, progress=None):
    N, D = X.shape
    X64, XT, _ = _as_f64(X, X)
    total = 2 * N
    # pass 1: normaliser of every row n (progress 0 .. N)
    inner = None if progress is None else (lambda done, _total: progress(done, total))
    dmin, logs = _self_log_norm(X64, XT, scale, exclude_self, block_size, num_threads, inner)
    # pass 2: per-reference sums, each thread owning a block of references (N .. 2N)
    sq = np.einsum("nd,nd->n", X64, X64)
    W = np.zeros(N)
    S1 = np.zeros((N, D))
    S2 = np.zeros(N)
    tile = min(int(block_size) if block_size > 0 else _default_tile(D), N)
    dmin_tile_max = np.maximum.reduceat(dmin, np.arange(0, N, tile))
    with _Threads(num_threads) as nt:
        for a, b in _chunks(N, N, D, nt):
            _targets_kernel(
                XT,
                X64,
                dmin,
                logs,
                dmin_tile_max,
                sq,
                float(scale),
                bool(exclude_self),
                a,
                b,
                tile,
                _query_block(b - a, nt),
                W,
                S1,
                S2,
            )
            if progress is not None:
                progress(N + b, total)
    return W, S1, S2
