"""Property-based tests (hypothesis): random shapes, dtypes, offsets, bandwidths, flags, blocks, threads.

Every example is checked against the explicit float64 reference of
kernel_reference.py, with the tolerance table there. The examples are
derandomized (fixed per test); to explore new ones locally, run with
``--hypothesis-seed=N`` after removing ``derandomize`` from SETTINGS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp

import mapa
from kernel_reference import (
    BACKENDS,
    DTYPES,
    assert_lognorm_close,
    assert_logq_close,
    check_targets,
    check_topk,
    ref_log_normalizer,
    ref_log_posterior,
    tol,
)

SETTINGS = settings(
    max_examples=30,
    deadline=None,  # never a wall-clock limit
    database=None,  # leave no .hypothesis/ directory behind
    derandomize=True,  # the same examples on every run: failures reproduce, CI is not flaky
    suppress_health_check=[HealthCheck.differing_executors],
)


@dataclass
class Problem:
    X: np.ndarray
    Y: np.ndarray | None  # None: queries are X
    h: float
    exclude_self: bool
    dtype: type
    kwargs: dict  # block_size, num_threads

    @property
    def Q(self):
        return self.X if self.Y is None else self.Y

    def call(self, name, backend, **extra):
        args = (self.X,) if name == "posterior_targets" else (self.X, self.Y)
        return getattr(mapa, name)(
            *args, bandwidth=self.h, exclude_self=self.exclude_self, backend=backend, **self.kwargs, **extra
        )


@st.composite
def problems(draw, with_queries=True):
    n = draw(st.integers(1, 60))
    d = draw(st.integers(1, 20))
    use_queries = with_queries and draw(st.booleans())
    m = draw(st.integers(1, 60)) if use_queries else n
    exclude_self = (not use_queries) and n >= 2 and draw(st.booleans())
    dtype = draw(st.sampled_from(DTYPES))
    offset = draw(st.sampled_from([0.0, 1e3]))
    h = 10.0 ** draw(st.floats(-2.0, 2.0))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    if n >= 2 and draw(st.booleans()):  # some exact duplicates: ties in q
        n_dup = draw(st.integers(1, n - 1))
        X[rng.choice(n, n_dup)] = X[rng.choice(n, n_dup)]
    X = (X + offset).astype(dtype)
    Y = None
    if use_queries:
        # queries near the data and some copies of references
        Y = rng.standard_normal((m, d)) + offset
        copies = rng.choice(n, min(n, m) // 2)
        Y[: len(copies)] = X[copies]
        Y = Y.astype(dtype)
    kwargs = dict(
        block_size=draw(st.sampled_from([None, 1, 3, 64])),
        num_threads=draw(st.sampled_from([1, 2, -1, None])),
    )
    return Problem(X, Y, h, exclude_self, dtype, kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(p=problems())
def test_dense_and_normaliser_match_reference(backend, p):
    R = ref_log_posterior(p.X, p.Q, p.h, p.exclude_self)
    L = p.call("log_posterior", backend)
    assert L.dtype == p.dtype and L.shape == R.shape
    assert_logq_close(L, R, p.dtype)
    np.testing.assert_allclose(logsumexp(L.astype(np.float64), axis=1), 0.0, atol=tol(p.dtype)["logq_atol"] * 10)
    if p.exclude_self:
        assert np.isneginf(np.diag(L)).all()
    lnorm = p.call("log_normalizer", backend)
    assert lnorm.dtype == p.dtype
    assert_lognorm_close(lnorm, ref_log_normalizer(p.X, p.Q, p.h, p.exclude_self), p.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(p=problems(), data=st.data())
def test_topk_matches_reference(backend, p, data):
    limit = p.X.shape[0] - 1 if p.exclude_self else p.X.shape[0]
    k = data.draw(st.integers(1, limit), label="k")
    res = p.call("log_posterior_topk", backend, k=k)
    check_topk(res, p.X, p.Q, p.h, k, p.dtype, p.exclude_self)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(p=problems(with_queries=False))
def test_targets_match_reference(backend, p):
    check_targets(p.call("posterior_targets", backend), p.X, p.h, p.dtype, p.exclude_self)
