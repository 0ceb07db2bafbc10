"""Weight-only int8 quantization, symmetric, per output channel (LLM.int8()'s vector-wise absmax without the
outliers, torchao's int8 weight-only, gpt-fast's int8 mode): each row of a linear layer's weight is stored as
int8 numbers times one float scale; activations stay in float.

Signatures
----------
    quantize_int8(weight) -> (q, scale)
    dequantize_int8(q, scale) -> weight
    Int8Linear(*, in_features, out_features, bias=True, dtype=torch.float32, device="cpu")   zeros, to load into
    Int8Linear.from_float(weight, bias=None) -> Int8Linear      quantizes a float layer's weight (and keeps its bias)
        .forward(x) -> y

Shapes (glossary of spec/__init__.py, plus this family's o and i)
-----------------------------------------------------------------
    o   output channels (out_features: the rows of a weight, one scale each);   i   input channels (in_features)
    weight (o, i) float;  q (o, i) torch.int8;  scale (o,) the weight's dtype;  bias (o,)
    x (..., i) -> y (..., o), the dtype and device of x (which must be the layer's float dtype, as nn.Linear)

Math (row a of the weight, entry c)
-----------------------------------
    scale[a] = max_c |w[a, c]| / 127
    q[a, c]  = clamp(round(w[a, c] / scale[a]), -127, 127)            (q[a, :] = 0 when the row is all zero)
    dequantize:  w~[a, c] = q[a, c] * scale[a]
    Int8Linear:  y[..., a] = sum_c x[..., c] w~[a, c] + bias[a] = scale[a] * sum_c x[..., c] q[a, c] + bias[a]
                 (scaling after the integer-weight sum is the same map; kernels do it that way)
Error bounds (exact arithmetic; the properties add the float64 rounding of the few operations involved):
    rounding to nearest moves each entry by at most half a step:   |w~[a, c] - w[a, c]| <= scale[a] / 2;
    then, for the layer,  |y[..., a] - (x w^T + bias)[..., a]| = |sum_c x[..., c] (w~[a, c] - w[a, c])|
                                                              <= (scale[a] / 2) * sum_c |x[..., c]|.
    The row maximum maps to +-127 exactly (|w| / scale = 127), so no entry is clamped and the whole int8 range
    [-127, 127] is used by every row: a per-tensor scale (one for all rows) leaves small rows a few levels only.
Memory: o*i bytes of int8 plus o scales (and the bias) against 4*o*i bytes in float32 (2*o*i in bfloat16):
about 1/4 (1/2) of the float weight.

Conventions (pinned, with the reason)
-------------------------------------
* Symmetric: no zero point, so 0.0 maps to q = 0 and back to exactly 0.0 (zeros of a pruned weight stay
  zero, and x = 0 gives exactly the bias).
* -128 is never used: a symmetric range [-127, 127] keeps q -> -q exact (as torch's qint8 symmetric observers
  and LLM.int8() do).
* Rounding: to nearest, ties to even (torch.round, numpy.round, torch.quantize_per_channel). Ties are rare in
  real weights but a rounding that breaks them otherwise is another convention: ``rounding`` may be declared
  "half_away" (C's round(): ties away from zero) and is then judged by that.
* An all-zero row: scale 0 and q 0 (the formula's value; the division is guarded, never 0/0), so the row
  dequantizes to exact zeros. No epsilon floor that would change the scale of tiny rows.
* The scale is computed in the weight's dtype with one division (max|w| / 127), and q from one division
  w / scale: both are correctly rounded IEEE operations, so implementations agree bit for bit in float64.
* Int8Linear holds q as an int8 buffer, the scales and the bias in float: no float copy of the weight.
  Canonical float parameters cannot be read back from it (a quantized layer has none), so the suite builds it
  with ``from_float(weight, bias)`` from seeded float weights, instead of loading canonical parameters.

Options (declarable; properties/options.py)
-------------------------------------------
    rounding  (quantize_int8; convention): "half_even" (default) or "half_away"; the reference follows it.
    bias      (Int8Linear; init): the layer has a bias (from_float(weight, bias)); False: weight only.

Canonical parameters
--------------------
None: Int8Linear is built from float weights by from_float (see Conventions).

Properties (properties/test_quantization.py)
--------------------------------------------
quantize_int8 agrees with this reference (q exactly, the scale by the float64 rule); dequantization is within
half a step of every weight; every nonzero row's largest weight maps to +-127 and q stays in [-127, 127];
zero stays exactly zero (entries and all-zero rows); ties round to even; q is int8 and the scale keeps the
weight's dtype and device. Int8Linear: its error against the float layer is within (scale / 2) sum |x|;
on weights int8 represents exactly it equals the float layer (float64, float32, CUDA half); it stores int8
weights (about a quarter of the float32 bytes) and no float copy.
"""

