"""The original encoder-decoder transformer (Vaswani et al. 2017), written the way a learner writes it after
reading the paper and a line-by-line tutorial, and plugged into the suite:

    pytest -n 2 -q --impl examples/post_norm_seq2seq.py

It is correct in its own configuration, which is narrower than the spec's option space:

* post-norm layers only, LayerNorm(x + dropout(sublayer(x))), with eps 1e-6 built into every layer;
* a ReLU feed-forward with biases; attention projections with biases;
* masks are read as "0 = blocked" and blocked scores are filled with -1e9, not -inf, so a query whose keys
  are all masked gets a uniform average of the values instead of the spec's zeros (``empty_rows=False``);
* embeddings are multiplied by sqrt(d_model) and the sinusoidal table is added from position 0 (no offset);
* no KV cache: ``generate`` decodes the whole target prefix at every step.

Each class declares this in ``spec_options`` (properties/options.py); the properties that need something
else (pre-norm, GELU, a fully masked row, a cache) are skipped with a sentence naming the option.
``canonical_names`` maps the tutorial's parameter names (``linears.0`` for the query projection, ``a_2`` and
``b_2`` for the LayerNorm gain and bias, ``sublayer.1.norm`` for the norm around the cross-attention, ...)
to the spec's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LAYER_EPS = 1e-6  # the eps every layer builds its LayerNorms with
BLOCKED = -1e9  # the score given to a masked key


def attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(e)) v, with mask == 0 marking keys a query may not see."""
    scores = query @ key.transpose(-2, -1) / math.sqrt(query.size(-1))
    if mask is not None:
        # -1e9 is below float16's range: there, the most negative float16 number does the same job.
        scores = scores.masked_fill(mask == 0, max(BLOCKED, torch.finfo(scores.dtype).min))
    return scores.softmax(dim=-1) @ value


class LayerNorm(nn.Module):
    """a_2 * (x - mean) / sqrt(var + eps) + b_2, biased variance (the tutorial's divides by the std + eps,
    which is another function; this one is nn.LayerNorm's)."""

    spec_options = {"bias": True}
    canonical_names = {"weight": "a_2", "bias": "b_2"}

    def __init__(self, *, d_model: int, eps: float = LAYER_EPS) -> None:
        super().__init__()
        self.a_2 = nn.Parameter(torch.ones(d_model))
        self.b_2 = nn.Parameter(torch.zeros(d_model))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # half precision: statistics in float32
        mean = h.mean(-1, keepdim=True)
        var = h.var(-1, keepdim=True, unbiased=False)
        out = self.a_2.to(h.dtype) * (h - mean) / torch.sqrt(var + self.eps) + self.b_2.to(h.dtype)
        return out.to(x.dtype)


