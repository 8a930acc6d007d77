"""Judging fitted models the way MAPA.md section 5 does.

* Density estimation: mean test log marginal likelihood of each fitted model
  (``FittedModel.log_likelihood``), next to the true model's, which on
  ground-truth sets is computed by quadrature over z (:func:`true_log_likelihood`).
* Computation: decoder and encoder evaluations and training seconds, as the
  fitted model counted them.
* Posterior trend: mean total-variation distance between MAPA's q and the exact
  empiricalized posterior (:func:`posterior_tv`), with the uniform q and the
  self-only q (q(i | n) = 1[i = n]) as reference values.

:func:`compare` does all of it for one data set and seed; :func:`format_table`
renders its result.
"""

from __future__ import annotations

import math
import numbers
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from . import datasets as _datasets

__all__ = [
    "METHODS",
    "total_variation",
    "posterior_tv",
    "true_log_likelihood",
    "evaluate_model",
    "compare",
    "fit_with_curve",
    "format_table",
    "parse_methods",
]

METHODS = ("mapa", "vae", "iwae", "aggressive")

# Samples for the learned models' log-likelihood: None is FittedModel.log_likelihood's
# default (20000 shared prior samples for K <= 2, 5000 importance samples per point above).
DEFAULT_NUM_SAMPLES = None
# Importance samples per point for the true model when K > 2 (MAPA.md section 5).
TRUE_MODEL_IS_SAMPLES = 5000


# ----------------------------------------------------------------------------- posterior distances


def total_variation(log_p, log_q) -> np.ndarray:
    """Row-wise total-variation distance between two row-normalised log-probability tables.

    ``TV_n = 0.5 * sum_i |p(i | n) - q(i | n)|``; 0 for identical rows, 1 for
    disjoint supports. ``-inf`` entries are zero probability.

    Parameters
    ----------
    log_p, log_q : arrays of shape (n_rows, n_cols)
        Log-probabilities; each row should sum to one after ``exp``.

    Returns
    -------
    float64 array of shape (n_rows,)
    """
    log_p = np.asarray(log_p, dtype=np.float64)
    log_q = np.asarray(log_q, dtype=np.float64)
    if log_p.shape != log_q.shape or log_p.ndim != 2:
        raise ValueError(f"log_p and log_q must be 2-D of the same shape, got {log_p.shape} and {log_q.shape}")
    return 0.5 * np.abs(np.exp(log_p) - np.exp(log_q)).sum(axis=1)


def _renormalise_without_self(log_q: np.ndarray, rows: np.ndarray) -> np.ndarray:
    out = log_q.copy()
    out[np.arange(len(rows)), rows] = -np.inf
    m = out.max(axis=1, keepdims=True)
    return out - (m + np.log(np.exp(out - m).sum(axis=1, keepdims=True)))


