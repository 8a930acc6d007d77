"""``mapa.fit``: train a method on data and return a :class:`FittedModel`."""

from __future__ import annotations

import copy
import hashlib
import math
import numbers
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ._checks import (
    check_data,
    check_decoder,
    check_latent_dim,
    check_likelihood,
    check_noise_std,
    param_dtype,
)
from .checkpoint import check_fingerprint, load_checkpoint, save_checkpoint
from .marginal import code_table_proposal, encoder_proposal, marginal_log_likelihood
from .methods import METHODS, Setup
from .models import BernoulliLikelihood, GaussianLikelihood, default_decoder
from .trainer import TrainState, resolve_progress, run_epochs

__all__ = ["fit", "FittedModel", "COMMON_OPTIONS"]

#: options every method accepts, with their defaults (None: the method's default)
COMMON_OPTIONS = {
    "batch_size": None,
    "learning_rate": None,
    "likelihood": "gaussian",
    "checkpoint": None,
    "checkpoint_every": 1,
    "progress": None,
    "num_threads": None,
    "callback": None,
    "noise_std_init": None,
}


@dataclass
class FittedModel:
    """A trained generative model p(x) = int p(x | f(z)) N(z; 0, I) dz and how it was trained.

    Attributes
    ----------
    method : str
    latent_dim : int
    decoder : torch.nn.Module
        f: codes (B, latent_dim) -> means (Gaussian) or logits (Bernoulli) (B, D).
    noise_std : float or None
        sigma of the Gaussian likelihood (learned or fixed); None for Bernoulli.
    likelihood : str
    encoder : torch.nn.Module or None
        The Gaussian encoder (VAE-type methods), returning (mu, log_var); None for MAPA.
    codes : ndarray of shape (N, latent_dim) or None
        MAPA's learned code table (one code per training point); None otherwise.
    history : list of float
        Mean training loss per epoch (negative objective, nats per point).
    history_details : list of dict
        Per-epoch records (loss, and e.g. mutual_information for aggressive training).
    decoder_evaluations, encoder_evaluations : int
        Latent codes pushed through the decoder, points pushed through the encoder.
    train_seconds : float
        Wall time of training, including MAPA's kernel (checkpoint writes excluded).
    kernel_seconds : float
        Of which the MAPA posterior kernel (0 for other methods).
    bandwidth : float or None
        MAPA's bandwidth h.
    epochs, seed : int
    options : dict
        The resolved options of the run.
    """

    method: str
    latent_dim: int
    decoder: nn.Module
    noise_std: float | None
    likelihood: str
    encoder: nn.Module | None
    codes: np.ndarray | None
    history: list
    history_details: list
    decoder_evaluations: int
    encoder_evaluations: int
    train_seconds: float
    kernel_seconds: float
    bandwidth: float | None
    epochs: int
    seed: int
    options: dict = field(default_factory=dict)
    train_data: np.ndarray | None = field(default=None, repr=False)
    likelihood_model: nn.Module | None = field(default=None, repr=False)

    def proposal(self):
        """The importance-sampling proposal used for latent_dim > 2 (None: prior samples)."""
        if self.encoder is not None:
            return encoder_proposal(self.encoder)
        if self.codes is not None and self.train_data is not None and self.bandwidth is not None:
            return code_table_proposal(self.codes, self.train_data, self.bandwidth)
        return None

    def log_likelihood(self, X, num_samples=None, *, seed=0) -> np.ndarray:
        """Estimates of log p(x) for the rows of X, array of shape (M,).

        See :func:`mapa.training.marginal_log_likelihood`: prior samples
        (default 20000) through the MAPA kernel for latent_dim <= 2,
        importance sampling (default 5000 per point) with :meth:`proposal` otherwise.
        """
        return marginal_log_likelihood(
            self.decoder,
            self.noise_std,
            X,
            latent_dim=self.latent_dim,
            num_samples=num_samples,
            seed=seed,
            proposal=self.proposal(),
            likelihood=self.likelihood,
        )

    @torch.no_grad()
    def decode(self, Z) -> np.ndarray:
        """Decoder outputs f(z) (means, or logits for Bernoulli) for codes of shape (M, latent_dim)."""
        Z = check_data("Z", Z)
        if Z.shape[1] != self.latent_dim:
            raise ValueError(f"Z must have latent_dim={self.latent_dim} columns, got {Z.shape[1]}")
        return self.decoder(torch.as_tensor(Z, dtype=param_dtype(self.decoder))).double().numpy()

    @torch.no_grad()
    def sample(self, n: int, *, seed: int = 0, noise: bool = True) -> np.ndarray:
        """n draws x ~ p(x), shape (n, D); ``noise=False`` returns the decoder outputs f(z) only."""
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn((int(n), self.latent_dim), generator=gen, dtype=param_dtype(self.decoder))
        f = self.decoder(z).double()
        return (self.likelihood_model.sample(f, gen) if noise else f).numpy()


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_epochs(epochs, default: int) -> int:
    if epochs is None:
        return default
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 0:
        raise ValueError(f"epochs must be None (the method's default) or an integer >= 0, got {epochs!r}")
    return int(epochs)


