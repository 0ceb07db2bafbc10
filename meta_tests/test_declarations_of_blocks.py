"""Regression tests: implementations that declare what they offer (``spec_options``) are judged by what they
declare, in the families of position-wise blocks and positions (normalization, activations, feed-forward,
positional encodings, RoPE). Each test names the false alarm or the gap it guards against.

Small classes stand in for a learner's code; they run through the properties themselves, as the mutants
do (meta_tests/catalog.py), with a ``needs`` mark that the class does not meet reported as the skip reason
conftest would give.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import Phase, settings
from torch import nn

import implementations
from meta_tests.catalog import all_properties
from properties.options import unmet_need
from properties.plugin import Implementation

OURS = Implementation("ours", implementations)
PROPERTIES = all_properties()


def declared(**components) -> Implementation:
    """An implementation made of the given components (ours for the rest, as for mutants)."""
    return Implementation("regression", SimpleNamespace(**components), fallback=OURS)


@contextlib.contextmanager
def few_examples(fn):
    """Five derandomized examples, no shrinking: the false alarms guarded here show on every example."""
    original = fn._hypothesis_internal_use_settings
    fn._hypothesis_internal_use_settings = settings(
        original, max_examples=5, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate]
    )
    try:
        yield
    finally:
        fn._hypothesis_internal_use_settings = original


def skip_reason(name: str, impl: Implementation, component: str) -> str | None:
    """What conftest would skip property ``name`` with, for ``impl``'s ``component`` (its needs marks)."""
    for mark in getattr(PROPERTIES[name], "pytestmark", []):
        if mark.name == "needs" and (not mark.args or component in mark.args):
            reason = unmet_need(impl.offers(component), mark.kwargs)
            if reason:
                return reason
    return None


def run(name: str, impl: Implementation, component: str) -> str | None:
    """Run property ``name`` on ``impl`` (CPU, float64, the component given); return the skip reason if
    it would be skipped instead."""
    reason = skip_reason(name, impl, component)
    if reason:
        return reason
    fn = PROPERTIES[name]
    wanted = inspect.signature(fn).parameters
    args = {"impl": impl, "device": "cpu", "dtype": torch.float64, "component": component}
    with few_examples(fn):
        fn(**{k: v for k, v in args.items() if k in wanted})
    return None


def properties_of(module: str, component: str) -> list[str]:
    """The properties of ``properties/<module>.py`` that concern ``component``."""
    out = []
    for name, fn in PROPERTIES.items():
        if fn.__module__ != f"properties.{module}":
            continue
        marks = getattr(fn, "pytestmark", [])
        params = [m.args[1] for m in marks if m.name == "parametrize" and m.args[0] == "component"]
        required = [a for m in marks if m.name == "requires" for a in m.args]
        if (params and component in params[0]) or component in required or (not params and not required):
            out.append(name)
    return out


# ------------------------------------------------------------------------------------------- norms


def layer_norm_class(*, eps: float, declared_eps=None, takes_eps: bool = False):
    """A correct LayerNorm computing with ``eps``; it takes ``eps=`` (default ``eps``) only with
    takes_eps, and declares ``spec_options = {"eps": declared_eps}`` when that is given."""

    class LayerNorm(nn.Module):
        def __init__(self, *, d_model: int, bias: bool = True, **kw) -> None:
            super().__init__()
            if kw and not takes_eps:
                raise TypeError(f"unexpected keyword argument {next(iter(kw))!r}")
            self.eps = kw.get("eps", eps)
            self.weight = nn.Parameter(torch.ones(d_model))
            self.bias = nn.Parameter(torch.zeros(d_model)) if bias else None

        def forward(self, x):
            h = x.float() if x.dtype == torch.float16 else x  # half inputs normalised in float32
            bias = None if self.bias is None else self.bias.to(h.dtype)
            return nn.functional.layer_norm(h, h.shape[-1:], self.weight.to(h.dtype), bias, self.eps).to(x.dtype)

    if declared_eps is not None:
        LayerNorm.spec_options = {"eps": declared_eps}
    return LayerNorm


