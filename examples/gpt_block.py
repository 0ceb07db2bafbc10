"""A GPT-2-style decoder-only language model, written the way a learner writes one after nanoGPT, and
plugged into the suite:

    pytest -n 2 -q --impl examples/gpt_block.py

It is correct in its own configuration, which is narrower than the spec's option space:

* attention is causal only, with no mask argument (``forward(x)``), one fused ``c_attn`` Linear for q, k and
  v, and no KV cache;
* positions are a learned table, the norms are LayerNorm with eps 1e-5 built in (no ``eps`` argument), the
  MLP uses exact (erf) GELU, the blocks are pre-norm, the LM head is tied to the token embedding;
* the model takes no padding mask and ``generate`` draws from the global RNG (no ``generator=``).

Each class says so in ``spec_options`` (properties/options.py), so every property runs in the configuration
the class offers, and the ones that need something else (a padding mask, an untied head, RoPE, a cache,
cross-attention, post-norm, relu) are skipped with a sentence naming the missing option. The class names are
GPT's own; ``SPEC_COMPONENTS`` tells the suite which spec component each one stands for, and
``canonical_names`` / ``canonical_state_dict`` map their parameters to the spec's canonical names.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EPS = 1e-5  # GPT-2's LayerNorm eps, fixed


def gelu(x: Tensor) -> Tensor:
    """Exact GELU, x * Phi(x) (the erf form; GPT-2's original code shipped the tanh approximation)."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


gelu.spec_options = {"approximate": "none"}  # one form built in: called without approximate=


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (nanoGPT's ``bias`` switch) and eps fixed at 1e-5."""

    spec_options = {"eps": EPS}

    def __init__(self, *, d_model: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, EPS)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with q, k and v computed by one Linear of width 3d."""

    # Causal only, no mask argument, no RoPE, no KV cache; biases on or off (nanoGPT's bias switch).
    spec_options = {"causal": True, "mask": False, "rotary": False, "cache": False}

    def __init__(self, *, d_model: int, n_head: int, bias: bool = True) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} must be divisible by n_head={n_head}")
        self.n_head, self.d_model = n_head, d_model
        self.c_attn = nn.Linear(d_model, 3 * d_model, bias=bias)  # rows: q, then k, then v
        self.c_proj = nn.Linear(d_model, d_model, bias=bias)

    # The fused weight holds the spec's q, k and v as row blocks: hand out views of them, and load into them.
    def canonical_state_dict(self) -> dict[str, Tensor]:
        d = self.d_model
        state = {}
        for i, name in enumerate("qkv"):
            state[f"{name}.weight"] = self.c_attn.weight[i * d : (i + 1) * d]
            if self.c_attn.bias is not None:
                state[f"{name}.bias"] = self.c_attn.bias[i * d : (i + 1) * d]
        state["o.weight"] = self.c_proj.weight
        if self.c_proj.bias is not None:
            state["o.bias"] = self.c_proj.bias
        return state

    def load_canonical_state_dict(self, params: dict[str, Tensor]) -> None:
        for name, view in self.canonical_state_dict().items():
            view.copy_(params[name])

    def forward(self, x: Tensor) -> Tensor:
        b, s, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (t.view(b, s, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))  # (b, h, s, e)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))  # (b, h, s, s)
        future = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)  # key j > query i
        att = att.masked_fill(future, float("-inf")).softmax(dim=-1)  # the diagonal is always kept: no empty row
        y = (att @ v).transpose(1, 2).reshape(b, s, d)  # merge heads: (b, s, h*e)
        return self.c_proj(y)


class MLP(nn.Module):
    """c_proj(gelu(c_fc(x))): the feed-forward of GPT-2, GELU only."""

    spec_options = {"activation": "gelu"}
    canonical_names = {"up": "c_fc", "down": "c_proj"}  # prefixes: up.weight -> c_fc.weight, ...

    def __init__(self, *, d_model: int, d_ff: int, bias: bool = True) -> None:
        super().__init__()
        self.c_fc = nn.Linear(d_model, d_ff, bias=bias)
        self.c_proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(gelu(self.c_fc(x)))


class Block(nn.Module):
    """A pre-norm decoder block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); dropout on each sublayer's output."""

    spec_options = {
        "norm_first": True, "activation": "gelu", "norm": "layer", "eps": EPS, "cross_attention": False,
        "mask": False, "memory_mask": False, "n_kv_head": False, "rotary": False, "cache": False,
    }
    canonical_names = {"self_attn": "attn", "ff": "mlp", "self_attn_norm": "ln_1", "ff_norm": "ln_2"}

    def __init__(self, *, d_model: int, n_head: int, d_ff: int, bias: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.ln_1 = LayerNorm(d_model=d_model, bias=bias)
        self.attn = CausalSelfAttention(d_model=d_model, n_head=n_head, bias=bias)
        self.ln_2 = LayerNorm(d_model=d_model, bias=bias)
        self.mlp = MLP(d_model=d_model, d_ff=d_ff, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.drop(self.mlp(self.ln_2(x)))


class LearnedPositions(nn.Module):
    """x + wpe[0 .. s - 1]: a learned table of max_len rows, always from position 0 (no offset: no cache)."""

    spec_options = {"offset": False}

    def __init__(self, *, d_model: int, max_len: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(max_len, d_model))

    def forward(self, x: Tensor) -> Tensor:
        s, max_len = x.shape[-2], self.weight.shape[0]
        if s > max_len:
            raise ValueError(f"sequence of {s} positions is longer than max_len={max_len}")
        return x + self.weight[:s].to(x.dtype)


class GPT(nn.Module):
    """Token embedding + learned positions, pre-norm blocks, a final LayerNorm, and the tied head."""

    spec_options = {
        "positions": "learned", "norm": "layer", "activation": "gelu", "tie_weights": True, "n_kv_head": False,
        "mask": False, "cache": False, "generator": False,
    }
    # Whole names where a property reads the parameter by its own name (the tied embedding), prefixes elsewhere.
    canonical_names = {"embed.weight": "wte.weight", "pos": "wpe", "layers": "h", "final_norm": "ln_f"}

    def __init__(self, *, vocab_size: int, d_model: int, n_head: int, n_layer: int, d_ff: int, max_len: int,
                 bias: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        if min(vocab_size, d_model, n_head, n_layer, d_ff, max_len) <= 0:
            raise ValueError(f"sizes must be positive: vocab_size={vocab_size}, d_model={d_model}, n_head={n_head}, "
                             f"n_layer={n_layer}, d_ff={d_ff}, max_len={max_len}")
        self.max_len = max_len
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = LearnedPositions(d_model=d_model, max_len=max_len)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(Block(d_model=d_model, n_head=n_head, d_ff=d_ff, bias=bias, dropout=dropout)
                               for _ in range(n_layer))
        self.ln_f = LayerNorm(d_model=d_model, bias=bias)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying: one Parameter, two uses

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (b, s) token ids, got shape {tuple(tokens.shape)}")
        x = self.drop(self.wpe(self.wte(tokens)))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (b, s, vocab_size)

    @torch.no_grad()
    def generate(self, prompt: Tensor, *, max_new_tokens: int, temperature: float = 0.0) -> Tensor:
        """Append max_new_tokens tokens: the argmax at temperature 0, else a draw from softmax(logits / T)."""
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        seq = prompt
        for _ in range(max_new_tokens):
            logits = self(seq)[:, -1]  # no cache: the whole sequence every step
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                nxt = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1)
            seq = torch.cat([seq, nxt.to(seq.dtype)], dim=1)
        return seq


def next_token_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Cross-entropy of logits[:, t] against tokens[:, t + 1] (no padding mask: every target is real)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


next_token_loss.spec_options = {"mask": False}


# GPT's names -> the spec's components (SelfAttention, the one-head module, is not provided).
SPEC_COMPONENTS = {
    "MultiHeadAttention": CausalSelfAttention,
    "FeedForward": MLP,
    "DecoderLayer": Block,
    "DecoderOnlyLM": GPT,
    "LearnedPositionalEmbedding": LearnedPositions,
}
