"""Test log-likelihood of the learned continuous model.

    p(x) = integral N(x; f(z), sigma^2 I) N(z; 0, I) dz      (Gaussian likelihood)

is estimated either with S shared prior samples z_s ~ N(0, I),

    log p(x) ~= logsumexp_s log p(x | f(z_s)) - log S,

which for the Gaussian likelihood is exactly the MAPA kernel's log-normaliser
of x over the decoded samples F = f(Z) with bandwidth sigma:

    log p(x_m) = log_normalizer(F, queries=X, bandwidth=sigma)[m] - log S - (D/2) log(2 pi sigma^2),

or, for latent_dim > 2 with a proposal, by importance sampling with S
samples per point, ``logsumexp_s [log p(x, z_s) - log r(z_s | x)] - log S``.
Both are consistent; their expectation is a lower bound on log p(x) (Jensen).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from .._kernel import log_normalizer, log_posterior_topk
from ._checks import check_data, check_decoder, check_latent_dim, check_likelihood, check_noise_std, param_dtype
from .models import BernoulliLikelihood, GaussianLikelihood, std_normal_log_prob

__all__ = [
    "marginal_log_likelihood",
    "encoder_proposal",
    "code_table_proposal",
    "PRIOR_SAMPLES",
    "IMPORTANCE_SAMPLES",
]

PRIOR_SAMPLES = 20000
IMPORTANCE_SAMPLES = 5000
_CHUNK = 1 << 16  # codes per decoder call
_PAIR_CHUNK = 1 << 22  # (points x samples) elements per block


@torch.no_grad()
def _decode(decoder: nn.Module, Z: torch.Tensor) -> torch.Tensor:
    out = torch.cat([decoder(z) for z in Z.split(_CHUNK)]).to(torch.float64)
    if not torch.isfinite(out).all():
        raise FloatingPointError("the decoder returned NaN or inf on prior samples; the model cannot be evaluated")
    return out


def _prior_estimate(decoder, noise_std, X, latent_dim, num_samples, seed, likelihood):
    gen = torch.Generator().manual_seed(seed)
    Z = torch.randn((num_samples, latent_dim), generator=gen, dtype=param_dtype(decoder))
    F = _decode(decoder, Z)
    D = X.shape[1]
    if likelihood == "gaussian":
        lognorm = log_normalizer(F.numpy(), queries=X, bandwidth=noise_std)
        return np.asarray(lognorm, dtype=np.float64) - math.log(num_samples) - 0.5 * D * math.log(
            2.0 * math.pi * noise_std**2
        )
    # Bernoulli: log p(x | f) = x . log sigmoid(f) + (1 - x) . log sigmoid(-f), a matrix product
    log_p, log_1mp = nn.functional.logsigmoid(F), nn.functional.logsigmoid(-F)
    Xt = torch.from_numpy(X)
    rows = max(1, _PAIR_CHUNK // num_samples)
    out = [
        torch.logsumexp(x @ log_p.T + (1.0 - x) @ log_1mp.T, dim=1) - math.log(num_samples)
        for x in Xt.split(rows)
    ]
    return torch.cat(out).numpy()


@torch.no_grad()
def _importance_estimate(decoder, noise_std, X, latent_dim, num_samples, seed, likelihood, proposal):
    lik = GaussianLikelihood(noise_std, learn=False).double() if likelihood == "gaussian" else BernoulliLikelihood()
    dtype = param_dtype(decoder)
    rows = max(1, _PAIR_CHUNK // (num_samples * max(1, X.shape[1])))
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for x in torch.from_numpy(X).split(rows):
            dist = proposal(x)
            z = dist.sample((num_samples,)).to(torch.float64)  # (S, b, K)
            if z.shape[1:] != (x.shape[0], latent_dim):
                raise ValueError(
                    f"proposal(x) must be a distribution over codes with batch shape ({x.shape[0]},) and "
                    f"event shape ({latent_dim},); its samples have shape {tuple(z.shape[1:])}"
                )
            f = _decode(decoder, z.reshape(-1, latent_dim).to(dtype)).reshape(num_samples, x.shape[0], -1)
            log_w = lik.log_prob(x, f) + std_normal_log_prob(z) - dist.log_prob(z.to(dist.mean.dtype)).double()
            out.append(torch.logsumexp(log_w, dim=0) - math.log(num_samples))
    return torch.cat(out).numpy()


def marginal_log_likelihood(
    decoder,
    noise_std,
    X,
    *,
    latent_dim,
    num_samples=None,
    seed=0,
    proposal=None,
    likelihood="gaussian",
):
    """Estimate log p(x) under the continuous model p(x) = int p(x | f(z)) N(z; 0, I) dz.

    Parameters
    ----------
    decoder : torch.nn.Module
        f, mapping codes (batch, latent_dim) to means (Gaussian) or logits
        (Bernoulli) of shape (batch, n_features).
    noise_std : float
        sigma of the Gaussian likelihood (ignored, may be None, for Bernoulli).
    X : array or CPU tensor of shape (n_points, n_features)
        Points to evaluate.
    latent_dim : int
        K.
    num_samples : int, optional
        S. Default 20000 shared prior samples, or 5000 importance samples per
        point when a proposal is used.
    seed : int
        Seed of the samples; the estimate is deterministic given it.
    proposal : callable, optional
        ``proposal(x)`` for x a float64 tensor (b, n_features) returns a
        ``torch.distributions.Distribution`` with batch shape (b,) and event
        shape (latent_dim,) (e.g. :func:`encoder_proposal`,
        :func:`code_table_proposal`). Used only when latent_dim > 2; for
        latent_dim <= 2, or without a proposal, shared prior samples are used.
    likelihood : {"gaussian", "bernoulli"}

    Returns
    -------
    ndarray of shape (n_points,)
        Estimates of log p(x_m), float64.

    Notes
    -----
    With prior samples (Gaussian):
    ``log p(x_m) = log_normalizer(F, queries=X, bandwidth=sigma)[m] - log S - (D/2) log(2 pi sigma^2)``,
    F = f(Z) in float64, computed by the MAPA kernel. Bernoulli uses the
    analogous log-sum-exp, in torch, in chunks. With a proposal r(z | x):
    ``logsumexp_s [log p(x | f(z_s)) + log N(z_s; 0, I) - log r(z_s | x)] - log S``.
    """
    latent_dim = check_latent_dim(latent_dim)
    X = check_data("X", X)
    likelihood = check_likelihood(likelihood, X)
    if likelihood == "gaussian":
        noise_std = check_noise_std(noise_std, allow_none=False)
    check_decoder(decoder, latent_dim, X.shape[1])
    use_proposal = proposal is not None and latent_dim > 2
    if proposal is not None and not callable(proposal):
        raise TypeError(f"proposal must be None or a callable x -> torch distribution, got {proposal!r}")
    if num_samples is None:
        num_samples = IMPORTANCE_SAMPLES if use_proposal else PRIOR_SAMPLES
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    num_samples = int(num_samples)
    was_training = decoder.training
    decoder.eval()
    try:
        if use_proposal:
            return _importance_estimate(decoder, noise_std, X, latent_dim, num_samples, seed, likelihood, proposal)
        return _prior_estimate(decoder, noise_std, X, latent_dim, num_samples, seed, likelihood)
    finally:
        decoder.train(was_training)


def encoder_proposal(encoder: nn.Module):
    """The encoder's Gaussian q(z | x) = N(mu(x), diag(exp(log_var(x)))) as a proposal."""
    dtype = param_dtype(encoder)

    @torch.no_grad()
    def proposal(x):
        mu, log_var = encoder(x.to(dtype))
        return Independent(Normal(mu.double(), torch.exp(0.5 * log_var.double())), 1)

    return proposal


