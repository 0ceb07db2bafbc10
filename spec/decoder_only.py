"""The decoder-only language model (GPT-2 / LLaMA shaped): embed tokens, pre-norm causal layers, logits.

Signature (constructor is keyword-only)
---------------------------------------
    DecoderOnlyLM(*, vocab_size, d_model, n_head, n_layer, d_ff, max_len, n_kv_head=None,
                  positions="rope", norm="rms", activation="swiglu", tie_weights=False, bias=True, dropout=0.0)
        .forward(tokens, *, mask=None, cache=None) -> logits
        .new_cache(*, batch_size, capacity) -> list[KVCache]
        .generate(prompt, *, max_new_tokens, use_cache=True, temperature=0.0, generator=None) -> tokens

Shapes
------
    tokens   (b, s) long, ids in 0 .. n - 1
    mask     (b, t) bool key padding, True = real token; t = s without a cache, and
             t = cache[0].length + s with one (it covers every key seen so far)
    cache    a list of n_layer KVCache (spec/kv_cache.py), one per layer, each (b, g, capacity, e)
    logits   (b, s, n), the model's dtype and device
    prompt   (b, s0) long  ->  generate returns (b, s0 + max_new_tokens) long, the prompt first

Math (chunk tokens[:, 0 : s] at positions p0 .. p0 + s - 1; p0 = cache[0].length, or 0 without a cache)
--------------------------------------------------------------------------------------------------------
    x = E[tokens]                                            E = embed.weight (n, d)
    positions "learned":  x = x + P[p0 : p0 + s]             P = pos.weight (max_len, d)
    positions "rope":     one RotaryEmbedding(head_dim=e) (base 10000, pairing "adjacent") rotates every
                          layer's queries and keys at their absolute positions (nothing added to x)
    for i in 0 .. n_layer - 1:
        x = DecoderLayer_i(x, mask=mask[:, None, None, :], cache=cache[i])
            (spec/layers.py: cross_attention=False, norm_first=True, causal self-attention,
             n_kv_head, norm, activation, bias, eps 1e-5)
    logits = N_final(x) H^T            H = head.weight (n, d), or E itself when tie_weights
Generation (greedy, temperature 0): repeat max_new_tokens times
    next = argmax_n logits(sequence so far)[:, -1];   sequence = [sequence, next]
With temperature T > 0 the next token is drawn from softmax(logits[:, -1] / T) with ``generator``.
With use_cache=True the prompt is run once into new_cache(capacity=s0 + max_new_tokens) and each new
token is fed alone; without it, every step runs the whole sequence. The two agree (the cache is exact).

Options (declarable; properties/options.py: an implementation lists what it offers in ``spec_options``)
-------------------------------------------------------------------------------------------------------
    positions    "rope" | "learned"                                         constructor
    norm         "rms" | "layer" (every norm, the final one included)       constructor
    activation   "swiglu" | "gelu" | "relu"                                 constructor
    tie_weights  False | True                                               constructor
    bias         True | False (no bias in any projection or LayerNorm)      constructor
    dropout      0.0, any probability in [0, 1) declarable                  constructor
    n_kv_head    True | False: the constructor takes ``n_kv_head`` (grouped-query attention)
    mask         True | False: forward takes a key padding ``mask``
    cache        True | False: ``new_cache`` exists, forward takes ``cache`` and generate ``use_cache``
    generator    True | False: generate takes ``generator`` (seeded sampling)
    eps          1e-5: a convention, never passed; a model with another eps built in declares it
                 (LLaMA: 1e-6) and is judged against it
    pairing      "adjacent": a convention, never passed; a model rotating half-split pairs declares
                 "half" (GPT-NeoX, HF Llama) and is judged against it
The first value is the spec's default. A GPT-2-style model declares ``{"positions": "learned", "norm":
"layer", "activation": "gelu", "tie_weights": True, "bias": True, "n_kv_head": False, "cache": False,
"generator": False}``: agreement, causality, padding and learnability run in that configuration, and the
cache properties are skipped with "needs cache=True; ... offers cache=False only".

Conventions (pinned, with the reason)
-------------------------------------
* Pre-norm everywhere plus a final norm before the head (GPT-2, LLaMA): the residual stream is never
  normalised inside the layers, so without the final norm the head reads an unnormalised stream.
* Causal: logits at position p depend on tokens 0 .. p only (bottom-right alignment, spec/sdpa.py).
* With a cache, the chunk's first token sits at position cache[0].length, for learned positions (the
  table rows p0 .. p0 + s - 1) and for RoPE (each attention rotates at its own cache's length).
* Positions past max_len - 1 raise ValueError, for both kinds (max_len is the model's context length).
* tie_weights: the head IS the embedding (one parameter; its gradient sums both uses), not a copy;
  there is then no head.weight.
* Dropout (train mode only) applies to the embedded input and inside each layer (spec/layers.py).
* generate runs without autograd, keeps the module's mode, and rejects a negative temperature.
  Seeded sampling depends on ``generator`` alone (never on the global RNG), so it is reproducible.
* Right padding: with a key padding mask, real positions give the logits their sequence gives alone.

Canonical parameters
--------------------
    embed.weight (n, d) init "embedding"            pos.weight (max_len, d) "embedding"   (learned only)
    layers.{i}.*   spec.layers.decoder_layer_parameters(cross_attention=False, n_kv_head, norm, activation)
    final_norm.weight (d,) "gain"   [final_norm.bias (d,) "bias" with norm="layer" and bias]
    head.weight (n, d) "weight"                      (absent when tie_weights; never a bias)

Properties (properties/test_decoder_only.py)
--------------------------------------------
agrees with this reference (rope and learned, tied and untied); causal end to end (exact); cached
logits equal the full pass for any chunking, for MHA, MQA and GQA, with RoPE and learned positions;
greedy generation with and without the cache gives the greedy continuation of the model's own forward
pass; seeded sampling is reproducible and independent of the global RNG; sampling at a vanishing
temperature is greedy; new_cache follows spec sizes; a right-padded batch gives each sequence's own
logits; tie_weights really ties; every parameter gets a finite gradient from next_token_loss.
"""

