"""Properties of activation checkpointing: checkpointed(layer). Spec: spec/activation_checkpointing.py.

The layers wrapped are ours (implementations/layers.py) with canonical weights, drawn by the layer
properties' strategy (properties/test_layers.py: layer_cases): the component under test is the wrapper,
judged against the same layer run plainly. Both copies start from the same weights and the same seed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import implementations
from properties.assertions import assert_equal, assert_true, fail
from properties.options import Offers, draws_options
from properties.plugin import ComponentFailure, Implementation, where_raised
from properties.probes import saved_for_backward
from properties.strategies import fewer_examples, padding_masks, tensor
from properties.test_layers import LAYERS, LayerCase, layer_cases

CHECKPOINTED = "checkpointed"
pytestmark = pytest.mark.requires(CHECKPOINTED)
OURS = Implementation("ours", implementations)
AXES = "b s d"


@dataclass(frozen=True)
class CheckpointCase:
    """A layer configuration, a key padding mask (b, s) or None, and whether the inputs require grad."""

    layer: LayerCase
    keep: np.ndarray | None
    inputs_require_grad: bool

    def __repr__(self) -> str:
        keep = "" if self.keep is None else f", mask={self.keep!r}"
        return f"{self.layer!r}{keep}, inputs require grad: {self.inputs_require_grad}"

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(repr(self))


@draws_options(CHECKPOINTED, keywords=lambda case: case.keep is not None)
@st.composite
def checkpoint_cases(draw, offers: Offers, *, dropout: float = 0.0,
                     inputs_require_grad: bool | None = None) -> CheckpointCase:
    """One of our layers (EncoderLayer or DecoderLayer, any configuration of theirs) with ``dropout``; a
    padding mask where the wrapper passes keywords through; inputs requiring grad or not (None: drawn)."""
    component = draw(st.sampled_from(LAYERS), label="layer")
    layer = draw(layer_cases(OURS.offers(component), dropout=dropout), label="layer_case")
    keep = None
    if offers.offers("keywords", True):
        keep = draw(st.none() | padding_masks(layer.b, layer.s), label="mask")
    if inputs_require_grad is None:
        inputs_require_grad = draw(st.booleans(), label="inputs_require_grad")
    return CheckpointCase(layer, keep, inputs_require_grad)


@dataclass
class Run:
    """One forward and backward pass: the output and the gradients of the inputs and of each parameter
    (by the layer's own parameter names); None where no gradient arrived."""

    out: Tensor
    grads: dict[str, Tensor | None]


def wrap(impl: Implementation, layer: nn.Module) -> nn.Module:
    """The implementation's checkpointed(layer); an exception or a non-module is its failure."""
    __tracebackhide__ = True
    fn = impl.raw(CHECKPOINTED)
    try:
        module = fn(layer)
    except Exception as exc:
        raise ComponentFailure(f"{impl}: checkpointed(layer) raised {type(exc).__name__}: {exc}"
                               f"{where_raised(exc, fn)}") from None
    if not isinstance(module, nn.Module):
        raise ComponentFailure(f"{impl}: checkpointed(layer) returned a {type(module).__name__}; the spec's "
                               "checkpointed returns a torch.nn.Module wrapping the layer")
    return module


def run_once(who: str, case: CheckpointCase, module: nn.Module, layer: nn.Module, seed: int) -> Run:
    """Forward and backward (``loss.backward()``, as training does) of ``module`` (the layer itself, or the
    wrapper around it) from the random state ``seed``; gradients are read from the inputs and from
    ``layer``'s own parameters."""
    __tracebackhide__ = True
    c = case.layer
    x, memory = c.inputs()
    inputs = {"x": x} if memory is None else {"x": x, "memory": memory}
    for value in inputs.values():
        value.requires_grad_(case.inputs_require_grad)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # dropout draws from the global generator
        try:
            out = c.call(module, x, memory, keep=case.keep)
            if not out.requires_grad:
                fail(f"the checkpointed layer's output carries gradients ({case})",
                     "its output does not require grad, so no parameter of the layer can get a gradient",
                     "a reentrant checkpoint (an autograd.Function running the layer under no_grad, or "
                     "torch.utils.checkpoint(use_reentrant=True)) detaches the output when no input requires "
                     "grad, as for a first layer reading data: save tickets with saved_tensors_hooks instead "
                     "(use_reentrant=False).")
            weights = tensor(seed + 3, *out.shape, dtype=out.dtype, device=out.device)
            (out * weights).sum().backward()
        except (AssertionError, ComponentFailure):
            raise
        except Exception as exc:
            raise ComponentFailure(f"{who}: running {case} raised {type(exc).__name__}: {exc}"
                                   f"{where_raised(exc)}") from None
    grads = {name: v.grad for name, v in inputs.items() if v.requires_grad}
    return Run(out.detach(), grads | {name: p.grad for name, p in layer.named_parameters()})


def plain_and_checkpointed(impl: Implementation, case: CheckpointCase, *, train: bool) -> tuple[Run, Run]:
    """The same layer (canonical weights) run plainly and through ``checkpointed``, from the same seed."""
    __tracebackhide__ = True
    plain = case.layer.build(OURS).module.train(train)
    inner = copy.deepcopy(plain)
    wrapped = wrap(impl, inner)
    seed = case.layer.seed
    return run_once("ours", case, plain, plain, seed), run_once(f"{impl}: checkpointed", case, wrapped, inner, seed)


def assert_identical_runs(plain: Run, checked: Run, case: CheckpointCase, *, claim: str, hint: str) -> None:
    __tracebackhide__ = True
    assert_equal(checked.out, plain.out, axes=AXES, claim=f"{claim}: the output ({case})", hint=hint)
    missing = [name for name, g in checked.grads.items() if g is None and plain.grads[name] is not None]
    assert_true(not missing, claim=f"{claim}: every gradient arrives ({case})",
                detail=f"no gradient reached {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}",
                hint="the wrapper must run the given layer itself (not a copy) and keep its inputs attached "
                     "to the graph (no .detach()).")
    for name, want in plain.grads.items():
        if want is not None:
            assert_equal(checked.grads[name], want, claim=f"{claim}: the gradient of {name} ({case})", hint=hint)


@given(data=st.data())
def test_checkpointed_layer_gives_identical_outputs_and_gradients(impl, data):
    """The checkpointed layer's output and the gradients of its inputs and of every parameter of the layer
    are bit-identical to the plain layer's (float64, training mode), whether or not the inputs require grad,
    with dropout (p = 0.1, 0.5) under a fixed seed too: the recomputation replays the forward's dropout masks.

    Hint: a reentrant checkpoint (an autograd.Function running the layer under no_grad, as
    torch.utils.checkpoint(use_reentrant=True)) gives the parameters no gradient when no input requires
    grad; the recomputation must restore the forward's random state (preserve_rng_state=True), pass the
    keyword arguments on, and detach nothing.
    """
    p = data.draw(st.sampled_from([0.0, 0.1, 0.5]), label="dropout")
    case = data.draw(checkpoint_cases(impl.offers(CHECKPOINTED), dropout=p), label="case")
    plain, checked = plain_and_checkpointed(impl, case, train=True)
    claim = "checkpointing computes exactly the plain layer" + (f", dropout p={p} replayed" if p else "")
    assert_identical_runs(plain, checked, case, claim=claim,
                          hint="recompute with the forward's inputs, keywords and random state; detach nothing.")


@fewer_examples()
@given(data=st.data())
def test_checkpointed_layer_saves_fewer_activations(impl, data):
    """What autograd saves for backward through the checkpointed layer (beyond the layer's parameters) takes
    fewer bytes than what it saves through the plain layer: the activations are recomputed, not kept.

    Counted with a saved-tensors hook (torch.autograd.graph.saved_tensors_hooks), each storage once.
    Hint: a wrapper that calls the layer directly computes the right numbers and saves nothing.
    """
    case = data.draw(checkpoint_cases(impl.offers(CHECKPOINTED), inputs_require_grad=True), label="case")
    plain = case.layer.build(OURS).module
    wrapped = wrap(impl, copy.deepcopy(plain))
    x, memory = case.layer.inputs()
    x.requires_grad_()
    if memory is not None:
        memory.requires_grad_()
    counts = {}
    for name, module in (("plain", plain), ("checkpointed", wrapped)):
        _, saved = saved_for_backward(lambda: case.layer.call(module, x, memory, keep=case.keep),
                                      exclude=list(module.parameters()))
        counts[name] = sum(saved.values())
    assert_true(
        counts["checkpointed"] < counts["plain"],
        claim=f"the checkpointed layer saves fewer bytes for backward than the plain layer ({case})",
        detail=f"checkpointed saves {counts['checkpointed']} bytes, the plain layer {counts['plain']}",
        hint="run the layer inside torch.utils.checkpoint.checkpoint; calling it directly keeps every activation.",
    )
