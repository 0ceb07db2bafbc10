"""Transformer layers: the encoder layer and the decoder layer (decoder-only and encoder-decoder).

Signatures (constructors are keyword-only)
-------------------------------------------
    EncoderLayer(*, d_model, n_head, d_ff, norm_first=False, dropout=0.0, activation="relu", eps=1e-5,
                 bias=True)
        .forward(x, *, mask=None)
    DecoderLayer(*, d_model, n_head, d_ff, n_kv_head=None, cross_attention=True, norm_first=False,
                 dropout=0.0, activation="relu", norm="layer", eps=1e-5, bias=True, rotary=None)
        .forward(x, memory=None, *, mask=None, memory_mask=None, cache=None)

Shapes
------
    x            (b, s, d)       the sequence
    memory       (b, t, d)       the encoder's output (DecoderLayer with cross_attention=True only)
    mask         bool, broadcastable to (b, h, s, s) (with a cache: (b, h, s, cache.length + s)),
                 True = may attend; a key padding mask (b, s) is mask[:, None, None, :]
    memory_mask  bool, broadcastable to (b, h, s, t); padding of the memory
    out          (b, s, d)

Math (post-norm, norm_first=False: the original transformer and nn.Transformer*Layer's default)
--------------------------------------------------------------------------------------------------
    encoder:  x = N_attn(x + drop(SelfAttn(x, mask)));             x = N_ff(x + drop(FF(x)))
    decoder:  x = N_attn(x + drop(SelfAttn(x, mask, causal)));     [x = N_cross(x + drop(Cross(x, memory, memory_mask)))]
              x = N_ff(x + drop(FF(x)))
Pre-norm (norm_first=True: GPT-2, LLaMA): each sublayer reads the normalised stream and adds to it,
    x = x + drop(Sublayer(N(x)))
so a pre-norm layer whose sublayers' output projections are zero is the identity.
SelfAttn is MultiHeadAttention (GroupedQueryAttention when n_kv_head is given), Cross is CrossAttention,
FF is FeedForward(activation relu|gelu) or SwiGLU (activation="swiglu"), N is LayerNorm (norm="layer")
or RMSNorm (norm="rms"); ``rotary`` (a RotaryEmbedding) rotates the self-attention's queries and keys.
With bias=False no projection and no norm has a bias (nn.Transformer*Layer's bias=False, nanoGPT's
bias=False, LLaMA): every attention and feed-forward projection is x W^T and LayerNorm has its weight only.

Options (declarable; properties/options.py: an implementation lists what it offers in ``spec_options``)
-------------------------------------------------------------------------------------------------------
Both layers:
    norm_first   False (post-norm) | True (pre-norm)                       constructor
    activation   "relu" | "gelu" | "swiglu" (SwiGLU replaces FeedForward)   constructor
    eps          1e-5, any eps >= 0 declarable (the norms' eps)             constructor
    bias         True | False (every projection and LayerNorm bias-free)    constructor
    dropout      0.0, any probability in [0, 1) declarable                  constructor
    mask         True | False: the call takes ``mask`` (a self-attention mask; padding)
DecoderLayer only:
    norm             "layer" | "rms"                                        constructor
    cross_attention  True | False (decoder-only: no cross-attention, no memory)   constructor
    n_kv_head    False | True: the constructor takes ``n_kv_head`` (grouped-query self-attention)
    rotary       False | True: the constructor takes ``rotary`` (a RotaryEmbedding)
    cache        False | True: the call takes ``cache`` (the self-attention's KVCache)
    memory_mask  True | False: the call takes ``memory_mask`` (padding of the memory)
The first value is the spec's default. A layer with one value built in declares it (GPT-2's block:
``{"norm_first": True, "activation": "gelu", "cross_attention": False, "n_kv_head": False, ...}``);
properties that need another value are skipped, naming it.

Conventions
-----------
* The decoder's self-attention is always causal (bottom-right aligned, so it composes with a KV cache:
  ``cache`` is the layer's KVCache for its self-attention; cross-attention is recomputed from memory).
* Dropout is applied to each sublayer's output before the residual add, only in training mode; with
  dropout=0, train mode equals eval mode. (nn.Transformer*Layer also drops inside the feed-forward.)
* Norm eps 1e-5 (nn.LayerNorm's default, and nn.Transformer*Layer's layer_norm_eps).

Canonical parameters
--------------------
Prefixed parameters of the sublayers (spec/attention.py, spec/feed_forward.py, spec/normalization.py):
    self_attn.{q,k,v,o}.{weight,bias}     cross_attn.{q,k,v,o}.{weight,bias}   (cross_attention only)
    ff.up.weight ff.up.bias ff.down.weight ff.down.bias    (SwiGLU: ff.gate.weight ff.up.weight ff.down.weight)
    self_attn_norm.weight/.bias   cross_attn_norm.weight/.bias   ff_norm.weight/.bias   (RMSNorm: weight only)
With bias=False every ``.bias`` entry above is absent (the weights alone).
nn.TransformerEncoderLayer's norm1/norm2 are self_attn_norm/ff_norm; nn.TransformerDecoderLayer's
norm1/norm2/norm3 are self_attn_norm/cross_attn_norm/ff_norm (the adapter maps them).

Properties (properties/test_layers.py)
--------------------------------------
agree with this reference, in every offered configuration (activations, norms, eps, biases, GQA, RoPE,
cross-attention), and with nn.TransformerEncoderLayer / nn.TransformerDecoderLayer (both norm_first
settings, relu or gelu, eps, bias, dropout 0, weights transferred); an encoder layer without positions is
equivariant to permuting positions; padding content and amount do not change real positions; eval mode is
deterministic and, with dropout 0, train mode equals eval mode; a pre-norm layer with zero output
projections is the identity; decoder layers are causal; the decoder's output depends on every unmasked
memory position and on no masked one; every parameter gets a finite gradient; a decoder layer run chunk
by chunk with a KV cache equals the full pass (with or without cross-attention).
"""

