"""Properties of RotaryEmbedding (RoPE). Spec: spec/rotary_embedding.py.

Every case is drawn from what the implementation offers (properties/options.py): its pairing and base,
whether the call takes ``offset=`` and ``positions=``, and which positions shapes ((s,) shared, (b, s)
per sequence). Positions reach the thousands in float64, past the common lengths of precomputed cos/sin
tables, and stay below a declared ``max_position``. Where a claim needs tokens at position p and the
call takes neither offset nor positions, the chunk sits behind p zero tokens (RoPE rotates each token
alone), so every implementation is judged at the same positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from properties.attention_cases import OURS
from properties.assertions import PRECISIONS, assert_close, assert_true, fail, float64_rtol
from properties.options import Offers, draws_options
from properties.probes import expect_value_error, gradcheck
from properties.strategies import seeds, tensor
from spec import rotary_embedding as spec

pytestmark = pytest.mark.requires("RotaryEmbedding")
AXES = "b h s e"
OTHER = {"adjacent": "half", "half": "adjacent"}
PAIRS = {"adjacent": "pairs (2i, 2i + 1)", "half": "pairs (i, i + e/2)"}
DESCRIBE = {"adjacent": PAIRS["adjacent"] + ", as Meta's Llama", "half": PAIRS["half"] + ", as HF rotate_half"}

# Positions each precision is judged at. Half precision goes far (that is where angles computed in
# float16 break); float32 stays where any float32 formula for theta_i is within the error-ratio rule
# (an angle p * theta_i carries p times theta_i's rounding, and formulas round theta_i differently);
# float64 goes past every common table length.
POSITION_LIMIT = {torch.float64: 10000, torch.float32: 16, torch.float16: 4096, torch.bfloat16: 4096}
# The lengths of common precomputed cos/sin tables (GPT-NeoX 2048, Llama 2 4096, 8192): positions at
# and just below them are drawn often, so a table that wraps or clamps past its end shows.
TABLE_LENGTHS = (2048, 4096, 8192)
# Bases judged in float32 and half precision: base 100 has the coarsest frequencies, whose float32
# rounding differs most between formulas (see POSITION_LIMIT); float64 draws every offered base.
LOW_PRECISION_BASES = (10000.0, 500000.0)


def largest_position(offers: Offers, dtype: torch.dtype = torch.float64) -> int:
    """The largest position a property may rotate at: the precision's limit, below a declared table. A
    RoPE declaring float32 compute is judged at float32's positions in its float64 checks too (its table's
    rounding grows with the position, which the float32 rule bounds only where float32 is judged)."""
    table = offers.default("max_position")
    if dtype == torch.float64 and offers.compute_dtype == torch.float32:
        dtype = torch.float32
    return POSITION_LIMIT[dtype] if table is None else min(POSITION_LIMIT[dtype], table - 1)


def position_values(largest: int) -> st.SearchStrategy[int]:
    """Integers 0 .. largest, with the last rows of common tables (N - 1 and N) drawn often."""
    edges = sorted({p for n in TABLE_LENGTHS for p in (n - 1, n) if p <= largest})
    values = st.integers(0, max(largest, 0))
    return values | st.sampled_from(edges) if edges else values


@dataclass(frozen=True)
class RopeConfig:
    """x (b, h, s, e) for RotaryEmbedding(head_dim=e, base=base, pairing=pairing)."""

    b: int
    h: int
    s: int
    e: int
    base: float
    pairing: str

    def __repr__(self) -> str:
        return f"RopeConfig(b={self.b}, h={self.h}, s={self.s}, e={self.e}, base={self.base:g}, pairing={self.pairing!r})"

    @property
    def ctor(self) -> dict:
        return {"head_dim": self.e, "base": self.base, "pairing": self.pairing}


@draws_options("RotaryEmbedding", pairing=lambda cfg: cfg.pairing, base=lambda cfg: cfg.base)
@st.composite
def rope_configs(draw, offers: Offers, *, max_s: int = 8, max_e: int = 8, min_e: int = 2, min_b: int = 1,
                 dtype: torch.dtype = torch.float64) -> RopeConfig:
    """Sizes and the offered pairing and base (in low precision the bases of LOW_PRECISION_BASES where
    offered); s stays within a declared table."""
    bases = offers.offered("base")
    if dtype != torch.float64:
        bases = offers.where("base", lambda v: v in LOW_PRECISION_BASES) or bases
    return RopeConfig(
        b=draw(st.integers(min_b, max(min_b, 2)), label="b"),
        h=draw(st.integers(1, 2), label="h"),
        s=draw(st.integers(1, min(max_s, largest_position(offers, dtype) + 1)), label="s"),
        e=2 * draw(st.integers(min_e // 2, max_e // 2), label="e/2"),
        base=draw(st.sampled_from(bases) if len(bases) > 1 else st.just(bases[0]), label="base"),
        pairing=draw(offers.strategy("pairing"), label="pairing"),
    )


@dataclass(frozen=True)
class RopeCall:
    """One call: cfg, the seed of x, and how positions are given: ``offset=`` (when ``with_offset``) and
    ``positions=`` ((s,), or (b, s) when ``per_sequence``; None: not passed)."""

    cfg: RopeConfig
    seed: int
    with_offset: bool
    offset: int
    positions: np.ndarray | None
    per_sequence: bool

    @property
    def kwargs(self) -> dict:
        kwargs = {"offset": self.offset} if self.with_offset else {}
        if self.positions is not None:
            kwargs["positions"] = self.positions
        return kwargs

    def tensors(self, device) -> dict:
        """The call's keywords, positions as a tensor on ``device``."""
        return {k: torch.as_tensor(v, device=device) if isinstance(v, np.ndarray) else v
                for k, v in self.kwargs.items()}

    def token_positions(self) -> np.ndarray:
        """The position of every token, (s,) or (b, s)."""
        return spec.token_positions(self.cfg.s, self.offset, self.positions)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v.tolist() if isinstance(v, np.ndarray) else v}" for k, v in self.kwargs.items())
        return f"{self.cfg} called with ({shown or 'no positions'})"


