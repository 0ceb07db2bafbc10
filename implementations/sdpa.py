"""Scaled dot-product attention in PyTorch. Spec: spec/sdpa.py."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import repeat
from torch import Tensor

__all__ = ["scaled_dot_product_attention"]


def causal_mask(s: int, t: int, *, device: torch.device | str | None = None) -> Tensor:
    """Bottom-right causal mask (s, t), True = may attend: query x (at position t - s + x) sees y <= x + t - s."""
    return torch.ones(s, t, dtype=torch.bool, device=device).tril(diagonal=t - s)


def allowed_keys(mask: Tensor | None, causal: bool, s: int, t: int, device: torch.device) -> Tensor | None:
    """Combine a boolean mask and the causal flag into one mask broadcastable to (b, h, s, t), or None."""
    allowed = causal_mask(s, t, device=device) if causal else None
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be boolean (True = may attend), got dtype {mask.dtype}")
        allowed = mask if allowed is None else mask & allowed
    return allowed


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """softmax(q k^T * scale) v over the allowed keys; q (b, h, s, e), k (b, g, t, e), v (b, g, t, e_v)."""
    h, s, e = q.shape[-3:]
    g, t = k.shape[-3], k.shape[-2]
    if h % g:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({g})")
    if g != h:
        # Contiguous groups: query head i reads KV head i // (h // g) (spec: GQA head mapping).
        k = repeat(k, "b g t e -> b (g r) t e", r=h // g)
        v = repeat(v, "b g t e -> b (g r) t e", r=h // g)
    scale = 1.0 / math.sqrt(e) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (b, h, s, t)
    allowed = allowed_keys(mask, causal, s, t, q.device)
    if allowed is None:
        return torch.matmul(F.softmax(scores, dim=-1), v)
    # Out of place on purpose: autograd needs the unmasked graph intact.
    scores = scores.masked_fill(~allowed, float("-inf"))
    # A row with no allowed key would be softmax(all -inf) = NaN; give it finite scores, then zero it.
    any_allowed = allowed.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~any_allowed, 0.0)
    weights = F.softmax(scores, dim=-1).masked_fill(~any_allowed, 0.0)
    return torch.matmul(weights, v)  # (b, h, s, e_v)
