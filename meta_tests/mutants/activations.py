"""Mutants of gelu and softmax: the activation bugs learners write, each one branch of one function."""

from __future__ import annotations

import math

import torch

from meta_tests.catalog import mutant


class _GeluWithoutXPhiTerm(torch.autograd.Function):
    """Exact gelu with a hand-written backward that returns Phi(x) only, forgetting x * phi(x)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def buggy_gelu(bug: str):
    def gelu(x, *, approximate="none"):
        tanh_form = approximate == "tanh" or bug == "tanh_for_exact"
        if tanh_form:
            scale = 1.0 if bug == "tanh_missing_sqrt_2_over_pi" else math.sqrt(2.0 / math.pi)
            return 0.5 * x * (1.0 + torch.tanh(scale * (x + 0.044715 * x.pow(3))))
        if bug == "backward_missing_x_phi":
            return _GeluWithoutXPhiTerm.apply(x)
        half = 1.0 if bug == "missing_half" else 0.5
        inner = x if bug == "erf_without_sqrt2" else x / math.sqrt(2.0)
        return half * x * (1.0 + torch.erf(inner))

    return gelu


def buggy_softmax(bug: str):
    def softmax(x, *, dim=-1, mask=None):
        if bug == "ignores_dim":
            dim = -1
        keep = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.expand_as(x)
        if bug == "inverted_mask":
            keep = ~keep
        any_kept = keep.any(dim=dim, keepdim=True)
        if bug == "mask_after_normalising":
            weights = torch.softmax(x - x.amax(dim=dim, keepdim=True), dim=dim)
            return weights * keep
        scores = x.masked_fill(~keep, float("-inf"))
        if bug != "nan_on_fully_masked_rows":
            scores = scores.masked_fill(~any_kept, 0.0)
        if bug != "no_max_subtraction":
            scores = scores - scores.amax(dim=dim, keepdim=True)
        unnormalised = scores.exp()
        total = unnormalised.sum(dim=dim, keepdim=True)
        if bug == "detached_normaliser":
            total = total.detach()
        weights = unnormalised / total
        return weights if bug == "nan_on_fully_masked_rows" else weights.masked_fill(~any_kept, 0.0)

    return softmax


GELU_CATALOG = {
    "tanh_for_exact": ("the tanh approximation where the exact (erf) form is specified",
                       ["test_exact_gelu_is_not_the_tanh_approximation", "test_gelu_agrees_with_reference",
                        "test_gelu_agrees_with_torch_gelu"]),
    "missing_half": ("x * (1 + erf(x / sqrt(2))) without the factor 1/2",
                     ["test_gelu_minus_its_mirror_is_the_identity", "test_gelu_agrees_with_reference"]),
    "erf_without_sqrt2": ("erf(x) instead of erf(x / sqrt(2))", ["test_gelu_agrees_with_reference"]),
    "tanh_missing_sqrt_2_over_pi": ("tanh form without the sqrt(2/pi) factor",
                                    ["test_tanh_gelu_stays_within_its_bound_of_exact_gelu",
                                     "test_gelu_agrees_with_torch_gelu"]),
    "backward_missing_x_phi": ("hand-written backward returns Phi(x), missing the x * phi(x) term",
                               ["test_gelu_passes_gradcheck"]),
}

SOFTMAX_CATALOG = {
    "no_max_subtraction": ("exp(x) / sum exp(x) without subtracting the row maximum",
                           ["test_softmax_stays_finite_for_large_inputs", "test_softmax_is_invariant_to_shifting_each_row"]),
    "inverted_mask": ("mask read as True = masked out", ["test_softmax_masked_entries_are_exactly_zero"]),
    "nan_on_fully_masked_rows": ("softmax over a row of -inf: NaN for a fully masked row",
                                 ["test_softmax_fully_masked_rows_are_zero"]),
    "ignores_dim": ("always normalises the last axis, whatever dim says",
                    ["test_softmax_rows_sum_to_one", "test_softmax_is_invariant_to_shifting_each_row",
                     "test_softmax_agrees_with_torch_softmax"]),
    "mask_after_normalising": ("softmax over every entry, then masked entries zeroed: kept ones no longer sum to 1",
                               ["test_softmax_rows_sum_to_one", "test_softmax_agrees_with_reference"]),
    "detached_normaliser": ("the row sum is detached: the gradient loses the normaliser's term",
                            ["test_softmax_passes_gradcheck"]),
}

for _bug, (_why, _props) in GELU_CATALOG.items():
    mutant(name=f"gelu_{_bug}", bug=_why, caught_by=_props, provides="gelu")(buggy_gelu(_bug))
for _bug, (_why, _props) in SOFTMAX_CATALOG.items():
    mutant(name=f"softmax_{_bug}", bug=_why, caught_by=_props, provides="softmax")(buggy_softmax(_bug))
