"""Attention modules: single-head self-attention, multi-head attention, cross-attention.

Signatures (constructors are keyword-only)
-------------------------------------------
    SelfAttention(*, d_model)                              .forward(x, *, mask=None, causal=False)
    MultiHeadAttention(*, d_model, n_head, rotary=None)    .forward(x, *, mask=None, causal=False, cache=None)
    CrossAttention(*, d_model, n_head)                     .forward(x, context, *, mask=None)
``rotary`` (a RotaryEmbedding, spec/rotary_embedding.py) rotates queries and keys at their absolute
positions after projection; ``cache`` (a KVCache, spec/kv_cache.py) holds the keys and values of earlier
positions, so the chunk x sits at positions cache.length .. cache.length + s - 1. Both are optional: the
properties here use neither; properties/test_kv_cache.py checks them.

Shapes
------
    x        (b, s, d)          the sequence that asks (queries)
    context  (b, t, d)          the sequence that answers (keys and values); t may differ from s
    mask     bool; SelfAttention: broadcastable to (b, s, t); the multi-head modules: to (b, h, s, t).
             A padding (key) mask is ``keep[:, None, None, :]`` for shape (b, t).
    out      (b, s, d), the dtype and device of x

Math (e = d // h)
-----------------
    q = x W_q^T + b_q          split into h heads:   (b, s, d) -> (b, h, s, e)
    k = c W_k^T + b_k          split into g heads:   (b, t, d) -> (b, g, t, e)    c = context, or x
    v = c W_v^T + b_v          split into g heads
    a = scaled_dot_product_attention(q, k, v, mask=mask, causal=causal, grouping=grouping)   (spec/sdpa.py)
    out = merge_heads(a) W_o^T + b_o                  (b, h, s, e) -> (b, s, h*e)
Heads are split as ``rearrange(y, "b s (h e) -> b h s e")``: head i owns features i*e .. (i+1)*e - 1
of every projection, and merging puts them back in the same place.

Conventions
-----------
All of spec/sdpa.py (mask polarity True = may attend, bottom-right causal
alignment, zeros for a query with no allowed key). SelfAttention is the one-head case, so its scale is
1/sqrt(d). Every projection has a bias, as ``nn.MultiheadAttention`` and ``nn.Linear`` default to.

Canonical parameters (the names the relational properties use to share weights)
----------------------------------------------------------------------------------
    q.weight (h*e, d)  q.bias (h*e,)     k.weight (g*e, d)  k.bias (g*e,)
    v.weight (g*e, d)  v.bias (g*e,)     o.weight (d, h*e)  o.bias (d,)
with g = h here (MQA and GQA, in spec/grouped_query_attention.py, shrink k and v). An implementation
whose parameters carry other names maps them (README, "Check your own implementation").

Properties (properties/test_attention.py)
-----------------------------------------
agrees with the reference in float64, float32 and (CUDA) half precision; causal attention never leaks
the future, with an exactly zero Jacobian, and depends on the past; masked keys have no influence; a fully
masked query row is finite; batch elements are independent; self-attention is equivariant to permuting
positions; cross-attention is invariant to permuting the context; one-head MHA equals SelfAttention;
cross-attention on its own input equals MHA; MHA agrees with ``nn.MultiheadAttention``; gradcheck;
every parameter gets a finite gradient; dtype and device are preserved.
"""

from __future__ import annotations

import numpy as np
from einops import rearrange

from spec.registry import Component, Option, Param, boolean, component, same_shape_as_first_input
from spec.sdpa import scaled_dot_product_attention


def projection_parameters(*, d_model: int, n_head: int, n_kv_head: int, bias: bool = True) -> dict[str, Param]:
    """Canonical parameters of every attention module (g = n_kv_head, e = d_model // n_head); without
    biases (``bias=False``, LLaMA and most modern models) the weights alone."""
    e = d_model // n_head
    params = {}
    for name, rows, cols in (("q", n_head * e, d_model), ("k", n_kv_head * e, d_model),
                             ("v", n_kv_head * e, d_model), ("o", d_model, n_head * e)):
        params[f"{name}.weight"] = Param((rows, cols))
        if bias:
            params[f"{name}.bias"] = Param((rows,), "bias")
    return params


