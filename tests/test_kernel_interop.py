"""Array kinds and dtypes in and out: NumPy, torch, integers, float16, mixed inputs; progress."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mapa
from kernel_reference import BACKENDS, DTYPES, make_data, ref_log_posterior, to_numpy, tol

H = 0.8
TORCH_OF = {np.float32: torch.float32, np.float64: torch.float64}


def run_all(X, queries=None, backend="numpy", exclude_self=False, **kw):
    """All four outputs as a flat dict of name -> array/tensor."""
    out = {
        "lnorm": mapa.log_normalizer(X, queries, bandwidth=H, exclude_self=exclude_self, backend=backend, **kw),
        "dense": mapa.log_posterior(X, queries, bandwidth=H, exclude_self=exclude_self, backend=backend, **kw),
    }
    top = mapa.log_posterior_topk(X, queries, bandwidth=H, k=3, exclude_self=exclude_self, backend=backend, **kw)
    out.update(top_idx=top.indices, top_logp=top.log_prob, top_lnorm=top.log_norm, top_kept=top.kept_mass)
    if queries is None:
        tg = mapa.posterior_targets(X, bandwidth=H, exclude_self=exclude_self, backend=backend, **kw)
        out.update(W=tg.weights, means=tg.means, s=tg.sq_norms)
    return out


def assert_kind_and_dtype(out, kind, dtype):
    for name, value in out.items():
        assert isinstance(value, kind), (name, type(value))
        expected = np.int64 if name == "top_idx" else dtype
        if kind is np.ndarray:
            assert value.dtype == np.dtype(expected), (name, value.dtype)
        else:
            assert value.dtype == {np.int64: torch.int64, **TORCH_OF}[expected], (name, value.dtype)
            assert value.device.type == "cpu" and not value.requires_grad


def assert_same_values(a, b, dtype):
    for name in a:
        np.testing.assert_allclose(to_numpy(a[name]), to_numpy(b[name]), rtol=tol(dtype)["logq_rtol"], err_msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_in_numpy_out_dtype_kept(backend, dtype):
    X = make_data(12, 3, dtype=dtype)
    assert_kind_and_dtype(run_all(X, backend=backend), np.ndarray, dtype)
    assert_kind_and_dtype(run_all(X, X[:4] + 0.1, backend=backend), np.ndarray, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_in_torch_out_dtype_kept(backend, dtype):
    X = make_data(12, 3, dtype=dtype)
    T = torch.from_numpy(X)
    out_t = run_all(T, backend=backend)
    assert_kind_and_dtype(out_t, torch.Tensor, dtype)
    assert_same_values(out_t, run_all(X, backend=backend), dtype)
    out_t = run_all(T, T[:4] + 0.1, backend=backend)
    assert_kind_and_dtype(out_t, torch.Tensor, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_requires_grad_is_detached(backend):
    X = make_data(10, 2)
    T = torch.tensor(X, requires_grad=True)
    out = run_all(T, T[:3] * 1.0, backend=backend)  # queries carry a grad_fn
    assert_kind_and_dtype(out, torch.Tensor, np.float64)
    assert_same_values(out, run_all(X, X[:3], backend=backend), np.float64)
    tg = mapa.posterior_targets(T, bandwidth=H, backend=backend)
    assert not tg.means.requires_grad
    assert T.grad is None


def test_mixed_torch_and_numpy_give_torch():
    X = make_data(10, 2)
    out = run_all(torch.from_numpy(X), X[:3])
    assert_kind_and_dtype(out, torch.Tensor, np.float64)
    out = run_all(X, torch.from_numpy(X[:3]))
    assert_kind_and_dtype(out, torch.Tensor, np.float64)


def test_torch_non_contiguous_and_int_tensors():
    X = make_data(10, 4)
    T = torch.from_numpy(X).t().contiguous().t()  # column-major view
    assert not T.is_contiguous()
    np.testing.assert_allclose(
        mapa.log_posterior(T, bandwidth=H).numpy(), mapa.log_posterior(X, bandwidth=H), rtol=1e-12
    )
    Xi = np.arange(12).reshape(6, 2) % 5
    out = mapa.log_posterior(torch.from_numpy(Xi), bandwidth=H)
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), ref_log_posterior(Xi, Xi, H), atol=1e-12)
    out = mapa.log_normalizer(torch.from_numpy(X.astype(np.float16)), bandwidth=H)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, bool])
def test_integer_and_bool_inputs_become_float64(dtype):
    Xi = (np.arange(16).reshape(8, 2) % 3).astype(dtype)
    out = run_all(Xi)
    assert_kind_and_dtype(out, np.ndarray, np.float64)
    np.testing.assert_allclose(out["dense"], ref_log_posterior(Xi, Xi, H), atol=1e-12)


def test_float16_computes_in_float32():
    X = make_data(8, 2, dtype=np.float16)
    out = run_all(X)
    assert_kind_and_dtype(out, np.ndarray, np.float32)


def test_mixed_precision_promotes_to_float64():
    X = make_data(9, 2, dtype=np.float32)
    Y = make_data(4, 2, dtype=np.float64, seed=3)
    for value in (mapa.log_normalizer(X, Y, bandwidth=H), mapa.log_posterior(X, Y, bandwidth=H)):
        assert value.dtype == np.float64
    top = mapa.log_posterior_topk(X, Y, bandwidth=H, k=2)
    assert top.log_prob.dtype == np.float64 and top.indices.dtype == np.int64
    np.testing.assert_allclose(mapa.log_posterior(X, Y, bandwidth=H), ref_log_posterior(X, Y, H), atol=1e-12)


def test_lists_and_layouts():
    X = make_data(10, 6)
    expected = mapa.log_posterior(X, bandwidth=H)
    np.testing.assert_allclose(mapa.log_posterior(X.tolist(), bandwidth=H), expected, rtol=1e-12)
    np.testing.assert_allclose(mapa.log_posterior(np.asfortranarray(X), bandwidth=H), expected, rtol=1e-12)
    wide = np.repeat(X, 2, axis=1)
    np.testing.assert_allclose(mapa.log_posterior(wide[:, ::2], bandwidth=H), expected, rtol=1e-12)
    np.testing.assert_allclose(
        mapa.log_posterior(X[::-1], bandwidth=H), expected[::-1, ::-1], rtol=1e-12, atol=1e-12
    )


def test_result_objects_unpack():
    X = make_data(10, 2)
    idx, logp, lnorm, kept = mapa.log_posterior_topk(X, bandwidth=H, k=2)
    assert idx.shape == (10, 2) and lnorm.shape == (10,)
    W, means, s = mapa.posterior_targets(X, bandwidth=H)
    assert W.shape == (10,) and means.shape == (10, 2) and s.shape == (10,)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["log_normalizer", "log_posterior", "log_posterior_topk", "posterior_targets"])
def test_progress_callable(backend, name):
    X = make_data(50, 2)
    calls = []
    kw = {"k": 2} if name == "log_posterior_topk" else {}
    getattr(mapa, name)(X, bandwidth=H, backend=backend, block_size=7, progress=lambda d, t: calls.append((d, t)), **kw)
    assert calls, "progress callback never called"
    done = [d for d, _ in calls]
    totals = {t for _, t in calls}
    assert len(totals) == 1
    total = totals.pop()
    assert done == sorted(done) and 0 <= done[0] and done[-1] == total > 0


@pytest.mark.parametrize("progress", [True, False, None])
def test_progress_bar_flags(progress, capsys):
    X = make_data(20, 2)
    expected = mapa.log_normalizer(X, bandwidth=H)
    np.testing.assert_array_equal(mapa.log_normalizer(X, bandwidth=H, progress=progress), expected)
