"""Rotary position embedding (RoPE, Su et al. 2021, "RoFormer"), applied to query or key heads.

Signature (constructor is keyword-only)
---------------------------------------
    RotaryEmbedding(*, head_dim, base=10000.0, pairing="adjacent")
        .forward(x, *, offset=0, positions=None)          positions (s,) or (b, s)

Shapes
------
    x          (b, h, s, e)     e == head_dim; h may be query heads or key/value heads (g)
    positions  (s,) integers (shared by the batch), (b, s) integers (one row per sequence), or None
    out        (b, h, s, e), the dtype and device of x

Math
----
    token j sits at position  p_j = offset + j                     (positions is None)
                              p_j = offset + positions[j]          (positions (s,))
    token j of sequence b at  p_bj = offset + positions[b, j]      (positions (b, s); every head alike)
    theta_i = base^(-2i/e),   i = 0 .. e/2 - 1
    pair i of the head width is a pair of dimensions (u_i, v_i):
        pairing "adjacent":   (u_i, v_i) = (2i, 2i + 1)            Meta's Llama, RoFormer, torchtune
        pairing "half":       (u_i, v_i) = (i, i + e/2)            GPT-NeoX, HF ``rotate_half``
    each pair is rotated counter-clockwise by the angle p_j * theta_i (p_bj * theta_i):
        out[.., j, u_i] = x[.., j, u_i] cos(p_j theta_i) - x[.., j, v_i] sin(p_j theta_i)
        out[.., j, v_i] = x[.., j, u_i] sin(p_j theta_i) + x[.., j, v_i] cos(p_j theta_i)
    As complex numbers z_i = x[u_i] + i x[v_i]:  z_i -> z_i * exp(i p_j theta_i).

Conventions (pinned, with the reason)
-------------------------------------
* The rotation is counter-clockwise (+angle), as in RoFormer and every library above. Rotating by
  -angle still gives relative scores (<R(-m) q, R(-n) k> depends on m - n), so only the reference sees
  the difference; but queries and keys rotated by two conventions no longer match.
* The two pairings are the same map up to a fixed permutation of the head width (de-interleaving,
  ``x[..., [0, 2, 4, .., 1, 3, 5, ..]]``); weights trained with one do not work with the other. HF
  permutes the q/k projection rows of Meta's Llama checkpoints for exactly this reason.
* ``offset`` and ``positions`` compose: position = offset + positions[j]. ``offset`` alone serves
  cached decoding (a chunk starting at offset); ``positions`` serves packed or left-padded sequences,
  whose rows sit at different positions: hence (b, s) positions, row b for sequence b (HF's
  ``position_ids``). (s,) positions are shared by every sequence of the batch.
* There is no max_len: any integer position is allowed, and position p rotates by p * theta_i whatever
  p is. A precomputed cos/sin table of N rows must not answer for p >= N silently: indexing it with
  p % N (wrapping) or min(p, N - 1) (clamping) rotates by another angle while looking plausible. An
  implementation with such a table declares its length (option ``max_position``) and is judged below it.
* Odd ``head_dim`` raises ValueError at construction (the pairs need an even width; some libraries
  pass the last dimension through unrotated, this spec does not). ``pairing`` outside
  {"adjacent", "half"} raises ValueError too.
* Precision: the angles p * theta_i and their cos/sin are computed in float32 at least (float64 for
  float64 input), then cast to x's dtype before the rotation. Why: float16 has 11 significant bits, so
  at p = 1000 the angle p * theta_0 = p is only representable to 0.5 rad, and theta_i itself would carry
  an error of ~5e-4 that p multiplies; the rotated vectors would be far off while looking plausible.
  Note that ``module.to(torch.float16)`` casts every buffer: an ``inv_freq`` buffer must be recomputed or
  cast back up to float32 before use (HF keeps it in float32 for this reason).
* No parameters and no buffer that the suite reads: RoPE is fixed.

Options (declarable; properties/options.py)
-------------------------------------------
* ``pairing`` (constructor): "adjacent" (default) or "half". A module with one pairing built in (Meta's
  Llama code, HF ``rotate_half``) declares it and is judged with that pairing everywhere; the property
  relating the two pairings is skipped.
* ``base`` (constructor): any base > 0, default 10000; the properties draw 10000, 100 and 500000 (Llama 3).
* ``offset`` (input): True (default) if the call takes ``offset=``.
* ``positions`` (input): True if the call takes ``positions=`` (properties draw calls without it first).
* ``per_sequence_positions`` (input): True if ``positions`` may also be (b, s), one row per sequence;
  False for (s,) only.
* ``max_position`` (convention): None (default, unbounded) or the number N of rows of a precomputed
  table; every position the properties use is then below N. Properties reach positions in the
  thousands in float64, past common table lengths (2048, 4096, 8192).
Without offset and positions, the properties place a chunk at position p behind p zero tokens, which
RoPE (each token rotated alone) must rotate exactly as the offset would.

Canonical parameters
--------------------
None.

Properties (properties/test_rotary_embedding.py)
------------------------------------------------
agrees with this reference in float64, float32 and (CUDA) half precision, for both pairings (an
implementation doing the other pairing is told so, one reading per-sequence positions from row 0, one
ignoring positions, or one whose table wraps or clamps likewise); preserves the norm of every vector;
the score <rope(q, m), rope(k, n)> depends only on m - n, at positions in the thousands; position 0 is
the identity; rotating in chunks with offsets, with explicit positions, or a batch with per-sequence
positions, equals rotating the whole sequence (each sequence at its own positions); the two pairings are one map up
to de-interleaving; linear in x; RoFormer's long-term-decay bound (section 3.4.3) holds for every
query/key pair; odd head width is rejected; float64 gradcheck; dtype and device are preserved.
"""

