"""A LLaMA-style decoder-only language model, written in the manner of Meta's reference code and HF's
modelling file, and plugged into the suite:

    pytest -n 2 -q --impl examples/llama_block.py

It is correct in its own configuration, which is narrower than the spec's option space:

* no biases anywhere (attention, SwiGLU, RMSNorm has none by definition);
* grouped-query attention whose query head i reads KV head i // (n_head / n_kv_head): the KV heads are
  expanded with ``repeat_interleave`` (contiguous groups, the spec's convention);
* RoPE with one pairing built in, the half split of HF's ``rotate_half`` (dimension i pairs with i + e/2),
  positions given as ``positions=`` (HF's ``position_ids``, shared or one row per sequence), no offset;
  its cos/sin are computed in float32 whatever the input dtype;
* RMSNorm computes in float32 and casts back (LLaMA's ``x.float()``), eps 1e-6 in the model;
* SwiGLU feed-forward, pre-norm layers, an untied output head, no dropout, and no KV cache.

Because the rotation angles and the norms are computed in float32, a float64 run is accurate to float32's
rounding, not float64's: the components that compute so declare ``"compute_dtype": "float32"``, and the
suite judges their float64 results by the float32 rule (properties/assertions.py) and says so in reports.
Everything the model lacks (a cache, tied weights, learned positions, LayerNorm, biases) is declared in
``spec_options``, so those properties are skipped with a sentence naming the option.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORM_EPS = 1e-6  # LLaMA's rms_norm_eps


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 and cast back once."""

    spec_options = {"compute_dtype": "float32"}

    def __init__(self, *, d_model: int, eps: float = NORM_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * self.weight.float()).to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last axis: pair i is (i, i + e/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """RoPE with the half-split pairing; token j sits at positions[j] (or j), angles in float32."""

    spec_options = {"pairing": "half", "offset": False, "positions": True, "per_sequence_positions": True,
                    "compute_dtype": "float32"}

    def __init__(self, *, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim} must be even: RoPE rotates pairs of dimensions")
        self.head_dim, self.base = head_dim, base

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin of positions * theta, (..., s, e), computed in float32 then cast to ``dtype``.
        inv_freq is recomputed here rather than kept as a buffer: module.to(float16) would round a buffer."""
        e = self.head_dim
        inv_freq = 1.0 / self.base ** (torch.arange(0, e, 2, dtype=torch.float32, device=positions.device) / e)
        freqs = positions.float()[..., None] * inv_freq  # (..., s, e/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # the same angle for i and i + e/2
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, x: Tensor, *, positions: Tensor | None = None) -> Tensor:
        """x (b, h, s, e); positions (s,) shared or (b, s) one row per sequence; None: 0 .. s - 1."""
        if positions is None:
            positions = torch.arange(x.shape[-2], device=x.device)
        cos, sin = self.cos_sin(positions.to(x.device), x.dtype)
        if cos.dim() == 3:  # (b, s, e): one row per sequence, the same for every head
            cos, sin = cos[:, None], sin[:, None]
        return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Grouped-query self-attention without biases: n_head query heads share n_kv_head key/value heads in
    contiguous groups, optional RoPE on queries and keys, an optional mask (True = may attend) and causal."""

    spec_options = {"bias": False, "cache": False}
    canonical_names = {"q": "wq", "k": "wk", "v": "wv", "o": "wo"}

    def __init__(self, *, d_model: int, n_head: int, n_kv_head: int | None = None,
                 rotary: RotaryEmbedding | None = None) -> None:
        super().__init__()
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        if d_model % n_head or n_head % n_kv_head:
            raise ValueError(f"need n_kv_head | n_head | d_model, got n_kv_head={n_kv_head}, n_head={n_head}, "
                             f"d_model={d_model}")
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, d_model // n_head
        self.wq = nn.Linear(d_model, n_head * self.head_dim, bias=False)
        self.wk = nn.Linear(d_model, n_kv_head * self.head_dim, bias=False)
        self.wv = nn.Linear(d_model, n_kv_head * self.head_dim, bias=False)
        self.wo = nn.Linear(n_head * self.head_dim, d_model, bias=False)
        self.rotary = rotary

    def forward(self, x: Tensor, *, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.n_head, self.head_dim).transpose(1, 2)  # (b, h, s, e)
        k = self.wk(x).view(b, s, self.n_kv_head, self.head_dim).transpose(1, 2)  # (b, g, s, e)
        v = self.wv(x).view(b, s, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        # Contiguous groups: KV head j serves query heads j*r .. j*r + r - 1 (HF's repeat_kv).
        r = self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)  # (b, h, s, e)
        allowed = None
        if causal:
            allowed = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        if mask is not None:
            allowed = mask if allowed is None else allowed & mask
        # A query with no allowed key gets zeros from SDPA (torch >= 2.5), the spec's convention.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class MultiHeadAttention(Attention):
    def __init__(self, *, d_model: int, n_head: int, rotary: RotaryEmbedding | None = None) -> None:
        super().__init__(d_model=d_model, n_head=n_head, n_kv_head=n_head, rotary=rotary)


class MultiQueryAttention(Attention):
    def __init__(self, *, d_model: int, n_head: int, rotary: RotaryEmbedding | None = None) -> None:
        super().__init__(d_model=d_model, n_head=n_head, n_kv_head=1, rotary=rotary)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), Meta's names (w1 gate, w3 up, w2 down), no biases."""

    canonical_names = {"gate": "w1", "up": "w3", "down": "w2"}

    def __init__(self, *, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm: h = x + attention(attention_norm(x)); out = h + feed_forward(ffn_norm(h)); always causal."""

    spec_options = {
        "norm_first": True, "activation": "swiglu", "norm": "rms", "bias": False, "dropout": 0.0,
        "cross_attention": False, "memory_mask": False, "cache": False, "compute_dtype": "float32",
    }
    canonical_names = {"self_attn": "attention", "ff": "feed_forward", "self_attn_norm": "attention_norm",
                       "ff_norm": "ffn_norm"}

    def __init__(self, *, d_model: int, n_head: int, d_ff: int, n_kv_head: int | None = None, eps: float = NORM_EPS,
                 rotary: RotaryEmbedding | None = None) -> None:
        super().__init__()
        self.attention = Attention(d_model=d_model, n_head=n_head, n_kv_head=n_kv_head, rotary=rotary)
        self.feed_forward = FeedForward(d_model=d_model, d_ff=d_ff)
        self.attention_norm = RMSNorm(d_model=d_model, eps=eps)
        self.ffn_norm = RMSNorm(d_model=d_model, eps=eps)

    def forward(self, x: Tensor, *, mask: Tensor | None = None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), mask=mask, causal=True)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """tok_embeddings -> n_layer TransformerBlocks sharing one RotaryEmbedding -> norm -> output."""

    spec_options = {
        "positions": "rope", "norm": "rms", "activation": "swiglu", "tie_weights": False, "bias": False,
        "dropout": 0.0, "cache": False, "eps": NORM_EPS, "pairing": "half", "compute_dtype": "float32",
    }
    canonical_names = {"embed": "tok_embeddings", "final_norm": "norm", "head": "output"}

    def __init__(self, *, vocab_size: int, d_model: int, n_head: int, n_layer: int, d_ff: int, max_len: int,
                 n_kv_head: int | None = None) -> None:
        super().__init__()
        if min(vocab_size, d_model, n_head, n_layer, d_ff, max_len) <= 0:
            raise ValueError(f"sizes must be positive: vocab_size={vocab_size}, d_model={d_model}, n_head={n_head}, "
                             f"n_layer={n_layer}, d_ff={d_ff}, max_len={max_len}")
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} must be divisible by n_head={n_head}")
        self.max_len = max_len
        self.tok_embeddings = nn.Embedding(vocab_size, d_model)
        rotary = RotaryEmbedding(head_dim=d_model // n_head)
        self.layers = nn.ModuleList(
            TransformerBlock(d_model=d_model, n_head=n_head, d_ff=d_ff, n_kv_head=n_kv_head, rotary=rotary)
            for _ in range(n_layer)
        )
        self.norm = RMSNorm(d_model=d_model)
        self.output = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, tokens: Tensor, *, mask: Tensor | None = None) -> Tensor:
        """tokens (b, s) -> logits (b, s, vocab); mask (b, s) bool, True = real token (right padding)."""
        b, s = tokens.shape
        if s > self.max_len:
            raise ValueError(f"{s} positions do not fit max_len={self.max_len}")
        key_mask = None if mask is None else mask.bool()[:, None, None, :]  # (b, 1, 1, s): masks keys
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, mask=key_mask)
        return self.output(self.norm(h))

    @torch.no_grad()
    def generate(self, prompt: Tensor, *, max_new_tokens: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None) -> Tensor:
        """Greedy at temperature 0, else sampled from softmax(logits / T) with ``generator``; no cache, so
        every step runs the whole sequence."""
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        seq = prompt
        for _ in range(max_new_tokens):
            logits = self(seq)[:, -1]
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            seq = torch.cat([seq, nxt.to(seq.dtype)], dim=1)
        return seq


def next_token_loss(logits: Tensor, tokens: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Mean cross-entropy of logits[:, t] against tokens[:, t + 1] over real targets (mask[:, t + 1])."""
    per_target = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")  # (b, s - 1)
    if mask is None:
        return per_target.mean()
    real = mask[:, 1:]
    return per_target[real].mean()


# LLaMA's names -> the spec's components.
SPEC_COMPONENTS = {
    "GroupedQueryAttention": Attention,
    "SwiGLU": FeedForward,
    "FeedForward": None,  # the name above is LLaMA's SwiGLU, not the spec's relu/gelu FeedForward
    "DecoderLayer": TransformerBlock,
    "DecoderOnlyLM": Transformer,
}