from __future__ import annotations

from functools import partial

import numpy as np

from spec.attention import attention, projection_parameters
from spec.feed_forward import feed_forward, swiglu
from spec.normalization import layer_norm, rms_norm
from spec.registry import Component, Option, Param, boolean, component, positive_float, same_shape_as_first_input
from spec.rotary_embedding import rotary_embedding

ACTIVATIONS = ("relu", "gelu", "swiglu")
NORMS = ("layer", "rms")


def _prefixed(prefix: str, params: dict[str, Param]) -> dict[str, Param]:
    return {f"{prefix}.{name}": p for name, p in params.items()}


def ff_parameters(*, d_model: int, d_ff: int, activation: str, bias: bool = True) -> dict[str, Param]:
    if activation == "swiglu":
        return {"gate.weight": Param((d_ff, d_model)), "up.weight": Param((d_ff, d_model)),
                "down.weight": Param((d_model, d_ff))}
    # This order (weight, bias per projection) fixes the canonical draws: every seed's weights depend on it.
    params = {"up.weight": Param((d_ff, d_model)), "up.bias": Param((d_ff,), "bias"),
              "down.weight": Param((d_model, d_ff)), "down.bias": Param((d_model,), "bias")}
    return params if bias else {name: p for name, p in params.items() if not name.endswith(".bias")}


def norm_parameters(*, d_model: int, norm: str, bias: bool = True) -> dict[str, Param]:
    gain = {"weight": Param((d_model,), "gain")}
    return gain if norm == "rms" or not bias else gain | {"bias": Param((d_model,), "bias")}


def encoder_layer_parameters(*, d_model, n_head, d_ff, activation="relu", bias=True, **_) -> dict[str, Param]:
    return (
        _prefixed("self_attn", projection_parameters(d_model=d_model, n_head=n_head, n_kv_head=n_head, bias=bias))
        | _prefixed("ff", ff_parameters(d_model=d_model, d_ff=d_ff, activation=activation, bias=bias))
        | _prefixed("self_attn_norm", norm_parameters(d_model=d_model, norm="layer", bias=bias))
        | _prefixed("ff_norm", norm_parameters(d_model=d_model, norm="layer", bias=bias))
    )


def decoder_layer_parameters(
    *, d_model, n_head, d_ff, n_kv_head=None, cross_attention=True, activation="relu", norm="layer", bias=True, **_
) -> dict[str, Param]:
    g = n_head if n_kv_head is None else n_kv_head
    params = _prefixed("self_attn", projection_parameters(d_model=d_model, n_head=n_head, n_kv_head=g, bias=bias))
    if cross_attention:
        params |= _prefixed("cross_attn", projection_parameters(d_model=d_model, n_head=n_head, n_kv_head=n_head,
                                                                bias=bias))
    params |= _prefixed("ff", ff_parameters(d_model=d_model, d_ff=d_ff, activation=activation, bias=bias))
    params |= _prefixed("self_attn_norm", norm_parameters(d_model=d_model, norm=norm, bias=bias))
    if cross_attention:
        params |= _prefixed("cross_attn_norm", norm_parameters(d_model=d_model, norm=norm, bias=bias))
    return params | _prefixed("ff_norm", norm_parameters(d_model=d_model, norm=norm, bias=bias))


# The option space of the layers (and, reused, of the models built from them).
NORM_FIRST = Option("norm_first", (False, True), "init", "pre-norm x + S(N(x)) (True) or post-norm N(x + S(x)) (False)")
ACTIVATION = Option("activation", ACTIVATIONS, "init", "the feed-forward: FeedForward with relu or gelu, or SwiGLU")
EPS = positive_float("eps", "the eps of every norm in the layer", draws=(1e-5, 1e-6, 1e-2))
BIAS = boolean("bias", "biases in every projection and LayerNorm (False: weights alone, nanoGPT's bias=False)",
               kind="init")
