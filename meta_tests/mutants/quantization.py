"""Mutants of weight-only int8 quantization: the scale, rounding, zero-point and storage bugs of hand-written
quantizers. ``buggy_quantize`` is our quantize_int8 with one branch per bug; the Int8Linear mutants change
one method of ours."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from implementations.quantization import QMAX, Int8Linear
from meta_tests.catalog import mutant

AGREES = "test_quantize_int8_agrees_with_reference"
HALF_STEP = "test_dequantization_is_within_half_a_step_of_the_weight"
ROW_MAX = "test_each_row_maximum_maps_to_plus_or_minus_127"
ZERO = "test_zero_stays_exactly_zero"
TIES = "test_quantize_int8_rounds_ties_to_even"
DTYPES = "test_quantize_int8_keeps_dtype_and_device"
BOUND = "test_int8_linear_error_is_within_the_derived_bound"
EXACT = "test_int8_linear_equals_the_float_layer_on_weights_int8_represents"
STORES = "test_int8_linear_stores_int8_weights"


def buggy_quantize(bug: str):
    def quantize(weight):
        w = weight.float() if bug == "scale_in_float32" else weight
        if bug == "per_tensor_scale":
            scale = w.abs().amax().expand(w.shape[0]) / QMAX  # one scale for every row
        elif bug == "per_input_channel":
            scale = w.abs().amax(dim=0) / QMAX  # (i,): the max of each column
        else:
            scale = w.abs().amax(dim=1) / (128 if bug == "scale_by_128" else QMAX)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        x = w / (safe[None, :] if bug == "per_input_channel" else safe[:, None])
        if bug == "truncates":
            q = x.trunc()
        elif bug == "ties_away_from_zero":
            q = torch.sign(x) * torch.floor(x.abs() + 0.5)
        elif bug == "zero_point":
            q = torch.round(x) + 3  # an asymmetric code's zero point left in: 0.0 -> 3
        else:
            q = torch.round(x)
        return q.clamp(-QMAX, QMAX).to(torch.int8), scale

    return quantize


for _bug, _what, _caught in [
    ("per_tensor_scale", "one scale (max over the whole tensor) for every row", [AGREES, ROW_MAX]),
    ("scale_by_128", "scale = max|row| / 128, then clamped to 127: the row maximum loses a step", [AGREES, HALF_STEP]),
    ("truncates", "w / scale is truncated toward zero instead of rounded", [AGREES, HALF_STEP]),
    ("zero_point", "an asymmetric zero point (+3) stays in the codes: 0.0 does not map to 0", [ZERO, AGREES]),
    ("per_input_channel", "one scale per input channel (max over each column) instead of per output row",
     [AGREES, HALF_STEP]),
    ("ties_away_from_zero", "ties round away from zero (C's round()) instead of to even", [TIES]),
    ("scale_in_float32", "the scale is computed in float32 whatever the weight's dtype", [DTYPES, AGREES]),
]:
    mutant(name=f"quantize_int8_{_bug}", bug=_what, provides="quantize_int8", caught_by=_caught)(buggy_quantize(_bug))


@mutant(name="dequantize_int8_scale_per_column",
        bug="q * scale broadcasts the scales along the columns (fails unless o == i)", provides="dequantize_int8",
        caught_by=[HALF_STEP])
def _per_column(q, scale):
    return q.to(scale.dtype) * scale


@mutant(name="dequantize_int8_always_float32", bug="dequantizes to float32 whatever the scale's dtype",
        provides="dequantize_int8", caught_by=[DTYPES])
def _always_float32(q, scale):
    return q.float() * scale.float()[:, None]


class _KeepsFloatWeight(Int8Linear):
    """Caches the dequantized float weight next to q "for speed": the memory saving is gone."""

    @classmethod
    def from_float(cls, weight, bias=None):
        layer = super().from_float(weight, bias)
        layer.register_buffer("weight_float", layer.weight_int8.to(weight.dtype) * layer.scale[:, None])
        return layer

    def forward(self, x):
        y = F.linear(x, self.weight_float.to(x.dtype))
        return y if self.bias is None else y + self.bias.to(x.dtype)


class _DropsBias(Int8Linear):
    def forward(self, x):
        return F.linear(x, self.weight_int8.to(x.dtype)) * self.scale.to(x.dtype)


def quantized_by(bug: str):
    """Int8Linear whose from_float quantizes with ``buggy_quantize(bug)``."""

    class BuggyInt8Linear(Int8Linear):
        @classmethod
        def from_float(cls, weight, bias=None):
            layer = super().from_float(weight, bias)
            q, scale = buggy_quantize(bug)(weight.detach())
            layer.weight_int8.copy_(q)
            layer.scale.copy_(scale)
            return layer

    return BuggyInt8Linear


mutant(name="Int8Linear_keeps_float_weight", bug="keeps a float copy of the dequantized weight", provides="Int8Linear",
       caught_by=[STORES])(_KeepsFloatWeight)
mutant(name="Int8Linear_drops_bias", bug="forward forgets the bias", provides="Int8Linear",
       caught_by=[EXACT, BOUND])(_DropsBias)
mutant(name="Int8Linear_per_tensor_scale", bug="one scale for the whole weight", provides="Int8Linear",
       caught_by=[EXACT, BOUND])(quantized_by("per_tensor_scale"))
mutant(name="Int8Linear_truncates", bug="quantizes by truncation (q = int(w / scale))", provides="Int8Linear",
       caught_by=[BOUND])(quantized_by("truncates"))
