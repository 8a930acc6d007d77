"""The shared training loop: data order, non-finite checks, history, progress, timing.

Nothing here knows which method runs: a :class:`~mapa.training.methods.Method`
brings its model, objective and update rule, and the loop only shuffles
indices, hands minibatches to the rule and records what comes back.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["TrainingDivergedError", "TrainState", "StepContext", "run_epochs", "resolve_progress"]


class TrainingDivergedError(FloatingPointError):
    """A loss became NaN or infinite; training stops instead of continuing silently.

    Attributes
    ----------
    epoch : int
        1-based epoch in which it happened.
    step : int
        0-based minibatch step within that epoch.
    inner_step : int or None
        Encoder-only inner step (aggressive training), if it happened there.
    """

    def __init__(self, message: str, epoch: int, step: int, inner_step: int | None = None):
        super().__init__(message)
        self.epoch = epoch
        self.step = step
        self.inner_step = inner_step


@dataclass
class TrainState:
    """What a checkpoint restores: epochs done, per-epoch records and seconds spent."""

    epoch: int = 0
    history: list = field(default_factory=list)  # one dict per epoch
    seconds: float = 0.0


class StepContext:
    """Passed to update rules: the random generator, the position, and helpers."""

    def __init__(self, rng: torch.Generator, n_items: int, batch_size: int, method: str):
        self.rng = rng
        self.n_items = n_items
        self.batch_size = batch_size
        self.method = method
        self.epoch = 0
        self.step = 0

    def fresh_batch(self) -> torch.Tensor:
        """A new random minibatch of indices (with replacement across calls)."""
        return torch.randint(self.n_items, (min(self.batch_size, self.n_items),), generator=self.rng)

    def check(self, loss: torch.Tensor, inner_step: int | None = None) -> float:
        """Return ``loss`` as a float; raise :class:`TrainingDivergedError` if it is not finite."""
        value = float(loss.detach())
        if not math.isfinite(value):
            where = f"epoch {self.epoch + 1}, step {self.step}"
            if inner_step is not None:
                where += f" (encoder inner step {inner_step})"
            raise TrainingDivergedError(
                f"mapa.fit(method={self.method!r}): the loss became {value} at {where}; lower "
                f"learning_rate, check the data scale and noise_std, or check the decoder for NaN outputs",
                self.epoch + 1,
                self.step,
                inner_step,
            )
        return value


def resolve_progress(progress) -> bool:
    """``None``: show a bar only when stderr is a terminal; otherwise ``bool(progress)``."""
    if progress is None:
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be None, True or False, got {progress!r}")
    return progress


def run_epochs(
    method,
    state: TrainState,
    *,
    epochs: int,
    batch_size: int,
    rng: torch.Generator,
    progress: bool,
    on_epoch_end: Callable[[TrainState], None] | None = None,
) -> TrainState:
    """Train ``method`` from ``state.epoch`` up to ``epochs`` epochs.

    Each epoch visits every index once in an order drawn from ``rng``, in
    minibatches of ``batch_size`` (the last one may be smaller). The epoch
    record holds the mean loss over the epoch (nats per point) and whatever
    the update rule reports at the end of the epoch.
    """
    n = method.objective.n_items
    ctx = StepContext(rng, n, batch_size, method.name)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=epochs, initial=state.epoch, disable=not progress, desc=f"mapa.fit[{method.name}]",
        unit="epoch", leave=False, file=sys.stderr,
    )
    try:
        method.model.train()
        for epoch in range(state.epoch, epochs):
            start = time.perf_counter()
            ctx.epoch = epoch
            total = 0.0
            for step, idx in enumerate(torch.randperm(n, generator=rng).split(batch_size)):
                ctx.step = step
                total += method.update.step(idx, ctx) * len(idx)
            record = {"loss": total / n, **method.update.end_epoch(ctx)}
            state.history.append(record)
            state.epoch = epoch + 1
            state.seconds += time.perf_counter() - start
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4g}", refresh=False)
            if on_epoch_end is not None:
                on_epoch_end(state)
    finally:
        bar.close()
        method.model.eval()
    return state
