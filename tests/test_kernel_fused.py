"""The cpp kernel's fused leaves on problems of many tiles.

With the queries the references, the cpp kernel computes a tile's squared
distances, the exponentials and their row and column sums in one leaf,
without storing the logits: for float32 data the normaliser, the targets'
two passes and top-k (which keeps each pair's float squared distance for
its selection), for float64 data the normaliser. A dropped self term
(exclude_self) is masked inside the leaf. The tests' usual problems fit in
one tile. Here the tiles are ragged: a tile shorter than its stride (masked
lanes in the last column block) and tiles whose rows end part-way through a
group of four, against the float64 reference.

The last tests (every backend) cover the locality order the sorted passes
and top-k use: data spread along no feature, and degenerate spreads.
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
    make_data,
    ref_log_normalizer,
    ref_log_posterior,
)

cpp_only = pytest.mark.skipif("cpp" not in BACKENDS, reason="the cpp backend is not available")

F32 = np.float32


# (n, d, block_size): 203 points in tiles of 42 (stride 64, so the second
# column block is part padding; a tile's rows are blocks of 16, 16 and 10,
# the last ending two rows into a group of four: ragged rows meet other
# tiles' columns, whose column sums they feed); 310 in tiles of 54 (rows 16,
# 16, 16, 6); 1500 with the default tiles (1024 for the normaliser, at most
# 256 for top-k); d = 16 sums sixteen features per distance.
CASES = [(203, 3, 42), (310, 16, 54), (1500, 2, None)]


@cpp_only
@pytest.mark.parametrize("n, d, block_size", CASES)
@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("dtype", [F32, np.float64])
def test_fused_leaves_match_float64_reference(n, d, block_size, exclude_self, num_threads, dtype):
    X = make_data(n, d, dtype=dtype, seed=n + d)
    # a bandwidth at which every row has many terms above the floor
    h = 0.5 * float(np.sqrt(d))
    kw = dict(bandwidth=h, exclude_self=exclude_self, block_size=block_size, num_threads=num_threads, backend="cpp")
    ref = ref_log_normalizer(X, X, h, exclude_self)
    lnorm = mapa.log_normalizer(X, **kw)
    assert_lognorm_close(lnorm, ref, dtype)
    for k in (9, 70):
        top = mapa.log_posterior_topk(X, k=k, **kw)
        check_topk(top, X, X, h, k, dtype, exclude_self)
    check_targets(mapa.posterior_targets(X, **kw), X, h, dtype, exclude_self)
    assert_logq_close(mapa.log_posterior(X, **kw), ref_log_posterior(X, X, h, exclude_self), dtype)


@cpp_only
@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("dtype", [F32, np.float64])
def test_fused_leaves_bit_identical_across_threads(exclude_self, dtype):
    # Each tile's pairs run in one fixed order whatever the thread count, so
    # the fused sums, and every output built on them, are the same bits.
    X = make_data(203, 3, dtype=dtype, seed=4)
    kw = dict(bandwidth=0.8, exclude_self=exclude_self, block_size=42, backend="cpp")

    def run(num_threads):
        top = mapa.log_posterior_topk(X, k=9, num_threads=num_threads, **kw)
        tg = mapa.posterior_targets(X, num_threads=num_threads, **kw)
        return [
            mapa.log_normalizer(X, num_threads=num_threads, **kw),
            top.indices,
            top.log_prob,
            top.log_norm,
            tg.weights,
            tg.means,
            tg.sq_norms,
        ]

    base = run(1)
    for num_threads in (2, 5):
        for a, b in zip(run(num_threads), base):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [3, 16, 40])
@pytest.mark.parametrize("dtype", [F32, np.float64])
def test_manifold_at_an_angle(backend, d, dtype):
    # A curve spread along a random direction of R^d, not along any
    # feature: the locality order sorts by the data's two principal axes,
    # and with a bandwidth far below the data's extent the symmetric passes
    # run sorted and leave out tile pairs whose terms are all 0. Against
    # the float64 reference, with and without the self term.
    rng = np.random.default_rng(d)
    t = rng.uniform(-3, 3, size=900)
    curve = np.stack([t, np.sin(2 * t)], axis=1)
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    X = (curve @ Q[:2] + 0.02 * rng.standard_normal((900, d))).astype(dtype)
    h = 0.05
    for exclude_self in (False, True):
        kw = dict(bandwidth=h, exclude_self=exclude_self, block_size=64, num_threads=2, backend=backend)
        assert_lognorm_close(mapa.log_normalizer(X, **kw), ref_log_normalizer(X, X, h, exclude_self), dtype)
        check_topk(mapa.log_posterior_topk(X, k=12, **kw), X, X, h, 12, dtype, exclude_self)
        check_targets(mapa.posterior_targets(X, **kw), X, h, dtype, exclude_self)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ["line", "point"])
def test_locality_order_on_degenerate_spread(backend, shape):
    # Points on one line of R^8 (no second principal axis) or all at one
    # point (none at all): the order's power iteration finds nothing to
    # follow and falls back to a fixed axis; results still match.
    rng = np.random.default_rng(5)
    direction = rng.standard_normal(8)
    t = rng.uniform(-2, 2, size=(400, 1)) if shape == "line" else np.zeros((400, 1))
    X = (1.0 + t * direction).astype(np.float64)
    h = 0.1
    kw = dict(bandwidth=h, exclude_self=True, block_size=64, backend=backend)
    assert_lognorm_close(mapa.log_normalizer(X, **kw), ref_log_normalizer(X, X, h, True), np.float64)
    check_topk(mapa.log_posterior_topk(X, k=5, **kw), X, X, h, 5, np.float64, True)
