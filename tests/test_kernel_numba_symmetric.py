"""The Numba backend's symmetric passes (queries = references): schedule, chunks, fallbacks."""

from __future__ import annotations

import numpy as np
import pytest

import mapa
from kernel_reference import (
    BACKENDS,
    DTYPES,
    assert_lognorm_close,
    assert_logq_close,
    check_targets,
    check_topk,
    make_clusters,
    make_data,
    ref_log_normalizer,
    ref_log_posterior,
    to_numpy,
    tol,
)

pytestmark = pytest.mark.skipif("numba" not in BACKENDS, reason="the numba backend is not available")

if "numba" in BACKENDS:
    from mapa.backends import numba_impl as nb


def _all_outputs(X, k, bandwidth=0.3, **kw):
    """Top-k (indices, log q, normaliser), normaliser, dense log q and targets, as NumPy arrays."""
    kw = dict(backend="numba", bandwidth=bandwidth, **kw)
    top = mapa.log_posterior_topk(X, k=k, **kw)
    tg = mapa.posterior_targets(X, **kw)
    out = dict(
        idx=top.indices, logp=top.log_prob, top_lnorm=top.log_norm, lnorm=mapa.log_normalizer(X, **kw),
        dense=mapa.log_posterior(X, **kw), W=tg.weights, means=tg.means, s=tg.sq_norms,
    )
    return {name: to_numpy(v) for name, v in out.items()}


