"""The encoder-decoder model (the original transformer) in PyTorch. Spec: spec/encoder_decoder.py."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from implementations.kv_cache import KVCache
from implementations.layers import DecoderLayer, EncoderLayer
from implementations.normalization import LayerNorm
from implementations.positional_encoding import SinusoidalPositionalEncoding

__all__ = ["EncoderDecoderModel"]


def key_mask(mask: Tensor | None) -> Tensor | None:
    """(b, k) True = real -> (b, 1, 1, k), the attention modules' key padding mask."""
    return None if mask is None else mask[:, None, None, :]


class EncoderDecoderModel(nn.Module):
    """encode(src) -> memory; decode(tgt, memory) -> logits (teacher forcing, or chunk by chunk with a cache)."""

    def __init__(
        self,
        *,
        src_vocab_size: int,
        tgt_vocab_size: int,
        d_model: int,
        n_head: int,
        n_layer: int,
        d_ff: int,
        max_len: int,
        norm_first: bool = False,
        dropout: float = 0.0,
        activation: str = "relu",
        eps: float = 1e-5,
    ) -> None:
        # activation and eps are conventions of the spec (relu, 1e-5): a model may declare others; ours takes
        # them as keywords so that the suite can build it alike as a baseline.
        super().__init__()
        if min(src_vocab_size, tgt_vocab_size, n_layer) <= 0:
            raise ValueError(f"sizes must be positive: src_vocab_size={src_vocab_size}, "
                             f"tgt_vocab_size={tgt_vocab_size}, n_layer={n_layer}")
        self.d_model, self.n_head, self.max_len = d_model, n_head, max_len
        self.src_embed = nn.Embedding(src_vocab_size, d_model)
        self.tgt_embed = nn.Embedding(tgt_vocab_size, d_model)
        self.positions = SinusoidalPositionalEncoding(d_model=d_model, max_len=max_len)
        layer = dict(d_model=d_model, n_head=n_head, d_ff=d_ff, norm_first=norm_first, dropout=dropout,
                     activation=activation, eps=eps)
        self.encoder = nn.ModuleList(EncoderLayer(**layer) for _ in range(n_layer))
        self.decoder = nn.ModuleList(DecoderLayer(cross_attention=True, **layer) for _ in range(n_layer))
        self.encoder_norm = LayerNorm(d_model=d_model, eps=eps) if norm_first else None
        self.decoder_norm = LayerNorm(d_model=d_model, eps=eps) if norm_first else None
        self.head = nn.Linear(d_model, tgt_vocab_size, bias=False)
        self.dropout = nn.Dropout(dropout)

    def embed(self, table: nn.Embedding, tokens: Tensor, *, offset: int = 0) -> Tensor:
        """table[tokens] * sqrt(d) + PE[offset .. offset + s - 1] (the paper scales embeddings, section 3.4)."""
        return self.dropout(self.positions(table(tokens) * math.sqrt(self.d_model), offset=offset))

    def encode(self, src: Tensor, *, src_mask: Tensor | None = None) -> Tensor:
        x = self.embed(self.src_embed, src)
        for layer in self.encoder:
            x = layer(x, mask=key_mask(src_mask))  # bidirectional: padding keys only are hidden
        return x if self.encoder_norm is None else self.encoder_norm(x)

    def decode(
        self,
        tgt: Tensor,
        memory: Tensor,
        *,
        src_mask: Tensor | None = None,
        tgt_mask: Tensor | None = None,
        cache: list[KVCache] | None = None,
    ) -> Tensor:
        if cache is not None and len(cache) != len(self.decoder):
            raise ValueError(f"cache must hold one KVCache per decoder layer ({len(self.decoder)}), got {len(cache)}")
        start = 0 if cache is None else cache[0].length  # absolute position of tgt's first token
        y = self.embed(self.tgt_embed, tgt, offset=start)
        for i, layer in enumerate(self.decoder):
            y = layer(y, memory, mask=key_mask(tgt_mask), memory_mask=key_mask(src_mask),
                      cache=None if cache is None else cache[i])  # self-attention is causal inside the layer
        if self.decoder_norm is not None:
            y = self.decoder_norm(y)
        return self.head(y)  # (b, s, n)

    def forward(self, src: Tensor, tgt: Tensor, *, src_mask: Tensor | None = None,
                tgt_mask: Tensor | None = None) -> Tensor:
        return self.decode(tgt, self.encode(src, src_mask=src_mask), src_mask=src_mask, tgt_mask=tgt_mask)

    def new_cache(self, *, batch_size: int, capacity: int) -> list[KVCache]:
        """One empty KVCache per decoder layer, in the dtype and on the device of the parameters."""
        weight = self.head.weight
        return [
            KVCache(batch_size=batch_size, n_kv_head=self.n_head, head_dim=self.d_model // self.n_head,
                    capacity=capacity, dtype=weight.dtype, device=weight.device)
            for _ in self.decoder
        ]

    @torch.no_grad()
    def generate(self, src: Tensor, *, bos_id: int, max_new_tokens: int, src_mask: Tensor | None = None,
                 use_cache: bool = True) -> Tensor:
        """Greedy decoding: (b, 1 + max_new_tokens), bos_id first."""
        memory = self.encode(src, src_mask=src_mask)
        out = torch.full((src.shape[0], 1), bos_id, dtype=torch.long, device=src.device)
        cache = self.new_cache(batch_size=src.shape[0], capacity=max(1, max_new_tokens)) if use_cache else None
        for _ in range(max_new_tokens):
            step = out[:, -1:] if cache is not None else out  # with a cache, only the newest token is new
            logits = self.decode(step, memory, src_mask=src_mask, cache=cache)
            out = torch.cat([out, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
        return out
