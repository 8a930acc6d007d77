"""Figures for comparisons: learned density vs truth, posterior heat maps, cost curves.

Figures are drawn with :class:`matplotlib.figure.Figure` and the Agg canvas,
without touching pyplot's global state, and every file is written atomically
(saved to a temporary file in the target directory, then ``os.replace``).

* :func:`plot_density` - D = 2: log-density heat maps of the true and learned
  models with test points on top; D > 2: samples of each model against the data
  in the data's first two principal components; Bernoulli data: a grid of
  decoded images.
* :func:`plot_posterior` - the exact empiricalized posterior p(i | x_n) next to
  MAPA's q(i | n), queries and references ordered by true code.
* :func:`plot_ll_vs_evaluations` - test log-likelihood against decoder
  evaluations per method, with the true model's as a line.
* :func:`plot_comparison` - all that apply, for :func:`mapa.evaluate.compare`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import numpy as np

from ._io import atomic_open

__all__ = [
    "save_figure",
    "plot_density",
    "plot_posterior",
    "plot_ll_vs_evaluations",
    "plot_comparison",
]

_COLORS = {"mapa": "C3", "vae": "C0", "iwae": "C2", "aggressive": "C1"}


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path) -> Path:
    """Write ``fig`` to ``path`` atomically (temporary file in the same directory, then ``os.replace``).

    The format follows the suffix (PNG by default); parent directories are created.
    """
    path = Path(path)
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format=(path.suffix.lstrip(".") or "png"), dpi=110)
    return path


def _decode_samples(decoder, latent_dim: int, n: int, seed: int) -> np.ndarray:
    import torch

    gen = torch.Generator().manual_seed(seed)
    param = next(iter(decoder.parameters()), None)
    dtype = param.dtype if param is not None else torch.float32
    z = torch.randn(n, latent_dim, generator=gen, dtype=dtype)
    with torch.no_grad():
        return decoder(z).detach().to(torch.float64).numpy()


def _model_samples(model, likelihood: str, n: int, seed: int) -> np.ndarray:
    """Samples x ~ p(x) of a fitted model (Bernoulli: the decoded means)."""
    F = _decode_samples(model.decoder, model.latent_dim, n, seed)
    if likelihood == "bernoulli":
        return 1.0 / (1.0 + np.exp(-F))
    noise = 0.0 if model.noise_std is None else float(model.noise_std)
    return F + noise * np.random.default_rng(seed + 1).standard_normal(F.shape)


def _model_log_density(model, grid: np.ndarray, num_samples: int, seed: int) -> np.ndarray:
    """log p(x) of a Gaussian-likelihood model on grid points, by prior samples through the kernel."""
    from . import log_normalizer

    F = _decode_samples(model.decoder, model.latent_dim, num_samples, seed)
    sigma = float(model.noise_std)
    d = grid.shape[1]
    lnorm = np.asarray(log_normalizer(F, queries=grid, bandwidth=sigma), dtype=np.float64)
    return lnorm - math.log(num_samples) - 0.5 * d * math.log(2 * math.pi * sigma**2)


def _grid_2d(X: np.ndarray, size: int):
    lo, hi = X.min(axis=0), X.max(axis=0)
    pad = 0.1 * (hi - lo)
    gx = np.linspace(lo[0] - pad[0], hi[0] + pad[0], size)
    gy = np.linspace(lo[1] - pad[1], hi[1] + pad[1], size)
    xx, yy = np.meshgrid(gx, gy)
    return np.column_stack([xx.ravel(), yy.ravel()]), (gx[0], gx[-1], gy[0], gy[-1])


def plot_density(dataset, models: Mapping[str, object], path, *, grid_size: int = 120, num_samples: int = 4000, seed: int = 0) -> Path:
    """Learned density against the truth.

    Parameters
    ----------
    dataset : mapa.datasets.Dataset
    models : mapping of method name to FittedModel
    path : file path of the PNG
    grid_size : int
        Heat-map resolution per axis (D = 2).
    num_samples : int
        Prior samples per model for its log-density (D = 2) or scatter (D > 2).

    Returns
    -------
    pathlib.Path of the written file.
    """
    X = np.asarray(dataset.X_train, dtype=np.float64)
    Xt = np.asarray(dataset.X_test, dtype=np.float64)
    D = X.shape[1]
    panels = (["truth"] if dataset.has_ground_truth else ["data"]) + list(models)
    ncol = len(panels)
    fig = _figure(3.3 * ncol, 3.3 if dataset.likelihood != "bernoulli" else 3.6)
    axes = np.atleast_1d(fig.subplots(1, ncol, squeeze=False)[0])

    if dataset.likelihood == "bernoulli" and math.isqrt(D) ** 2 == D:
        side = math.isqrt(D)
        for ax, name in zip(axes, panels):
            imgs = Xt[:25] if name in ("data", "truth") else _model_samples(models[name], dataset.likelihood, 25, seed)
            mosaic = np.zeros((5 * (side + 1) - 1, 5 * (side + 1) - 1))
            for k, img in enumerate(imgs[:25]):
                r, c = divmod(k, 5)
                mosaic[r * (side + 1) : r * (side + 1) + side, c * (side + 1) : c * (side + 1) + side] = img.reshape(side, side)
            ax.imshow(mosaic, cmap="gray_r", vmin=0, vmax=1)
            ax.set_title("test data" if name in ("data", "truth") else f"{name}: decoded means")
            ax.set_axis_off()
        fig.suptitle(f"{dataset.name}: data and samples")
    elif D == 2:
        grid, extent = _grid_2d(np.vstack([X, Xt]), grid_size)
        fields = {}
        if dataset.has_ground_truth:
            from .evaluate import true_log_likelihood

            fields["truth"] = true_log_likelihood(dataset, grid)
        for name, model in models.items():
            if model.noise_std is None:
                continue
            fields[name] = _model_log_density(model, grid, num_samples, seed)
        top = max(float(np.max(f)) for f in fields.values()) if fields else 0.0
        for ax, name in zip(axes, panels):
            if name in fields:
                im = ax.imshow(
                    np.clip(fields[name], top - 12.0, None).reshape(grid_size, grid_size),
                    origin="lower", extent=extent, aspect="auto", cmap="viridis", vmin=top - 12.0, vmax=top,
                )
            else:
                ax.scatter(*_model_samples(models[name], dataset.likelihood, 1000, seed).T, s=2, c="C1")
                im = None
            ax.scatter(Xt[:300, 0], Xt[:300, 1], s=1.5, c="white", alpha=0.6, linewidths=0)
            ax.set_title("true log p(x)" if name == "truth" else f"{name}: log p(x)")
            ax.set_xlim(extent[0], extent[1])
            ax.set_ylim(extent[2], extent[3])
        if im is not None:
            fig.colorbar(im, ax=axes.tolist(), shrink=0.85, label="log density (clipped at max - 12)")
        fig.suptitle(f"{dataset.name}: learned density vs truth (white: test points)")
    else:
        mean = X.mean(axis=0)
        _, _, vt = np.linalg.svd(X - mean, full_matrices=False)
        P = vt[:2].T
        proj = lambda A: (np.asarray(A, dtype=np.float64) - mean) @ P  # noqa: E731
        for ax, name in zip(axes, panels):
            ax.scatter(*proj(Xt).T, s=2, c="0.6", label="test data", linewidths=0)
            if name == "truth":
                from .datasets import decode

                rng = np.random.default_rng(seed)
                Z = rng.standard_normal((1000, dataset.latent_dim))
                S = decode(dataset.decoder, Z) + dataset.noise_std * rng.standard_normal((1000, D))
            elif name == "data":
                S = X[:1000]
            else:
                S = _model_samples(models[name], dataset.likelihood, 1000, seed)
            ax.scatter(*proj(S).T, s=2, c=_COLORS.get(name, "C4"), label="samples", linewidths=0)
            ax.set_title("true model samples" if name == "truth" else f"{name}: samples")
            ax.set_xlabel("PC 1")
        axes[0].set_ylabel("PC 2")
        axes[0].legend(loc="best", fontsize=7, markerscale=4)
        fig.suptitle(f"{dataset.name}: samples vs test data, first two principal components of the data")
    return save_figure(fig, path)


def _order_by_code(Z: np.ndarray) -> np.ndarray:
    return np.lexsort(tuple(Z[:, k] for k in reversed(range(Z.shape[1]))))


def plot_posterior(dataset, path, *, n_points: int = 60, bandwidth=None, exclude_self: bool = False) -> Path:
    """Heat maps of the exact empiricalized posterior and MAPA's q for a subset of points.

    Rows are ``n_points`` training points evenly spaced in the order of their true
    code (K = 2: lexicographic, z1 first); columns are all training points in the
    same order. Colour is probability divided by the row maximum, on a
    square-root scale.

    Parameters
    ----------
    dataset : Dataset with ground truth
    path : file path of the PNG
    bandwidth : float, optional
        MAPA's h; default :func:`mapa.bandwidth_from_noise` of the true sigma.
    exclude_self : bool
        Leave the self term out of q (and its row normaliser).
    """
    from matplotlib.colors import PowerNorm

    from . import bandwidth_from_noise, log_posterior
    from .datasets import exact_log_posterior

    if not dataset.has_ground_truth:
        raise ValueError(f"dataset {dataset.name!r} has no ground truth; plot_posterior needs it")
    X = np.asarray(dataset.X_train, dtype=np.float64)
    n = X.shape[0]
    order = _order_by_code(np.asarray(dataset.Z_train))
    rows = order[np.linspace(0, n - 1, min(n_points, n)).round().astype(int)]
    h = bandwidth_from_noise(dataset.noise_std, X.shape[1]) if bandwidth is None else float(bandwidth)
    p = np.exp(exact_log_posterior(dataset, rows=rows))[:, order]
    if exclude_self:
        logq = np.asarray(log_posterior(X, bandwidth=h, exclude_self=True))[rows]
    else:
        logq = np.asarray(log_posterior(X, queries=X[rows], bandwidth=h))
    q = np.exp(logq)[:, order]
    fig = _figure(10, 4)
    axes = fig.subplots(1, 2)
    for ax, mat, title in (
        (axes[0], p, f"exact p(i | x_n), sigma = {dataset.noise_std:g}"),
        (axes[1], q, f"MAPA q(i | n), h = {h:.3g}" + (", self excluded" if exclude_self else "")),
    ):
        scaled = mat / mat.max(axis=1, keepdims=True)
        im = ax.imshow(scaled, aspect="auto", interpolation="nearest", cmap="magma", norm=PowerNorm(0.5, vmin=0.0, vmax=1.0))
        ax.set_title(title)
        ax.set_xlabel("reference i (ordered by true code)")
        fig.colorbar(im, ax=ax, shrink=0.85, label="probability / row maximum")
    axes[0].set_ylabel("query point n (ordered by true code)")
    fig.suptitle(f"{dataset.name}: posterior over the {n} training codes")
    return save_figure(fig, path)


def plot_ll_vs_evaluations(result: dict, path) -> Path:
    """Test log-likelihood against decoder evaluations for each method of a :func:`compare` result.

    Each method's ``curve`` (one point per training stage, see
    :func:`mapa.evaluate.fit_with_curve`) is drawn as a line; its final result is always a marker. The true model's test
    log-likelihood, when known, is a dashed horizontal line.
    """
    fig = _figure(5.5, 4)
    ax = fig.subplots()
    for r in result["results"]:
        color = _COLORS.get(r["method"], None)
        curve = r.get("curve") or []
        if curve:
            ax.plot([max(c["decoder_evaluations"], 1) for c in curve], [c["test_log_likelihood"] for c in curve],
                    "-", marker=".", color=color, alpha=0.7)
        ax.errorbar(
            [max(r["decoder_evaluations"], 1)], [r["test_log_likelihood"]],
            yerr=[r.get("test_log_likelihood_stderr") or 0.0], fmt="o", color=color, label=r["method"], capsize=3,
        )
    if result.get("true_test_log_likelihood") is not None:
        true_ll = result["true_test_log_likelihood"]
        ax.axhline(true_ll, color="k", ls="--", lw=1, label="true model")
        lo, hi = ax.get_ylim()
        ax.set_ylim(min(lo, true_ll), max(hi, true_ll + 0.05 * (max(hi, true_ll) - lo)))
    ax.set_xscale("log")
    ax.set_xlabel("decoder evaluations")
    ax.set_ylabel("mean test log-likelihood")
    ax.set_title(f"{result['dataset']} (seed {result['seed']})")
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def plot_comparison(dataset, models: Mapping[str, object], result: dict, output_dir) -> dict:
    """Write every figure that applies to a comparison; return ``{kind: path}`` as strings."""
    out = Path(output_dir)
    stem = f"{dataset.name}-seed{dataset.seed}"
    paths = {
        "density": plot_density(dataset, models, out / f"{stem}-density.png"),
        "log_likelihood_vs_evaluations": plot_ll_vs_evaluations(result, out / f"{stem}-ll-vs-evaluations.png"),
    }
    if dataset.has_ground_truth:
        paths["posterior"] = plot_posterior(dataset, out / f"{stem}-posterior.png")
    return {k: str(v) for k, v in paths.items()}