@draws_options("RotaryEmbedding", pairing=lambda call: call.cfg.pairing, base=lambda call: call.cfg.base,
               offset=lambda call: call.with_offset, positions=lambda call: call.positions is not None,
               per_sequence_positions=lambda call: call.per_sequence)
@st.composite
def rope_calls(draw, offers: Offers, *, dtype: torch.dtype = torch.float64) -> RopeCall:
    """A configuration and a call the implementation offers, at positions up to the precision's limit
    (and below a declared table): an offset, explicit positions ((s,) or (b, s)), both, or neither."""
    cfg = draw(rope_configs(offers, dtype=dtype), label="cfg")
    largest = largest_position(offers, dtype)
    with_offset = draw(offers.strategy("offset"), label="with_offset")
    with_positions = draw(offers.strategy("positions"), label="with_positions")
    per_sequence = draw(offers.strategy("per_sequence_positions"), label="per_sequence")
    offset = draw(position_values(largest - cfg.s + 1), label="offset") if with_offset else 0
    positions = None
    if with_positions:
        rows = cfg.b if per_sequence else 1
        flat = draw(st.lists(position_values(largest - offset), min_size=rows * cfg.s, max_size=rows * cfg.s),
                    label="positions")
        positions = np.asarray(flat).reshape((rows, cfg.s) if per_sequence else (cfg.s,))
    return RopeCall(cfg, draw(seeds(), label="seed"), with_offset, offset, positions, per_sequence)


def heads(cfg: RopeConfig, seed: int, dtype=torch.float64, device="cpu", s: int | None = None) -> torch.Tensor:
    return tensor(seed, cfg.b, cfg.h, cfg.s if s is None else s, cfg.e, dtype=dtype, device=device)


