"""Encoder and decoder layers in PyTorch. Spec: spec/layers.py."""

from __future__ import annotations

from torch import Tensor, nn

from implementations.attention import CrossAttention, MultiHeadAttention
from implementations.feed_forward import FeedForward, SwiGLU
from implementations.grouped_query_attention import GroupedQueryAttention
from implementations.kv_cache import KVCache
from implementations.normalization import LayerNorm, RMSNorm

__all__ = ["EncoderLayer", "DecoderLayer"]


def make_feed_forward(*, d_model: int, d_ff: int, activation: str, bias: bool = True) -> nn.Module:
    if activation == "swiglu":
        return SwiGLU(d_model=d_model, d_ff=d_ff)  # bias-free by definition
    if activation in ("relu", "gelu"):
        return FeedForward(d_model=d_model, d_ff=d_ff, activation=activation, bias=bias)
    raise ValueError(f"activation must be relu, gelu or swiglu, got {activation!r}")


def make_norm(*, d_model: int, norm: str, eps: float, bias: bool = True) -> nn.Module:
    if norm == "layer":
        return LayerNorm(d_model=d_model, eps=eps, bias=bias)
    if norm == "rms":
        return RMSNorm(d_model=d_model, eps=eps)  # no bias by definition
    raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")


def check_dropout(dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


def residual(x: Tensor, sublayer, norm: nn.Module, dropout: nn.Module, *, norm_first: bool) -> Tensor:
    """One sublayer with its norm, dropout and residual connection, pre-norm or post-norm."""
    if norm_first:
        return x + dropout(sublayer(norm(x)))  # pre-norm: the residual stream itself is never normalised
    return norm(x + dropout(sublayer(x)))  # post-norm: normalise after the residual add


class EncoderLayer(nn.Module):
    """Self-attention and feed-forward sublayers, post-norm or pre-norm; bias=False removes every bias (the
    projections' and the LayerNorms'), as nn.TransformerEncoderLayer(bias=False) does."""

    def __init__(
        self,
        *,
        d_model: int,
        n_head: int,
        d_ff: int,
        norm_first: bool = False,
        dropout: float = 0.0,
        activation: str = "relu",
        eps: float = 1e-5,
        bias: bool = True,
    ) -> None:
        super().__init__()
        check_dropout(dropout)
        self.self_attn = MultiHeadAttention(d_model=d_model, n_head=n_head, bias=bias)
        self.ff = make_feed_forward(d_model=d_model, d_ff=d_ff, activation=activation, bias=bias)
        self.self_attn_norm = LayerNorm(d_model=d_model, eps=eps, bias=bias)
        self.ff_norm = LayerNorm(d_model=d_model, eps=eps, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.norm_first = norm_first

    def forward(self, x: Tensor, *, mask: Tensor | None = None) -> Tensor:
        x = residual(x, lambda y: self.self_attn(y, mask=mask), self.self_attn_norm, self.dropout,
                     norm_first=self.norm_first)
        return residual(x, self.ff, self.ff_norm, self.dropout, norm_first=self.norm_first)


class DecoderLayer(nn.Module):
    """Causal self-attention (MHA, or GQA with n_kv_head; RoPE with rotary; a KVCache per call), optional
    cross-attention over a memory, and a feed-forward; LayerNorm or RMSNorm; bias=False removes every bias."""

    def __init__(
        self,
        *,
        d_model: int,
        n_head: int,
        d_ff: int,
        n_kv_head: int | None = None,
        cross_attention: bool = True,
        norm_first: bool = False,
        dropout: float = 0.0,
        activation: str = "relu",
        norm: str = "layer",
        eps: float = 1e-5,
        bias: bool = True,
        rotary: nn.Module | None = None,
    ) -> None:
        super().__init__()
        check_dropout(dropout)
        if n_kv_head is None:
            self.self_attn = MultiHeadAttention(d_model=d_model, n_head=n_head, rotary=rotary, bias=bias)
        else:
            self.self_attn = GroupedQueryAttention(d_model=d_model, n_head=n_head, n_kv_head=n_kv_head, rotary=rotary,
                                                   bias=bias)
        norms = dict(d_model=d_model, norm=norm, eps=eps, bias=bias)
        self.self_attn_norm = make_norm(**norms)
        self.cross_attn = CrossAttention(d_model=d_model, n_head=n_head, bias=bias) if cross_attention else None
        self.cross_attn_norm = make_norm(**norms) if cross_attention else None
        self.ff = make_feed_forward(d_model=d_model, d_ff=d_ff, activation=activation, bias=bias)
        self.ff_norm = make_norm(**norms)
        self.dropout = nn.Dropout(dropout)
        self.norm_first = norm_first

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        pre = self.norm_first
        x = residual(x, lambda y: self.self_attn(y, mask=mask, causal=True, cache=cache), self.self_attn_norm,
                     self.dropout, norm_first=pre)
        if self.cross_attn is not None:
            if memory is None:
                raise ValueError("this DecoderLayer has cross-attention: pass the encoder's memory")
            x = residual(x, lambda y: self.cross_attn(y, memory, mask=memory_mask), self.cross_attn_norm,
                         self.dropout, norm_first=pre)
        return residual(x, self.ff, self.ff_norm, self.dropout, norm_first=pre)
