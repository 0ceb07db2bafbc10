"""Task losses in PyTorch. Spec: spec/tasks.py."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["next_token_loss", "classification_loss", "regression_loss"]


def _cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """CE per row: logits (..., n), labels (...) long -> (...); logsumexp subtracts the row maximum."""
    picked = logits.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    return torch.logsumexp(logits, dim=-1) - picked


def next_token_loss(logits: Tensor, tokens: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Mean cross-entropy of logits[:, t] predicting tokens[:, t + 1], over real targets (mask[:, t + 1])."""
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(f"logits must be (b, s, n) and tokens (b, s); got {tuple(logits.shape)}, {tuple(tokens.shape)}")
    per_target = _cross_entropy(logits[:, :-1], tokens[:, 1:])  # (b, s - 1): position t predicts t + 1
    if mask is None:
        return per_target.mean()
    real = mask[:, 1:].to(torch.bool)
    count = real.sum()
    if int(count) == 0:
        raise ValueError("next_token_loss needs at least one real target position (mask[:, 1:] is all False)")
    # where, not multiply: a padded position's loss gets weight exactly 0, even if it is inf.
    return torch.where(real, per_target, torch.zeros_like(per_target)).sum() / count.to(per_target.dtype)


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of logits (b, c) against labels (b,)."""
    return _cross_entropy(logits, labels).mean()


def regression_loss(predictions: Tensor, targets: Tensor) -> Tensor:
    """Mean squared error over every entry of (b, c)."""
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} differ in shape")
    return (predictions - targets).pow(2).mean()
