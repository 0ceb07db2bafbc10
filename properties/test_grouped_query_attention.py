"""Properties of MultiQueryAttention and GroupedQueryAttention that relate them to each other and to MHA.
Spec: spec/grouped_query_attention.py. (Reference agreement, causality, masks, batch independence, gradients
and dtypes for these modules are in properties/test_attention.py, parametrized over every attention module.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from einops import repeat
from hypothesis import given
from hypothesis import strategies as st

from properties.assertions import FLOAT64_RTOL, assert_close, assert_true, fail
from properties.attention_cases import attention_cases
from spec.attention import attention as reference_attention
from spec.grouped_query_attention import kv_parameter_count, kv_size_per_token

AXES = "b s d"


def repeat_kv_heads(params: dict[str, torch.Tensor], *, h: int, g: int, mapping: str) -> dict[str, torch.Tensor]:
    """MHA weights whose query head i uses KV head i // (h // g) ("contiguous") or i % g ("round_robin")."""
    pattern = {"contiguous": "(g e) d -> (g r e) d", "round_robin": "(g e) d -> (r g e) d"}[mapping]
    out = dict(params)
    for name in ("k", "v"):
        out[f"{name}.weight"] = repeat(params[f"{name}.weight"], pattern, g=g, r=h // g)
        if f"{name}.bias" in params:
            out[f"{name}.bias"] = repeat(params[f"{name}.bias"], pattern.replace(" d", ""), g=g, r=h // g)
    return out


def call_kwargs(mask, causal):
    kwargs = {} if mask is None else {"mask": torch.from_numpy(np.asarray(mask))}
    return kwargs | {"causal": causal}


@pytest.mark.requires("GroupedQueryAttention", "MultiQueryAttention")
@given(data=st.data())
def test_gqa_with_one_kv_head_equals_mqa(impl, data):
    """GroupedQueryAttention(n_kv_head=1) with MQA's weights computes MultiQueryAttention."""
    both = impl.offers("MultiQueryAttention") & impl.offers("GroupedQueryAttention")
    case = data.draw(attention_cases(both, component="MultiQueryAttention"), label="case")
    mask, causal = case.mask, case.causal
    mqa = case.build(impl)
    params = {k: v.detach().clone() for k, v in mqa.canonical_state().items()}
    gqa = impl.build("GroupedQueryAttention", seed=case.seed, d_model=case.cfg.d, n_head=case.cfg.h, n_kv_head=1,
                     bias=case.bias, params=params)
    x, _ = case.inputs()
    assert_close(
        gqa(x, **call_kwargs(mask, causal)), mqa(x, **call_kwargs(mask, causal)), axes=AXES,
        claim=f"GroupedQueryAttention with one KV head equals MultiQueryAttention ({case.cfg}, causal={causal})",
        hint="MQA is GQA with a single key/value head shared by all query heads.",
    )


@pytest.mark.requires("GroupedQueryAttention", "MultiHeadAttention")
@given(data=st.data())
def test_gqa_with_n_head_kv_heads_equals_mha(impl, data):
    """GroupedQueryAttention(n_kv_head=n_head) with MHA's weights computes MultiHeadAttention."""
    both = impl.offers("MultiHeadAttention") & impl.offers("GroupedQueryAttention")
    case = data.draw(attention_cases(both, component="MultiHeadAttention"), label="case")
    mask, causal = case.mask, case.causal
    mha = case.build(impl)
    params = {k: v.detach().clone() for k, v in mha.canonical_state().items()}
    gqa = impl.build("GroupedQueryAttention", seed=case.seed, d_model=case.cfg.d, n_head=case.cfg.h,
                     n_kv_head=case.cfg.h, bias=case.bias, params=params)
    x, _ = case.inputs()
    assert_close(
        gqa(x, **call_kwargs(mask, causal)), mha(x, **call_kwargs(mask, causal)), axes=AXES,
        claim=f"GroupedQueryAttention with n_kv_head = n_head equals MultiHeadAttention ({case.cfg}, causal={causal})",
        hint="with as many KV heads as query heads, each query head reads its own KV head.",
    )


@pytest.mark.requires("GroupedQueryAttention")
@given(data=st.data())
def test_gqa_equals_mha_with_repeated_kv_heads(impl, data):
    """GQA equals the spec's MHA whose K/V weights repeat each KV head for its group: query head i reads
    KV head i // (n_head / n_kv_head) (contiguous groups, as HF repeat_kv and SDPA's enable_gqa), or
    i % n_kv_head for an implementation that declares ``head_grouping="round_robin"`` (the same map up
    to a permutation of query heads, as the two RoPE pairings are).

    Drawn with 1 < n_kv_head < n_head, where the head mapping matters. A failure says whether the
    implementation groups the other way.
    """
    case = data.draw(attention_cases(impl.offers("GroupedQueryAttention"), heads="grouped"), label="case")
    mask, causal = case.mask, case.causal
    c = case.cfg
    gqa = case.build(impl)
    params = {k: v.detach().clone() for k, v in gqa.canonical_state().items()}
    x, _ = case.inputs()
    out = gqa(x, **call_kwargs(mask, causal))

    def mha_with(mapping: str) -> torch.Tensor:
        repeated = {k: v.numpy() for k, v in repeat_kv_heads(params, h=c.h, g=c.g, mapping=mapping).items()}
        return torch.from_numpy(reference_attention(repeated, x.numpy(), n_head=c.h, mask=mask, causal=causal))

    grouping = case.grouping
    other = {"contiguous": "round_robin", "round_robin": "contiguous"}[grouping]
    reads = {"contiguous": f"i // {c.h // c.g}", "round_robin": f"i % {c.g}"}
    claim = (f"GroupedQueryAttention equals MHA with each KV head repeated for its group, query head i reading "
             f"KV head {reads[grouping]} ({grouping} grouping, {c})")
    want = mha_with(grouping)
    # Which mapping the output matches, by the float64 rule, only to choose the message below.
    def matches(expected: torch.Tensor) -> bool:
        return torch.allclose(out, expected, rtol=FLOAT64_RTOL, atol=FLOAT64_RTOL)

    if not matches(want) and matches(mha_with(other)):
        declared = "declares" if "head_grouping" in case.offers.declared else "does not declare (the spec's default)"
        fail(
            claim,
            f"the output matches {other} grouping instead: query head i reads KV head {reads[other]}",
            f"{case.offers.owner} {declared} head_grouping={grouping!r}. If {other} grouping is what you meant "
            f"(it is the same map up to a permutation of query heads), declare spec_options = "
            f"{{'head_grouping': {other!r}}}; otherwise expand KV heads with "
            + ("repeat_interleave (einops 'b g t e -> b (g r) t e'), not .repeat / 'b (r g) t e'."
               if grouping == "contiguous" else ".repeat (einops 'b g t e -> b (r g) t e')."),
        )
    assert_close(out, want, axes=AXES, claim=claim,
                 hint="view K as (b, t, g, 1, e) and expand the new axis (repeat each KV head in place).")


@pytest.mark.parametrize("component", ["MultiQueryAttention", "GroupedQueryAttention"])
@given(data=st.data())
def test_kv_projections_have_the_spec_sizes(impl, component, data):
    """The module holds exactly the spec's parameters, and K/V per token is 2 * n_kv_head * head_dim numbers.

    Hint: MQA/GQA save memory only if k and v project to n_kv_head * head_dim features, not to d_model.
    """
    case = data.draw(attention_cases(impl.offers(component)), label="case")
    c = case.cfg
    module = case.build(impl)
    total = sum(p.numel() for p in module.module.parameters())
    expected = sum(int(np.prod(p.shape)) for p in module.expected_parameters().values())
    state = module.canonical_state()
    kv_params = sum(state[n].numel() for n in ("k.weight", "k.bias", "v.weight", "v.bias") if n in state)
    kv_per_token = state["k.weight"].shape[0] + state["v.weight"].shape[0]
    sizes = dict(d_model=c.d, n_head=c.h, n_kv_head=c.g)
    kv_count = kv_parameter_count(**sizes, bias=case.bias)
    assert_true(
        total == expected and kv_params == kv_count and kv_per_token == kv_size_per_token(**sizes),
        claim=f"{case} has the spec's parameter count and K/V size per token",
        detail=f"parameters {total} (spec {expected}), K/V parameters {kv_params} "
        f"(spec {kv_count}), K/V numbers per token {kv_per_token} (spec {kv_size_per_token(**sizes)})",
        hint="k and v are nn.Linear(d_model, n_kv_head * head_dim); no unused projections.",
    )
