"""The KV cache: keys and values of earlier positions, kept per layer for incremental decoding.

Signature (constructor is keyword-only)
---------------------------------------
    KVCache(*, batch_size, n_kv_head, head_dim, capacity, dtype=torch.float32, device="cpu")
        .update(k, v) -> (k_all, v_all)     append, then return everything cached so far
        .length -> int                      positions cached
        .reset()                            forget everything (length 0), keep the storage
    Attention modules take it as ``forward(x, *, mask=None, causal=False, cache=None)``.

Shapes
------
    storage   keys and values (b, g, capacity, e) each: g = n_kv_head, NOT n_head, so an MQA cache is
              n_head times smaller than MHA's and a GQA cache n_head / n_kv_head times
    update    k, v (b, g, n, e) for n new positions -> k_all, v_all (b, g, length + n, e)
    size      2 * g * e numbers per token and layer (spec/grouped_query_attention.kv_size_per_token)

Math (what makes the cache exact)
---------------------------------
Cached attention of a chunk x[p : p + n] given a cache holding positions 0 .. p - 1:
    q, k, v = projections of the chunk; with RoPE, q and k are rotated at positions p .. p + n - 1
    k_all, v_all = cache.update(k, v)                      keys of positions 0 .. p + n - 1
    out = scaled_dot_product_attention(q, k_all, v_all, causal=True)
The causal mask aligns bottom-right (spec/sdpa.py): chunk query j sits at position p + j and sees keys
0 .. p + j. Then, for any split of a sequence into a prefill chunk and later chunks (one token at a time
included), the concatenated chunk outputs equal the full causal forward pass.

Conventions
-----------
* Keys are cached after RoPE (rotated at their true positions), never re-rotated.
* Appending past ``capacity`` raises ValueError naming the numbers; nothing is silently dropped or grown.
* ``update`` checks that k and v have the cache's (b, g, e).

Canonical parameters
--------------------
None.

Properties (properties/test_kv_cache.py)
----------------------------------------
cached attention equals the full pass for any split, for MHA, MQA and GQA, with and without RoPE; a
chunk's queries are masked by their true positions (the top-left alignment bug is caught); update returns
exactly what was appended, in order; the cache holds n_kv_head heads (size per token as above); exceeding
the capacity is a clear error; reset forgets the previous sequence.
"""

from __future__ import annotations

import numpy as np

from spec.registry import Component, component

KV_CACHE = component(
    Component(
        name="KVCache",
        kind="class",
        family="kv_cache",
        summary="per-layer key/value cache (b, n_kv_head, capacity, head_dim)",
    )
)


def cache_storage_shape(*, batch_size: int, n_kv_head: int, head_dim: int, capacity: int) -> tuple[int, ...]:
    return (batch_size, n_kv_head, capacity, head_dim)


def split_points(total: int, chunks: list[int]) -> list[tuple[int, int]]:
    """[(start, stop), ...] of consecutive chunks covering 0 .. total: [3, 1, 2] -> [(0,3), (3,4), (4,6)]."""
    bounds = np.cumsum([0, *chunks])
    assert bounds[-1] == total, "chunks must add up to the sequence length"
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
