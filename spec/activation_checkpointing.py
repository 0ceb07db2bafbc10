"""Activation checkpointing: a layer that keeps only its inputs for backward and recomputes its activations
there, computing exactly what the plain layer computes.

Signature
---------
    checkpointed(layer: nn.Module) -> nn.Module
        the returned module's forward(*args, **kwargs) computes layer(*args, **kwargs); its parameters are
        the layer's own (the layer itself, not a copy)

Shapes
------
Those of the wrapped layer; for spec/layers.py's: x (b, s, d) -> (b, s, d), memory (b, t, d).

Math
----
out = layer(*args, **kwargs), unchanged. What changes is memory and time: the plain layer keeps every
activation its backward pass needs (attention probabilities (b, h, s, s), the feed-forward's hidden units
(b, s, f), norm statistics, dropout masks); the checkpointed one keeps its inputs and recomputes the
layer's forward during backward to rebuild them: about one more forward pass of time for O(b s d)
numbers kept instead of O(b s (f + h s)) per layer.

Conventions (pinned, with the reason)
-------------------------------------
* Identical, not close: the recomputation runs the same operations on the same inputs, so the output and
  every gradient (the inputs' and the layer's parameters') are bit-identical (``torch.equal``) to the plain
  layer's, on one device with deterministic kernels.
* Dropout replays: the random state at the forward is restored for the recomputation
  (``torch.utils.checkpoint``'s ``preserve_rng_state=True``). Otherwise the recomputed dropout masks differ
  from the forward's, and the gradients belong to another function than the output.
* Non-reentrant (``torch.utils.checkpoint``'s ``use_reentrant=False``, PyTorch's recommendation: a
  saved-tensors hook swaps what autograd keeps for tickets, and backward answers them from a recomputation
  in the forward's own graph). The reentrant scheme (an autograd.Function that runs the layer under
  no_grad) returns an output that does not require grad when no input does (a first layer reading data or
  frozen embeddings), so the layer's parameters silently get no gradient (torch's also refuses keyword
  arguments).
* Not for cached decoding: the recomputation would run a KV cache's append twice. Inference needs no
  checkpointing (under ``torch.no_grad`` nothing is saved).

Options (declarable; properties/options.py)
-------------------------------------------
    keywords   True | False: the wrapped module passes keyword arguments (``mask=``) through to the layer
               (False: positional arguments only; the properties then call it without a mask).

Canonical parameters
--------------------
None of its own: those of the wrapped layer.

Properties (properties/test_activation_checkpointing.py)
--------------------------------------------------------
On spec/layers.py's EncoderLayer and DecoderLayer (ours, canonical weights, training mode): the output and
the gradients of the inputs and of every parameter are identical to the plain layer's, whether or not the
inputs require grad, with dropout under a fixed seed too; what autograd saves for backward (beyond the
parameters) takes fewer bytes than what it saves for the plain layer.
"""

from __future__ import annotations

from spec.registry import Component, boolean, component

KEYWORDS = boolean("keywords", "the wrapped module passes keyword arguments (mask=) through to the layer")

CHECKPOINTED = component(
    Component(
        name="checkpointed",
        kind="function",
        family="activation_checkpointing",
        summary="wraps a layer so backward recomputes its activations instead of saving them",
        output_shape=None,  # it returns a module, not a tensor
        options=(KEYWORDS,),
    )
)
