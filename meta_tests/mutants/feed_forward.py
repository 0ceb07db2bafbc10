"""Mutants of FeedForward and SwiGLU: the feed-forward bugs learners write, each one branch of one class."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from meta_tests.catalog import mutant


def _position_rows(x, bug):
    """(b, s, d) -> (b*s, d) rows, and the way back. The bug walks positions first, then batch, and
    reshapes back without transposing, so results land at other (b, s) places."""
    b, s, d = x.shape
    if bug == "batch_and_positions_interleaved":
        return x.transpose(0, 1).reshape(b * s, d), lambda y: y.reshape(b, s, -1)
    return x.reshape(b * s, d), lambda y: y.reshape(b, s, -1)


def buggy_feed_forward(bug: str):
    class FeedForward(nn.Module):
        def __init__(self, *, d_model: int, d_ff: int, activation: str = "relu", bias: bool = True) -> None:
            super().__init__()
            self.activation = "gelu" if bug == "activation_ignored_always_gelu" else activation
            keep_bias = True if bug == "bias_ignored" else bias  # nn.Linear(d, f) without passing bias=bias
            self.up = nn.Linear(d_model, d_ff, bias=keep_bias)
            self.down = nn.Linear(d_ff, d_model, bias=keep_bias)

        def act(self, z):
            if self.activation == "relu":
                return F.relu(z)
            if bug == "gelu_is_tanh":
                return F.gelu(z, approximate="tanh")
            return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))

        def forward(self, x):
            rows, back = _position_rows(x, bug)
            if bug == "up_weight_data":
                hidden = F.linear(rows, self.up.weight.data, self.up.bias)
            else:
                hidden = self.up(rows)
            if bug == "activation_after_down":
                return back(self.act(self.down(hidden)))
            return back(self.down(self.act(hidden)))

    return FeedForward


def buggy_swiglu(bug: str):
    class SwiGLU(nn.Module):
        def __init__(self, *, d_model: int, d_ff: int) -> None:
            super().__init__()
            self.gate = nn.Linear(d_model, d_ff, bias=False)
            self.up = nn.Linear(d_model, d_ff, bias=False)
            self.down = nn.Linear(d_ff, d_model, bias=False)

        def forward(self, x):
            gate, value = self.gate(x), self.up(x)
            if bug == "gate_and_value_swapped":
                gate, value = value, gate
            if bug == "gate_detached":
                gate = gate.detach()
            return self.down(F.silu(gate) * value)

    return SwiGLU


FEED_FORWARD_CATALOG = {
    "activation_after_down": ("the activation is applied after the down projection",
                              ["test_feed_forward_agrees_with_reference",
                               "test_relu_feed_forward_with_every_hidden_unit_off_outputs_the_down_bias"]),
    "activation_ignored_always_gelu": ("the activation argument is ignored: gelu (nn.GELU()) whatever is asked",
                                       ["test_feed_forward_agrees_with_reference",
                                        "test_relu_feed_forward_with_every_hidden_unit_off_outputs_the_down_bias"]),
    "bias_ignored": ("bias=False is ignored: both nn.Linear keep their (randomly initialised) biases",
                     ["test_feed_forward_agrees_with_reference"]),
    "gelu_is_tanh": ("activation='gelu' uses the tanh approximation, not the exact form",
                     ["test_feed_forward_agrees_with_reference"]),
    "batch_and_positions_interleaved": ("rows flattened positions-first and reshaped back batch-first",
                                        ["test_feed_forward_is_position_wise",
                                         "test_feed_forward_batch_elements_are_independent",
                                         "test_feed_forward_is_equivariant_to_permuting_positions"]),
    "up_weight_data": ("up projection through weight.data: no gradient reaches up.weight",
                       ["test_feed_forward_parameters_get_finite_nonzero_gradients"]),
}

SWIGLU_CATALOG = {
    "gate_and_value_swapped": ("silu applied to up(x) and gate(x) used as the value",
                               ["test_swiglu_is_odd_in_the_value_weights", "test_feed_forward_agrees_with_reference"]),
    "gate_detached": ("the gate path is detached: the input gradient misses it",
                      ["test_feed_forward_passes_gradcheck"]),
}

for _bug, (_why, _props) in FEED_FORWARD_CATALOG.items():
    mutant(name=f"feed_forward_{_bug}", bug=_why, caught_by=_props, provides="FeedForward")(buggy_feed_forward(_bug))
for _bug, (_why, _props) in SWIGLU_CATALOG.items():
    mutant(name=f"swiglu_{_bug}", bug=_why, caught_by=_props, provides="SwiGLU")(buggy_swiglu(_bug))