DROPOUT = Option("dropout", (0.0, 0.1, 0.5), "init", "the dropout probability (train mode only)",
                 accepts=lambda p: isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p < 1)
MASK = boolean("mask", "the call takes mask= (the self-attention's mask; key padding)", argument="mask")
NORM = Option("norm", NORMS, "init", "every norm of the layer is LayerNorm or RMSNorm")
CROSS_ATTENTION = boolean("cross_attention", "cross-attention over a memory (False: decoder-only)", kind="init")
N_KV_HEAD = boolean("n_kv_head", "the constructor takes n_kv_head= (grouped-query self-attention)", default=False,
                    argument="n_kv_head")
ROTARY = boolean("rotary", "the constructor takes rotary= (a RotaryEmbedding for queries and keys)", default=False,
                 argument="rotary")
CACHE = boolean("cache", "the call takes cache= (the self-attention's KVCache)", default=False, argument="cache")
MEMORY_MASK = boolean("memory_mask", "the call takes memory_mask= (padding of the memory)", argument="memory_mask")

ENCODER_LAYER = component(Component(
    name="EncoderLayer", kind="module", family="layers",
    summary="self-attention + feed-forward, residuals, LayerNorm, post- or pre-norm",
    parameters=encoder_layer_parameters, output_shape=same_shape_as_first_input,
    options=(NORM_FIRST, ACTIVATION, EPS, BIAS, DROPOUT, MASK),
))
DECODER_LAYER = component(Component(
    name="DecoderLayer", kind="module", family="layers",
    summary="causal self-attention [+ cross-attention] + feed-forward, residuals, norms",
    parameters=decoder_layer_parameters, output_shape=same_shape_as_first_input,
    options=(NORM_FIRST, ACTIVATION, EPS, BIAS, DROPOUT, MASK, NORM, CROSS_ATTENTION, N_KV_HEAD, ROTARY, CACHE,
             MEMORY_MASK),
))


def sub(params: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The parameters under ``prefix.``, with the prefix removed."""
    return {k[len(prefix) + 1 :]: v for k, v in params.items() if k.startswith(prefix + ".")}


def _ff(params, x, activation):
    p = sub(params, "ff")
    if activation == "swiglu":
        return swiglu(p, x)
    zeros = {"up.bias": np.zeros(p["up.weight"].shape[0]), "down.bias": np.zeros(p["down.weight"].shape[0])}
    return feed_forward(zeros | p, x, activation=activation)  # bias=False: no bias entries, i.e. zero biases


def _norm(params, name, x, norm, eps):
    p = sub(params, name)
    if norm == "rms":
        return rms_norm(p, x, eps=eps)
    return layer_norm({"bias": np.zeros_like(p["weight"])} | p, x, eps=eps)


def _residual(x, sublayer, norm_fn, norm_first):
    return x + sublayer(norm_fn(x)) if norm_first else norm_fn(x + sublayer(x))


def encoder_layer(params, x, *, n_head, norm_first=False, activation="relu", eps=1e-5, mask=None):
    """The float64 reference for EncoderLayer (dropout is the identity here: eval mode)."""
    x = np.asarray(x, dtype=np.float64)
    x = _residual(x, lambda y: attention(sub(params, "self_attn"), y, n_head=n_head, mask=mask),
                  lambda y: _norm(params, "self_attn_norm", y, "layer", eps), norm_first)
    return _residual(x, lambda y: _ff(params, y, activation),
                     lambda y: _norm(params, "ff_norm", y, "layer", eps), norm_first)


def decoder_layer(
    params, x, memory=None, *, n_head, n_kv_head=None, cross_attention=True, norm_first=False,
    activation="relu", norm="layer", eps=1e-5, mask=None, memory_mask=None, rope=None,
):
    """The float64 reference for DecoderLayer. ``rope`` = {"base": ..., "pairing": ...} or None."""
    x = np.asarray(x, dtype=np.float64)
    rotary = None if rope is None else partial(rotary_embedding, **rope)
    x = _residual(
        x,
        lambda y: attention(sub(params, "self_attn"), y, n_head=n_head, n_kv_head=n_kv_head, mask=mask,
                            causal=True, rotary=rotary),
        lambda y: _norm(params, "self_attn_norm", y, norm, eps), norm_first,
    )
    if cross_attention:
        x = _residual(x, lambda y: attention(sub(params, "cross_attn"), y, memory, n_head=n_head, mask=memory_mask),
                      lambda y: _norm(params, "cross_attn_norm", y, norm, eps), norm_first)
    return _residual(x, lambda y: _ff(params, y, activation),
                     lambda y: _norm(params, "ff_norm", y, norm, eps), norm_first)
