"""Public kernel API: normalisers, dense rows, top-k rows and training targets.

For references X (N, D), queries Y (M, D) and bandwidth h, the MAPA posterior is

    log q(i | m) = -||y_m - x_i||^2 / (2 h^2) - log sum_j exp(-||y_m - x_j||^2 / (2 h^2)).

Every function streams over blocks of references with an online-max
log-sum-exp, so only ``log_posterior`` ever holds an (M, N) array. When the
queries are the references (``queries=None``) the compiled backend computes
each unordered pair's term once, for the normalisers of all rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ._dispatch import get_backend
from ._validation import Prepared, available_memory_bytes, check_k, prepare

__all__ = [
    "TopKPosterior",
    "PosteriorTargets",
    "log_normalizer",
    "log_posterior",
    "log_posterior_topk",
    "posterior_targets",
]

# Below this column mass a mean is not computed (see PosteriorTargets.means).
# Backends may drop terms below exp(-708) (float64) or exp(-87) (float32); the
# thresholds sit far enough above that (times N <= 1e9) for every backend to
# agree on which means are defined.
_MIN_WEIGHT = {np.dtype(np.float64): 1e-280, np.dtype(np.float32): 1e-20}

_COMMON_DOC = """
    X : array or CPU torch tensor of shape (n_refs, n_features)
        Reference points x_i (the index i of q runs over them).
    queries : array or tensor of shape (n_queries, n_features), optional
        Query points y_m; default X itself.
    bandwidth : float or str
        Kernel bandwidth h > 0, or a rule name from :mod:`mapa.bandwidth`
        (``"nn"``, ``"scott"``).
    exclude_self : bool, default False
        With ``queries=None``, drop the self term (q(m|m) = 0, also removed
        from the normaliser).
    backend : {"auto", "cpp", "numba", "numpy"}, default "auto"
    block_size : int, optional
        Tile length used by the backend (results do not depend on it beyond
        rounding; the compiled backend caps it at 1024).
    num_threads : int, optional
        None for all cores; scikit-learn's n_jobs convention otherwise.
    progress : bool or callable, optional
        True shows a progress bar; a callable is called as ``progress(done, total)``.
        ``total`` can grow during a call, when rows are redone (float32 rows
        with a very low normaliser, redone in float64).
