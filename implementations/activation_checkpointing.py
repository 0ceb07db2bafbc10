"""Activation checkpointing of a layer, in PyTorch. Spec: spec/activation_checkpointing.py.

The mechanism of ``torch.utils.checkpoint(..., use_reentrant=False)``, written out: during the forward a
saved-tensors hook hands autograd a ticket (an index) instead of each tensor it would keep; the first
time backward asks for one, the layer's forward is run again, from the same inputs and random state,
under a hook that keeps the tensors this time, and every ticket is answered from that recomputation.
The autograd graph is the forward's own, so gradients reach the inputs and the layer's parameters as in
the plain layer, whether or not the inputs require grad, and keyword arguments pass through.

Why not call torch.utils.checkpoint: its first call imports torch._dynamo (about 3-4 s of CPU here, once
per process), more than this family's whole test budget. benchmarks/activation_checkpointing.py runs both
and checks that they give identical gradients.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import saved_tensors_hooks

__all__ = ["checkpointed"]


def _detached(value: Any) -> Any:
    """A tensor argument as a new leaf for the recomputation (same values and requires_grad, same storage)."""
    return value.detach().requires_grad_(value.requires_grad) if isinstance(value, Tensor) else value


def checkpoint(layer: nn.Module, args: tuple, kwargs: dict[str, Any], *, preserve_rng_state: bool = True) -> Any:
    """``layer(*args, **kwargs)``, saving tickets for backward instead of activations. ``preserve_rng_state``
    (as torch.utils.checkpoint's) restores the forward's random state for the recomputation; only a layer
    without randomness may skip it."""
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
    versions = [t._version for t in tensors]  # an input changed in place would be recomputed wrongly
    cpu_state = torch.get_rng_state() if preserve_rng_state else None
    cuda_devices = sorted({t.device.index for t in tensors if t.is_cuda}) if preserve_rng_state else []
    cuda_states = [torch.cuda.get_rng_state(d) for d in cuda_devices]
    recomputed: dict[int, Tensor] = {}  # ticket -> the recomputed tensor, until backward takes it
    tickets = 0

    def ticket(_: Tensor) -> int:  # forward: the tensor is dropped, autograd keeps its index
        nonlocal tickets
        tickets += 1
        return tickets - 1

    def recompute() -> None:
        if [t._version for t in tensors] != versions:
            raise RuntimeError("an input of the checkpointed layer was modified in place after its forward")
        count = 0

        def keep(t: Tensor) -> int:
            nonlocal count
            recomputed[count] = t.detach()  # the value only: the recomputation's own graph is not needed
            count += 1
            return count - 1

        # The forward's random state, so that dropout draws the same masks (then the caller's state back).
        with torch.random.fork_rng(devices=cuda_devices, enabled=preserve_rng_state), torch.enable_grad(), \
                saved_tensors_hooks(keep, recomputed.__getitem__):
            if preserve_rng_state:
                torch.set_rng_state(cpu_state)
            for device, state in zip(cuda_devices, cuda_states):
                torch.cuda.set_rng_state(state, device)
            layer(*map(_detached, args), **{k: _detached(v) for k, v in kwargs.items()})
        if count != tickets:
            raise RuntimeError(f"the recomputed forward saved {count} tensors, the forward {tickets}: "
                               "the layer must run the same operations both times")

    def answer(index: int) -> Tensor:
        # Backward: recompute at the first ticket (again if a retained graph is run twice), and let each
        # tensor go once it is used, so that backward holds one layer's activations at a time.
        if index not in recomputed:
            recompute()
        return recomputed.pop(index)

    with saved_tensors_hooks(ticket, answer):
        return layer(*args, **kwargs)


class Checkpointed(nn.Module):
    """Runs ``layer`` (a sub-module, not a copy: its parameters are the layer's) keeping only tickets for
    backward, which recomputes the activations."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        if not isinstance(layer, nn.Module):
            raise ValueError(f"checkpointed wraps a torch.nn.Module, got {type(layer).__name__}")
        self.layer = layer

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.layer(*args, **kwargs)  # nothing is saved without grad: nothing to recompute
        return checkpoint(self.layer, args, kwargs)


def checkpointed(layer: nn.Module) -> nn.Module:
    """``layer`` wrapped so that backward recomputes its activations instead of keeping them."""
    return Checkpointed(layer)