@pytest.mark.parametrize("name", properties_of("test_normalization", "LayerNorm"))
def test_layer_norm_with_a_declared_fixed_eps_passes_every_norm_property(name):
    """A LayerNorm with eps 1e-6 built in, declared as spec_options = {"eps": 1e-6}, is judged at 1e-6
    everywhere (it used to be judged at the spec's 1e-5 and fail)."""
    impl = declared(LayerNorm=layer_norm_class(eps=1e-6, declared_eps=1e-6))
    assert run(name, impl, "LayerNorm") is None


def test_layer_norm_declaring_an_eps_it_does_not_use_fails():
    """The declared eps really is the one judged: a LayerNorm computing with 1e-6 but declaring 1e-5 fails."""
    impl = declared(LayerNorm=layer_norm_class(eps=1e-6, declared_eps=1e-5))
    with pytest.raises(AssertionError, match="eps=1e-05"):
        run("test_norm_agrees_with_reference", impl, "LayerNorm")


def test_layer_norm_with_its_own_default_eps_is_built_with_the_spec_default():
    """A LayerNorm taking eps freely but defaulting to 1e-6 is built with eps=1e-5 explicitly when a
    property does not draw eps (it used to be built without eps and judged at 1e-5)."""
    impl = declared(LayerNorm=layer_norm_class(eps=1e-6, takes_eps=True))
    for name in ("test_norm_agrees_with_reference", "test_layer_norm_affine_acts_elementwise",
                 "test_norm_does_not_overflow_in_float16"):
        assert run(name, impl, "LayerNorm") is None


class FusedAffineLayerNorm(nn.Module):
    """LayerNorm whose weight and bias are rows of one parameter (2, d), exposed as views by
    canonical_state_dict(): a view has no .grad of its own."""

    def __init__(self, *, d_model: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.affine = nn.Parameter(torch.stack([torch.ones(d_model), torch.zeros(d_model)]))

    spec_options = {"bias": True}

    def canonical_state_dict(self):
        return {"weight": self.affine[0], "bias": self.affine[1]}

    def load_canonical_state_dict(self, params):
        self.affine.copy_(torch.stack([params["weight"], params["bias"]]))

    def forward(self, x):
        return nn.functional.layer_norm(x, x.shape[-1:], self.affine[0], self.affine[1], self.eps)


def test_norm_parameter_gradients_are_read_through_the_real_parameters():
    """A fused (2, d) affine parameter gets its gradient, read through parameter_gradients(): it used to be
    reported as "weight: no gradient" because .grad of a canonical_state_dict() view is None."""
    assert run("test_norm_parameters_get_finite_nonzero_gradients", declared(LayerNorm=FusedAffineLayerNorm),
               "LayerNorm") is None


# ----------------------------------------------------------------------------------- feed-forward


class GeluFeedForward(nn.Module):
    """A FeedForward with gelu built in (no activation keyword), as many tutorials write it."""

    spec_options = {"activation": "gelu"}

    def __init__(self, *, d_model: int, d_ff: int, bias: bool = True) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(d_model, d_ff, bias=bias), nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x):
        return self.down(nn.functional.gelu(self.up(x)))


@pytest.mark.parametrize("name", properties_of("test_feed_forward", "FeedForward"))
def test_gelu_only_feed_forward_is_judged_as_gelu(name):
    """A FeedForward declaring activation="gelu" is built without the keyword and judged as gelu; the
    relu-only property is skipped, naming the need (it used to be built with activation="relu")."""
    reason = run(name, declared(FeedForward=GeluFeedForward), "FeedForward")
    if name == "test_relu_feed_forward_with_every_hidden_unit_off_outputs_the_down_bias":
        assert reason == "needs activation='relu'; GeluFeedForward (as FeedForward) offers activation='gelu' only"
    else:
        assert reason is None


# ----------------------------------------------------------------------------------- activations


def plain_softmax(x, *, dim=-1):
    """softmax without a mask argument (F.softmax)."""
    return torch.softmax(x, dim=dim)


plain_softmax.spec_options = {"mask": False}