"""


def _doc(func):
    func.__doc__ = func.__doc__.replace("{common}", _COMMON_DOC.strip("\n"))
    return func


@dataclass(frozen=True)
class TopKPosterior:
    """The k largest entries of each row of q, with the exact normaliser.

    Attributes
    ----------
    indices : int64 array of shape (n_queries, k)
        Reference indices, ordered by decreasing log_prob (ties: lower index first).
    log_prob : array of shape (n_queries, k)
        log q(indices | m), normalised over all n_refs references.
    log_norm : array of shape (n_queries,)
        log sum_j exp(-||y_m - x_j||^2 / (2 h^2)) over all references.
    kept_mass : array of shape (n_queries,)
        sum over the k kept entries of q: how much of each row the top-k holds.
    """

    indices: Any
    log_prob: Any
    log_norm: Any
    kept_mass: Any

    def __iter__(self):
        return iter((self.indices, self.log_prob, self.log_norm, self.kept_mass))


@dataclass(frozen=True)
class PosteriorTargets:
    """Per-reference sufficient statistics of the fixed posterior (MAPA.md, section 3).

    Attributes
    ----------
    weights : array of shape (n_refs,)
        W_i = sum_n q(i | n), the column mass of q.
    means : array of shape (n_refs, n_features)
        m_i = sum_n q(i | n) x_n / W_i. Where W_i is negligible (below 1e-280
        for float64, 1e-20 for float32: no query puts measurable mass on
        reference i, e.g. an isolated point with exclude_self), m_i = x_i:
        such a code carries no weight in the objective.
    sq_norms : array of shape (n_refs,)
        s_i = sum_n q(i | n) ||x_n||^2.
    """

    weights: Any
    means: Any
    sq_norms: Any

    def __iter__(self):
        return iter((self.weights, self.means, self.sq_norms))


def _progress_callback(progress, desc: str):
    """Turn the ``progress`` argument into (callback, closer)."""
    if progress is None or progress is False:
        return None, lambda: None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=1, desc=desc, unit="row", leave=False)

        def update(done, total):
            if bar.total != total:
                bar.total = total
            bar.n = done
            bar.refresh()

        return update, bar.close
    if callable(progress):
        return progress, lambda: None
    raise TypeError(f"progress must be None, True/False or a callable (done, total), got {progress!r}")


def _run(name: str, p: Prepared, backend: str, call: Callable, progress):
    _, module = get_backend(backend)
    callback, close = _progress_callback(progress, f"mapa.{name}")
    try:
        return call(module, callback)
    finally:
        close()


def _args(X, queries, bandwidth, exclude_self, block_size, num_threads, precheck=None):
    return prepare(
        X,
        queries,
        bandwidth=bandwidth,
        exclude_self=exclude_self,
        block_size=block_size,
        num_threads=num_threads,
        precheck=precheck,
    )


@_doc
def log_normalizer(
    X,
    queries=None,
    *,
    bandwidth,
    exclude_self=False,
    backend="auto",
    block_size=None,
    num_threads=None,
    progress=None,
):
    """Log-normaliser of each row of the MAPA posterior.

    ``log_norm[m] = log sum_j exp(-||y_m - x_j||^2 / (2 h^2))`` (self term
    left out when ``exclude_self``).

    Parameters
    ----------
{common}

    Returns
    -------
    array of shape (n_queries,)
        Same dtype (float32/float64) and kind (NumPy/torch) as the input.
    """
    p = _args(X, queries, bandwidth, exclude_self, block_size, num_threads)
    out = _run(
        "log_normalizer",
        p,
        backend,
        lambda m, cb: m.log_normalizer(p.X, p.Y, p.scale, p.exclude_self, p.block_size, p.num_threads, cb),
        progress,
    )
    return p.wrap(out)


def _dense_fits(max_bytes: int | None):
    """Check, from the shapes alone, that the dense output fits in memory."""

    def check(n_refs: int, n_queries: int, dtype: np.dtype) -> None:
        need = n_queries * n_refs * dtype.itemsize
        limit = available_memory_bytes() // 2 if max_bytes is None else int(max_bytes)
        if need > limit:
            raise ValueError(
                f"log_posterior would allocate {need / 2**30:.2f} GiB for its ({n_queries}, {n_refs}) "
                f"output, more than the limit of {limit / 2**30:.2f} GiB (half the available memory, "
                f"or max_bytes); use log_posterior_topk(..., k=...) for the largest entries, "
                f"posterior_targets for training statistics, or fewer queries per call"
            )

    return check


def _topk_fits(k, exclude_self):
    """Check k and the size of the top-k output from the shapes alone.

    Runs after ``prepare`` has checked that ``exclude_self`` is a bool.
    """

    def check(n_refs: int, n_queries: int, dtype: np.dtype) -> None:
        check_k(k, n_refs, bool(exclude_self))
        need = n_queries * int(k) * (8 + dtype.itemsize)
        if need > available_memory_bytes() // 2:
            raise ValueError(
                f"log_posterior_topk with k={k} would allocate {need / 2**30:.2f} GiB; use a smaller k "
                f"or fewer queries per call"
            )

    return check


@_doc
def log_posterior(
    X,
    queries=None,
    *,
    bandwidth,
    exclude_self=False,
    backend="auto",
    block_size=None,
    num_threads=None,
    progress=None,
    max_bytes=None,
):
    """Dense MAPA posterior log q(i | m) for every query and reference.

    Parameters
    ----------
{common}
    max_bytes : int, optional
        Refuse outputs larger than this (default: half the available memory).

    Returns
    -------
    array of shape (n_queries, n_refs)
        log q(i | m); each row log-sum-exps to 0; excluded self entries are -inf.
    """
    p = _args(X, queries, bandwidth, exclude_self, block_size, num_threads, _dense_fits(max_bytes))
    out = _run(
        "log_posterior",
        p,
        backend,
        lambda m, cb: m.log_posterior(p.X, p.Y, p.scale, p.exclude_self, p.block_size, p.num_threads, cb),
        progress,
    )
    return p.wrap(out)


@_doc
def log_posterior_topk(
    X,
    queries=None,
    *,
    bandwidth,
    k,
    exclude_self=False,
    backend="auto",
    block_size=None,
    num_threads=None,
    progress=None,
):
    """The k most probable references of each query, with the exact normaliser.

    Parameters
    ----------
{common}
    k : int
        Entries kept per row, 1 <= k <= n_refs (n_refs - 1 with exclude_self).

    Notes
    -----
    Without ``queries``, the cpp backend takes each unordered pair once,
    with every row's selection held at once: N * (24 k + 12) bytes on top of
    the output. Where that would exceed 1 GiB, and with ``queries``, it
    takes one query block at a time against every reference instead.

    Returns
    -------
    TopKPosterior
        ``indices`` (n_queries, k) int64, ``log_prob`` (n_queries, k) sorted
        descending, ``log_norm`` (n_queries,) over all references, and
        ``kept_mass`` (n_queries,) = sum of the kept probabilities.
    """
    p = _args(X, queries, bandwidth, exclude_self, block_size, num_threads, _topk_fits(k, exclude_self))
    k = int(k)  # checked by _topk_fits
    idx, logp, lnorm = _run(
        "log_posterior_topk",
        p,
        backend,
        lambda m, cb: m.topk(p.X, p.Y, p.scale, k, p.exclude_self, p.block_size, p.num_threads, cb),
        progress,
    )
    kept = np.exp(logp.astype(np.float64)).sum(axis=1).astype(p.dtype)
    return TopKPosterior(p.wrap(idx), p.wrap(logp), p.wrap(lnorm), p.wrap(kept))


@_doc
def posterior_targets(
    X,
    *,
    bandwidth,
    exclude_self=False,
    backend="auto",
    block_size=None,
    num_threads=None,
    progress=None,
):
    """Per-reference training targets (W, m, s) of MAPA.md section 3, in one call.

    With q(i | n) the MAPA posterior of x_n over the references x_i:
    W_i = sum_n q(i|n), m_i = sum_n q(i|n) x_n / W_i, s_i = sum_n q(i|n) ||x_n||^2,
    accumulated without ever holding the (N, N) matrix: one pass over the
    pairs for the normalisers, a second for the sums. The cpp backend takes
    each unordered pair once in both passes (q(i|n) = exp(logit) / Z_n, one
    exponential serving both orders); for rows with log Z_n < 0 (only with
    ``exclude_self``) it computes q(i|n) row by row instead. Its results do
    not depend on ``num_threads``, bit for bit.

    Parameters
    ----------
    X : array or CPU torch tensor of shape (n_points, n_features)
        The data; it is both the references and the queries.
    bandwidth, exclude_self, backend, block_size, num_threads, progress
        As for :func:`log_normalizer`.

    Returns
    -------
    PosteriorTargets
        ``weights`` (n_points,), ``means`` (n_points, n_features), ``sq_norms`` (n_points,).
    """
    p = _args(X, None, bandwidth, exclude_self, block_size, num_threads)
    W, S1, S2 = _run(
        "posterior_targets",
        p,
        backend,
        lambda m, cb: m.targets(p.X, p.scale, p.exclude_self, p.block_size, p.num_threads, cb),
        progress,
    )
    mu = p.center
    # back from centred coordinates: x_n = x~_n + mu
    S2 = S2 + 2.0 * (S1 @ mu) + W * float(mu @ mu)
    S1 = S1 + W[:, None] * mu[None, :]
    Xc = p.X.astype(np.float64)
    safe = W > _MIN_WEIGHT[p.dtype]
    means = np.where(safe[:, None], S1 / np.where(safe, W, 1.0)[:, None], Xc + mu)
    return PosteriorTargets(
        p.wrap(W.astype(p.dtype)), p.wrap(means.astype(p.dtype)), p.wrap(S2.astype(p.dtype))
    )
