"""Sliding-window attention (Mistral 7B, Jiang et al. 2023) and its rolling KV cache.

Signatures (constructors are keyword-only)
-------------------------------------------
    sliding_window_mask(s, t, *, window) -> bool Tensor (s, t)          True = may attend
    RollingKVCache(*, batch_size, n_kv_head, head_dim, window, dtype=torch.float32, device="cpu")
        .update(k, v) -> (k_win, v_win)   the held positions, then the chunk; keeps the last w
        .length -> int                    positions seen so far (the absolute position of the next token)
        .keys, .values                    storage (b, g, w, e): w slots, whatever the sequence length
    SlidingWindowAttention(*, d_model, n_head, n_kv_head, window, rotary=None, bias=True)
        .forward(x, *, cache=None)        always causal and banded
``rotary`` is a RotaryEmbedding (spec/rotary_embedding.py) for queries and keys; ``cache`` a RollingKVCache.

Shapes (the glossary of spec/__init__.py, plus this family's w)
-----------------------------------------------------------------
    w = window             the keys a query sees, itself included
    x (b, s, d);  out (b, s, d), x's dtype and device
    update: k, v (b, g, n, e) for n new positions -> k_win, v_win (b, g, min(length, w) + n, e)

Math
----
Query at absolute position i sees the keys at positions j with
    i - w < j <= i                          (w keys, itself included; fewer near the start)
With s queries and t keys aligned bottom-right (the project's causal convention, spec/sdpa.py), query x
sits at t - s + x, so the mask is
    mask[x, y] = (y <= x + t - s) and (y > x + t - s - w)
and SlidingWindowAttention is the attention of spec/attention.py (GQA, contiguous groups) with this mask:
    out = attention(params, x, mask=sliding_window_mask(s, s, window=w)), RoPE at positions 0 .. s - 1.

The rolling cache (decoding with O(w) memory). Before a chunk of n positions the cache has seen
L = length positions and holds the last min(L, w) of them, position p in slot p mod w (mistral-inference's
``cache_positions = positions % sliding_window``). ``update(k, v)``:
    1. returns [the held positions max(0, L - w) .. L - 1, in position order] ++ [the chunk's n positions]:
       the keys of positions max(0, L - w) .. L + n - 1, contiguous and ending at the last query;
    2. then writes the chunk's last min(n, w) positions into their slots p mod w and sets length = L + n.
The chunk's queries attend over what update returned with sliding_window_mask(n, min(L, w) + n): bottom-
right alignment puts query j at L + j and key y at max(0, L - w) + y, so the mask is exactly the window
in absolute positions (mistral-inference: the unrotated cache ++ the chunk, with
``make_local_attention_from_bottomright(w)``). Then, for any split of a sequence into chunks, the
concatenated chunk outputs equal the full banded pass, and the cache never holds more than w positions.

Conventions (pinned, with the reason)
-------------------------------------
* Window: w keys including the query itself, i - w < j <= i. This is mistral-inference's
  RotatingBufferCache (xformers ``make_local_attention(w)``; a decode step attends over the w cached
  positions), vLLM, and HF's eager/SDPA masks (``sliding_window=w``). Flash-attention's
  ``window_size=(left, right)`` keeps [i - left, i + right] inclusive, so w keys is ``(w - 1, 0)``; HF
  passed ``(w, w)`` and saw w + 1 keys (HF issues #29623 and #39408, fixed by PR #40163), and Mistral's
  one_file_ref.py prefill mask ``tril().triu(-w)`` keeps w + 1 keys too, one more than its decode steps
  see. "Off by one" means w + 1 keys (j >= i - w) or w - 1 (j > i - w + 1).
* A window at least as long as the sequence is plain causal attention.
* A chunk longer than w (a prefill) attends over [held ++ chunk], never over the cache after writing it:
  its early queries need keys of the chunk that the cache will not keep (query L + j needs L + j - w + 1
  .. L + j). Only the last min(n, w) chunk positions are written, so writes never collide in a slot.
* Keys are cached after RoPE, rotated at their absolute positions L + j, never at their slot: the score
  of a query and a key depends on the distance of their positions, which slots lose when they wrap.

Options (declarable; properties/options.py)
-------------------------------------------
* ``bias`` (constructor): as the attention modules (spec/attention.py); Mistral has none.
* ``rotary`` (input): the constructor takes a RotaryEmbedding as ``rotary=``.
* ``cache`` (input): the call takes a RollingKVCache as ``cache=``.

Canonical parameters
--------------------
As GroupedQueryAttention (spec/grouped_query_attention.py), g = n_kv_head:
    q.weight (h*e, d)   k.weight (g*e, d)   v.weight (g*e, d)   o.weight (d, h*e)   and their biases.

Properties (properties/test_sliding_window.py)
----------------------------------------------
the mask keeps exactly the last w keys of each query, bottom-right aligned (agrees with this reference);
the module equals attention with the banded causal mask (float64; float32 by the error-ratio rule), RoPE
included; decoding through a rolling cache equals the full banded pass for any split, chunks longer
than w included, with RoPE at absolute positions; update returns the held window then the chunk; the
cache stores w slots whatever the length, position p in slot p mod w.
"""