def build(impl, cfg: RopeConfig, device="cpu", dtype=torch.float64, **changes):
    return impl.build("RotaryEmbedding", seed=0, device=device, dtype=dtype, **{**cfg.ctor, **changes})


def ours(cfg: RopeConfig, device="cpu", dtype=torch.float64, **changes) -> torch.nn.Module:
    """Our RotaryEmbedding for cfg (a declared base or pairing included), the same-dtype baseline of the
    error-ratio rule."""
    return build(OURS, cfg, device, dtype, **changes).module


def reference(x: torch.Tensor, cfg: RopeConfig, *, pairing: str | None = None, **call) -> np.ndarray:
    call = {k: (v.cpu().numpy() if isinstance(v, torch.Tensor) else v) for k, v in call.items()}
    return spec.rotary_embedding(x.double().cpu().numpy(), base=cfg.base, pairing=pairing or cfg.pairing, **call)


def rotate_at(rope, x: torch.Tensor, start: int, offers: Offers, *, prefer: str = "offset") -> torch.Tensor:
    """x's tokens rotated at positions start .. start + s - 1, however the implementation takes positions:
    ``offset=`` where offered, else explicit positions (``prefer="positions"``: the other way round),
    else behind ``start`` zero tokens (RoPE rotates each token alone, so the prefix changes nothing but
    the positions)."""
    __tracebackhide__ = True
    s = x.shape[-2]
    ways = ("offset", "positions") if prefer == "offset" else ("positions", "offset")
    way = next((w for w in ways if offers.offers(w)), None)
    if way == "offset":
        return rope(x, offset=start)
    if way == "positions":
        return rope(x, positions=torch.arange(start, start + s, device=x.device))
    if start == 0:
        return rope(x)
    prefix = x.new_zeros(*x.shape[:-2], start, x.shape[-1])
    return rope(torch.cat([prefix, x], dim=-2))[..., start:, :]


def agrees(out: torch.Tensor, x: torch.Tensor, cfg: RopeConfig, device, dtype, **call) -> bool:
    """Whether ``out`` is the reference rotation of x for ``call`` (pairing=, offset=, positions=), by
    the rule of its dtype (with our implementation, called the same way, as the baseline)."""
    pairing = call.pop("pairing", cfg.pairing)
    baseline = ours(cfg, device, dtype, pairing=pairing)(x, **call)
    try:
        assert_close(out, reference(x, cfg, pairing=pairing, **call), baseline=baseline, claim="")
    except AssertionError:
        return False
    return True


TABLE_HINT = (
    "a precomputed cos/sin table of N rows answers positions p >= N with another row (wrapping: p % N; "
    "clamping: N - 1) and rotates by the wrong angle. Compute the angles for any position, or declare "
    "the table's length, spec_options = {'max_position': N}, and be judged below it."
)


