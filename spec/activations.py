"""Activation functions: GELU (exact and tanh form) and softmax with an optional keep-mask.

Signatures
----------
    gelu(x, *, approximate="none") -> Tensor          approximate in {"none", "tanh"}
    softmax(x, *, dim=-1, mask=None) -> Tensor

Shapes
------
    x     any shape
    mask  bool, broadcastable to x.shape; True = keep this entry (the project's polarity, spec/__init__.py)
    out   the shape, dtype and device of x

Math
----
    gelu, "none":  x * Phi(x) = x/2 * (1 + erf(x / sqrt(2)))                    (Phi: standard normal CDF)
    gelu, "tanh":  x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))
    softmax:       out[i] = exp(x[i] - m) / sum_{j kept} exp(x[j] - m)   for kept i, over axis ``dim``,
                   m = max over the kept entries of the row (any m gives the same value; the max keeps
                   every exponent <= 0 so nothing overflows)
                   out[i] = 0 for masked i;  a row (along ``dim``) with no kept entry is all zeros

Conventions (pinned, with the reason)
-------------------------------------
* ``approximate`` names follow ``F.gelu``. "none" is the exact erf form (BERT, GPT-2 code that calls
  erf, PyTorch's default); "tanh" is the approximation GPT-2 shipped. They differ by at most
  4.73e-4, at |x| ~ 2.70 (measured in float64 on a 1e-5 grid); over [-4, 4] the exact form's own error
  is rounding, so a "none" output 1e-5 away from erf is the tanh form in disguise.
* Both GELU forms satisfy gelu(x) - gelu(-x) = x (Phi(x) + Phi(-x) = 1, and likewise for the tanh
  form), and gelu(0) = 0.
* softmax masks with True = keep, like the attention masks. Masked entries are exactly 0 (exp(-inf)),
  and a row with every entry masked is all zeros, never NaN (the convention of spec/sdpa.py).
* Computed in the dtype of x (``F.softmax`` and ``F.gelu`` do the same; they accumulate in float32
  internally for half inputs).

Options (declarable; properties/options.py)
-------------------------------------------
* gelu ``approximate`` (call keyword): "none" (default) or "tanh". A gelu with one form built in (GPT-2's
  ``new_gelu``) declares it, ``gelu.spec_options = {"approximate": "tanh"}``: it is called without the
  keyword and judged as that form; the properties about the other form are skipped.
* softmax ``mask`` (input): True (default) if the call takes ``mask=``; False for a plain softmax.
* softmax ``empty_rows`` (input): True (default) if a row with every entry masked gives zeros, the
  pinned convention, which its own property checks. The other properties never draw such a row, so
  an implementation with another convention (NaN, as ``F.softmax`` over -inf) declares
  ``empty_rows=False`` and is judged on everything else.

Canonical parameters
--------------------
None: these are functions.

Properties (properties/test_activations.py)
-------------------------------------------
gelu: agrees with this reference, both forms (float64, float32, CUDA half); agrees with ``F.gelu``
both ways; gelu(x) - gelu(-x) = x and gelu(0) = 0; the tanh form stays within 4.74e-4 of the exact
one; the exact form is not the tanh approximation; float64 gradcheck.
softmax: agrees with this reference and with ``F.softmax`` (masking done as above); rows sum to 1;
invariant to adding a constant to each row; finite for |x| ~ 1e4; masked entries exactly 0; fully
masked rows are zeros (the only property that draws one); float64 gradcheck.
"""

from __future__ import annotations

import math

import numpy as np

from spec.registry import Component, Option, boolean, component, same_shape_as_first_input

APPROXIMATIONS = ("none", "tanh")

GELU = component(
    Component(
        name="gelu",
        kind="function",
        family="activations",
        summary="x * Phi(x) (approximate='none') or its tanh approximation (approximate='tanh')",
        output_shape=same_shape_as_first_input,
        options=(
            Option("approximate", APPROXIMATIONS, "call", "'none': the exact erf form; 'tanh': GPT-2's approximation"),
        ),
    )
)
SOFTMAX = component(
    Component(
        name="softmax",
        kind="function",
        family="activations",
        summary="softmax along dim over the kept entries (mask True = keep); masked and empty rows give 0",
        output_shape=same_shape_as_first_input,
        options=(
            boolean("mask", "the call takes a boolean keep-mask (True = keep)", argument="mask"),
            boolean("empty_rows", "a row with every entry masked gives zeros (checked by its own property)"),
        ),
    )
)

# The largest |gelu_tanh(x) - gelu_exact(x)| over the reals: 4.7324e-4 at |x| = 2.699 (float64, 1e-5 grid;
# the difference tends to 0 as |x| grows). Properties allow 4.74e-4.
TANH_GELU_MAX_DEVIATION = 4.7324e-4

_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu(x: np.ndarray, *, approximate: str = "none") -> np.ndarray:
    """The float64 reference for gelu."""
    x = np.asarray(x, dtype=np.float64)
    if approximate == "none":
        return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
    if approximate == "tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")


def softmax(x: np.ndarray, *, dim: int = -1, mask: np.ndarray | None = None) -> np.ndarray:
    """The float64 reference for softmax with a keep-mask (True = keep)."""
    x = np.asarray(x, dtype=np.float64)
    keep = np.ones(x.shape, dtype=bool) if mask is None else np.broadcast_to(np.asarray(mask, dtype=bool), x.shape)
    any_kept = keep.any(axis=dim, keepdims=True)
    row_max = np.where(keep, x, -np.inf).max(axis=dim, keepdims=True)
    row_max = np.where(any_kept, row_max, 0.0)  # empty rows: any finite value, they become 0 below
    unnormalised = np.where(keep, np.exp(x - row_max), 0.0)
    total = unnormalised.sum(axis=dim, keepdims=True)
    return unnormalised / np.where(any_kept, total, 1.0)
