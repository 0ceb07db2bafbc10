"""Mutants of the absolute positional encodings: one realistic slip each, as a branch of the correct code.

``buggy_sinusoidal(bug)`` and ``buggy_learned(bug)`` build a class that is ours except for one branch, so
every mutant reads as a near miss of the spec (spec/positional_encoding.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from implementations.positional_encoding import check_window
from meta_tests.catalog import mutant

AGREES = "test_positional_encoding_agrees_with_reference"
REFUSES = "test_positional_encoding_refuses_positions_past_max_len"
GRADCHECK = "test_positional_encoding_passes_gradcheck"
DTYPE = "test_positional_encoding_preserves_dtype_and_device"


def buggy_table(bug: str, positions: torch.Tensor, d_model: int) -> torch.Tensor:
    """The sinusoidal table of the given positions, (len, d), with one bug."""
    dtype = torch.float32 if bug == "table_in_float32" else torch.float64
    p = positions.to(dtype)[:, None]
    if bug == "positions_start_at_1":
        p = p + 1
    two_i = torch.arange(0, d_model, 2, dtype=dtype)
    exponent = {"exponent_sign": two_i / d_model, "i_not_2i": -(two_i / 2) / d_model}.get(bug, -two_i / d_model)
    theta = 10000.0 ** exponent
    angle = theta.expand(len(positions), -1) if bug == "forgets_position" else p * theta
    sin, cos = angle.sin(), angle.cos()
    if bug == "sin_cos_swapped":
        sin, cos = cos, sin
    if bug == "theta_from_column_index":  # column j uses 10000^(-j/d): the cos column gets the next frequency
        cos = (p * 10000.0 ** (-(two_i + 1) / d_model)).cos()
    table = torch.zeros(len(positions), d_model, dtype=dtype)
    table[:, 0::2] = sin
    table[:, 1::2] = cos  # the PyTorch tutorial's layout: fails with a shape mismatch for odd d_model
    if bug == "scaled_by_sqrt_d":
        table = table * math.sqrt(d_model)
    return table


def buggy_sinusoidal(bug: str):
    class SinusoidalPositionalEncoding(nn.Module):
        def __init__(self, *, d_model: int, max_len: int) -> None:
            super().__init__()
            if d_model % 2 and bug != "odd_width_not_validated":
                raise ValueError(f"d_model={d_model} must be even")
            self.d_model, self.max_len = d_model, max_len
            table = buggy_table(bug, torch.arange(max_len), d_model)
            if bug == "plain_attribute_not_buffer":
                self.pe = table  # .to() neither moves nor casts a plain attribute
            else:
                self.register_buffer("pe", table, persistent=False)

        def forward(self, x, *, offset: int = 0):
            s = x.shape[-2]
            if bug == "computed_on_the_fly":  # any position works, so max_len is never enforced
                rows = buggy_table(bug, torch.arange(offset, offset + s), self.d_model)
                return x + rows.to(device=x.device, dtype=x.dtype)
            check_window(offset, s, self.max_len)
            rows = self.pe[offset : offset + s]
            if bug == "plain_attribute_not_buffer":
                return x + rows.to(x.device)
            if bug == "in_place_add":
                x += rows.to(dtype=x.dtype)
                return x
            return x + rows.to(dtype=x.dtype)

    return SinusoidalPositionalEncoding


def buggy_learned(bug: str):
    class LearnedPositionalEmbedding(nn.Module):
        def __init__(self, *, d_model: int, max_len: int) -> None:
            super().__init__()
            self.max_len = max_len
            self.weight = nn.Parameter(torch.randn(max_len, d_model))

        def forward(self, x, *, offset: int = 0):
            s = x.shape[-2]
            if bug != "max_len_not_enforced":
                check_window(offset, s, self.max_len)
            start = 0 if bug == "ignores_offset" else offset
            rows = self.weight.data if bug == "table_detached" else self.weight
            rows = rows[start : start + s]
            if bug == "mixed_precision_not_cast_back":
                return x.float() + rows.float()
            return x + rows.to(dtype=x.dtype)

    return LearnedPositionalEmbedding


SINUSOIDAL = {
    "sin_cos_swapped": ("cos in the even columns and sin in the odd ones",
                        [AGREES, "test_sinusoidal_encoding_shift_is_one_rotation_for_every_position"], {}),
    "exponent_sign": ("theta_i = 10000^(+2i/d): frequencies grow instead of shrink", [AGREES], {}),
    "i_not_2i": ("theta_i = 10000^(-i/d): the exponent uses i instead of 2i", [AGREES], {}),
    "theta_from_column_index": ("theta from the column index j (10000^(-j/d)): sin and cos of a pair differ",
                                [AGREES, "test_sinusoidal_encoding_dot_products_depend_only_on_distance",
                                 "test_sinusoidal_encoding_shift_is_one_rotation_for_every_position"], {}),
    "positions_start_at_1": ("positions counted from 1", [AGREES,
                             "test_sinusoidal_encoding_shift_is_one_rotation_for_every_position"], {}),
    "forgets_position": ("sin(theta_i) instead of sin(p * theta_i): every position gets the same row",
                         ["test_sinusoidal_encoding_gives_distinct_positions_distinct_encodings", AGREES], {}),
    "scaled_by_sqrt_d": ("the encoding scaled by sqrt(d_model) (meant for the token embeddings)",
                         ["test_sinusoidal_encoding_values_lie_in_unit_interval", AGREES], {}),
    "table_in_float32": ("the table built in float32 (the tutorial's way) and cast up by .to(float64)", [AGREES], {}),
    "computed_on_the_fly": ("the encoding computed on the fly for any position: max_len never enforced", [REFUSES], {}),
    "odd_width_not_validated": ("odd d_model not validated: the tutorial's table fails with a shape-mismatch RuntimeError",
                                ["test_sinusoidal_encoding_rejects_odd_width"], {}),
    "plain_attribute_not_buffer": ("the float64 table kept as a plain attribute: .to(float32) leaves it float64",
                                   [DTYPE], {"dtype": torch.float32}),
    "in_place_add": ("x += table[...]: the caller's tensor is modified in place", [GRADCHECK], {}),
}
LEARNED = {
    "ignores_offset": ("rows 0 .. s - 1 used whatever the offset",
                       [AGREES, "test_learned_embedding_gradient_reaches_exactly_the_used_rows"], {}),
    "max_len_not_enforced": ("weight[offset:offset + s] sliced without a range check", [REFUSES], {}),
    "table_detached": ("the table read through .data: no gradient reaches it",
                       ["test_learned_embedding_gradient_reaches_exactly_the_used_rows"], {}),
    "mixed_precision_not_cast_back": ("added in float32 and never cast back: float64 in, float32 out",
                                      [DTYPE], {}),
}

for _bug, (_why, _props, _params) in SINUSOIDAL.items():
    mutant(name=f"sinusoidal_{_bug}", bug=_why, caught_by=_props, params=_params,
           provides="SinusoidalPositionalEncoding")(buggy_sinusoidal(_bug))
for _bug, (_why, _props, _params) in LEARNED.items():
    mutant(name=f"learned_{_bug}", bug=_why, caught_by=_props, params=_params,
           provides="LearnedPositionalEmbedding")(buggy_learned(_bug))
