"""Training objectives: what each method maximises, apart from how it is optimised.

Every objective is called as ``objective(model, idx, rng)`` with a minibatch of
indices ``idx`` (codes for MAPA, data points for the VAE family) and returns
the loss: an unbiased minibatch estimate of ``-(full-data objective) / N``, in
nats per data point, so losses of different methods share a scale.

* :class:`MapaTargetsObjective` - MAPA with the sufficient statistics (W, m, s)
  of the fixed posterior q: one decoder evaluation per code.
* :class:`MapaTopKObjective` - MAPA with the sparse top-k rows of q directly;
  any likelihood, and the test oracle for the former.
* :class:`ElboObjective` - the S-sample ELBO (Kingma and Welling 2014).
* :class:`IwaeObjective` - the K-sample importance-weighted bound (Burda et al. 2016).

:func:`encoder_log_weights` is the one place where the VAE family draws codes
and forms log p(x, z) - log q(z | x); :func:`mutual_information` is the I_q
estimate of He et al. (2019) used by aggressive training.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .models import CodeTableModel, EncoderDecoderModel, diag_normal_log_prob, std_normal_log_prob

__all__ = [
    "Objective",
    "MapaTargetsObjective",
    "MapaTopKObjective",
    "ElboObjective",
    "IwaeObjective",
    "encoder_log_weights",
    "gaussian_kl_to_prior",
    "mutual_information",
]


class Objective:
    """Base class: ``__call__(model, idx, rng) -> loss`` (scalar tensor, nats per point)."""

    n_items: int

    def __call__(self, model, idx: torch.Tensor, rng: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def total(self, model, rng: torch.Generator | None = None) -> torch.Tensor:
        """The full-data objective (to maximise): ``-N * loss`` over all indices at once."""
        return -self.n_items * self(model, torch.arange(self.n_items), rng)

    def data_state(self) -> dict[str, torch.Tensor]:
        """Tensors derived from the data that a checkpoint must keep (default: none)."""
        return {}


def _as_tensor(a, dtype) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach().to(dtype)
    return torch.as_tensor(np.asarray(a), dtype=dtype)


class MapaTargetsObjective(Objective):
    """MAPA's objective from the per-reference statistics of the fixed posterior q.

    For codes z_i and targets (W_i, m_i, s_i) of :func:`mapa.posterior_targets`,
    the full-data objective is

        sum_i [ sum_n q(i|n) log p(x_n | f(z_i)) + log N(z_i; 0, I) ],

    where for the Gaussian likelihood ``sum_n q(i|n) log p(x_n | f_i) =
    W_i log N(m_i; f_i, sigma^2 I) - (s_i - W_i ||m_i||^2) / (2 sigma^2)`` and
    for the Bernoulli likelihood ``W_i log p(m_i | f_i)``. A minibatch of B
    codes costs B decoder evaluations and estimates it without bias.

    Parameters
    ----------
    weights : array of shape (N,)
    means : array of shape (N, D)
    sq_norms : array of shape (N,)
    dtype : torch dtype of the model (default float32)
    """

    def __init__(self, weights, means, sq_norms, dtype=torch.float32):
        W = np.asarray(_as_tensor(weights, torch.float64))
        m = np.asarray(_as_tensor(means, torch.float64))
        s = np.asarray(_as_tensor(sq_norms, torch.float64))
        # the scatter r_i = s_i - W_i ||m_i||^2 >= 0 is formed once, in float64
        r = np.maximum(s - W * np.einsum("nd,nd->n", m, m), 0.0)
        self.weights = torch.as_tensor(W, dtype=dtype)
        self.means = torch.as_tensor(m, dtype=dtype)
        self.residuals = torch.as_tensor(r, dtype=dtype)
        self.n_items = self.weights.shape[0]

    def per_code(self, model: CodeTableModel, idx: torch.Tensor) -> torch.Tensor:
        """Objective terms of codes ``idx``, shape (B,)."""
        z = model.codes[idx]
        f = model.decode(z)
        fit = model.likelihood.expected_log_prob(self.weights[idx], self.means[idx], self.residuals[idx], f)
        return fit + std_normal_log_prob(z)

    def __call__(self, model, idx, rng=None):
        return -self.per_code(model, idx).mean()

    def data_state(self):
        return {"weights": self.weights, "means": self.means, "residuals": self.residuals}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "MapaTargetsObjective":
        obj = cls.__new__(cls)
        obj.weights, obj.means, obj.residuals = state["weights"], state["means"], state["residuals"]
        obj.n_items = obj.weights.shape[0]
        return obj


class MapaTopKObjective(Objective):
    """MAPA's objective from the top-k rows of q, for any likelihood.

    Full-data objective:

        sum_n sum_{i in topk(n)} q~(i|n) log p(x_n | f(z_i)) + sum_i log N(z_i; 0, I),

    with q~ the kept entries renormalised to sum to one per row (with k = N,
    q~ = q and this equals :class:`MapaTargetsObjective` exactly). Minibatches
    run over data points n; the decoder is evaluated once per distinct code
    among their top-k entries, and the prior term (no decoder call) over all codes.

    Parameters
    ----------
    X : array of shape (N, D)
    indices : int array of shape (N, k)
    log_prob : array of shape (N, k)
        log q(indices | n) from :func:`mapa.log_posterior_topk`.
    """

    def __init__(self, X, indices, log_prob, dtype=torch.float32):
        self.X = _as_tensor(X, dtype)
        self.indices = _as_tensor(indices, torch.int64)
        logq = _as_tensor(log_prob, torch.float64)
        self.q = torch.softmax(logq, dim=1).to(dtype)
        self.n_items = self.X.shape[0]

    def per_point(self, model: CodeTableModel, idx: torch.Tensor) -> torch.Tensor:
        """sum_{i in topk(n)} q~(i|n) log p(x_n | f(z_i)) for points ``idx``, shape (B,)."""
        nbr = self.indices[idx]
        unique, inverse = torch.unique(nbr, return_inverse=True)
        f = model.decode(model.codes[unique])[inverse]  # (B, k, D)
        log_lik = model.likelihood.log_prob(self.X[idx].unsqueeze(1), f)
        return (self.q[idx] * log_lik).sum(1)

    def __call__(self, model, idx, rng=None):
        prior = std_normal_log_prob(model.codes).sum() / self.n_items
        return -(self.per_point(model, idx).mean() + prior)

    def data_state(self):
        return {"X": self.X, "indices": self.indices, "q": self.q}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "MapaTopKObjective":
        obj = cls.__new__(cls)
        obj.X, obj.indices, obj.q = state["X"], state["indices"], state["q"]
        obj.n_items = obj.X.shape[0]
        return obj


def gaussian_kl_to_prior(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(log_var))) || N(0, I)), summed over the last axis."""
    return 0.5 * (mu.square() + torch.exp(log_var) - 1.0 - log_var).sum(-1)