@pytest.mark.parametrize("dtype", PRECISIONS)
@given(data=st.data())
def test_rope_agrees_with_reference(impl, device, dtype, data):
    """The output equals the spec's float64 rotation, for the offered pairings and bases, with an offset,
    explicit positions ((s,) or per sequence (b, s)), both or neither, at positions up to the thousands.
    When it does not, the failure says which usual mistake the output matches: the other pairing,
    per-sequence positions read from row 0, positions ignored, or a table that wraps or clamps.

    Hint: rotate counter-clockwise (u cos - v sin, u sin + v cos); theta_i = base^(-2i/e); compute the
    angles in float32 or wider and cast cos/sin to x's dtype.
    """
    offers = impl.offers("RotaryEmbedding")
    call = data.draw(rope_calls(offers, dtype=dtype), label="call")
    cfg, kwargs = call.cfg, call.tensors(device)
    x = heads(cfg, call.seed, dtype, device)
    out = build(impl, cfg, device, dtype)(x, **kwargs)
    baseline = ours(cfg, device, dtype)(x, **kwargs)
    claim = f"RotaryEmbedding agrees with the spec's reference ({call}, {dtype})"
    hint = "pair i is (2i, 2i + 1) for 'adjacent' and (i, i + e/2) for 'half'; angle = (offset + j) * base^(-2i/e)."
    try:
        assert_close(out, reference(x, cfg, **kwargs), baseline=baseline, axes=AXES, claim=claim, hint=hint)
        return
    except AssertionError as exc:
        mismatch = exc
    # Wrong: does the output match a usual mistake? Then say so instead of printing numbers.
    other = OTHER[cfg.pairing]
    declared = "declares" if offers.fixed("pairing") else "was built with"
    if agrees(out, x, cfg, device, dtype, pairing=other, **kwargs):
        fail(
            claim,
            f"it {declared} pairing={cfg.pairing!r} ({DESCRIBE[cfg.pairing]}), but its output matches "
            f"pairing={other!r} ({DESCRIBE[other]})",
            f"for pairing={cfg.pairing!r} rotate the {PAIRS[cfg.pairing]}: check how you split x into the "
            "two members of each pair, and that the constructor's `pairing` reaches forward.",
        )
    positions = kwargs.get("positions")
    if positions is not None and positions.dim() == 2 and cfg.b > 1:
        if agrees(out, x, cfg, device, dtype, **{**kwargs, "positions": positions[:1].expand(cfg.b, -1)}):
            fail(claim, "every sequence was rotated at the positions of row 0 of the (b, s) positions",
                 "per-sequence positions (b, s) give sequence b the row positions[b] (on every head): "
                 "broadcast cos/sin as (b, 1, s, e/2), do not take positions[0].")
    if kwargs:
        # The same kind of call at small positions (every token at j + 1): does the module ignore what
        # it was given, or is it right there and wrong only at this call's (large) positions?
        small = {"offset": 1} if call.with_offset else {}
        if positions is not None:
            ones = torch.arange(cfg.s, device=device) + (0 if call.with_offset else 1)
            small["positions"] = ones.expand(positions.shape)
        out_small = build(impl, cfg, device, dtype)(x, **small)
        if agrees(out_small, x, cfg, device, dtype, **small):
            p = call.token_positions()
            fail(claim, f"it agrees with every token at j + 1 (positions 1 .. {cfg.s}), but not at this call's "
                 f"positions {int(p.min())} .. {int(p.max())}", TABLE_HINT)
        if agrees(out_small, x, cfg, device, dtype):
            fail(claim, f"its output is x rotated at positions 0 .. {cfg.s - 1} whatever {' and '.join(small)} "
                 "say", "token j sits at offset + j, or offset + positions[j]; pass both on to the angles.")
    raise mismatch


@given(data=st.data())
def test_rope_preserves_the_norm_of_every_vector(impl, device, data):
    """|rope(x)[b, h, j]| = |x[b, h, j]| for every head vector: each pair is rotated, and rotations keep length.

    Hint: rotate_half is cat(-x2, x1), with the minus sign; without it the map is not a rotation.
    """
    offers = impl.offers("RotaryEmbedding")
    cfg = data.draw(rope_configs(offers), label="cfg")
    start = data.draw(position_values(largest_position(offers) - cfg.s + 1), label="start")
    x = heads(cfg, data.draw(seeds(), label="seed"), device=device)
    out = rotate_at(build(impl, cfg, device), x, start, offers)
    assert_close(
        out.norm(dim=-1), x.norm(dim=-1), axes="b h s",
        claim=f"RoPE preserves the norm of every head vector ({cfg}, positions from {start})",
        hint="each pair (u, v) becomes (u cos - v sin, u sin + v cos).",
    )