from __future__ import annotations

import numpy as np

from spec.attention import BIAS, ROTARY, attention
from spec.grouped_query_attention import GROUPED_QUERY_ATTENTION
from spec.registry import Component, boolean, component, same_shape_as_first_input
from spec.sdpa import causal_mask

SLIDING_WINDOW_MASK = component(
    Component(
        name="sliding_window_mask",
        kind="function",
        family="sliding_window",
        summary="banded causal mask (s, t): query x sees the last `window` keys up to x + t - s",
        output_shape=lambda s, t, **kwargs: (s, t),
    )
)
ROLLING_KV_CACHE = component(
    Component(
        name="RollingKVCache",
        kind="class",
        family="sliding_window",
        summary="KV cache of the last `window` positions (b, n_kv_head, window, head_dim), slot = position mod window",
    )
)
SLIDING_WINDOW_ATTENTION = component(
    Component(
        name="SlidingWindowAttention",
        kind="module",
        family="sliding_window",
        summary="causal GQA over the last `window` positions (Mistral), decoding with a RollingKVCache",
        parameters=GROUPED_QUERY_ATTENTION.parameters,  # the same projections (window is no parameter)
        output_shape=same_shape_as_first_input,
        options=(
            BIAS,
            ROTARY,
            boolean("cache", "the call takes a RollingKVCache as cache= (decoding that holds `window` positions)",
                    default=False, argument="cache"),
        ),
    )
)


def sliding_window_mask(s: int, t: int, *, window: int) -> np.ndarray:
    """(s, t), True = may attend: query x (at position x + t - s) sees keys y with x + t - s - w < y <= x + t - s.

    >>> sliding_window_mask(3, 5, window=2).astype(int)
    array([[0, 1, 1, 0, 0],
           [0, 0, 1, 1, 0],
           [0, 0, 0, 1, 1]])
    """
    if window < 1:
        raise ValueError(f"window={window} must be at least 1")
    recent = np.triu(np.ones((s, t), dtype=bool), k=t - s - window + 1)  # y - x >= t - s - w + 1
    return causal_mask(s, t) & recent


def held_positions(length: int, window: int) -> np.ndarray:
    """The absolute positions a rolling cache holds after ``length`` positions: the last min(length, w)."""
    return np.arange(max(0, length - window), length)


def slot(position: int | np.ndarray, window: int):
    """Where a rolling cache keeps a position: position mod w (Mistral's ``positions % sliding_window``)."""
    return np.asarray(position) % window


def sliding_window_attention(params, x, *, n_head: int, n_kv_head: int, window: int, rotary=None) -> np.ndarray:
    """The float64 reference: attention (spec/attention.py) with the banded causal mask; ``rotary`` maps
    (b, h, s, e) to itself rotated at positions 0 .. s - 1 (spec.rotary_embedding.rotary_embedding)."""
    s = np.asarray(x).shape[1]
    return attention(params, x, n_head=n_head, n_kv_head=n_kv_head,
                     mask=sliding_window_mask(s, s, window=window), rotary=rotary)
