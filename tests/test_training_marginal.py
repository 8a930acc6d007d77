"""marginal_log_likelihood against closed forms."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from mapa.training import encoder_proposal, marginal_log_likelihood
from training_reference import linear_decoder


def exact_log_p(X, A, b, sigma):
    """x ~ N(b, A A^T + sigma^2 I) for z ~ N(0, I), x = A z + b + noise."""
    C = A @ A.T + sigma**2 * np.eye(A.shape[0])
    diff = X - b
    _, logdet = np.linalg.slogdet(C)
    maha = np.einsum("nd,de,ne->n", diff, np.linalg.inv(C), diff)
    return -0.5 * (A.shape[0] * math.log(2 * math.pi) + logdet + maha)


@pytest.mark.parametrize("K", [1, 2])
def test_prior_sampling_matches_linear_gaussian_closed_form(K):
    rng = np.random.default_rng(K)
    A = rng.standard_normal((3, K))
    b = rng.standard_normal(3)
    sigma = 0.8
    X = rng.standard_normal((40, K)) @ A.T + b + sigma * rng.standard_normal((40, 3))
    # relative standard error of the prior-sampling estimate ~ 1/sqrt(S * effective fraction)
    est = marginal_log_likelihood(linear_decoder(A, b), sigma, X, latent_dim=K, num_samples=100000, seed=0)
    exact = exact_log_p(X, A, b, sigma)
    assert est.shape == (40,)
    assert np.abs(est - exact).max() < 0.05
    assert abs(est.mean() - exact.mean()) < 0.02


def test_importance_sampling_with_exact_posterior_is_exact():
    # orthogonal columns make the exact posterior diagonal: N(P A^T (x - b) / sigma^2, P),
    # P = (I + A^T A / sigma^2)^{-1}; importance weights are then constant
    rng = np.random.default_rng(3)
    Q, _ = np.linalg.qr(rng.standard_normal((5, 3)))
    A = Q * np.array([1.5, 0.7, 2.0])
    b = rng.standard_normal(5)
    sigma = 0.4
    P = 1.0 / (1.0 + (A * A).sum(0) / sigma**2)

    class ExactPosterior(nn.Module):
        def forward(self, x):
            mu = (x - torch.from_numpy(b)) @ torch.from_numpy(A) * torch.from_numpy(P) / sigma**2
            return mu, torch.log(torch.from_numpy(P)).expand_as(mu)

    X = rng.standard_normal((30, 3)) @ A.T + b + sigma * rng.standard_normal((30, 5))
    est = marginal_log_likelihood(linear_decoder(A, b), sigma, X, latent_dim=3, num_samples=50,
                                  proposal=encoder_proposal(ExactPosterior()))
    np.testing.assert_allclose(est, exact_log_p(X, A, b, sigma), rtol=1e-6)


def test_importance_sampling_with_prior_samples_fallback_is_consistent():
    rng = np.random.default_rng(9)
    A = rng.standard_normal((4, 3)) * 0.5
    b = np.zeros(4)
    X = rng.standard_normal((10, 4))
    est = marginal_log_likelihood(linear_decoder(A, b), 1.0, X, latent_dim=3, num_samples=20000)
    assert np.abs(est - exact_log_p(X, A, b, 1.0)).max() < 0.02


def test_bernoulli_with_constant_logits_is_exact():
    b = np.array([0.3, -1.0, 2.0])
    dec = linear_decoder(np.zeros((3, 2)), b)
    X = (np.random.default_rng(0).random((7, 3)) < 0.5).astype(float)
    p = 1 / (1 + np.exp(-b))
    exact = (X * np.log(p) + (1 - X) * np.log(1 - p)).sum(1)
    est = marginal_log_likelihood(dec, None, X, latent_dim=2, num_samples=100, likelihood="bernoulli")
    np.testing.assert_allclose(est, exact, rtol=1e-12)


def test_deterministic_given_seed_and_accepts_tensors():
    A, b = np.array([[1.0], [0.5]]), np.zeros(2)
    X = np.random.default_rng(1).standard_normal((5, 2))
    one = marginal_log_likelihood(linear_decoder(A, b), 0.3, X, latent_dim=1, num_samples=500, seed=4)
    two = marginal_log_likelihood(linear_decoder(A, b), 0.3, torch.from_numpy(X), latent_dim=1, num_samples=500, seed=4)
    np.testing.assert_array_equal(one, two)


def test_bad_arguments():
    dec = linear_decoder(np.ones((2, 1)), np.zeros(2))
    X = np.zeros((3, 2))
    with pytest.raises(ValueError, match="noise_std"):
        marginal_log_likelihood(dec, -1.0, X, latent_dim=1)
    with pytest.raises(ValueError, match=r"expected \(3, 3\)"):
        marginal_log_likelihood(dec, 1.0, np.zeros((3, 3)), latent_dim=1)
    with pytest.raises(ValueError, match="num_samples"):
        marginal_log_likelihood(dec, 1.0, X, latent_dim=1, num_samples=0)
    with pytest.raises(ValueError, match="likelihood"):
        marginal_log_likelihood(dec, 1.0, X, latent_dim=1, likelihood="poisson")


def test_code_table_proposal_gives_consistent_estimates():
    # a linear-Gaussian model whose code table holds exact posterior means of its training points
    from mapa.training import code_table_proposal

    rng = np.random.default_rng(11)
    K, D, sigma = 3, 4, 0.3
    A = rng.standard_normal((D, K))
    b = rng.standard_normal(D)
    Z = rng.standard_normal((400, K))
    X_train = Z @ A.T + b + sigma * rng.standard_normal((400, D))
    P = np.linalg.inv(np.eye(K) + A.T @ A / sigma**2)
    codes = (X_train - b) @ A @ P / sigma**2
    X = rng.standard_normal((20, K)) @ A.T + b + sigma * rng.standard_normal((20, D))
    proposal = code_table_proposal(codes, X_train, bandwidth=np.sqrt(2) * sigma)
    est = marginal_log_likelihood(linear_decoder(A, b), sigma, X, latent_dim=K, num_samples=3000, proposal=proposal)
    exact = exact_log_p(X, A, b, sigma)
    # a heuristic proposal: typical points are accurate; a point far from every training
    # point can be underestimated (log of an unbiased estimate), never overestimated much
    assert np.median(np.abs(est - exact)) < 0.1
    assert (est < exact + 0.3).all()
    assert est.mean() > exact.mean() - 0.2