@given(data=st.data())
def test_rope_scores_depend_only_on_relative_position(impl, device, data):
    """<rope(q, m + i), rope(k, n + j)> is unchanged when both positions move by the same shift, at
    positions up to the thousands: the attention score sees only the distance between query and key.

    Hint: u and v of a pair must be rotated by the same angle, with opposite-signed sin terms; and every
    position must get its own angle (a cos/sin table that wraps or clamps past its end breaks this).
    """
    offers = impl.offers("RotaryEmbedding")
    cfg = data.draw(rope_configs(offers), label="cfg")
    half = (largest_position(offers) - cfg.s + 1) // 2
    m, n = data.draw(position_values(half), label="m"), data.draw(position_values(half), label="n")
    shift = data.draw(st.integers(0, half), label="shift")
    seed = data.draw(seeds(), label="seed")
    rope = build(impl, cfg, device)
    q, k = heads(cfg, seed, device=device), heads(cfg, seed + 1, device=device)
    scores = rotate_at(rope, q, m, offers) @ rotate_at(rope, k, n, offers).transpose(-2, -1)
    shifted = rotate_at(rope, q, m + shift, offers) @ rotate_at(rope, k, n + shift, offers).transpose(-2, -1)
    assert_close(
        shifted, scores, axes="b h s t",
        claim=f"RoPE scores depend only on the query-key distance ({cfg}, query from {m}, key from {n}, shift {shift})",
        hint="a rotation R(a) satisfies R(a)^T R(b) = R(b - a); a map that is not a rotation breaks this. "
        + TABLE_HINT,
    )


@given(data=st.data())
def test_rope_at_position_zero_is_the_identity(impl, device, data):
    """A token at position 0 is returned unchanged: with explicit positions 0 (where offered), and as the
    first token of a call at offset 0 (or without an offset).

    Hint: positions start at 0 (arange(s), not arange(1, s + 1)).
    """
    offers = impl.offers("RotaryEmbedding")
    cfg = data.draw(rope_configs(offers), label="cfg")
    rope = build(impl, cfg, device)
    x = heads(cfg, data.draw(seeds(), label="seed"), device=device)
    claim = f"RoPE at position 0 is the identity ({cfg})"
    if offers.offers("positions"):
        zeros = torch.zeros(cfg.s, dtype=torch.long, device=device)
        assert_close(rope(x, positions=zeros), x, axes=AXES, claim=claim + " (positions all 0)",
                     hint="angle = position * theta_i is 0 at position 0: cos 1, sin 0.")
    assert_close(rotate_at(rope, x, 0, offers)[:, :, :1], x[:, :, :1], axes=AXES,
                 claim=claim + " (the first token of a call at offset 0)",
                 hint="the first token of a call with offset=0 sits at position 0.")


