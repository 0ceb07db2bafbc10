"""Absolute positional encodings added to a sequence: the fixed sinusoidal table and a learned table.

Signatures (constructors are keyword-only)
-------------------------------------------
    SinusoidalPositionalEncoding(*, d_model, max_len)     .forward(x, *, offset=0)
    LearnedPositionalEmbedding(*, d_model, max_len)       .forward(x, *, offset=0)

Shapes
------
    x      (b, s, d)          d == d_model
    out    (b, s, d), the dtype and device of x
    table  (max_len, d)       row p is the encoding of position p

Math
----
    token j of x sits at position offset + j, for j = 0 .. s - 1
    out[b, j] = x[b, j] + table[offset + j]

    sinusoidal (Vaswani et al. 2017, section 3.5), for i = 0 .. d/2 - 1:
        theta_i          = 10000^(-2i/d)
        table[p, 2i]     = sin(p * theta_i)
        table[p, 2i + 1] = cos(p * theta_i)
    learned:
        table = weight, a parameter (max_len, d)

Conventions (pinned, with the reason)
-------------------------------------
* Positions start at 0: the first token of a call with offset=0 gets sin(0) = 0 and cos(0) = 1.
* Columns interleave: sin in the even columns, cos in the odd ones (the paper's and the PyTorch
  tutorial's layout). Some libraries concatenate [sin | cos]; that is another encoding, not this one.
* ``offset`` is where the chunk starts (decoding with a cache feeds one token at a time at offset t).
  Positions must lie in 0 .. max_len - 1: ``offset < 0`` or ``offset + s > max_len`` raises ValueError
  whose message gives the numbers (offset, s and max_len). Slicing ``table[offset:offset + s]`` alone
  returns fewer rows, which either breaks broadcasting with an unrelated error or silently adds the
  wrong rows (a single row broadcasts over every position).
* Odd ``d_model`` is rejected with ValueError at construction: the sin/cos pairs need an even width
  (the paper never defines the last column; the PyTorch tutorial's code fails with a shape mismatch).
* The sinusoidal table is a buffer, not a parameter. It is computed in float64 and kept in float64
  until the module is moved: ``module.to(dtype)`` then casts it once, and forward casts the rows it
  adds to x's dtype. Why: computing it in float32 (as the PyTorch tutorial does) and casting it up
  later keeps only float32's ~7 digits, and a float64 module must be float64-accurate (the float64
  check is 1e-9).
* The output has the dtype and device of x (the table's rows are cast to x's dtype before adding).

Options (declarable; properties/options.py)
-------------------------------------------
* ``offset`` (input, both): True (default) if the call takes ``offset=``; False for a module that always
  starts at position 0 (``forward(x)``, the PyTorch tutorial's). Without it the properties call
  ``module(x)``, so positions are 0 .. s - 1, and out-of-range calls are s > max_len.

Canonical parameters
--------------------
    SinusoidalPositionalEncoding   none (the table is a fixed buffer)
    LearnedPositionalEmbedding     weight (max_len, d), init "embedding" (N(0, 1), as nn.Embedding)

Properties (properties/test_positional_encoding.py)
---------------------------------------------------
both: agree with this reference in float64, float32 and (CUDA) half precision; refuse positions past
max_len (or a negative offset) with ValueError; float64 gradcheck; dtype and device are preserved.
sinusoidal: values lie in [-1, 1]; PE(p + k) is the same block-diagonal rotation of PE(p) for every p,
the rotation whose cos/sin are read off PE(k); PE(p) . PE(q) depends only on p - q; distinct positions
get distinct encodings; odd d_model is rejected.
learned: the gradient reaches exactly the rows offset .. offset + s - 1 of the table, and no other.
"""

from __future__ import annotations

import numpy as np
from einops import rearrange

from spec.registry import Component, Param, boolean, component, same_shape_as_first_input

SINUSOIDAL_BASE = 10000.0
OFFSET = boolean("offset", "the call takes offset= (where the chunk starts; False: always position 0)",
                 argument="offset")

SINUSOIDAL_POSITIONAL_ENCODING = component(
    Component(
        name="SinusoidalPositionalEncoding",
        kind="module",
        family="positional_encoding",
        summary="x + the fixed sin/cos table of the original transformer, from position offset",
        output_shape=same_shape_as_first_input,
        options=(OFFSET,),
    )
)
LEARNED_POSITIONAL_EMBEDDING = component(
    Component(
        name="LearnedPositionalEmbedding",
        kind="module",
        family="positional_encoding",
        summary="x + rows offset .. offset + s - 1 of a learned (max_len, d) table",
        parameters=lambda *, d_model, max_len, **_: {"weight": Param((max_len, d_model), "embedding")},
        output_shape=same_shape_as_first_input,
        options=(OFFSET,),
    )
)


def check_positions(offset: int, s: int, max_len: int) -> None:
    """The spec's range rule: positions offset .. offset + s - 1 must lie in 0 .. max_len - 1."""
    if offset < 0 or offset + s > max_len:
        raise ValueError(
            f"positions {offset} .. {offset + s - 1} (offset={offset}, s={s}) are outside 0 .. {max_len - 1} "
            f"(max_len={max_len})"
        )


def sinusoidal_table(positions: np.ndarray, d_model: int) -> np.ndarray:
    """The sinusoidal encodings (len(positions), d) of the given positions, in float64."""
    if d_model % 2:
        raise ValueError(f"d_model={d_model} must be even")
    p = np.asarray(positions, dtype=np.float64)
    i = np.arange(d_model // 2, dtype=np.float64)
    theta = SINUSOIDAL_BASE ** (-2.0 * i / d_model)
    angle = p[:, None] * theta[None, :]  # (positions, d/2)
    return rearrange(np.stack([np.sin(angle), np.cos(angle)]), "two p i -> p (i two)")


def sinusoidal_positional_encoding(x: np.ndarray, *, max_len: int, offset: int = 0) -> np.ndarray:
    """The float64 reference of SinusoidalPositionalEncoding(d_model=x.shape[-1], max_len=max_len)."""
    x = np.asarray(x, dtype=np.float64)
    s, d = x.shape[-2], x.shape[-1]
    check_positions(offset, s, max_len)
    return x + sinusoidal_table(np.arange(offset, offset + s), d)


def learned_positional_embedding(params: dict[str, np.ndarray], x: np.ndarray, *, offset: int = 0) -> np.ndarray:
    """The float64 reference of LearnedPositionalEmbedding: a table lookup, rows offset .. offset + s - 1."""
    x = np.asarray(x, dtype=np.float64)
    weight = np.asarray(params["weight"], dtype=np.float64)
    s = x.shape[-2]
    check_positions(offset, s, weight.shape[0])
    return x + weight[offset : offset + s]
