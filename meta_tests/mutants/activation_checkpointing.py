"""Mutants of checkpointed: checkpointing wrappers that compute the right forward but break training.

Each is one branch of one wrapper around ours (implementations/activation_checkpointing.py), or the
reentrant scheme a learner writes as a torch.autograd.Function (torch.utils.checkpoint's use_reentrant=True).
"""

from __future__ import annotations

import torch
from torch import nn

from implementations.activation_checkpointing import Checkpointed, checkpoint
from meta_tests.catalog import mutant


class _ReentrantCheckpoint(torch.autograd.Function):
    """Forward under no_grad, keeping the inputs; backward re-runs the layer with grad and backpropagates
    through it, which accumulates the parameters' gradients as a side effect."""

    @staticmethod
    def forward(ctx, layer, *inputs):
        ctx.layer = layer
        ctx.save_for_backward(*inputs)
        with torch.no_grad():
            return layer(*inputs)

    @staticmethod
    def backward(ctx, grad):
        inputs = [x.detach().requires_grad_(x.requires_grad) for x in ctx.saved_tensors]
        with torch.enable_grad():
            out = ctx.layer(*inputs)
        torch.autograd.backward(out, grad)
        return (None, *[x.grad for x in inputs])


def buggy_checkpointed(bug: str):
    class Buggy(Checkpointed):
        def forward(self, *args, **kwargs):
            if bug == "does_not_checkpoint":
                return self.layer(*args, **kwargs)
            if bug == "reentrant_function":
                return _ReentrantCheckpoint.apply(lambda *inputs: self.layer(*inputs, **kwargs), *args)
            if bug == "input_detached":
                args = (args[0].detach(), *args[1:])
            return checkpoint(self.layer, args, {} if bug == "keywords_dropped" else kwargs,
                              preserve_rng_state=bug != "rng_not_preserved")

    def checkpointed(layer: nn.Module) -> nn.Module:
        return Buggy(layer)

    return checkpointed


IDENTICAL = ["test_checkpointed_layer_gives_identical_outputs_and_gradients"]
CATALOG = {
    "reentrant_function": ("a reentrant checkpoint (an autograd.Function, as use_reentrant=True): with no input "
                           "requiring grad the output does not require grad either, and the parameters get no "
                           "gradient", IDENTICAL),
    "rng_not_preserved": ("preserve_rng_state=False with dropout: the recomputation draws other dropout masks than "
                          "the forward", IDENTICAL),
    "input_detached": ("the input is detached before the checkpointed call: it gets no gradient", IDENTICAL),
    "keywords_dropped": ("keyword arguments (mask=) are accepted but not passed to the layer", IDENTICAL),
    "does_not_checkpoint": ("the wrapper calls the layer directly: right numbers, every activation kept",
                            ["test_checkpointed_layer_saves_fewer_activations"]),
}

for _bug, (_why, _props) in CATALOG.items():
    mutant(name=f"checkpointed_{_bug}", bug=_why, caught_by=_props, provides="checkpointed")(buggy_checkpointed(_bug))
