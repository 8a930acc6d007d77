"""Update rules: how one minibatch of an objective turns into parameter steps.

The trainer hands each minibatch to ``rule.step(idx, ctx)`` and calls
``rule.end_epoch(ctx)`` after every epoch; the rule owns the optimisers and
whatever schedule state it needs, and saves it with ``state_dict``.

* :class:`JointUpdate` - one Adam step on all parameters (MAPA, VAE, IWAE).
* :class:`AggressiveUpdate` - He et al. (2019): an inner loop of encoder-only
  steps before each decoder step, switched off for good once the mutual
  information I_q stops rising between epochs.
"""

from __future__ import annotations

import math

import torch

from .objectives import mutual_information

__all__ = ["JointUpdate", "AggressiveUpdate"]


class JointUpdate:
    """One optimiser step on all parameter groups per minibatch.

    Parameters
    ----------
    model : nn.Module
    objective : callable ``(model, idx, rng) -> loss``
    param_groups : list of dicts for :class:`torch.optim.Adam`
    lr_decay : float, default 1.0
        Every learning rate is multiplied by this after each epoch (1: constant).
        The schedule depends on the epoch count alone, so a run resumed from a
        checkpoint continues it exactly, and longer runs extend it.
    """

    def __init__(self, model, objective, param_groups, lr_decay: float = 1.0):
        self.model = model
        self.objective = objective
        self.optimizer = torch.optim.Adam(param_groups)
        self.lr_decay = float(lr_decay)

    def step(self, idx: torch.Tensor, ctx) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.objective(self.model, idx, ctx.rng)
        value = ctx.check(loss)
        loss.backward()
        self.optimizer.step()
        return value

    def end_epoch(self, ctx) -> dict:
        if self.lr_decay != 1.0:
            for group in self.optimizer.param_groups:
                group["lr"] *= self.lr_decay
        return {}

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


class AggressiveUpdate:
    """Aggressive inference-network training (He et al. 2019, "Lagging inference networks").

    While active, each decoder step is preceded by up to ``max_inner_steps``
    encoder-only steps on fresh random minibatches; the inner loop stops early
    when the summed loss over the last ``check_every`` steps is no lower than
    over the previous ``check_every`` steps. The decoder step then updates the
    decoder (and likelihood) only. After each epoch, I_q is estimated on the
    fixed batch ``mi_data``; once it does not rise, the rule becomes plain
    joint training for good.
    """

    def __init__(self, model, objective, learning_rate, mi_data, *, max_inner_steps=100, check_every=10):
        self.model = model
        self.objective = objective
        self.encoder_optimizer = torch.optim.Adam(model.inference_parameters(), lr=learning_rate)
        self.decoder_optimizer = torch.optim.Adam(model.generative_parameters(), lr=learning_rate)
        self.mi_data = mi_data
        self.max_inner_steps = int(max_inner_steps)
        self.check_every = int(check_every)
        self.active = True
        self.previous_mi = -math.inf
        self.inner_steps = 0

    def _inner_loop(self, ctx) -> None:
        best = math.inf
        running = 0.0
        for j in range(self.max_inner_steps):
            self.encoder_optimizer.zero_grad(set_to_none=True)
            loss = self.objective(self.model, ctx.fresh_batch(), ctx.rng)
            running += ctx.check(loss, inner_step=j)
            loss.backward()
            self.encoder_optimizer.step()
            self.inner_steps += 1
            if (j + 1) % self.check_every == 0:
                if running >= best:
                    break
                best, running = running, 0.0

    def step(self, idx, ctx) -> float:
        if self.active:
            self._inner_loop(ctx)
        self.encoder_optimizer.zero_grad(set_to_none=True)
        self.decoder_optimizer.zero_grad(set_to_none=True)
        loss = self.objective(self.model, idx, ctx.rng)
        value = ctx.check(loss)
        loss.backward()
        if not self.active:
            self.encoder_optimizer.step()
        self.decoder_optimizer.step()
        return value

    def end_epoch(self, ctx) -> dict:
        out = {"aggressive": self.active, "inner_steps": self.inner_steps}
        if self.active:
            mi = mutual_information(self.model, self.mi_data, ctx.rng)
            out["mutual_information"] = mi
            if not mi > self.previous_mi:
                self.active = False
            self.previous_mi = mi
        return out

    def state_dict(self) -> dict:
        return {
            "encoder_optimizer": self.encoder_optimizer.state_dict(),
            "decoder_optimizer": self.decoder_optimizer.state_dict(),
            "active": self.active,
            "previous_mi": self.previous_mi,
            "inner_steps": self.inner_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.encoder_optimizer.load_state_dict(state["encoder_optimizer"])
        self.decoder_optimizer.load_state_dict(state["decoder_optimizer"])
        self.active = bool(state["active"])
        self.previous_mi = float(state["previous_mi"])
        self.inner_steps = int(state["inner_steps"])
