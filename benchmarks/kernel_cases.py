"""Shared pieces of the kernel benchmarks: data, the calls being timed, skip rules.

Used by ``bench_kernel.py`` (pytest-benchmark), ``run_kernel_bench.py`` (the
results table) and ``bench_memory.py`` (peak memory), so that all three time
exactly the same thing.

What is compared, for references X = queries Y of shape (N, D), float32:

* the mapa kernel, per backend (``cpp``, ``numba``, ``numpy``), for each of
  ``log_normalizer``, ``log_posterior_topk`` (k = 64), ``posterior_targets``
  and ``log_posterior`` (dense);
* what a user would write instead with torch (``torch`` below): the dense
  matrix ``-torch.cdist(Y, X)**2 / (2 h^2)`` followed by the reduction that
  gives the same output (logsumexp, log_softmax + topk, softmax + column sums,
  log_softmax);
* ``torch dense+log_softmax``, the common yardstick of every speed-up ratio:
  ``torch.log_softmax(-torch.cdist(Y, X)**2 / (2*h*h), dim=1)``.

torch is imported lazily so that the memory child processes stay light.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np

import mapa
from mapa._validation import available_memory_bytes

FUNCTIONS = ("log_normalizer", "log_posterior_topk", "posterior_targets", "log_posterior")
# short names used in pytest ids: each is a unique substring for -k
SHORT = {
    "log_normalizer": "normalizer",
    "log_posterior_topk": "topk",
    "posterior_targets": "targets",
    "log_posterior": "dense",
}
BACKENDS = ("cpp", "numba", "numpy")
TORCH = "torch"
TORCH_DENSE = "torch dense+log_softmax"

SIZES = (2000, 8000, 20000)
DIMS = (2, 16, 256)
K = 64
NUM_THREADS = 2
NOISE_STD = 0.1
LATENT_DIM = 2

NUMPY_MAX_SECONDS = 30.0  # skip NumPy reference cases estimated slower than this
DENSE_MAX_BYTES = 4 << 30  # skip dense cases whose (M, N) output exceeds this
_NUMPY_CALIBRATION_N = 1000


# ---------------------------------------------------------------- data


def make_data(N: int, D: int, seed: int = 0) -> tuple[np.ndarray, float]:
    """Noisy points on a smooth 2-D manifold in D dimensions, float32, and a bandwidth.

    x = tanh(z A + b) + sigma * noise, z ~ N(0, I_2), sigma = 0.1; h is
    ``mapa.bandwidth_from_noise(sigma, D)``. The same (N, D, seed) always gives
    the same data.
    """
    rng = np.random.default_rng([seed, N, D])
    z = rng.standard_normal((N, LATENT_DIM))
    A = rng.standard_normal((LATENT_DIM, D))
    b = rng.uniform(-0.5, 0.5, size=D)
    X = np.tanh(z @ A + b) + NOISE_STD * rng.standard_normal((N, D))
    return np.ascontiguousarray(X, dtype=np.float32), mapa.bandwidth_from_noise(NOISE_STD, D)


def pairs(N: int) -> int:
    """Number of (query, reference) pairs with queries = X."""
    return N * N


def dense_bytes(N: int, itemsize: int = 4) -> int:
    return N * N * itemsize




# ---------------------------------------------------------------- calls


def mapa_call(function: str, backend: str, X: np.ndarray, h: float, num_threads: int = NUM_THREADS) -> Callable:
    """A no-argument callable running one mapa kernel function on X (queries = X)."""
    kw = dict(bandwidth=h, backend=backend, num_threads=num_threads)
    if function == "log_normalizer":
        return lambda: mapa.log_normalizer(X, **kw)
    if function == "log_posterior_topk":
        return lambda: mapa.log_posterior_topk(X, k=K, **kw)
    if function == "posterior_targets":
        return lambda: mapa.posterior_targets(X, **kw)
    if function == "log_posterior":
        return lambda: mapa.log_posterior(X, **kw)
    raise ValueError(f"unknown function {function!r}")


def _torch():
    import torch

    return torch


def torch_dense_call(Xt, h: float) -> Callable:
    """The yardstick: ``torch.log_softmax(-torch.cdist(Y, X)**2 / (2*h*h), dim=1)``."""
    torch = _torch()

    def run():
        with torch.no_grad():
            return torch.log_softmax(-torch.cdist(Xt, Xt) ** 2 / (2 * h * h), dim=1)

    return run


def torch_call(function: str, Xt, h: float) -> Callable:
    """What a torch user would write to get the same output as ``function``."""
    torch = _torch()
    c = 2 * h * h

    if function == "log_normalizer":

        def run():
            with torch.no_grad():
                return torch.logsumexp(-torch.cdist(Xt, Xt) ** 2 / c, dim=1)

    elif function == "log_posterior_topk":

        def run():
            with torch.no_grad():
                return torch.log_softmax(-torch.cdist(Xt, Xt) ** 2 / c, dim=1).topk(K, dim=1)

    elif function == "posterior_targets":

        def run():
            with torch.no_grad():
                q = torch.softmax(-torch.cdist(Xt, Xt) ** 2 / c, dim=1)  # q[n, i]
                W = q.sum(dim=0)
                means = (q.T @ Xt) / W[:, None]
                s = q.T @ (Xt * Xt).sum(dim=1)
                return W, means, s

    elif function == "log_posterior":
        return torch_dense_call(Xt, h)
    else:
        raise ValueError(f"unknown function {function!r}")
    return run


def torch_tensor(X: np.ndarray):
    return _torch().from_numpy(X)


def set_torch_threads(n: int = NUM_THREADS) -> int:
    """Set torch's intra-op threads; returns the previous value."""
    torch = _torch()
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    return prev


