"""The methods: each is a model plus an objective (plus an update rule).

=============  ======================  ==============================  =================
method         model                   objective                       update rule
=============  ======================  ==============================  =================
``mapa``       decoder + code table    :class:`MapaTargetsObjective`   :class:`JointUpdate`
                                       (or :class:`MapaTopKObjective`)
``vae``        encoder + decoder       :class:`ElboObjective`          :class:`JointUpdate`
``iwae``       encoder + decoder       :class:`IwaeObjective`          :class:`JointUpdate`
``aggressive`` encoder + decoder       :class:`ElboObjective`          :class:`AggressiveUpdate`
=============  ======================  ==============================  =================

A :class:`MethodSpec` holds a method's defaults (epochs, batch size, learning
rate), its own options with their defaults and checks, and its ``build``
function; :data:`METHODS` maps names to specs. Adding a method means adding a
spec here, nothing in the trainer.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from .._kernel import log_posterior_topk, posterior_targets
from ..bandwidth import RULES, bandwidth_from_noise, select_bandwidth
from .models import CodeTableModel, EncoderDecoderModel, GaussianEncoder
from .objectives import ElboObjective, IwaeObjective, MapaTargetsObjective, MapaTopKObjective, Objective
from .updates import AggressiveUpdate, JointUpdate

__all__ = ["Setup", "Method", "MethodSpec", "METHODS"]


@dataclass
class Setup:
    """Everything a method's ``build`` receives from :func:`mapa.fit`."""

    X: np.ndarray  # float64 (N, D), validated
    latent_dim: int
    decoder: nn.Module
    likelihood: nn.Module
    rng: torch.Generator
    learning_rate: float
    noise_std: float | None  # as given by the user (None: learned)
    progress: bool
    dtype: torch.dtype = torch.float32


@dataclass
class Method:
    """A ready-to-train method: what the shared trainer needs."""

    name: str
    model: nn.Module
    objective: Objective
    update: Any
    info: dict = field(default_factory=dict)  # e.g. bandwidth, kernel_seconds


