"""Transformer layers: the encoder layer and the decoder layer (decoder-only and encoder-decoder).

Signatures (constructors are keyword-only)
-------------------------------------------
    EncoderLayer(*, d_model, n_head, d_ff, norm_first=False, dropout=0.0, activation="relu", eps=1e-5)
        .forward(x, *, mask=None)
    DecoderLayer(*, d_model, n_head, d_ff, n_kv_head=None, cross_attention=True, norm_first=False,
                 dropout=0.0, activation="relu", norm="layer", eps=1e-5, rotary=None)
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
nn.TransformerEncoderLayer's norm1/norm2 are self_attn_norm/ff_norm; nn.TransformerDecoderLayer's
norm1/norm2/norm3 are self_attn_norm/cross_attn_norm/ff_norm (the adapter maps them).

Properties (properties/test_layers.py)
--------------------------------------
agree with this reference and with nn.TransformerEncoderLayer / nn.TransformerDecoderLayer (both
norm_first settings, dropout 0, weights transferred); an encoder layer without positions is equivariant
to permuting positions; padding content and amount do not change real positions; eval mode is
deterministic and, with dropout 0, train mode equals eval mode; a pre-norm layer with zero output
projections is the identity; decoder layers are causal; the decoder's output depends on every unmasked
memory position and on no masked one; every parameter gets a finite gradient.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from spec.attention import attention, projection_parameters
from spec.feed_forward import feed_forward, swiglu
from spec.normalization import layer_norm, rms_norm
from spec.registry import Component, Param, component, same_shape_as_first_input
from spec.rotary_embedding import rotary_embedding

ACTIVATIONS = ("relu", "gelu", "swiglu")
NORMS = ("layer", "rms")


def _prefixed(prefix: str, params: dict[str, Param]) -> dict[str, Param]:
    return {f"{prefix}.{name}": p for name, p in params.items()}


def ff_parameters(*, d_model: int, d_ff: int, activation: str) -> dict[str, Param]:
    if activation == "swiglu":
        return {"gate.weight": Param((d_ff, d_model)), "up.weight": Param((d_ff, d_model)),
                "down.weight": Param((d_model, d_ff))}
    return {"up.weight": Param((d_ff, d_model)), "up.bias": Param((d_ff,), "bias"),
            "down.weight": Param((d_model, d_ff)), "down.bias": Param((d_model,), "bias")}


def norm_parameters(*, d_model: int, norm: str) -> dict[str, Param]:
    gain = {"weight": Param((d_model,), "gain")}
    return gain if norm == "rms" else gain | {"bias": Param((d_model,), "bias")}


def encoder_layer_parameters(*, d_model, n_head, d_ff, activation="relu", **_) -> dict[str, Param]:
    return (
        _prefixed("self_attn", projection_parameters(d_model=d_model, n_head=n_head, n_kv_head=n_head))
        | _prefixed("ff", ff_parameters(d_model=d_model, d_ff=d_ff, activation=activation))
        | _prefixed("self_attn_norm", norm_parameters(d_model=d_model, norm="layer"))
        | _prefixed("ff_norm", norm_parameters(d_model=d_model, norm="layer"))
    )


def decoder_layer_parameters(
    *, d_model, n_head, d_ff, n_kv_head=None, cross_attention=True, activation="relu", norm="layer", **_
) -> dict[str, Param]:
    g = n_head if n_kv_head is None else n_kv_head
    params = _prefixed("self_attn", projection_parameters(d_model=d_model, n_head=n_head, n_kv_head=g))
    if cross_attention:
        params |= _prefixed("cross_attn", projection_parameters(d_model=d_model, n_head=n_head, n_kv_head=n_head))
    params |= _prefixed("ff", ff_parameters(d_model=d_model, d_ff=d_ff, activation=activation))
    params |= _prefixed("self_attn_norm", norm_parameters(d_model=d_model, norm=norm))
    if cross_attention:
        params |= _prefixed("cross_attn_norm", norm_parameters(d_model=d_model, norm=norm))
    return params | _prefixed("ff_norm", norm_parameters(d_model=d_model, norm=norm))


ENCODER_LAYER = component(Component(
    name="EncoderLayer", kind="module", family="layers",
    summary="self-attention + feed-forward, residuals, LayerNorm, post- or pre-norm",
    parameters=encoder_layer_parameters, output_shape=same_shape_as_first_input,
))
DECODER_LAYER = component(Component(
    name="DecoderLayer", kind="module", family="layers",
    summary="causal self-attention [+ cross-attention] + feed-forward, residuals, norms",
    parameters=decoder_layer_parameters, output_shape=same_shape_as_first_input,
))


def sub(params: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The parameters under ``prefix.``, with the prefix removed."""
    return {k[len(prefix) + 1 :]: v for k, v in params.items() if k.startswith(prefix + ".")}


def _ff(params, x, activation):
    if activation == "swiglu":
        return swiglu(sub(params, "ff"), x)
    return feed_forward(sub(params, "ff"), x, activation=activation)


def _norm(params, name, x, norm, eps):
    if norm == "rms":
        return rms_norm(sub(params, name), x, eps=eps)
    return layer_norm(sub(params, name), x, eps=eps)


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
