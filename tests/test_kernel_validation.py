"""Wrong usage: every mistake is a ValueError/TypeError naming the argument, raised before any work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mapa
import mapa._kernel
from kernel_reference import ALL_BACKEND_NAMES, BACKENDS

FUNCS = ["log_normalizer", "log_posterior", "log_posterior_topk", "posterior_targets"]
QUERY_FUNCS = ["log_normalizer", "log_posterior", "log_posterior_topk"]  # accept queries

X_OK = np.random.default_rng(0).standard_normal((6, 3))


def call(name, X, queries=None, **kw):
    """Call kernel function ``name`` with sensible defaults for what the test leaves out."""
    kw.setdefault("bandwidth", 1.0)
    if name == "log_posterior_topk":
        kw.setdefault("k", 2)
    if queries is not None:
        kw["queries"] = queries
    return getattr(mapa, name)(X, **kw)


@pytest.fixture
def no_backend_calls(monkeypatch):
    """Fail the test if a backend is ever reached: errors must come before heavy work."""

    def refuse(*args, **kwargs):
        pytest.fail("the backend was called although the arguments were invalid")

    monkeypatch.setattr(mapa._kernel, "get_backend", refuse)


# ------------------------------------------------------------------ arrays


def _with(value, row=2, col=1):
    X = X_OK.copy()
    X[row, col] = value
    return X


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_X(name, bad, no_backend_calls):
    with pytest.raises(ValueError, match=r"X contains NaN or inf \(first at row 2, column 1\)"):
        call(name, _with(bad))


@pytest.mark.parametrize("name", QUERY_FUNCS)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_queries(name, bad, no_backend_calls):
    Y = X_OK[:4].copy()
    Y[3, 0] = bad
    with pytest.raises(ValueError, match=r"queries contains NaN or inf"):
        call(name, X_OK, Y)


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize(
    "X, pattern",
    [
        (np.arange(5.0), r"X must be 2-D .*ndim=1.*reshape\(-1, 1\)"),
        (np.zeros((2, 3, 4)), r"X must be 2-D .*ndim=3"),
        (np.float64(1.0), r"X must be 2-D .*ndim=0"),
    ],
    ids=["1d", "3d", "0d"],
)
def test_wrong_ndim_X(name, X, pattern, no_backend_calls):
    with pytest.raises(ValueError, match=pattern):
        call(name, X)


@pytest.mark.parametrize("name", QUERY_FUNCS)
def test_wrong_ndim_queries(name, no_backend_calls):
    with pytest.raises(ValueError, match=r"queries must be 2-D"):
        call(name, X_OK, X_OK[0])


@pytest.mark.parametrize("name", QUERY_FUNCS)
def test_mismatched_features(name, no_backend_calls):
    with pytest.raises(ValueError, match=r"queries has 2 features but X has 3"):
        call(name, X_OK, np.zeros((4, 2)))


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (0, 0)])
def test_empty_X(name, shape, no_backend_calls):
    with pytest.raises(ValueError, match=r"X is empty"):
        call(name, np.zeros(shape))


@pytest.mark.parametrize("name", QUERY_FUNCS)
def test_empty_queries(name, no_backend_calls):
    with pytest.raises(ValueError, match=r"queries is empty"):
        call(name, X_OK, np.zeros((0, 3)))


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize(
    "X, pattern",
    [
        (X_OK.astype(np.complex128), r"X has dtype complex128"),
        (X_OK.astype(object), r"X has dtype object"),
        (np.array([["a", "b"], ["c", "d"]]), r"X has dtype <U1"),
        (torch.zeros((3, 2), dtype=torch.complex64), r"X has complex dtype"),
    ],
    ids=["complex", "object", "str", "torch-complex"],
)
def test_refused_dtypes(name, X, pattern, no_backend_calls):
    with pytest.raises(TypeError, match=pattern):
        call(name, X)


@pytest.mark.parametrize("name", QUERY_FUNCS)
def test_refused_dtype_queries(name, no_backend_calls):
    with pytest.raises(TypeError, match=r"queries has dtype complex"):
        call(name, X_OK, X_OK.astype(np.complex64))


@pytest.mark.parametrize("name", FUNCS)
def test_X_none_or_ragged(name, no_backend_calls):
    with pytest.raises(TypeError, match=r"X is None"):
        call(name, None)
    with pytest.raises(TypeError, match=r"X could not be converted"):
        call(name, [[1.0, 2.0], [3.0]])


@pytest.mark.parametrize("name", FUNCS)
def test_torch_tensor_on_other_device(name, no_backend_calls):
    # No GPU here; the "meta" device exists everywhere and is just as non-CPU.
    X = torch.empty((4, 2), device="meta")
    with pytest.raises(TypeError, match=r"X is a torch tensor on device meta.*\.cpu\(\)"):
        call(name, X)


# ------------------------------------------------------------------ bandwidth


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("h", [0.0, -1.0, np.nan, np.inf, -np.inf, 1e-200, 1e200])
def test_bad_bandwidth_value(name, h, no_backend_calls):
    with pytest.raises(ValueError, match=r"bandwidth"):
        call(name, X_OK, bandwidth=h)


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("h", [None, [1.0], True, 1 + 1j, b"nn"], ids=["None", "list", "bool", "complex", "bytes"])
def test_bad_bandwidth_type(name, h, no_backend_calls):
    with pytest.raises(TypeError, match=r"bandwidth"):
        call(name, X_OK, bandwidth=h)


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("rule", ["silverman", "NN", "", "1.0"])
def test_unknown_bandwidth_rule(name, rule, no_backend_calls):
    with pytest.raises(ValueError, match=r"bandwidth=.* is not a known rule.*'nn'.*'scott'"):
        call(name, X_OK, bandwidth=rule)


def test_bandwidth_is_keyword_only():
    with pytest.raises(TypeError):
        mapa.log_normalizer(X_OK, None, 1.0)  # bandwidth given positionally


# ------------------------------------------------------------------ exclude_self


@pytest.mark.parametrize("name", FUNCS)
def test_exclude_self_needs_two_points(name, no_backend_calls):
    kw = {"k": 1} if name == "log_posterior_topk" else {}
    with pytest.raises(ValueError, match=r"exclude_self=True needs at least 2 points"):
        call(name, X_OK[:1], exclude_self=True, **kw)


@pytest.mark.parametrize("name", QUERY_FUNCS)
def test_exclude_self_with_queries(name, no_backend_calls):
    with pytest.raises(ValueError, match=r"exclude_self=True only applies when queries is None"):
        call(name, X_OK, X_OK, exclude_self=True)


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("value", [1, "yes", None])
def test_exclude_self_type(name, value, no_backend_calls):
    with pytest.raises(TypeError, match=r"exclude_self must be True or False"):
        call(name, X_OK, exclude_self=value)


def test_posterior_targets_takes_no_queries():
    with pytest.raises(TypeError):
        mapa.posterior_targets(X_OK, X_OK, bandwidth=1.0)


# ------------------------------------------------------------------ k


@pytest.mark.parametrize("k", [0, -1, 7])
def test_k_out_of_range(k, no_backend_calls):
    with pytest.raises(ValueError, match=rf"k must satisfy 1 <= k <= 6, got k={k}"):
        mapa.log_posterior_topk(X_OK, bandwidth=1.0, k=k)


def test_k_limit_with_exclude_self(no_backend_calls):
    with pytest.raises(ValueError, match=r"k must satisfy 1 <= k <= 5 \(exclude_self=True"):
        mapa.log_posterior_topk(X_OK, bandwidth=1.0, k=6, exclude_self=True)


def test_k_limit_with_queries_is_n_refs(no_backend_calls):
    # k counts references (columns), not queries
    with pytest.raises(ValueError, match=r"k must satisfy 1 <= k <= 6"):
        mapa.log_posterior_topk(X_OK, np.zeros((20, 3)), bandwidth=1.0, k=7)


@pytest.mark.parametrize("k", [2.0, "2", None, True, np.float64(2)])
def test_k_type(k, no_backend_calls):
    with pytest.raises(TypeError, match=r"k must be a positive integer"):
        mapa.log_posterior_topk(X_OK, bandwidth=1.0, k=k)


def test_k_is_required():
    with pytest.raises(TypeError, match=r"k"):
        mapa.log_posterior_topk(X_OK, bandwidth=1.0)


# ------------------------------------------------------------------ backend, threads, blocks, progress


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("backend", ["fortran", "NumPy", "", "cuda"])
def test_unknown_backend(name, backend):
    with pytest.raises(ValueError, match=r"backend=.* is not a backend"):
        call(name, X_OK, backend=backend)


@pytest.mark.parametrize("name", FUNCS)
def test_backend_type(name):
    with pytest.raises(TypeError, match=r"backend must be a string"):
        call(name, X_OK, backend=1)


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("backend", [b for b in ALL_BACKEND_NAMES if b not in BACKENDS] or ["(all available)"])
def test_unavailable_backend(name, backend):
    if backend not in ALL_BACKEND_NAMES:
        pytest.skip("every backend loads on this machine")
    with pytest.raises(ValueError, match=rf"backend='{backend}' is not available on this machine"):
        call(name, X_OK, backend=backend)


@pytest.mark.parametrize("name", FUNCS)
def test_num_threads_zero(name, no_backend_calls):
    with pytest.raises(ValueError, match=r"num_threads=0 is not valid"):
        call(name, X_OK, num_threads=0)


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("n", [1.5, 2.0, "2", True])
def test_num_threads_type(name, n, no_backend_calls):
    with pytest.raises(TypeError, match=r"num_threads must be an integer or None"):
        call(name, X_OK, num_threads=n)


def test_num_threads_too_negative(no_backend_calls):
    from mapa._validation import resolve_num_threads

    cores = resolve_num_threads(None)
    with pytest.raises(ValueError, match=rf"num_threads={-(cores + 1)} leaves no thread"):
        mapa.log_normalizer(X_OK, bandwidth=1.0, num_threads=-(cores + 1))


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("bs", [0, -4, 2**20 + 1])
def test_block_size_range(name, bs, no_backend_calls):
    with pytest.raises(ValueError, match=r"block_size must be between 1 and"):
        call(name, X_OK, block_size=bs)


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("bs", [8.0, "8", True])
def test_block_size_type(name, bs, no_backend_calls):
    with pytest.raises(TypeError, match=r"block_size must be a positive integer or None"):
        call(name, X_OK, block_size=bs)


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("progress", ["yes", 1, [1]])
def test_progress_type(name, progress):
    with pytest.raises(TypeError, match=r"progress must be None, True/False or a callable"):
        call(name, X_OK, progress=progress)


# ------------------------------------------------------------------ memory


def test_dense_output_over_max_bytes(no_backend_calls):
    # (6, 6) float64 needs 288 bytes
    with pytest.raises(ValueError, match=r"log_posterior would allocate .*\(6, 6\) output.*max_bytes.*log_posterior_topk"):
        mapa.log_posterior(X_OK, bandwidth=1.0, max_bytes=287)


def test_dense_output_at_max_bytes_is_fine():
    assert mapa.log_posterior(X_OK, bandwidth=1.0, max_bytes=288).shape == (6, 6)


def test_dense_output_float32_counts_four_bytes(no_backend_calls):
    with pytest.raises(ValueError, match=r"log_posterior would allocate"):
        mapa.log_posterior(X_OK.astype(np.float32), bandwidth=1.0, max_bytes=143)


def _huge(n, d=1):
    # A read-only view of n identical rows: no memory behind it.
    return np.broadcast_to(np.zeros((1, d)), (n, d))


@pytest.mark.parametrize("queries", [False, True])
def test_dense_output_too_large_for_memory(queries, no_backend_calls):
    # (2^20, 2^20) float64 = 8 TiB: refused from the shapes alone, without
    # reaching the backend and without allocating anything large.
    X = _huge(1 << 20)
    Y = _huge(1 << 20) if queries else None
    with pytest.raises(ValueError, match=r"log_posterior would allocate 8192\.00 GiB"):
        mapa.log_posterior(X, Y, bandwidth=1.0)


def test_dense_size_check_before_bandwidth_rule(monkeypatch, no_backend_calls):
    # The size of the dense output is known from the shapes; a data-driven
    # bandwidth rule costs O(min(N, 2000) * N * D) and should not run first.
    import mapa.bandwidth

    def refuse(*args, **kwargs):
        pytest.fail("the bandwidth rule ran before the dense output size was checked")

    monkeypatch.setattr(mapa.bandwidth, "select_bandwidth", refuse)
    with pytest.raises(ValueError, match=r"log_posterior would allocate"):
        mapa.log_posterior(_huge(1 << 20), bandwidth="nn")


def test_topk_output_too_large(monkeypatch, no_backend_calls):
    monkeypatch.setattr(mapa._kernel, "available_memory_bytes", lambda: 2 * 6 * 3 * 16 - 2)
    with pytest.raises(ValueError, match=r"log_posterior_topk with k=3 would allocate"):
        mapa.log_posterior_topk(X_OK, bandwidth=1.0, k=3)


# ------------------------------------------------------------------ nothing is modified


@pytest.mark.parametrize("name", FUNCS)
def test_inputs_not_modified(name):
    X = np.random.default_rng(1).standard_normal((8, 2)) + 5.0
    X_before = X.copy()
    call(name, X, exclude_self=True)
    np.testing.assert_array_equal(X, X_before)
    if name != "posterior_targets":
        Y = X[:3] * 2.0
        Y_before = Y.copy()
        call(name, X, Y)
        np.testing.assert_array_equal(Y, Y_before)
