"""Direct preference optimization in PyTorch. Spec: spec/preference_optimization.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from implementations.tasks import _cross_entropy

__all__ = ["sequence_logprobs", "dpo_loss"]


def sequence_logprobs(logits: Tensor, tokens: Tensor, response_mask: Tensor, *,
                      average_log_prob: bool = False) -> Tensor:
    """Sum (or mean per token) of the response tokens' log-probabilities, (b, s, n) -> (b,).

    Token t >= 1 is scored by logits[:, t - 1]; response_mask[:, 0] is never read (nothing scores token 0).
    """
    if logits.dim() != 3 or tokens.shape != logits.shape[:2] or response_mask.shape != tokens.shape:
        raise ValueError(f"logits must be (b, s, n), tokens and response_mask (b, s); got {tuple(logits.shape)}, "
                         f"{tuple(tokens.shape)}, {tuple(response_mask.shape)}")
    scored = -_cross_entropy(logits[:, :-1], tokens[:, 1:])  # (b, s - 1): log p(tokens[:, t + 1])
    counted = response_mask[:, 1:].to(torch.bool)
    # where, not multiply: an excluded token gets weight exactly 0 whatever its log-probability.
    total = torch.where(counted, scored, torch.zeros_like(scored)).sum(dim=-1)  # (b,)
    if not average_log_prob:
        return total
    count = counted.sum(dim=-1)
    if bool((count == 0).any()):
        raise ValueError("average_log_prob needs at least one counted response token per row "
                         f"(counts {count.tolist()}; response_mask[:, 0] is never counted)")
    return total / count.to(total.dtype)


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Mean conservative-DPO loss over the batch and the implicit rewards beta * log(pi / ref), detached."""
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if not 0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5], got {label_smoothing}")
    shapes = {tuple(t.shape) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"the four log-probabilities must be (b,) tensors of one shape, got {sorted(shapes)}")
    # The frozen reference never learns, even if its log-probabilities were computed with autograd on.
    chosen_ratio = policy_chosen - ref_chosen.detach()  # (b,) log pi(y_w) / ref(y_w)
    rejected_ratio = policy_rejected - ref_rejected.detach()
    logits = beta * (chosen_ratio - rejected_ratio)  # beta h
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
