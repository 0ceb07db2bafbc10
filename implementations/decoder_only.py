"""The decoder-only language model in PyTorch. Spec: spec/decoder_only.py."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from implementations.kv_cache import KVCache
from implementations.layers import DecoderLayer, make_norm
from implementations.positional_encoding import LearnedPositionalEmbedding
from implementations.rotary_embedding import RotaryEmbedding

__all__ = ["DecoderOnlyLM"]

POSITIONS = ("rope", "learned")
EPS = 1e-5


class DecoderOnlyLM(nn.Module):
    """Token embedding, n_layer pre-norm causal DecoderLayers, a final norm and an output head.

    Positions are RoPE (one RotaryEmbedding shared by every layer's self-attention) or a learned table.
    With a cache (one KVCache per layer), the chunk's first token sits at position cache[0].length.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        d_model: int,
        n_head: int,
        n_layer: int,
        d_ff: int,
        max_len: int,
        n_kv_head: int | None = None,
        positions: str = "rope",
        norm: str = "rms",
        activation: str = "swiglu",
        tie_weights: bool = False,
        bias: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if min(vocab_size, d_model, n_head, n_layer, d_ff, max_len) <= 0:
            raise ValueError(
                f"sizes must be positive: vocab_size={vocab_size}, d_model={d_model}, n_head={n_head}, "
                f"n_layer={n_layer}, d_ff={d_ff}, max_len={max_len}"
            )
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
        self.vocab_size, self.d_model, self.n_head, self.n_layer = vocab_size, d_model, n_head, n_layer
        self.n_kv_head = n_head if n_kv_head is None else n_kv_head
        self.head_dim = d_model // n_head
        self.max_len, self.positions, self.tie_weights = max_len, positions, tie_weights

        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = LearnedPositionalEmbedding(d_model=d_model, max_len=max_len) if positions == "learned" else None
        rotary = RotaryEmbedding(head_dim=self.head_dim) if positions == "rope" else None
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            DecoderLayer(d_model=d_model, n_head=n_head, d_ff=d_ff, n_kv_head=n_kv_head, cross_attention=False,
                         norm_first=True, dropout=dropout, activation=activation, norm=norm, eps=EPS, bias=bias,
                         rotary=rotary)
            for _ in range(n_layer)
        )
        self.final_norm = make_norm(d_model=d_model, norm=norm, eps=EPS, bias=bias)
        self.head = None if tie_weights else nn.Linear(d_model, vocab_size, bias=False)

    # -- pieces (small methods, so each step of the math has one place) ---------------------------------

    def start_position(self, cache: list[KVCache] | None) -> int:
        """Absolute position of the chunk's first token: how many positions the cache already holds."""
        return 0 if cache is None else cache[0].length

    def embed_tokens(self, tokens: Tensor, start: int) -> Tensor:
        x = self.embed(tokens)  # (b, s, d)
        if self.pos is not None:
            x = self.pos(x, offset=start)  # learned table rows start .. start + s - 1
        return self.drop(x)

    def output(self, x: Tensor) -> Tensor:
        """The head: (b, s, d) -> (b, s, n); tied, it multiplies by the embedding table itself."""
        weight = self.embed.weight if self.head is None else self.head.weight
        return x @ weight.T

    def logits(self, x: Tensor) -> Tensor:
        """The last layer's output (b, s, d) -> logits (b, s, n): final norm, then the head."""
        return self.output(self.final_norm(x))

    # -- the model --------------------------------------------------------------------------------------

    def forward(self, tokens: Tensor, *, mask: Tensor | None = None, cache: list[KVCache] | None = None) -> Tensor:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (b, s) token ids, got shape {tuple(tokens.shape)}")
        if cache is not None and len(cache) != self.n_layer:
            raise ValueError(f"cache must hold one KVCache per layer: {self.n_layer}, got {len(cache)}")
        b, s = tokens.shape
        start = self.start_position(cache)
        if start + s > self.max_len:
            raise ValueError(
                f"positions {start} .. {start + s - 1} are outside 0 .. {self.max_len - 1} (max_len={self.max_len})"
            )
        attn_mask = None
        if mask is not None:
            if tuple(mask.shape) != (b, start + s):
                raise ValueError(f"mask must be (b, cache length + s) = ({b}, {start + s}), got {tuple(mask.shape)}")
            attn_mask = mask.to(torch.bool)[:, None, None, :]  # key padding: (b, 1, 1, t)
        x = self.embed_tokens(tokens, start)
        for i, layer in enumerate(self.layers):
            x = layer(x, mask=attn_mask, cache=None if cache is None else cache[i])
        return self.logits(x)

    def new_cache(self, *, batch_size: int, capacity: int) -> list[KVCache]:
        """One empty KVCache per layer, (b, n_kv_head, capacity, head_dim), in the model's dtype and device."""
        weight = self.embed.weight
        return [
            KVCache(batch_size=batch_size, n_kv_head=self.n_kv_head, head_dim=self.head_dim, capacity=capacity,
                    dtype=weight.dtype, device=weight.device)
            for _ in range(self.n_layer)
        ]

    def pick(self, logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
        """Next tokens (b,) from last-position logits (b, n): argmax, or a draw from softmax(logits / T)."""
        if temperature == 0:
            return logits.argmax(dim=-1)
        compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
        probs = torch.softmax(logits.to(compute) / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        *,
        max_new_tokens: int,
        use_cache: bool = True,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        seq = prompt
        if max_new_tokens == 0:
            return seq
        if use_cache:
            cache = self.new_cache(batch_size=prompt.shape[0], capacity=prompt.shape[1] + max_new_tokens)
            logits = self(prompt, cache=cache)[:, -1]
            for step in range(max_new_tokens):
                nxt = self.pick(logits, temperature, generator)
                seq = torch.cat([seq, nxt[:, None].to(seq.dtype)], dim=1)
                if step + 1 < max_new_tokens:
                    logits = self(nxt[:, None].to(seq.dtype), cache=cache)[:, -1]  # one new token at its position
            return seq
        for _ in range(max_new_tokens):
            nxt = self.pick(self(seq)[:, -1], temperature, generator)  # the whole sequence every step
            seq = torch.cat([seq, nxt[:, None].to(seq.dtype)], dim=1)
        return seq
