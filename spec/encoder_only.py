"""The encoder-only model (BERT-like): token and learned position embeddings, encoder layers, mean pooling
over the real tokens, and a linear head, for sequence classification and regression.

Signature (constructor is keyword-only)
---------------------------------------
    EncoderOnlyModel(*, vocab_size, d_model, n_head, n_layer, d_ff, max_len, n_outputs,
                     norm_first=False, dropout=0.0)
        .forward(tokens, *, mask=None) -> out

Shapes
------
    tokens   (b, s) long, values in 0 .. n - 1 (n = vocab_size), s <= max_len
    mask     (b, s) bool, True = real token, False = padding; None means every token is real.
             Every row must hold at least one real token (a row with none pools to zeros: out = head.bias).
    out      (b, c), c = n_outputs, in the dtype of the parameters

Math (eval mode; ``drop`` is the identity there)
------------------------------------------------
    x_0      = drop(embed[tokens] + pos[0 .. s - 1])                        (b, s, d)   no sqrt(d) scale
    x_i      = EncoderLayer_i(x_{i-1}, mask = mask[:, None, None, :])     i = 1 .. n_layer  (spec/layers.py)
    x        = final_norm(x_L) if norm_first else x_L                      (a pre-norm stack ends with a norm)
    pooled   = sum_j mask[:, j] x[:, j] / sum_j mask[:, j]                 (b, d)   mean over REAL positions
    out      = pooled head.weight^T + head.bias                            (b, c)

Options (declarable; properties/options.py: an implementation lists what it offers in ``spec_options``)
-------------------------------------------------------------------------------------------------------
    norm_first   False | True (pre-norm layers and a final norm)           constructor
    dropout      0.0, any probability in [0, 1) declarable                 constructor
    mask         True | False: forward takes the padding ``mask`` (without it every token is real, and
                 the padding properties are skipped)
    activation   "relu": a convention, never passed; a model with GELU built in (BERT) declares "gelu"
    eps          1e-5: a convention, never passed; a model with another LayerNorm eps declares it (BERT:
                 1e-12) and is judged against it
The first value is the spec's default.

Conventions (pinned, with the reason)
-------------------------------------
* One model, two tasks. Classification: ``out`` are c class logits (unnormalised; no softmax in the
  model), trained with ``classification_loss(out, labels)`` (cross-entropy, labels (b,) long in
  0 .. c - 1). Regression: ``out`` are c real values (n_outputs=1 for one target), trained with
  ``regression_loss(out, targets)`` (mean squared error, targets (b, c)). See spec/tasks.py.
* Positions are learned (BERT), start at 0 for the first token of every sequence, and padding goes on
  the right (what tokenizers produce), so a real token's position never depends on the padding.
* The padding mask is used twice: as the key padding mask of every encoder layer (no real position
  attends to a padding key) and as the pooling weights. Padding positions are still computed (they are
  queries too), but nothing they hold reaches ``out``: padding content and amount do not change the
  output, and a padded batch gives every sequence the output it gets alone.
* Mean pooling, not the first token ([CLS]) and not the mean over all s positions (that averages padding).
  Pooling is linear, so applying the head before or after it is the same function; the spec pools first.
* Activation relu, LayerNorm eps 1e-5 (EncoderLayer's defaults) unless declared otherwise; embedding
  dropout and the layers' dropout only in training mode.
* s > max_len raises ValueError (the position table has max_len rows).

Canonical parameters
--------------------
    embed.weight (n, d) "embedding"         pos.weight (max_len, d) "embedding"
    layers.{i}.*  for i = 0 .. n_layer - 1: EncoderLayer's (spec.layers.encoder_layer_parameters)
    final_norm.weight (d,) final_norm.bias (d,)      only when norm_first
    head.weight (c, d)  head.bias (c,)

Properties (properties/test_encoder_only.py)
--------------------------------------------
agrees with this reference (float64; float32 by the error-ratio rule), post- and pre-norm; padding content
does not change the output (exact) and padding amount does not either (float64 rounding); a padded batch
gives each sequence its output alone; the position rows only padding uses get exactly zero gradient; with
learned positions the output is not invariant to reordering the tokens; every parameter gets a finite
gradient from classification_loss and from regression_loss.
Learnability (properties/test_learnability.py): a tiny classifier learns an order-dependent property of
its sequence, and a regressor learns the normalised mean token value.
"""

