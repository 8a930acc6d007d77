"""Training of VAE-style generative models with MAPA and the baselines.

All methods learn the same generative model, z ~ N(0, I_K), x | z ~ p(x | f(z))
(Gaussian with sigma fixed or learned, or Bernoulli), with the same decoder
architecture and prior; only inference differs:

* ``mapa`` - the posterior q is fixed by the MAPA kernel before training
  (:func:`mapa.posterior_targets`), and the decoder and a table of N codes are
  fitted to its sufficient statistics (MAPA.md, section 3);
* ``vae``, ``iwae``, ``aggressive`` - an amortised Gaussian encoder trained
  jointly (ELBO, importance-weighted bound, He et al.'s aggressive schedule).

Layout: :mod:`.models` (decoder, encoder, likelihoods, counting),
:mod:`.objectives` (one class per objective), :mod:`.updates` (optimiser
schedules), :mod:`.methods` (method = model + objective + update rule, with
defaults), :mod:`.trainer` (the shared loop: order, NaN checks, progress),
:mod:`.checkpoint`, :mod:`.marginal` (test log-likelihood), :mod:`.fit` (the
entry point :func:`fit` and :class:`FittedModel`).
"""

from .fit import COMMON_OPTIONS, FittedModel, fit
from .marginal import code_table_proposal, encoder_proposal, marginal_log_likelihood
from .methods import METHODS, MethodSpec
from .models import default_decoder
from .trainer import TrainingDivergedError

__all__ = [
    "fit",
    "FittedModel",
    "marginal_log_likelihood",
    "encoder_proposal",
    "code_table_proposal",
    "default_decoder",
    "METHODS",
    "MethodSpec",
    "COMMON_OPTIONS",
    "TrainingDivergedError",
]
