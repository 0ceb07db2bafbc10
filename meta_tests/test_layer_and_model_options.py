"""Regression tests for the option space of the layers and models: implementations that declare what they
lack are checked on what they offer, never failed for what they declared (issue 7's false alarms).

Each test declares a small implementation here, runs the properties on it (through ``Implementation`` with a
SimpleNamespace, as meta_tests/catalog.py does for mutants) and requires that they pass, or that the ones
needing what it lacks are skipped with a reason naming the option.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Callable, Iterator

import pytest
import torch
from hypothesis import settings
from torch import nn

import implementations
import properties.test_decoder_only as decoder_only
import properties.test_encoder_only as encoder_only
import properties.test_layers as layers
from implementations.decoder_only import DecoderOnlyLM
from implementations.encoder_only import EncoderOnlyModel
from implementations.layers import DecoderLayer, EncoderLayer
from properties.options import unmet_need
from properties.plugin import Implementation

OURS = Implementation("ours", implementations)


def implementation(label: str, **components) -> Implementation:
    """Our implementations, with ``components`` (spec name -> class) standing in for ours."""
    return Implementation(label, SimpleNamespace(**components), fallback=OURS)


@contextlib.contextmanager
def examples(prop: Callable, n: int = 8) -> Iterator[None]:
    """Run a property on ``n`` examples, without the example database (these tests must stay quick)."""
    original = prop._hypothesis_internal_use_settings
    prop._hypothesis_internal_use_settings = settings(original, max_examples=n, database=None)
    try:
        yield
    finally:
        prop._hypothesis_internal_use_settings = original


def skip_reason(prop: Callable, impl: Implementation, component: str, **params) -> str | None:
    """Why conftest would skip ``prop`` for ``impl``'s ``component`` (its ``needs`` marks, including those
    on the chosen parametrize values ``params``), or None."""
    marks = [m for m in getattr(prop, "pytestmark", []) if m.name == "needs"]
    for mark in getattr(prop, "pytestmark", []):
        if mark.name == "parametrize" and mark.args[0] in params:
            for value in mark.args[1]:
                if getattr(value, "values", (None,))[0] == params[mark.args[0]]:
                    marks += [m for m in value.marks if m.name == "needs"]
    for mark in marks:
        if not mark.args or component in mark.args:
            reason = unmet_need(impl.offers(component), mark.kwargs)
            if reason:
                return reason
    return None


# ---------------------------------------------------------------------------------------------------
# A layer whose own default differs from the spec's


class RmsByDefaultDecoderLayer(DecoderLayer):
    """norm="rms" by default (a LLaMA-style block), both norms offered."""

    def __init__(self, *, norm: str = "rms", **kwargs) -> None:
        super().__init__(norm=norm, **kwargs)


def test_layer_whose_own_default_norm_differs_is_built_with_the_drawn_norm():
    """Regression: the layer properties omitted norm= when the drawn value was the spec's default ("layer"),
    so a layer defaulting to RMSNorm was built with RMSNorm and judged against LayerNorm."""
    impl = implementation("rms-by-default", DecoderLayer=RmsByDefaultDecoderLayer)
    prop = layers.test_layer_agrees_with_reference
    with examples(prop, 12):
        prop(impl=impl, device="cpu", dtype=torch.float64, component="DecoderLayer")


# ---------------------------------------------------------------------------------------------------
# Layers offering SwiGLU only


class SwigluEncoderLayer(EncoderLayer):
    spec_options = {"activation": "swiglu"}

    def __init__(self, **kwargs) -> None:  # no activation keyword: SwiGLU built in
        super().__init__(activation="swiglu", **kwargs)


class SwigluDecoderLayer(DecoderLayer):
    spec_options = {"activation": "swiglu", "cross_attention": False}

    def __init__(self, **kwargs) -> None:  # decoder-only, SwiGLU built in
        super().__init__(activation="swiglu", cross_attention=False, **kwargs)


LAYER_PROPERTIES = [
    ("test_layer_agrees_with_reference", {"dtype": torch.float64}),
    ("test_layer_padding_does_not_change_real_positions", {}),
    ("test_layer_eval_mode_is_deterministic", {}),
    ("test_pre_norm_layer_with_zero_output_projections_is_identity", {}),
    ("test_every_layer_parameter_gets_a_finite_gradient", {}),
]


@pytest.mark.parametrize("component, cls", [("EncoderLayer", SwigluEncoderLayer), ("DecoderLayer", SwigluDecoderLayer)])
def test_layer_offering_swiglu_only_is_checked_and_skipped_where_relu_or_gelu_is_needed(component, cls):
    """Regression: a layer declaring relu and gelu unsupported crashed every property with Hypothesis'
    "Cannot sample from a length-zero sequence". Now its properties run on SwiGLU, and the comparison with
    nn.Transformer*Layer (relu or gelu only) is skipped, naming the option."""
    impl = implementation(f"swiglu-only {component}", **{component: cls})
    for name, params in LAYER_PROPERTIES:
        prop = getattr(layers, name)
        assert skip_reason(prop, impl, component) is None, name
        with examples(prop, 5):
            prop(impl=impl, device="cpu", component=component, **params)
    reason = skip_reason(layers.test_layer_agrees_with_torch_transformer_layer, impl, component, norm_first=False)
    assert reason == f"needs activation=relu or gelu; {cls.__name__} (as {component}) offers activation='swiglu' only"
    if component == "DecoderLayer":
        causal = layers.test_decoder_layer_is_causal
        assert skip_reason(causal, impl, component, cross_attention=False) is None
        with examples(causal, 5):
            causal(impl=impl, device="cpu", cross_attention=False)
        assert "needs cross_attention=True" in skip_reason(causal, impl, component, cross_attention=True)


# ---------------------------------------------------------------------------------------------------
# Gradients read through canonical views


class TransposedPositions(nn.Module):
    """A position table stored transposed, (d, max_len): the canonical pos.weight is a view of it."""

    def __init__(self, d_model: int, max_len: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(d_model, max_len))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table.T[: x.shape[1]]


class ViewedPositionsModel(EncoderOnlyModel):
    def __init__(self, *, d_model: int, max_len: int, **kwargs) -> None:
        super().__init__(d_model=d_model, max_len=max_len, **kwargs)
        self.pos = TransposedPositions(d_model, max_len)

    def canonical_state_dict(self) -> dict[str, torch.Tensor]:
        return {"pos.weight": self.pos.table.T}  # a view: it has no .grad of its own


def test_gradient_of_a_parameter_given_as_a_view_is_read_from_its_base():
    """Regression: the zero-gradient property read ``.grad`` of the view ``canonical_state_dict()`` returns
    and reported "pos.weight got no gradient at all"; it now reads CheckedModule.parameter_gradients()."""
    impl = implementation("viewed positions", EncoderOnlyModel=ViewedPositionsModel)
    for prop in (encoder_only.test_encoder_only_position_rows_used_only_by_padding_get_zero_gradient,
                 encoder_only.test_encoder_only_model_agrees_with_reference):
        kwargs = {"dtype": torch.float64} if "dtype" in prop.__code__.co_varnames else {}
        with examples(prop, 8):
            prop(impl=impl, device="cpu", **kwargs) if "device" in prop.__code__.co_varnames else prop(impl=impl)


# ---------------------------------------------------------------------------------------------------
# A GPT-2-style language model


class GPT2LikeLM(DecoderOnlyLM):
    """Learned positions, LayerNorm, GELU, tied head, biases; no KV cache, no generator, no n_kv_head."""

    spec_options = {"positions": "learned", "norm": "layer", "activation": "gelu", "tie_weights": True, "bias": True,
                    "n_kv_head": False, "cache": False, "generator": False}
    new_cache = None  # no such method

    def __init__(self, *, vocab_size, d_model, n_head, n_layer, d_ff, max_len, dropout=0.0) -> None:
        super().__init__(vocab_size=vocab_size, d_model=d_model, n_head=n_head, n_layer=n_layer, d_ff=d_ff,
                         max_len=max_len, dropout=dropout, positions="learned", norm="layer", activation="gelu",
                         tie_weights=True, bias=True)

    def forward(self, tokens, *, mask=None):
        return super().forward(tokens, mask=mask)

    def generate(self, prompt, *, max_new_tokens, temperature=0.0):
        return super().generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, use_cache=False)


GPT2 = implementation("gpt2-like", DecoderOnlyLM=GPT2LikeLM)
LM_RUNS = [
    ("test_decoder_only_lm_agrees_with_reference", {"device": "cpu", "positions": "learned", "tie": True}),
    ("test_decoder_only_lm_is_causal_end_to_end", {"device": "cpu"}),
    ("test_right_padded_batch_matches_each_sequence_alone", {"device": "cpu"}),
    ("test_greedy_generation_with_cache_equals_without", {}),
    ("test_sampling_at_vanishing_temperature_is_greedy", {}),
    ("test_tied_head_is_the_embedding", {}),
    ("test_every_lm_parameter_gets_a_finite_gradient_from_next_token_loss", {}),
]
LM_SKIPS = [
    ("test_decoder_only_lm_cached_logits_equal_the_full_pass", {"heads": "mha", "positions": "learned"},
     "needs cache=True; GPT2LikeLM (as DecoderOnlyLM) offers cache=False only"),
    ("test_new_cache_sizes_follow_spec", {}, "needs cache=True; GPT2LikeLM (as DecoderOnlyLM) offers cache=False only"),
    ("test_seeded_sampling_is_reproducible", {},
     "needs generator=True; GPT2LikeLM (as DecoderOnlyLM) offers generator=False only"),
    ("test_decoder_only_lm_agrees_with_reference", {"positions": "rope", "tie": True},
     "needs positions='rope'; GPT2LikeLM (as DecoderOnlyLM) offers positions='learned' only"),
]


@pytest.mark.parametrize("name, params", LM_RUNS, ids=[n for n, _ in LM_RUNS])
def test_gpt2_style_lm_runs_the_properties_it_offers(name, params):
    """A GPT-2-style DecoderOnlyLM declaring what it lacks runs agreement, causality, padding, generation
    and gradients in its own configuration, and passes them."""
    prop = getattr(decoder_only, name)
    assert skip_reason(prop, GPT2, "DecoderOnlyLM", **params) is None
    with examples(prop, 6):
        prop(impl=GPT2, **params)


@pytest.mark.parametrize("name, params, reason", LM_SKIPS, ids=[n for n, _, _ in LM_SKIPS])
def test_gpt2_style_lm_skips_the_properties_it_cannot_offer(name, params, reason):
    assert skip_reason(getattr(decoder_only, name), GPT2, "DecoderOnlyLM", **params) == reason


@pytest.mark.slow
def test_gpt2_style_lm_learns_in_its_own_configuration():
    """The copy learnability test trains the GPT-2-style model as declared (learned positions, LayerNorm,
    GELU, tied head) and generates without a cache."""
    import properties.test_learnability as learnability

    learnability.test_decoder_only_lm_learns_to_copy(GPT2)
