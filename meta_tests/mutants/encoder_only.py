"""Mutants of the encoder-only model (BERT-like classifier / regressor)."""

from __future__ import annotations

import numpy as np
import torch

from implementations.encoder_only import EncoderOnlyModel
from meta_tests.catalog import mutant


@mutant(name="EncoderOnlyModel_pools_padding_too", bug="pooling averages all s positions, padding included",
        provides="EncoderOnlyModel",
        caught_by=["test_encoder_only_model_agrees_with_reference",
                   "test_encoder_only_padding_content_does_not_change_the_output",
                   "test_encoder_only_padding_amount_does_not_change_the_output",
                   "test_encoder_only_padded_batch_gives_each_sequence_its_own_output",
                   "test_encoder_only_position_rows_used_only_by_padding_get_zero_gradient"])
class EncoderOnlyModel_PoolsPadding(EncoderOnlyModel):
    def pool(self, x, mask):
        return x.mean(dim=1)


@mutant(name="EncoderOnlyModel_pools_first_token", bug="pooling takes the first token ([CLS]) when the spec says mean",
        provides="EncoderOnlyModel", caught_by=["test_encoder_only_model_agrees_with_reference"])
class EncoderOnlyModel_FirstToken(EncoderOnlyModel):
    def pool(self, x, mask):
        return x[:, 0]


@mutant(name="EncoderOnlyModel_layers_ignore_padding", bug="the padding mask reaches the pooling but not the attention",
        provides="EncoderOnlyModel",
        caught_by=["test_encoder_only_padding_content_does_not_change_the_output",
                   "test_encoder_only_padded_batch_gives_each_sequence_its_own_output",
                   "test_encoder_only_position_rows_used_only_by_padding_get_zero_gradient"])
class EncoderOnlyModel_LayersIgnorePadding(EncoderOnlyModel):
    def key_mask(self, mask):
        return None


@mutant(name="EncoderOnlyModel_no_positions", bug="the learned positions are never added",
        provides="EncoderOnlyModel",
        caught_by=["test_encoder_only_output_depends_on_token_order", "test_encoder_only_model_agrees_with_reference",
                   "test_encoder_only_classifier_learns_token_order"])
class EncoderOnlyModel_NoPositions(EncoderOnlyModel):
    def embed_tokens(self, tokens):
        return self.dropout(self.embed(tokens))


@mutant(name="EncoderOnlyModel_final_norm_not_applied", bug="pre-norm builds final_norm but never applies it",
        provides="EncoderOnlyModel",
        caught_by=["test_every_encoder_only_parameter_gets_a_finite_gradient",
                   "test_encoder_only_model_agrees_with_reference"])
class EncoderOnlyModel_FinalNormUnused(EncoderOnlyModel):
    def forward(self, tokens, *, mask=None):
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, mask=self.key_mask(mask))
        return self.head(self.pool(x, mask))  # self.final_norm forgotten


@mutant(name="EncoderOnlyModel_returns_probabilities", bug="forward applies softmax: probabilities, not logits or values",
        provides="EncoderOnlyModel",
        caught_by=["test_encoder_only_model_agrees_with_reference",
                   "test_encoder_only_regressor_learns_the_mean_token_value"])
class EncoderOnlyModel_Softmax(EncoderOnlyModel):
    def forward(self, tokens, *, mask=None):
        return torch.softmax(super().forward(tokens, mask=mask), dim=-1)


class NumpyDropout(torch.nn.Module):
    """Inverted dropout whose masks come from numpy's global generator, which torch.manual_seed never seeds."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = torch.from_numpy(np.random.rand(*x.shape) >= self.p).to(x.device)
        return x * keep / (1 - self.p)


@mutant(name="EncoderOnlyModel_dropout_from_numpy", bug="embedding dropout draws its masks from numpy's unseeded RNG",
        provides="EncoderOnlyModel", caught_by=["test_training_under_a_seed_is_deterministic"])
class EncoderOnlyModel_NumpyDropout(EncoderOnlyModel):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dropout = NumpyDropout(kwargs.get("dropout", 0.0))
