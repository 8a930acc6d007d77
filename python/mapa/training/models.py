"""Learnable parts of every method: decoder, encoder, likelihood, code table.

All methods share the generative model

    z ~ N(0, I_K),    x | z ~ p(x | f_theta(z)),

with ``f_theta`` the decoder and ``p`` a :class:`GaussianLikelihood`
(N(f(z), sigma^2 I), sigma fixed or learned) or a :class:`BernoulliLikelihood`
(f(z) are logits). Only the inference part differs: MAPA keeps a table of N
codes (:class:`CodeTableModel`), the VAE family an amortised Gaussian encoder
(:class:`EncoderDecoderModel`).

Both models push latent codes through the decoder with :meth:`decode` and data
through the encoder with :meth:`encode`, which count what they evaluate (one
decoder evaluation per latent code, one encoder evaluation per data point).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "DEFAULT_HIDDEN",
    "mlp",
    "default_decoder",
    "GaussianEncoder",
    "GaussianLikelihood",
    "BernoulliLikelihood",
    "EvaluationCounts",
    "CodeTableModel",
    "EncoderDecoderModel",
    "std_normal_log_prob",
    "diag_normal_log_prob",
]

DEFAULT_HIDDEN = (128, 128)
_LOG_2PI = math.log(2.0 * math.pi)


def mlp(n_in: int, n_out: int, hidden=DEFAULT_HIDDEN, activation=nn.Tanh) -> nn.Sequential:
    """Fully connected network ``n_in -> hidden... -> n_out`` with ``activation`` between layers."""
    layers: list[nn.Module] = []
    width = n_in
    for h in hidden:
        layers += [nn.Linear(width, h), activation()]
        width = h
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


def default_decoder(latent_dim: int, data_dim: int, hidden=DEFAULT_HIDDEN) -> nn.Sequential:
    """The decoder every method uses unless given one: an MLP with two hidden tanh layers of 128 units.

    Maps codes of shape (batch, latent_dim) to means (Gaussian likelihood) or
    logits (Bernoulli likelihood) of shape (batch, data_dim).
    """
    return mlp(latent_dim, data_dim, hidden)


class GaussianEncoder(nn.Module):
    """Amortised posterior q(z | x) = N(mu(x), diag(exp(log_var(x)))), same MLP shape as the decoder."""

    def __init__(self, data_dim: int, latent_dim: int, hidden=DEFAULT_HIDDEN):
        super().__init__()
        self.latent_dim = latent_dim
        self.net = mlp(data_dim, 2 * latent_dim, hidden)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(mu, log_var)``, each of shape (batch, latent_dim)."""
        out = self.net(x)
        return out[..., : self.latent_dim], out[..., self.latent_dim :]


def std_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I), summed over the last axis."""
    return -0.5 * (z.square() + _LOG_2PI).sum(-1)


def diag_normal_log_prob(z: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(log_var))), summed over the last axis."""
    return -0.5 * ((z - mu).square() * torch.exp(-log_var) + log_var + _LOG_2PI).sum(-1)


