"""Properties of RotaryEmbedding (RoPE). Spec: spec/rotary_embedding.py."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import implementations
from properties.assertions import PRECISIONS, assert_close, assert_true, fail
from properties.plugin import Implementation
from properties.probes import expect_value_error, gradcheck
from properties.strategies import seeds, tensor
from spec import rotary_embedding as spec

pytestmark = pytest.mark.requires("RotaryEmbedding")
OURS = Implementation("ours", implementations)
AXES = "b h s e"
OTHER = {"adjacent": "half", "half": "adjacent"}
PAIRS = {"adjacent": "pairs (2i, 2i + 1)", "half": "pairs (i, i + e/2)"}
DESCRIBE = {"adjacent": PAIRS["adjacent"] + ", as Meta's Llama", "half": PAIRS["half"] + ", as HF rotate_half"}


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


@st.composite
def rope_configs(draw, *, max_s: int = 8, max_e: int = 8, min_e: int = 2, bases=(10000.0, 100.0, 500000.0)) -> RopeConfig:
    return RopeConfig(
        b=draw(st.integers(1, 2), label="b"),
        h=draw(st.integers(1, 2), label="h"),
        s=draw(st.integers(1, max_s), label="s"),
        e=2 * draw(st.integers(min_e // 2, max_e // 2), label="e/2"),
        base=draw(st.sampled_from(bases), label="base"),
        pairing=draw(st.sampled_from(spec.PAIRINGS), label="pairing"),
    )


def heads(cfg: RopeConfig, seed: int, dtype=torch.float64, device="cpu", s: int | None = None) -> torch.Tensor:
    return tensor(seed, cfg.b, cfg.h, cfg.s if s is None else s, cfg.e, dtype=dtype, device=device)


def build(impl, cfg: RopeConfig, device="cpu", dtype=torch.float64, **changes):
    return impl.build("RotaryEmbedding", seed=0, device=device, dtype=dtype, **{**cfg.ctor, **changes})


def reference(x: torch.Tensor, cfg: RopeConfig, *, pairing: str | None = None, **call) -> np.ndarray:
    call = {k: (v.cpu().numpy() if isinstance(v, torch.Tensor) else v) for k, v in call.items()}
    return spec.rotary_embedding(x.double().cpu().numpy(), base=cfg.base, pairing=pairing or cfg.pairing, **call)


# Positions each precision is judged at. Half precision goes far (that is where angles computed in
# float16 break); float32 stays where any float32 formula for theta_i is within the error-ratio rule.
POSITION_LIMIT = {torch.float64: 10000, torch.float32: 16, torch.float16: 4096, torch.bfloat16: 4096}


@pytest.mark.parametrize("dtype", PRECISIONS)
@given(data=st.data())
def test_rope_agrees_with_reference(impl, device, dtype, data):
    """The output equals the spec's float64 rotation, for both pairings, with an offset or explicit positions.
    An implementation whose declared pairing is really the other one is told so.

    Hint: rotate counter-clockwise (u cos - v sin, u sin + v cos); theta_i = base^(-2i/e); compute the
    angles in float32 or wider and cast cos/sin to x's dtype.
    """
    bases = (10000.0, 100.0, 500000.0) if dtype == torch.float64 else (10000.0, 500000.0)
    cfg = data.draw(rope_configs(bases=bases), label="cfg")
    limit = POSITION_LIMIT[dtype]
    seed = data.draw(seeds(), label="seed")
    offset = data.draw(st.integers(0, limit), label="offset")
    positions = None
    if data.draw(st.booleans(), label="explicit_positions"):
        positions = torch.tensor(data.draw(st.lists(st.integers(0, limit), min_size=cfg.s, max_size=cfg.s)), device=device)
    x = heads(cfg, seed, dtype, device)
    out = build(impl, cfg, device, dtype)(x, offset=offset, positions=positions)
    baseline = build(OURS, cfg, device, dtype)(x, offset=offset, positions=positions)
    claim = f"RotaryEmbedding agrees with the spec's reference ({cfg}, offset={offset}, positions={None if positions is None else positions.tolist()}, {dtype})"
    hint = "pair i is (2i, 2i + 1) for 'adjacent' and (i, i + e/2) for 'half'; angle = (offset + j) * base^(-2i/e)."
    want = reference(x, cfg, offset=offset, positions=positions)
    try:
        assert_close(out, want, baseline=baseline, axes=AXES, claim=claim, hint=hint)
        return
    except AssertionError as exc:
        mismatch = exc
    # Wrong: is it the other pairing? Then say so instead of printing numbers.
    other = OTHER[cfg.pairing]
    other_baseline = build(OURS, cfg, device, dtype, pairing=other)(x, offset=offset, positions=positions)
    try:
        assert_close(out, reference(x, cfg, pairing=other, offset=offset, positions=positions),
                     baseline=other_baseline, claim=claim)
    except AssertionError:
        raise mismatch from None
    fail(
        claim,
        f"it was built with pairing={cfg.pairing!r} ({DESCRIBE[cfg.pairing]}), but its output matches "
        f"pairing={other!r} ({DESCRIBE[other]})",
        f"for pairing={cfg.pairing!r} rotate the {PAIRS[cfg.pairing]}: check how you split x into the "
        "two members of each pair, and that the constructor's `pairing` reaches forward.",
    )


@given(cfg=rope_configs(), seed=seeds(), offset=st.integers(0, 10000))
def test_rope_preserves_the_norm_of_every_vector(impl, device, cfg, seed, offset):
    """|rope(x)[b, h, j]| = |x[b, h, j]| for every head vector: each pair is rotated, and rotations keep length.

    Hint: rotate_half is cat(-x2, x1), with the minus sign; without it the map is not a rotation.
    """
    x = heads(cfg, seed, device=device)
    out = build(impl, cfg, device)(x, offset=offset)
    assert_close(
        out.norm(dim=-1), x.norm(dim=-1), axes="b h s",
        claim=f"RoPE preserves the norm of every head vector ({cfg}, offset={offset})",
        hint="each pair (u, v) becomes (u cos - v sin, u sin + v cos).",
    )


@given(cfg=rope_configs(), seed=seeds(), m=st.integers(0, 1000), n=st.integers(0, 1000), shift=st.integers(0, 1000))
def test_rope_scores_depend_only_on_relative_position(impl, device, cfg, seed, m, n, shift):
    """<rope(q, m + i), rope(k, n + j)> is unchanged when both positions move by the same shift:
    the attention score sees only the distance between query and key.

    Hint: u and v of a pair must be rotated by the same angle, with opposite-signed sin terms.
    """
    rope = build(impl, cfg, device)
    q, k = heads(cfg, seed, device=device), heads(cfg, seed + 1, device=device)
    scores = rope(q, offset=m) @ rope(k, offset=n).transpose(-2, -1)
    shifted = rope(q, offset=m + shift) @ rope(k, offset=n + shift).transpose(-2, -1)
    assert_close(
        shifted, scores, axes="b h s t",
        claim=f"RoPE scores depend only on the query-key distance ({cfg}, query offset {m}, key offset {n}, shift {shift})",
        hint="a rotation R(a) satisfies R(a)^T R(b) = R(b - a); a map that is not a rotation breaks this.",
    )


@given(cfg=rope_configs(), seed=seeds())
def test_rope_at_position_zero_is_the_identity(impl, device, cfg, seed):
    """A token at position 0 is returned unchanged: with explicit positions 0, and as the first token at offset 0.

    Hint: positions start at 0 (arange(s), not arange(1, s + 1)).
    """
    rope = build(impl, cfg, device)
    x = heads(cfg, seed, device=device)
    zeros = torch.zeros(cfg.s, dtype=torch.long, device=device)
    claim = f"RoPE at position 0 is the identity ({cfg})"
    assert_close(rope(x, positions=zeros), x, axes=AXES, claim=claim + " (positions all 0)",
                 hint="angle = position * theta_i is 0 at position 0: cos 1, sin 0.")
    assert_close(rope(x, offset=0)[:, :, :1], x[:, :, :1], axes=AXES, claim=claim + " (the first token at offset 0)",
                 hint="the first token of a call with offset=0 sits at position 0.")


@given(cfg=rope_configs(), seed=seeds(), offset=st.integers(0, 100), data=st.data())
def test_rope_in_chunks_or_with_explicit_positions_equals_rope_of_the_whole_sequence(impl, device, cfg, seed, offset, data):
    """rope(x, offset=o) equals: the chunks x[a:b] rotated with offset o + a; rope(x, positions=o + arange(s));
    rope(x, positions=arange(s), offset=o); and shuffling tokens together with their positions.

    This is what cached decoding relies on. Hint: position = offset + (positions[j] if given, else j).
    """
    rope = build(impl, cfg, device)
    x = heads(cfg, seed, device=device)
    whole = rope(x, offset=offset)
    cuts = sorted(data.draw(st.sets(st.integers(1, cfg.s - 1), max_size=3), label="cuts")) if cfg.s > 1 else []
    edges = [0, *cuts, cfg.s]
    chunked = torch.cat([rope(x[:, :, a:b], offset=offset + a) for a, b in zip(edges, edges[1:])], dim=2)
    hint = "token j of a call sits at offset + j (or offset + positions[j]); do not ignore offset or positions."
    assert_close(chunked, whole, axes=AXES, hint=hint,
                 claim=f"RoPE in chunks {list(zip(edges, edges[1:]))} with offsets equals RoPE of the whole ({cfg}, offset={offset})")
    absolute = torch.arange(offset, offset + cfg.s, device=device)
    assert_close(rope(x, positions=absolute), whole, axes=AXES, hint=hint,
                 claim=f"RoPE with positions={absolute.tolist()} equals RoPE with offset={offset} ({cfg})")
    relative = torch.arange(cfg.s, device=device)
    assert_close(rope(x, positions=relative, offset=offset), whole, axes=AXES, hint=hint,
                 claim=f"RoPE with positions=arange(s) and offset={offset} equals offset={offset} alone ({cfg})")
    perm = torch.tensor(data.draw(st.permutations(range(cfg.s)), label="perm"), device=device)
    assert_close(rope(x[:, :, perm], positions=absolute[perm]), whole[:, :, perm], axes=AXES, hint=hint,
                 claim=f"RoPE of shuffled tokens with their positions is the shuffled RoPE ({cfg}, perm={perm.tolist()})")


@given(cfg=rope_configs(), seed=seeds(), offset=st.integers(0, 1000))
def test_rope_pairings_are_one_map_up_to_deinterleaving(impl, device, cfg, seed, offset):
    """With D = x[..., [0, 2, 4, .., 1, 3, 5, ..]] (de-interleaving): rope_half(D x) = D rope_adjacent(x).

    Hint: 'adjacent' rotates (x[2i], x[2i+1]); 'half' rotates (x[i], x[i + e/2]); both by theta_i.
    """
    x = heads(cfg, seed, device=device)
    adjacent = build(impl, cfg, device, pairing="adjacent")
    half = build(impl, cfg, device, pairing="half")
    d = torch.as_tensor(spec.deinterleave(cfg.e), device=device)
    assert_close(
        half(x[..., d], offset=offset), adjacent(x, offset=offset)[..., d], axes=AXES,
        claim=f"pairing='half' on de-interleaved x equals pairing='adjacent' de-interleaved (e={cfg.e}, "
        f"base={cfg.base:g}, offset={offset})",
        hint="does your module read its `pairing` argument? 'adjacent' pairs neighbours, 'half' pairs the two halves.",
    )


@given(cfg=rope_configs(), seed=seeds(), offset=st.integers(0, 1000),
       a=st.floats(-3, 3, allow_nan=False), c=st.floats(-3, 3, allow_nan=False))
def test_rope_is_linear_in_its_input(impl, device, cfg, seed, offset, a, c):
    """rope(a x + c y) = a rope(x) + c rope(y): RoPE multiplies by a fixed matrix per position, adds nothing.

    Hint: RoPE rotates x; it does not add a sinusoidal table to it.
    """
    rope = build(impl, cfg, device)
    x, y = heads(cfg, seed, device=device), heads(cfg, seed + 1, device=device)
    assert_close(
        rope(a * x + c * y, offset=offset), a * rope(x, offset=offset) + c * rope(y, offset=offset), axes=AXES,
        claim=f"RoPE is linear in its input ({cfg}, offset={offset}, a={a:g}, c={c:g})",
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


@given(cfg=rope_configs(bases=(100.0, 10000.0)), seed=seeds(), m=st.integers(0, 5000), n=st.integers(0, 5000))
def test_rope_satisfies_roformer_long_term_decay_bound(impl, device, cfg, seed, m, n):
    """For every query/key pair, |sum_i h_i e^{i(m-n)theta_i}| <= (max_i |h_{i+1} - h_i|) * sum_i |S_{i+1}|,
    with h_i = q_i conj(k_i) over complex pairs, h_{e/2} = 0 and S_j = sum_{i<j} e^{i(m-n)theta_i}
    (RoFormer section 3.4.3). The complex sum is read from the module: its real part is the score
    <rope(q, m), rope(k, n)>, minus its imaginary part the score with k turned by 90 degrees in every pair.

    The bound shrinks on average with distance but not monotonically; only the bound is claimed.
    Hint: the angle must be position * theta_i with the spec's theta_i, at the positions given.
    """
    rope = build(impl, cfg, device)
    count = cfg.b * cfg.h * cfg.s
    q = tensor(seed, count, cfg.e, dtype=torch.float64, device="cpu")
    k = tensor(seed + 1, count, cfg.e, dtype=torch.float64, device="cpu")
    ramp = torch.from_numpy(structured_pair(cfg.e, seed, cfg.pairing))
    q, k = torch.cat([q, ramp[None]]), torch.cat([k, ramp[None]])
    u, v = (torch.from_numpy(i) for i in spec.pair_indices(cfg.e, cfg.pairing))
    k_turned = torch.empty_like(k)
    k_turned[:, u], k_turned[:, v] = k[:, v], -k[:, u]  # z(k) * (-i)
    at = lambda pos: torch.tensor([pos], device=device)  # noqa: E731
    as_heads = lambda t: t.to(device)[:, None, None, :]  # noqa: E731  (count + 1, 1, 1, e)
    rq = rope(as_heads(q), positions=at(m))
    real = (rq * rope(as_heads(k), positions=at(n))).sum(-1).flatten().cpu()
    imag = -(rq * rope(as_heads(k_turned), positions=at(n))).sum(-1).flatten().cpu()
    magnitude = torch.hypot(real, imag)
    bound = torch.from_numpy(spec.decay_bound(q.numpy(), k.numpy(), m - n, base=cfg.base, pairing=cfg.pairing))
    excess = magnitude - bound * (1 + 1e-9) - 1e-12  # float64 rounding: the bound is tight for the ramp pair
    worst = int(excess.argmax())
    assert_true(
        bool((excess <= 0).all()),
        claim=f"RoFormer's long-term-decay bound holds at distance m - n = {m - n} (m={m}, n={n}, e={cfg.e}, "
        f"base={cfg.base:g}, pairing={cfg.pairing!r})",
        detail=f"pair {worst}{' (the ramp h_i = e/2 - i)' if worst == count else ''}: |score| {magnitude[worst]:.6g} > "
        f"bound {bound[worst]:.6g}",
        hint="rotate token j by positions[j] * base^(-2i/e); a module that ignores `positions` rotates nothing here.",
    )


@given(e=st.integers(0, 4).map(lambda k: 2 * k + 1))
def test_rope_rejects_odd_head_width(impl, e):
    """RotaryEmbedding(head_dim=odd) raises ValueError at construction: RoPE rotates pairs of dimensions."""
    claim = f"RotaryEmbedding(head_dim={e}) raises ValueError"
    hint = "check head_dim % 2 == 0 in __init__ and raise ValueError with the value."
    expect_value_error(lambda: impl.raw("RotaryEmbedding")(head_dim=e), claim=claim, hint=hint, what="it built a")


@given(cfg=rope_configs(max_s=4, max_e=6), seed=seeds(), offset=st.integers(0, 100))
def test_rope_passes_gradcheck(impl, cfg, seed, offset):
    """float64 gradcheck: the gradient w.r.t. x is the transposed rotation (finite differences agree).

    Hint: writing the rotated halves back into x in place modifies the caller's tensor and breaks autograd;
    build a new tensor (torch.cat / torch.stack).
    """
    rope = build(impl, cfg)
    gradcheck(
        lambda x: rope(x, offset=offset), (heads(cfg, seed),),
        claim=f"RotaryEmbedding's gradient w.r.t. x is right ({cfg}, offset={offset})",
        hint="keep every step out of place and differentiable.",
    )


@pytest.mark.parametrize("dtype", PRECISIONS)
@given(cfg=rope_configs(), seed=seeds(), offset=st.integers(0, 100))
def test_rope_preserves_dtype_and_device(impl, device, dtype, cfg, seed, offset):
    """The output has x's dtype and device, whatever precision the angles were computed in.

    Hint: computing in float32 is right for half inputs, but cast the result (or cos/sin) back to x.dtype.
    """
    x = heads(cfg, seed, dtype, device)
    out = build(impl, cfg, device, dtype)(x, offset=offset)
    assert_true(
        out.dtype == dtype and out.device == x.device,
        claim=f"RotaryEmbedding preserves dtype and device ({cfg})",
        detail=f"input {dtype} on {x.device}, output {out.dtype} on {out.device}",
        hint="cast back with .to(x.dtype) (Meta's Llama: .type_as(x)).",
    )
