"""Long kernel calls: progress reports, Ctrl-C, exceptions from callbacks, thread safety of the pool."""

from __future__ import annotations

import _thread
import threading

import numpy as np
import pytest

import mapa

from kernel_reference import BACKENDS

COMPILED = [b for b in BACKENDS if b in ("cpp", "numba")]
FUNCTIONS = {
    "log_normalizer": lambda X, **kw: mapa.log_normalizer(X, **kw),
    "log_posterior_topk": lambda X, **kw: mapa.log_posterior_topk(X, k=4, **kw),
    "posterior_targets": lambda X, **kw: mapa.posterior_targets(X, **kw),
}


def _big():
    # ~1e11 pairs: minutes of work, so only an interrupt can end the call early.
    return np.random.default_rng(0).normal(size=(300_000, 2))


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_keyboard_interrupt_stops_a_long_call(backend, name):
    X = _big()
    FUNCTIONS[name](X[:50], bandwidth=0.1, backend=backend)  # compile outside the timed part
    timer = threading.Timer(0.5, _thread.interrupt_main)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            FUNCTIONS[name](X, bandwidth=0.1, backend=backend)
    finally:
        timer.cancel()
    # the kernel is usable again and still correct
    small = X[:40]
    ref = mapa.log_normalizer(small, bandwidth=0.3, backend="numpy")
    np.testing.assert_allclose(mapa.log_normalizer(small, bandwidth=0.3, backend=backend), ref, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_progress_reports_are_monotone_and_complete(backend):
    X = np.random.default_rng(1).normal(size=(3000, 3))
    seen = []
    mapa.log_normalizer(X, bandwidth=0.5, backend=backend, progress=lambda done, total: seen.append((done, total)))
    assert seen, "no progress report"
    dones = [d for d, _ in seen]
    totals = {t for _, t in seen}
    assert len(totals) == 1 and dones == sorted(dones)
    assert dones[-1] == totals.pop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_exception_in_progress_callback_propagates(backend):
    X = np.random.default_rng(2).normal(size=(3000, 2))

    def boom(done, total):
        raise RuntimeError("stop from callback")

    with pytest.raises(RuntimeError, match="stop from callback"):
        mapa.posterior_targets(X, bandwidth=0.5, backend=backend, progress=boom)
    # still usable
    assert np.isfinite(mapa.log_normalizer(X[:10], bandwidth=0.5, backend=backend)).all()
