"""Position-wise feed-forward blocks: the classic two-layer MLP and SwiGLU.

Signatures (constructors are keyword-only)
-------------------------------------------
    FeedForward(*, d_model, d_ff, activation="relu", bias=True)   .forward(x)   activation in {"relu", "gelu"}
    SwiGLU(*, d_model, d_ff)                                       .forward(x)

Shapes
------
    x    (b, s, d)      (any leading axes work the same way)
    out  (b, s, d), the dtype and device of x
    the hidden activations are (b, s, f), f = d_ff

Math (x one position, a d-vector; W x means x @ W^T as in nn.Linear)
---------------------------------------------------------------------
    FeedForward:  out = W_down act(W_up x + b_up) + b_down        (bias=False: no b_up, no b_down)
                  act = relu, or gelu with approximate="none" (spec/activations.py)
    SwiGLU:       out = W_down (silu(W_gate x) * (W_up x)),   silu(z) = z * sigmoid(z)

Conventions (pinned, with the reason)
-------------------------------------
* Position-wise: every position is transformed alone by the same weights, so the block is
  equivariant to permuting positions and batch elements never mix.
* FeedForward has biases on both projections by default (``nn.Linear``'s default, the original
  Transformer); ``bias=False`` drops both (PaLM-style blocks, ``nn.Linear(..., bias=False)``).
* SwiGLU has no biases (LLaMA, PaLM). The *gate* path goes through silu; the *value* path ("up") is
  linear, so the output is linear in ``up.weight``: negating it negates the output exactly. (HF LLaMA
  names them gate_proj, up_proj, down_proj; swapping gate and up is a silent, common bug.)
* "gelu" here is the exact form; ``FeedForward`` refuses any activation but "relu" and "gelu"
  (ValueError printing the value).

Options (declarable; properties/options.py)
-------------------------------------------
* FeedForward ``activation`` (constructor): "relu" (default) or "gelu". A block with one activation built
  in declares it (``spec_options = {"activation": "gelu"}``): it is built without the keyword, judged as
  that activation, and the relu-only property is skipped.
* FeedForward ``bias`` (constructor): True (default) or False; without biases the canonical parameters
  are the two weights alone.
* SwiGLU has no options: the spec pins it without biases and with silu on the gate.

Canonical parameters
--------------------
    FeedForward:  up.weight (f, d)  up.bias (f,)  down.weight (d, f)  down.bias (d,)   (bias=False: weights only)
    SwiGLU:       gate.weight (f, d)  up.weight (f, d)  down.weight (d, f)

Properties (properties/test_feed_forward.py)
--------------------------------------------
agrees with this reference (float64, float32, CUDA half), both activations, with and without biases;
position-wise (changing one position changes only that position's output, exactly) and so equivariant to
permuting positions; batch elements are independent; a relu FeedForward whose hidden units are all
switched off outputs exactly down.bias; SwiGLU's output is odd in ``up.weight`` (gate and value not swapped); float64
gradcheck; every parameter receives a finite, nonzero gradient.
"""

from __future__ import annotations

import math

import numpy as np
from einops import einsum

from spec.registry import Component, Option, Param, boolean, component, same_shape_as_first_input

FEED_FORWARD_ACTIVATIONS = ("relu", "gelu")


def feed_forward_parameters(*, d_model: int, d_ff: int, bias: bool = True, **_) -> dict[str, Param]:
    """up.weight (f, d), down.weight (d, f), and their biases unless bias=False."""
    params = {"up.weight": Param((d_ff, d_model))}
    if bias:
        params["up.bias"] = Param((d_ff,), "bias")
    params["down.weight"] = Param((d_model, d_ff))
    if bias:
        params["down.bias"] = Param((d_model,), "bias")
    return params


FEED_FORWARD = component(
    Component(
        name="FeedForward",
        kind="module",
        family="feed_forward",
        summary="down(act(up(x))), act relu or exact gelu, with biases",
        parameters=feed_forward_parameters,
        output_shape=same_shape_as_first_input,
        options=(
            Option("activation", FEED_FORWARD_ACTIVATIONS, "init", "the hidden activation: relu, or exact (erf) gelu"),
            boolean("bias", "both projections have a bias (False: the weights alone)", kind="init"),
        ),
    )
)
SWIGLU = component(
    Component(
        name="SwiGLU",
        kind="module",
        family="feed_forward",
        summary="down(silu(gate(x)) * up(x)), no biases (LLaMA)",
        parameters=lambda *, d_model, d_ff: {
            "gate.weight": Param((d_ff, d_model)),
            "up.weight": Param((d_ff, d_model)),
            "down.weight": Param((d_model, d_ff)),
        },
        output_shape=same_shape_as_first_input,
    )
)


def _erf(z: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(z)


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """x @ weight^T (+ bias) over the last axis: (..., i) with weight (o, i) -> (..., o)."""
    y = einsum(x, weight, "... i, o i -> ... o")
    return y if bias is None else y + bias


def activate(z: np.ndarray, activation: str) -> np.ndarray:
    if activation == "relu":
        return np.maximum(z, 0.0)
    if activation == "gelu":
        return 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)))
    raise ValueError(f"activation must be one of {FEED_FORWARD_ACTIVATIONS}, got {activation!r}")


def feed_forward(params: dict[str, np.ndarray], x: np.ndarray, *, activation: str = "relu") -> np.ndarray:
    """The float64 reference for FeedForward (without "up.bias" / "down.bias" in ``params``: no biases)."""
    p = {name: np.asarray(value, dtype=np.float64) for name, value in params.items()}
    x = np.asarray(x, dtype=np.float64)
    hidden = activate(linear(x, p["up.weight"], p.get("up.bias")), activation)
    return linear(hidden, p["down.weight"], p.get("down.bias"))


def silu(z: np.ndarray) -> np.ndarray:
    return z / (1.0 + np.exp(-z))


def swiglu(params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The float64 reference for SwiGLU."""
    p = {name: np.asarray(value, dtype=np.float64) for name, value in params.items()}
    x = np.asarray(x, dtype=np.float64)
    hidden = silu(linear(x, p["gate.weight"])) * linear(x, p["up.weight"])
    return linear(hidden, p["down.weight"])
