"""Normalization layers: LayerNorm and RMSNorm, over the last (feature) axis.

Signatures (constructors are keyword-only)
-------------------------------------------
    LayerNorm(*, d_model, eps=1e-5, bias=True)     .forward(x)
    RMSNorm(*, d_model, eps=1e-6)                  .forward(x)

Shapes
------
    x    (..., d)      any leading axes, usually (b, s, d); each row x[..., :] is normalised alone
    out  (..., d)      the shape, dtype and device of x

Math (per row x of width d; mean and sums over the last axis only)
-------------------------------------------------------------------
    LayerNorm:  mu = mean(x),  var = mean((x - mu)^2)            (biased: divide by d, not d - 1)
                out = (x - mu) / sqrt(var + eps) * weight + bias      (bias=False: no "+ bias")
    RMSNorm:    ms = mean(x^2)                                   (no mean subtraction)
                out = x / sqrt(ms + eps) * weight                (no bias)

Conventions (pinned, with the reason)
-------------------------------------
* LayerNorm follows ``torch.nn.LayerNorm``: biased variance, eps *inside* the square root, normalise
  over the last axis only, default eps 1e-5. (eps outside the root, sqrt(var) + eps, is the other common
  choice, e.g. some TensorFlow code; it differs by about eps / (2 sqrt(var)) and is not this spec.)
* RMSNorm follows LLaMA / T5 / ``torch.nn.RMSNorm``: no mean subtraction, no bias, eps inside the root.
  eps is explicit, default 1e-6 (LLaMA's). ``torch.nn.RMSNorm(eps=None)`` means ``finfo(dtype).eps``,
  which depends on the dtype; the PyTorch adapter always passes this spec's eps explicitly.
* Precision: for float16 and bfloat16 inputs both layers compute in float32 and cast the result back to
  the input dtype once, at the end (weight and bias applied in float32 too). The reason: a float16 row
  with values near 6e4 has x^2 ~ 3.6e9, far beyond float16's largest finite value 65504, so a norm
  computed in float16 overflows (RMSNorm then returns 0 or NaN). ``torch.nn.LayerNorm`` has always
  accumulated in float32; whether ``torch.nn.RMSNorm`` does has depended on the torch version and
  backend (its composite implementation computed in the input dtype; pytorch PR #133085), so the PyTorch
  adapter upcasts around it explicitly: this spec's convention, converted in the adapter like the mask
  polarity of ``nn.MultiheadAttention``, so the adapter meets it on every torch version.
  float32 and float64 inputs compute in their own dtype.
* A constant LayerNorm row (var = 0) gives (x - mu) = 0 times 1 / sqrt(eps): zeros before the affine,
  so the output is ``bias`` (zeros without a bias); the zero row of RMSNorm gives zeros. Both finite
  because eps > 0.

Options (declarable; properties/options.py)
-------------------------------------------
* ``eps`` (both; constructor): any number >= 0, default 1e-5 (LayerNorm) / 1e-6 (RMSNorm). The
  properties draw the default, 1e-2 (large enough that eps inside vs outside the root shows) and 0.0
  (scale invariance is then exact; only the properties that stay finite at eps = 0 draw it). A norm
  with a fixed eps declares it (``spec_options = {"eps": 1e-6}``): it is built without ``eps`` and every
  property judges it at 1e-6.
* ``bias`` (LayerNorm; constructor): True (default) or False, as ``nn.LayerNorm(bias=False)``: no
  additive bias, and the canonical parameters are the weight alone.

Canonical parameters
--------------------
    LayerNorm:  weight (d,) init "gain",  bias (d,) init "bias"   (bias=False: the weight alone)
    RMSNorm:    weight (d,) init "gain"

Properties (properties/test_normalization.py)
---------------------------------------------
Both: agree with this reference (float64, float32, CUDA half); agree with ``nn.LayerNorm`` /
``nn.RMSNorm`` with the same weights; invariant to positive rescaling (exact as eps -> 0, within a bound
derived in the property's docstring for eps > 0); rows are independent; do not overflow in float16 near
6e4; float64 gradcheck; every parameter receives a finite, nonzero gradient.
LayerNorm: invariant to shifting a row; identity-affine output rows have mean 0 and biased variance
var / (var + eps); the affine acts elementwise (out = weight * LN_identity(x) + bias); a constant row
gives ``bias`` (zeros with bias=False). RMSNorm: odd; does not subtract the mean (a shifted row keeps
its mean); unit-weight output has RMS sqrt(ms / (ms + eps)); the zero row gives zeros.
"""

from __future__ import annotations

import numpy as np
from einops import reduce

from spec.registry import Component, Param, boolean, component, positive_float, same_shape_as_first_input

LAYER_NORM_EPS = 1e-5
RMS_NORM_EPS = 1e-6


def eps_option(default: float):
    """eps: the spec default first (properties shrink to it), then a large one, then 0 (exact invariance)."""
    return positive_float("eps", f"added to the variance inside the square root (default {default:g})",
                          draws=(default, 1e-2, 0.0))


def layer_norm_parameters(*, d_model: int, bias: bool = True, **_) -> dict[str, Param]:
    """weight (d,), and bias (d,) unless bias=False."""
    params = {"weight": Param((d_model,), "gain")}
    if bias:
        params["bias"] = Param((d_model,), "bias")
    return params


LAYER_NORM = component(
    Component(
        name="LayerNorm",
        kind="module",
        family="normalization",
        summary="(x - mean) / sqrt(biased var + eps) * weight + bias over the last axis",
        parameters=layer_norm_parameters,
        output_shape=same_shape_as_first_input,
        options=(
            eps_option(LAYER_NORM_EPS),
            boolean("bias", "an additive bias after the weight (False: the weight alone, as "
                    "nn.LayerNorm(bias=False))", kind="init"),
        ),
    )
)
RMS_NORM = component(
    Component(
        name="RMSNorm",
        kind="module",
        family="normalization",
        summary="x / sqrt(mean(x^2) + eps) * weight over the last axis (no mean, no bias)",
        parameters=lambda *, d_model, **_: {"weight": Param((d_model,), "gain")},
        output_shape=same_shape_as_first_input,
        options=(eps_option(RMS_NORM_EPS),),
    )
)


def row_mean(x: np.ndarray) -> np.ndarray:
    """Mean over the last axis, kept as a length-1 axis: (..., d) -> (..., 1)."""
    return reduce(x, "... d -> ... 1", "mean")


def layer_norm(params: dict[str, np.ndarray], x: np.ndarray, *, eps: float = LAYER_NORM_EPS) -> np.ndarray:
    """The float64 reference for LayerNorm. Inputs of any float dtype are read as float64; without a
    "bias" entry in ``params`` (bias=False) nothing is added."""
    x = np.asarray(x, dtype=np.float64)
    weight = np.asarray(params["weight"], dtype=np.float64)
    bias = np.asarray(params.get("bias", 0.0), dtype=np.float64)
    centred = x - row_mean(x)
    var = row_mean(centred**2)  # biased: divide by d
    return centred / np.sqrt(var + eps) * weight + bias


def rms_norm(params: dict[str, np.ndarray], x: np.ndarray, *, eps: float = RMS_NORM_EPS) -> np.ndarray:
    """The float64 reference for RMSNorm."""
    x = np.asarray(x, dtype=np.float64)
    weight = np.asarray(params["weight"], dtype=np.float64)
    return x / np.sqrt(row_mean(x**2) + eps) * weight
