"""Every backend against independent float64 references and hand-computed values."""

from __future__ import annotations

import math

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
    check_targets,
    check_topk,
    make_clusters,
    make_data,
    ref_log_normalizer,
    ref_log_posterior,
    to_numpy,
    tol,
)

pytestmark = pytest.mark.parametrize("backend", BACKENDS)


# ------------------------------------------------------------ hand-computed values


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d, h", [(1.0, 1.0), (3.0, 2.0), (0.5, 0.1)])
def test_two_points_hand_computed(backend, dtype, d, h):
    # Two points at distance d (along a diagonal in D=3):
    #   q(other | n) = 1 / (1 + exp(d^2 / (2 h^2))),  q(self | n) = 1 / (1 + exp(-d^2 / (2 h^2)))
    #   log normaliser = log(1 + exp(-d^2 / (2 h^2)))
    u = np.ones(3) / math.sqrt(3.0)
    X = np.stack([0.25 * u, 0.25 * u + d * u]).astype(dtype)
    a = d * d / (2 * h * h)
    log_self = -math.log1p(math.exp(-a))
    log_other = -a - math.log1p(math.exp(-a))
    expected = np.array([[log_self, log_other], [log_other, log_self]])
    t = tol(dtype)

    L = mapa.log_posterior(X, bandwidth=h, backend=backend)
    np.testing.assert_allclose(L.astype(np.float64), expected, rtol=t["logq_rtol"], atol=t["logq_atol"])

    lnorm = mapa.log_normalizer(X, bandwidth=h, backend=backend)
    np.testing.assert_allclose(lnorm.astype(np.float64), [math.log1p(math.exp(-a))] * 2, atol=t["logq_atol"])

    top = mapa.log_posterior_topk(X, bandwidth=h, k=1, backend=backend)
    np.testing.assert_array_equal(top.indices, [[0], [1]])
    np.testing.assert_allclose(top.log_prob.astype(np.float64), [[log_self]] * 2, atol=t["logq_atol"])
    np.testing.assert_allclose(top.kept_mass.astype(np.float64), [math.exp(log_self)] * 2, atol=t["logq_atol"])

    # targets: W = (1, 1) by symmetry; m_0 = q_self x_0 + q_other x_1
    tg = mapa.posterior_targets(X, bandwidth=h, backend=backend)
    qs, qo = math.exp(log_self), math.exp(log_other)
    Xf = X.astype(np.float64)
    np.testing.assert_allclose(tg.weights.astype(np.float64), [1.0, 1.0], rtol=t["mass_rtol"])
    np.testing.assert_allclose(
        tg.means.astype(np.float64), [qs * Xf[0] + qo * Xf[1], qo * Xf[0] + qs * Xf[1]], atol=1e-6 if dtype == np.float32 else 1e-12
    )
    sq = (Xf**2).sum(axis=1)
    np.testing.assert_allclose(
        tg.sq_norms.astype(np.float64), [qs * sq[0] + qo * sq[1], qo * sq[0] + qs * sq[1]], rtol=t["mass_rtol"]
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_two_points_exclude_self_hand_computed(backend, dtype):
    # With the self term removed each point puts all its mass on the other:
    # log q = [[-inf, 0], [0, -inf]], log normaliser = -d^2 / (2 h^2).
    d, h = 2.0, 0.5
    X = np.array([[1.0, -1.0], [1.0, -1.0 + d]], dtype=dtype)
    L = mapa.log_posterior(X, bandwidth=h, exclude_self=True, backend=backend)
    assert np.isneginf(np.diag(L)).all()
    np.testing.assert_allclose(L[[0, 1], [1, 0]].astype(np.float64), 0.0, atol=tol(dtype)["logq_atol"])
    lnorm = mapa.log_normalizer(X, bandwidth=h, exclude_self=True, backend=backend)
    np.testing.assert_allclose(lnorm.astype(np.float64), [-d * d / (2 * h * h)] * 2, rtol=tol(dtype)["logq_rtol"])
    top = mapa.log_posterior_topk(X, bandwidth=h, k=1, exclude_self=True, backend=backend)
    np.testing.assert_array_equal(top.indices, [[1], [0]])
    np.testing.assert_allclose(top.kept_mass.astype(np.float64), 1.0, atol=tol(dtype)["logq_atol"])
    tg = mapa.posterior_targets(X, bandwidth=h, exclude_self=True, backend=backend)
    np.testing.assert_allclose(tg.weights.astype(np.float64), [1.0, 1.0], rtol=tol(dtype)["mass_rtol"])
    np.testing.assert_allclose(tg.means, X[::-1], rtol=1e-6)


def test_single_point(backend):
    # N = 1: q(0|0) = 1, log normaliser = 0 (distance to itself).
    X = np.array([[3.0, 4.0]])
    np.testing.assert_array_equal(mapa.log_posterior(X, bandwidth=1.0, backend=backend), [[0.0]])
    np.testing.assert_array_equal(mapa.log_normalizer(X, bandwidth=1.0, backend=backend), [0.0])
    tg = mapa.posterior_targets(X, bandwidth=1.0, backend=backend)
    np.testing.assert_allclose(tg.weights, [1.0])
    np.testing.assert_allclose(tg.means, X)
    np.testing.assert_allclose(tg.sq_norms, [25.0])


def test_duplicate_points_split_mass_and_ties_by_index(backend):
    # Three copies of one point and a far point: each copy's row is uniform over
    # the copies (log q = -log 3); top-k ties come lowest index first.
    X = np.array([[0.0, 0.0], [5.0, 5.0], [0.0, 0.0], [0.0, 0.0]])
    L = mapa.log_posterior(X, bandwidth=0.5, backend=backend)
    for r in (0, 2, 3):
        np.testing.assert_allclose(L[r, [0, 2, 3]], -math.log(3.0), rtol=1e-12)
    top = mapa.log_posterior_topk(X, bandwidth=0.5, k=3, backend=backend)
    for r in (0, 2, 3):
        np.testing.assert_array_equal(top.indices[r], [0, 2, 3])
    top = mapa.log_posterior_topk(X, bandwidth=0.5, k=2, exclude_self=True, backend=backend)
    np.testing.assert_array_equal(top.indices[[0, 2, 3]], [[2, 3], [0, 3], [0, 2]])
    np.testing.assert_allclose(top.log_prob[[0, 2, 3]], -math.log(2.0), rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("block_size", [32, 1024])
def test_topk_cut_through_ties_across_blocks(backend, dtype, exclude_self, block_size):
    # 600 points on a 3 x 3 integer grid: about 67 exact copies of each, so the
    # logits take a handful of exactly representable values (h = 1), and the
    # k-th place falls inside a group of ties spread over many 16-column blocks
    # and tiles. The k best must be the largest values, ties lowest index first.
    rng = np.random.default_rng(7)
    X = rng.integers(0, 3, size=(600, 2)).astype(dtype)
    k = 100
    top = mapa.log_posterior_topk(X, bandwidth=1.0, k=k, exclude_self=exclude_self, block_size=block_size,
                                  backend=backend)
    X64 = X.astype(np.float64)
    logits = -((X64[:, None, :] - X64[None, :, :]) ** 2).sum(-1) / 2.0
    if exclude_self:
        np.fill_diagonal(logits, -np.inf)
    cols = np.arange(len(X))
    for r in range(0, len(X), 37):
        expected = np.lexsort((cols, -logits[r]))[:k]  # by value descending, then index
        np.testing.assert_array_equal(top.indices[r], expected)


# ------------------------------------------------------------ general reference


QUERY_MODES = ["self", "exclude_self", "queries"]


def _inputs(mode, dtype, offset, n=37, m=23, d=5, seed=1):
    X = make_data(n, d, dtype=dtype, offset=offset, seed=seed)
    if mode == "queries":
        Y = make_data(m, d, dtype=dtype, offset=offset, seed=seed + 100)
        return X, Y, dict(queries=Y)
    return X, X, dict(exclude_self=(mode == "exclude_self"))


@pytest.mark.parametrize("offset", [0.0, 1e3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", QUERY_MODES)
def test_all_outputs_match_reference(backend, mode, dtype, offset):
    h = 0.6  # nearest neighbours at ~1.3 in D=5: several entries per row above the floor
    X, Y, kw = _inputs(mode, dtype, offset)
    ex = kw.get("exclude_self", False)
    R = ref_log_posterior(X, Y, h, ex)
    assert (R > LOGQ_FLOOR).sum(axis=1).min() >= 2  # the data really is non-trivial

    L = mapa.log_posterior(X, bandwidth=h, backend=backend, **kw)
    assert L.dtype == dtype and L.shape == R.shape
    assert_logq_close(L, R, dtype)
    # rows log-sum-exp to 0
    np.testing.assert_allclose(logsumexp(L.astype(np.float64), axis=1), 0.0, atol=tol(dtype)["logq_atol"])

    lnorm = mapa.log_normalizer(X, bandwidth=h, backend=backend, **kw)
    assert lnorm.dtype == dtype
    assert_lognorm_close(lnorm, ref_log_normalizer(X, Y, h, ex), dtype)

    for k in (1, 7, X.shape[0] - 1 if ex else X.shape[0]):
        top = mapa.log_posterior_topk(X, bandwidth=h, k=k, backend=backend, **kw)
        check_topk(top, X, Y, h, k, dtype, ex)

    if mode != "queries":
        check_targets(mapa.posterior_targets(X, bandwidth=h, backend=backend, exclude_self=ex), X, h, dtype, ex)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h, offset", [(1e-3, 1e3), (1e-2, 1e3), (1e-2, 0.0)])
def test_tiny_bandwidth_uncentred(backend, dtype, h, offset):
    # Clusters of width ~h far from the origin: catastrophic cancellation in
    # ||x||^2 + ||y||^2 - 2 x.y would show up here as errors of order offset^2 / h^2.
    X = make_clusters(50, 3, h, dtype=dtype, offset=offset, seed=3)
    Y = make_clusters(20, 3, h, dtype=dtype, offset=offset, seed=3)[::-1].copy() + np.asarray(h / 3, dtype=dtype)
    for queries, ex in ((None, False), (None, True), (Y, False)):
        Q = X if queries is None else Y
        R = ref_log_posterior(X, Q, h, ex)
        assert (R > LOGQ_FLOOR).sum(axis=1).max() >= 3
        assert_logq_close(mapa.log_posterior(X, queries, bandwidth=h, exclude_self=ex, backend=backend), R, dtype)
        assert_lognorm_close(
            mapa.log_normalizer(X, queries, bandwidth=h, exclude_self=ex, backend=backend),
            ref_log_normalizer(X, Q, h, ex),
            dtype,
        )
        check_topk(mapa.log_posterior_topk(X, queries, bandwidth=h, k=5, exclude_self=ex, backend=backend), X, Q, h, 5, dtype, ex)
    check_targets(mapa.posterior_targets(X, bandwidth=h, backend=backend), X, h, dtype)


def test_float32_tiny_bandwidth_data_near_origin(backend):
    # float32 data that needs no centring (offset 0), clusters of width h = 1e-3:
    # the float32 values are exact inputs, and differences of nearby float32
    # numbers are exact, so nothing forces an error above the 1e-4 budget.
    # Centring by the float64 mean and rounding the centred values back to
    # float32 (mapa/_validation.py, prepare) perturbs every coordinate by up to
    # half an ulp of |x - mean| (~1e-7), which at 1/(2 h^2) = 5e5 moves log q by ~4e-4.
    # (The same error, ~3.5e-4, was seen at h = 1e-2 in D = 5 by the random
    # property tests; this is the deterministic reproduction.)
    h = 1e-3
    X = make_clusters(50, 3, h, dtype=np.float32, offset=0.0, seed=3)
    assert_logq_close(mapa.log_posterior(X, bandwidth=h, backend=backend), ref_log_posterior(X, X, h), np.float32)


@pytest.mark.parametrize("scale", [1e20, 1e-22])
def test_float32_extreme_magnitudes(backend, scale):
    # float32 data whose squared distances would overflow float (coordinates
    # ~1e20 with h ~1e19) or sink into its subnormal range (coordinates
    # ~1e-22 with h ~1e-23): the cpp kernel must keep float64 distances for
    # these (its float distances are only for data well inside float's
    # range), and every backend must still match the float64 reference.
    X = make_clusters(40, 3, 0.1, dtype=np.float64, seed=5) * scale
    X = X.astype(np.float32)
    h = 0.1 * scale
    R = ref_log_posterior(X, X, h)
    assert (R > LOGQ_FLOOR).sum(axis=1).max() >= 3
    assert np.isfinite(R[R > LOGQ_FLOOR]).all()
    assert_logq_close(mapa.log_posterior(X, bandwidth=h, backend=backend), R, np.float32)
    assert_lognorm_close(mapa.log_normalizer(X, bandwidth=h, backend=backend), ref_log_normalizer(X, X, h), np.float32)
    check_topk(mapa.log_posterior_topk(X, bandwidth=h, k=5, backend=backend), X, X, h, 5, np.float32)
    # (posterior_targets is left out: its sq_norms, ~scale^2, are beyond
    # float32 output at both magnitudes.)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exclude_self", [False, True])
def test_far_apart_groups(backend, dtype, exclude_self):
    # Groups of points far apart on a line, tiles of 32: with the queries the
    # references, the cpp kernel sorts the points along a Z-order curve and
    # leaves out the tile pairs whose every exponential is exactly 0 (here
    # most of them). Every output must still match the float64 reference,
    # including the groups' edges, where tile pairs are kept.
    rng = np.random.default_rng(8)
    h = 1.0
    centres = np.arange(8) * 40.0
    X = centres[rng.integers(0, 8, 400)][:, None] + 3.0 * rng.standard_normal((400, 1))
    X = np.hstack([X, 0.5 * rng.standard_normal((400, 1))]).astype(dtype)
    R = ref_log_posterior(X, X, h, exclude_self)
    kw = dict(bandwidth=h, exclude_self=exclude_self, backend=backend, block_size=32)
    assert_logq_close(mapa.log_posterior(X, **kw), R, dtype)
    assert_lognorm_close(mapa.log_normalizer(X, **kw), ref_log_normalizer(X, X, h, exclude_self), dtype)
    check_topk(mapa.log_posterior_topk(X, k=6, **kw), X, X, h, 6, dtype, exclude_self)
    check_targets(mapa.posterior_targets(X, **kw), X, h, dtype, exclude_self)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exclude_self", [False, True])
def test_topk_rounds_of_tile_pairs(backend, dtype, exclude_self):
    # With the queries the references, cpp top-k takes each unordered pair
    # once, in rounds of tile pairs that share no tile, every row's selection
    # live at once and started from a bound found in its own tile. 730
    # points in tiles of 32 make 23 tiles (an odd count: each round has a
    # bye); the default tiles (64 here) take the started selection; k = 100
    # is longer than a tile, and k = 300 more than the final ranking compares
    # pair by pair (256; it sorts). 1 and 3 threads, against the float64
    # reference.
    h = 0.3
    X = make_clusters(730, 3, h, dtype=dtype, seed=11)
    for block_size in (None, 32):
        for k in (1, 7, 100, 300):
            for num_threads in (1, 3):
                top = mapa.log_posterior_topk(X, bandwidth=h, k=k, exclude_self=exclude_self, block_size=block_size,
                                              num_threads=num_threads, backend=backend)
                check_topk(top, X, X, h, k, dtype, exclude_self)


@pytest.mark.parametrize("dtype", DTYPES)
def test_far_query_has_finite_correct_normaliser(backend, dtype):
    # A query at distance ~1e3 from every reference: every exp underflows, but the
    # normaliser is finite (about -1e6 / (2 h^2)) and the row still sums to one.
    X = make_data(30, 4, dtype=dtype, seed=5)
    Y = np.vstack([X[:2], np.full((1, 4), 1e3)]).astype(dtype)
    h = 0.5
    ref = ref_log_normalizer(X, Y, h)
    assert ref[-1] < -1e6
    assert_lognorm_close(mapa.log_normalizer(X, Y, bandwidth=h, backend=backend), ref, dtype)
    L = mapa.log_posterior(X, Y, bandwidth=h, backend=backend)
    assert_logq_close(L, ref_log_posterior(X, Y, h), dtype)
    assert np.isfinite(L[-1]).any()
    np.testing.assert_allclose(logsumexp(L[-1].astype(np.float64)), 0.0, atol=tol(dtype)["logq_atol"])
    check_topk(mapa.log_posterior_topk(X, Y, bandwidth=h, k=3, backend=backend), X, Y, h, 3, dtype)


@pytest.mark.parametrize(
    "dtype, logit",
    # per dtype: a nearest neighbour well inside the exponential's range, and
    # one so far that its row is redone with a running maximum
    [(np.float32, -60.0), (np.float32, -75.0), (np.float64, -600.0), (np.float64, -720.0)],
)
def test_exclude_self_tiny_row_sums(backend, dtype, logit):
    # Point 0 is alone; its nearest neighbour sits at logit `logit`, far below
    # the others' self-free maxima. Its normaliser must still be exact, on the
    # symmetric path (each pair once, no running maximum) and on the redo.
    rng = np.random.default_rng(3)
    h = 1.0
    X = rng.standard_normal((40, 2))
    X[0] = X[1] + [math.sqrt(-2.0 * logit) * h, 0.0]
    # the rest well away from point 0 (its row: one term near `logit`)
    near = np.linalg.norm(X[2:] - X[0], axis=1) < np.linalg.norm(X[0] - X[1]) + 1.0
    X[2:][near] -= 30.0
    X = X.astype(dtype)
    ref = ref_log_normalizer(X, X, h, exclude_self=True)
    assert ref[0] < logit + 1.0
    lnorm = mapa.log_normalizer(X, bandwidth=h, exclude_self=True, backend=backend, block_size=16)
    assert_lognorm_close(lnorm, ref, dtype)
    tg = mapa.posterior_targets(X, bandwidth=h, exclude_self=True, backend=backend, block_size=16)
    check_targets(tg, X, h, dtype, exclude_self=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_isolated_point_with_exclude_self(backend, dtype):
    # An outlier far from the others: with the self term excluded its column
    # gets (numerically) zero mass, and its mean falls back to the point itself
    # (documented in PosteriorTargets); its own row is still finite and correct.
    X = make_data(20, 3, dtype=dtype, seed=6)
    X[7] = 200.0
    h = 0.7
    R = ref_log_posterior(X, X, h, exclude_self=True)
    assert_logq_close(mapa.log_posterior(X, bandwidth=h, exclude_self=True, backend=backend), R, dtype)
    lnorm = mapa.log_normalizer(X, bandwidth=h, exclude_self=True, backend=backend)
    assert_lognorm_close(lnorm, ref_log_normalizer(X, X, h, exclude_self=True), dtype)
    tg = mapa.posterior_targets(X, bandwidth=h, exclude_self=True, backend=backend)
    assert float(tg.weights[7]) < 1e-30
    np.testing.assert_allclose(tg.means[7], X[7], rtol=1e-6)
    check_targets(tg, X, h, dtype, exclude_self=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_targets_high_dim_any_threads(backend, dtype):
    # posterior_targets at N = 300 (three tiles of 128 in cpp) and D = 2700,
    # on 2 and 100 threads, against a float64 reference built row by row
    # from explicit differences (the shared reference would need an
    # N x N x D array), and each other. Near-duplicate clusters keep q
    # non-trivial in high dimension; exclude_self adds the self-free rows.
    rng = np.random.default_rng(11)
    N, D, h = 300, 2700, 0.5
    base = rng.standard_normal((6, D))
    X = (base[rng.integers(0, 6, N)] + 0.01 * rng.standard_normal((N, D))).astype(dtype)
    Xf = X.astype(np.float64)
    t = tol(dtype)
    for exclude_self in (False, True):
        logits = np.stack([-((Xf - Xf[i]) ** 2).sum(axis=1) / (2.0 * h * h) for i in range(N)])
        if exclude_self:
            np.fill_diagonal(logits, -np.inf)
        q = np.exp(logits - logsumexp(logits, axis=1, keepdims=True))
        W, S1, s = q.sum(axis=0), q.T @ Xf, q.T @ (Xf**2).sum(axis=1)
        assert (W > 1e-3).all() and np.sort(q, axis=1)[:, -2].max() > 1e-3  # q is not the identity
        outs = [mapa.posterior_targets(X, bandwidth=h, exclude_self=exclude_self, backend=backend, num_threads=nt)
                for nt in (2, 100)]
        for tg in outs:
            np.testing.assert_allclose(np.asarray(tg.weights, np.float64), W, rtol=t["mass_rtol"])
            np.testing.assert_allclose(np.asarray(tg.means, np.float64), S1 / W[:, None], rtol=t["logq_rtol"],
                                       atol=t["mean_atol"] * float(np.ptp(Xf)))
            np.testing.assert_allclose(np.asarray(tg.sq_norms, np.float64), s, rtol=t["mass_rtol"])
        np.testing.assert_allclose(np.asarray(outs[0].weights, np.float64), np.asarray(outs[1].weights, np.float64),
                                   rtol=t["mass_rtol"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 32, 40])
def test_targets_rows_with_small_normalisers(backend, dtype, d):
    # With exclude_self at a bandwidth near the neighbour spacing (the "nn"
    # rule), most rows have log Z < 0. Points along a line in a random
    # direction, with gaps whose logits run from -0.05 to -900: log Z spans
    # about [-900, 2], through the margins where rows leave the symmetric
    # pass for the one-sided one (cpp: -40 in float, -400 in double; the
    # drift floor on float distances; numba: -400). Every row's terms
    # against the float64 reference.
    rng = np.random.default_rng(d)
    h = 0.1
    gaps = h * np.sqrt(2.0 * np.exp(rng.uniform(np.log(0.05), np.log(900.0), 400)))
    t = np.cumsum(gaps)
    u = rng.standard_normal(d)
    X = (t[:, None] * (u / np.linalg.norm(u)) + 1e-3 * h * rng.standard_normal((400, d))).astype(dtype)
    ln = ref_log_normalizer(X, X, h, exclude_self=True)
    assert (ln < 0).mean() > 0.5 and ((ln > -40) & (ln < 0)).mean() > 0.2 and (ln < -400).any()
    res = mapa.posterior_targets(X, bandwidth=h, exclude_self=True, backend=backend, num_threads=2)
    check_targets(res, X, h, dtype, exclude_self=True)


@pytest.mark.parametrize("block_size", [7, 33, 50, None])
@pytest.mark.parametrize("d", [2, 30, 40])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_far_apart_data_any_tile_length(backend, block_size, d, exclude_self):
    # Clusters far apart at the bandwidth, with a run of exact duplicates:
    # the symmetric passes sort the points and leave out pairs of tiles, and
    # row blocks, whose every term is 0. Tile lengths that are not a
    # multiple of the row block (7, 33, 50) cut the blocks from each tile's
    # first row; a box indexed as if they were aligned lost most of the
    # duplicates' terms (log Z 3.6 against 5.3). Every function against
    # the float64 reference. (d = 40: the compiled kernel's expansion, were
    # it not refined, is off by ~1e-9 here, past the float64 tolerance.)
    rng = np.random.default_rng(d)
    centres = rng.uniform(-1.0, 1.0, (12, d))
    X = centres[rng.integers(0, 12, 600)] + 1e-3 * rng.standard_normal((600, d))
    X[rng.integers(0, 600, 120)] = X[0]
    h = 2e-3
    kw = dict(bandwidth=h, backend=backend, block_size=block_size, exclude_self=exclude_self)
    assert_lognorm_close(mapa.log_normalizer(X, **kw), ref_log_normalizer(X, X, h, exclude_self), np.float64)
    check_topk(mapa.log_posterior_topk(X, k=16, **kw), X, X, h, 16, np.float64, exclude_self)
    check_targets(mapa.posterior_targets(X, **kw), X, h, np.float64, exclude_self)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_close_points_far_from_the_mean_above_32_features(backend, exclude_self):
    # Five clusters of width 1.3e-4, about 38 from the mean in 81
    # dimensions, at h = 1.4e-4: the expansion ||y||^2 + ||x||^2 - 2 x.y
    # rounds by ~1e-16 * 2900 against within-cluster distances of ~3e-6,
    # which moved the compiled kernel's log Z by 5e-5. Every function,
    # self and (once, without exclude_self) other queries, against the
    # float64 reference.
    rng = np.random.default_rng(0)
    centres = 4.2 * rng.standard_normal((5, 81))
    X = centres[rng.integers(0, 5, 355)] + 1.3e-4 * rng.standard_normal((355, 81))
    Y = X[:40] + 2e-5 * rng.standard_normal((40, 81))
    h = 1.4e-4
    kw = dict(bandwidth=h, backend=backend)
    for queries, ex in [(None, exclude_self)] + ([] if exclude_self else [(Y, False)]):
        Q = X if queries is None else Y
        assert_lognorm_close(
            mapa.log_normalizer(X, queries, exclude_self=ex, **kw), ref_log_normalizer(X, Q, h, ex), np.float64
        )
        assert_logq_close(
            mapa.log_posterior(X, queries, exclude_self=ex, **kw), ref_log_posterior(X, Q, h, ex), np.float64
        )
        check_topk(mapa.log_posterior_topk(X, queries, k=8, exclude_self=ex, **kw), X, Q, h, 8, np.float64, ex)
    check_targets(mapa.posterior_targets(X, exclude_self=exclude_self, **kw), X, h, np.float64, exclude_self)


def test_self_term_exact_above_32_features(backend):
    # Points far apart in 40 dimensions (every other logit below -1e5): each
    # row's only term is its own, so log Z is exactly 0, as is log q(n|n).
    # Above 32 features the compiled kernel forms distances by the
    # expansion ||y||^2 + ||x||^2 - 2 x.y, which leaves ~1e-16 ||x||^2 on
    # the self term (log Z -1e-10 here); it sets that term to 0.
    rng = np.random.default_rng(4)
    X = 100.0 * rng.standard_normal((300, 40))
    kw = dict(bandwidth=1.0, backend=backend)
    np.testing.assert_array_equal(to_numpy(mapa.log_normalizer(X, **kw)), 0.0)
    np.testing.assert_array_equal(np.diagonal(to_numpy(mapa.log_posterior(X, **kw))), 0.0)
    top = mapa.log_posterior_topk(X, k=3, **kw)
    np.testing.assert_array_equal(to_numpy(top.indices)[:, 0], np.arange(300))
    np.testing.assert_array_equal(to_numpy(top.log_prob)[:, 0], 0.0)
    np.testing.assert_array_equal(to_numpy(mapa.posterior_targets(X, **kw).weights), 1.0)