@pytest.mark.parametrize("nt", list(range(1, 26)))
def test_rounds_take_each_tile_pair_once(nt):
    # round 0 is the diagonal; rounds 1 .. P - 1 (circle method) hold no tile twice
    P = nt + nt % 2
    seen = []
    for r in range(P):
        tiles = []
        for s in range(nt if r == 0 else P // 2):
            ta, tb = nb._round_pair(nt, r, s)
            if ta < 0:
                assert nt % 2 == 1 and r > 0 and s == 0  # the bye
                continue
            assert ta <= tb and (ta == tb) == (r == 0)
            seen.append((ta, tb))
            tiles += [ta] if ta == tb else [ta, tb]
        assert len(tiles) == len(set(tiles)), f"round {r} holds a tile twice"
    assert sorted(seen) == [(a, b) for a in range(nt) for b in range(a, nt)]
    calls = nb._round_calls(nt, tile=8, D=2, threads=2)
    assert sum(units for *_, units in calls) == nt * nt


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exclude_self", [False, True])
def test_self_queries_bit_identical_across_threads(dtype, exclude_self):
    # Tile pairs run in rounds that share no tile, so every sum takes its
    # terms in one order whatever the thread count: the same bits on 1, 2
    # and 3 threads (capped at Numba's pool), default tiles and tiles of 32.
    X = make_data(700, 3, dtype=dtype, seed=13)
    # float32 data takes the single-precision normaliser (and targets' first pass)
    assert nb._float_distances(X, 1.0 / (2 * 0.3**2)) == (dtype == np.float32)
    for block_size in (None, 32):
        base = _all_outputs(X, 9, exclude_self=exclude_self, block_size=block_size, num_threads=1)
        for num_threads in (2, 3):
            other = _all_outputs(X, 9, exclude_self=exclude_self, block_size=block_size, num_threads=num_threads)
            for name, value in base.items():
                np.testing.assert_array_equal(other[name], value, err_msg=f"{name}, {num_threads} threads")


@pytest.mark.parametrize("exclude_self", [False, True])
def test_rounds_cut_into_calls_give_the_same_bits(monkeypatch, exclude_self):
    # Large problems cut rounds (and a large round's pairs) into separate
    # calls, with progress reports between them. With a tiny work budget
    # every call is one slot; the results must not change, and progress
    # must rise to its total.
    X = make_clusters(500, 3, 0.3, seed=4)
    kw = dict(exclude_self=exclude_self, block_size=32, num_threads=2)
    base = _all_outputs(X, 20, **kw)
    monkeypatch.setattr(nb, "_CHUNK_WORK", 1)
    assert len(nb._round_calls(16, 32, 3, 2)) == 16 // 2 + 15 * (16 // 2 // 2)  # two slots per call
    assert all(s1 - s0 <= 2 for _, _, s0, s1, _ in nb._round_calls(16, 32, 3, 2))
    for name, value in _all_outputs(X, 20, **kw).items():
        np.testing.assert_array_equal(value, base[name], err_msg=name)
    for call in (
        lambda cb: mapa.posterior_targets(X, bandwidth=0.3, backend="numba", progress=cb, **kw),
        lambda cb: mapa.log_posterior_topk(X, k=5, bandwidth=0.3, backend="numba", progress=cb, **kw),
        lambda cb: mapa.log_posterior(X, bandwidth=0.3, backend="numba", progress=cb, **kw),
    ):
        seen = []
        call(lambda done, total, seen=seen: seen.append((done, total)))
        dones = [d for d, _ in seen]
        assert len(seen) > 10 and dones == sorted(dones) and len({t for _, t in seen}) == 1
        assert dones[-1] == seen[-1][1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exclude_self", [False, True])
def test_symmetric_topk_small_tiles_and_long_k(dtype, exclude_self):
    # Tiles shorter than k (the diagonal cannot start a full heap), an odd
    # tile count (a bye every round), k longer than a tile, 1 and 3 threads.
    h = 0.3
    X = make_clusters(203, 2, h, dtype=dtype, seed=5)
    for block_size, k in ((5, 7), (7, 30), (32, 100), (None, 150)):
        for num_threads in (1, 3):
            top = mapa.log_posterior_topk(X, bandwidth=h, k=k, exclude_self=exclude_self, block_size=block_size,
                                          num_threads=num_threads, backend="numba")
            check_topk(top, X, X, h, k, dtype, exclude_self)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_symmetric_topk_matches_one_sided(monkeypatch, exclude_self):
    # Over the memory limit of the live selections, top-k runs one-sided:
    # the same entries, indices identical (ties by index in both), log q
    # equal up to the normaliser's rounding.
    X = make_clusters(400, 3, 0.3, seed=9)
    kw = dict(bandwidth=0.3, k=40, exclude_self=exclude_self, backend="numba", block_size=32)
    sym = mapa.log_posterior_topk(X, **kw)
    monkeypatch.setattr(nb, "_SYMMETRIC_TOPK_BYTES", 0)
    one = mapa.log_posterior_topk(X, **kw)
    np.testing.assert_array_equal(sym.indices, one.indices)
    np.testing.assert_allclose(sym.log_prob, one.log_prob, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sym.log_norm, one.log_norm, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exclude_self", [False, True])
def test_targets_rows_left_to_the_one_sided_pass(monkeypatch, dtype, exclude_self):
    # Rows whose normaliser is below exp(-_LOGZ_MARGIN) leave the symmetric
    # pass and add their terms one-sided. With the margin at -inf every row
    # does: the sums must still match the reference and the symmetric pass.
    h = 0.5
    X = make_clusters(300, 3, h, dtype=dtype, seed=2)
    kw = dict(bandwidth=h, exclude_self=exclude_self, backend="numba", block_size=32)
    sym = mapa.posterior_targets(X, **kw)
    monkeypatch.setattr(nb, "_LOGZ_MARGIN", -np.inf)
    rest = mapa.posterior_targets(X, **kw)
    check_targets(rest, X, h, dtype, exclude_self)
    for a, b in zip(rest, sym):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-10 if dtype == np.float64 else 1e-5, atol=1e-12)


def _spy(monkeypatch, name):
    """Record the calls of the module-level function nb.<name> (looked up at call time)."""
    calls = []
    fn = getattr(nb, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return fn(*args, **kwargs)

    monkeypatch.setattr(nb, name, spy)
    return calls


F32 = np.float32

# (n, d, block_size): 203 points in tiles of 42 (a tile's rows flush their
# float32 column sums after 16, 32 and 42 rows) and a last tile of 35 (a
# lone last row); 310 in tiles of 54, d = 16; 157 in tiles of 25 (seven
# tiles, a bye in every round), d = 32, the most features the path takes;
# 1500 with the default tiles.
SINGLE_CASES = [(203, 3, 42), (310, 16, 54), (157, 32, 25), (1500, 2, None)]


@pytest.mark.parametrize("n, d, block_size", SINGLE_CASES)
@pytest.mark.parametrize("exclude_self", [False, True])
def test_single_precision_normaliser_matches_float64_reference(monkeypatch, n, d, block_size, exclude_self):
    # float32 input with D <= 32: the symmetric normaliser in float32
    # (_sums_rounds_f), within the float32 tolerances of the float64
    # reference, the same bits on 1 and 2 threads; the targets take it for
    # their first pass.
    X = make_data(n, d, dtype=F32, seed=n + d)
    h = 0.5 * float(np.sqrt(d))
    assert nb._float_distances(X, 1.0 / (2 * h * h))
    calls = _spy(monkeypatch, "_sums_rounds_f")
    kw = dict(bandwidth=h, exclude_self=exclude_self, block_size=block_size, backend="numba")
    ref = ref_log_normalizer(X, X, h, exclude_self)
    base = mapa.log_normalizer(X, num_threads=1, **kw)
    assert base.dtype == F32 and calls
    assert_lognorm_close(base, ref, F32)
    np.testing.assert_array_equal(mapa.log_normalizer(X, num_threads=2, **kw), base)
    check_targets(mapa.posterior_targets(X, **kw), X, h, F32, exclude_self)


@pytest.mark.parametrize("gap", [50.0, 75.0, 95.0])
def test_single_precision_isolated_point(monkeypatch, gap):
    # With exclude_self, a point whose nearest neighbour's logit is -gap has
    # a row sum of about e^-gap. Above N * 2^-100 (gap 50) the float32 sum
    # stands, but its log Z is below -1e-5 / (5 * 2^-24) = -33.6
    # (_drift_floor); below (gap 75; gap 95 is past float32 exp's floor of
    # e^-87, the sum is 0) terms may be lost. Either way that row alone is
    # redone in float64, one-sided; the other rows' sums stand.
    h = 0.1
    X = make_clusters(200, 3, h, dtype=F32, seed=3)
    top = int(np.argmax(X[:, 0]))
    far = X[top].astype(np.float64)
    far[0] += np.sqrt(gap * 2 * h * h)  # every other point is further away
    X = np.vstack([X, far[None, :].astype(F32)])
    assert nb._float_distances(X, 1.0 / (2 * h * h))
    redo = _spy(monkeypatch, "_run_rows")
    ref = ref_log_normalizer(X, X, h, exclude_self=True)
    assert ref[-1] < -gap + 1.0
    for block_size in (32, None):
        out = mapa.log_normalizer(X, bandwidth=h, exclude_self=True, block_size=block_size, backend="numba")
        assert_lognorm_close(out, ref, F32)
    assert len(redo) == 2
    assert all(len(c[1]) == 1 for c in redo)


@pytest.mark.parametrize("case", ["overflow", "subnormal"])
def test_single_precision_fallback(monkeypatch, case):
    # float32 input whose squared distances would overflow float32
    # (coordinates ~1e19, and a bandwidth at which those pairs count) or
    # reach its subnormal range (coordinates ~1e-20, scale > 1e30) keeps
    # the float64 normaliser, and is exact to the float32 tolerances.
    rng = np.random.default_rng(11)
    spread, h = (1e19, 5e19) if case == "overflow" else (1e-20, 3e-20)
    X = (spread * rng.standard_normal((150, 2))).astype(F32)
    assert not nb._float_distances(X, 1.0 / (2 * h * h))
    calls = _spy(monkeypatch, "_sums_rounds_f")
    kw = dict(bandwidth=h, block_size=32, backend="numba")
    for exclude_self in (False, True):
        ref = ref_log_normalizer(X, X, h, exclude_self)
        assert_lognorm_close(mapa.log_normalizer(X, exclude_self=exclude_self, **kw), ref, F32)
        check_targets(mapa.posterior_targets(X, exclude_self=exclude_self, **kw), X, h, F32, exclude_self)
    assert not calls
    if case == "overflow":
        # the float32 path forced: pairs whose squared distance overflows are lost
        monkeypatch.setattr(nb, "_float_distances", lambda X, scale: True)
        bad = mapa.log_normalizer(X, **kw)
        assert calls and np.abs(bad - ref_log_normalizer(X, X, h)).max() > 0.1


def test_float_distances_rule():
    # The cpp kernel's float_distances: float32, D <= 32, scale <= 1e30 and
    # every coordinate strictly below float32(4e18 / sqrt(D)) in magnitude.
    D = 4
    limit = np.float32(4e18 / np.sqrt(D))
    X = np.zeros((3, D), dtype=F32)
    X[1, 2] = -np.nextafter(limit, F32(0))
    assert nb._float_distances(X, 1.0)
    assert nb._float_distances(X, 1e30)
    assert not nb._float_distances(X, np.nextafter(1e30, np.inf))
    assert not nb._float_distances(X.astype(np.float64), 1.0)
    X[1, 2] = -limit
    assert not nb._float_distances(X, 1.0)
    assert nb._float_distances(np.zeros((3, 32), dtype=F32), 1.0)
    assert not nb._float_distances(np.zeros((3, 33), dtype=F32), 1.0)


def _row_lse(L):
    """log sum_n q(n | i) per row, in float64 (0 for a normalised row)."""
    L = to_numpy(L).astype(np.float64)
    m = L.max(axis=1, keepdims=True)
    return m[:, 0] + np.log(np.exp(L - m).sum(axis=1))


# (n, d, block_size): tiles of 7 (29 of them, an odd count: a bye every
# round), 32 with a ragged last tile of 11, 45 in five ragged tiles, d = 16
@pytest.mark.parametrize("n, d, block_size", [(203, 2, 7), (203, 3, 32), (190, 16, 45)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exclude_self", [False, True])
def test_dense_self_queries_two_steps(monkeypatch, n, d, block_size, exclude_self, dtype):
    # Dense log q with the queries the references: the normalisers by the
    # symmetric pass, then every entry written once (_dense_rows), not the
    # one-sided streaming pass. Within the tolerances of the reference,
    # rows that sum to 1, the same bits on 1, 2 and 3 threads, and within
    # rounding of the one-sided pass (the same queries as a copy).
    h = 0.4 * float(np.sqrt(d))
    X = make_clusters(n, d, h, dtype=dtype, seed=n + d)
    dense = _spy(monkeypatch, "_dense_rows")
    rows = _spy(monkeypatch, "_run_rows")
    kw = dict(bandwidth=h, exclude_self=exclude_self, block_size=block_size, backend="numba")
    base = mapa.log_posterior(X, num_threads=1, **kw)
    # no one-sided pass over every row (float32 with exclude_self may redo
    # a few isolated rows in float64, see test_kernel_float_drift.py)
    assert base.dtype == dtype and dense and all(len(c[1]) < n // 10 for c in rows)
    assert_logq_close(base, ref_log_posterior(X, X, h, exclude_self), dtype)
    if exclude_self:
        assert np.isneginf(np.diagonal(to_numpy(base))).all()
    np.testing.assert_allclose(_row_lse(base), 0.0, atol=tol(dtype)["mass_rtol"] if dtype == F32 else 1e-13)
    for num_threads in (2, 3):
        np.testing.assert_array_equal(mapa.log_posterior(X, num_threads=num_threads, **kw), base)
    # the same queries as a copy: the one-sided pass (the backend called directly, as
    # exclude_self needs the queries to be the references at the API)
    one = nb.log_posterior(X, X.copy(), 1.0 / (2 * h * h), exclude_self, block_size)
    assert rows
    a, b = to_numpy(base).astype(np.float64), to_numpy(one).astype(np.float64)
    np.testing.assert_array_equal(np.isneginf(a), np.isneginf(b))
    fin = np.isfinite(b)
    np.testing.assert_allclose(a[fin], b[fin], rtol=1e-6 if dtype == F32 else 1e-12, atol=1e-4 if dtype == F32 else 1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_self_queries_isolated_point(monkeypatch, dtype):
    # With exclude_self, a point whose row sum is lost under exp's floor
    # (logit -800 to its nearest neighbour in float64, -95 in float32) has
    # its normaliser redone one-sided; its row is then written as the others.
    h = 0.1
    gap = 800.0 if dtype == np.float64 else 95.0
    X = make_clusters(150, 3, h, dtype=dtype, seed=7)
    far = X[int(np.argmax(X[:, 0]))].astype(np.float64)
    far[0] += np.sqrt(gap * 2 * h * h)
    X = np.vstack([X, far[None, :].astype(dtype)])
    redo = _spy(monkeypatch, "_run_rows")
    for block_size in (16, None):
        out = mapa.log_posterior(X, bandwidth=h, exclude_self=True, block_size=block_size, backend="numba")
        assert_logq_close(out, ref_log_posterior(X, X, h, exclude_self=True), dtype)
        assert abs(_row_lse(out)[-1]) < 1e-5
    assert redo


def test_dense_self_queries_progress():
    # The dense self-queries report over 2 N: the symmetric pass, then the rows.
    X = make_clusters(300, 2, 0.3, seed=1)
    seen = []
    mapa.log_posterior(X, bandwidth=0.3, block_size=16, backend="numba", num_threads=2,
                       progress=lambda done, total: seen.append((done, total)))
    dones = [d for d, _ in seen]
    assert {t for _, t in seen} == {600} and dones == sorted(dones) and dones[-1] == 600
    assert any(d == 300 for d in dones)


@pytest.mark.parametrize("n, d", [(3000, 1), (3000, 2), (3000, 3), (3000, 10), (3000, 40), (8000, 80), (300, 10)])
def test_principal_coords(n, d):
    # The locality order's two coordinates: up to D = 2 the raw features,
    # widest first; above, the projections on the top two principal axes
    # (through the covariance up to D = 64, through the sample above),
    # which span the plane a rotated, stretched cloud lies in (checked
    # against numpy's SVD, up to the axes' signs). At N = 300, D = 10 the
    # sample the cost budget allows (N^2 / (2048 D) = 4 points) is too
    # small: the raw features again.
    rng = np.random.default_rng(d)
    Z = rng.standard_normal((n, d)) * np.r_[5.0, 3.0, np.full(max(d - 2, 0), 0.3)][:d]
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    X = Z @ Q.T + 7.0
    P = nb._principal_coords(X)
    assert P.shape == (n, 2)
    if d <= 2 or n == 300:
        span = np.ptp(X, axis=0)
        first, second = np.argsort(-span, kind="stable")[:2] if d > 1 else (0, 0)
        np.testing.assert_array_equal(P[:, 0], X[:, first])
        np.testing.assert_array_equal(P[:, 1], X[:, second])
        return
    _, _, Vt = np.linalg.svd(X - X.mean(axis=0), full_matrices=False)
    ref = (X - X.mean(axis=0)) @ Vt[:2].T
    for a in range(2):
        # the sample form sees 256 points: its second axis is a little off
        c = abs(np.corrcoef(P[:, a], ref[:, a])[0, 1])
        assert c > (0.999 if d <= 64 else 0.99), (a, c)


def _spread(n, d, dtype, seed):
    """Clusters along a long curve, bandwidth 0.05: most tile pairs far apart."""
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0.0, 40.0, n))
    X = np.zeros((n, d))
    X[:, 0], X[:, 1 % d] = t, np.sin(t)
    X += 0.02 * rng.standard_normal((n, d))
    return X[rng.permutation(n)].astype(dtype), 0.05


@pytest.mark.parametrize("d", [2, 3, 16])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exclude_self", [False, True])
def test_pruned_tile_pairs_change_nothing(monkeypatch, d, dtype, exclude_self):
    # Data spread far beyond the bandwidth is sorted (_pair_order) and most
    # pairs of tiles are left out whole (_gap_bound). That only drops terms
    # that are exactly 0: the same order with boxes that never leave
    # anything out (_tile_boxes monkeypatched to infinite ones) gives the
    # same bits, and both match the float64 reference.
    X, h = _spread(900, d, dtype, seed=d)
    scale = 1.0 / (2 * h * h)
    X64 = X.astype(np.float64)
    ids, Xs, lo, hi = nb._pair_order(X64, scale, nb._float_distances(X, scale), 32)
    assert ids is not None
    np.testing.assert_array_equal(Xs, X64[ids])
    far = [-scale * nb._gap_bound(lo, hi, a, b) < -709.0 for a in range(len(lo)) for b in range(a + 1, len(lo))]
    assert np.mean(far) > 0.3
    kw = dict(exclude_self=exclude_self, block_size=32)
    pruned = _all_outputs(X, 8, bandwidth=h, **kw)
    wide = lambda Xs, tile: (np.full((-(-len(Xs) // tile), d), -np.inf), np.full((-(-len(Xs) // tile), d), np.inf))
    monkeypatch.setattr(nb, "_tile_boxes", wide)
    # sorted as before, with the boxes that never prune
    monkeypatch.setattr(nb, "_pair_order", lambda X64, scale, single, tile: (ids, X64[ids]) + wide(X64, tile))
    full = _all_outputs(X, 8, bandwidth=h, **kw)
    for name in pruned:
        np.testing.assert_array_equal(pruned[name], full[name], err_msg=name)
    ref = ref_log_normalizer(X, X, h, exclude_self)
    assert_lognorm_close(pruned["lnorm"], ref, dtype)
    assert_logq_close(pruned["dense"], ref_log_posterior(X, X, h, exclude_self), dtype)
    check_targets(mapa.posterior_targets(X, bandwidth=h, backend="numba", **kw), X, h, dtype, exclude_self)
    check_topk(mapa.log_posterior_topk(X, k=8, bandwidth=h, backend="numba", **kw), X, X, h, 8, dtype, exclude_self)


def test_gap_bound_is_below_every_distance():
    # _gap_bound never exceeds a squared distance between the two tiles,
    # computed as the kernels do (float32 sums too), is symmetric, and is 0
    # on the diagonal.
    rng = np.random.default_rng(5)
    for d in (1, 2, 7, 32):
        X = rng.standard_normal((64, d)) * rng.uniform(0.1, 10.0, d) + np.repeat(rng.uniform(-5, 5, (4, d)), 16, 0)
        lo, hi = nb._tile_boxes(X, 16)
        for a in range(4):
            assert nb._gap_bound(lo, hi, a, a) == 0.0
            for b in range(4):
                A, B = X[16 * a : 16 * a + 16], X[16 * b : 16 * b + 16]
                d64 = ((A[:, None, :] - B[None, :, :]) ** 2).sum(-1)
                A32, B32 = A.astype(F32), B.astype(F32)
                d32 = ((A32[:, None, :] - B32[None, :, :]) ** 2).sum(-1, dtype=F32)
                lo32, hi32 = nb._tile_boxes(X.astype(F32).astype(np.float64), 16)
                assert nb._gap_bound(lo, hi, a, b) <= d64.min()
                assert nb._gap_bound(lo32, hi32, a, b) <= d32.min()
                assert nb._gap_bound(lo, hi, a, b) == nb._gap_bound(lo, hi, b, a)