# ----------------------------------------------------------------------------- option checks


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _positive_float(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
    return float(value)


def _boolean(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _choice(*choices):
    def check(name, value):
        if value not in choices:
            raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
        return value

    return check


def _bandwidth(name, value):
    if value is None:
        return None
    if isinstance(value, str):
        if value not in RULES:
            raise ValueError(f"{name} must be a float > 0 or one of the rules {list(RULES)}, got {value!r}")
        return value
    return _positive_float(name, value)


def _optional(check):
    return lambda name, value: None if value is None else check(name, value)


# ----------------------------------------------------------------------------- MAPA


def _mapa_bandwidth(setup: Setup, requested) -> float:
    """The bandwidth h: as given, a rule's value, or bandwidth_from_noise(noise_std, D) for a known sigma."""
    D = setup.X.shape[1]
    if requested is None:
        requested = "auto" if setup.noise_std is None else bandwidth_from_noise(setup.noise_std, D)
    if isinstance(requested, str):
        return select_bandwidth(setup.X, rule=requested)
    return float(requested)


def _mapa_targets(setup: Setup, opts: dict, h: float) -> Objective:
    W, m, s = posterior_targets(
        setup.X, bandwidth=h, exclude_self=opts["exclude_self"], progress=setup.progress or None
    )
    return MapaTargetsObjective(W, m, s, dtype=setup.dtype)


def _mapa_topk(setup: Setup, opts: dict, h: float) -> Objective:
    N = setup.X.shape[0]
    k = min(opts["k"], N - 1 if opts["exclude_self"] else N)
    top = log_posterior_topk(
        setup.X, bandwidth=h, k=k, exclude_self=opts["exclude_self"], progress=setup.progress or None
    )
    return MapaTopKObjective(setup.X, top.indices, top.log_prob, dtype=setup.dtype)


_MAPA_OBJECTIVES: dict[str, tuple[Callable, type]] = {
    "targets": (_mapa_targets, MapaTargetsObjective),
    "topk": (_mapa_topk, MapaTopKObjective),
}


def _prior_codes(setup: Setup) -> torch.Tensor:
    """N independent draws from the prior N(0, I_K), assigned to the points at random."""
    return torch.randn((setup.X.shape[0], setup.latent_dim), generator=setup.rng, dtype=setup.dtype)


def _pca_codes(setup: Setup) -> torch.Tensor:
    """The same N prior draws, assigned to the points by rank along the principal axes.

    Coordinate k of the codes holds the sorted k-th coordinates of the prior
    draws, placed in the order of the points' projections on the k-th
    principal component of X (for K > D the remaining coordinates stay
    random). The codes are still exactly the prior samples, coordinate by
    coordinate, but neighbours in X start with neighbouring codes, which spares
    the decoder from untangling a random assignment.
    """
    Z = _prior_codes(setup)
    Xc = setup.X - setup.X.mean(axis=0)
    _, _, Vt = np.linalg.svd(Xc, full_matrices=False)
    proj = Xc @ Vt.T  # (N, min(N, D))
    for k in range(min(setup.latent_dim, proj.shape[1])):
        order = torch.from_numpy(np.argsort(proj[:, k], kind="stable"))
        column = torch.empty_like(Z[:, k])
        column[order] = torch.sort(Z[:, k]).values
        Z[:, k] = column
    return Z


_CODE_INITS = {"prior": _prior_codes, "pca": _pca_codes}


def _build_mapa(setup: Setup, opts: dict, restored: dict | None) -> Method:
    compute, cls = _MAPA_OBJECTIVES[opts["mapa_objective"]]
    if restored is None:
        start = time.perf_counter()
        h = _mapa_bandwidth(setup, opts["bandwidth"])
        objective = compute(setup, opts, h)
        info = {"bandwidth": h, "kernel_seconds": time.perf_counter() - start}
    else:
        objective = cls.from_state(restored["data_state"])
        info = dict(restored["info"])
    codes = _CODE_INITS[opts["code_init"]](setup)
    model = CodeTableModel(setup.decoder, setup.likelihood, codes)
    code_lr = opts["code_learning_rate"]
    update = JointUpdate(
        model,
        objective,
        [
            {"params": model.generative_parameters(), "lr": setup.learning_rate},
            {"params": model.inference_parameters(), "lr": code_lr},
        ],
    )
    return Method("mapa", model, objective, update, info)


# ----------------------------------------------------------------------------- VAE family


def _encoder_model(setup: Setup) -> EncoderDecoderModel:
    encoder = GaussianEncoder(setup.X.shape[1], setup.latent_dim).to(setup.dtype)
    return EncoderDecoderModel(encoder, setup.decoder, setup.likelihood)


def _build_vae(setup, opts, restored):
    model = _encoder_model(setup)
    objective = ElboObjective(setup.X, opts["num_samples"], opts["analytic_kl"], dtype=setup.dtype)
    update = JointUpdate(model, objective, [{"params": model.parameters(), "lr": setup.learning_rate}])
    return Method("vae", model, objective, update)


def _build_iwae(setup, opts, restored):
    model = _encoder_model(setup)
    objective = IwaeObjective(setup.X, opts["num_samples"], dtype=setup.dtype)
    update = JointUpdate(model, objective, [{"params": model.parameters(), "lr": setup.learning_rate}])
    return Method("iwae", model, objective, update)


def _build_aggressive(setup, opts, restored):
    model = _encoder_model(setup)
    objective = ElboObjective(setup.X, opts["num_samples"], opts["analytic_kl"], dtype=setup.dtype)
    N = setup.X.shape[0]
    mi_rows = torch.randperm(N, generator=setup.rng)[: min(N, opts["mi_batch_size"])]
    update = AggressiveUpdate(
        model,
        objective,
        setup.learning_rate,
        objective.X[mi_rows],
        max_inner_steps=opts["max_inner_steps"],
    )
    return Method("aggressive", model, objective, update)


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class MethodSpec:
    """A method's defaults, its own options and its builder.

    ``options`` maps each method-specific option to ``(default, check)``;
    ``build(setup, options, restored)`` returns a :class:`Method`
    (``restored`` holds a checkpoint's data-derived state, or None).
    """

    name: str
    summary: str
    epochs: int
    batch_size: int
    learning_rate: float
    options: Mapping[str, tuple[Any, Callable]]
    build: Callable[[Setup, dict, dict | None], Method]


_ENCODER_OPTIONS = {
    "num_samples": (1, _positive_int),
    "analytic_kl": (True, _boolean),
}

METHODS: dict[str, MethodSpec] = {
    "mapa": MethodSpec(
        "mapa",
        "MAPA: fixed model-agnostic posterior, decoder and code table trained on its statistics",
        epochs=60,
        batch_size=64,
        learning_rate=5e-3,
        options={
            "bandwidth": (None, _bandwidth),
            "exclude_self": (False, _boolean),
            "mapa_objective": ("targets", _choice(*_MAPA_OBJECTIVES)),
            "k": (64, _positive_int),
            "code_learning_rate": (3e-3, _positive_float),
            "code_init": ("pca", _choice(*_CODE_INITS)),
        },
        build=_build_mapa,
    ),
    "vae": MethodSpec(
        "vae",
        "VAE: Gaussian encoder, S-sample ELBO (Kingma and Welling 2014)",
        epochs=300,
        batch_size=128,
        learning_rate=2e-3,
        options=_ENCODER_OPTIONS,
        build=_build_vae,
    ),
    "iwae": MethodSpec(
        "iwae",
        "IWAE: Gaussian encoder, K-sample importance-weighted bound (Burda et al. 2016)",
        epochs=300,
        batch_size=128,
        learning_rate=2e-3,
        options={"num_samples": (10, _positive_int)},
        build=_build_iwae,
    ),
    "aggressive": MethodSpec(
        "aggressive",
        "VAE with aggressive encoder training (He et al. 2019)",
        epochs=300,
        batch_size=128,
        learning_rate=2e-3,
        options={**_ENCODER_OPTIONS, "max_inner_steps": (100, _positive_int), "mi_batch_size": (500, _positive_int)},
        build=_build_aggressive,
    ),
}