@given(data=st.data())
def test_rope_in_chunks_or_with_explicit_positions_equals_rope_of_the_whole_sequence(impl, device, data):
    """rope(x at positions o ..) equals: the chunks x[a:b] rotated from o + a; rope(x, positions=o + arange(s));
    rope(x, positions=arange(s), offset=o); shuffling tokens together with their positions; and, with
    per-sequence positions (b, s) (a left-padded batch), each sequence rotated alone from its own start.
    Each part runs where the implementation offers what it needs; o reaches the thousands.

    This is what cached decoding relies on. Hint: position = offset + (positions[j] if given, else j);
    per-sequence positions give sequence b the row positions[b].
    """
    offers = impl.offers("RotaryEmbedding")
    cfg = data.draw(rope_configs(offers), label="cfg")
    largest = largest_position(offers) - cfg.s + 1
    offset = data.draw(position_values(largest), label="offset")
    rope = build(impl, cfg, device)
    x = heads(cfg, data.draw(seeds(), label="seed"), device=device)
    whole = rotate_at(rope, x, offset, offers)
    cuts = sorted(data.draw(st.sets(st.integers(1, cfg.s - 1), max_size=3), label="cuts")) if cfg.s > 1 else []
    edges = [0, *cuts, cfg.s]
    chunked = torch.cat([rotate_at(rope, x[:, :, a:b], offset + a, offers) for a, b in zip(edges, edges[1:])], dim=2)
    hint = "token j of a call sits at offset + j (or offset + positions[j]); do not ignore offset or positions."
    assert_close(chunked, whole, axes=AXES, hint=hint,
                 claim=f"RoPE in chunks {list(zip(edges, edges[1:]))} from {offset} equals RoPE of the whole ({cfg})")
    if not offers.offers("positions"):
        return
    absolute = torch.arange(offset, offset + cfg.s, device=device)
    assert_close(rope(x, positions=absolute), whole, axes=AXES, hint=hint,
                 claim=f"RoPE with positions={absolute.tolist()} equals RoPE with offset={offset} ({cfg})")
    if offers.offers("offset"):
        relative = torch.arange(cfg.s, device=device)
        assert_close(rope(x, positions=relative, offset=offset), whole, axes=AXES, hint=hint,
                     claim=f"RoPE with positions=arange(s) and offset={offset} equals offset={offset} alone ({cfg})")
    perm = torch.tensor(data.draw(st.permutations(range(cfg.s)), label="perm"), device=device)
    assert_close(rope(x[:, :, perm], positions=absolute[perm]), whole[:, :, perm],
                 axes=AXES, hint=hint,
                 claim=f"RoPE of shuffled tokens with their positions is the shuffled RoPE ({cfg}, perm={perm.tolist()})")
    if not data.draw(offers.strategy("per_sequence_positions"), label="per_sequence"):
        return
    starts = data.draw(st.lists(position_values(largest), min_size=cfg.b, max_size=cfg.b), label="starts")
    rows = torch.tensor(starts, device=device)[:, None] + torch.arange(cfg.s, device=device)  # (b, s)
    alone = torch.cat([rotate_at(rope, x[i : i + 1], start, offers) for i, start in enumerate(starts)])
    assert_close(rope(x, positions=rows), alone, axes=AXES,
                 claim=f"RoPE of a batch with per-sequence positions starting at {starts} rotates each sequence "
                 f"as if alone at its own positions ({cfg})",
                 hint="positions (b, s) give sequence b the row positions[b], on every head: cos/sin of shape "
                 "(b, 1, s, e/2); not positions[0] for all, and not flattened across the batch.")


@pytest.mark.needs(pairing="adjacent")
@pytest.mark.needs(pairing="half")
@given(data=st.data())
def test_rope_pairings_are_one_map_up_to_deinterleaving(impl, device, data):
    """With D = x[..., [0, 2, 4, .., 1, 3, 5, ..]] (de-interleaving): rope_half(D x) = D rope_adjacent(x).

    Hint: 'adjacent' rotates (x[2i], x[2i+1]); 'half' rotates (x[i], x[i + e/2]); both by theta_i.
    """
    offers = impl.offers("RotaryEmbedding")
    cfg = data.draw(rope_configs(offers), label="cfg")
    start = data.draw(position_values(min(1000, largest_position(offers) - cfg.s + 1)), label="start")
    x = heads(cfg, data.draw(seeds(), label="seed"), device=device)
    adjacent = build(impl, cfg, device, pairing="adjacent")
    half = build(impl, cfg, device, pairing="half")
    d = torch.as_tensor(spec.deinterleave(cfg.e), device=device)
    assert_close(
        rotate_at(half, x[..., d], start, offers), rotate_at(adjacent, x, start, offers)[..., d], axes=AXES,
        claim=f"pairing='half' on de-interleaved x equals pairing='adjacent' de-interleaved (e={cfg.e}, "
        f"base={cfg.base:g}, positions from {start})",
        hint="does your module read its `pairing` argument? 'adjacent' pairs neighbours, 'half' pairs the two halves.",
    )


