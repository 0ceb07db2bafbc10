"""A correct attention family written differently from ours: one fused QKV projection and einsum.

It passes the suite:

    pytest -n auto --impl examples/fused_qkv_attention.py

Its parameters do not carry the spec's names (one ``qkv`` Linear instead of ``q``, ``k``, ``v``), so it
declares the mapping the relational properties need: ``canonical_state_dict`` hands out views of its
fused weight under the canonical names, and ``load_canonical_state_dict`` writes them back.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def scaled_dot_product_attention(q, k, v, *, mask=None, causal=False, scale=None):
    h, g, s, t = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    # Group query heads: (b, h, s, e) -> (b, g, r, s, e), query head i = (i // r, i % r).
    qg = q.unflatten(1, (g, h // g))
    scores = torch.einsum("bgrse,bgte->bgrst", qg, k) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    allowed = torch.ones(s, t, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril(t - s)
    if mask is not None:
        if mask.dim() == 4:  # (b, h|1, s, t) -> (b, g|1, r|1, s, t), matching the grouped scores
            mask = mask.unflatten(1, (g, h // g)) if mask.shape[1] == h else mask.unsqueeze(2)
        allowed = allowed & mask
    allowed = allowed.expand_as(scores)
    scores = torch.where(allowed, scores, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1) * allowed  # rows with nothing allowed become all zeros
    out = torch.einsum("bgrst,bgtf->bgrsf", weights, v)
    return out.flatten(1, 2)


class GroupedQueryAttention(nn.Module):
    # What this family offers beyond the spec's defaults: biases always (one fused Linear with a bias),
    # no RotaryEmbedding and no KV cache (properties/options.py).
    spec_options = {"bias": True, "rotary": False, "cache": False}

    def __init__(self, *, d_model: int, n_head: int, n_kv_head: int | None = None) -> None:
        super().__init__()
        g = n_head if n_kv_head is None else n_kv_head
        if d_model % n_head or n_head % g:
            raise ValueError(f"need n_kv_head | n_head | d_model, got {g}, {n_head}, {d_model}")
        self.h, self.g, self.e = n_head, g, d_model // n_head
        self.qkv = nn.Linear(d_model, (n_head + 2 * g) * self.e)
        self.out = nn.Linear(d_model, d_model)

    # --- the mapping to the spec's canonical parameter names -------------------------------------
    def _slices(self):
        q, kv = self.h * self.e, self.g * self.e
        return {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}

    def canonical_state_dict(self) -> dict[str, Tensor]:
        state = {"o.weight": self.out.weight, "o.bias": self.out.bias}
        for name, rows in self._slices().items():
            state[f"{name}.weight"], state[f"{name}.bias"] = self.qkv.weight[rows], self.qkv.bias[rows]
        return state

    def load_canonical_state_dict(self, params: dict[str, Tensor]) -> None:
        for name, rows in self._slices().items():
            self.qkv.weight[rows] = params[f"{name}.weight"]
            self.qkv.bias[rows] = params[f"{name}.bias"]
        self.out.weight.copy_(params["o.weight"])
        self.out.bias.copy_(params["o.bias"])

    # --- the computation --------------------------------------------------------------------------
    def project(self, x: Tensor, context: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        w, b = self.qkv.weight, self.qkv.bias
        sl = self._slices()
        q = nn.functional.linear(x, w[sl["q"]], b[sl["q"]])
        kv = nn.functional.linear(context, w[sl["k"].start : sl["v"].stop], b[sl["k"].start : sl["v"].stop])
        k, v = kv.chunk(2, dim=-1)
        return (
            q.unflatten(-1, (self.h, self.e)).transpose(1, 2),
            k.unflatten(-1, (self.g, self.e)).transpose(1, 2),
            v.unflatten(-1, (self.g, self.e)).transpose(1, 2),
        )

    def forward(self, x: Tensor, *, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        return self._run(x, x, mask, causal)

    def _run(self, x, context, mask, causal):
        q, k, v = self.project(x, context)
        out = scaled_dot_product_attention(q, k, v, mask=mask, causal=causal)
        return self.out(out.transpose(1, 2).flatten(2))


class MultiHeadAttention(GroupedQueryAttention):
    def __init__(self, *, d_model: int, n_head: int) -> None:
        super().__init__(d_model=d_model, n_head=n_head, n_kv_head=n_head)


class MultiQueryAttention(GroupedQueryAttention):
    def __init__(self, *, d_model: int, n_head: int) -> None:
        super().__init__(d_model=d_model, n_head=n_head, n_kv_head=1)


class CrossAttention(MultiHeadAttention):
    def forward(self, x: Tensor, context: Tensor, *, mask: Tensor | None = None) -> Tensor:
        return self._run(x, context, mask, False)
