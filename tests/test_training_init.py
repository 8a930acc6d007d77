"""MAPA's code initialisation: prior-distributed codes, spectral ordering, the auto rule, lr decay."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import mapa
from mapa import datasets
from mapa.training.methods import Setup, _pca_codes, _spectral_codes, code_roughness, spectral_embedding

INITS = ["prior", "pca", "spectral", "auto"]


def initial_codes(X, code_init, latent_dim=1, noise_std=0.1, seed=0):
    return mapa.fit(X, method="mapa", latent_dim=latent_dim, seed=seed, epochs=0, noise_std=noise_std,
                    code_init=code_init).codes


def setup_for(X, latent_dim=1, seed=0):
    return Setup(np.asarray(X, dtype=np.float64), latent_dim, None, None, torch.Generator().manual_seed(seed),
                 1e-3, 0.1, False)


@pytest.fixture(scope="module")
def linear():
    return datasets.load("linear", n_train=400, seed=0)


@pytest.fixture(scope="module")
def spiral():
    return datasets.load("spiral", n_train=600, seed=0)


@pytest.mark.parametrize("latent_dim", [1, 2])
@pytest.mark.parametrize("code_init", INITS)
def test_codes_are_the_prior_draws(code_init, latent_dim):
    ds = datasets.load("surface", n_train=300, seed=1)
    prior = initial_codes(ds.X_train, "prior", latent_dim)
    codes = initial_codes(ds.X_train, code_init, latent_dim)
    np.testing.assert_array_equal(np.sort(codes, axis=0), np.sort(prior, axis=0))


def test_spectral_orders_a_line_monotonically(linear):
    codes = initial_codes(linear.X_train, "spectral")[:, 0]
    along = linear.X_train @ np.array([1.0, 0.5])  # the line's direction (1, 1/2)
    assert abs(spearmanr(codes, along)[0]) > 0.99
    assert abs(spearmanr(codes, linear.Z_train[:, 0])[0]) > 0.99


def test_spectral_follows_a_spiral_where_pca_does_not(spiral):
    X = spiral.X_train
    true = spiral.Z_train[:, 0]
    assert abs(spearmanr(initial_codes(X, "spectral")[:, 0], true)[0]) > 0.98
    assert abs(spearmanr(initial_codes(X, "pca")[:, 0], true)[0]) < 0.6
    rough_s = code_roughness(X, initial_codes(X, "spectral"))
    rough_p = code_roughness(X, initial_codes(X, "pca"))
    assert rough_s < 0.2 * rough_p
    np.testing.assert_array_equal(initial_codes(X, "auto"), initial_codes(X, "spectral"))


def test_auto_picks_the_smoother_assignment():
    ds = datasets.load("surface", n_train=400, seed=0)  # a sheet: PCA's axes are the latent axes
    X, h = ds.X_train.astype(np.float64), mapa.bandwidth_from_noise(0.1, 3)
    spec = _spectral_codes(setup_for(X, 2), h).double().numpy()
    pca = _pca_codes(setup_for(X, 2)).double().numpy()
    auto = initial_codes(ds.X_train, "auto", 2)
    best = spec if code_roughness(X, spec) < code_roughness(X, pca) else pca
    np.testing.assert_allclose(auto, best, rtol=0, atol=1e-6)


def test_spectral_two_dimensional_scores():
    ds = datasets.load("surface", n_train=400, seed=0)
    scores = spectral_embedding(ds.X_train.astype(np.float64), 0.2, 2)
    assert scores.shape == (400, 2) and np.isfinite(scores).all()


def test_isolated_point_is_placed_by_its_neighbours(linear):
    X = np.vstack([linear.X_train, [[8.0, 4.0]]]).astype(np.float64)  # far out along the line
    scores = spectral_embedding(X, mapa.bandwidth_from_noise(0.1, 2), 1)[:, 0]
    assert np.isfinite(scores).all()
    assert abs(spearmanr(scores[:-1], linear.Z_train[:, 0])[0]) > 0.99
    # the Nystrom extension puts it beyond the end it is nearest to
    end = scores[:-1][np.argmax(linear.X_train[:, 0])]
    assert abs(scores[-1]) >= abs(end)


def test_disconnected_data_falls_back_to_pca():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    X = np.vstack([c + 0.1 * rng.standard_normal((40, 2)) for c in centres])
    assert spectral_embedding(X, 0.14, 1) is None  # no component holds half the points
    np.testing.assert_array_equal(initial_codes(X, "spectral"), initial_codes(X, "pca"))


def test_spectral_tiny_data_falls_back():
    X = np.array([[0.0, 0.0], [0.1, 0.0], [0.2, 0.1]])
    assert spectral_embedding(X, 0.1, 1) is None
    assert initial_codes(X, "spectral").shape == (3, 1)


def test_lr_decay_multiplies_learning_rates_per_epoch():
    from mapa.training.updates import JointUpdate

    p = torch.nn.Parameter(torch.zeros(1))
    rule = JointUpdate(None, None, [{"params": [p], "lr": 0.01}, {"params": [], "lr": 0.002}], lr_decay=0.5)
    for _ in range(3):
        rule.end_epoch(None)
    assert [g["lr"] for g in rule.optimizer.param_groups] == pytest.approx([0.01 / 8, 0.002 / 8])
    constant = JointUpdate(None, None, [{"params": [p], "lr": 0.01}])
    constant.end_epoch(None)
    assert constant.optimizer.param_groups[0]["lr"] == 0.01


def test_mapa_defaults_keep_the_budget():
    from mapa.cli import DEMO_EPOCHS
    from mapa.training import METHODS

    spec = METHODS["mapa"]
    assert spec.options["code_init"][0] == "auto" and spec.options["lr_decay"][0] == 0.95
    assert 5 * DEMO_EPOCHS["mapa"] <= DEMO_EPOCHS["vae"]
    assert 5 * DEMO_EPOCHS["mapa"] <= METHODS["iwae"].options["num_samples"][0] * DEMO_EPOCHS["iwae"]