def _resolve_options(spec, options: dict) -> tuple[dict, dict]:
    """Split ``options`` into (common, method-specific), fill defaults and check them."""
    known = set(COMMON_OPTIONS) | set(spec.options)
    unknown = sorted(set(options) - known)
    if unknown:
        others = sorted({o for s in METHODS.values() for o in s.options} - set(spec.options))
        hint = [u for u in unknown if u in others]
        extra = f" ({', '.join(hint)} belong to other methods)" if hint else ""
        raise TypeError(
            f"mapa.fit(method={spec.name!r}) got unknown option(s) {unknown}{extra}; valid options: {sorted(known)}"
        )
    common = {k: options.get(k, v) for k, v in COMMON_OPTIONS.items()}
    own = {}
    for name, (default, check) in spec.options.items():
        own[name] = check(name, options[name]) if name in options else default
    if common["batch_size"] is None:
        common["batch_size"] = spec.batch_size
    elif isinstance(common["batch_size"], bool) or not isinstance(common["batch_size"], numbers.Integral) or common[
        "batch_size"
    ] < 1:
        raise ValueError(f"batch_size must be a positive integer, got {common['batch_size']!r}")
    if common["learning_rate"] is None:
        common["learning_rate"] = spec.learning_rate
    lr = common["learning_rate"]
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"learning_rate must be a finite float > 0, got {lr!r}")
    every = common["checkpoint_every"]
    if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
        raise ValueError(f"checkpoint_every must be a positive integer, got {every!r}")
    if common["checkpoint"] is not None and not isinstance(common["checkpoint"], (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a file path or None, got {common['checkpoint']!r}")
    if common["callback"] is not None and not callable(common["callback"]):
        raise TypeError(f"callback must be None or a callable(epoch, loss), got {common['callback']!r}")
    init = common["noise_std_init"]
    if init is not None and (
        isinstance(init, bool) or not isinstance(init, numbers.Real) or not (math.isfinite(init) and init > 0)
    ):
        raise ValueError(f"noise_std_init must be None or a finite float > 0, got {init!r}")
    common["progress"] = resolve_progress(common["progress"])
    return common, own


def _initial_noise_std(X: np.ndarray, requested) -> float:
    """Starting sigma when it is learned: ``noise_std_init`` if given, else the data's spread.

    The default is sqrt(mean_d Var(X[:, d])), the noise level of a model that
    explains nothing, so training starts broad and sigma shrinks as the decoder
    fits. (Starting from a noise estimate below the truth stalls training at a
    tiny sigma; :func:`mapa.estimate_noise_std` under-estimates by 10-40%,
    see :mod:`mapa.bandwidth`.)
    """
    if requested is not None:
        return float(requested)
    spread = float(np.sqrt(X.var(axis=0).mean()))
    return spread if spread > 0 else 1.0


_WARM = False


def _warm_up() -> None:
    """Pay torch's one-time lazy imports (the first optimiser imports torch._dynamo,
    seconds on a cold start) outside the timed region, so train_seconds compares methods."""
    global _WARM
    if not _WARM:
        torch.optim.Adam([nn.Parameter(torch.zeros(1))])
        _WARM = True


def _thread_count(num_threads) -> int:
    from .._validation import resolve_num_threads

    # The default MLPs are far too small to gain from intra-op parallelism: on a loaded
    # 2-core machine two threads made a 128-unit training step 40x slower than one.
    return 1 if num_threads is None else resolve_num_threads(num_threads)


def _fingerprint(spec, X, latent_dim, seed, decoder, noise_std, common, own) -> dict:
    return {
        "method": spec.name,
        "data_shape": list(X.shape),
        "data_sha1": hashlib.sha1(X.tobytes()).hexdigest(),
        "latent_dim": latent_dim,
        "seed": seed,
        "decoder": repr(decoder),
        "noise_std": noise_std,
        "likelihood": common["likelihood"],
        "noise_std_init": common["noise_std_init"],
        "batch_size": int(common["batch_size"]),
        "learning_rate": float(common["learning_rate"]),
        "options": repr(sorted(own.items())),
    }


def fit(X, *, method="mapa", latent_dim, seed=0, epochs=None, decoder=None, noise_std=None, **options) -> FittedModel:
    """Train a generative model p(x) = int p(x | f(z)) N(z; 0, I) dz on X with one inference method.

    Parameters
    ----------
    X : array or CPU torch tensor of shape (n_points, n_features)
        Training data, finite, at least 2 rows.
    method : {"mapa", "vae", "iwae", "aggressive"}
        ``"mapa"``: fixed MAPA posterior, decoder and code table trained on its
        statistics (default 60 epochs, batch 32, learning rate 1e-2 decayed
        by 0.95 per epoch);
        ``"vae"``: ELBO; ``"iwae"``: importance-weighted bound;
        ``"aggressive"``: VAE with aggressive encoder training (each 300
        epochs, batch 128, learning rate 2e-3). MAPA's default budget is 1/5
        of the VAE's decoder evaluations (1/50 of IWAE's with K = 10).
    latent_dim : int
        K >= 1.
    seed : int
        Seeds everything (initialisation, codes, data order, samples): the same
        seed and settings give the same result.
    epochs : int, optional
        Passes over the data; None for the method's default.
    decoder : torch.nn.Module, optional
        f mapping (B, latent_dim) -> (B, n_features) (a deep copy is trained;
        the argument is left untouched). Default :func:`default_decoder`: an
        MLP with two hidden tanh layers of 128 units.
    noise_std : float, optional
        Fixed sigma of the Gaussian likelihood; None (default) learns log sigma,
        initialised at ``noise_std_init`` (default: the data's spread
        sqrt(mean_d Var X[:, d]), see :func:`_initial_noise_std`).
    **options
        Common to all methods:

        batch_size : int (method default)
        learning_rate : float (Adam; method default)
        noise_std_init : float, starting sigma when it is learned
        likelihood : {"gaussian", "bernoulli"} ("bernoulli": X in [0, 1], f gives logits)
        checkpoint : path; saved atomically every ``checkpoint_every`` epochs.
            If the file exists, training resumes from it (same data and settings
            required), giving the same result as an uninterrupted run.
        checkpoint_every : int (default 1)
        progress : None (a bar only when stderr is a terminal), True or False
        num_threads : int (torch intra-op threads during training; default 1:
            the default MLPs are too small to gain from more, and on a loaded
            2-core machine two threads made each step ~40x slower)
        callback : callable(epoch, loss) called after each epoch

        MAPA: ``bandwidth`` (float or rule name; default
        bandwidth_from_noise(noise_std, D) for a known noise_std, else the
        "auto" rule of :mod:`mapa.bandwidth`), ``exclude_self`` (False), ``mapa_objective`` ("targets":
        sufficient statistics, default; "topk": direct top-k objective),
        ``k`` (64, for "topk"), ``code_learning_rate`` (3e-3), ``lr_decay``
        (0.95: both learning rates are multiplied by it after every epoch;
        1 keeps them constant), ``code_init`` (how N prior draws are assigned
        to the points: "spectral", by rank along the diffusion coordinates of
        q, see :func:`mapa.training.methods.spectral_embedding`; "pca", by
        rank along the principal axes; "auto" (default), whichever of the two
        has the smaller :func:`mapa.training.methods.code_roughness`;
        "prior", at random). Codes receive one update per epoch, so where
        they start matters.

        VAE / aggressive: ``num_samples`` (S = 1), ``analytic_kl`` (True);
        aggressive also ``max_inner_steps`` (100), ``mi_batch_size`` (500).
        IWAE: ``num_samples`` (K = 10).

    Returns
    -------
    FittedModel

    Raises
    ------
    mapa.training.TrainingDivergedError
        (a FloatingPointError) if a loss becomes NaN or infinite, naming the epoch and step.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    spec = METHODS[method]
    X = check_data("X", X, min_rows=2)
    N, D = X.shape
    latent_dim = check_latent_dim(latent_dim)
    seed = _check_seed(seed)
    epochs = _check_epochs(epochs, spec.epochs)
    common, own = _resolve_options(spec, options)
    likelihood_name = check_likelihood(common["likelihood"], X)
    noise_std = check_noise_std(noise_std)
    if likelihood_name == "bernoulli" and noise_std is not None:
        raise ValueError("noise_std applies to likelihood='gaussian' only; leave it None for 'bernoulli'")
    if decoder is not None:
        check_decoder(decoder, latent_dim, D)
    threads = _thread_count(common["num_threads"])
    _warm_up()

    start = time.perf_counter()
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = default_decoder(latent_dim, D) if decoder is None else copy.deepcopy(decoder)
            dtype = param_dtype(net)
            if likelihood_name == "gaussian":
                init_std = _initial_noise_std(X, common["noise_std_init"]) if noise_std is None else noise_std
                likelihood = GaussianLikelihood(init_std, learn=noise_std is None).to(dtype)
            else:
                likelihood = BernoulliLikelihood()
            rng = torch.Generator().manual_seed(seed)
            setup = Setup(X, latent_dim, net, likelihood, rng, float(common["learning_rate"]), noise_std,
                          common["progress"], dtype)

            path = common["checkpoint"]
            fingerprint = _fingerprint(spec, X, latent_dim, seed, net, noise_std, common, own)
            saved = load_checkpoint(path) if path is not None else None
            if saved is not None:
                check_fingerprint(path, saved["fingerprint"], fingerprint)
                if saved["state"]["epoch"] > epochs:
                    raise ValueError(
                        f"checkpoint={os.fspath(path)!r} is at epoch {saved['state']['epoch']}, beyond "
                        f"epochs={epochs}; pass epochs >= {saved['state']['epoch']} or another path"
                    )
            m = spec.build(setup, own, saved)
            state = TrainState(seconds=time.perf_counter() - start)
            if saved is not None:
                m.model.load_state_dict(saved["model"])
                m.update.load_state_dict(saved["update"])
                m.model.counts.decoder, m.model.counts.encoder = saved["counts"]
                rng.set_state(saved["rng"])
                torch.set_rng_state(saved["torch_rng"])
                st = saved["state"]
                state = TrainState(st["epoch"], list(st["history"]), st["seconds"] + state.seconds)

            def save(st: TrainState):
                save_checkpoint(
                    path,
                    {
                        "fingerprint": fingerprint,
                        "state": {"epoch": st.epoch, "history": st.history, "seconds": st.seconds},
                        "model": m.model.state_dict(),
                        "update": m.update.state_dict(),
                        "counts": [m.model.counts.decoder, m.model.counts.encoder],
                        "rng": rng.get_state(),
                        "torch_rng": torch.get_rng_state(),
                        "data_state": m.objective.data_state(),
                        "info": m.info,
                    },
                )

            def on_epoch_end(st: TrainState):
                if path is not None and (st.epoch % common["checkpoint_every"] == 0 or st.epoch == epochs):
                    save(st)
                if common["callback"] is not None:
                    common["callback"](st.epoch, st.history[-1]["loss"])

            if path is not None and saved is None:
                save(state)  # also keeps the kernel's output if the first epoch is interrupted
            run_epochs(m, state, epochs=epochs, batch_size=int(common["batch_size"]), rng=rng,
                       progress=common["progress"], on_epoch_end=on_epoch_end)
    finally:
        torch.set_num_threads(saved_threads)

    model = m.model
    return FittedModel(
        method=spec.name,
        latent_dim=latent_dim,
        decoder=model.decoder,
        noise_std=model.likelihood.noise_std,
        likelihood=likelihood_name,
        encoder=getattr(model, "encoder", None),
        codes=model.codes.detach().double().numpy().copy() if hasattr(model, "codes") else None,
        history=[r["loss"] for r in state.history],
        history_details=list(state.history),
        decoder_evaluations=model.counts.decoder,
        encoder_evaluations=model.counts.encoder,
        train_seconds=state.seconds,
        kernel_seconds=float(m.info.get("kernel_seconds", 0.0)),
        bandwidth=m.info.get("bandwidth"),
        epochs=epochs,
        seed=seed,
        options={**{k: v for k, v in common.items() if k != "callback"}, **own},
        train_data=X if hasattr(model, "codes") else None,
        likelihood_model=model.likelihood,
    )