def code_table_proposal(codes, X_train, bandwidth: float, *, k: int = 16, prior_weight: float = 0.1,
                        min_scale: float = 0.25):
    """MAPA's proposal: a Gaussian mixture on the codes of each point's top-k MAPA posterior entries.

    For a point x, with q the MAPA posterior of x over the training points
    (top ``k`` entries, renormalised) and z_i their learned codes:

        r(z | x) = (1 - w) sum_i q(i|x) N(z; z_i, tau^2 I) + w N(z; 0, I),

    where tau (per point and coordinate) is the q-weighted spread of those
    codes, clipped to [min_scale, 1], and the prior component with weight
    w = ``prior_weight`` keeps the importance weights bounded.

    Parameters
    ----------
    codes : tensor or array of shape (N, K)
    X_train : array of shape (N, D)
    bandwidth : float
    """
    codes = torch.as_tensor(np.asarray(codes), dtype=torch.float64)
    N, K = codes.shape
    X_train = np.asarray(X_train, dtype=np.float64)
    k = min(int(k), N)

    def proposal(x):
        top = log_posterior_topk(X_train, queries=x.numpy(), bandwidth=bandwidth, k=k)
        q = torch.softmax(torch.from_numpy(np.asarray(top.log_prob, dtype=np.float64)), dim=1)  # (b, k)
        centres = codes[torch.from_numpy(np.asarray(top.indices))]  # (b, k, K)
        mean = (q.unsqueeze(-1) * centres).sum(1, keepdim=True)
        spread = (q.unsqueeze(-1) * (centres - mean).square()).sum(1, keepdim=True).sqrt()
        scale = spread.clamp(min_scale, 1.0).expand_as(centres)
        b = x.shape[0]
        locs = torch.cat([centres, torch.zeros(b, 1, K, dtype=torch.float64)], 1)
        scales = torch.cat([scale, torch.ones(b, 1, K, dtype=torch.float64)], 1)
        logits = torch.cat(
            [math.log1p(-prior_weight) + torch.log(q), torch.full((b, 1), math.log(prior_weight), dtype=torch.float64)],
            1,
        )
        return MixtureSameFamily(Categorical(logits=logits), Independent(Normal(locs, scales), 1))

    return proposal