class GaussianLikelihood(nn.Module):
    """p(x | f) = N(x; f, sigma^2 I_D) with sigma fixed or learned (as log sigma).

    Parameters
    ----------
    noise_std : float
        sigma, or its initial value when ``learn`` is True.
    learn : bool
        Learn log sigma jointly with the decoder.
    """

    name = "gaussian"

    def __init__(self, noise_std: float, learn: bool):
        super().__init__()
        value = torch.tensor(math.log(noise_std))
        if learn:
            self.log_sigma = nn.Parameter(value)
        else:
            self.register_buffer("log_sigma", value)

    @property
    def noise_std(self) -> float:
        return float(torch.exp(self.log_sigma.detach()))

    def log_prob(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """log N(x; f, sigma^2 I), summed over the last axis (broadcasts x against f)."""
        D = f.shape[-1]
        log_sigma = self.log_sigma.to(f.dtype)
        return -0.5 * D * (_LOG_2PI + 2.0 * log_sigma) - 0.5 * (x - f).square().sum(-1) * torch.exp(
            -2.0 * log_sigma
        )

    def sample(self, f: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Draws x ~ N(f, sigma^2 I)."""
        return f + self.noise_std * torch.randn(f.shape, generator=generator, dtype=f.dtype)

    def expected_log_prob(self, weights, means, residuals, f):
        """sum_n q(i|n) log p(x_n | f_i) from the sufficient statistics of q (MAPA.md section 3).

        ``sum_n q(i|n) ||x_n - f_i||^2 = W_i ||f_i - m_i||^2 + r_i`` with
        ``r_i = s_i - W_i ||m_i||^2``, so the term is
        ``W_i log N(m_i; f_i, sigma^2 I) - r_i / (2 sigma^2)``.

        Parameters
        ----------
        weights : tensor of shape (B,)
        means : tensor of shape (B, D)
        residuals : tensor of shape (B,)
            r_i >= 0, the q-weighted scatter of the data around m_i.
        f : tensor of shape (B, D)
        """
        return weights * self.log_prob(means, f) - 0.5 * residuals * torch.exp(-2.0 * self.log_sigma.to(f.dtype))


class BernoulliLikelihood(nn.Module):
    """p(x | f) = prod_d Bernoulli(x_d; sigmoid(f_d)): the decoder outputs logits, x in [0, 1]."""

    name = "bernoulli"
    noise_std = None

    def log_prob(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """sum_d x_d log sigmoid(f_d) + (1 - x_d) log sigmoid(-f_d) (x may be fractional)."""
        return (x * nn.functional.logsigmoid(f) + (1.0 - x) * nn.functional.logsigmoid(-f)).sum(-1)

    def sample(self, f: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Draws x ~ Bernoulli(sigmoid(f))."""
        return torch.bernoulli(torch.sigmoid(f), generator=generator)

    def expected_log_prob(self, weights, means, residuals, f):
        """sum_n q(i|n) log p(x_n | f_i) = W_i log p(m_i | f_i): the log-likelihood is linear in x."""
        return weights * self.log_prob(means, f)


@dataclass
class EvaluationCounts:
    """Decoder evaluations (latent codes pushed through f) and encoder evaluations (points encoded)."""

    decoder: int = 0
    encoder: int = 0


class _LatentModel(nn.Module):
    def __init__(self, decoder: nn.Module, likelihood: nn.Module):
        super().__init__()
        self.decoder = decoder
        self.likelihood = likelihood
        self.counts = EvaluationCounts()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """f(z) for codes of shape (..., K); counts one decoder evaluation per code."""
        flat = z.reshape(-1, z.shape[-1])
        self.counts.decoder += flat.shape[0]
        out = self.decoder(flat)
        return out.reshape(*z.shape[:-1], out.shape[-1])

    def inference_parameters(self) -> list[nn.Parameter]:
        """Parameters of the inference part (encoder or code table)."""
        raise NotImplementedError

    def generative_parameters(self) -> list[nn.Parameter]:
        """Decoder and likelihood parameters."""
        return list(self.decoder.parameters()) + list(self.likelihood.parameters())


class CodeTableModel(_LatentModel):
    """MAPA's model: decoder, likelihood and a learnable table of N codes (N, K)."""

    def __init__(self, decoder: nn.Module, likelihood: nn.Module, codes: torch.Tensor):
        super().__init__(decoder, likelihood)
        self.codes = nn.Parameter(codes)

    def inference_parameters(self):
        return [self.codes]


class EncoderDecoderModel(_LatentModel):
    """VAE-type model: Gaussian encoder, decoder and likelihood."""

    def __init__(self, encoder: GaussianEncoder, decoder: nn.Module, likelihood: nn.Module):
        super().__init__(decoder, likelihood)
        self.encoder = encoder

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, log_var) of q(z | x) for x of shape (B, D); counts B encoder evaluations."""
        self.counts.encoder += x.shape[0]
        return self.encoder(x)

    def inference_parameters(self):
        return list(self.encoder.parameters())
