"""Properties of FeedForward and SwiGLU. Spec: spec/feed_forward.py.

PyTorch has no feed-forward module to compare with, so these run on ours (and a learner's); the
PyTorch adapters skip them. Configurations are drawn from what the implementation offers
(properties/options.py): FeedForward's activation and biases (SwiGLU has no options).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import implementations
from properties.assertions import PRECISIONS, assert_close, assert_equal
from properties.options import Offers, draws_options
from properties.plugin import Implementation, backward
from properties.probes import assert_parameters_get_finite_gradients, gradcheck
from properties.strategies import seeds, sequence_shapes, tensor
from spec import feed_forward as spec

BLOCKS = ["FeedForward", "SwiGLU"]
AXES = "b s d"
OURS = Implementation("ours", implementations)  # the same-dtype baseline of the error-ratio rule


@draws_options("FeedForward", activation=lambda config: config["activation"], bias=lambda config: config["bias"])
@st.composite
def block_configs(draw, offers: Offers, *, min_f: int = 1, max_f: int = 8):
    """Constructor keywords (beyond d_model) for the offers' component: d_ff and, for FeedForward, the
    activation and bias among those it offers."""
    config = {"d_ff": draw(st.integers(min_f, max_f), label="d_ff")}
    if offers.component == "FeedForward":
        config["activation"] = draw(offers.strategy("activation"), label="activation")
        config["bias"] = draw(offers.strategy("bias"), label="bias")
    return config


def build(impl, component, d, config, seed, *, device="cpu", dtype=torch.float64, params=None):
    return impl.build(component, seed=seed, device=device, dtype=dtype, params=params, d_model=d, **config)


def reference(component, module, x, config):
    params = module.canonical_numpy()
    x = x.detach().double().cpu().numpy()
    if component == "FeedForward":
        return spec.feed_forward(params, x, activation=config["activation"])
    return spec.swiglu(params, x)


@pytest.mark.parametrize("component", BLOCKS)
@pytest.mark.parametrize("dtype", PRECISIONS)
@given(shape=sequence_shapes(), seed=seeds(), data=st.data())
def test_feed_forward_agrees_with_reference(impl, device, dtype, component, shape, seed, data):
    """The output equals the spec's float64 reference (relu and exact-gelu FeedForward, with and without
    biases, as offered; SwiGLU).

    Hint: FeedForward is down(act(up(x))) with the activation between the projections; "gelu" is the
    exact erf form. SwiGLU is down(silu(gate(x)) * up(x)) without biases.
    """
    config = data.draw(block_configs(impl.offers(component)), label="config")
    d = shape[-1]
    module = build(impl, component, d, config, seed, device=device, dtype=dtype)
    x = tensor(seed + 1, *shape, dtype=dtype, device=device)
    baseline = build(OURS, component, d, config, seed, device=device, dtype=dtype).module(x)
    assert_close(
        module(x), reference(component, module, x, config), baseline=baseline, axes=AXES,
        claim=f"{component} agrees with the spec's reference ((b, s, d)={shape}, {config}, {dtype})",
        hint="activation between the two projections; exact gelu; silu on the gate path only; "
        "bias=False means nn.Linear(..., bias=False) for both projections.",
    )


@pytest.mark.requires("FeedForward")
@pytest.mark.needs(activation="relu", bias=True)
@given(shape=sequence_shapes(), seed=seeds(), d_ff=st.integers(1, 8))
def test_relu_feed_forward_with_every_hidden_unit_off_outputs_the_down_bias(impl, device, shape, seed, d_ff):
    """With up.bias_i below -(sum_j |up.weight[i, j]|) * max|x| - 1, every hidden pre-activation is below -1,
    relu switches every hidden unit off (exactly 0), and the output is exactly down.bias at every position.

    Hint: relu sits between the projections (down(relu(up(x)))), not after down; relu(z) is exactly 0 for
    z < 0, where gelu and leaky relu are not.
    """
    config = {"d_ff": d_ff, "activation": "relu", "bias": True}
    d = shape[-1]
    x = tensor(seed + 1, *shape, dtype=torch.float64, device=device)
    params = {name: value.detach().clone().cpu() for name, value in
              build(impl, "FeedForward", d, config, seed).canonical_state().items()}
    params["up.bias"] = -params["up.weight"].abs().sum(dim=1) * x.abs().max().item() - 1.0
    module = build(impl, "FeedForward", d, config, seed, device=device, params=params)
    assert_equal(
        module(x), params["down.bias"].to(device).expand(shape), axes=AXES,
        claim=f"relu FeedForward with every hidden unit off outputs down.bias ((b, s, d)={shape}, d_ff={d_ff})",
        hint="out = down(relu(up(x))): with every relu output 0, only down's bias remains.",
    )


@pytest.mark.parametrize("component", BLOCKS)
@given(shape=sequence_shapes(), seed=seeds(), data=st.data())
def test_feed_forward_is_position_wise(impl, device, component, shape, seed, data):
    """Changing the input at one position (b, s) changes the output at that position only, bit for bit.

    Hint: apply the projections to the feature axis of each position; a reshape that interleaves
    batch and positions (transpose without moving back) sends a position's result elsewhere.
    """
    config = data.draw(block_configs(impl.offers(component)), label="config")
    b, s, d = shape
    b, s = b + 1, s + 1  # at least two batch elements and two positions
    where = (data.draw(st.integers(0, b - 1), label="at_b"), data.draw(st.integers(0, s - 1), label="at_s"))
    module = build(impl, component, d, config, seed, device=device)
    x = tensor(seed + 1, b, s, d, dtype=torch.float64, device=device)
    x2 = x.clone()
    x2[where] += tensor(seed + 2, d, dtype=torch.float64, device=device)
    others = torch.ones(b, s, dtype=torch.bool, device=device)
    others[where] = False
    assert_equal(
        module(x2)[others], module(x)[others],
        claim=f"{component} is position-wise: changing position (b, s)={where} changes no other output "
        f"({(b, s, d)}, {config})",
        hint="each position's output depends on that position's input alone.",
    )


@pytest.mark.parametrize("component", BLOCKS)
@given(shape=sequence_shapes(), seed=seeds(), data=st.data())
def test_feed_forward_is_equivariant_to_permuting_positions(impl, component, shape, seed, data):
    """Permuting the positions of the input permutes the output the same way (float64, up to rounding:
    a matrix multiply may treat a row differently by where it sits in a block).
    """
    config = data.draw(block_configs(impl.offers(component)), label="config")
    b, s, d = shape
    b, s = b + 1, s + 1
    perm = torch.tensor(data.draw(st.permutations(range(s)), label="perm"))
    module = build(impl, component, d, config, seed)
    x = tensor(seed + 1, b, s, d, dtype=torch.float64, device="cpu")
    assert_close(
        module(x[:, perm]), module(x)[:, perm], axes=AXES,
        claim=f"{component} is equivariant to permuting positions ({(b, s, d)}, {config}, perm={perm.tolist()})",
        hint="no position may be special: the same weights act on every position alone.",
    )


@pytest.mark.parametrize("component", BLOCKS)
@given(shape=sequence_shapes(), seed=seeds(), data=st.data())
def test_feed_forward_batch_elements_are_independent(impl, device, component, shape, seed, data):
    """Changing batch element 0 changes nothing in the other batch elements, bit for bit."""
    config = data.draw(block_configs(impl.offers(component)), label="config")
    b, s, d = shape
    b, s = b + 1, s + 1
    module = build(impl, component, d, config, seed, device=device)
    x = tensor(seed + 1, b, s, d, dtype=torch.float64, device=device)
    x2 = x.clone()
    x2[0] += tensor(seed + 2, s, d, dtype=torch.float64, device=device)
    assert_equal(
        module(x2)[1:], module(x)[1:], axes=AXES,
        claim=f"{component}: batch elements are independent ({(b, s, d)}, {config})",
        hint="a reshape or view that merges the batch axis with positions in the wrong order mixes sequences.",
    )


@pytest.mark.requires("SwiGLU")
@given(shape=sequence_shapes(), seed=seeds(), d_ff=st.integers(1, 8))
def test_swiglu_is_odd_in_the_value_weights(impl, device, shape, seed, d_ff):
    """Negating ``up.weight`` negates SwiGLU's output exactly: the value path (up) is linear and the gate
    path goes through silu. Were gate and up swapped, silu(-u) != -silu(u) would show.

    Hint: silu goes on ``gate(x)``; ``up(x)`` multiplies it unchanged (HF: gate_proj vs up_proj).
    """
    d = shape[-1]
    module = build(impl, "SwiGLU", d, {"d_ff": d_ff}, seed, device=device)
    params = {name: value.detach().clone() for name, value in module.canonical_state().items()}
    params["up.weight"] = -params["up.weight"]
    flipped = build(impl, "SwiGLU", d, {"d_ff": d_ff}, seed, device=device, params=params)
    x = tensor(seed + 1, *shape, dtype=torch.float64, device=device)
    assert_equal(
        flipped(x), -module(x), axes=AXES,
        claim=f"SwiGLU's output is odd in up.weight: gate and value paths are not swapped ({shape}, d_ff={d_ff})",
        hint="out = down(silu(gate(x)) * up(x)); silu(up(x)) * gate(x) is the swapped, wrong form.",
    )


@pytest.mark.parametrize("component", BLOCKS)
@given(shape=sequence_shapes(max_b=1, max_s=2, max_d=4), seed=seeds(), data=st.data())
def test_feed_forward_passes_gradcheck(impl, component, shape, seed, data):
    """float64 gradcheck: the analytic gradient w.r.t. x equals finite differences (relu's kink at 0 is
    met with probability ~0 by random inputs).

    Hint: ``.detach()`` on the gate or the hidden activations cuts a path of the gradient.
    """
    config = data.draw(block_configs(impl.offers(component), max_f=4), label="config")
    module = build(impl, component, shape[-1], config, seed)
    gradcheck(
        module, (tensor(seed + 1, *shape, dtype=torch.float64, device="cpu"),),
        claim=f"{component}'s input gradient is right ({shape}, {config})",
        hint="keep both paths differentiable.",
    )


@pytest.mark.parametrize("component", BLOCKS)
@given(shape=sequence_shapes(min_d=2), seed=seeds(), data=st.data())
def test_feed_forward_parameters_get_finite_nonzero_gradients(impl, component, shape, seed, data):
    """After backward of a random linear function of the output, every canonical parameter has a finite
    gradient that is not all zero. d_ff is at least 16, so a relu layer with every hidden unit dead at
    every position (its up weights would get no gradient) has probability below 2^-16.

    Hint: parameters must be used in forward as themselves, not through ``.data`` or ``.detach()``.
    """
    config = data.draw(block_configs(impl.offers(component), min_f=16, max_f=20), label="config")
    module = build(impl, component, shape[-1], config, seed)
    x = tensor(seed + 1, *shape, dtype=torch.float64, device="cpu")
    probe = tensor(seed + 2, *shape, dtype=torch.float64, device="cpu")
    backward((module(x) * probe).sum(), module)
    assert_parameters_get_finite_gradients(
        module, nonzero="all",
        claim=f"{component}'s parameters get finite, nonzero gradients ({shape}, {config})",
        hint="use the nn.Linear modules (or their .weight) directly; .data and .detach() cut the gradient.",
    )