def posterior_tv(
    dataset: "_datasets.Dataset",
    *,
    bandwidth: float | str | None = None,
    max_rows: int = 1500,
    seed: int = 0,
) -> dict:
    """Mean TV distance of MAPA's q to the exact empiricalized posterior, with references.

    For training points x_n (all of them, or ``max_rows`` chosen with ``seed``):
    p(i | x_n) from :func:`mapa.datasets.exact_log_posterior` and q(i | n) from
    :func:`mapa.log_posterior` on ``X_train``, both over all n_train references.

    Parameters
    ----------
    dataset : Dataset with ground truth
    bandwidth : float or rule name, optional
        MAPA's h; default :func:`mapa.bandwidth_from_noise` of the true sigma.
    max_rows : int, default 1500
        TV is a per-row quantity, so a random subset of rows estimates its mean.

    Returns
    -------
    dict
        ``bandwidth``, ``bandwidth_over_sigma``, ``rows``, and mean TVs:
        ``mapa`` (self term included), ``mapa_exclude_self``, ``mapa_auto``
        (the data-driven ``"auto"`` bandwidth rule of :mod:`mapa.bandwidth`,
        whose value is reported as ``auto_bandwidth``),
        ``uniform`` (q = 1/N) and ``self_only`` (q(i|n) = 1[i = n]).
    """
    from . import bandwidth_from_noise, log_posterior, select_bandwidth

    if not dataset.has_ground_truth:
        raise ValueError(f"dataset {dataset.name!r} has no ground truth; posterior_tv needs the true decoder")
    X = np.asarray(dataset.X_train, dtype=np.float64)
    n, d = X.shape
    sigma = dataset.noise_std
    if bandwidth is None:
        h = bandwidth_from_noise(sigma, d)
    elif isinstance(bandwidth, str):
        h = select_bandwidth(X, bandwidth)
    else:
        h = float(bandwidth)
    rows = np.arange(n) if n <= max_rows else np.sort(np.random.default_rng(seed).choice(n, max_rows, replace=False))
    log_p = _datasets.exact_log_posterior(dataset, rows=rows)
    log_q = np.asarray(log_posterior(X, queries=X[rows], bandwidth=h))
    h_auto = select_bandwidth(X, "auto")
    log_q_auto = np.asarray(log_posterior(X, queries=X[rows], bandwidth=h_auto))
    p = np.exp(log_p)
    return {
        "bandwidth": h,
        "bandwidth_over_sigma": h / sigma,
        "rows": int(len(rows)),
        "mapa": float(total_variation(log_p, log_q).mean()),
        "mapa_exclude_self": float(total_variation(log_p, _renormalise_without_self(log_q, rows)).mean()),
        "auto_bandwidth": h_auto,
        "mapa_auto": float(total_variation(log_p, log_q_auto).mean()),
        "uniform": float((0.5 * np.abs(p - 1.0 / n).sum(axis=1)).mean()),
        "self_only": float((1.0 - p[np.arange(len(rows)), rows]).mean()),
    }


# ----------------------------------------------------------------------------- log-likelihoods


