"""mapa: model-agnostic posterior approximation (MAPA) for VAE-style models.

The MAPA posterior of a query y_m over reference points x_i is a softmax of
negative scaled squared distances,

    log q(i | m) = -||y_m - x_i||^2 / (2 h^2) - log sum_j exp(-||y_m - x_j||^2 / (2 h^2)),

computed by a blocked, streaming kernel (C++/OpenMP, with Numba and NumPy
fallbacks) that never holds the (M, N) matrix unless asked:

* :func:`log_normalizer` - the log-normaliser of each row;
* :func:`log_posterior` - dense rows, for small problems;
* :func:`log_posterior_topk` - top-k rows with exact normalisers;
* :func:`posterior_targets` - per-reference training statistics (W, m, s).

:func:`available_backends` and :func:`show_config` say what runs here;
:mod:`mapa.bandwidth` documents the bandwidth rules.
"""

from ._config import config, show_config
from ._dispatch import available_backends
from ._kernel import (
    PosteriorTargets,
    TopKPosterior,
    log_normalizer,
    log_posterior,
    log_posterior_topk,
    posterior_targets,
)
from .bandwidth import bandwidth_from_noise, estimate_noise_std, select_bandwidth

__version__ = "0.1.0"

__all__ = [
    "fit",
    "FittedModel",
    "PosteriorTargets",
    "TopKPosterior",
    "available_backends",
    "bandwidth_from_noise",
    "config",
    "estimate_noise_std",
    "log_normalizer",
    "log_posterior",
    "log_posterior_topk",
    "posterior_targets",
    "select_bandwidth",
    "show_config",
]

# Training, data sets and evaluation import torch: load them on first use so
# that `import mapa` stays a light import for kernel-only users.
_LAZY_MODULES = ("datasets", "evaluate", "training", "plots", "cli")
_LAZY_ATTRS = {"fit": "training", "FittedModel": "training"}


def __getattr__(name):
    import importlib

    if name in _LAZY_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _LAZY_ATTRS:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY_ATTRS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
