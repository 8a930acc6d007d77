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


def _prior_codes(setup: Setup, h: float | None = None) -> torch.Tensor:
    """N independent draws from the prior N(0, I_K), assigned to the points at random."""
    return torch.randn((setup.X.shape[0], setup.latent_dim), generator=setup.rng, dtype=setup.dtype)


def _codes_by_rank(setup: Setup, scores: np.ndarray) -> torch.Tensor:
    """N prior draws, coordinate k placed on the points in the order of ``scores[:, k]``.

    Coordinate k of the codes holds the sorted k-th coordinates of N draws from
    N(0, I_K), the smallest on the point with the smallest score (a Gaussian
    copula of the scores). The codes are therefore still exactly the prior
    samples, coordinate by coordinate; coordinates beyond ``scores.shape[1]``
    stay at random.
    """
    Z = _prior_codes(setup)
    for k in range(min(setup.latent_dim, scores.shape[1])):
        order = torch.from_numpy(np.argsort(scores[:, k], kind="stable"))
        column = torch.empty_like(Z[:, k])
        column[order] = torch.sort(Z[:, k]).values
        Z[:, k] = column
    return Z


def _pca_scores(X: np.ndarray) -> np.ndarray:
    Xc = X - X.mean(axis=0)
    _, _, Vt = np.linalg.svd(Xc, full_matrices=False)
    return Xc @ Vt.T  # (N, min(N, D))


def _pca_codes(setup: Setup, h: float | None = None) -> torch.Tensor:
    """The N prior draws assigned to the points by rank along the principal axes.

    Coordinate k follows the points' projections on the k-th principal
    component of X (for K > D the remaining coordinates stay random).
    Neighbours in X start with neighbouring codes only where the principal
    axis runs along the data; on a spiral or a fold it does not.
    """
    return _codes_by_rank(setup, _pca_scores(setup.X))


#: neighbours per point kept in the q graph of the spectral initialisation
SPECTRAL_TOPK = 32
#: edges of the q graph longer than this many bandwidths are cut
SPECTRAL_CUT = 3.0
#: the spectral initialisation needs this share of the points in one connected component
SPECTRAL_MIN_COMPONENT = 0.5


def spectral_embedding(X: np.ndarray, h: float, n_components: int, *, k: int = SPECTRAL_TOPK) -> np.ndarray | None:
    """The first ``n_components`` non-trivial diffusion coordinates of MAPA's posterior q.

    q with the self term left out is a random walk on the data, ``q = D^-1 K``
    with ``K_ni = exp(-||x_n - x_i||^2 / (2 h^2))`` (``K_nn = 0``) and
    ``D = diag(sum_i K_ni)``. Each point keeps its ``k`` most probable
    references (:func:`mapa.log_posterior_topk`, whose exact normaliser gives
    ``log K = log q + log D``), the graph is symmetrised by the larger entry,
    and edges longer than :data:`SPECTRAL_CUT` bandwidths are cut (an isolated
    tail point would otherwise trap the walk and take the slowest eigenvector
    for itself). On the largest connected component C, the right eigenvectors
    of the walk, ``psi = D^-1/2 v``, come from the symmetric
    ``A = D^-1/2 K D^-1/2`` (:func:`scipy.sparse.linalg.eigsh`): the top one is
    constant, the next ones vary most slowly over the graph (the diffusion map;
    on a curve the first runs monotonically along it). Points outside C get the
    q-weighted mean of their 8 most probable references in C, divided by the
    eigenvalue (the Nystrom extension).

    Returns
    -------
    array of shape (N, min(n_components, |C| - 2)), or None
        None when no ordering is implied: C holds fewer than
        :data:`SPECTRAL_MIN_COMPONENT` of the points, or the eigensolver does
        not converge.
    """
    import scipy.sparse
    import scipy.sparse.csgraph
    import scipy.sparse.linalg

    from .. import log_posterior_topk

    N = X.shape[0]
    if N < 4:
        return None
    kk = min(k, N - 1)
    top = log_posterior_topk(X, bandwidth=h, k=kk, exclude_self=True)
    log_k = np.asarray(top.log_prob, dtype=np.float64) + np.asarray(top.log_norm, dtype=np.float64)[:, None]
    keep = (log_k >= -0.5 * SPECTRAL_CUT**2).reshape(-1)
    rows = np.repeat(np.arange(N), kk)[keep]
    cols = np.asarray(top.indices).reshape(-1)[keep]
    graph = scipy.sparse.csr_matrix((np.exp(log_k.reshape(-1)[keep]), (rows, cols)), shape=(N, N))
    graph = graph.maximum(graph.T).tocsr()
    labels = scipy.sparse.csgraph.connected_components(graph, directed=False)[1]
    main = labels == np.bincount(labels).argmax()
    n_main = int(main.sum())
    m = min(n_components, n_main - 2)
    if n_main < SPECTRAL_MIN_COMPONENT * N or m < 1:
        return None
    G = graph[main][:, main]
    d = np.asarray(G.sum(axis=1)).ravel()
    s = 1.0 / np.sqrt(d)
    A = scipy.sparse.diags(s) @ G @ scipy.sparse.diags(s)
    try:
        values, vectors = scipy.sparse.linalg.eigsh(A, k=m + 1, which="LA", v0=np.sqrt(d), tol=1e-8)
    except scipy.sparse.linalg.ArpackError:
        return None
    order = np.argsort(values)[::-1][1:]
    values, psi = values[order], vectors[:, order] * s[:, None]
    out = np.empty((N, m))
    out[main] = psi
    if n_main < N:
        ext = log_posterior_topk(X[main], queries=X[~main], bandwidth=h, k=min(8, n_main))
        w = np.exp(np.asarray(ext.log_prob, dtype=np.float64))
        w /= w.sum(axis=1, keepdims=True)
        out[~main] = np.einsum("qk,qkc->qc", w, psi[np.asarray(ext.indices)]) / values[None, :]
    return out


