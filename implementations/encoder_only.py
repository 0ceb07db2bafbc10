"""The encoder-only model (BERT-like) in PyTorch. Spec: spec/encoder_only.py."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from implementations.layers import EncoderLayer
from implementations.normalization import LayerNorm
from implementations.positional_encoding import LearnedPositionalEmbedding

__all__ = ["EncoderOnlyModel"]


def masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of x (b, s, d) over the positions where mask (b, s) is True -> (b, d); a row with none gives zeros."""
    if mask is None:
        return x.mean(dim=1)
    keep = mask[..., None]  # (b, s, 1)
    total = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=1)
    count = keep.sum(dim=1).clamp(min=1).to(x.dtype)  # (b, 1)
    return total / count


class EncoderOnlyModel(nn.Module):
    """tokens (b, s) -> (b, n_outputs): class logits (classification) or values (regression)."""

    def __init__(
        self,
        *,
        vocab_size: int,
        d_model: int,
        n_head: int,
        n_layer: int,
        d_ff: int,
        max_len: int,
        n_outputs: int,
        norm_first: bool = False,
        dropout: float = 0.0,
        activation: str = "relu",
        eps: float = 1e-5,
    ) -> None:
        # activation and eps are conventions of the spec (relu, 1e-5): a model may declare others; ours takes
        # them as keywords so that the suite can build it alike as a baseline.
        super().__init__()
        if min(vocab_size, n_layer, n_outputs) <= 0:
            raise ValueError(f"sizes must be positive: vocab_size={vocab_size}, n_layer={n_layer}, n_outputs={n_outputs}")
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = LearnedPositionalEmbedding(d_model=d_model, max_len=max_len)
        self.layers = nn.ModuleList(
            EncoderLayer(d_model=d_model, n_head=n_head, d_ff=d_ff, norm_first=norm_first, dropout=dropout,
                         activation=activation, eps=eps)
            for _ in range(n_layer)
        )
        # A pre-norm stack never normalises its residual stream, so it ends with a norm; post-norm already did.
        self.final_norm = LayerNorm(d_model=d_model, eps=eps) if norm_first else None
        self.head = nn.Linear(d_model, n_outputs)
        self.dropout = nn.Dropout(dropout)

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """(b, s) -> (b, s, d): token embedding plus the learned positions 0 .. s - 1."""
        return self.dropout(self.pos(self.embed(tokens)))

    def key_mask(self, mask: Tensor | None) -> Tensor | None:
        """(b, s) -> (b, 1, 1, s), the layers' key padding mask: no position attends to a padding key."""
        return None if mask is None else mask[:, None, None, :]

    def pool(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """(b, s, d) -> (b, d): the mean over real positions only."""
        return masked_mean(x, mask)

    def forward(self, tokens: Tensor, *, mask: Tensor | None = None) -> Tensor:
        if mask is not None and mask.shape != tokens.shape:
            raise ValueError(f"mask must be (b, s) = {tuple(tokens.shape)} like tokens, got {tuple(mask.shape)}")
        x = self.embed_tokens(tokens)
        key_mask = self.key_mask(mask)
        for layer in self.layers:
            x = layer(x, mask=key_mask)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.head(self.pool(x, mask))  # (b, c)
