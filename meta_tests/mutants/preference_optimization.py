"""Mutants of DPO: the sequence log-probability and loss bugs reported against preference trainers (labels
not shifted against logits, prompt or padding tokens summed in, the reference not detached, beta on one
side, a flipped margin, a mean where the sum is specified). ``buggy_sequence_logprobs`` and
``buggy_dpo_loss`` are our correct bodies with one branch per bug, so each mutant reads as a near miss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from implementations.tasks import _cross_entropy
from meta_tests.catalog import mutant

AGREES_LOGPS = "test_sequence_logprobs_agrees_with_reference"
SHIFT = "test_sequence_logprobs_uses_the_pinned_shift"
IGNORES = "test_sequence_logprobs_ignores_prompt_and_padding_tokens"
AGREES_DPO = "test_dpo_loss_agrees_with_reference"
LOG_2 = "test_dpo_loss_is_log_2_when_policy_equals_reference"
MARGIN_ONLY = "test_dpo_loss_depends_only_on_the_margin"
OPPOSITE = "test_dpo_loss_at_opposite_margins_differs_by_minus_beta_h"
SWAP = "test_swapping_chosen_and_rejected_negates_the_margin"
GRADIENT = "test_dpo_loss_gradient_raises_chosen_and_lowers_rejected"
NO_REF_GRADIENT = "test_dpo_loss_sends_no_gradient_to_the_reference"
REWARDS_DETACHED = "test_dpo_implicit_rewards_carry_no_gradient"
CONSERVATIVE = "test_conservative_dpo_interpolates_the_two_directions"
LEARNS = "test_dpo_training_raises_held_out_preference_accuracy"


def buggy_sequence_logprobs(bug: str):
    def sequence_logprobs(logits, tokens, response_mask, *, average_log_prob=False):
        if bug == "unshifted":
            scored, counted = -_cross_entropy(logits, tokens), response_mask  # logits[:, t] score tokens[:, t]
        elif bug == "rolled":
            # roll instead of slicing: logits[:, -1] wrap around to score token 0, and mask[:, 0] counts
            scored, counted = -_cross_entropy(logits.roll(1, dims=1), tokens), response_mask
        else:
            scored = -_cross_entropy(logits[:, :-1], tokens[:, 1:])
            counted = response_mask[:, :-1] if bug == "mask_on_logit_positions" else response_mask[:, 1:]
        if bug == "counts_prompt_and_padding":
            counted = torch.ones_like(counted)
        total = torch.where(counted, scored, torch.zeros_like(scored)).sum(dim=-1)
        if bug == "mean_over_all_positions" and average_log_prob:
            return total / scored.shape[-1]
        if average_log_prob or bug == "mean_not_sum":
            return total / counted.sum(dim=-1).to(total.dtype)
        return total

    return sequence_logprobs


def buggy_dpo_loss(bug: str):
    def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, label_smoothing=0.0):
        if bug == "arguments_in_pair_order":  # read as (pc, rc, pr, rr): the loss survives, the rewards do not
            policy_rejected, ref_chosen = ref_chosen, policy_rejected
        if bug != "reference_not_detached":
            ref_chosen, ref_rejected = ref_chosen.detach(), ref_rejected.detach()
        chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
        if bug == "ignores_reference":
            logits = beta * (policy_chosen - policy_rejected)
        elif bug == "beta_on_chosen_only":
            logits = beta * chosen_ratio - rejected_ratio
        else:
            logits = beta * (chosen_ratio - rejected_ratio)
        if bug == "margin_sign_flipped":
            logits = -logits
        eps = label_smoothing
        if bug == "log_of_sigmoid":
            losses = -(1 - eps) * torch.log(torch.sigmoid(logits)) - eps * torch.log(torch.sigmoid(-logits))
        elif bug == "smoothing_mixes_probabilities":
            losses = -torch.log((1 - eps) * torch.sigmoid(logits) + eps * torch.sigmoid(-logits))
        elif bug == "smoothing_scales_the_loss":
            losses = -(1 - eps) * F.logsigmoid(logits)
        else:
            losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
        loss = losses.sum() if bug == "sums_over_batch" else losses.mean()
        chosen, rejected = beta * chosen_ratio, beta * rejected_ratio
        if bug == "rejected_reward_sign":
            rejected = -rejected
        if bug == "rewards_not_detached":
            return loss, chosen, rejected
        return loss, chosen.detach(), rejected.detach()

    return dpo_loss


def _logps_mutant(bug: str, description: str, caught_by: list[str]) -> None:
    mutant(name=f"sequence_logprobs_{bug}", bug=description, provides="sequence_logprobs",
           caught_by=caught_by)(buggy_sequence_logprobs(bug))


def _dpo_mutant(bug: str, description: str, caught_by: list[str]) -> None:
    mutant(name=f"dpo_loss_{bug}", bug=description, provides="dpo_loss", caught_by=caught_by)(buggy_dpo_loss(bug))


_logps_mutant("unshifted", "logits[:, t] score tokens[:, t] (labels not shifted against logits)",
              [AGREES_LOGPS, SHIFT])
_logps_mutant("rolled", "logits.roll(1) instead of a slice: logits[:, -1] score token 0, and mask[:, 0] counts",
              [AGREES_LOGPS, IGNORES])
_logps_mutant("counts_prompt_and_padding", "the response mask is ignored: prompt and padding tokens are summed in",
              [AGREES_LOGPS, IGNORES])
_logps_mutant("mask_on_logit_positions", "the mask is applied to logits[:, :-1] by position (mask[:, :-1]): the "
              "last prompt token counts, the last response token does not", [AGREES_LOGPS, IGNORES])
_logps_mutant("mean_not_sum", "the mean per token where the sum is specified (average_log_prob=False)", [AGREES_LOGPS])
_logps_mutant("mean_over_all_positions", "average_log_prob divides by every position, padding and prompt included",
              [AGREES_LOGPS])

_dpo_mutant("reference_not_detached", "the reference log-probabilities are not detached: the reference gets "
            "gradients", [NO_REF_GRADIENT])
_dpo_mutant("beta_on_chosen_only", "beta * (pc - rc) - (pr - rr): beta applied to one side only",
            [AGREES_DPO, MARGIN_ONLY, OPPOSITE, GRADIENT])
_dpo_mutant("margin_sign_flipped", "-logsigmoid(-beta h): the sign of the margin flipped",
            [AGREES_DPO, OPPOSITE, SWAP, GRADIENT, LEARNS])
_dpo_mutant("ignores_reference", "h = pc - pr: the reference log-probabilities are never subtracted",
            [AGREES_DPO, LOG_2, MARGIN_ONLY])
_dpo_mutant("sums_over_batch", "the loss is summed over the batch, not averaged", [AGREES_DPO, LOG_2, GRADIENT])
_dpo_mutant("log_of_sigmoid", "log(sigmoid(x)) instead of logsigmoid: -inf for beta h below about -745",
            [AGREES_DPO])
_dpo_mutant("arguments_in_pair_order", "the arguments read as (pc, rc, pr, rr): h is unchanged, the rewards are "
            "wrong", [AGREES_DPO, LOG_2])
_dpo_mutant("rejected_reward_sign", "rejected_rewards = beta * (rr - pr): the rejected log-ratio's sign flipped",
            [AGREES_DPO, SWAP])
_dpo_mutant("rewards_not_detached", "the rewards are returned inside the autograd graph", [REWARDS_DETACHED])
_dpo_mutant("smoothing_mixes_probabilities", "conservative DPO mixes the probabilities, "
            "-log((1 - eps) sigmoid(beta h) + eps sigmoid(-beta h)), not the log-likelihoods",
            [AGREES_DPO, CONSERVATIVE])
_dpo_mutant("smoothing_scales_the_loss", "label_smoothing only scales the loss by 1 - eps (the flipped direction "
            "is missing)", [AGREES_DPO, CONSERVATIVE])
