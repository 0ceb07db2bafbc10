"""Direct preference optimization written the way a TRL-style trainer writes it, and plugged into the suite:

    pytest -n 2 -q --impl examples/dpo_trainer_style.py

A trainer does not think in response masks: it builds ``labels`` with the prompt and the padding set to
``-100`` (the ignore index every Hugging Face loss uses), scores ``labels[:, 1:]`` with
``logits[:, :-1].log_softmax(-1)`` and a ``gather``, and keeps (sum, count) per row so that each loss type
can normalise as it likes. ``sequence_logprobs`` is the spec's entry point around that helper: it turns the
spec's ``response_mask`` into ``-100`` labels and returns the sum.

It is correct in its own configuration, which is narrower than the spec's option space:

* ``sequence_logprobs`` returns the summed log-probability only (as the sigmoid DPO loss uses it); it has
  no ``average_log_prob`` keyword: the mean per token is left to the caller (IPO-style losses divide the
  sum by the count that ``batch_logps`` also returns), so it declares ``average_log_prob=False``;
* ``dpo_loss`` takes TRL's argument order, ``beta`` and ``label_smoothing`` (conservative DPO), and returns
  ``(losses.mean(), chosen_rewards, rejected_rewards)`` with the rewards detached, all as the spec says.

Two things a trainer gets for free and a plug-in loss must do itself: the reference log-probabilities are
detached inside ``dpo_loss`` (a trainer computes them under ``torch.no_grad()``; the spec requires the loss
to be safe when they were not), and the margin goes through ``F.logsigmoid``, never ``log(sigmoid(x))``,
which is -inf for a summed log-probability margin of a few hundred.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LABEL_PAD_TOKEN_ID = -100  # the ignore index of Hugging Face losses: "do not score this token"


def batch_logps(logits: Tensor, labels: Tensor, label_pad_token_id: int = LABEL_PAD_TOKEN_ID) -> tuple[Tensor, Tensor]:
    """(sum of the log-probabilities of the labels that are not ``label_pad_token_id``, their count), per row.

    logits (b, s, n) come from a causal LM run on the same (b, s) sequence: position t predicts token t + 1,
    so labels are shifted left by one and the last position's logits score nothing.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must share (b, s)")
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    loss_mask = labels != label_pad_token_id
    labels[~loss_mask] = 0  # any valid index: gather must not see -100, and these terms are zeroed below
    per_token_logps = torch.gather(logits.log_softmax(-1), dim=2, index=labels.unsqueeze(2)).squeeze(2)
    return (per_token_logps * loss_mask).sum(-1), loss_mask.sum(-1)


def sequence_logprobs(logits: Tensor, tokens: Tensor, response_mask: Tensor) -> Tensor:
    """log pi(response | prompt) per row: the summed log-probability of the tokens response_mask marks."""
    labels = tokens.masked_fill(~response_mask.bool(), LABEL_PAD_TOKEN_ID)
    logps, _ = batch_logps(logits, labels)
    return logps


# The sum only: no average_log_prob keyword (the count comes from batch_logps for a loss that wants the mean).
sequence_logprobs.spec_options = {"average_log_prob": False}


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """The sigmoid (conservative, with label_smoothing) DPO loss over a batch of preference pairs.

    Returns (mean loss, chosen_rewards, rejected_rewards); the rewards beta * (policy - reference) are for
    logging and carry no gradient.
    """
    # The reference model is frozen: make sure no gradient flows into it, however the caller ran it.
    reference_chosen_logps = reference_chosen_logps.detach()
    reference_rejected_logps = reference_rejected_logps.detach()

    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    logits = pi_logratios - ref_logratios  # the margin h of the implicit rewards, over beta

    # With probability label_smoothing the preference label is flipped (cDPO): mix both directions.
    losses = (
        -F.logsigmoid(beta * logits) * (1 - label_smoothing)
        - F.logsigmoid(-beta * logits) * label_smoothing
    )
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses.mean(), chosen_rewards, rejected_rewards
