"""Ground-truth data sets for judging MAPA, and one real data set.

Every ground-truth set is a generative model of the form of MAPA.md section 1,

    z ~ N(0, I_K),    x | z ~ N(f(z), sigma^2 I_D),

with a known decoder ``f`` (a :class:`torch.nn.Module` with a fixed formula or
fixed, seeded weights) and a known noise level ``sigma``. Knowing f and sigma
makes two things exactly computable:

* the exact empiricalized posterior p(i | x_n), proportional to
  N(x_n; f(z_i), sigma^2 I): :func:`exact_log_posterior`;
* the exact test log-likelihood log p(x) = log E_z N(x; f(z), sigma^2 I):
  :func:`mapa.evaluate.true_log_likelihood` (quadrature over z).

=========  ===  ===  =====  =====================================================
name        K    D   sigma  what is special
=========  ===  ===  =====  =====================================================
linear      1    2   0.1    f linear: p(x) is Gaussian in closed form (a check)
spiral      1    2   0.1    1.25 turns of a widening spiral; arms far apart
fold        1    2   0.1    f(z) = f(-z): the exact posterior over z is bimodal
surface     2    3   0.1    a wavy 2-D sheet in 3-D
curve50     1    50  0.1    a curve pushed into 50-D by a fixed random MLP
digits      -    64  -      scikit-learn's 8x8 digits in [0, 1], no ground truth
=========  ===  ===  =====  =====================================================

Arrays: ``X_*`` and ``Z_*`` are float32 NumPy arrays (the precision models train
in); exact computations (:func:`exact_log_posterior`, quadrature) re-evaluate the
decoder in float64. Sampling is deterministic in ``seed``: train and test codes
and noise come from four independent streams of ``numpy.random.SeedSequence``,
so the first rows of ``X_train`` do not change when ``n_train`` grows.

The digits split is a permutation of the 1797 images by
``numpy.random.default_rng(seed)``: the first ``n_train`` (default 1500) train,
the last ``n_test`` (default 297) test.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

__all__ = [
    "Dataset",
    "DatasetInfo",
    "load",
    "list_datasets",
    "dataset_info",
    "ground_truth_datasets",
    "exact_log_posterior",
    "decode",
    "LinearDecoder",
    "SpiralDecoder",
    "FoldDecoder",
    "SurfaceDecoder",
    "RandomMLPCurveDecoder",
]

# Seed of the fixed random weights of ``curve50`` (part of the model, not of the sample).
CURVE50_WEIGHT_SEED = 20240314


# ----------------------------------------------------------------------------- decoders


class _FixedDecoder(nn.Module):
    """Base of the true decoders: (B, K) -> (B, D), any float dtype, no trainable parameters."""

    latent_dim: int
    data_dim: int

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(
                f"{type(self).__name__} expects codes of shape (batch, {self.latent_dim}), got {tuple(z.shape)}"
            )
        if not z.is_floating_point():
            z = z.to(torch.get_default_dtype())
        return self._f(z)

    def _f(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class LinearDecoder(_FixedDecoder):
    """f(z) = z W^T + b, with W of shape (D, K); then x ~ N(b, W W^T + sigma^2 I)."""

    def __init__(self, weight, bias):
        super().__init__()
        weight = torch.as_tensor(np.asarray(weight, dtype=np.float64))
        self.register_buffer("weight", weight)
        self.register_buffer("bias", torch.as_tensor(np.asarray(bias, dtype=np.float64)))
        self.data_dim, self.latent_dim = weight.shape

    def _f(self, z):
        return z @ self.weight.to(z.dtype).T + self.bias.to(z.dtype)


class SpiralDecoder(_FixedDecoder):
    """u = Phi(z); angle t = pi (0.5 + 2.5 u), radius r = 0.2 + u; f(z) = r (cos t, sin t)."""

    latent_dim = 1
    data_dim = 2

    def _f(self, z):
        u = torch.special.ndtr(z[:, 0])
        t = math.pi * (0.5 + 2.5 * u)
        r = 0.2 + u
        return torch.stack([r * torch.cos(t), r * torch.sin(t)], dim=1)


class FoldDecoder(_FixedDecoder):
    """f(z) = (z^2 / 2 - 0.5, 0.5 sin(1.5 z^2)): even in z, so +z and -z give the same point."""

    latent_dim = 1
    data_dim = 2

    def _f(self, z):
        s = z[:, 0] ** 2
        return torch.stack([0.5 * s - 0.5, 0.5 * torch.sin(1.5 * s)], dim=1)


class SurfaceDecoder(_FixedDecoder):
    """f(z1, z2) = (z1, z2, 0.6 sin(1.5 z1) cos(1.5 z2)): a wavy sheet in 3-D."""

    latent_dim = 2
    data_dim = 3

    def _f(self, z):
        h = 0.6 * torch.sin(1.5 * z[:, 0]) * torch.cos(1.5 * z[:, 1])
        return torch.stack([z[:, 0], z[:, 1], h], dim=1)


class RandomMLPCurveDecoder(_FixedDecoder):
    """f(z) = W2 tanh(W1 z + b1), fixed weights drawn from ``numpy.random.default_rng(weight_seed)``.

    W1 (H, K) and b1 (H,) are N(0, 1.5^2) and N(0, 1); W2 (D, H) is N(0, 1 / H).
    """

    def __init__(self, data_dim: int = 50, hidden: int = 16, latent_dim: int = 1, weight_seed: int = CURVE50_WEIGHT_SEED):
        super().__init__()
        rng = np.random.default_rng(weight_seed)
        self.latent_dim, self.data_dim = latent_dim, data_dim
        self.register_buffer("w1", torch.as_tensor(1.5 * rng.standard_normal((hidden, latent_dim))))
        self.register_buffer("b1", torch.as_tensor(rng.standard_normal(hidden)))
        self.register_buffer("w2", torch.as_tensor(rng.standard_normal((data_dim, hidden)) / math.sqrt(hidden)))

    def _f(self, z):
        h = torch.tanh(z @ self.w1.to(z.dtype).T + self.b1.to(z.dtype))
        return h @ self.w2.to(z.dtype).T


# ----------------------------------------------------------------------------- data sets


@dataclass
class Dataset:
    """A sampled data set.

    Attributes
    ----------
    name : str
    X_train : float32 array of shape (n_train, n_features)
    X_test : float32 array of shape (n_test, n_features)
    Z_train, Z_test : float32 arrays of shape (n, latent_dim), or None
        The true codes that generated the rows of X (None without ground truth).
    decoder : torch.nn.Module or None
        The true decoder f, (B, K) -> (B, D); None without ground truth.
    noise_std : float or None
        The true sigma; None without ground truth.
    latent_dim : int
        K of the true model (for ``digits``: the suggested latent size).
    likelihood : {"gaussian", "bernoulli"}
    description : str
    seed : int
    """

    name: str
    X_train: np.ndarray
    X_test: np.ndarray
    Z_train: np.ndarray | None
    Z_test: np.ndarray | None
    decoder: nn.Module | None
    noise_std: float | None
    latent_dim: int
    likelihood: str
    description: str
    seed: int

    @property
    def has_ground_truth(self) -> bool:
        """True when the decoder, noise level and true codes are known."""
        return self.decoder is not None

    @property
    def data_dim(self) -> int:
        """D, the number of observed features."""
        return int(self.X_train.shape[1])

    @property
    def n_train(self) -> int:
        return int(self.X_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.X_test.shape[0])


@dataclass(frozen=True)
class DatasetInfo:
    """Registry entry: what :func:`load` will produce for a name."""

    name: str
    description: str
    latent_dim: int
    data_dim: int
    noise_std: float | None
    likelihood: str
    default_n_train: int
    default_n_test: int
    max_n_train: int | None = None
    _make_decoder: Callable[[], nn.Module] | None = field(default=None, repr=False, compare=False)

    @property
    def has_ground_truth(self) -> bool:
        return self._make_decoder is not None


def _linear():
    return LinearDecoder([[1.0], [0.5]], [0.0, 0.0])


_REGISTRY: dict[str, DatasetInfo] = {}


def _register(info: DatasetInfo) -> None:
    _REGISTRY[info.name] = info


_register(DatasetInfo("linear", "1-D line in 2-D, f(z) = (z, z/2): log p(x) in closed form (a check)", 1, 2, 0.1, "gaussian", 1500, 500, None, _linear))
_register(DatasetInfo("spiral", "1-D curve in 2-D: 1.25 turns of a widening spiral", 1, 2, 0.1, "gaussian", 1500, 500, None, SpiralDecoder))
_register(DatasetInfo("fold", "1-D curve in 2-D with f(z) = f(-z): the posterior over z is bimodal", 1, 2, 0.1, "gaussian", 1500, 500, None, FoldDecoder))
_register(DatasetInfo("surface", "2-D wavy sheet in 3-D, f(z) = (z1, z2, 0.6 sin(1.5 z1) cos(1.5 z2))", 2, 3, 0.1, "gaussian", 1500, 500, None, SurfaceDecoder))
_register(DatasetInfo("curve50", "1-D curve in 50-D through a fixed random tanh MLP (16 hidden units)", 1, 50, 0.1, "gaussian", 1500, 500, None, RandomMLPCurveDecoder))
_register(DatasetInfo("digits", "scikit-learn 8x8 digits scaled to [0, 1], no ground truth (K = 2 suggested)", 2, 64, None, "bernoulli", 1500, 297, 1797))


def list_datasets() -> dict[str, str]:
    """Names of the data sets with one-line descriptions, in registry order."""
    return {name: info.description for name, info in _REGISTRY.items()}


def ground_truth_datasets() -> list[str]:
    """Names of the data sets with a known decoder and noise level."""
    return [name for name, info in _REGISTRY.items() if info.has_ground_truth]


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry of ``name`` (latent and data dimension, sigma, defaults)."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def _check_count(name: str, value, default: int, minimum: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def decode(decoder: nn.Module, Z, *, dtype=torch.float64, batch_size: int = 65536) -> np.ndarray:
    """Push codes through a decoder without gradients, in batches.

    Parameters
    ----------
    decoder : torch.nn.Module
        Maps (B, K) to (B, D).
    Z : array of shape (n, K)
    dtype : torch dtype, default float64
        Precision of the evaluation (the true decoders accept any float dtype).

    Returns
    -------
    NumPy array of shape (n, D) in ``dtype``.
    """
    Z = torch.as_tensor(np.asarray(Z), dtype=dtype)
    outs = []
    with torch.no_grad():
        for start in range(0, Z.shape[0], batch_size):
            outs.append(decoder(Z[start : start + batch_size]).to(dtype))
    return torch.cat(outs).numpy() if outs else np.zeros((0, 0))


def _sample_ground_truth(info: DatasetInfo, n_train: int, n_test: int, seed: int) -> Dataset:
    decoder = info._make_decoder().eval()
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)]
    K, sigma = info.latent_dim, info.noise_std

    def draw(z_rng, e_rng, n):
        Z = z_rng.standard_normal((n, K))
        X = decode(decoder, Z) + sigma * e_rng.standard_normal((n, info.data_dim))
        return X.astype(np.float32), Z.astype(np.float32)

    X_train, Z_train = draw(streams[0], streams[1], n_train)
    X_test, Z_test = draw(streams[2], streams[3], n_test)
    return Dataset(info.name, X_train, X_test, Z_train, Z_test, decoder, float(sigma), K, info.likelihood, info.description, seed)


@functools.lru_cache(maxsize=1)
def _digits_array() -> np.ndarray:
    from sklearn.datasets import load_digits

    data = load_digits().data.astype(np.float64) / 16.0
    data.setflags(write=False)
    return data


def _load_digits(info: DatasetInfo, n_train: int, n_test: int, seed: int) -> Dataset:
    data = _digits_array()
    n = data.shape[0]
    if n_train + n_test > n:
        raise ValueError(f"digits has {n} images; n_train + n_test = {n_train + n_test} is too many")
    perm = np.random.default_rng(seed).permutation(n)
    X_train = data[perm[:n_train]].astype(np.float32)
    X_test = data[perm[n - n_test :]].astype(np.float32)
    return Dataset(info.name, X_train, X_test, None, None, None, None, info.latent_dim, info.likelihood, info.description, seed)


def load(name: str, *, n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> Dataset:
    """Sample (or load and split) a data set, deterministically in ``seed``.

    Parameters
    ----------
    name : str
        One of :func:`list_datasets`.
    n_train, n_test : int, optional
        Sizes; defaults 1500 and 500 (digits: 1500 and 297, at most 1797 in all).
    seed : int, default 0
        Non-negative. Same seed, same arrays; the true decoder does not depend on it.

    Returns
    -------
    Dataset
        ``X_train`` (n_train, D) and ``X_test`` (n_test, D) as float32, the true
        codes, decoder and noise level (None for ``digits``).
    """
    info = dataset_info(name)
    n_train = _check_count("n_train", n_train, info.default_n_train, 2)
    n_test = _check_count("n_test", n_test, info.default_n_test, 1)
    seed = _check_seed(seed)
    if info.has_ground_truth:
        return _sample_ground_truth(info, n_train, n_test, seed)
    return _load_digits(info, n_train, n_test, seed)


def exact_log_posterior(dataset: Dataset, queries=None, *, rows=None, **kernel_options) -> np.ndarray:
    """Exact posterior of the empiricalized model, log p(i | x_n), for a ground-truth set.

    ``log p(i | x_n) = -||x_n - f(z_i)||^2 / (2 sigma^2) - log sum_j exp(-||x_n - f(z_j)||^2 / (2 sigma^2))``,
    i over the training codes: the MAPA formula with references f(Z_train) and
    bandwidth sigma, so it is computed by :func:`mapa.log_posterior` in float64.

    Parameters
    ----------
    dataset : Dataset
        Must have ground truth.
    queries : array of shape (n_queries, D), optional
        The observations x_n; default ``dataset.X_train`` (or its ``rows``).
    rows : int array, optional
        With ``queries=None``, use only these training rows as queries.
    **kernel_options
        Passed to :func:`mapa.log_posterior` (backend, block_size, num_threads).

    Returns
    -------
    float64 array of shape (n_queries, n_train)
    """
    from . import log_posterior

    if not dataset.has_ground_truth:
        raise ValueError(f"dataset {dataset.name!r} has no ground truth; the exact posterior needs the true decoder")
    F = decode(dataset.decoder, dataset.Z_train)
    if queries is None:
        queries = dataset.X_train if rows is None else dataset.X_train[np.asarray(rows)]
    Y = np.asarray(queries, dtype=np.float64)
    return np.asarray(log_posterior(F, queries=Y, bandwidth=dataset.noise_std, **kernel_options))
