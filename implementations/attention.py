"""Attention modules in PyTorch: single-head, multi-head and cross-attention. Spec: spec/attention.py."""

from __future__ import annotations

from einops import rearrange
from torch import Tensor, nn

from implementations.kv_cache import KVCache
from implementations.sdpa import scaled_dot_product_attention

__all__ = ["SelfAttention", "MultiHeadAttention", "CrossAttention"]


class ProjectedAttention(nn.Module):
    """Shared body of every attention module: project, split heads, attend, merge heads, project.

    Query heads h, key/value heads g (g divides h): MHA is g = h, MQA g = 1, GQA anything between.
    ``rotary`` (a RotaryEmbedding, or None) rotates queries and keys at their absolute positions; a
    ``cache`` (KVCache) passed to forward holds the keys and values of earlier positions.
    """

    def __init__(
        self, *, d_model: int, n_head: int, n_kv_head: int, rotary: nn.Module | None = None, bias: bool = True
    ) -> None:
        super().__init__()
        if d_model <= 0 or n_head <= 0 or n_kv_head <= 0:
            raise ValueError(f"sizes must be positive: d_model={d_model}, n_head={n_head}, n_kv_head={n_kv_head}")
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
        if n_head % n_kv_head:
            raise ValueError(f"n_head={n_head} is not divisible by n_kv_head={n_kv_head}")
        self.d_model, self.n_head, self.n_kv_head = d_model, n_head, n_kv_head
        self.head_dim = d_model // n_head
        # bias=False: the weights alone (LLaMA and most modern models).
        self.q = nn.Linear(d_model, n_head * self.head_dim, bias=bias)
        self.k = nn.Linear(d_model, n_kv_head * self.head_dim, bias=bias)
        self.v = nn.Linear(d_model, n_kv_head * self.head_dim, bias=bias)
        self.o = nn.Linear(n_head * self.head_dim, d_model, bias=bias)
        self.rotary = rotary

    def attend(
        self, x: Tensor, context: Tensor, *, mask: Tensor | None, causal: bool, cache: KVCache | None = None
    ) -> Tensor:
        q = rearrange(self.q(x), "b s (h e) -> b h s e", h=self.n_head)
        k = rearrange(self.k(context), "b t (g e) -> b g t e", g=self.n_kv_head)
        v = rearrange(self.v(context), "b t (g e) -> b g t e", g=self.n_kv_head)
        start = 0 if cache is None else cache.length  # absolute position of this chunk's first token
        if self.rotary is not None:
            q, k = self.rotary(q, offset=start), self.rotary(k, offset=start)
        if cache is not None:
            k, v = cache.update(k, v)  # (b, g, start + t, e): earlier positions first
        # Bottom-right causal alignment: chunk query j (position start + j) sees keys 0 .. start + j.
        a = scaled_dot_product_attention(q, k, v, mask=mask, causal=causal)  # (b, h, s, e)
        return self.o(rearrange(a, "b h s e -> b s (h e)"))


class MultiHeadAttention(ProjectedAttention):
    """Multi-head self-attention; mask broadcastable to (b, h, s, s), True = may attend."""

    def __init__(self, *, d_model: int, n_head: int, rotary: nn.Module | None = None, bias: bool = True) -> None:
        super().__init__(d_model=d_model, n_head=n_head, n_kv_head=n_head, rotary=rotary, bias=bias)

    def forward(
        self, x: Tensor, *, mask: Tensor | None = None, causal: bool = False, cache: KVCache | None = None
    ) -> Tensor:
        return self.attend(x, x, mask=mask, causal=causal, cache=cache)


class SelfAttention(ProjectedAttention):
    """Single-head self-attention (scale 1/sqrt(d_model)); mask broadcastable to (b, s, s)."""

    def __init__(self, *, d_model: int, bias: bool = True) -> None:
        super().__init__(d_model=d_model, n_head=1, n_kv_head=1, bias=bias)

    def forward(self, x: Tensor, *, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        if mask is not None and mask.dim() >= 3:
            mask = mask.unsqueeze(-3)  # (b, s, t) -> (b, 1, s, t): the single head axis
        return self.attend(x, x, mask=mask, causal=causal)


class CrossAttention(ProjectedAttention):
    """Queries from x (b, s, d); keys and values from context (b, t, d); mask broadcastable to (b, h, s, t)."""

    def __init__(self, *, d_model: int, n_head: int, bias: bool = True) -> None:
        super().__init__(d_model=d_model, n_head=n_head, n_kv_head=n_head, bias=bias)

    def forward(self, x: Tensor, context: Tensor, *, mask: Tensor | None = None) -> Tensor:
        return self.attend(x, context, mask=mask, causal=False)
