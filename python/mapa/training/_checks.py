"""Validation of the training entry points' arguments (before any work is done)."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import nn

__all__ = ["check_data", "check_latent_dim", "check_noise_std", "check_decoder", "check_likelihood", "LIKELIHOODS"]

LIKELIHOODS = ("gaussian", "bernoulli")


def check_data(name: str, X, *, min_rows: int = 1) -> np.ndarray:
    """X as a float64 array of shape (N, D), finite, N >= ``min_rows``."""
    if isinstance(X, torch.Tensor):
        if X.device.type != "cpu":
            raise TypeError(f"{name} is a torch tensor on {X.device}; pass {name}.cpu()")
        if X.is_complex():
            raise TypeError(f"{name} has complex dtype {X.dtype}; pass real numbers")
        X = X.detach().cpu().to(torch.float64).numpy()
    elif X is None or isinstance(X, (str, bytes)):
        raise TypeError(f"{name} must be an array of shape (n_points, n_features), got {type(X).__name__}")
    try:
        arr = np.asarray(X)
    except Exception as exc:
        raise TypeError(f"{name} could not be converted to an array: {exc}") from None
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} has dtype {arr.dtype}; pass real numbers (an array of shape (n_points, n_features))")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if arr.ndim != 2:
        hint = " (use X.reshape(-1, 1) for one feature)" if arr.ndim == 1 else ""
        raise ValueError(f"{name} must be 2-D of shape (n_points, n_features), got shape {arr.shape}{hint}")
    if arr.shape[0] < min_rows or arr.shape[1] < 1:
        raise ValueError(f"{name} has shape {arr.shape}; it needs at least {min_rows} rows and 1 column")
    if not np.isfinite(arr).all():
        row, col = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"{name} contains NaN or inf (first at row {row}, column {col}); remove or impute them")
    return arr


def check_latent_dim(latent_dim) -> int:
    if isinstance(latent_dim, bool) or not isinstance(latent_dim, numbers.Integral) or latent_dim < 1:
        raise ValueError(f"latent_dim must be an integer >= 1, got {latent_dim!r}")
    return int(latent_dim)


def check_noise_std(noise_std, *, allow_none: bool = True) -> float | None:
    if noise_std is None and allow_none:
        return None
    if isinstance(noise_std, bool) or not isinstance(noise_std, numbers.Real) or not (
        math.isfinite(noise_std) and noise_std > 0
    ):
        what = "None (learned) or " if allow_none else ""
        raise ValueError(f"noise_std must be {what}a finite float > 0, got {noise_std!r}")
    return float(noise_std)


def check_likelihood(likelihood, X: np.ndarray) -> str:
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {list(LIKELIHOODS)}, got {likelihood!r}")
    if likelihood == "bernoulli" and (X.min() < 0.0 or X.max() > 1.0):
        raise ValueError(
            f"likelihood='bernoulli' needs data in [0, 1], but X spans [{X.min():.4g}, {X.max():.4g}]; "
            f"rescale X or use likelihood='gaussian'"
        )
    return likelihood


def param_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype of a module's parameters (float32 if it has none)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def check_decoder(decoder, latent_dim: int, data_dim: int, name: str = "decoder") -> None:
    """A torch module mapping (B, latent_dim) to (B, data_dim)."""
    if not isinstance(decoder, nn.Module):
        raise TypeError(
            f"{name} must be a torch.nn.Module mapping (batch, latent_dim) -> (batch, n_features), "
            f"got {type(decoder).__name__}"
        )
    probe = torch.zeros(3, latent_dim, dtype=param_dtype(decoder))
    try:
        with torch.no_grad():
            out = decoder(probe)
    except Exception as exc:
        raise ValueError(
            f"{name} failed on a probe batch of shape (3, {latent_dim}) (latent_dim={latent_dim}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (3, data_dim):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"{name} must map (batch, latent_dim) -> (batch, n_features); on a probe batch of shape "
            f"(3, {latent_dim}) it returned {shape}, expected (3, {data_dim})"
        )
