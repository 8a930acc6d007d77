"""Bandwidth rules for the MAPA posterior.

MAPA replaces the decoder mean f(z_i) by the observation x_i, so the kernel
compares two noisy points; their difference has variance 2 sigma^2 per
coordinate. Measured on ground-truth curves (MAPA.md, section 2):

* in low dimension the best bandwidth is h = sqrt(2) * sigma;
* it grows roughly like sigma * D**(1/4) as D grows, because the inner product
  of two independent noise vectors spreads like sigma^2 * sqrt(D).

``bandwidth_from_noise`` encodes both: ``h = sqrt(2) * sigma * max(1, (D/2)**(1/4))``,
which gives 1.41 sigma at D = 2, 2.5 sigma at D = 20 and 3.8 sigma at D = 100,
inside the measured best ranges (1.4-1.5, 2.4-3.5, 3.5-6.7).

When sigma is unknown, a rule name can be passed as ``bandwidth=``:

``"nn"``
    Estimate sigma from nearest-neighbour distances: for two neighbours on the
    data manifold, ||x_n - x_m||^2 ~ ||f_n - f_m||^2 + 2 sigma^2 D, so
    ``sigma_hat^2 = median_n min_m ||x_n - x_m||^2 / (2 D)``. This is an upper
    bound: accurate when noise dominates the neighbour spacing (high D, dense
    sampling), too large when points are sparse along the manifold (low D,
    small N), where it over-smooths. Then ``h = bandwidth_from_noise(sigma_hat, D)``.
``"scott"``
    Scott's kernel-density rule ``h = s * N**(-1/(D+4))`` with s the mean
    per-feature standard deviation. A classical density-estimation choice; it
    ignores the noise/manifold structure and usually over-smooths for MAPA.

Neither rule is a substitute for a known noise level; leave-one-out KDE
likelihood is deliberately not offered (it picks about half the best h).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from ._validation import _to_numpy

__all__ = ["bandwidth_from_noise", "select_bandwidth", "estimate_noise_std", "RULES"]

RULES = ("nn", "scott")

_NN_SAMPLE = 2000


def bandwidth_from_noise(noise_std: float, dim: int) -> float:
    """Recommended MAPA bandwidth for a known observation noise level.

    Parameters
    ----------
    noise_std : float
        Observation noise standard deviation sigma (> 0).
    dim : int
        Number of observed features D (>= 1).

    Returns
    -------
    float
        ``sqrt(2) * noise_std * max(1, (dim / 2) ** 0.25)``.
    """
    if isinstance(noise_std, bool) or not isinstance(noise_std, numbers.Real) or not (
        math.isfinite(noise_std) and noise_std > 0
    ):
        raise ValueError(f"noise_std must be a finite float > 0, got {noise_std!r}")
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    return math.sqrt(2.0) * float(noise_std) * max(1.0, (dim / 2.0) ** 0.25)


def _nearest_sq_dists(X: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Squared distance from X[rows] to their nearest other point of X (float64)."""
    Xf = np.asarray(X, dtype=np.float64)
    Xf = Xf - Xf.mean(axis=0)
    out = np.empty(len(rows))
    step = max(1, (1 << 24) // max(1, Xf.shape[0] * Xf.shape[1]))
    for start in range(0, len(rows), step):
        r = rows[start : start + step]
        diff = Xf[r][:, None, :] - Xf[None, :, :]
        d2 = np.einsum("mnd,mnd->mn", diff, diff)
        d2[np.arange(len(r)), r] = np.inf
        out[start : start + step] = d2.min(axis=1)
    return out


def estimate_noise_std(X, *, sample: int = _NN_SAMPLE, seed: int = 0) -> float:
    """Nearest-neighbour estimate of the noise level (see module docstring, rule ``"nn"``).

    Uses at most ``sample`` query points, chosen with a fixed seed, against all of X.
    """
    X = _to_numpy("X", X).astype(np.float64, copy=False)
    n, d = X.shape
    if n < 2:
        raise ValueError("the 'nn' bandwidth rule needs at least 2 points in X")
    rng = np.random.default_rng(seed)
    rows = rng.choice(n, size=min(n, sample), replace=False) if n > sample else np.arange(n)
    nn = _nearest_sq_dists(X, rows)
    med = float(np.median(nn))
    if med <= 0.0:
        positive = nn[nn > 0]
        if positive.size == 0:
            raise ValueError("bandwidth rule 'nn' failed: all sampled points have an exact duplicate; pass a float")
        med = float(np.median(positive))
    return math.sqrt(med / (2.0 * d))


def select_bandwidth(X, rule: str = "nn") -> float:
    """Data-driven bandwidth by rule name (``"nn"`` or ``"scott"``); see the module docstring."""
    if rule not in RULES:
        raise ValueError(f"unknown bandwidth rule {rule!r}; use one of {list(RULES)}")
    X = _to_numpy("X", X).astype(np.float64, copy=False)
    n, d = X.shape
    if rule == "nn":
        return bandwidth_from_noise(estimate_noise_std(X), d)
    if rule == "scott":
        s = float(np.mean(X.std(axis=0)))
        if s <= 0.0:
            raise ValueError("bandwidth rule 'scott' failed: X has zero spread; pass a float")
        return s * n ** (-1.0 / (d + 4))
    raise ValueError(f"unknown bandwidth rule {rule!r}; use one of {list(RULES)}")