# The option space of the attention modules (properties/options.py explains declarations).
BIAS = boolean("bias", "every projection has a bias (False: the weights alone, as LLaMA)", kind="init")
MASK = boolean("mask", "the call takes a boolean mask (True = may attend)", argument="mask")
CAUSAL = Option("causal", (False, True), "call", "causal=True hides later positions (bottom-right aligned)")
EMPTY_ROWS = boolean("empty_rows", "a query whose keys are all masked gives zeros (checked by its own property)")
ROTARY = boolean("rotary", "the constructor takes a RotaryEmbedding as rotary=", default=False, argument="rotary")
CACHE = boolean("cache", "the call takes a KVCache as cache= (incremental decoding)", default=False,
                argument="cache")
SELF_ATTENTION_OPTIONS = (BIAS, MASK, CAUSAL, EMPTY_ROWS)
DECODING_OPTIONS = (ROTARY, CACHE)


SELF_ATTENTION = component(
    Component(
        name="SelfAttention",
        kind="module",
        family="attention",
        summary="single-head self-attention",
        parameters=lambda *, d_model, bias=True, **_: projection_parameters(
            d_model=d_model, n_head=1, n_kv_head=1, bias=bias
        ),
        output_shape=same_shape_as_first_input,
        options=SELF_ATTENTION_OPTIONS,
    )
)
MULTI_HEAD_ATTENTION = component(
    Component(
        name="MultiHeadAttention",
        kind="module",
        family="attention",
        summary="multi-head self-attention",
        parameters=lambda *, d_model, n_head, bias=True, **_: projection_parameters(
            d_model=d_model, n_head=n_head, n_kv_head=n_head, bias=bias
        ),
        output_shape=same_shape_as_first_input,
        options=SELF_ATTENTION_OPTIONS + DECODING_OPTIONS,
    )
)
CROSS_ATTENTION = component(
    Component(
        name="CrossAttention",
        kind="module",
        family="attention",
        summary="multi-head cross-attention (queries from x, keys and values from context)",
        parameters=lambda *, d_model, n_head, bias=True, **_: projection_parameters(
            d_model=d_model, n_head=n_head, n_kv_head=n_head, bias=bias
        ),
        output_shape=same_shape_as_first_input,
        options=(BIAS, MASK, EMPTY_ROWS),
    )
)


def attention(
    params: dict[str, np.ndarray],
    x: np.ndarray,
    context: np.ndarray | None = None,
    *,
    n_head: int,
    n_kv_head: int | None = None,
    mask: np.ndarray | None = None,
    causal: bool = False,
    rotary=None,
    grouping: str = "contiguous",
) -> np.ndarray:
    """The float64 reference shared by every attention module (MHA, MQA, GQA, cross, single-head).

    ``rotary``, if given, maps a (b, h, s, e) array to itself rotated at positions 0 .. s - 1 (e.g.
    ``functools.partial(spec.rotary_embedding.rotary_embedding, base=..., pairing=...)``); it is applied
    to queries and keys after projection.
    """
    p = {name: np.asarray(value, dtype=np.float64) for name, value in params.items()}
    x = np.asarray(x, dtype=np.float64)
    c = x if context is None else np.asarray(context, dtype=np.float64)
    n_kv_head = n_head if n_kv_head is None else n_kv_head

    def project(inp: np.ndarray, name: str, heads: int) -> np.ndarray:
        y = inp @ p[f"{name}.weight"].T + p.get(f"{name}.bias", 0.0)
        return rearrange(y, "b s (h e) -> b h s e", h=heads)

    q, k, v = project(x, "q", n_head), project(c, "k", n_kv_head), project(c, "v", n_kv_head)
    if rotary is not None:
        q, k = rotary(q), rotary(k)
    a = scaled_dot_product_attention(q, k, v, mask=mask, causal=causal, grouping=grouping)
    return rearrange(a, "b h s e -> b s (h e)") @ p["o.weight"].T + p.get("o.bias", 0.0)


def self_attention(params, x, *, mask=None, causal=False) -> np.ndarray:
    """Reference for SelfAttention: its mask is (b, s, t)-broadcastable, so give it a head axis."""
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        mask = mask[..., None, :, :] if mask.ndim >= 3 else mask
    return attention(params, x, n_head=1, mask=mask, causal=causal)
