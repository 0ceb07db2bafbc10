"""PyTorch's activations under the spec's names: ``F.gelu`` (both forms) and ``F.softmax``.

Conventions converted here (and only here):
* ``F.softmax`` takes no mask. The spec's ``mask`` (True = keep) is applied as PyTorch users do it:
  masked logits are filled with -inf before ``F.softmax``; a row with no kept entry (whose softmax would
  be NaN) is given finite logits and its output zeroed afterwards, the spec's convention for empty rows.
* ``F.gelu``'s ``approximate`` is passed through; its names ("none", "tanh") are the spec's.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["gelu", "softmax"]


def gelu(x: Tensor, *, approximate: str = "none") -> Tensor:
    return F.gelu(x, approximate=approximate)


def softmax(x: Tensor, *, dim: int = -1, mask: Tensor | None = None) -> Tensor:
    if mask is None:
        return F.softmax(x, dim=dim)
    keep = mask.expand_as(x)
    any_kept = keep.any(dim=dim, keepdim=True)
    logits = x.masked_fill(~keep, float("-inf")).masked_fill(~any_kept, 0.0)
    return F.softmax(logits, dim=dim).masked_fill(~any_kept, 0.0)