def tanh_gelu(x):
    """GPT-2's new_gelu: the tanh form built in, no approximate keyword."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


tanh_gelu.spec_options = {"approximate": "tanh"}


@pytest.mark.parametrize("name", properties_of("test_activations", "softmax") + properties_of("test_activations", "gelu"))
def test_activations_without_options_are_judged_on_what_they_offer(name):
    """A softmax without ``mask`` is called without one (the masked properties skip); a tanh-only gelu is
    called without ``approximate`` and judged as the tanh form (the exact-form property skips)."""
    impl = declared(softmax=plain_softmax, gelu=tanh_gelu)
    component = "softmax" if "softmax" in name else "gelu"
    reason = run(name, impl, component)
    skipped = {"test_softmax_masked_entries_are_exactly_zero": "needs mask=True",
               "test_softmax_fully_masked_rows_are_zero": "needs mask=True",
               "test_exact_gelu_is_not_the_tanh_approximation": "needs approximate='none'"}
    assert (reason or "").startswith(skipped.get(name, "")) and bool(reason) == (name in skipped)


# ----------------------------------------------------------------------------------- positions


class TutorialSinusoidal(nn.Module):
    """The PyTorch tutorial's encoding: always from position 0, no offset keyword."""

    spec_options = {"offset": False}

    def __init__(self, *, d_model: int, max_len: int) -> None:
        super().__init__()
        self.inner = implementations.SinusoidalPositionalEncoding(d_model=d_model, max_len=max_len)

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("name", properties_of("test_positional_encoding", "SinusoidalPositionalEncoding"))
def test_positional_encoding_without_offset_is_called_without_one(name):
    """An encoding without ``offset`` is called as module(x) everywhere (a stray offset= is a suite bug)."""
    assert run(name, declared(SinusoidalPositionalEncoding=TutorialSinusoidal), "SinusoidalPositionalEncoding") is None


def rope_class(*, pairing: str, declare: dict, table: int | None = None):
    """RoPE with one pairing built in (no pairing keyword) and positions from offset= only; with ``table``,
    a cos/sin cache of that many rows looked up with clamped positions."""

    class RotaryEmbedding(nn.Module):
        spec_options = {"positions": False, **declare}

        def __init__(self, *, head_dim: int, base: float = 10000.0) -> None:
            super().__init__()
            self.inner = implementations.RotaryEmbedding(head_dim=head_dim, base=base, pairing=pairing)

        def forward(self, x, *, offset: int = 0):
            positions = torch.arange(offset, offset + x.shape[-2], device=x.device)
            if table is not None:
                positions = positions.clamp(max=table - 1)
            return self.inner(x, positions=positions)

    return RotaryEmbedding


@pytest.mark.parametrize("name", properties_of("test_rotary_embedding", "RotaryEmbedding"))
def test_rope_with_a_declared_pairing_and_table_is_judged_within_them(name):
    """RoPE declaring pairing="half" and max_position=2048 (a clamped 2048-row table) is judged with the
    half pairing and below position 2048 everywhere; the property relating both pairings is skipped."""
    cls = rope_class(pairing="half", declare={"pairing": "half", "max_position": 2048}, table=2048)
    reason = run(name, declared(RotaryEmbedding=cls), "RotaryEmbedding")
    if name == "test_rope_pairings_are_one_map_up_to_deinterleaving":
        assert reason == "needs pairing='adjacent'; RotaryEmbedding offers pairing='half' only"
    else:
        assert reason is None


def test_rope_whose_declared_pairing_is_really_the_other_one_is_told_so():
    """A module declaring pairing="half" that rotates adjacent pairs fails, and the failure names the pairing."""
    impl = declared(RotaryEmbedding=rope_class(pairing="adjacent", declare={"pairing": "half"}))
    with pytest.raises(AssertionError, match="declares pairing='half'.*matches pairing='adjacent'"):
        run("test_rope_agrees_with_reference", impl, "RotaryEmbedding")


def test_rope_table_that_clamps_undeclared_is_named():
    """The same clamped 2048-row table without a declared max_position fails, with the table named."""
    impl = declared(RotaryEmbedding=rope_class(pairing="half", declare={"pairing": "half"}, table=2048))
    with pytest.raises(AssertionError, match="max_position"):
        run("test_rope_agrees_with_reference", impl, "RotaryEmbedding")