from __future__ import annotations

import numpy as np

from spec.layers import (ACTIVATION, BIAS, DROPOUT, N_KV_HEAD, _norm, decoder_layer, decoder_layer_parameters,
                         norm_parameters, sub)
from spec.positional_encoding import check_positions
from spec.registry import Component, Option, Param, boolean, component

POSITIONS = ("rope", "learned")
ROPE = {"base": 10000.0, "pairing": "adjacent"}
EPS = 1e-5


def decoder_only_parameters(
    *, vocab_size, d_model, n_head, n_layer, d_ff, max_len, n_kv_head=None, positions="rope", norm="rms",
    activation="swiglu", tie_weights=False, bias=True, **_,
) -> dict[str, Param]:
    params = {"embed.weight": Param((vocab_size, d_model), "embedding")}
    if positions == "learned":
        params["pos.weight"] = Param((max_len, d_model), "embedding")
    for i in range(n_layer):
        layer = decoder_layer_parameters(d_model=d_model, n_head=n_head, d_ff=d_ff, n_kv_head=n_kv_head,
                                         cross_attention=False, activation=activation, norm=norm, bias=bias)
        params |= {f"layers.{i}.{name}": p for name, p in layer.items()}
    params |= {f"final_norm.{name}": p for name, p in norm_parameters(d_model=d_model, norm=norm, bias=bias).items()}
    if not tie_weights:
        params["head.weight"] = Param((vocab_size, d_model))
    return params


# The option space (see the module docstring, "Options").
LM_OPTIONS = (
    Option("positions", POSITIONS, "init", "RoPE in every self-attention, or a learned table added to the embeddings"),
    Option("norm", ("rms", "layer"), "init", "RMSNorm or LayerNorm for every norm, the final one included"),
    Option("activation", ("swiglu", "gelu", "relu"), "init", ACTIVATION.doc),
    boolean("tie_weights", "the head is the embedding table itself", default=False, kind="init"),
    BIAS,
    DROPOUT,
    N_KV_HEAD,
    boolean("mask", "forward takes mask= (key padding, True = real token)", argument="mask"),
    boolean("cache", "new_cache exists, forward takes cache= and generate use_cache=", argument="cache"),
    boolean("generator", "generate takes generator= (a torch.Generator for seeded sampling)", argument="generator"),
    Option("eps", (EPS,), "convention", "the eps of every norm (a model with another built in declares it)",
           accepts=lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0),
    Option("pairing", ("adjacent", "half"), "convention",
           "RoPE pairs (2i, 2i + 1), or (i, i + e/2) declared (GPT-NeoX, HF rotate_half)"),
)

DECODER_ONLY_LM = component(Component(
    name="DecoderOnlyLM", kind="module", family="decoder_only",
    summary="token embedding, pre-norm causal decoder layers (RoPE or learned positions), final norm, head",
    parameters=decoder_only_parameters,
    output_shape=None,  # (b, s, vocab_size): the properties check it, the call arguments lack vocab_size
    options=LM_OPTIONS,
))


def decoder_only_lm(
    params: dict[str, np.ndarray],
    tokens: np.ndarray,
    *,
    n_head: int,
    n_layer: int,
    max_len: int,
    n_kv_head: int | None = None,
    positions: str = "rope",
    norm: str = "rms",
    activation: str = "swiglu",
    tie_weights: bool = False,
    mask: np.ndarray | None = None,
    eps: float = EPS,
    pairing: str = "adjacent",
) -> np.ndarray:
    """The float64 reference: logits (b, s, n) of tokens (b, s) at positions 0 .. s - 1 (eval mode). Bias-free
    models (bias=False) simply have no bias entries in ``params``."""
    p = {name: np.asarray(value, dtype=np.float64) for name, value in params.items()}
    tokens = np.asarray(tokens)
    s = tokens.shape[1]
    check_positions(0, s, max_len)
    x = p["embed.weight"][tokens]
    if positions == "learned":
        x = x + p["pos.weight"][:s]
    elif positions != "rope":
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    attn_mask = None if mask is None else np.asarray(mask, dtype=bool)[:, None, None, :]
    for i in range(n_layer):
        x = decoder_layer(sub(p, f"layers.{i}"), x, n_head=n_head, n_kv_head=n_kv_head, cross_attention=False,
                          norm_first=True, activation=activation, norm=norm, eps=eps, mask=attn_mask,
                          rope=ROPE | {"pairing": pairing} if positions == "rope" else None)
    x = _norm(p, "final_norm", x, norm, eps)
    head = p["embed.weight"] if tie_weights else p["head.weight"]
    return x @ head.T


def greedy_continuation(next_logits, prompt: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """The greedy loop: ``next_logits(sequence) -> (b, n)`` logits of the last position; argmax, append."""
    seq = np.asarray(prompt)
    for _ in range(max_new_tokens):
        nxt = np.asarray(next_logits(seq)).argmax(axis=-1)
        seq = np.concatenate([seq, nxt[:, None].astype(seq.dtype)], axis=1)
    return seq
