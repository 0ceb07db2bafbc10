"""Tiled attention with online softmax (the FlashAttention algorithm): scaled dot-product attention computed
one key/value block at a time, returning the output and each query's log-sum-exp.

Signature
---------
    tiled_attention(q, k, v, *, mask=None, causal=False, scale=None, block_size=64) -> (out, lse)

Shapes
------
    q     (b, h, s, e)
    k     (b, g, t, e)      g divides h
    v     (b, g, t, e_v)
    mask  bool, broadcastable to (b, h, s, t); True = this query may attend to this key
    out   (b, h, s, e_v)    the dtype of q
    lse   (b, h, s)         float32 for float16/bfloat16 inputs, else the dtype of q
Key blocks hold ``block_size`` positions (the last one fewer when block_size does not divide t).

Math
----
``out`` is spec/sdpa.py's scaled dot-product attention, same scale, mask, causal alignment and head
mapping. It is computed over key blocks j (FlashAttention, Dao et al. 2022, Algorithm 1; the online
softmax of Milakov & Gimelshein 2018), with S_j = scale * q K_j^T restricted to allowed keys (-inf
elsewhere), per query row:
    m' = max(m, rowmax(S_j))                       running maximum        (m = -inf at the start)
    l' = e^(m - m') l + rowsum(e^(S_j - m'))       running normalizer     (l = 0)
    O' = e^(m - m') O + e^(S_j - m') V_j           running numerator      (O = 0)
then out = O / l and lse = m + log l = log sum_y exp(scores[x, y]) over the allowed keys y.
The backward pass recomputes each block's probabilities from the saved log-sum-exp,
    P_j = exp(S_j - lse),  D = rowsum(dout * out),
    dV_j = P_j^T dout,  dS_j = P_j * (dout V_j^T - D),  dQ = scale sum_j dS_j K_j,  dK_j = scale dS_j^T q,
so neither pass ever holds the (s, t) score or probability matrix: the extra memory is O(s * block_size)
for the block being computed plus O(s) for m, l and lse, against O(s * t) for the plain computation.
Key/value heads serve contiguous groups of query heads (their gradients sum over the group).

Conventions (pinned, with the reason)
-------------------------------------
* Mask polarity, bottom-right causal alignment, contiguous GQA groups, "mask and causal combine with
  and": spec/sdpa.py's, so that tiled attention is a drop-in replacement for it.
* A query row with no allowed key: out = 0 (as spec/sdpa.py) and lse = -inf (the log of an empty sum):
  its l stays 0, and dividing by it would give NaN. Its gradient is zero.
* lse is float32 for float16/bfloat16 inputs (FlashAttention's softmax_lse is float32): the backward pass
  recomputes exp(S - lse), and a float16 lse near 10 is off by up to 4e-3, an error of that size in every
  recomputed probability. The computation itself runs in float32 for those inputs (the kernels accumulate
  in float32) and ``out`` is cast back to the input dtype.
* lse is an output for the caller's bookkeeping (merging attention over key shards: out = sum_i
  e^(lse_i - lse) out_i with lse = logsumexp_i lse_i); the properties differentiate through ``out`` only.
* Every block size gives the same function: 1, a divisor of t, a non-divisor (a last, shorter block) and
  one larger than t (a single block).

Options (declarable; properties/options.py)
-------------------------------------------
spec/sdpa.py's (mask, causal, scale, unequal_lengths, grouped_heads, value_width, empty_rows,
head_grouping), plus
    block_size   True | False: the call takes ``block_size=`` (False: the implementation tiles with a
                 block length of its own, which the properties cannot choose; the property about memory
                 then needs it).

Canonical parameters
--------------------
None: this is a function.

Properties (properties/test_tiled_attention.py)
-----------------------------------------------
the output equals this reference for every block size (float64; float32 by the error-ratio rule against
our plain SDPA), masks, causal flag, grouped heads and value width included; the log-sum-exp equals
``log_sum_exp`` below; gradients w.r.t. q, k and v equal those of ``F.scaled_dot_product_attention``
(float64); a fully masked row gives zeros, lse -inf and finite gradients; forward and backward never
create a tensor as large as the (b, h, s, t) score array, and what is saved for backward (beyond the
inputs) is smaller than one; the output is at least as accurate as PyTorch's flash-attention kernel in
the same dtype (float32 on the CPU, float16/bfloat16 on CUDA: the error-ratio rule); dtype and device are
preserved.
"""

from __future__ import annotations

import numpy as np
from einops import einsum, rearrange

from spec.registry import Component, boolean, component
from spec.sdpa import SDPA_OPTIONS, allowed_keys

BLOCK_SIZE = boolean(
    "block_size",
    "the call takes block_size= (the key/value block length; False: the implementation's own tiling)",
    argument="block_size",
)

TILED_ATTENTION = component(
    Component(
        name="tiled_attention",
        kind="function",
        family="tiled_attention",
        summary="online-softmax attention over key blocks: (out, log-sum-exp), recomputing blocks in backward",
        output_shape=None,  # a pair (out, lse): the properties check both shapes
        options=SDPA_OPTIONS + (BLOCK_SIZE,),
    )
)


def log_sum_exp(
    q: np.ndarray,
    k: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    causal: bool = False,
    scale: float | None = None,
    grouping: str = "contiguous",
) -> np.ndarray:
    """The float64 reference lse (b, h, s): log sum_y exp(scale <q_x, k_y>) over the allowed keys y,
    -inf for a row with none. Query heads are grouped per KV head without repeating K
    ("b (g r) s e": contiguous groups; "b (r g) s e": round-robin)."""
    q, k = (np.asarray(a, dtype=np.float64) for a in (q, k))
    b, h, s, e = q.shape
    g, t = k.shape[1], k.shape[2]
    heads = {"contiguous": "b (g r) s e -> b g r s e", "round_robin": "b (r g) s e -> b g r s e"}[grouping]
    scale = 1.0 / np.sqrt(e) if scale is None else float(scale)
    scores = einsum(rearrange(q, heads, g=g), k, "b g r s e, b g t e -> b g r s t") * scale
    back = {"contiguous": "b g r s t -> b (g r) s t", "round_robin": "b g r s t -> b (r g) s t"}[grouping]
    scores = rearrange(scores, back)
    allowed = allowed_keys((b, h, s, t), mask, causal)
    masked = np.where(allowed, scores, -np.inf)
    top = masked.max(axis=-1)  # -inf for a row with no allowed key
    finite_top = np.where(np.isfinite(top), top, 0.0)
    total = np.exp(masked - finite_top[..., None]).sum(axis=-1)  # exp(-inf) = 0 for masked keys
    with np.errstate(divide="ignore"):  # log(0) = -inf is the answer for an empty row
        return np.where(total > 0, finite_top + np.log(total), -np.inf)
