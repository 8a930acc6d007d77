"""float32 distances for rows whose log-normaliser is far below 0.

float32 data with up to 32 features takes single-precision squared
distances (cpp: every pass; numba: the symmetric normaliser). Each carries
a relative error of up to (D + 2) 2^-24, and so does its logit. A row's
kept entries have logits near its log Z, so where log Z is far below 0 (an
isolated point with exclude_self, or a query far from every reference)
log q = logit - log Z inherits that error as an absolute one: 3e-2 at
log Z = -1.8e5, D = 32, before such rows were redone in float64. The
kernels redo exactly the rows whose log Z is below
-1e-5 / ((D + 2) 2^-24) (where the error could pass 2e-5). Checked here
against the float64 reference, on every function, with rows on both sides
of that floor; and, through the progress totals, that only those rows are
redone.
"""

from __future__ import annotations

import numpy as np
import pytest

import mapa
from kernel_reference import (
    BACKENDS,
    assert_lognorm_close,
    assert_logq_close,
    check_targets,
    check_topk,
    make_clusters,
    ref_log_normalizer,
    ref_log_posterior,
)

F32 = np.float32
H = 0.2
# logit of each isolated point's neighbours: on both sides of the floor
# (-41.9 at D = 2, -16.8 at D = 8, -9.3 at D = 16, -4.9 at D = 32), down to -1e5
GAPS = (2.0, 30.0, 400.0, 7e3, 1e5)
FAR_GAPS = (0.5, 3.0, 30.0, 400.0, 7e3, 1e5)


def drift_floor(d):
    return -1e-5 * 2.0**24 / (d + 2)


def with_isolated(d, n=240, seed=0):
    """Clusters of width H, then per gap an isolated point with 12 points
    around it at the same distance, whose logit is -gap (the point's row
    then has 12 entries near log q = -log 12, each of its own float error),
    the groups beyond the data along feature 0 and far from each other."""
    rng = np.random.default_rng(seed)
    X = make_clusters(n, d, H, seed=seed)
    edge = X[:, 0].max()
    out = []
    for g in GAPS:
        r = np.sqrt(g * 2 * H * H)
        centre = X[int(np.argmax(X[:, 0]))].copy()
        centre[0] = edge + 3.0 * r + 10.0 * H
        edge = centre[0] + r
        u = rng.standard_normal((12, d))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        out += [centre[None, :], centre + r * u]
    return np.vstack([X, *out]).astype(F32)


def far_queries(X, seed=1):
    """Queries at the references' points moved by each gap's distance."""
    rng = np.random.default_rng(seed)
    Y = np.repeat(X[:6].astype(np.float64), len(FAR_GAPS), axis=0)
    u = rng.standard_normal(Y.shape)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    dist = np.sqrt(np.tile(FAR_GAPS, 6) * 2 * H * H)
    return (Y + 3.0 * dist[:, None] * u).astype(F32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [2, 16, 32])
def test_isolated_points_with_exclude_self(backend, d):
    X = with_isolated(d, seed=d)
    ref = ref_log_normalizer(X, X, H, exclude_self=True)
    assert ref.min() < -1e4 and (ref < drift_floor(d)).sum() >= 2 and (ref > drift_floor(d)).any()
    kw = dict(bandwidth=H, exclude_self=True, backend=backend, block_size=64, num_threads=2)
    assert_lognorm_close(mapa.log_normalizer(X, **kw), ref, F32)
    assert_logq_close(mapa.log_posterior(X, **kw), ref_log_posterior(X, X, H, exclude_self=True), F32)
    for k in (3, 40):
        check_topk(mapa.log_posterior_topk(X, k=k, **kw), X, X, H, k, F32, exclude_self=True)
    check_targets(mapa.posterior_targets(X, **kw), X, H, F32, exclude_self=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [2, 16, 32])
def test_queries_far_from_every_reference(backend, d):
    X = make_clusters(300, d, H, dtype=F32, seed=d)
    Y = far_queries(X)
    ref = ref_log_normalizer(X, Y, H)
    assert ref.min() < -1e4 and (ref > drift_floor(d)).any()
    kw = dict(queries=Y, bandwidth=H, backend=backend, block_size=64, num_threads=2)
    assert_lognorm_close(mapa.log_normalizer(X, **kw), ref, F32)
    assert_logq_close(mapa.log_posterior(X, **kw), ref_log_posterior(X, Y, H), F32)
    check_topk(mapa.log_posterior_topk(X, k=5, **kw), X, Y, H, 5, F32)


def _final_total(func, X, **kw):
    seen = []
    func(X, backend="cpp", progress=lambda done, total: seen.append(total), **kw)
    return seen[-1]


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the cpp backend is not available")
@pytest.mark.parametrize("d", [2, 8])
def test_only_drifting_rows_are_redone(d):
    # Each redo adds its rows' pairs to the progress total, so the final
    # total counts the rows redone: exactly those below the floor (none
    # within 0.5 of it, so rounding cannot move one across). The
    # normaliser also redoes, with the streaming maximum, rows whose sum is
    # below n 2^-100 (float32) or n 2^-960 (float64): here a subset.
    X = with_isolated(d, seed=d)
    n = len(X)
    ln = ref_log_normalizer(X, X, H, exclude_self=True)
    assert np.abs(ln - drift_floor(d)).min() > 0.5
    assert not ((ln < np.log(n * 2.0**-100)) & (ln > drift_floor(d))).any()
    r = int((ln < drift_floor(d)).sum())
    assert 0 < r < n // 3
    kw = dict(bandwidth=H, exclude_self=True, block_size=64)
    assert _final_total(mapa.log_normalizer, X, **kw) == n * n + r * n
    # dense: the normaliser's redo, then its own; top-k: only its own
    assert _final_total(mapa.log_posterior, X, **kw) == 2 * n * n + 2 * r * n
    assert _final_total(mapa.log_posterior_topk, X, k=4, **kw) == n * n + r * n
    # float64 data: only the sums under n 2^-960; no self term: none
    tiny = int((ln < np.log(n * 2.0**-960)).sum())
    assert 0 < tiny < r
    assert _final_total(mapa.log_normalizer, X.astype(np.float64), **kw) == n * n + tiny * n
    assert _final_total(mapa.log_normalizer, X, bandwidth=H, block_size=64) == n * n

    Y = far_queries(X[:240], seed=3)
    m = len(Y)
    lq = ref_log_normalizer(X, Y, H)
    assert np.abs(lq - drift_floor(d)).min() > 0.5
    r = int((lq < drift_floor(d)).sum())
    assert 0 < r < m
    kw = dict(queries=Y, bandwidth=H, block_size=64)
    for func in (mapa.log_normalizer, mapa.log_posterior, mapa.log_posterior_topk):
        extra = dict(k=4) if func is mapa.log_posterior_topk else {}
        assert _final_total(func, X, **kw, **extra) == m * n + r * n, func.__name__
