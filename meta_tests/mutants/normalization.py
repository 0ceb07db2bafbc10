"""Mutants of LayerNorm and RMSNorm: the normalisation bugs learners write, each one branch of one class.

Each factory returns a module class with the spec's constructor and canonical parameters, so the suite
builds and loads it like any implementation; the ``bug`` switch is the only difference from correct math.
"""

from __future__ import annotations

import torch
from torch import nn

from meta_tests.catalog import mutant

HALF = (torch.float16, torch.bfloat16)


def buggy_layer_norm(bug: str):
    class LayerNorm(nn.Module):
        def __init__(self, *, d_model: int, eps: float = 1e-5, bias: bool = True) -> None:
            super().__init__()
            self.eps = eps
            self.weight = nn.Parameter(torch.ones(d_model), requires_grad=bug != "frozen_weight")
            self.bias = nn.Parameter(torch.zeros(d_model)) if bias else None

        def forward(self, x):
            upcast = x.dtype in HALF and bug != "computed_in_half"
            h = x.float() if upcast else x
            axis = -2 if bug == "normalised_over_positions" else -1
            centred = h - h.mean(dim=axis, keepdim=True)
            if bug == "unbiased_variance":
                var = centred.pow(2).sum(dim=axis, keepdim=True) / (h.shape[axis] - 1)  # torch.var's default
            elif bug == "uncentred_variance":
                var = h.pow(2).mean(dim=axis, keepdim=True)
            else:
                var = centred.pow(2).mean(dim=axis, keepdim=True)
            eps = 0.0 if bug == "no_eps" else self.eps
            if bug == "eps_outside_sqrt":
                normed = centred / (var.sqrt() + eps)
            elif bug == "divides_by_variance":
                normed = centred / (var + eps)
            elif bug == "detached_std":
                normed = centred * torch.rsqrt(var + eps).detach()
            else:
                normed = centred * torch.rsqrt(var + eps)
            if bug == "affine_only_with_bias":  # `if self.bias is not None:` guarding the whole affine
                out = normed if self.bias is None else normed * self.weight.to(h.dtype) + self.bias.to(h.dtype)
                return out.to(x.dtype)
            out = normed * self.weight.to(h.dtype)
            if bug != "no_bias" and self.bias is not None:
                out = out + self.bias.to(h.dtype)
            return out.to(x.dtype)

    return LayerNorm


def buggy_rms_norm(bug: str):
    class RMSNorm(nn.Module):
        def __init__(self, *, d_model: int, eps: float = 1e-6) -> None:
            super().__init__()
            self.eps = eps
            self.weight = nn.Parameter(torch.ones(d_model))

        def forward(self, x):
            upcast = x.dtype in HALF and bug != "computed_in_half"
            h = x.float() if upcast else x
            if bug == "subtracts_mean":
                h = h - h.mean(dim=-1, keepdim=True)
            if bug == "l2_norm_not_rms":
                ms = h.pow(2).sum(dim=-1, keepdim=True)
            else:
                ms = h.pow(2).mean(dim=-1, keepdim=True)
            eps = 0.0 if bug == "no_eps" else self.eps
            if bug == "no_sqrt":
                normed = h / (ms + eps)
            elif bug == "detached_rms":
                normed = h * torch.rsqrt(ms + eps).detach()
            else:
                normed = h * torch.rsqrt(ms + eps)
            weight = self.weight.to(h.dtype)
            out = normed + weight if bug == "weight_added" else normed * weight
            return out.to(x.dtype)

    return RMSNorm


LAYER_NORM_CATALOG = {
    "eps_outside_sqrt": ("eps added outside the square root: (x - mean) / (sqrt(var) + eps)",
                         ["test_norm_agrees_with_reference", "test_norm_agrees_with_torch_norm"]),
    "unbiased_variance": ("unbiased variance (torch.var default, divide by d - 1)",
                          ["test_layer_norm_rows_have_mean_zero_and_unit_variance", "test_norm_agrees_with_torch_norm"]),
    "normalised_over_positions": ("mean and variance over the position axis (dim=-2) instead of features",
                                  ["test_norm_rows_are_independent", "test_norm_agrees_with_reference"]),
    "no_bias": ("the bias is never added",
                ["test_layer_norm_affine_acts_elementwise", "test_layer_norm_of_a_constant_row_is_the_bias"]),
    "uncentred_variance": ("variance taken as mean(x^2), without subtracting the mean",
                           ["test_layer_norm_is_invariant_to_shifting_each_row"]),
    "divides_by_variance": ("divides by var + eps, forgetting the square root",
                            ["test_norm_is_invariant_to_positive_rescaling"]),
    "no_eps": ("no eps: a constant row is 0 / 0 = NaN", ["test_layer_norm_of_a_constant_row_is_the_bias"]),
    "computed_in_half": ("statistics computed in float16: (x - mean)^2 overflows near 6e4",
                         ["test_norm_does_not_overflow_in_float16"]),
    "frozen_weight": ("weight created with requires_grad=False", ["test_norm_parameters_get_finite_nonzero_gradients"]),
    "detached_std": ("1 / sqrt(var + eps) detached (a stop-gradient shortcut)", ["test_norm_passes_gradcheck"]),
    "affine_only_with_bias": ("with bias=False the weight is skipped too (the affine sits under `if self.bias`)",
                              ["test_norm_agrees_with_reference", "test_layer_norm_affine_acts_elementwise"]),
}

RMS_NORM_CATALOG = {
    "subtracts_mean": ("subtracts the row mean first (LayerNorm without a bias)",
                       ["test_rms_norm_does_not_subtract_the_mean", "test_norm_agrees_with_torch_norm"]),
    "weight_added": ("the weight is added instead of multiplied",
                     ["test_rms_norm_is_odd", "test_rms_norm_of_the_zero_row_is_zero"]),
    "l2_norm_not_rms": ("divides by the L2 norm sqrt(sum x^2), not the RMS", ["test_rms_norm_output_has_unit_rms"]),
    "no_sqrt": ("divides by mean(x^2) + eps, forgetting the square root", ["test_norm_is_invariant_to_positive_rescaling"]),
    "no_eps": ("no eps: the zero row is 0 / 0 = NaN", ["test_rms_norm_of_the_zero_row_is_zero"]),
    "computed_in_half": ("mean(x^2) computed in float16: overflows to inf near 6e4 (output 0)",
                         ["test_norm_does_not_overflow_in_float16"]),
    "detached_rms": ("1 / sqrt(mean(x^2) + eps) detached", ["test_norm_passes_gradcheck"]),
}

for _bug, (_why, _props) in LAYER_NORM_CATALOG.items():
    mutant(name=f"layer_norm_{_bug}", bug=_why, caught_by=_props, provides="LayerNorm")(buggy_layer_norm(_bug))
for _bug, (_why, _props) in RMS_NORM_CATALOG.items():
    mutant(name=f"rms_norm_{_bug}", bug=_why, caught_by=_props, provides="RMSNorm")(buggy_rms_norm(_bug))
