"""pytest-benchmark suite for the MAPA kernel against what a torch user would write.

For every (function, implementation, N, D) with queries = X (float32 data on
a 2-D manifold, h = mapa.bandwidth_from_noise(0.1, D), k = 64, 2 threads):

* functions: ``normalizer`` (log_normalizer), ``topk`` (log_posterior_topk),
  ``targets`` (posterior_targets), ``dense`` (log_posterior);
* implementations: the mapa backends ``cpp``, ``numba``, ``numpy`` (the
  reference), and ``torch``: ``-torch.cdist(Y, X)**2 / (2 h^2)`` followed by
  the reduction giving the same output (logsumexp / log_softmax + topk /
  softmax + column sums / log_softmax);
* N in {2000, 8000, 20000}, D in {2, 16, 256}.

Each group in the report ("<function> N=.. D=..") puts all implementations of
one case side by side. Skipped, with the reason: backends that are not
available, NumPy cases estimated over 30 s, dense cases over 4 GiB.

Run (the whole suite takes a while; see benchmarks/README or the -k examples)::

    cd /work/main
    PYTHONPATH=python python -m pytest benchmarks/bench_kernel.py --benchmark-only
    # a subset, e.g. the top-k cases at N = 2000, cpp against torch:
    PYTHONPATH=python python -m pytest benchmarks/bench_kernel.py --benchmark-only \
        -k "topk and N2000- and (cpp or torch)"

Test ids look like ``test_kernel[topk-cpp-N2000-D16]``. ``-k`` matches
substrings, so write ``N2000-`` (``N2000`` alone also matches N20000) and
``D2]`` (``D2`` alone also matches D256), e.g.
``-k "N2000- and (D2] or D16])"``.
"""

from __future__ import annotations

import gc

import pytest

import kernel_cases as kc

pytest.importorskip("pytest_benchmark")
torch = pytest.importorskip("torch")

IMPLS = (*kc.BACKENDS, kc.TORCH)

CASES = [
    pytest.param(function, impl, N, D, id=f"{kc.SHORT[function]}-{impl}-N{N}-D{D}")
    for N in kc.SIZES
    for D in kc.DIMS
    for function in kc.FUNCTIONS
    for impl in IMPLS
]


@pytest.fixture(scope="module", autouse=True)
def _two_threads():
    prev = kc.set_torch_threads(kc.NUM_THREADS)
    yield
    torch.set_num_threads(prev)


_data_cache: dict = {}


def _data(N, D):
    if (N, D) not in _data_cache:
        _data_cache.clear()  # keep one data set at a time
        _data_cache[(N, D)] = kc.make_data(N, D)
    return _data_cache[(N, D)]


@pytest.mark.parametrize("function, impl, N, D", CASES)
def test_kernel(benchmark, request, function, impl, N, D):
    opt = request.config.getoption
    numpy_max = opt("--numpy-max-seconds", default=kc.NUMPY_MAX_SECONDS)
    dense_max = int(opt("--dense-max-gb", default=kc.DENSE_MAX_BYTES / 2**30) * 2**30)
    rounds = max(1, int(opt("--kernel-rounds", default=3)))

    reason = kc.skip_reason(function, impl, N, D, numpy_max_seconds=numpy_max, dense_max_bytes=dense_max)
    if reason:
        pytest.skip(f"{function} {impl} N={N} D={D}: {reason}")

    X, h = _data(N, D)
    if impl == kc.TORCH:
        call = kc.torch_call(function, kc.torch_tensor(X), h)
    else:
        call = kc.mapa_call(function, impl, X, h)

    warmup = 1  # also triggers numba compilation
    if impl == "numpy":
        # the reference compiles nothing: no warm-up, and fewer rounds when slow
        warmup = 0
        est = kc.estimate_numpy_seconds(function, N, D)
        rounds = max(1, min(rounds, int(numpy_max // max(est, 1e-9))))

    benchmark.group = f"{function} N={N} D={D}"
    benchmark.extra_info.update(
        function=function, impl=impl, N=N, D=D, k=kc.K, threads=kc.NUM_THREADS, pairs=kc.pairs(N)
    )
    gc.collect()
    with torch.no_grad():
        benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=warmup)
    if benchmark.stats is not None:
        median = benchmark.stats.stats.median
        benchmark.extra_info["gpairs_per_s"] = kc.pairs(N) / median / 1e9