# ---------------------------------------------------------------- skip rules

_numpy_cost: dict[tuple[str, int], float] = {}


def estimate_numpy_seconds(function: str, N: int, D: int) -> float:
    """Estimated time of the NumPy reference on (N, D), from a timed run at N = 1000.

    The reference is quadratic in N (top-k sorts each row: one more log N
    factor). The calibration is cached per (function, D) for the process.
    """
    key = (function, D)
    n0 = _NUMPY_CALIBRATION_N
    if key not in _numpy_cost:
        X, h = make_data(n0, D, seed=1)
        call = mapa_call(function, "numpy", X, h)
        t0 = time.perf_counter()
        call()
        _numpy_cost[key] = time.perf_counter() - t0
    scale = (N / n0) ** 2
    if function == "log_posterior_topk":
        scale *= math.log(max(N, 2)) / math.log(n0)
    return _numpy_cost[key] * scale


def skip_reason(
    function: str,
    impl: str,
    N: int,
    D: int,
    *,
    numpy_max_seconds: float = NUMPY_MAX_SECONDS,
    dense_max_bytes: int = DENSE_MAX_BYTES,
) -> str | None:
    """Why a case is not run, or None. ``impl`` is a backend name, TORCH or TORCH_DENSE."""
    if impl in BACKENDS and impl not in mapa.available_backends():
        return f"backend {impl!r} is not available here (mapa.available_backends() = {mapa.available_backends()})"
    dense_output = impl in (TORCH, TORCH_DENSE) or function == "log_posterior"
    if dense_output:
        need = dense_bytes(N)
        if need > dense_max_bytes:
            return (
                f"dense ({N}, {N}) float32 matrix is {need / 2**30:.1f} GiB, "
                f"over the {dense_max_bytes / 2**30:.1f} GiB limit"
            )
        # torch holds about three (N, N) temporaries at once; mapa's dense call one
        peak = need * (3 if impl in (TORCH, TORCH_DENSE) else 1)
        if peak > 0.8 * available_memory_bytes():
            return f"needs about {peak / 2**30:.1f} GiB, more than 80% of the available memory"
    if impl == "numpy":
        est = estimate_numpy_seconds(function, N, D)
        if est > numpy_max_seconds:
            return f"NumPy reference estimated at {est:.0f} s per call, over the {numpy_max_seconds:.0f} s limit"
    return None