from __future__ import annotations

import numpy as np
from einops import einsum

from spec.registry import Component, Option, boolean, component, positive_float, same_shape_as_first_input

PAIRINGS = ("adjacent", "half")


def _table_length(value) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0)


ROTARY_EMBEDDING = component(
    Component(
        name="RotaryEmbedding",
        kind="module",
        family="rotary_embedding",
        summary="rotate pairs of head dimensions by position * base^(-2i/e) (RoPE)",
        output_shape=same_shape_as_first_input,
        options=(
            Option("pairing", PAIRINGS, "init", "which dimensions pair up: 'adjacent' (2i, 2i + 1) or 'half' "
                   "(i, i + e/2)"),
            positive_float("base", "theta_i = base^(-2i/e); default 10000", draws=(10000.0, 100.0, 500000.0)),
            boolean("offset", "the call takes offset= (the position of the chunk's first token)", argument="offset"),
            boolean("positions", "the call takes explicit positions=", default=False, argument="positions"),
            boolean("per_sequence_positions", "positions are (b, s), one row per sequence (False: (s,), shared)",
                    default=False),
            Option("max_position", (None,), "convention", "the length N of a precomputed cos/sin table: "
                   "positions stay below N (None: any position)", accepts=_table_length),
        ),
    )
)


def frequencies(e: int, base: float) -> np.ndarray:
    """theta_i = base^(-2i/e), i = 0 .. e/2 - 1, in float64."""
    if e % 2:
        raise ValueError(f"head_dim={e} must be even")
    return float(base) ** (-2.0 * np.arange(e // 2, dtype=np.float64) / e)


def pair_indices(e: int, pairing: str) -> tuple[np.ndarray, np.ndarray]:
    """The dimensions (u_i, v_i) that pair i rotates, for i = 0 .. e/2 - 1."""
    i = np.arange(e // 2)
    if pairing == "adjacent":
        return 2 * i, 2 * i + 1
    if pairing == "half":
        return i, i + e // 2
    raise ValueError(f"pairing={pairing!r} is not one of {PAIRINGS}")


def deinterleave(e: int) -> np.ndarray:
    """The permutation taking the adjacent layout to the half layout: x[..., deinterleave(e)]."""
    return np.concatenate([np.arange(0, e, 2), np.arange(1, e, 2)])


def token_positions(s: int, offset: int = 0, positions: np.ndarray | None = None) -> np.ndarray:
    """p_j = offset + (positions[j] if given, else j), as float64: (s,), or (b, s) for per-sequence
    positions (b, s)."""
    base = np.arange(s) if positions is None else np.asarray(positions)
    if base.shape[-1:] != (s,) or base.ndim > 2:
        raise ValueError(f"positions must have shape (s,) or (b, s) with s={s}, got {base.shape}")
    return offset + base.astype(np.float64)


def rotary_embedding(
    x: np.ndarray,
    *,
    base: float = 10000.0,
    pairing: str = "adjacent",
    offset: int = 0,
    positions: np.ndarray | None = None,
) -> np.ndarray:
    """The float64 reference: rotate each pair (u_i, v_i) of token j by p_j * theta_i (x (b, h, s, e);
    per-sequence positions (b, s) rotate sequence b by its own row, on every head)."""
    x = np.asarray(x, dtype=np.float64)
    s, e = x.shape[-2], x.shape[-1]
    theta = frequencies(e, base)
    p = token_positions(s, offset, positions)
    if p.ndim == 2:  # (b, s) -> (b, 1, s, i): one row per sequence, shared by its heads
        angle = einsum(p, theta, "b s, i -> b s i")[:, None]
    else:
        angle = einsum(p, theta, "s, i -> s i")
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = pair_indices(e, pairing)
    out = np.empty_like(x)
    out[..., u] = x[..., u] * cos - x[..., v] * sin
    out[..., v] = x[..., u] * sin + x[..., v] * cos
    return out


def as_complex_pairs(x: np.ndarray, pairing: str) -> np.ndarray:
    """z_i = x[u_i] + i x[v_i]: the head width as e/2 complex numbers (..., e/2)."""
    x = np.asarray(x, dtype=np.float64)
    u, v = pair_indices(x.shape[-1], pairing)
    return x[..., u] + 1j * x[..., v]


def decay_bound(q: np.ndarray, k: np.ndarray, distance: float, *, base: float, pairing: str) -> np.ndarray:
    """RoFormer's long-term-decay bound (section 3.4.3) for vectors q, k (..., e) at distance m - n.

    With h_i = z_i(q) conj(z_i(k)), h_{e/2} = 0, and S_j = sum_{i<j} exp(i (m - n) theta_i), Abel summation
    gives  |sum_i h_i exp(i (m - n) theta_i)| <= (max_i |h_{i+1} - h_i|) * sum_{i=0}^{e/2-1} |S_{i+1}|.
    The bound shrinks on average as |m - n| grows, but not monotonically. Returns the bound (...,).
    """
    h = as_complex_pairs(q, pairing) * np.conj(as_complex_pairs(k, pairing))  # (..., e/2)
    h = np.concatenate([h, np.zeros_like(h[..., :1])], axis=-1)  # h_{e/2} = 0
    steps = np.abs(np.diff(h, axis=-1)).max(axis=-1)
    theta = frequencies(np.asarray(q).shape[-1], base)
    partial_sums = np.cumsum(np.exp(1j * distance * theta))  # S_1 .. S_{e/2}
    return steps * np.abs(partial_sums).sum()


def rotated_score(q: np.ndarray, k: np.ndarray, distance: float, *, base: float, pairing: str) -> np.ndarray:
    """sum_i h_i exp(i (m - n) theta_i), the complex score whose real part is <rope(q, m), rope(k, n)>."""
    h = as_complex_pairs(q, pairing) * np.conj(as_complex_pairs(k, pairing))
    theta = frequencies(np.asarray(q).shape[-1], base)
    return (h * np.exp(1j * distance * theta)).sum(axis=-1)
