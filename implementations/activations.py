"""gelu (exact and tanh) and softmax with a keep-mask, in PyTorch. Spec: spec/activations.py."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["gelu", "softmax"]

GELU_APPROXIMATIONS = ("none", "tanh")


def gelu(x: Tensor, *, approximate: str = "none") -> Tensor:
    """x * Phi(x) (approximate="none", the erf form) or the tanh approximation (approximate="tanh")."""
    if approximate == "none":
        return 0.5 * x * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
    if approximate == "tanh":
        inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))
        return 0.5 * x * (1.0 + torch.tanh(inner))
    raise ValueError(f"gelu: approximate must be one of {GELU_APPROXIMATIONS}, got approximate={approximate!r}")


def softmax(x: Tensor, *, dim: int = -1, mask: Tensor | None = None) -> Tensor:
    """Softmax along ``dim`` over the kept entries (mask True = keep, broadcastable to x).

    Masked entries are exactly 0; a row with no kept entry is all zeros.
    """
    if mask is None:
        shifted = x - x.amax(dim=dim, keepdim=True)  # every exponent <= 0: no overflow
        unnormalised = shifted.exp()
        return unnormalised / unnormalised.sum(dim=dim, keepdim=True)
    if mask.dtype != torch.bool:
        raise TypeError(f"softmax: mask must be boolean (True = keep), got dtype {mask.dtype}")
    keep = mask.expand_as(x)
    any_kept = keep.any(dim=dim, keepdim=True)
    # Out of place throughout: autograd needs the unmasked graph intact.
    scores = x.masked_fill(~keep, float("-inf"))
    row_max = scores.amax(dim=dim, keepdim=True).masked_fill(~any_kept, 0.0)
    unnormalised = (scores - row_max).exp()  # exp(-inf) = 0 for masked entries
    total = unnormalised.sum(dim=dim, keepdim=True).masked_fill(~any_kept, 1.0)
    return unnormalised / total
