"""PyTorch's activation checkpointing under the spec's name ``checkpointed``:
``torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False, **kwargs)``.

The non-reentrant mode is the one PyTorch recommends and the one the spec describes: gradients reach
the layer's parameters whether or not the inputs require grad, and keyword arguments pass through. (The
reentrant mode gives parameters no gradient when no input requires grad: a mutant of this family.)
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["checkpointed"]


class _Checkpointed(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return checkpoint(self.layer, *args, use_reentrant=False, **kwargs)


def checkpointed(layer: nn.Module) -> nn.Module:
    return _Checkpointed(layer)
