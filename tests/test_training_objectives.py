"""Objectives against hand computations: MAPA (targets, top-k, dense), ELBO, IWAE."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import mapa
from mapa.training.models import (
    BernoulliLikelihood,
    CodeTableModel,
    EncoderDecoderModel,
    GaussianEncoder,
    GaussianLikelihood,
)
from mapa.training.objectives import (
    ElboObjective,
    IwaeObjective,
    MapaTargetsObjective,
    MapaTopKObjective,
    gaussian_kl_to_prior,
    mutual_information,
)
from training_reference import linear_decoder

X3 = np.array([[0.3, -1.0], [1.2, 0.4], [-0.7, 0.9]])
CODES3 = np.array([[0.5], [-1.5], [0.2]])
A = np.array([[1.5], [-0.5]])
B = np.array([0.1, 0.2])
SIGMA = 0.7
H = 0.9


def code_model(decoder, codes, likelihood):
    return CodeTableModel(decoder, likelihood, torch.tensor(codes, dtype=torch.float64))


def hand_objective(X, codes, sigma, h):
    """sum_i sum_n q(i|n) log N(x_n; A z_i + b, sigma^2 I) + sum_i log N(z_i; 0, 1), in numpy."""
    d2 = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)  # (n, i)
    logits = -d2 / (2 * h * h)
    q = np.exp(logits - logits.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    F = codes @ A.T + B
    D = X.shape[1]
    total = 0.0
    for n in range(len(X)):
        for i in range(len(X)):
            r2 = ((X[n] - F[i]) ** 2).sum()
            total += q[n, i] * (-0.5 * D * math.log(2 * math.pi * sigma**2) - r2 / (2 * sigma**2))
    total += (-0.5 * codes**2 - 0.5 * math.log(2 * math.pi)).sum()
    return total


def test_mapa_targets_objective_matches_hand_computation():
    W, m, s = mapa.posterior_targets(X3, bandwidth=H)
    objective = MapaTargetsObjective(W, m, s, dtype=torch.float64)
    model = code_model(linear_decoder(A, B), CODES3, GaussianLikelihood(SIGMA, learn=True).double())
    got = objective.total(model).item()
    # s_i - W_i ||m_i||^2 cancels a little: agreement to ~1e-9 relative
    assert got == pytest.approx(hand_objective(X3, CODES3, SIGMA, H), rel=1e-8)


def test_sufficient_statistics_equal_topk_and_dense_double_sum():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((12, 3))
    codes = rng.standard_normal((12, 2))
    h = 0.8
    torch.manual_seed(0)
    decoder = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    lik = GaussianLikelihood(0.4, learn=True).double()
    model = code_model(decoder, codes, lik)

    W, m, s = mapa.posterior_targets(X, bandwidth=h)
    stats = MapaTargetsObjective(W, m, s, dtype=torch.float64).total(model).item()
    top = mapa.log_posterior_topk(X, bandwidth=h, k=12)
    topk = MapaTopKObjective(X, top.indices, top.log_prob, dtype=torch.float64).total(model).item()

    logq = torch.from_numpy(mapa.log_posterior(X, bandwidth=h))  # (n, i)
    with torch.no_grad():
        F = decoder(torch.from_numpy(codes))
        log_lik = lik.log_prob(torch.from_numpy(X)[:, None, :], F[None, :, :])  # (n, i)
        dense = (torch.exp(logq) * log_lik).sum() + (-0.5 * torch.from_numpy(codes) ** 2 - 0.5 * math.log(2 * math.pi)).sum()
    assert stats == pytest.approx(topk, rel=1e-6)
    assert stats == pytest.approx(dense.item(), rel=1e-6)


def test_sufficient_statistics_gradients_equal_topk():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((10, 2))
    codes = rng.standard_normal((10, 1))
    grads = []
    for make in (
        lambda: MapaTargetsObjective(*mapa.posterior_targets(X, bandwidth=0.7), dtype=torch.float64),
        lambda: MapaTopKObjective(X, *list(mapa.log_posterior_topk(X, bandwidth=0.7, k=10))[:2], dtype=torch.float64),
    ):
        torch.manual_seed(1)
        model = code_model(nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 2)).double(), codes,
                           GaussianLikelihood(0.5, learn=True).double())
        make()(model, torch.arange(10)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-9)


def test_bernoulli_statistics_equal_topk():
    rng = np.random.default_rng(6)
    X = (rng.random((9, 4)) < 0.4).astype(float)
    codes = rng.standard_normal((9, 2))
    torch.manual_seed(2)
    decoder = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    model = code_model(decoder, codes, BernoulliLikelihood())
    stats = MapaTargetsObjective(*mapa.posterior_targets(X, bandwidth=0.6), dtype=torch.float64).total(model)
    top = mapa.log_posterior_topk(X, bandwidth=0.6, k=9)
    topk = MapaTopKObjective(X, top.indices, top.log_prob, dtype=torch.float64).total(model)
    assert stats.item() == pytest.approx(topk.item(), rel=1e-6)


def test_minibatch_loss_is_unbiased_for_the_full_objective():
    W, m, s = mapa.posterior_targets(X3, bandwidth=H)
    objective = MapaTargetsObjective(W, m, s, dtype=torch.float64)
    model = code_model(linear_decoder(A, B), CODES3, GaussianLikelihood(SIGMA, learn=False).double())
    per_batch = [objective(model, torch.tensor([i])).item() for i in range(3)]
    assert -3 * np.mean(per_batch) == pytest.approx(objective.total(model).item(), rel=1e-12)


def test_gaussian_log_prob_by_hand():
    lik = GaussianLikelihood(0.5, learn=False).double()
    x, f = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([0.5, 2.5], dtype=torch.float64)
    expected = -math.log(2 * math.pi * 0.25) - (0.25 + 0.25) / (2 * 0.25)
    assert lik.log_prob(x, f).item() == pytest.approx(expected, rel=1e-14)


def encoder_model(D=2, K=2, seed=0):
    torch.manual_seed(seed)
    enc = GaussianEncoder(D, K, hidden=(8,)).double()
    dec = nn.Sequential(nn.Linear(K, 8), nn.Tanh(), nn.Linear(8, D)).double()
    return EncoderDecoderModel(enc, dec, GaussianLikelihood(0.3, learn=True).double())


def test_iwae_with_one_sample_equals_single_sample_elbo():
    X = np.random.default_rng(7).standard_normal((16, 2))
    model = encoder_model()
    idx = torch.arange(16)
    iwae = IwaeObjective(X, num_samples=1, dtype=torch.float64)(model, idx, torch.Generator().manual_seed(3))
    elbo = ElboObjective(X, num_samples=1, analytic_kl=False, dtype=torch.float64)(
        model, idx, torch.Generator().manual_seed(3)
    )
    assert iwae.item() == pytest.approx(elbo.item(), rel=1e-12)


def test_iwae_bound_is_tighter_and_elbo_estimators_agree():
    X = np.random.default_rng(8).standard_normal((32, 2))
    model = encoder_model(seed=1)
    idx = torch.arange(32)
    with torch.no_grad():
        analytic = ElboObjective(X, num_samples=4000, dtype=torch.float64)(model, idx, torch.Generator().manual_seed(0))
        sampled = ElboObjective(X, num_samples=4000, analytic_kl=False, dtype=torch.float64)(
            model, idx, torch.Generator().manual_seed(0)
        )
        iwae = IwaeObjective(X, num_samples=50, dtype=torch.float64)(model, idx, torch.Generator().manual_seed(0))
    assert analytic.item() == pytest.approx(sampled.item(), rel=2e-2)
    assert iwae.item() < analytic.item()  # losses: the IWAE bound is higher


def test_analytic_kl_matches_torch_distributions():
    mu = torch.tensor([[0.3, -1.2]], dtype=torch.float64)
    log_var = torch.tensor([[0.5, -0.7]], dtype=torch.float64)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * log_var))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(q, p).sum(-1)
    torch.testing.assert_close(gaussian_kl_to_prior(mu, log_var), expected)


class _FixedEncoder(nn.Module):
    """q(z | x) = N(scale * x, width^2 I)."""

    def __init__(self, scale, width):
        super().__init__()
        self.scale, self.width = scale, width

    def forward(self, x):
        return self.scale * x, torch.full_like(x, 2 * math.log(self.width))


def test_mutual_information_small_for_uninformative_and_large_for_informative_encoder():
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dec = nn.Linear(2, 2).double()
    lik = GaussianLikelihood(1.0, learn=False)
    rng = torch.Generator().manual_seed(0)
    none = mutual_information(EncoderDecoderModel(_FixedEncoder(0.0, 1.0), dec, lik), x, rng)
    much = mutual_information(EncoderDecoderModel(_FixedEncoder(1.0, 0.01), dec, lik), x, rng)
    assert abs(none) < 0.2
    # distinct, narrow posteriors: I_q approaches its maximum log(batch size)
    assert much == pytest.approx(math.log(256), abs=0.1)
