"""The encoder-decoder model (the original transformer, Vaswani et al. 2017): a bidirectional encoder reads
the source, a causal decoder with cross-attention writes the target.

Signature (constructor is keyword-only)
---------------------------------------
    EncoderDecoderModel(*, src_vocab_size, tgt_vocab_size, d_model, n_head, n_layer, d_ff, max_len,
                        norm_first=False, dropout=0.0)
        .encode(src, *, src_mask=None) -> memory
        .decode(tgt, memory, *, src_mask=None, tgt_mask=None, cache=None) -> logits
        .forward(src, tgt, *, src_mask=None, tgt_mask=None) -> logits  =  decode(tgt, encode(src, src_mask), ...)
        .new_cache(*, batch_size, capacity) -> list of KVCache, one per decoder layer
        .generate(src, *, bos_id, max_new_tokens, src_mask=None, use_cache=True) -> tokens

Shapes
------
    src       (b, t) long, values in 0 .. src_vocab_size - 1, t <= max_len
    tgt       (b, s) long, values in 0 .. tgt_vocab_size - 1 (n = tgt_vocab_size)
    src_mask  (b, t) bool, True = real source token (right padding); None: all real
    tgt_mask  (b, k) bool, True = real target token, over the decoder's self-attention KEYS: k = s without a
              cache, k = cache[0].length + s with one (the cached positions first); None: all real
    memory    (b, t, d)
    logits    (b, s, n)
    cache     list of n_layer KVCache (spec/kv_cache.py), each (b, n_head, capacity, d // n_head)
    generate  -> (b, 1 + max_new_tokens) long: bos_id, then the greedy tokens

Math (eval mode; ``drop`` is the identity there; PE is spec/positional_encoding.py's sinusoidal table)
---------------------------------------------------------------------------------------------------
    encode:  x = drop(src_embed[src] * sqrt(d) + PE[0 .. t - 1])
             x = EncoderLayer_i(x, mask = src_mask[:, None, None, :])          i = 1 .. n_layer
             memory = encoder_norm(x) if norm_first else x
    decode:  p = 0 without a cache, cache[0].length with one (the chunk's first absolute position)
             y = drop(tgt_embed[tgt] * sqrt(d) + PE[p .. p + s - 1])
             y = DecoderLayer_i(y, memory, mask = tgt_mask[:, None, None, :], memory_mask = src_mask[:, None, None, :],
                                cache = cache[i])                               causal self-attention
             y = decoder_norm(y) if norm_first else y
             logits = y head.weight^T                                           no bias
    generate (greedy): y_0 = bos_id; y_{k+1} = argmax_v decode(y_0 .. y_k, memory)[:, -1, v]. With
             use_cache=True each step feeds only the newest token and the cache holds the rest; the tokens
             are the same as without the cache.

Options (declarable; properties/options.py: an implementation lists what it offers in ``spec_options``)
-------------------------------------------------------------------------------------------------------
    norm_first   False | True (pre-norm layers and final encoder/decoder norms)   constructor
    dropout      0.0, any probability in [0, 1) declarable                        constructor
    src_mask     True | False: encode, decode, forward and generate take ``src_mask`` (source padding)
    tgt_mask     True | False: decode and forward take ``tgt_mask`` (target padding)
    cache        True | False: ``new_cache`` exists, decode takes ``cache`` and generate ``use_cache``
    activation   "relu": a convention, never passed; a model with GELU built in declares "gelu"
    eps          1e-5: a convention, never passed; a model with another LayerNorm eps declares it
The first value is the spec's default; properties that need a value not offered are skipped, naming it.

Conventions (pinned, with the reason)
-------------------------------------
* Embeddings are multiplied by sqrt(d_model) before the positions are added (the paper, section 3.4;
  nn.Transformer leaves the embedding to the user). The paper initialises them with std d^-1/2, so the
  scaled embedding has unit variance next to the [-1, 1] positions; the canonical parameters draw N(0, 1)
  like every embedding (the agreement properties do not care), and the learnability test rescales them.
* Positions are sinusoidal (a fixed buffer, no parameter) and start at 0 for the source and for the target;
  a cached decode of a later chunk adds the rows of its true positions p .. p + s - 1.
* The encoder is bidirectional (no causal mask; src_mask only). The decoder's self-attention is causal and
  bottom-right aligned (spec/sdpa.py), so a chunk decoded with a cache attends to the cached positions and to
  the chunk's own earlier positions. Cross-attention reads every real memory position; src_mask hides the
  padded ones (the same mask as the encoder's: nn.Transformer calls it memory_key_padding_mask).
* Teacher forcing: logits[:, j] predicts tgt[:, j + 1] (the target shifted right by one, bos first), so the
  training loss is next_token_loss(logits, tgt) (spec/tasks.py's shifted cross-entropy).
* generate runs without gradient, in the mode the model is in (eval for greedy), and returns bos_id
  followed by exactly max_new_tokens tokens (no early stop at an end token). 1 + max_new_tokens <= max_len.
* Activation relu, LayerNorm eps 1e-5 (the layers' defaults) unless declared otherwise; the head has no bias and is not tied to the
  target embedding (the paper ties them; a tied model maps tgt_embed.weight and head.weight to one tensor).

Canonical parameters
--------------------
    src_embed.weight (n_src, d) "scaled_embedding"   tgt_embed.weight (n, d) "scaled_embedding"
    (drawn N(0, 1/d), the paper's initialisation, so that the embeddings times sqrt(d) have unit scale)
    encoder.{i}.*   EncoderLayer's (spec.layers.encoder_layer_parameters)
    decoder.{i}.*   DecoderLayer's with cross-attention (spec.layers.decoder_layer_parameters)
    encoder_norm.weight/.bias (d,)  decoder_norm.weight/.bias (d,)      only when norm_first
    head.weight (n, d)

Properties (properties/test_encoder_decoder.py)
-----------------------------------------------
agrees with this reference (float64; float32 by the error-ratio rule), post- and pre-norm; causal end to
end (logits at j do not depend on target tokens after j, exact); the memory at every position depends on
every real source position (the encoder is bidirectional); the logits depend on every real source position
and on no padded one (exact); decoding chunk by chunk with the cache equals teacher forcing for any
chunking; greedy generation with the cache equals generation without, and every generated token is the
argmax of the teacher-forced logits of its prefix; every parameter gets a finite gradient from the shifted
cross-entropy. Learnability (properties/test_learnability.py): a tiny model learns to reverse its source.
"""

