"""Mutants of RotaryEmbedding: one realistic slip each, as a branch of the correct rotation.

``buggy_rope(bug)`` builds a class that is ours except for one branch (spec/rotary_embedding.py).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from meta_tests.catalog import mutant

AGREES = "test_rope_agrees_with_reference"
CHUNKS = "test_rope_in_chunks_or_with_explicit_positions_equals_rope_of_the_whole_sequence"
RELATIVE = "test_rope_scores_depend_only_on_relative_position"
TABLE_LENGTH = 2048  # GPT-NeoX's max_position_embeddings: the cos/sin cache of the table mutants


def buggy_rope(bug: str):
    class RotaryEmbedding(nn.Module):
        def __init__(self, *, head_dim: int, base: float = 10000.0, pairing: str = "adjacent") -> None:
            super().__init__()
            if head_dim % 2 and bug != "odd_width_not_validated":
                raise ValueError(f"head_dim={head_dim} must be even")
            self.head_dim, self.base = head_dim, base
            self.pairing = "half" if bug == "pairing_ignored_always_half" else pairing

        def forward(self, x, *, offset: int = 0, positions=None):
            s, e = x.shape[-2], x.shape[-1]
            compute = torch.float64 if x.dtype == torch.float64 else torch.float32
            if positions is None or bug == "ignores_positions":
                p = torch.arange(s, device=x.device, dtype=compute)
            else:
                p = positions.to(device=x.device, dtype=compute)
                if bug == "per_sequence_positions_from_row_0" and p.dim() == 2:
                    p = p[0]  # (b, s) -> (s,): every sequence rotated at row 0's positions
            if bug != "ignores_offset":
                p = p + offset
            if bug == "positions_start_at_1":
                p = p + 1
            # A cos/sin cache of TABLE_LENGTH rows looked up as cos[p % N] or cos[min(p, N - 1)]: the same
            # angles as indexing a precomputed table, past whose end the lookup wraps or clamps.
            if bug == "table_wraps":
                p = p.remainder(TABLE_LENGTH)
            if bug == "table_clamps":
                p = p.clamp(max=TABLE_LENGTH - 1)
            two_i = torch.arange(0, self.head_dim, 2, device=x.device, dtype=compute)
            exponent = {"exponent_sign": two_i / self.head_dim,
                        "i_not_2i": -(two_i / 2) / self.head_dim}.get(bug, -two_i / self.head_dim)
            angle = p[..., None] * self.base ** exponent  # (s, e/2) or (b, s, e/2)
            if angle.dim() == 3:
                angle = angle[:, None]  # (b, 1, s, e/2): per-sequence positions, shared by the heads
            if bug == "rotates_by_minus_angle":
                angle = -angle
            cos, sin = angle.cos(), angle.sin()
            if bug == "computes_in_float32_never_casts_back":
                x = x.float()
                cos, sin = cos.float(), sin.float()
            else:
                cos, sin = cos.to(x.dtype), sin.to(x.dtype)
            if self.pairing == "adjacent":
                u, v = x[..., 0::2], x[..., 1::2]
            else:
                u, v = x[..., : e // 2], x[..., e // 2 :]
            if bug == "adds_sinusoid_instead_of_rotating":
                return x + torch.stack([sin, cos], dim=-1).flatten(-2)
            ru = u * cos + v * sin if bug == "rotate_half_without_minus" else u * cos - v * sin
            rv = u * sin + v * cos
            if bug == "rotates_in_place":
                u.copy_(ru)  # u and v are views of the caller's x
                v.copy_(rv)
                return x
            if self.pairing == "adjacent":
                return rearrange(torch.stack([ru, rv], dim=-1), "... i two -> ... (i two)")
            return torch.cat([ru, rv], dim=-1)

    return RotaryEmbedding


CATALOG = {
    "ignores_offset": ("the offset is ignored: every chunk starts at position 0", [AGREES, CHUNKS]),
    "ignores_positions": ("explicit positions are ignored (arange(s) is used)",
                          [AGREES, CHUNKS, "test_rope_satisfies_roformer_long_term_decay_bound"]),
    "per_sequence_positions_from_row_0": ("(b, s) positions read from row 0: every sequence at the first's positions",
                                          [AGREES, CHUNKS]),
    "table_wraps": (f"a cos/sin table of {TABLE_LENGTH} rows indexed with p % {TABLE_LENGTH}: positions wrap",
                    [AGREES, RELATIVE]),
    "table_clamps": (f"a cos/sin table of {TABLE_LENGTH} rows indexed with min(p, {TABLE_LENGTH - 1}): positions clamp",
                     [AGREES, RELATIVE]),
    "pairing_ignored_always_half": ("the pairing argument is ignored: 'adjacent' rotates (i, i + e/2) like rotate_half",
                                    ["test_rope_pairings_are_one_map_up_to_deinterleaving", AGREES]),
    "rotates_by_minus_angle": ("rotation by -angle (clockwise): scores stay relative, only the reference sees it",
                               [AGREES]),
    "rotate_half_without_minus": ("rotate_half as cat(x2, x1), without the minus sign: not a rotation",
                                  ["test_rope_preserves_the_norm_of_every_vector", RELATIVE, AGREES]),
    "positions_start_at_1": ("positions counted from 1", ["test_rope_at_position_zero_is_the_identity", AGREES]),
    "adds_sinusoid_instead_of_rotating": ("a sin/cos table added to x (absolute PE) instead of rotating it",
                                          ["test_rope_is_linear_in_its_input", "test_rope_at_position_zero_is_the_identity",
                                           "test_rope_preserves_the_norm_of_every_vector"]),
    "exponent_sign": ("theta_i = base^(+2i/e): frequencies grow instead of shrink", [AGREES]),
    "i_not_2i": ("theta_i = base^(-i/e): the exponent uses i instead of 2i", [AGREES]),
    "odd_width_not_validated": ("odd head_dim accepted at construction", ["test_rope_rejects_odd_head_width"]),
    "computes_in_float32_never_casts_back": ("x.float() for the rotation and no .type_as(x): float64 in, float32 out",
                                             ["test_rope_preserves_dtype_and_device"]),
    "rotates_in_place": ("the rotated pairs written back into x's views: the caller's tensor changes",
                         ["test_rope_passes_gradcheck"]),
}

for _bug, (_why, _props) in CATALOG.items():
    mutant(name=f"rope_{_bug}", bug=_why, caught_by=_props, provides="RotaryEmbedding")(buggy_rope(_bug))
