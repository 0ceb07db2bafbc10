"""Position-wise feed-forward blocks in PyTorch: FeedForward (relu/gelu MLP) and SwiGLU.
Spec: spec/feed_forward.py."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from implementations.activations import gelu

__all__ = ["FeedForward", "SwiGLU"]

ACTIVATIONS = ("relu", "gelu")


def _check_sizes(name: str, d_model: int, d_ff: int) -> None:
    if d_model <= 0 or d_ff <= 0:
        raise ValueError(f"{name}: sizes must be positive, got d_model={d_model}, d_ff={d_ff}")


class FeedForward(nn.Module):
    """down(act(up(x))) on every position of x (b, s, d); act is relu or exact gelu; bias=False drops
    both projections' biases."""

    def __init__(self, *, d_model: int, d_ff: int, activation: str = "relu", bias: bool = True) -> None:
        super().__init__()
        _check_sizes("FeedForward", d_model, d_ff)
        if activation not in ACTIVATIONS:
            raise ValueError(f"FeedForward: activation must be one of {ACTIVATIONS}, got activation={activation!r}")
        if not isinstance(bias, bool):
            raise ValueError(f"FeedForward: bias must be True or False, got bias={bias!r}")
        self.activation = activation
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.up(x)  # (b, s, f)
        hidden = F.relu(hidden) if self.activation == "relu" else gelu(hidden)
        return self.down(hidden)  # (b, s, d)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) on every position of x (b, s, d); no biases (LLaMA)."""

    def __init__(self, *, d_model: int, d_ff: int) -> None:
        super().__init__()
        _check_sizes("SwiGLU", d_model, d_ff)
        self.gate = nn.Linear(d_model, d_ff, bias=False)
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate = self.gate(x)
        return self.down(gate * gate.sigmoid() * self.up(x))  # silu(gate) * value