from __future__ import annotations

import math

import numpy as np

from spec.layers import (_prefixed, decoder_layer, decoder_layer_parameters, encoder_layer,
                         encoder_layer_parameters, norm_parameters, sub)
from spec.normalization import layer_norm
from spec.positional_encoding import check_positions, sinusoidal_table
from spec.layers import DROPOUT, NORM_FIRST
from spec.registry import Component, Option, Param, boolean, component

EPS = 1e-5


def encoder_decoder_parameters(
    *, src_vocab_size, tgt_vocab_size, d_model, n_head, n_layer, d_ff, norm_first=False, **_
) -> dict[str, Param]:
    params = {"src_embed.weight": Param((src_vocab_size, d_model), "scaled_embedding"),
              "tgt_embed.weight": Param((tgt_vocab_size, d_model), "scaled_embedding")}
    for i in range(n_layer):
        params |= _prefixed(f"encoder.{i}", encoder_layer_parameters(d_model=d_model, n_head=n_head, d_ff=d_ff))
    for i in range(n_layer):
        params |= _prefixed(f"decoder.{i}", decoder_layer_parameters(d_model=d_model, n_head=n_head, d_ff=d_ff,
                                                                      cross_attention=True))
    if norm_first:
        params |= _prefixed("encoder_norm", norm_parameters(d_model=d_model, norm="layer"))
        params |= _prefixed("decoder_norm", norm_parameters(d_model=d_model, norm="layer"))
    return params | {"head.weight": Param((tgt_vocab_size, d_model))}