def encoder_log_weights(model: EncoderDecoderModel, x: torch.Tensor, num_samples: int, rng):
    """Draw reparameterised codes z_s ~ q(z | x) and their log weights.

    Returns
    -------
    log_w : tensor of shape (S, B)
        log p(x | z_s) + log p(z_s) - log q(z_s | x).
    log_lik : tensor of shape (S, B)
        log p(x | z_s).
    mu, log_var : tensors of shape (B, K)
        The encoder's output.
    """
    mu, log_var = model.encode(x)
    eps = torch.randn((num_samples, *mu.shape), generator=rng, dtype=mu.dtype)
    z = mu + torch.exp(0.5 * log_var) * eps
    log_lik = model.likelihood.log_prob(x, model.decode(z))
    log_w = log_lik + std_normal_log_prob(z) - diag_normal_log_prob(z, mu, log_var)
    return log_w, log_lik, mu, log_var


class _EncoderObjective(Objective):
    def __init__(self, X, num_samples: int, dtype=torch.float32):
        self.X = _as_tensor(X, dtype)
        self.num_samples = int(num_samples)
        self.n_items = self.X.shape[0]

    def bound(self, model, x, rng) -> torch.Tensor:
        """The per-point lower bound on log p(x), shape (B,)."""
        raise NotImplementedError

    def __call__(self, model, idx, rng=None):
        return -self.bound(model, self.X[idx], rng).mean()


class ElboObjective(_EncoderObjective):
    """The S-sample ELBO: mean_s log p(x | z_s) - KL(q(z|x) || p(z)), z_s ~ q(z | x).

    With ``analytic_kl=False`` the KL is estimated by the same samples:
    mean_s [log p(x | z_s) + log p(z_s) - log q(z_s | x)].
    """

    def __init__(self, X, num_samples: int = 1, analytic_kl: bool = True, dtype=torch.float32):
        super().__init__(X, num_samples, dtype)
        self.analytic_kl = bool(analytic_kl)

    def bound(self, model, x, rng):
        log_w, log_lik, mu, log_var = encoder_log_weights(model, x, self.num_samples, rng)
        if self.analytic_kl:
            return log_lik.mean(0) - gaussian_kl_to_prior(mu, log_var)
        return log_w.mean(0)


class IwaeObjective(_EncoderObjective):
    """The K-sample importance-weighted bound log (1/K) sum_k p(x, z_k) / q(z_k | x)."""

    def bound(self, model, x, rng):
        log_w = encoder_log_weights(model, x, self.num_samples, rng)[0]
        return torch.logsumexp(log_w, dim=0) - math.log(self.num_samples)


@torch.no_grad()
def mutual_information(model: EncoderDecoderModel, x: torch.Tensor, rng) -> float:
    """I_q between x and z under the encoder's joint q(x, z) = p_data(x) q(z | x) (He et al. 2019).

    ``I_q = E_x E_{q(z|x)} log q(z|x) - E_x E_{q(z|x)} log q(z)``, with the
    aggregate posterior q(z) approximated by the mixture of q(. | x_m) over the
    batch and one sample z_m ~ q(z | x_m) per point.
    """
    mu, log_var = model.encode(x)
    B, K = mu.shape
    neg_entropy = (-0.5 * K * math.log(2.0 * math.pi) - 0.5 * (1.0 + log_var).sum(-1)).mean()
    z = mu + torch.exp(0.5 * log_var) * torch.randn(mu.shape, generator=rng, dtype=mu.dtype)
    log_q_pairs = diag_normal_log_prob(z.unsqueeze(1), mu.unsqueeze(0), log_var.unsqueeze(0))  # (B, B)
    log_aggregate = torch.logsumexp(log_q_pairs, dim=1) - math.log(B)
    return float(neg_entropy - log_aggregate.mean())
