"""Mutants of the task losses: the label shift, padding, and reductions."""

from __future__ import annotations

import torch

from implementations.tasks import _cross_entropy
from meta_tests.catalog import mutant

AGREES = "test_next_token_loss_agrees_with_reference"
SHIFT = "test_next_token_loss_uses_the_pinned_shift"


def _masked_mean(per_target, real):
    if real is None:
        return per_target.mean()
    return torch.where(real, per_target, torch.zeros_like(per_target)).sum() / real.sum()


@mutant(name="next_token_loss_shift_reversed", bug="logits[:, 1:] predict tokens[:, :-1] (the shift backwards)",
        provides="next_token_loss", caught_by=[AGREES, SHIFT])
def next_token_loss_shift_reversed(logits, tokens, *, mask=None):
    return _masked_mean(_cross_entropy(logits[:, 1:], tokens[:, :-1]), None if mask is None else mask[:, :-1])


@mutant(name="next_token_loss_no_shift", bug="logits[:, t] are scored against tokens[:, t] (no shift)",
        provides="next_token_loss", caught_by=[AGREES, SHIFT])
def next_token_loss_no_shift(logits, tokens, *, mask=None):
    return _masked_mean(_cross_entropy(logits, tokens), mask)


@mutant(name="next_token_loss_counts_padding", bug="the mask is ignored: padded targets enter the loss",
        provides="next_token_loss", caught_by=["test_next_token_loss_ignores_padded_targets", AGREES])
def next_token_loss_counts_padding(logits, tokens, *, mask=None):
    return _cross_entropy(logits[:, :-1], tokens[:, 1:]).mean()


@mutant(name="next_token_loss_divides_by_all_positions",
        bug="padded targets are zeroed but the mean divides by every position", provides="next_token_loss",
        caught_by=[AGREES])
def next_token_loss_divides_by_all_positions(logits, tokens, *, mask=None):
    per_target = _cross_entropy(logits[:, :-1], tokens[:, 1:])
    if mask is None:
        return per_target.mean()
    return torch.where(mask[:, 1:], per_target, torch.zeros_like(per_target)).mean()


@mutant(name="classification_loss_softmax_over_batch", bug="log-softmax taken over the batch axis, not the classes",
        provides="classification_loss", caught_by=["test_classification_loss_agrees_with_reference"])
def classification_loss_softmax_over_batch(logits, labels):
    logp = torch.log_softmax(logits, dim=0)
    return -logp.gather(-1, labels[:, None]).mean()


@mutant(name="regression_loss_sums_outputs", bug="squared errors summed over outputs, averaged over the batch only",
        provides="regression_loss", caught_by=["test_regression_loss_agrees_with_reference"])
def regression_loss_sums_outputs(predictions, targets):
    return (predictions - targets).pow(2).sum(dim=-1).mean()
