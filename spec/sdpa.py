"""Scaled dot-product attention, as a function, and the masks it takes.

Signature
---------
    scaled_dot_product_attention(q, k, v, *, mask=None, causal=False, scale=None) -> Tensor

Shapes
------
    q     (b, h, s, e)
    k     (b, g, t, e)      g divides h; g == h is ordinary multi-head attention
    v     (b, g, t, e_v)
    mask  bool, broadcastable to (b, h, s, t); True = this query may attend to this key
    out   (b, h, s, e_v), the dtype and device of q

Math
----
    kv head of query head i:  i // (h // g)                       (contiguous groups)
    scores[b,i,x,y] = scale * <q[b,i,x], k[b, i // (h//g), y]>,    scale = 1 / sqrt(e) unless given
    allowed[x,y]    = mask[x,y] and (not causal or y <= x + (t - s))
    weights         = softmax over y of scores, restricted to allowed keys
    out[b,i,x]      = sum_y weights[b,i,x,y] * v[b, i // (h//g), y]
    a row x with no allowed key:  out[b,i,x] = 0

Conventions (pinned, with the reason)
-------------------------------------
* Mask polarity: True = may attend, as ``F.scaled_dot_product_attention``. (``nn.MultiheadAttention``
  and TransformerEngine use True = masked out; a learner mixing the two gets the complement.)
* Causal alignment: bottom-right. Query x sits at absolute position t - s + x. With s == t this is the
  usual lower triangle; with s < t (a chunk decoded after a cached prefix) the last query sees every
  key. PyTorch's ``is_causal`` aligns top-left when s != t (pytorch issues #108108, #115111).
* ``mask`` and ``causal`` combine with "and" (SDPA refuses both at once; the spec allows it).
* A query row with no allowed key returns zeros, never NaN (SDPA does the same since torch 2.5).
* GQA head mapping: query head i reads KV head i // (h // g), as HF ``repeat_kv``, torchtune and SDPA's
  ``enable_gqa`` (``repeat_interleave`` on the head axis). x-transformers' round-robin (i % g) differs.
* The output has the dtype and device of the inputs.

Canonical parameters
--------------------
None: this is a function.

Properties (properties/test_sdpa.py)
-----------------------------------------------------------
agrees with this reference; agrees with ``F.scaled_dot_product_attention`` (math backend, with
``enable_gqa`` where torch has it); never leaks the future (outputs and exact zero Jacobian); depends on
the past; masked keys have no influence and get exactly zero gradient; a fully masked row is zero;
batch elements are independent; permuting queries permutes the output and permuting keys with their
values changes nothing; the output is a convex combination of the values; large scores stay finite;
float64 gradcheck; dtype and device are preserved.
"""

from __future__ import annotations

import numpy as np
from einops import einsum, repeat

from spec.registry import Component, Option, boolean, component

# The option space (properties/options.py): what an implementation may declare it lacks.
HEAD_GROUPING = Option(
    "head_grouping", ("contiguous", "round_robin"), "convention",
    "query head i reads KV head i // (h/g) (contiguous, the spec's) or i % g (round_robin, x-transformers); "
    "the same map up to a permutation of query heads",
)
SDPA_OPTIONS = (
    boolean("mask", "the call takes a boolean mask (True = may attend)", argument="mask"),
    Option("causal", (False, True), "call", "causal=True hides later keys (bottom-right aligned)"),
    boolean("scale", "the call takes scale= (None: 1/sqrt(e))", argument="scale"),
    boolean("unequal_lengths", "s != t: queries and keys of different lengths (a chunk after a cache)"),
    boolean("grouped_heads", "k and v with g < h heads (the kernel groups query heads itself)"),
    boolean("value_width", "v's head width e_v may differ from q and k's e"),
    boolean("empty_rows", "a query whose keys are all masked gives zeros (checked by its own property)"),
    HEAD_GROUPING,
)

SCALED_DOT_PRODUCT_ATTENTION = component(
    Component(
        name="scaled_dot_product_attention",
        kind="function",
        family="sdpa",
        summary="softmax(q k^T * scale, restricted to allowed keys) v",
        output_shape=lambda q, k, v, **kwargs: (*q.shape[:-1], v.shape[-1]),
        options=SDPA_OPTIONS,
    )
)


def causal_mask(s: int, t: int) -> np.ndarray:
    """Bottom-right causal mask (s, t), True = may attend: query x sees keys y <= x + (t - s).

    >>> causal_mask(2, 4).astype(int)
    array([[1, 1, 1, 0],
           [1, 1, 1, 1]])
    """
    return np.tril(np.ones((s, t), dtype=bool), k=t - s)


def allowed_keys(
    shape: tuple[int, int, int, int], mask: np.ndarray | None, causal: bool
) -> np.ndarray:
    """The boolean (b, h, s, t) array of allowed (query, key) pairs."""
    b, h, s, t = shape
    allowed = np.ones(shape, dtype=bool)
    if mask is not None:
        allowed = allowed & np.broadcast_to(np.asarray(mask, dtype=bool), shape)
    if causal:
        allowed = allowed & causal_mask(s, t)
    return allowed


def scaled_dot_product_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    causal: bool = False,
    scale: float | None = None,
    grouping: str = "contiguous",
) -> np.ndarray:
    """The float64 reference. Inputs of any float dtype are read as float64.

    ``grouping="round_robin"`` judges an implementation that declares x-transformers' head mapping."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    b, h, s, e = q.shape
    g, t = k.shape[1], k.shape[2]
    if h % g:
        raise ValueError(f"query heads h={h} are not a multiple of kv heads g={g}")
    # Contiguous groups: KV head j serves query heads j*(h//g) .. (j+1)*(h//g) - 1; round-robin: j, j+g, ...
    pattern = {"contiguous": "b g t e -> b (g r) t e", "round_robin": "b g t e -> b (r g) t e"}[grouping]
    k = repeat(k, pattern, r=h // g)
    v = repeat(v, pattern, r=h // g)
    scale = 1.0 / np.sqrt(e) if scale is None else float(scale)
    scores = einsum(q, k, "b h s e, b h t e -> b h s t") * scale
    allowed = allowed_keys((b, h, s, t), mask, causal)
    any_allowed = allowed.any(axis=-1, keepdims=True)
    # Subtract the largest allowed score of each row; rows with none allowed use 0 (they become 0 below).
    row_max = np.where(allowed, scores, -np.inf).max(axis=-1, keepdims=True)
    row_max = np.where(any_allowed, row_max, 0.0)
    # exp of -inf (not of a masked score, which may exceed the row max and overflow) for masked keys.
    unnormalised = np.exp(np.where(allowed, scores - row_max, -np.inf))
    total = unnormalised.sum(axis=-1, keepdims=True)
    weights = unnormalised / np.where(any_allowed, total, 1.0)
    return einsum(weights, v, "b h s t, b h t f -> b h s f")