class MultiHeadedAttention(nn.Module):
    """h heads of scaled dot-product attention; linears 0, 1, 2, 3 project queries, keys, values, output."""

    spec_options = {"bias": True, "empty_rows": False, "rotary": False, "cache": False}
    canonical_names = {"q": "linears.0", "k": "linears.1", "v": "linears.2", "o": "linears.3"}

    def __init__(self, *, d_model: int, n_head: int) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} must be divisible by n_head={n_head}")
        self.d_k, self.h = d_model // n_head, n_head
        self.linears = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(4))

    def attend(self, x: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        b = x.size(0)
        q, k, v = (lin(t).view(b, -1, self.h, self.d_k).transpose(1, 2)  # (b, h, s|t, e)
                   for lin, t in zip(self.linears, (x, context, context)))
        out = attention(q, k, v, mask)
        return self.linears[3](out.transpose(1, 2).reshape(b, -1, self.h * self.d_k))

    def forward(self, x: Tensor, *, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        if causal:
            s = x.size(1)
            subsequent = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()  # key j <= query i
            mask = subsequent if mask is None else subsequent & mask
        return self.attend(x, x, mask)


class CrossAttention(MultiHeadedAttention):
    """Queries from the decoder, keys and values from the encoder's memory."""

    spec_options = {"bias": True, "empty_rows": False}

    def forward(self, x: Tensor, context: Tensor, *, mask: Tensor | None = None) -> Tensor:
        return self.attend(x, context, mask)


class PositionwiseFeedForward(nn.Module):
    """w_2(relu(w_1 x))."""

    spec_options = {"activation": "relu", "bias": True}
    canonical_names = {"up": "w_1", "down": "w_2"}

    def __init__(self, *, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_ff)
        self.w_2 = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(F.relu(self.w_1(x)))


class SublayerConnection(nn.Module):
    """Post-norm residual: norm(x + dropout(sublayer(x)))."""

    def __init__(self, d_model: int, dropout: float) -> None:
        super().__init__()
        self.norm = LayerNorm(d_model=d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, sublayer) -> Tensor:
        return self.norm(x + self.dropout(sublayer(x)))


def check_dropout(dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


# What the layers have built in (the model states the same conventions: relu, eps 1e-6).
LAYER_OPTIONS = {"norm_first": False, "activation": "relu", "eps": LAYER_EPS, "bias": True}


class EncoderLayer(nn.Module):
    """Self-attention, then feed-forward, each wrapped in a post-norm SublayerConnection."""

    spec_options = dict(LAYER_OPTIONS)
    canonical_names = {"ff": "feed_forward", "self_attn_norm": "sublayer.0.norm", "ff_norm": "sublayer.1.norm"}

    def __init__(self, *, d_model: int, n_head: int, d_ff: int, dropout: float = 0.1) -> None:
        super().__init__()
        check_dropout(dropout)
        self.self_attn = MultiHeadedAttention(d_model=d_model, n_head=n_head)
        self.feed_forward = PositionwiseFeedForward(d_model=d_model, d_ff=d_ff)
        self.sublayer = nn.ModuleList(SublayerConnection(d_model, dropout) for _ in range(2))

    def forward(self, x: Tensor, *, mask: Tensor | None = None) -> Tensor:
        x = self.sublayer[0](x, lambda y: self.self_attn(y, mask=mask))
        return self.sublayer[1](x, self.feed_forward)


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to the memory (src_attn), feed-forward; post-norm."""

    spec_options = {**LAYER_OPTIONS, "norm": "layer", "cross_attention": True, "n_kv_head": False,
                    "rotary": False, "cache": False}
    canonical_names = {"cross_attn": "src_attn", "ff": "feed_forward", "self_attn_norm": "sublayer.0.norm",
                       "cross_attn_norm": "sublayer.1.norm", "ff_norm": "sublayer.2.norm"}

    def __init__(self, *, d_model: int, n_head: int, d_ff: int, dropout: float = 0.1) -> None:
        super().__init__()
        check_dropout(dropout)
        self.self_attn = MultiHeadedAttention(d_model=d_model, n_head=n_head)
        self.src_attn = CrossAttention(d_model=d_model, n_head=n_head)
        self.feed_forward = PositionwiseFeedForward(d_model=d_model, d_ff=d_ff)
        self.sublayer = nn.ModuleList(SublayerConnection(d_model, dropout) for _ in range(3))

    def forward(self, x: Tensor, memory: Tensor, *, mask: Tensor | None = None,
                memory_mask: Tensor | None = None) -> Tensor:
        x = self.sublayer[0](x, lambda y: self.self_attn(y, mask=mask, causal=True))
        x = self.sublayer[1](x, lambda y: self.src_attn(y, memory, mask=memory_mask))
        return self.sublayer[2](x, self.feed_forward)


class PositionalEncoding(nn.Module):
    """x + PE[0 .. s - 1], PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i + 1] = cos(...), from position 0."""

    spec_options = {"offset": False}

    def __init__(self, *, d_model: int, max_len: int) -> None:
        super().__init__()
        if d_model % 2:
            raise ValueError(f"d_model={d_model} must be even: sin and cos fill the columns in pairs")
        # Built in float64: a float32 table cast up later would keep only float32's digits.
        position = torch.arange(max_len, dtype=torch.float64)[:, None]
        div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * -(math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model, dtype=torch.float64)
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        s, max_len = x.size(-2), self.pe.size(0)
        if s > max_len:
            raise ValueError(f"{s} positions do not fit the table of max_len={max_len} (positions 0 .. {max_len - 1})")
        return x + self.pe[:s].to(x.dtype)


class Embeddings(nn.Module):
    """lut[tokens] * sqrt(d_model)."""

    def __init__(self, d_model: int, vocab: int) -> None:
        super().__init__()
        self.lut = nn.Embedding(vocab, d_model)
        self.d_model = d_model

    def forward(self, tokens: Tensor) -> Tensor:
        return self.lut(tokens) * math.sqrt(self.d_model)


def key_mask(keep: Tensor | None) -> Tensor | None:
    """(b, t) True = real token -> (b, 1, 1, t): the same keys hidden from every head and query."""
    return None if keep is None else keep[:, None, None, :]


class EncoderDecoder(nn.Module):
    """Encoder and decoder stacks of post-norm layers, embeddings scaled by sqrt(d) plus sinusoidal positions,
    and an output projection without bias."""

    spec_options = {"norm_first": False, "cache": False, "activation": "relu", "eps": LAYER_EPS}
    canonical_names = {"src_embed.weight": "src_embed.lut.weight", "tgt_embed.weight": "tgt_embed.lut.weight",
                       "encoder": "encoder_layers", "decoder": "decoder_layers", "head": "generator"}

    def __init__(self, *, src_vocab_size: int, tgt_vocab_size: int, d_model: int, n_head: int, n_layer: int,
                 d_ff: int, max_len: int, dropout: float = 0.1) -> None:
        super().__init__()
        check_dropout(dropout)
        self.max_len = max_len
        self.src_embed = Embeddings(d_model, src_vocab_size)
        self.tgt_embed = Embeddings(d_model, tgt_vocab_size)
        self.position = PositionalEncoding(d_model=d_model, max_len=max_len)
        self.dropout = nn.Dropout(dropout)
        self.encoder_layers = nn.ModuleList(EncoderLayer(d_model=d_model, n_head=n_head, d_ff=d_ff, dropout=dropout)
                                            for _ in range(n_layer))
        self.decoder_layers = nn.ModuleList(DecoderLayer(d_model=d_model, n_head=n_head, d_ff=d_ff, dropout=dropout)
                                            for _ in range(n_layer))
        self.generator = nn.Linear(d_model, tgt_vocab_size, bias=False)

    def encode(self, src: Tensor, *, src_mask: Tensor | None = None) -> Tensor:
        x = self.dropout(self.position(self.src_embed(src)))
        for layer in self.encoder_layers:
            x = layer(x, mask=key_mask(src_mask))
        return x

    def decode(self, tgt: Tensor, memory: Tensor, *, src_mask: Tensor | None = None,
               tgt_mask: Tensor | None = None) -> Tensor:
        y = self.dropout(self.position(self.tgt_embed(tgt)))
        for layer in self.decoder_layers:
            y = layer(y, memory, mask=key_mask(tgt_mask), memory_mask=key_mask(src_mask))
        return self.generator(y)

    def forward(self, src: Tensor, tgt: Tensor, *, src_mask: Tensor | None = None,
                tgt_mask: Tensor | None = None) -> Tensor:
        return self.decode(tgt, self.encode(src, src_mask=src_mask), src_mask=src_mask, tgt_mask=tgt_mask)

    @torch.no_grad()
    def generate(self, src: Tensor, *, bos_id: int, max_new_tokens: int, src_mask: Tensor | None = None) -> Tensor:
        """Greedy decoding: bos_id, then max_new_tokens argmax tokens, re-decoding the prefix every step."""
        if 1 + max_new_tokens > self.max_len:
            raise ValueError(f"1 + max_new_tokens = {1 + max_new_tokens} exceeds max_len={self.max_len}")
        memory = self.encode(src, src_mask=src_mask)
        ys = torch.full((src.size(0), 1), bos_id, dtype=torch.long, device=src.device)
        for _ in range(max_new_tokens):
            logits = self.decode(ys, memory, src_mask=src_mask)[:, -1]
            ys = torch.cat([ys, logits.argmax(dim=-1, keepdim=True)], dim=1)
        return ys


# The tutorial's names -> the spec's components.
SPEC_COMPONENTS = {
    "MultiHeadAttention": MultiHeadedAttention,
    "FeedForward": PositionwiseFeedForward,
    "SinusoidalPositionalEncoding": PositionalEncoding,
    "EncoderDecoderModel": EncoderDecoder,
}
