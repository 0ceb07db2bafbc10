"""Mutants of EncoderLayer and DecoderLayer: each overrides ``forward`` of ours with one realistic slip.

``buggy_residual(bug, ...)`` is the correct sublayer wrapper (spec/layers.py: post-norm N(x + drop(S(x))),
pre-norm x + drop(S(N(x)))) with one branch per bug; the two forwards are ours with one branch per bug,
so every mutant reads as a near miss.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from implementations.layers import DecoderLayer, EncoderLayer, make_feed_forward
from implementations.normalization import LayerNorm, RMSNorm
from meta_tests.catalog import mutant


def buggy_residual(bug: str, x, sublayer, norm, dropout, *, norm_first: bool, which: str):
    """One sublayer with its norm, dropout and residual; ``which`` is "attn", "cross" or "ff"."""
    drop = dropout
    if bug == "dropout_always_on":  # F.dropout's training flag defaults to True
        drop = lambda y: F.dropout(y, p=dropout.p)
    if bug == "always_pre_norm":  # the pre-norm line written for both settings
        norm_first = True
    if bug == "missing_residual" and which == "attn":
        return drop(sublayer(norm(x))) if norm_first else norm(drop(sublayer(x)))
    if bug == "residual_stream_normalised" and norm_first:
        x = norm(x)  # the stream itself is normalised, then the sublayer's output added to it
        return x + drop(sublayer(x))
    if bug == "final_residual_twice" and which == "ff":
        if norm_first:
            return x + (x + drop(sublayer(norm(x))))
        return norm(x + drop(sublayer(x))) + x
    if norm_first:
        return x + drop(sublayer(norm(x)))
    return norm(x + drop(sublayer(x)))


def buggy_encoder_forward(bug: str):
    def forward(self, x, *, mask=None):
        if bug == "padding_mask_inverted" and mask is not None:
            mask = ~mask  # torch's polarity (True = masked) fed to a True = may-attend API
        causal = bug == "causal_encoder"  # decoder code copied into the encoder
        steps = [
            (lambda y: self.self_attn(y, mask=mask, causal=causal), self.self_attn_norm, "attn"),
            (self.ff, self.ff_norm, "ff"),
        ]
        if bug == "ff_before_attention":
            steps.reverse()
        for sublayer, norm, which in steps:
            x = buggy_residual(bug, x, sublayer, norm, self.dropout, norm_first=self.norm_first, which=which)
        return x

    return forward


def buggy_decoder_forward(bug: str):
    def forward(self, x, memory=None, *, mask=None, memory_mask=None, cache=None):
        if bug == "cached_path_skips_cross_attention" and cache is not None:
            # an incremental-decoding path written for decoder-only models, reused with cross-attention
            x = buggy_residual(bug, x, lambda y: self.self_attn(y, mask=mask, causal=True, cache=cache),
                               self.self_attn_norm, self.dropout, norm_first=self.norm_first, which="attn")
            return buggy_residual(bug, x, self.ff, self.ff_norm, self.dropout, norm_first=self.norm_first,
                                  which="ff")
        def self_attention(y):
            kwargs = {} if bug == "cache_not_passed" else {"cache": cache}
            return self.self_attn(y, mask=mask, causal=bug != "causal_mask_missing", **kwargs)

        def cross_attention(y):
            context = y if bug == "cross_kv_from_x" else memory
            return self.cross_attn(y, context, mask=None if bug == "memory_mask_ignored" else memory_mask)

        def run(x, sublayer, norm, which):
            return buggy_residual(bug, x, sublayer, norm, self.dropout, norm_first=self.norm_first, which=which)

        x = run(x, self_attention, self.self_attn_norm, "attn")
        if self.cross_attn is not None:
            # copy-paste: the self-attention's norm reused for the cross-attention sublayer
            norm = self.self_attn_norm if bug == "cross_norm_reused" else self.cross_attn_norm
            x = run(x, cross_attention, norm, "cross")
        return run(x, self.ff, self.ff_norm, "ff")

    return forward


REFERENCE = "test_layer_agrees_with_reference"
TORCH = "test_layer_agrees_with_torch_transformer_layer"
IDENTITY = "test_pre_norm_layer_with_zero_output_projections_is_identity"


def _mutant_of(base, forward_for, bug: str, why: str, caught_by: list[str], params=None):
    cls = type(f"{base.__name__}_{bug}", (base,), {"forward": forward_for(bug)})
    mutant(name=f"{base.__name__}_{bug}", bug=why, caught_by=caught_by, provides=base.__name__, params=params)(cls)


def _encoder(bug, why, caught_by, params=None):
    _mutant_of(EncoderLayer, buggy_encoder_forward, bug, why, caught_by, params)


def _decoder(bug, why, caught_by, params=None):
    _mutant_of(DecoderLayer, buggy_decoder_forward, bug, why, caught_by, params)


_encoder("missing_residual", "the attention sublayer's residual connection is missing", [REFERENCE, TORCH, IDENTITY])
_encoder("always_pre_norm", "pre-norm code runs when post-norm (norm_first=False) is asked for", [REFERENCE, TORCH])
_decoder("residual_stream_normalised", "pre-norm normalises the residual stream itself: N(x) + S(N(x))",
         [REFERENCE, IDENTITY])
_encoder("dropout_always_on", "F.dropout without training=self.training: dropout stays on in eval mode",
         ["test_layer_eval_mode_is_deterministic"])
_decoder("cross_kv_from_x", "cross-attention takes keys and values from the decoder's stream, not the memory",
         [REFERENCE, "test_decoder_layer_depends_on_every_unmasked_memory_position_only"])
_decoder("causal_mask_missing", "the decoder's self-attention is called without causal=True",
         [REFERENCE, "test_decoder_layer_is_causal", "test_cached_decoder_layer_equals_the_full_pass"])
_decoder("memory_mask_ignored", "memory_mask never reaches the cross-attention",
         ["test_decoder_layer_depends_on_every_unmasked_memory_position_only",
          "test_layer_padding_does_not_change_real_positions"])
_encoder("padding_mask_inverted", "the padding mask's polarity is inverted (True taken as 'masked')",
         [REFERENCE, "test_layer_padding_does_not_change_real_positions"])
_encoder("ff_before_attention", "sublayers in the wrong order: feed-forward before self-attention", [REFERENCE, TORCH])
_decoder("final_residual_twice", "the feed-forward sublayer adds the residual twice", [REFERENCE, IDENTITY])
_encoder("causal_encoder", "the decoder's causal self-attention copied into the encoder",
         ["test_encoder_layer_is_equivariant_to_permuting_positions", TORCH])
_decoder("cache_not_passed", "the KV cache is never handed to the self-attention",
         ["test_cached_decoder_layer_equals_the_full_pass"])
_decoder("cross_norm_reused", "copy-paste: the cross-attention sublayer uses self_attn_norm (cross_attn_norm unused)",
         [REFERENCE, "test_every_layer_parameter_gets_a_finite_gradient"])
_decoder("cached_path_skips_cross_attention",
         "the cached (incremental) path, written for decoder-only layers, skips the cross-attention",
         ["test_cached_decoder_layer_equals_the_full_pass"])


# Options: each a constructor argument accepted and then not honoured.


class EncoderLayerDropoutHardCoded(EncoderLayer):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.dropout = nn.Dropout(0.1)  # the tutorial's value, whatever dropout= says


mutant(name="EncoderLayer_dropout_hard_coded", bug="nn.Dropout(0.1) hard-coded: the dropout argument is ignored",
       caught_by=["test_layer_train_mode_equals_eval_mode_without_dropout"], provides="EncoderLayer")(
    EncoderLayerDropoutHardCoded)


class DecoderLayerEpsNotForwarded(DecoderLayer):
    def __init__(self, *, d_model: int, norm: str = "layer", bias: bool = True, **kwargs) -> None:
        super().__init__(d_model=d_model, norm=norm, bias=bias, **kwargs)
        for name in ("self_attn_norm", "cross_attn_norm", "ff_norm"):  # the norms' own default eps
            if getattr(self, name) is not None:
                setattr(self, name, LayerNorm(d_model=d_model, bias=bias) if norm == "layer" else RMSNorm(d_model=d_model))


mutant(name="DecoderLayer_eps_not_forwarded", bug="eps is accepted but the norms are built with their default eps",
       caught_by=[REFERENCE, TORCH], provides="DecoderLayer")(DecoderLayerEpsNotForwarded)


class DecoderLayerFeedForwardKeepsBias(DecoderLayer):
    def __init__(self, *, d_model: int, d_ff: int, activation: str = "relu", **kwargs) -> None:
        super().__init__(d_model=d_model, d_ff=d_ff, activation=activation, **kwargs)
        self.ff = make_feed_forward(d_model=d_model, d_ff=d_ff, activation=activation)  # bias=False not passed


mutant(name="DecoderLayer_feed_forward_keeps_bias",
       bug="bias=False reaches the attention and norms but not the feed-forward, which keeps its biases",
       caught_by=[REFERENCE, TORCH], provides="DecoderLayer")(DecoderLayerFeedForwardKeepsBias)


class _BatchNormOverFeatures(nn.BatchNorm1d):
    """BatchNorm1d on (b, s, d): normalises each feature over the batch and positions."""

    def forward(self, x):
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class EncoderLayerWithBatchNorm(EncoderLayer):
    """BatchNorm in place of LayerNorm (the CNN habit): batch statistics in training, running ones in eval."""

    def __init__(self, *, d_model: int, eps: float = 1e-5, **kwargs) -> None:
        super().__init__(d_model=d_model, eps=eps, **kwargs)
        self.self_attn_norm = _BatchNormOverFeatures(d_model, eps=eps)
        self.ff_norm = _BatchNormOverFeatures(d_model, eps=eps)

    def forward(self, x, *, mask=None):
        return super().forward(x, mask=mask)


mutant(name="EncoderLayer_batch_norm", bug="BatchNorm1d over the features instead of LayerNorm",
       caught_by=[REFERENCE, "test_layer_train_mode_equals_eval_mode_without_dropout"],
       provides="EncoderLayer")(EncoderLayerWithBatchNorm)