ENCODER_DECODER_MODEL = component(Component(
    name="EncoderDecoderModel", kind="module", family="encoder_decoder",
    summary="the original transformer: bidirectional encoder, causal decoder with cross-attention, greedy generate",
    parameters=encoder_decoder_parameters,
    options=(
        NORM_FIRST,
        DROPOUT,
        boolean("src_mask", "encode/decode/forward/generate take src_mask= (source padding)", argument="src_mask"),
        boolean("tgt_mask", "decode/forward take tgt_mask= (target padding over the self-attention keys)",
                argument="tgt_mask"),
        boolean("cache", "new_cache exists, decode takes cache= and generate use_cache=", argument="cache"),
        Option("activation", ("relu", "gelu"), "convention", "the layers' feed-forward activation"),
        Option("eps", (EPS,), "convention", "the eps of every LayerNorm (a model with another built in declares it)",
               accepts=lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0),
    ),
))


def _embed(table: np.ndarray, tokens: np.ndarray, *, offset: int, max_len: int) -> np.ndarray:
    tokens = np.asarray(tokens, dtype=np.int64)
    s, d = tokens.shape[1], table.shape[1]
    check_positions(offset, s, max_len)
    return table[tokens] * math.sqrt(d) + sinusoidal_table(np.arange(offset, offset + s), d)


def _key_mask(mask: np.ndarray | None) -> np.ndarray | None:
    return None if mask is None else np.asarray(mask, dtype=bool)[:, None, None, :]


def encode(params, src, *, n_head: int, n_layer: int, max_len: int, norm_first: bool = False, src_mask=None,
           activation: str = "relu", eps: float = EPS):
    """The float64 reference of EncoderDecoderModel.encode: (b, t) -> memory (b, t, d)."""
    p = {name: np.asarray(value, dtype=np.float64) for name, value in params.items()}
    x = _embed(p["src_embed.weight"], src, offset=0, max_len=max_len)
    for i in range(n_layer):
        x = encoder_layer(sub(p, f"encoder.{i}"), x, n_head=n_head, norm_first=norm_first, mask=_key_mask(src_mask),
                          activation=activation, eps=eps)
    return layer_norm(sub(p, "encoder_norm"), x, eps=eps) if norm_first else x


def decode(params, tgt, memory, *, n_head: int, n_layer: int, max_len: int, norm_first: bool = False,
           src_mask=None, tgt_mask=None, activation: str = "relu", eps: float = EPS):
    """The float64 reference of EncoderDecoderModel.decode without a cache (teacher forcing): -> (b, s, n)."""
    p = {name: np.asarray(value, dtype=np.float64) for name, value in params.items()}
    y = _embed(p["tgt_embed.weight"], tgt, offset=0, max_len=max_len)
    for i in range(n_layer):
        y = decoder_layer(sub(p, f"decoder.{i}"), y, np.asarray(memory, dtype=np.float64), n_head=n_head,
                          cross_attention=True, norm_first=norm_first, mask=_key_mask(tgt_mask),
                          memory_mask=_key_mask(src_mask), activation=activation, eps=eps)
    if norm_first:
        y = layer_norm(sub(p, "decoder_norm"), y, eps=eps)
    return y @ p["head.weight"].T


def encoder_decoder_model(params, src, tgt, *, n_head: int, n_layer: int, max_len: int, norm_first: bool = False,
                          src_mask=None, tgt_mask=None, activation: str = "relu", eps: float = EPS) -> np.ndarray:
    """The float64 reference of EncoderDecoderModel.forward: decode(tgt, encode(src))."""
    memory = encode(params, src, n_head=n_head, n_layer=n_layer, max_len=max_len, norm_first=norm_first,
                    src_mask=src_mask, activation=activation, eps=eps)
    return decode(params, tgt, memory, n_head=n_head, n_layer=n_layer, max_len=max_len, norm_first=norm_first,
                  src_mask=src_mask, tgt_mask=tgt_mask, activation=activation, eps=eps)
