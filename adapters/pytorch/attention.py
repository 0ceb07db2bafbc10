"""PyTorch's attention under the spec's names: ``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention``.

Conventions converted here (and only here):
* ``nn.MultiheadAttention`` masks with True = NOT allowed; the spec's True = may attend is inverted.
* PyTorch's ``is_causal`` aligns top-left when s != t; the spec aligns bottom-right, so a causal call with
  s != t (or together with a mask, which SDPA refuses) passes an explicit mask instead.
* ``nn.MultiheadAttention`` packs q, k and v into one ``in_proj_weight`` (3d, d), q then k then v;
  ``canonical_state_dict`` / ``load_canonical_state_dict`` split and join it (the fused-layout mapping).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from implementations.sdpa import causal_mask

HAS_ENABLE_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")

__all__ = ["scaled_dot_product_attention", "SelfAttention", "MultiHeadAttention", "CrossAttention"]
if HAS_ENABLE_GQA:
    __all__ += ["GroupedQueryAttention", "MultiQueryAttention"]


def _allowed(mask: Tensor | None, causal: bool, s: int, t: int, device: torch.device) -> Tensor | None:
    allowed = causal_mask(s, t, device=device) if causal else None
    if mask is not None:
        allowed = mask if allowed is None else mask & allowed
    return allowed


def scaled_dot_product_attention(q, k, v, *, mask=None, causal=False, scale=None) -> Tensor:
    s, t = q.shape[-2], k.shape[-2]
    extra = {"enable_gqa": True} if k.shape[-3] != q.shape[-3] else {}
    if causal and mask is None and s == t:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, **extra)
    allowed = _allowed(mask, causal, s, t, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, **extra)


class _TorchMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention(batch_first=True)`` with the spec's call and parameter names."""

    def __init__(self, *, d_model: int, n_head: int, bias: bool = True) -> None:
        super().__init__()
        self.n_head = n_head
        self.mha = nn.MultiheadAttention(d_model, n_head, bias=bias, batch_first=True)

    def canonical_state_dict(self) -> dict[str, Tensor]:
        wq, wk, wv = self.mha.in_proj_weight.chunk(3, dim=0)
        state = {"q.weight": wq, "k.weight": wk, "v.weight": wv, "o.weight": self.mha.out_proj.weight}
        if self.mha.in_proj_bias is not None:
            bq, bk, bv = self.mha.in_proj_bias.chunk(3, dim=0)
            state |= {"q.bias": bq, "k.bias": bk, "v.bias": bv, "o.bias": self.mha.out_proj.bias}
        return state

    def load_canonical_state_dict(self, params: dict[str, Tensor]) -> None:
        self.mha.in_proj_weight.copy_(torch.cat([params["q.weight"], params["k.weight"], params["v.weight"]]))
        self.mha.out_proj.weight.copy_(params["o.weight"])
        if self.mha.in_proj_bias is not None:
            self.mha.in_proj_bias.copy_(torch.cat([params["q.bias"], params["k.bias"], params["v.bias"]]))
            self.mha.out_proj.bias.copy_(params["o.bias"])

    def _attend(self, x: Tensor, context: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        b, s, t = x.shape[0], x.shape[1], context.shape[1]
        allowed = _allowed(mask, causal, s, t, x.device)
        attn_mask = None
        if allowed is not None:
            # (b|1, h|1, s, t) -> (b*h, s, t), and True = NOT allowed for nn.MultiheadAttention.
            allowed = allowed.expand(b, self.n_head, s, t)
            attn_mask = ~rearrange(allowed, "b h s t -> (b h) s t")
        out, _ = self.mha(x, context, context, attn_mask=attn_mask, need_weights=False)
        return out


class MultiHeadAttention(_TorchMultiheadAttention):
    # nn.MultiheadAttention takes no RotaryEmbedding and no KV cache.
    spec_options = {"rotary": False, "cache": False}

    def forward(self, x: Tensor, *, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        return self._attend(x, x, mask, causal)


class SelfAttention(_TorchMultiheadAttention):
    def __init__(self, *, d_model: int, bias: bool = True) -> None:
        super().__init__(d_model=d_model, n_head=1, bias=bias)

    def forward(self, x: Tensor, *, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        if mask is not None and mask.dim() >= 3:
            mask = mask.unsqueeze(-3)
        return self._attend(x, x, mask, causal)


class CrossAttention(_TorchMultiheadAttention):
    def forward(self, x: Tensor, context: Tensor, *, mask: Tensor | None = None) -> Tensor:
        return self._attend(x, context, mask, False)


class _SdpaGroupedQueryAttention(nn.Module):
    """Linear projections around ``F.scaled_dot_product_attention(..., enable_gqa=True)``."""

    spec_options = {"rotary": False, "cache": False}

    def __init__(self, *, d_model: int, n_head: int, n_kv_head: int, bias: bool = True) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, e = n_head, n_kv_head, d_model // n_head
        self.q = nn.Linear(d_model, n_head * e, bias=bias)
        self.k = nn.Linear(d_model, n_kv_head * e, bias=bias)
        self.v = nn.Linear(d_model, n_kv_head * e, bias=bias)
        self.o = nn.Linear(n_head * e, d_model, bias=bias)

    def forward(self, x: Tensor, *, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        q = rearrange(self.q(x), "b s (h e) -> b h s e", h=self.n_head)
        k = rearrange(self.k(x), "b s (g e) -> b g s e", g=self.n_kv_head)
        v = rearrange(self.v(x), "b s (g e) -> b g s e", g=self.n_kv_head)
        a = scaled_dot_product_attention(q, k, v, mask=mask, causal=causal)
        return self.o(rearrange(a, "b h s e -> b s (h e)"))


if HAS_ENABLE_GQA:

    class GroupedQueryAttention(_SdpaGroupedQueryAttention):
        pass

    class MultiQueryAttention(_SdpaGroupedQueryAttention):
        def __init__(self, *, d_model: int, n_head: int, bias: bool = True) -> None:
            super().__init__(d_model=d_model, n_head=n_head, n_kv_head=1, bias=bias)
