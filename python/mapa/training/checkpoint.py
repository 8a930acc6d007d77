"""Atomic, resumable checkpoints of a training run.

A checkpoint is one ``torch.save`` file holding plain tensors and Python
containers (loadable with ``weights_only=True``): the model and update-rule
state, the random generators, the epoch records, the evaluation counts, the
data-derived tensors of the objective (so MAPA's kernel is not rerun) and a
fingerprint of the run's configuration. It is written to a temporary file in
the same directory and moved into place with :func:`os.replace`, so an
interrupted write never leaves a truncated checkpoint.
"""

from __future__ import annotations

import os

import torch

from .._io import atomic_open

__all__ = ["FORMAT", "save_checkpoint", "load_checkpoint", "check_fingerprint"]

FORMAT = 1


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically (temporary file + :func:`os.replace`)."""
    with atomic_open(path, "wb") as fh:
        torch.save({"format": FORMAT, **payload}, fh)


def load_checkpoint(path: str | os.PathLike) -> dict | None:
    """The payload saved at ``path``, or None when there is no file there yet."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint={path!r} could not be read ({type(exc).__name__}: {exc}); "
                         f"delete it or pass another path") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"checkpoint={path!r} is not a mapa training checkpoint (format {FORMAT})")
    return payload


def check_fingerprint(path, saved: dict, current: dict) -> None:
    """Refuse to resume a checkpoint written by a run with a different configuration."""
    diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if diff:
        details = "; ".join(f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in diff)
        raise ValueError(
            f"checkpoint={os.fspath(path)!r} belongs to a different run ({details}); pass the same "
            f"data and settings to resume, or delete the file / use another path to start afresh"
        )
