"""Plain NumPy reference backend: float64 throughout, direct differences.

Readable rather than fast; the tests hold every other backend to it. Squared
distances are formed from explicit differences (no ||x||^2 + ||y||^2 - 2 x.y
expansion), so they carry no cancellation error whatever the data offset.
"""

from __future__ import annotations

import numpy as np

_BLOCK_ELEMS = 1 << 22  # float64 elements of one (rows, N, D) difference block


def _row_blocks(M: int, N: int, D: int, block_size: int):
    rows = block_size if block_size > 0 else max(1, _BLOCK_ELEMS // max(1, N * D))
    for start in range(0, M, rows):
        yield start, min(M, start + rows)


def _scaled_sq_dists(X, Y, start, stop, scale, exclude_self):
    """-scale * ||y_m - x_j||^2 for m in [start, stop), self entries -inf."""
    Xf = X.astype(np.float64, copy=False)
    diff = Y[start:stop].astype(np.float64)[:, None, :] - Xf[None, :, :]
    logits = -scale * np.einsum("mnd,mnd->mn", diff, diff)
    if exclude_self:
        r = np.arange(start, stop)
        logits[r - start, r] = -np.inf
    return logits


def _logsumexp_rows(a):
    top = a.max(axis=1)
    return top + np.log(np.exp(a - top[:, None]).sum(axis=1))


def _blocks(X, Y, scale, exclude_self, block_size, progress):
    M, N, D = Y.shape[0], X.shape[0], X.shape[1]
    for start, stop in _row_blocks(M, N, D, block_size):
        logits = _scaled_sq_dists(X, Y, start, stop, scale, exclude_self)
        yield start, stop, logits, _logsumexp_rows(logits)
        if progress is not None:
            progress(stop, M)


def log_normalizer(X, Y, scale, exclude_self, block_size=0, num_threads=1, progress=None):
    out = np.empty(Y.shape[0], dtype=np.float64)
    for start, stop, _, lse in _blocks(X, Y, scale, exclude_self, block_size, progress):
        out[start:stop] = lse
    return out.astype(X.dtype)


def log_posterior(X, Y, scale, exclude_self, block_size=0, num_threads=1, progress=None):
    out = np.empty((Y.shape[0], X.shape[0]), dtype=X.dtype)
    for start, stop, logits, lse in _blocks(X, Y, scale, exclude_self, block_size, progress):
        out[start:stop] = logits - lse[:, None]
    return out


def topk(X, Y, scale, k, exclude_self, block_size=0, num_threads=1, progress=None):
    M, N = Y.shape[0], X.shape[0]
    idx = np.empty((M, k), dtype=np.int64)
    logp = np.empty((M, k), dtype=np.float64)
    lnorm = np.empty(M, dtype=np.float64)
    cols = np.arange(N)
    for start, stop, logits, lse in _blocks(X, Y, scale, exclude_self, block_size, progress):
        for r in range(stop - start):
            # sort by decreasing logit, ties by increasing index
            order = np.lexsort((cols, -logits[r]))[:k]
            idx[start + r] = order
            logp[start + r] = logits[r, order] - lse[r]
        lnorm[start:stop] = lse
    return idx, logp.astype(X.dtype), lnorm.astype(X.dtype)


def targets(X, scale, exclude_self, block_size=0, num_threads=1, progress=None):
    N, D = X.shape
    Xf = X.astype(np.float64)
    W = np.zeros(N)
    S1 = np.zeros((N, D))
    S2 = np.zeros(N)
    sq = np.einsum("nd,nd->n", Xf, Xf)
    for start, stop, logits, lse in _blocks(X, X, scale, exclude_self, block_size, progress):
        q = np.exp(logits - lse[:, None])  # (rows n, all i)
        W += q.sum(axis=0)
        S1 += q.T @ Xf[start:stop]
        S2 += q.T @ sq[start:stop]
    return W, S1, S2
