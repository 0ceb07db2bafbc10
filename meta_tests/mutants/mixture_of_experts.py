"""Mutants of the mixture-of-experts family: the routing, dispatch, capacity and auxiliary-loss bugs that
MoE code ships with. ``buggy_route``, ``buggy_kept_slots`` and ``buggy_forward`` are our correct bodies
with one branch per bug, so each mutant reads as a near miss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from implementations.mixture_of_experts import MixtureOfExperts, Router, top_k_choice
from meta_tests.catalog import mutant

AGREES_ROUTER = "test_router_agrees_with_reference"
AGREES_MOE = "test_moe_agrees_with_dense_reference"


def buggy_route(bug: str):
    """route_logits with one bug; logits (..., m) -> (weights (..., k), choice (..., k))."""

    def route(logits, *, top_k, normalize_top_k=True, router_order="softmax_then_topk"):
        z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        if bug == "ties_to_higher_index":
            choice = torch.argsort(z, dim=-1)[..., -top_k:].flip(-1)  # numpy habit: ascending, take the last k
        else:
            choice = top_k_choice(z, top_k)
        if bug == "top1_renormalized" and normalize_top_k:
            return torch.softmax(z.gather(-1, choice), dim=-1), choice  # k = 1: the weight is exactly 1
        probs = torch.softmax(z, dim=-2 if bug == "softmax_over_tokens" else -1)
        weights = probs.gather(-1, choice)
        if normalize_top_k and top_k > 1 and bug != "not_renormalized":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if bug == "weights_detached":
            weights = weights.detach()
        return weights, choice

    return route


def buggy_router(bug: str):
    class BuggyRouter(Router):
        def route(self, x):
            return buggy_route(bug)(self.logits(x), top_k=self.top_k, normalize_top_k=self.normalize_top_k)

    return BuggyRouter


def buggy_kept_slots(bug: str):
    def kept_slots(self, choice, batch: int = 1):
        limit = self.capacity(choice.shape[0])
        if limit is None:
            return torch.ones_like(choice, dtype=torch.bool)
        if bug == "capacity_token_major":
            queue = choice.reshape(-1)  # all of token 0's choices, then token 1's, ...
        elif bug == "capacity_keeps_last_tokens":
            queue = choice.flip(0).t().reshape(-1)  # serves the last token first
        else:
            queue = choice.t().reshape(-1)
        sent = F.one_hot(queue, self.n_experts)
        if bug == "capacity_per_sequence":  # place counted along each sequence: every batch element gets a full capacity
            per_seq = sent.reshape(self.top_k, batch, -1, self.n_experts).transpose(0, 1)  # (b, k, s, m)
            per_seq = per_seq.reshape(batch, -1, self.n_experts)  # each sequence's slots, rank-major
            place = (per_seq.cumsum(1) * per_seq).sum(-1) - 1  # (b, k*s)
            place = place.reshape(batch, self.top_k, -1).transpose(0, 1).reshape(-1)
        else:
            place = (sent.cumsum(0) * sent).sum(-1) - 1
        if bug == "capacity_token_major":
            return (place < limit).reshape(-1, self.top_k)
        keep = (place < limit).reshape(self.top_k, -1).t()
        return keep.flip(0) if bug == "capacity_keeps_last_tokens" else keep

    return kept_slots


def buggy_forward(bug: str):
    route = buggy_route(bug)
    kept_slots = buggy_kept_slots(bug)

    def forward(self, x):
        b, s, d = x.shape
        tokens = x.reshape(b * s, d)
        router = self.router
        weights, choice = route(router.logits(tokens), top_k=router.top_k, normalize_top_k=router.normalize_top_k)
        keep = kept_slots(self, choice, batch=b)
        slots, outputs = [], []
        for i, expert in enumerate(self.experts):
            token, rank = torch.nonzero((choice == i) & keep, as_tuple=True)
            if token.numel():
                slots.append(token * self.top_k + rank)
                y = expert(tokens[token])
                if bug == "ffn_expert_gelu" and expert.kind == "ffn":
                    y = expert.down(F.gelu(expert.up(tokens[token])))
                outputs.append(y)
        if bug == "dropped_tokens_pass_through":  # HF Switch: next_states = hidden_states.clone() before dispatch
            buffer = tokens.repeat_interleave(self.top_k, dim=0)
        else:
            buffer = tokens.new_zeros(b * s * self.top_k, d)
        if slots:
            if bug == "expert_outputs_written_through_data":
                buffer.data[torch.cat(slots)] = torch.cat(outputs).data
            else:
                buffer = buffer.index_put((torch.cat(slots),), torch.cat(outputs))
        if bug == "weights_of_the_wrong_token":  # flattened rank-major, read back token-major
            weights = weights.t().reshape(-1).reshape(b * s, self.top_k)
        if bug == "outputs_not_weighted":
            weights = torch.ones_like(weights)
        out = (weights.to(x.dtype)[..., None] * buffer.reshape(b * s, self.top_k, d)).sum(1)
        for shared in self.shared_experts:
            y = shared(tokens)
            if bug == "shared_experts_gated":  # Qwen2-MoE's sigmoid gate, where the spec adds them ungated
                y = torch.sigmoid(self.shared_gate(tokens)) * y
            out = out + y
        return out.reshape(b, s, d)

    return forward


def buggy_moe(bug: str):
    class BuggyMixtureOfExperts(MixtureOfExperts):
        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            if bug == "shared_experts_gated":
                self.shared_gate = nn.Linear(kwargs["d_model"], 1, bias=False)

        forward = buggy_forward(bug)

    return BuggyMixtureOfExperts


ROUTER_CATALOG = {
    "not_renormalized": ("top-k of the softmax kept without renormalizing where the spec renormalizes",
                         [AGREES_ROUTER, "test_renormalized_router_orders_are_one_map"]),
    "ties_to_higher_index": ("top-k by ascending argsort's last k: equal logits go to the higher expert index",
                             ["test_router_ties_go_to_the_lower_expert_index"]),
    "softmax_over_tokens": ("the gate softmax runs over the positions axis instead of the experts axis",
                            [AGREES_ROUTER]),
}
MOE_CATALOG = {
    "not_renormalized": ("the k chosen weights are not renormalized where the spec renormalizes",
                         [AGREES_MOE, "test_moe_with_identical_experts_equals_one_expert"]),
    "outputs_not_weighted": ("the chosen experts' outputs are summed without their routing weights",
                             [AGREES_MOE, "test_moe_with_identical_experts_equals_one_expert",
                              "test_moe_with_every_expert_selected_is_the_dense_softmax_mixture"]),
    "weights_of_the_wrong_token": ("weights flattened rank-major but read token-major: slots get another token's weight",
                                   [AGREES_MOE, "test_moe_without_capacity_is_position_wise",
                                    "test_moe_without_capacity_is_equivariant_to_permuting_tokens"]),
    "softmax_over_tokens": ("the gate softmax runs over the tokens axis instead of the experts axis",
                            [AGREES_MOE, "test_moe_without_capacity_is_position_wise"]),
    "capacity_keeps_last_tokens": ("a full expert keeps the last tokens and drops the first ones",
                                   [AGREES_MOE, "test_capacity_drops_exactly_the_pinned_slots",
                                    "test_a_token_dropped_by_every_choice_outputs_zero"]),
    "capacity_token_major": ("slots served token by token (a token's second choice before the next token's first)",
                             ["test_capacity_drops_exactly_the_pinned_slots"]),
    "capacity_per_sequence": ("the place in an expert's queue is counted per sequence: each batch element gets a "
                              "full capacity", ["test_no_expert_receives_more_than_its_capacity",
                                                "test_capacity_drops_exactly_the_pinned_slots"]),
    "dropped_tokens_pass_through": ("a dropped slot keeps the token's input (HF Switch's cloned hidden states)",
                                    [AGREES_MOE, "test_a_token_dropped_by_every_choice_outputs_zero",
                                     "test_capacity_drops_exactly_the_pinned_slots"]),
    "shared_experts_gated": ("shared experts' output gated by a sigmoid (Qwen2-MoE) where the spec adds it as is",
                             ["test_shared_experts_add_the_same_ffn_output_to_every_token"]),
    "expert_outputs_written_through_data": ("expert outputs written into the combine buffer through .data: no "
                                            "gradient reaches the experts",
                                            ["test_only_the_selected_experts_get_gradients"]),
    "weights_detached": ("routing weights detached: the router never learns from the output",
                         ["test_router_gets_a_finite_nonzero_gradient_even_at_top_1",
                          "test_moe_routing_specializes_by_token_type"]),
    "top1_renormalized": ("softmax after top-k also at top_k = 1: the weight is 1 and the router gets no gradient",
                          ["test_router_gets_a_finite_nonzero_gradient_even_at_top_1", AGREES_MOE]),
    "ffn_expert_gelu": ("expert='ffn' uses gelu where the spec's Switch FFN uses relu", [AGREES_MOE]),
}

for _bug, (_why, _props) in ROUTER_CATALOG.items():
    mutant(name=f"Router_{_bug}", bug=_why, caught_by=_props, provides="Router")(buggy_router(_bug))
for _bug, (_why, _props) in MOE_CATALOG.items():
    mutant(name=f"MixtureOfExperts_{_bug}", bug=_why, caught_by=_props, provides="MixtureOfExperts")(buggy_moe(_bug))


# --------------------------------------------------------------------------------------------------------
# The auxiliary losses


def buggy_load_balancing_loss(bug: str):
    def load_balancing_loss(router_logits, *, top_k, alpha=0.01, mask=None):
        z = router_logits.reshape(-1, router_logits.shape[-1])
        if mask is not None and bug != "padding_counted":
            keep = ~mask.reshape(-1) if bug == "mask_polarity_inverted" else mask.reshape(-1)
            z = z[keep]
        if bug == "double_softmax":  # the router already returned probabilities, and the loss softmaxes again
            z = torch.softmax(z, dim=-1)
        n_tokens, m = z.shape
        choice = top_k_choice(z, top_k)
        counts = F.one_hot(choice, m).sum(dim=(0, 1)).to(z.dtype)
        f = counts / n_tokens if bug == "f_not_divided_by_top_k" else counts / (n_tokens * top_k)
        if bug == "P_from_top_k_weights":
            chosen = torch.softmax(z, dim=-1).gather(-1, choice)
            gates = torch.zeros_like(z).scatter(-1, choice, chosen / chosen.sum(-1, keepdim=True))
            P = gates.mean(dim=0)
        elif bug == "P_without_gradient":
            with torch.no_grad():
                P = torch.softmax(z, dim=-1).mean(dim=0)
        else:
            P = torch.softmax(z, dim=-1).mean(dim=0)
        return alpha * m * (f * P).sum()

    load_balancing_loss.__name__ = "load_balancing_loss"
    return load_balancing_loss


def buggy_router_z_loss(bug: str):
    def router_z_loss(router_logits, *, mask=None):
        z = router_logits.reshape(-1, router_logits.shape[-1])
        if mask is not None and bug != "padding_counted":
            z = z[mask.reshape(-1)]
        lse = z.max(dim=-1).values if bug == "max_logit" else torch.logsumexp(z, dim=-1)
        return lse.mean() if bug == "not_squared" else (lse ** 2).mean()

    router_z_loss.__name__ = "router_z_loss"
    return router_z_loss


LOSS_CATALOG = {
    "f_not_divided_by_top_k": ("f_i = counts / tokens sums to top_k, not 1 (HF PR #43775)",
                               ["test_load_balancing_loss_agrees_with_reference",
                                "test_load_balancing_loss_is_alpha_at_uniform_routing"]),
    "double_softmax": ("softmax applied to already-softmaxed router outputs (HF issue #45120)",
                       ["test_load_balancing_loss_agrees_with_reference",
                        "test_load_balancing_loss_applies_softmax_once_to_raw_logits"]),
    "padding_counted": ("the padding mask is ignored: padding tokens count in f, P and T",
                        ["test_load_balancing_loss_agrees_with_reference", "test_router_losses_ignore_padding_tokens"]),
    "mask_polarity_inverted": ("the mask is read as True = padding",
                               ["test_router_losses_ignore_padding_tokens"]),
    "P_from_top_k_weights": ("P_i averages the renormalized top-k gates instead of the full softmax",
                             ["test_load_balancing_loss_agrees_with_reference",
                              "test_load_balancing_loss_gradient_pushes_routing_toward_balance"]),
    "P_without_gradient": ("P computed under torch.no_grad(): the loss has the right value and no gradient",
                           ["test_load_balancing_loss_gradient_pushes_routing_toward_balance"]),
}
Z_LOSS_CATALOG = {
    "not_squared": ("the mean log-sum-exp, not squared", ["test_router_z_loss_agrees_with_reference"]),
    "max_logit": ("the largest logit instead of the log-sum-exp", ["test_router_z_loss_agrees_with_reference"]),
    "padding_counted": ("the padding mask is ignored", ["test_router_losses_ignore_padding_tokens"]),
}

for _bug, (_why, _props) in LOSS_CATALOG.items():
    mutant(name=f"load_balancing_loss_{_bug}", bug=_why, caught_by=_props,
           provides="load_balancing_loss")(buggy_load_balancing_loss(_bug))
for _bug, (_why, _props) in Z_LOSS_CATALOG.items():
    mutant(name=f"router_z_loss_{_bug}", bug=_why, caught_by=_props, provides="router_z_loss")(buggy_router_z_loss(_bug))
