"""Invariances: block size, thread count, backend; dense vs top-k vs normaliser vs targets; threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from scipy.special import logsumexp

import mapa
from kernel_reference import (
    BACKENDS,
    DTYPES,
    LOGQ_FLOOR,
    assert_lognorm_close,
    assert_logq_close,
    make_data,
    ref_logits,
    to_numpy,
    tol,
)

H = 0.7
N, M, D = 41, 17, 4


def _data(dtype, offset=0.0):
    X = make_data(N, D, dtype=dtype, offset=offset, seed=11)
    Y = make_data(M, D, dtype=dtype, offset=offset, seed=12)
    return X, Y


def outputs(X, queries=None, exclude_self=False, **kw):
    """All four outputs, as float64/int64 NumPy arrays in a dict."""
    common = dict(bandwidth=H, exclude_self=exclude_self, **kw)
    top = mapa.log_posterior_topk(X, queries, k=5, **common)
    out = {
        "lnorm": mapa.log_normalizer(X, queries, **common),
        "dense": mapa.log_posterior(X, queries, **common),
        "top_idx": top.indices,
        "top_logp": top.log_prob,
        "top_lnorm": top.log_norm,
        "top_kept": top.kept_mass,
    }
    if queries is None:
        tg = mapa.posterior_targets(X, **common)
        out.update(W=tg.weights, means=tg.means, s=tg.sq_norms)
    return {k: to_numpy(v) for k, v in out.items()}


def assert_outputs_agree(a, b, dtype):
    t = tol(dtype)
    for name in a:
        x, y = a[name].astype(np.float64), b[name].astype(np.float64)
        if name == "top_idx":
            # indices may only differ where the log q values tie within tolerance
            differ = a[name] != b[name]
            np.testing.assert_allclose(
                a["top_logp"][differ], b["top_logp"][differ], atol=t["logq_atol"], err_msg="top-k order"
            )
        elif name == "dense":
            keep = y > LOGQ_FLOOR
            np.testing.assert_array_equal(np.isneginf(x), np.isneginf(y))
            np.testing.assert_allclose(x[keep], y[keep], rtol=t["logq_rtol"], atol=t["logq_atol"], err_msg=name)
        elif name in ("W", "s", "top_kept"):
            np.testing.assert_allclose(x, y, rtol=t["mass_rtol"], atol=t["mass_atol"] * max(1.0, np.abs(y).max()), err_msg=name)
        elif name == "means":
            np.testing.assert_allclose(x, y, rtol=t["logq_rtol"], atol=t["mean_atol"], err_msg=name)
        else:
            np.testing.assert_allclose(x, y, rtol=t["logq_rtol"], atol=t["logq_atol"], err_msg=name)


MODES = {
    "self": lambda X, Y: dict(),
    "exclude_self": lambda X, Y: dict(exclude_self=True),
    "queries": lambda X, Y: dict(queries=Y),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", list(MODES))
def test_block_size_invariance(backend, dtype, mode):
    X, Y = _data(dtype, offset=10.0)
    kw = MODES[mode](X, Y)
    base = outputs(X, backend=backend, **kw)
    for block_size in (1, 3, 64, N + 1):
        assert_outputs_agree(outputs(X, backend=backend, block_size=block_size, **kw), base, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_largest_block_size(backend):
    X, Y = _data(np.float64)
    for queries in (None, Y):
        np.testing.assert_allclose(
            mapa.log_normalizer(X, queries, bandwidth=H, backend=backend, block_size=1 << 20),
            mapa.log_normalizer(X, queries, bandwidth=H, backend=backend),
            rtol=1e-10,
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_num_threads_invariance(backend, dtype):
    X, Y = _data(dtype)
    for kw in ({}, {"exclude_self": True}, {"queries": Y}):
        base = outputs(X, backend=backend, num_threads=1, **kw)
        for num_threads in (2, 3, -1, None):
            for block_size in (None, 3):
                assert_outputs_agree(
                    outputs(X, backend=backend, num_threads=num_threads, block_size=block_size, **kw), base, dtype
                )


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the cpp backend is not available")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exclude_self", [False, True])
def test_cpp_self_queries_bit_identical_across_threads(dtype, exclude_self):
    # With the queries the references, the cpp kernel takes tile pairs on a
    # schedule where each tile's pairs run in one fixed order, one thread at
    # a time: every output, sums included, is the same bit for bit for any
    # thread count. 700 points in tiles of 32 make 22 tiles.
    X = make_data(700, 3, dtype=dtype, seed=13)
    kw = dict(backend="cpp", exclude_self=exclude_self, block_size=32)
    base = outputs(X, num_threads=1, **kw)
    for num_threads in (2, 3, 7):
        other = outputs(X, num_threads=num_threads, **kw)
        for name, value in base.items():
            np.testing.assert_array_equal(other[name], value, err_msg=f"{name}, {num_threads} threads")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "numpy"] or [None])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_backend_matches_numpy_reference_backend(backend, dtype, offset):
    if backend is None:
        pytest.skip("only the NumPy backend loads here")
    X, Y = _data(dtype, offset)
    for kw in ({}, {"exclude_self": True}, {"queries": Y}):
        assert_outputs_agree(outputs(X, backend=backend, **kw), outputs(X, backend="numpy", **kw), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", list(MODES))
def test_outputs_agree_with_each_other(backend, dtype, mode):
    """dense, top-k, normaliser and targets are four views of one matrix."""
    X, Y = _data(dtype, offset=5.0)
    kw = MODES[mode](X, Y)
    ex = kw.get("exclude_self", False)
    Q = kw.get("queries", X)
    t = tol(dtype)
    L = to_numpy(mapa.log_posterior(X, bandwidth=H, backend=backend, **kw)).astype(np.float64)
    lnorm = to_numpy(mapa.log_normalizer(X, bandwidth=H, backend=backend, **kw)).astype(np.float64)
    n_refs = X.shape[0]
    k = n_refs - 1 if ex else n_refs
    top = mapa.log_posterior_topk(X, bandwidth=H, k=k, backend=backend, **kw)

    # dense + normaliser = the raw logits -||y - x||^2 / (2 h^2)
    logits = ref_logits(X, Q, H, ex)
    finite = np.isfinite(logits)
    np.testing.assert_allclose((L + lnorm[:, None])[finite], logits[finite], rtol=t["logq_rtol"], atol=t["logq_atol"])
    # the normaliser is reported identically by log_normalizer and top-k
    np.testing.assert_allclose(top.log_norm.astype(np.float64), lnorm, rtol=t["logq_rtol"], atol=t["logq_atol"])
    # a full top-k is the dense row, sorted; it keeps all the mass
    np.testing.assert_allclose(np.take_along_axis(L, top.indices, axis=1), top.log_prob, rtol=t["logq_rtol"], atol=t["logq_atol"])
    np.testing.assert_allclose(top.log_prob, -np.sort(-L, axis=1)[:, :k], rtol=t["logq_rtol"], atol=t["logq_atol"])
    np.testing.assert_allclose(top.kept_mass, 1.0, atol=t["logq_atol"])
    # smaller k is a prefix of the full top-k (up to ties)
    small = mapa.log_posterior_topk(X, bandwidth=H, k=3, backend=backend, **kw)
    np.testing.assert_allclose(small.log_prob, top.log_prob[:, :3], rtol=t["logq_rtol"], atol=t["logq_atol"])
    # the targets are column sums of the dense matrix
    if "queries" not in kw:
        q = np.exp(L)
        tg = mapa.posterior_targets(X, bandwidth=H, backend=backend, **kw)
        Xf = X.astype(np.float64)
        W = q.sum(axis=0)
        np.testing.assert_allclose(tg.weights, W, rtol=t["mass_rtol"], atol=t["mass_atol"])
        np.testing.assert_allclose(tg.means, (q.T @ Xf) / W[:, None], rtol=t["logq_rtol"], atol=t["mean_atol"])
        np.testing.assert_allclose(tg.sq_norms, q.T @ (Xf**2).sum(axis=1), rtol=t["mass_rtol"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_queries_equal_to_X_match_self_mode(backend):
    X, _ = _data(np.float64)
    a = outputs(X, backend=backend)
    b = outputs(X, X.copy(), backend=backend)
    for name in b:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_and_float64_agree(backend):
    # the same (float32-representable) values computed in either precision
    X, Y = (a.astype(np.float32) for a in _data(np.float64))
    X64, Y64 = X.astype(np.float64), Y.astype(np.float64)
    for kw, kw64 in (({}, {}), ({"queries": Y}, {"queries": Y64}), ({"exclude_self": True}, {"exclude_self": True})):
        assert_outputs_agree(outputs(X, backend=backend, **kw), outputs(X64, backend=backend, **kw64), np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_are_independent_of_other_queries(backend):
    # query rows are computed independently: a subset of queries gives the same rows
    X, Y = _data(np.float64)
    full = mapa.log_posterior(X, Y, bandwidth=H, backend=backend)
    part = mapa.log_posterior(X, Y[5:9], bandwidth=H, backend=backend)
    np.testing.assert_allclose(part, full[5:9], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(logsumexp(full, axis=1), 0.0, atol=1e-12)


# ---------------------------------------------------------------- concurrency


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_python_threads_at_once(backend):
    """The kernel releases the GIL: concurrent calls must not interfere (correctness, not timing)."""
    rng = np.random.default_rng(21)
    jobs = []
    for t in range(2):
        X = rng.standard_normal((300, 8)) + 3.0 * t
        Y = rng.standard_normal((120, 8))
        dtype = (np.float64, np.float32)[t]
        jobs.append((X.astype(dtype), Y.astype(dtype), 0.9 + 0.3 * t))

    def work(X, Y, h):
        return (
            mapa.log_normalizer(X, Y, bandwidth=h, backend=backend, block_size=16),
            mapa.log_posterior_topk(X, bandwidth=h, k=4, exclude_self=True, backend=backend, block_size=16),
            mapa.posterior_targets(X, bandwidth=h, backend=backend, block_size=16),
        )

    expected = [work(*job) for job in jobs]
    results = [[None, None] for _ in range(3)]
    errors = []
    barrier = threading.Barrier(2)

    def thread_main(slot, repeat):
        try:
            barrier.wait()
            results[repeat][slot] = work(*jobs[slot])
        except BaseException as exc:  # reported below
            errors.append(exc)

    for repeat in range(3):
        threads = [threading.Thread(target=thread_main, args=(slot, repeat)) for slot in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert not errors, errors
    for repeat in range(3):
        for slot in range(2):
            (lnorm, top, tg), (lnorm0, top0, tg0) = results[repeat][slot], expected[slot]
            np.testing.assert_array_equal(lnorm, lnorm0)
            np.testing.assert_array_equal(top.indices, top0.indices)
            np.testing.assert_array_equal(top.log_prob, top0.log_prob)
            for a, b in zip(tg, tg0):
                np.testing.assert_array_equal(a, b)
    # and the concurrent results are right, not merely repeatable
    for (X, Y, h), (lnorm, top, _) in zip(jobs, expected):
        assert_lognorm_close(lnorm, logsumexp(ref_logits(X, Y, h), axis=1), X.dtype)
        L = ref_logits(X, X, h, True)
        assert_logq_close(
            top.log_prob,
            np.take_along_axis(L - logsumexp(L, axis=1, keepdims=True), top.indices, axis=1),
            X.dtype,
        )
