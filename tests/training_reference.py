"""Shared helpers for the training tests."""

from __future__ import annotations

import torch
from torch import nn


def linear_decoder(A, b) -> nn.Linear:
    """A float64 decoder z -> z A^T + b with the given weights (A: (D, K), b: (D,))."""
    net = nn.Linear(A.shape[1], A.shape[0]).double()
    with torch.no_grad():
        net.weight.copy_(torch.from_numpy(A))
        net.bias.copy_(torch.from_numpy(b))
    return net