from __future__ import annotations

import numpy as np

from spec.registry import Component, Option, boolean, component

QMAX = 127
ROUNDINGS = ("half_even", "half_away")

QUANTIZE_INT8 = component(Component(
    name="quantize_int8", kind="function", family="quantization",
    summary="symmetric per-output-channel int8: scale = max|w_row| / 127, q = round(w / scale)",
    options=(Option("rounding", ROUNDINGS, "convention",
                    "ties round to even (torch.round), or away from zero declared (C's round())"),),
))

DEQUANTIZE_INT8 = component(Component(
    name="dequantize_int8", kind="function", family="quantization",
    summary="q * scale[:, None]: the float weight an int8 weight stands for",
    output_shape=lambda q, scale, **_: tuple(q.shape),
))

INT8_LINEAR = component(Component(
    name="Int8Linear", kind="module", family="quantization",
    summary="a linear layer with an int8 weight and per-output-channel scales, built by from_float",
    options=(boolean("bias", "the layer has a bias (from_float(weight, bias)); False: the weight alone", kind="init"),),
))


def round_to_nearest(x: np.ndarray, rounding: str = "half_even") -> np.ndarray:
    """Round to the nearest integer; ties to even (numpy's round) or away from zero."""
    if rounding == "half_even":
        return np.round(x)
    if rounding == "half_away":
        return np.sign(x) * np.floor(np.abs(x) + 0.5)
    raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")


def quantize_int8(weight: np.ndarray, rounding: str = "half_even") -> tuple[np.ndarray, np.ndarray]:
    """The reference, computed in the weight's own float dtype (numpy's float32 operations are IEEE-rounded as
    torch's are): (q int8 (o, i), scale (o,))."""
    w = np.asarray(weight)
    scale = np.abs(w).max(axis=1) / w.dtype.type(QMAX)
    safe = np.where(scale > 0, scale, w.dtype.type(1))
    q = np.clip(round_to_nearest(w / safe[:, None], rounding), -QMAX, QMAX)
    return q.astype(np.int8), scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.asarray(q, dtype=np.float64) * np.asarray(scale, dtype=np.float64)[:, None]


def int8_linear(q: np.ndarray, scale: np.ndarray, bias: np.ndarray | None, x: np.ndarray) -> np.ndarray:
    """float64: x w~^T + bias with w~ the dequantized weight."""
    y = np.asarray(x, dtype=np.float64) @ dequantize_int8(q, scale).T
    return y if bias is None else y + np.asarray(bias, dtype=np.float64)


def linear_error_bound(weight: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(scale / 2) * sum_c |x[..., c]|, per output (..., o): how far Int8Linear may be from the float layer."""
    scale = np.abs(np.asarray(weight, dtype=np.float64)).max(axis=1) / QMAX
    return np.abs(np.asarray(x, dtype=np.float64)).sum(axis=-1, keepdims=True) * scale / 2


def weight_bytes(out_features: int, in_features: int, *, element_bytes: int, scale_bytes: int = 0) -> int:
    """Bytes of a weight (o, i) at ``element_bytes`` per entry, plus o scales of ``scale_bytes`` each."""
    return out_features * in_features * element_bytes + out_features * scale_bytes
