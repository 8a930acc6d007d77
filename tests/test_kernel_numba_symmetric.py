"""The Numba backend's symmetric passes (queries = references): schedule, chunks, fallbacks."""

from __future__ import annotations

import numpy as np
import pytest

import mapa
from kernel_reference import BACKENDS, DTYPES, check_targets, check_topk, make_clusters, make_data, to_numpy

pytestmark = pytest.mark.skipif("numba" not in BACKENDS, reason="the numba backend is not available")

if "numba" in BACKENDS:
    from mapa.backends import numba_impl as nb


def _all_outputs(X, k, **kw):
    """Top-k (indices, log q, normaliser), normaliser and targets, as NumPy arrays."""
    kw = dict(backend="numba", bandwidth=0.3, **kw)
    top = mapa.log_posterior_topk(X, k=k, **kw)
    tg = mapa.posterior_targets(X, **kw)
    out = dict(
        idx=top.indices, logp=top.log_prob, top_lnorm=top.log_norm, lnorm=mapa.log_normalizer(X, **kw),
        W=tg.weights, means=tg.means, s=tg.sq_norms,
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
