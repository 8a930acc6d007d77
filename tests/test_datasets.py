"""mapa.datasets: determinism, shapes, the true model behind each sample, the exact posterior."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mapa
from mapa import datasets

GROUND_TRUTH = datasets.ground_truth_datasets()
ALL = list(datasets.list_datasets())
SMALL = dict(n_train=300, n_test=50)


def test_registry_lists_required_sets():
    names = datasets.list_datasets()
    assert set(names) >= {"linear", "spiral", "fold", "surface", "curve50", "digits"}
    assert len(GROUND_TRUTH) >= 5 and "digits" not in GROUND_TRUTH
    assert all(isinstance(d, str) and d and "\n" not in d for d in names.values())
    dims = {n: (datasets.dataset_info(n).latent_dim, datasets.dataset_info(n).data_dim) for n in GROUND_TRUTH}
    assert dims["surface"] == (2, 3) and dims["curve50"] == (1, 50) and dims["fold"] == (1, 2)


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_arrays_other_seed_other_arrays(name):
    a = datasets.load(name, seed=3, **SMALL)
    b = datasets.load(name, seed=3, **SMALL)
    c = datasets.load(name, seed=4, **SMALL)
    np.testing.assert_array_equal(a.X_train, b.X_train)
    np.testing.assert_array_equal(a.X_test, b.X_test)
    assert not np.array_equal(a.X_train, c.X_train)
    if a.has_ground_truth:
        np.testing.assert_array_equal(a.Z_train, b.Z_train)
        assert not np.array_equal(a.Z_test, c.Z_test)


@pytest.mark.parametrize("name", ALL)
def test_shapes_and_dtypes(name):
    ds = datasets.load(name, **SMALL)
    info = datasets.dataset_info(name)
    assert ds.X_train.shape == (300, info.data_dim) and ds.X_test.shape == (50, info.data_dim)
    assert ds.X_train.dtype == np.float32 and ds.X_test.dtype == np.float32
    assert ds.latent_dim == info.latent_dim and ds.likelihood in ("gaussian", "bernoulli")
    if ds.has_ground_truth:
        assert ds.Z_train.shape == (300, ds.latent_dim) and ds.Z_test.shape == (50, ds.latent_dim)
        assert ds.noise_std == info.noise_std > 0


@pytest.mark.parametrize("name", GROUND_TRUTH)
def test_samples_are_decoder_plus_noise(name):
    ds = datasets.load(name, n_train=2000, n_test=10, seed=1)
    resid = ds.X_train - datasets.decode(ds.decoder, ds.Z_train)
    assert abs(resid.mean()) < 0.1 * ds.noise_std
    assert resid.std() == pytest.approx(ds.noise_std, rel=0.05)


def test_train_rows_do_not_depend_on_n_train():
    small = datasets.load("spiral", n_train=100, n_test=20)
    big = datasets.load("spiral", n_train=400, n_test=20)
    np.testing.assert_array_equal(small.X_train, big.X_train[:100])
    np.testing.assert_array_equal(small.X_test, big.X_test)


def test_fold_decoder_is_even_so_the_posterior_is_bimodal():
    ds = datasets.load("fold", **SMALL)
    z = torch.linspace(-3, 3, 61, dtype=torch.float64)[:, None]
    torch.testing.assert_close(ds.decoder(z), ds.decoder(-z))
    # the exact posterior of a point with code z0 puts mass near -z0 as well as z0
    i = int(np.argmax(np.abs(ds.Z_train[:, 0]) > 1.0))
    p = np.exp(datasets.exact_log_posterior(ds, rows=[i]))[0]
    same_sign = np.sign(ds.Z_train[:, 0]) == np.sign(ds.Z_train[i, 0])
    assert 0.2 < p[same_sign].sum() < 0.8


def test_true_decoder_is_fixed_across_seeds_and_dtypes():
    a = datasets.load("curve50", seed=0, **SMALL).decoder
    b = datasets.load("curve50", seed=5, **SMALL).decoder
    z = torch.randn(7, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a(z), b(z))
    out32 = a(z.float())
    assert out32.dtype == torch.float32 and out32.shape == (7, 50)
    torch.testing.assert_close(out32.double(), a(z), rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in a.parameters())
    with pytest.raises(ValueError, match=r"codes of shape \(batch, 1\)"):
        a(torch.zeros(3, 2))


def test_linear_decoder_formula():
    ds = datasets.load("linear", **SMALL)
    z = np.array([[-1.0], [0.0], [2.0]])
    np.testing.assert_allclose(datasets.decode(ds.decoder, z), np.column_stack([z[:, 0], z[:, 0] / 2]))


def _numpy_exact_log_posterior(X, F, sigma):
    d2 = ((X[:, None, :].astype(np.float64) - F[None, :, :]) ** 2).sum(-1)
    logits = -d2 / (2 * sigma**2)
    m = logits.max(axis=1, keepdims=True)
    return logits - (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))


@pytest.mark.parametrize("name", ["fold", "surface", "curve50"])
def test_exact_posterior_matches_numpy(name):
    ds = datasets.load(name, n_train=250, n_test=10)
    log_p = datasets.exact_log_posterior(ds)
    assert log_p.shape == (250, 250) and log_p.dtype == np.float64
    np.testing.assert_allclose(np.exp(log_p).sum(axis=1), 1.0, rtol=1e-12)
    F = datasets.decode(ds.decoder, ds.Z_train)
    expected = _numpy_exact_log_posterior(ds.X_train, F, ds.noise_std)
    big = expected > -30  # compare where it matters; tiny entries agree in probability
    np.testing.assert_allclose(log_p[big], expected[big], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np.exp(log_p), np.exp(expected), atol=1e-12)
    rows = [3, 17, 200]
    np.testing.assert_allclose(datasets.exact_log_posterior(ds, rows=rows), log_p[rows], atol=1e-9)
    test_q = datasets.exact_log_posterior(ds, ds.X_test)
    assert test_q.shape == (10, 250)


def test_digits_split_and_range():
    ds = datasets.load("digits")
    assert ds.X_train.shape == (1500, 64) and ds.X_test.shape == (297, 64)
    assert ds.X_train.min() >= 0.0 and ds.X_train.max() <= 1.0 and ds.X_train.max() == 1.0
    assert not ds.has_ground_truth and ds.decoder is None and ds.noise_std is None and ds.Z_train is None
    assert ds.likelihood == "bernoulli"
    # train and test are disjoint rows of the 1797 images
    from sklearn.datasets import load_digits

    full = (load_digits().data / 16.0).astype(np.float32)
    rows = {r.tobytes(): i for i, r in enumerate(full)}
    train_ids = {rows[r.tobytes()] for r in ds.X_train}
    test_ids = {rows[r.tobytes()] for r in ds.X_test}
    assert len(train_ids | test_ids) >= 1780  # a handful of duplicate images exist
    with pytest.raises(ValueError, match="no ground truth"):
        datasets.exact_log_posterior(ds)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="nope"), "unknown dataset 'nope'"),
        (dict(name="spiral", seed=-1), "seed must be a non-negative integer"),
        (dict(name="spiral", seed=1.5), "seed must be a non-negative integer"),
        (dict(name="spiral", n_train=1), "n_train must be an integer >= 2"),
        (dict(name="spiral", n_test=0), "n_test must be an integer >= 1"),
        (dict(name="digits", n_train=1700), "1797 images"),
    ],
)
def test_bad_arguments(kwargs, match):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        datasets.load(name, **kwargs)


def test_lazy_attribute_access():
    assert mapa.datasets is datasets