def _quadrature_grid(latent_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Uniform grid over z and log prior weights log(phi(z) dz)."""
    if latent_dim == 1:
        z = np.linspace(-8.0, 8.0, 8001)[:, None]
    elif latent_dim == 2:
        g = np.linspace(-6.5, 6.5, 261)  # spacing 0.05
        z = np.stack(np.meshgrid(g, g, indexing="ij"), axis=-1).reshape(-1, 2)
    else:
        raise ValueError(f"quadrature needs latent_dim <= 2, got {latent_dim}")
    step = z[1, -1] - z[0, -1] if latent_dim == 1 else 0.05
    logw = -0.5 * (z**2).sum(axis=1) - 0.5 * latent_dim * math.log(2 * math.pi) + latent_dim * math.log(step)
    return z, logw


def true_log_likelihood(dataset: "_datasets.Dataset", X=None) -> np.ndarray:
    """Exact log p(x) under the true model of a ground-truth set.

    ``log p(x) = log integral N(x; f(z), sigma^2 I) N(z; 0, I) dz``, by a Riemann sum
    on a uniform grid (K = 1: 8001 points on [-8, 8]; K = 2: 261^2 points on
    [-6.5, 6.5]^2, spacing 0.05), in float64. The grids are much finer than the
    posterior width sigma / |f'(z)| of every registered set, so the sum is exact to
    about 1e-6 (checked against the closed form of ``linear``). The sum is one call
    of :func:`mapa.log_normalizer`, the prior weights folded into an extra
    coordinate of the grid points. For K > 2 it falls
    back to ``mapa.training.marginal_log_likelihood`` (importance sampling).

    Parameters
    ----------
    dataset : Dataset with ground truth
    X : array of shape (n, D), optional
        Default ``dataset.X_test``.

    Returns
    -------
    float64 array of shape (n,)
    """
    if not dataset.has_ground_truth:
        raise ValueError(f"dataset {dataset.name!r} has no ground truth")
    X = np.asarray(dataset.X_test if X is None else X, dtype=np.float64)
    sigma, K = dataset.noise_std, dataset.latent_dim
    if K > 2:
        from .training import marginal_log_likelihood

        return np.asarray(
            marginal_log_likelihood(dataset.decoder, sigma, X, latent_dim=K, num_samples=TRUE_MODEL_IS_SAMPLES), dtype=np.float64
        )
    from . import log_normalizer

    z, logw = _quadrature_grid(K)
    # The kernel's log-normaliser has uniform weights; fold the prior weights into
    # one extra coordinate: -(d^2 + c_j^2) / (2 sigma^2) = -d^2 / (2 sigma^2) + logw_j - max(logw).
    top = float(logw.max())
    c = sigma * np.sqrt(2.0 * (top - logw))
    F = np.column_stack([_datasets.decode(dataset.decoder, z), c])
    Y = np.column_stack([X, np.zeros(X.shape[0])])
    out = np.asarray(log_normalizer(F, queries=Y, bandwidth=sigma), dtype=np.float64) + top
    return out - 0.5 * X.shape[1] * math.log(2 * math.pi * sigma**2)


def _mean_stderr(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    stderr = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan")
    return float(v.mean()), stderr


def evaluate_model(model, X_test, *, num_samples: int | None = DEFAULT_NUM_SAMPLES) -> dict:
    """Test log-likelihood and computation counts of one fitted model.

    Returns
    -------
    dict
        ``method``, ``test_log_likelihood`` (mean over test points),
        ``test_log_likelihood_stderr``, ``decoder_evaluations``,
        ``encoder_evaluations``, ``train_seconds``, ``kernel_seconds`` (MAPA's
        kernel, part of train_seconds), ``eval_seconds``, ``epochs``,
        ``noise_std`` (the model's final sigma), ``bandwidth`` (MAPA's h).
    """
    start = time.perf_counter()
    ll = np.asarray(model.log_likelihood(X_test, num_samples=num_samples), dtype=np.float64)
    eval_seconds = time.perf_counter() - start
    mean, stderr = _mean_stderr(ll)
    return {
        "method": model.method,
        "test_log_likelihood": mean,
        "test_log_likelihood_stderr": stderr,
        "decoder_evaluations": int(model.decoder_evaluations),
        "encoder_evaluations": int(getattr(model, "encoder_evaluations", 0) or 0),
        "train_seconds": float(model.train_seconds),
        "kernel_seconds": float(getattr(model, "kernel_seconds", 0.0) or 0.0),
        "eval_seconds": eval_seconds,
        "epochs": int(getattr(model, "epochs", len(getattr(model, "history", None) or []))),
        "noise_std": None if model.noise_std is None else float(model.noise_std),
        "bandwidth": None if getattr(model, "bandwidth", None) is None else float(model.bandwidth),
    }


# ----------------------------------------------------------------------------- comparison


def parse_methods(methods: str | Iterable[str]) -> tuple[str, ...]:
    """Check method names (a comma-separated string or an iterable) against :data:`METHODS`."""
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",")]
    methods = tuple(methods)
    if not methods or any(not m for m in methods):
        raise ValueError(f"methods must be a non-empty list of names from {', '.join(METHODS)}")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods contains duplicates: {', '.join(methods)}")
    return methods


def _check_epochs(value, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be a positive integer or None, got {value!r}")
    return int(value)


def _epochs_per_method(epochs, methods) -> dict:
    if isinstance(epochs, Mapping):
        unknown = set(epochs) - set(methods)
        if unknown:
            raise ValueError(f"epochs names methods that are not being compared: {', '.join(sorted(unknown))}")
        return {m: _check_epochs(epochs.get(m), f"epochs[{m!r}]") for m in methods}
    value = _check_epochs(epochs, "epochs")
    return {m: value for m in methods}


def _fit(*args, **kwargs):
    from .training import fit

    return fit(*args, **kwargs)


def _default_epochs(method: str) -> int | None:
    try:
        from .training.methods import METHODS as SPECS
    except ImportError:  # pragma: no cover - training not installed
        return None
    spec = SPECS.get(method)
    return None if spec is None else int(spec.epochs)


def _stage_ends(total: int, stages: int) -> list[int]:
    """Epoch counts at which to evaluate: geometric, ending at ``total``."""
    ends = {max(1, round(total / 2 ** (stages - 1 - k))) for k in range(stages)}
    return sorted(ends)


def fit_with_curve(X_train, X_test, *, method: str, epochs: int | None, curve_points: int = 1,
                   num_samples: int | None = DEFAULT_NUM_SAMPLES, **fit_kwargs):
    """Fit one method, recording test log-likelihood against decoder evaluations on the way.

    With ``curve_points > 1`` training runs in stages ending at geometrically spaced
    epoch counts (e.g. 38, 75, 150, 300), each stage resuming the previous one from a
    checkpoint in a temporary directory (``mapa.fit`` resumes exactly, so the final
    model is the one an uninterrupted run gives; ``train_seconds`` then also holds
    the small per-stage restart cost), and the test log-likelihood is evaluated
    after each stage.

    Returns
    -------
    (FittedModel, dict, list of dict)
        The final model, its :func:`evaluate_model` row, and the curve: one
        ``{"epochs", "decoder_evaluations", "encoder_evaluations", "train_seconds",
        "test_log_likelihood"}`` per stage.
    """
    import os
    import tempfile

    total = epochs if epochs is not None else _default_epochs(method)
    if curve_points <= 1 or total is None or "checkpoint" in fit_kwargs:
        model = _fit(X_train, method=method, epochs=epochs, **fit_kwargs)
        row = evaluate_model(model, X_test, num_samples=num_samples)
        return model, row, [_curve_point(model, row)]
    curve = []
    with tempfile.TemporaryDirectory(prefix="mapa-curve-") as tmp:
        path = os.path.join(tmp, f"{method}.ckpt")
        for end in _stage_ends(int(total), int(curve_points)):
            model = _fit(X_train, method=method, epochs=end, checkpoint=path, checkpoint_every=int(total), **fit_kwargs)
            row = evaluate_model(model, X_test, num_samples=num_samples)
            curve.append(_curve_point(model, row))
    return model, row, curve


def _curve_point(model, row) -> dict:
    return {
        "epochs": row["epochs"],
        "decoder_evaluations": row["decoder_evaluations"],
        "encoder_evaluations": row["encoder_evaluations"],
        "train_seconds": row["train_seconds"],
        "test_log_likelihood": row["test_log_likelihood"],
    }


def compare(
    dataset: str,
    methods: Sequence[str] = ("mapa", "vae", "iwae"),
    *,
    seed: int = 0,
    n_train: int | None = None,
    n_test: int | None = None,
    epochs: int | None = None,
    num_samples: int | None = DEFAULT_NUM_SAMPLES,
    curve_points: int = 1,
    known_noise: bool = True,
    output_dir=None,
    progress: bool | None = None,
    fit_options: dict | None = None,
    log: Callable[[str], Any] | None = None,
) -> dict:
    """Fit each method on one data set and seed, and evaluate them side by side.

    Parameters
    ----------
    dataset : str
        A name from :func:`mapa.datasets.list_datasets`.
    methods : sequence of str
        Any of ``"mapa"``, ``"vae"``, ``"iwae"``, ``"aggressive"``.
    seed : int
        Seeds both the data sample and every fit.
    n_train, n_test : int, optional
        Data set sizes (defaults of :func:`mapa.datasets.load`).
    epochs : int or mapping of method name to int, optional
        Passed to :func:`mapa.fit` (None, or a method left out of the mapping:
        that method's default).
    num_samples : int, optional
        Samples for ``FittedModel.log_likelihood`` (None: its default, 20000
        prior samples for K <= 2, 5000 importance samples per point above).
    curve_points : int, default 1
        Evaluate the test log-likelihood after this many training stages
        (see :func:`fit_with_curve`) to trace it against decoder evaluations.
    known_noise : bool, default True
        On ground-truth sets, give every method the true sigma (fixed, so only the
        inference differs); False lets each method learn it.
    output_dir : path, optional
        Write the plots of :mod:`mapa.plots` there.
    progress : bool, optional
        Passed to :func:`mapa.fit` (None: its default, a bar when stderr is a terminal).
    fit_options : dict, optional
        Extra keyword arguments for every :func:`mapa.fit` call.
    log : callable, optional
        Called with one-line status messages (e.g. ``print``).

    Returns
    -------
    dict
        ``dataset``, ``seed``, ``n_train``, ``n_test``, ``latent_dim``,
        ``data_dim``, ``noise_std``, ``epochs`` (per method, None for the
        default), ``num_samples``, ``results``
        (one dict per method, see :func:`evaluate_model`, plus ``curve``: test
        log-likelihood against decoder evaluations, one point per stage),
        ``true_test_log_likelihood`` and its ``_stderr`` (None
        without ground truth), ``posterior_tv`` (see :func:`posterior_tv`; None
        without ground truth), ``plots`` (file paths) and ``seconds``.
    """
    say = log or (lambda msg: None)
    started = time.perf_counter()
    methods = parse_methods(methods)
    epochs_of = _epochs_per_method(epochs, methods)
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 1):
        raise ValueError(f"num_samples must be a positive integer or None, got {num_samples!r}")
    if isinstance(curve_points, bool) or not isinstance(curve_points, numbers.Integral) or curve_points < 1:
        raise ValueError(f"curve_points must be a positive integer, got {curve_points!r}")
    ds = _datasets.load(dataset, n_train=n_train, n_test=n_test, seed=seed)
    say(f"{ds.name}: {ds.n_train} train / {ds.n_test} test points, D = {ds.data_dim}, K = {ds.latent_dim}")

    options = dict(fit_options or {})
    options.setdefault("likelihood", ds.likelihood)
    if known_noise and ds.noise_std is not None:
        options.setdefault("noise_std", ds.noise_std)
    if progress is not None:
        options.setdefault("progress", progress)

    results, models = [], {}
    for method in methods:
        say(f"fitting {method} ...")
        model, row, curve = fit_with_curve(
            ds.X_train, ds.X_test, method=method, epochs=epochs_of[method], curve_points=curve_points,
            num_samples=num_samples, latent_dim=ds.latent_dim, seed=seed, **options,
        )
        row["curve"] = curve
        results.append(row)
        models[method] = model
        say(
            f"  {method}: test log-likelihood {row['test_log_likelihood']:.3f}, "
            f"{row['decoder_evaluations']:,} decoder evaluations, {row['train_seconds']:.1f} s"
        )

    out: dict[str, Any] = {
        "dataset": ds.name,
        "seed": ds.seed,
        "n_train": ds.n_train,
        "n_test": ds.n_test,
        "latent_dim": ds.latent_dim,
        "data_dim": ds.data_dim,
        "noise_std": ds.noise_std,
        "likelihood": ds.likelihood,
        "epochs": dict(epochs_of),
        "num_samples": num_samples,
        "known_noise": bool(known_noise and ds.noise_std is not None),
        "results": results,
        "true_test_log_likelihood": None,
        "true_test_log_likelihood_stderr": None,
        "posterior_tv": None,
        "plots": {},
    }
    if ds.has_ground_truth:
        out["true_test_log_likelihood"], out["true_test_log_likelihood_stderr"] = _mean_stderr(true_log_likelihood(ds))
        out["posterior_tv"] = posterior_tv(ds, seed=seed)
    if output_dir is not None:
        from . import plots

        out["plots"] = plots.plot_comparison(ds, models, out, output_dir)
        say(f"plots written to {output_dir}")
    out["seconds"] = time.perf_counter() - started
    return out


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def format_table(result: dict) -> str:
    """Render a :func:`compare` result as a markdown table (readable as plain text).

    One row per method plus the true model; then the posterior TV line.
    """
    lines = [
        f"{result['dataset']} (seed {result['seed']}, {result['n_train']} train / {result['n_test']} test, "
        f"D = {result['data_dim']}, K = {result['latent_dim']})",
        "",
        "| method | test log-lik. | +- s.e. | decoder evals | encoder evals | train s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['method']} | {_fmt(r['test_log_likelihood'], '.3f')} | {_fmt(r['test_log_likelihood_stderr'], '.3f')} | "
            f"{r['decoder_evaluations']:,} | {r['encoder_evaluations']:,} | {r['train_seconds']:.1f} |"
        )
    if result.get("true_test_log_likelihood") is not None:
        lines.append(
            f"| true model | {result['true_test_log_likelihood']:.3f} | {_fmt(result['true_test_log_likelihood_stderr'], '.3f')} | - | - | - |"
        )
    tv = result.get("posterior_tv")
    if tv:
        lines += [
            "",
            f"Posterior TV to the exact empiricalized posterior (mean over {tv['rows']} points; 0 = exact): "
            f"MAPA {tv['mapa']:.3f} (h = {tv['bandwidth_over_sigma']:.2f} sigma), "
            f"MAPA without self {tv['mapa_exclude_self']:.3f}, uniform {tv['uniform']:.3f}, self-only {tv['self_only']:.3f}",
        ]
    return "\n".join(lines)
