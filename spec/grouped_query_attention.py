"""Multi-query and grouped-query attention: fewer key/value heads than query heads.

Signatures (constructors are keyword-only)
-------------------------------------------
    MultiQueryAttention(*, d_model, n_head, rotary=None)               .forward(x, *, mask=None, causal=False, cache=None)
    GroupedQueryAttention(*, d_model, n_head, n_kv_head, rotary=None)  .forward(x, *, mask=None, causal=False, cache=None)
(``rotary`` and ``cache`` as in spec/attention.py.)

Shapes
------
    x (b, s, d);  mask bool, broadcastable to (b, h, s, s);  out (b, s, d)
    MQA is GQA with g = 1; MHA is GQA with g = h.

Math
----
As spec/attention.py, with k and v projected to g heads of width e = d // h:
    k = x W_k^T + b_k : (b, s, d) -> (b, s, g*e) -> (b, g, s, e)
and query head i reading KV head i // (h // g).

Conventions
-----------
* Head mapping (pinned): query head i reads KV head i // (h // g): contiguous groups, as HF
  ``repeat_kv``, torchtune, flash-attention and SDPA's ``enable_gqa``. Round-robin grouping (i % g,
  x-transformers' ``repeat(t, 'b g n e -> b (r g) n e')``) computes a different function of the same
  weights: checkpoints cannot be exchanged between the two (ONNX PR #7274 fixed exactly this).
* n_kv_head must divide n_head, and n_head must divide d_model: otherwise ``ValueError``.

Canonical parameters
--------------------
As spec/attention.py with g = n_kv_head (MQA: g = 1):
    q.weight (d, d)   k.weight (g*e, d)   v.weight (g*e, d)   o.weight (d, d)   and their biases.
Sizes (what MQA and GQA buy):
    key/value parameters      2 * (g*e*d + g*e)          (MHA: 2 * (d*d + d))
    key/value size per token  2 * g * e numbers           (MHA: 2 * d; a KV cache stores this per layer)

Properties (properties/test_grouped_query_attention.py)
-------------------------------------------------------
agrees with the reference; GQA with g = 1 equals MQA; GQA with g = h equals MHA; GQA equals an MHA whose
K/V weights repeat each KV head for its group (round-robin grouping is named in the failure); parameter
counts and K/V size per token follow the formulas above; plus the attention-module properties of
properties/test_attention.py (causality, masks, batch independence, gradients, dtype and device).
"""

from __future__ import annotations

from spec.attention import DECODING_OPTIONS, SELF_ATTENTION_OPTIONS, attention, projection_parameters
from spec.registry import Component, component, same_shape_as_first_input
from spec.sdpa import HEAD_GROUPING

MULTI_QUERY_ATTENTION = component(
    Component(
        name="MultiQueryAttention",
        kind="module",
        family="grouped_query_attention",
        summary="multi-query attention (one key/value head)",
        parameters=lambda *, d_model, n_head, bias=True, **_: projection_parameters(
            d_model=d_model, n_head=n_head, n_kv_head=1, bias=bias
        ),
        output_shape=same_shape_as_first_input,
        options=SELF_ATTENTION_OPTIONS + DECODING_OPTIONS,
    )
)
GROUPED_QUERY_ATTENTION = component(
    Component(
        name="GroupedQueryAttention",
        kind="module",
        family="grouped_query_attention",
        summary="grouped-query attention (n_kv_head key/value heads, contiguous groups)",
        parameters=lambda *, d_model, n_head, n_kv_head, bias=True, **_: projection_parameters(
            d_model=d_model, n_head=n_head, n_kv_head=n_kv_head, bias=bias
        ),
        output_shape=same_shape_as_first_input,
        options=SELF_ATTENTION_OPTIONS + DECODING_OPTIONS + (HEAD_GROUPING,),
    )
)


def kv_parameter_count(*, d_model: int, n_head: int, n_kv_head: int, bias: bool = True) -> int:
    """Number of key/value projection parameters (weights, and biases unless bias=False, of k and v)."""
    e = d_model // n_head
    return 2 * (n_kv_head * e * d_model + (n_kv_head * e if bias else 0))


def kv_size_per_token(*, d_model: int, n_head: int, n_kv_head: int) -> int:
    """Numbers stored per token and layer for keys and values together."""
    return 2 * n_kv_head * (d_model // n_head)


def grouped_query_attention(params, x, *, n_head: int, n_kv_head: int, mask=None, causal=False):
    """The float64 reference (the shared attention reference with g = n_kv_head)."""
    return attention(params, x, n_head=n_head, n_kv_head=n_kv_head, mask=mask, causal=causal)