@given(data=st.data(), a=st.floats(-3, 3, allow_nan=False), c=st.floats(-3, 3, allow_nan=False))
def test_rope_is_linear_in_its_input(impl, device, data, a, c):
    """rope(a x + c y) = a rope(x) + c rope(y): RoPE multiplies by a fixed matrix per position, adds nothing.

    Hint: RoPE rotates x; it does not add a sinusoidal table to it.
    """
    offers = impl.offers("RotaryEmbedding")
    cfg = data.draw(rope_configs(offers), label="cfg")
    start = data.draw(position_values(min(1000, largest_position(offers) - cfg.s + 1)), label="start")
    seed = data.draw(seeds(), label="seed")
    rope = build(impl, cfg, device)
    x, y = heads(cfg, seed, device=device), heads(cfg, seed + 1, device=device)
    assert_close(
        rotate_at(rope, a * x + c * y, start, offers),
        a * rotate_at(rope, x, start, offers) + c * rotate_at(rope, y, start, offers), axes=AXES,
        claim=f"RoPE is linear in its input ({cfg}, positions from {start}, a={a:g}, c={c:g})",
        hint="out = x * cos + rotate(x) * sin, nothing added, nothing normalised.",
    )


def structured_pair(e: int, seed: int, pairing: str) -> np.ndarray:
    """A vector whose pairs have |z_i|^2 = e/2 - i at random phases; with k = q, h_i = e/2 - i is a ramp,
    the case where RoFormer's bound is tightest."""
    rng = np.random.default_rng(seed)
    i = np.arange(e // 2)
    z = np.sqrt(e // 2 - i) * np.exp(1j * rng.uniform(0, 2 * np.pi, e // 2))
    x = np.empty(e)
    u, v = spec.pair_indices(e, pairing)
    x[u], x[v] = z.real, z.imag
    return x


@given(data=st.data())
def test_rope_satisfies_roformer_long_term_decay_bound(impl, device, data):
    """For every query/key pair, |sum_i h_i e^{i(m-n)theta_i}| <= (max_i |h_{i+1} - h_i|) * sum_i |S_{i+1}|,
    with h_i = q_i conj(k_i) over complex pairs, h_{e/2} = 0 and S_j = sum_{i<j} e^{i(m-n)theta_i}
    (RoFormer section 3.4.3). The complex sum is read from the module: its real part is the score
    <rope(q, m), rope(k, n)>, minus its imaginary part the score with k turned by 90 degrees in every pair.

    The bound shrinks on average with distance but not monotonically; only the bound is claimed.
    Hint: the angle must be position * theta_i with the spec's theta_i, at the positions given.
    """
    offers = impl.offers("RotaryEmbedding")
    cfg = data.draw(rope_configs(offers), label="cfg")
    top = min(5000, largest_position(offers))
    m, n = data.draw(st.integers(0, top), label="m"), data.draw(st.integers(0, top), label="n")
    seed = data.draw(seeds(), label="seed")
    rope = build(impl, cfg, device)
    count = cfg.b * cfg.h * cfg.s
    q = tensor(seed, count, cfg.e, dtype=torch.float64, device="cpu")
    k = tensor(seed + 1, count, cfg.e, dtype=torch.float64, device="cpu")
    ramp = torch.from_numpy(structured_pair(cfg.e, seed, cfg.pairing))
    q, k = torch.cat([q, ramp[None]]), torch.cat([k, ramp[None]])
    u, v = (torch.from_numpy(i) for i in spec.pair_indices(cfg.e, cfg.pairing))
    k_turned = torch.empty_like(k)
    k_turned[:, u], k_turned[:, v] = k[:, v], -k[:, u]  # z(k) * (-i)
    as_heads = lambda t: t.to(device)[:, None, None, :]  # noqa: E731  (count + 1, 1, 1, e): one token each
    at = lambda t, pos: rotate_at(rope, as_heads(t), pos, offers, prefer="positions")  # noqa: E731
    rq = at(q, m)
    real = (rq * at(k, n)).sum(-1).flatten().cpu()
    imag = -(rq * at(k_turned, n)).sum(-1).flatten().cpu()
    magnitude = torch.hypot(real, imag)
    bound = torch.from_numpy(spec.decay_bound(q.numpy(), k.numpy(), m - n, base=cfg.base, pairing=cfg.pairing))
    # Rounding: the bound is tight for the ramp pair; float64's rule, or float32's for a declared float32 RoPE.
    excess = magnitude - bound * (1 + float64_rtol()) - 1e-12
    worst = int(excess.argmax())
    assert_true(
        bool((excess <= 0).all()),
        claim=f"RoFormer's long-term-decay bound holds at distance m - n = {m - n} (m={m}, n={n}, e={cfg.e}, "
        f"base={cfg.base:g}, pairing={cfg.pairing!r})",
        detail=f"pair {worst}{' (the ramp h_i = e/2 - i)' if worst == count else ''}: |score| {magnitude[worst]:.6g} > "
        f"bound {bound[worst]:.6g}",
        hint="rotate token j by positions[j] * base^(-2i/e) (offset + j without positions); a module that ignores "
        "`positions` rotates nothing here.",
    )


@given(e=st.integers(0, 4).map(lambda k: 2 * k + 1))
def test_rope_rejects_odd_head_width(impl, e):
    """RotaryEmbedding(head_dim=odd) raises ValueError at construction: RoPE rotates pairs of dimensions."""
    claim = f"RotaryEmbedding(head_dim={e}) raises ValueError"
    hint = "check head_dim % 2 == 0 in __init__ and raise ValueError with the value."
    expect_value_error(lambda: impl.raw("RotaryEmbedding")(head_dim=e), claim=claim, hint=hint, what="it built a")


@given(data=st.data())
def test_rope_passes_gradcheck(impl, data):
    """float64 gradcheck: the gradient w.r.t. x is the transposed rotation (finite differences agree).

    Hint: writing the rotated halves back into x in place modifies the caller's tensor and breaks autograd;
    build a new tensor (torch.cat / torch.stack).
    """
    offers = impl.offers("RotaryEmbedding")
    cfg = data.draw(rope_configs(offers, max_s=4, max_e=6), label="cfg")
    start = data.draw(st.integers(0, min(100, largest_position(offers) - cfg.s + 1)), label="start")
    rope = build(impl, cfg)
    gradcheck(
        lambda x: rotate_at(rope, x, start, offers), (heads(cfg, data.draw(seeds(), label="seed")),),
        claim=f"RotaryEmbedding's gradient w.r.t. x is right ({cfg}, positions from {start})",
        hint="keep every step out of place and differentiable.",
    )


@pytest.mark.parametrize("dtype", PRECISIONS)
@given(data=st.data())
def test_rope_preserves_dtype_and_device(impl, device, dtype, data):
    """The output has x's dtype and device, whatever precision the angles were computed in.

    Hint: computing in float32 is right for half inputs, but cast the result (or cos/sin) back to x.dtype.
    """
    offers = impl.offers("RotaryEmbedding")
    cfg = data.draw(rope_configs(offers), label="cfg")
    start = data.draw(st.integers(0, min(100, largest_position(offers) - cfg.s + 1)), label="start")
    x = heads(cfg, data.draw(seeds(), label="seed"), dtype, device)
    out = rotate_at(build(impl, cfg, device, dtype), x, start, offers)
    assert_true(
        out.dtype == dtype and out.device == x.device,
        claim=f"RotaryEmbedding preserves dtype and device ({cfg})",
        detail=f"input {dtype} on {x.device}, output {out.dtype} on {out.device}",
        hint="cast back with .to(x.dtype) (Meta's Llama: .type_as(x)).",
    )