from __future__ import annotations

import numpy as np

from spec.layers import DROPOUT, NORM_FIRST, _prefixed, encoder_layer, encoder_layer_parameters, norm_parameters, sub
from spec.normalization import layer_norm
from spec.registry import Component, Option, Param, boolean, component

EPS = 1e-5


def encoder_only_parameters(
    *, vocab_size, d_model, n_head, n_layer, d_ff, max_len, n_outputs, norm_first=False, **_
) -> dict[str, Param]:
    params = {"embed.weight": Param((vocab_size, d_model), "embedding"),
              "pos.weight": Param((max_len, d_model), "embedding")}
    for i in range(n_layer):
        # The activation is relu or gelu (a convention): both have the same parameters.
        params |= _prefixed(f"layers.{i}", encoder_layer_parameters(d_model=d_model, n_head=n_head, d_ff=d_ff))
    if norm_first:
        params |= _prefixed("final_norm", norm_parameters(d_model=d_model, norm="layer"))
    return params | {"head.weight": Param((n_outputs, d_model)), "head.bias": Param((n_outputs,), "bias")}


ENCODER_ONLY_MODEL = component(Component(
    name="EncoderOnlyModel", kind="module", family="encoder_only",
    summary="BERT-like encoder: embeddings + learned positions, encoder layers, masked mean pooling, head",
    parameters=encoder_only_parameters,
    options=(
        NORM_FIRST,
        DROPOUT,
        boolean("mask", "forward takes mask= (padding, True = real token)", argument="mask"),
        Option("activation", ("relu", "gelu"), "convention", "the layers' feed-forward activation (BERT: gelu)"),
        Option("eps", (EPS,), "convention", "the eps of every LayerNorm (a model with another built in declares it)",
               accepts=lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0),
    ),
))


def masked_mean(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Mean of x (b, s, d) over the positions where mask (b, s) is True; (b, d). No real position: zeros."""
    x = np.asarray(x, dtype=np.float64)
    if mask is None:
        return x.mean(axis=1)
    keep = np.asarray(mask, dtype=bool)[..., None]
    total = np.where(keep, x, 0.0).sum(axis=1)
    return total / np.maximum(keep.sum(axis=1), 1)


def encoder_only_model(
    params: dict[str, np.ndarray], tokens: np.ndarray, *, n_head: int, n_layer: int, norm_first: bool = False,
    mask: np.ndarray | None = None, activation: str = "relu", eps: float = EPS,
) -> np.ndarray:
    """The float64 reference of EncoderOnlyModel (eval mode): (b, s) tokens -> (b, c)."""
    p = {name: np.asarray(value, dtype=np.float64) for name, value in params.items()}
    tokens = np.asarray(tokens, dtype=np.int64)
    s = tokens.shape[1]
    if s > p["pos.weight"].shape[0]:
        raise ValueError(f"s={s} is longer than max_len={p['pos.weight'].shape[0]}")
    x = p["embed.weight"][tokens] + p["pos.weight"][:s]
    key_mask = None if mask is None else np.asarray(mask, dtype=bool)[:, None, None, :]
    for i in range(n_layer):
        x = encoder_layer(sub(p, f"layers.{i}"), x, n_head=n_head, norm_first=norm_first, mask=key_mask, eps=eps,
                          activation=activation)
    if norm_first:
        x = layer_norm(sub(p, "final_norm"), x, eps=eps)
    return masked_mean(x, mask) @ p["head.weight"].T + p["head.bias"]