def _spectral_codes(setup: Setup, h: float) -> torch.Tensor:
    """The N prior draws assigned to the points by rank along the diffusion coordinates of q.

    Coordinate k follows the points' k-th non-trivial eigenvector of MAPA's
    posterior q (:func:`spectral_embedding`), a Gaussian copula of the
    diffusion map: on a curve, the order along the curve, whatever its shape.
    When q's graph is disconnected (no ordering implied), this is
    :func:`_pca_codes`.
    """
    scores = spectral_embedding(setup.X, h, setup.latent_dim)
    if scores is None:
        return _pca_codes(setup)
    return _codes_by_rank(setup, scores)


#: code-space neighbours per point in :func:`code_roughness`
ROUGHNESS_NEIGHBOURS = 4


def code_roughness(X: np.ndarray, codes: np.ndarray, n_neighbours: int = ROUGHNESS_NEIGHBOURS) -> float:
    """Mean squared distance in X between points whose codes are nearest neighbours.

    ``mean_n mean_{j in nn(z_n)} ||x_n - x_j||^2`` over the ``n_neighbours``
    nearest codes z_j of each code z_n (:class:`scipy.spatial.cKDTree`). A
    smooth decoder maps nearby codes to nearby points, so an initial code
    table with a small value is easier to fit: codes that put distant points
    (two arms of a spiral) next to each other score high.
    """
    from scipy.spatial import cKDTree

    k = min(n_neighbours + 1, codes.shape[0])
    idx = cKDTree(codes).query(codes, k=k)[1][:, 1:]
    total = 0.0
    for start in range(0, X.shape[0], 4096):  # bounded memory: (4096, k, D) at a time
        rows = slice(start, start + 4096)
        total += float(((X[rows, None, :] - X[idx[rows]]) ** 2).sum())
    return total / idx.size


def _auto_codes(setup: Setup, h: float) -> torch.Tensor:
    """Whichever of :func:`_spectral_codes` and :func:`_pca_codes` has the smaller :func:`code_roughness`.

    Both use the same prior draws (the generator is rewound in between), so
    the choice only decides how they are assigned to the points.
    """
    state = setup.rng.get_state()
    candidates = []
    for make in (_spectral_codes, _pca_codes):
        setup.rng.set_state(state)
        codes = make(setup, h)
        candidates.append((code_roughness(setup.X, codes.double().numpy()), codes))
    return min(candidates, key=lambda c: c[0])[1]


_CODE_INITS = {"prior": _prior_codes, "pca": _pca_codes, "spectral": _spectral_codes, "auto": _auto_codes}


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
    if restored is None:
        codes = _CODE_INITS[opts["code_init"]](setup, info["bandwidth"])  # (setup, h) -> (N, K)
    else:  # the checkpoint's codes replace these
        codes = torch.zeros((setup.X.shape[0], setup.latent_dim), dtype=setup.dtype)
    model = CodeTableModel(setup.decoder, setup.likelihood, codes)
    code_lr = opts["code_learning_rate"]
    update = JointUpdate(
        model,
        objective,
        [
            {"params": model.generative_parameters(), "lr": setup.learning_rate},
            {"params": model.inference_parameters(), "lr": code_lr},
        ],
        lr_decay=opts["lr_decay"],
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
        batch_size=32,
        learning_rate=1e-2,
        options={
            "bandwidth": (None, _bandwidth),
            "exclude_self": (False, _boolean),
            "mapa_objective": ("targets", _choice(*_MAPA_OBJECTIVES)),
            "k": (64, _positive_int),
            "code_learning_rate": (3e-3, _positive_float),
            "code_init": ("auto", _choice(*_CODE_INITS)),
            "lr_decay": (0.95, _positive_float),
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
