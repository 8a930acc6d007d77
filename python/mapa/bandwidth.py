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

When sigma is unknown, a rule name can be passed as ``bandwidth=``; each
estimates sigma from the data and returns ``bandwidth_from_noise(sigma_hat, D)``:

``"lpca"``
    Local PCA at the noise scale. Around each of up to 300 sampled points,
    take the ball of radius 3 s and the smallest eigenvalue of its covariance
    (the direction across the data manifold); s is updated to the square root
    of the median of those eigenvalues, starting from half the data's
    per-feature spread and stopping when it changes by less than 1% (at most
    10 steps). Needs balls with at least 2 D + 5 points, so it suits
    low-dimensional data with dense sampling.
``"nn"``
    Nearest-neighbour noise level: ``sigma_hat^2 = median_n min_m ||x_n - x_m||^2 / (2 D)``.
    In high dimension the nearest-neighbour distance is dominated by the
    noise of both points (2 sigma^2 D), so this is a fair estimate there; in
    low dimension the noise fills a tube whose points have much closer
    neighbours, and it is far too small.
``"auto"`` (recommended)
    ``"lpca"`` where its balls are populated (at least half of them), else ``"nn"``.
``"scott"``
    Scott's kernel-density rule ``h = s * N**(-1/(D+4))`` with s the mean
    per-feature standard deviation, returned as the bandwidth directly. A
    classical density-estimation choice; it ignores the noise/manifold
    structure and usually over-smooths for MAPA.

Measured accuracy of sigma_hat / sigma on the ground-truth sets of
:mod:`mapa.datasets` (sigma = 0.1, seed 0, N = 500 / 2000 / 8000):

=========================  ======================  ==================  ================
data set                   "auto" (rule used)      "lpca"              "nn"
=========================  ======================  ==================  ================
1-D curves in 2-D          0.80 - 0.88 (lpca)      0.80 - 0.88         0.02 - 0.15
2-D surface in 3-D         0.59 - 0.92 (lpca)      0.59 - 0.92         0.20 - 0.52
1-D curve in 50-D          0.76 - 0.84 (nn)        (balls too sparse)  0.76 - 0.84
=========================  ======================  ==================  ================

All rules under-estimate sigma here, so MAPA's q comes out more peaked than
with the true noise level. Neither rule is a substitute for a known noise
level; leave-one-out KDE likelihood is deliberately not offered (it picks
about half the best h).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from ._validation import _to_numpy

__all__ = ["bandwidth_from_noise", "select_bandwidth", "estimate_noise_std", "RULES"]

RULES = ("auto", "lpca", "nn", "scott")


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


def _sample_sq_dists(X: np.ndarray, sample: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows sampled with a fixed seed and their squared distances to all of X (float64)."""
    n, d = X.shape
    rng = np.random.default_rng(seed)
    rows = rng.choice(n, size=sample, replace=False) if n > sample else np.arange(n)
    Xc = X - X.mean(axis=0)
    out = np.empty((len(rows), n))
    step = max(1, (1 << 24) // max(1, n * d))
    for start in range(0, len(rows), step):
        r = rows[start : start + step]
        diff = Xc[r][:, None, :] - Xc[None, :, :]
        out[start : start + step] = np.einsum("mnd,mnd->mn", diff, diff)
    return rows, out


def _noise_nn(X: np.ndarray, rows: np.ndarray, d2: np.ndarray) -> float:
    d2 = d2.copy()
    d2[np.arange(len(rows)), rows] = np.inf
    nn = d2.min(axis=1)
    positive = nn[nn > 0]
    if positive.size == 0:
        raise ValueError(
            "noise estimate 'nn' failed: all sampled points have an exact duplicate; pass a float bandwidth"
        )
    med = float(np.median(nn)) if np.median(nn) > 0 else float(np.median(positive))
    return math.sqrt(med / (2.0 * X.shape[1]))


def _noise_lpca(X: np.ndarray, d2: np.ndarray) -> float | None:
    """Fixed point of the local-PCA noise scale, or None where balls are too sparse."""
    d = X.shape[1]
    s = 0.5 * float(np.sqrt(X.var(axis=0).mean()))
    if s <= 0.0:
        return None
    found = None  # the last scale whose balls were populated
    for _ in range(10):
        smallest = []
        for row in d2:
            ball = X[row <= (3.0 * s) ** 2]
            if len(ball) >= 2 * d + 5:
                smallest.append(np.linalg.eigvalsh(np.atleast_2d(np.cov(ball.T)))[0])
        if len(smallest) < len(d2) / 2:
            break
        new = math.sqrt(max(float(np.median(smallest)), 0.0))
        if new <= 0.0:
            break
        found = new
        done = abs(new - s) < 0.01 * s
        s = new
        if done:
            break
    return found


def estimate_noise_std(X, *, method: str = "auto", sample: int = 300, seed: int = 0) -> float:
    """Estimate the observation noise level sigma from data (see the module docstring).

    Parameters
    ----------
    X : array of shape (n_points, n_features)
    method : {"auto", "lpca", "nn"}
    sample : int
        Points (chosen with ``seed``) around which the estimate is made.

    Returns
    -------
    float
        sigma_hat > 0.
    """
    if method not in ("auto", "lpca", "nn"):
        raise ValueError(f"method must be 'auto', 'lpca' or 'nn', got {method!r}")
    X = _to_numpy("X", X).astype(np.float64, copy=False)
    if X.shape[0] < 2:
        raise ValueError(f"the {method!r} noise estimate needs at least 2 points in X")
    rows, d2 = _sample_sq_dists(X, sample, seed)
    if method in ("auto", "lpca"):
        s = _noise_lpca(X, d2)
        if s is not None:
            return s
        if method == "lpca":
            raise ValueError(
                "the 'lpca' noise estimate needs balls of at least 2 D + 5 points around most samples; "
                "this data is too sparse for its dimension: use 'nn' or pass a float"
            )
    return _noise_nn(X, rows, d2)


def select_bandwidth(X, rule: str = "auto") -> float:
    """Data-driven bandwidth by rule name (``"auto"``, ``"lpca"``, ``"nn"``, ``"scott"``).

    See the module docstring for each rule and its measured accuracy.
    """
    if rule not in RULES:
        raise ValueError(f"unknown bandwidth rule {rule!r}; use one of {list(RULES)}")
    X = _to_numpy("X", X).astype(np.float64, copy=False)
    n, d = X.shape
    if rule in ("auto", "lpca", "nn"):
        return bandwidth_from_noise(estimate_noise_std(X, method=rule), d)
    if rule == "scott":
        s = float(np.mean(X.std(axis=0)))
        if s <= 0.0:
            raise ValueError("bandwidth rule 'scott' failed: X has zero spread; pass a float")
        return s * n ** (-1.0 / (d + 4))
    raise ValueError(f"unknown bandwidth rule {rule!r}; use one of {list(RULES)}")
