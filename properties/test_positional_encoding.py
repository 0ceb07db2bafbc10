"""Properties of SinusoidalPositionalEncoding and LearnedPositionalEmbedding. Spec: spec/positional_encoding.py.

Calls pass ``offset=`` only where the implementation offers it (properties/options.py); a module without
it is called as ``module(x)``, its chunk starting at position 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import implementations
from properties.assertions import PRECISIONS, assert_close, assert_equal, assert_true
from properties.options import Offers, draws_options
from properties.plugin import COMPONENTS, Implementation, backward, draw_parameters
from properties.probes import expect_value_error, gradcheck
from properties.strategies import seeds, tensor
from spec import positional_encoding as spec

SINUSOIDAL = "SinusoidalPositionalEncoding"
LEARNED = "LearnedPositionalEmbedding"
ENCODINGS = [SINUSOIDAL, LEARNED]
OURS = Implementation("ours", implementations)
AXES = "b s d"


@dataclass(frozen=True)
class EncodingCall:
    """One call: x (b, s, d) at positions offset .. offset + s - 1 of a table with max_len rows.
    ``with_offset``: the call passes ``offset=`` (False: ``module(x)``, and offset is 0)."""

    b: int
    s: int
    d: int
    max_len: int
    offset: int
    seed: int
    with_offset: bool = True

    def __repr__(self) -> str:
        offset = f"offset={self.offset}" if self.with_offset else "no offset"
        return f"EncodingCall(b={self.b}, s={self.s}, d={self.d}, max_len={self.max_len}, {offset}, seed={self.seed})"

    @property
    def sizes(self) -> dict[str, int]:
        return {"d_model": self.d, "max_len": self.max_len}

    def call(self, module, x: torch.Tensor) -> torch.Tensor:
        """``module(x, offset=offset)``, or ``module(x)`` for a call without an offset (a raw module too)."""
        __tracebackhide__ = True
        return module(x, offset=self.offset) if self.with_offset else module(x)


@draws_options(LEARNED, offset=lambda call: call.with_offset)
@draws_options(SINUSOIDAL, offset=lambda call: call.with_offset)
@st.composite
def encoding_calls(draw, offers: Offers, *, max_s: int = 8, long_tables: bool = True) -> EncodingCall:
    """In-range calls; the last allowed offset (max_len - s) is drawn often, since off-by-ones live there.
    Without an offset on offer, the call starts at 0 (and s = max_len is drawn often instead)."""
    d = 2 * draw(st.integers(1, 4), label="d/2")
    lengths = st.integers(1, 16) | st.sampled_from([512, 4096]) if long_tables else st.integers(1, 16)
    max_len = draw(lengths, label="max_len")
    with_offset = draw(offers.strategy("offset"), label="with_offset")
    longest = min(max_s, max_len)
    # Without an offset the window ends at s - 1: the longest one reaches the table's end.
    lengths = st.integers(1, longest) if with_offset else st.just(longest) | st.integers(1, longest)
    s = draw(lengths, label="s")
    offset = draw(st.just(max_len - s) | st.integers(0, max_len - s), label="offset") if with_offset else 0
    b = draw(st.integers(1, 2), label="b")
    return EncodingCall(b=b, s=s, d=d, max_len=max_len, offset=offset, seed=draw(seeds(), label="seed"),
                        with_offset=with_offset)


def inputs(call: EncodingCall, dtype=torch.float64, device="cpu") -> torch.Tensor:
    return tensor(call.seed + 1, call.b, call.s, call.d, dtype=dtype, device=device)


def reference(component: str, call: EncodingCall, x: torch.Tensor) -> np.ndarray:
    """The spec's float64 output, with the canonical parameters the suite loaded from call.seed."""
    x64 = x.double().cpu().numpy()
    if component == SINUSOIDAL:
        return spec.sinusoidal_positional_encoding(x64, max_len=call.max_len, offset=call.offset)
    params = draw_parameters(COMPONENTS[LEARNED].parameters(**call.sizes), call.seed)
    return spec.learned_positional_embedding({k: v.numpy() for k, v in params.items()}, x64, offset=call.offset)


def sinusoidal_table(impl, device, d: int, max_len: int) -> torch.Tensor:
    """The module's whole table (max_len, d) in float64 on the CPU, read as its output for x = 0."""
    module = impl.build(SINUSOIDAL, seed=0, device=device, dtype=torch.float64, d_model=d, max_len=max_len)
    return module(torch.zeros(1, max_len, d, dtype=torch.float64, device=device))[0].cpu()


@st.composite
def tables(draw, max_len_limit: int = 16, min_len: int = 1) -> tuple[int, int]:
    d = 2 * draw(st.integers(1, 4), label="d/2")
    return d, draw(st.integers(min_len, max_len_limit), label="max_len")


@pytest.mark.parametrize("component", ENCODINGS)
@pytest.mark.parametrize("dtype", PRECISIONS)
@given(data=st.data())
def test_positional_encoding_agrees_with_reference(impl, device, dtype, component, data):
    """x + table[offset : offset + s] equals the spec's float64 reference (sin in even columns, cos in odd).

    Hint: positions start at 0 and token j sits at offset + j; theta_i = 10000^(-2i/d) uses 2i, not i;
    build the sinusoidal table in float64 (a float32 table cast up later keeps 7 digits).
    """
    call = data.draw(encoding_calls(impl.offers(component)), label="call")
    module = impl.build(component, seed=call.seed, device=device, dtype=dtype, **call.sizes)
    x = inputs(call, dtype, device)
    out = call.call(module, x)
    baseline = call.call(OURS.build(component, seed=call.seed, device=device, dtype=dtype, **call.sizes), x)
    assert_close(
        out, reference(component, call, x), baseline=baseline, axes=AXES,
        claim=f"{component} agrees with the spec's reference ({call}, {dtype})",
        hint="out[b, j] = x[b, j] + table[offset + j]; sinusoidal: table[p, 2i] = sin(p * 10000^(-2i/d)), "
        "table[p, 2i + 1] = cos(the same angle).",
    )


@pytest.mark.requires(SINUSOIDAL)
@given(size=tables(max_len_limit=64))
def test_sinusoidal_encoding_values_lie_in_unit_interval(impl, device, size):
    """Every entry of the sinusoidal table lies in [-1, 1]: it is a sine or a cosine, nothing more.

    Hint: the original transformer scales the token *embeddings* by sqrt(d_model), not the encoding.
    """
    d, max_len = size
    pe = sinusoidal_table(impl, device, d, max_len)
    worst = pe.abs().max().item()
    assert_true(
        worst <= 1.0,
        claim=f"the sinusoidal encoding lies in [-1, 1] (d={d}, max_len={max_len})",
        detail=f"the largest |entry| is {worst:.6g}",
        hint="each entry is sin or cos of an angle; do not scale the table.",
    )


@pytest.mark.requires(SINUSOIDAL)
@given(size=tables())
def test_sinusoidal_encoding_shift_is_one_rotation_for_every_position(impl, device, size):
    """PE(p + k) = R_k PE(p) for every p, where R_k rotates pair i by k * theta_i; R_k is read off the
    encoding itself: its cos/sin are PE(k)'s own pair (cos(k theta_i), sin(k theta_i)).

    This is why the paper chose sinusoids: attention can reach position p + k from p by one fixed linear
    map. Hint: sin in column 2i and cos in column 2i + 1 of the same frequency, positions from 0.
    """
    d, max_len = size
    pe = sinusoidal_table(impl, device, d, max_len)
    sin, cos = pe[:, 0::2], pe[:, 1::2]  # (max_len, d/2): sin(p theta_i), cos(p theta_i)
    for k in range(max_len):
        p = torch.arange(max_len - k)
        # sin((p + k) t) = sin(p t) cos(k t) + cos(p t) sin(k t);  cos((p + k) t) = cos(p t) cos(k t) - sin(p t) sin(k t)
        rotated_sin = sin[p] * cos[k] + cos[p] * sin[k]
        rotated_cos = cos[p] * cos[k] - sin[p] * sin[k]
        rotated = torch.stack([rotated_sin, rotated_cos], dim=-1).reshape(len(p), d)
        assert_close(
            pe[p + k], rotated, axes="p d",
            claim=f"PE(p + {k}) is PE(p) rotated pair by pair by the angles of PE({k}), for every p "
            f"(d={d}, max_len={max_len})",
            hint="column 2i holds sin(p * theta_i) and column 2i + 1 cos(p * theta_i) with the SAME theta_i; "
            "positions start at 0.",
        )


@pytest.mark.requires(SINUSOIDAL)
@given(size=tables(min_len=2))
def test_sinusoidal_encoding_dot_products_depend_only_on_distance(impl, device, size):
    """PE(p) . PE(q) = sum_i cos((p - q) theta_i) depends only on p - q: the Gram matrix is Toeplitz.

    Hint: a sin/cos pair must share one frequency; computing theta from the column index j (10000^(-j/d))
    gives the cos column a different frequency from its sin column.
    """
    d, max_len = size
    pe = sinusoidal_table(impl, device, d, max_len)
    gram = pe @ pe.T
    assert_close(
        gram[1:, 1:], gram[:-1, :-1], axes="p q",
        claim=f"PE(p + 1) . PE(q + 1) equals PE(p) . PE(q) (d={d}, max_len={max_len})",
        hint="with sin and cos of the same angle in each pair, PE(p) . PE(q) = sum_i cos((p - q) theta_i).",
    )


@pytest.mark.requires(SINUSOIDAL)
@given(size=tables(max_len_limit=48))
def test_sinusoidal_encoding_gives_distinct_positions_distinct_encodings(impl, device, size):
    """Within max_len, two different positions never get the same encoding (theta_0 = 1 alone separates them).

    Hint: the angle is position * theta_i; a table built from theta_i alone gives every position the same row.
    """
    d, max_len = size
    pe = sinusoidal_table(impl, device, d, max_len)
    distance = torch.cdist(pe, pe) + torch.diag(torch.full((max_len,), torch.inf, dtype=pe.dtype))
    p, q = divmod(int(distance.argmin()), max_len)
    closest = distance[p, q].item() if max_len > 1 else torch.inf
    assert_true(
        closest > 1e-6,
        claim=f"distinct positions get distinct sinusoidal encodings (d={d}, max_len={max_len})",
        detail=f"positions {p} and {q} are {closest:.3g} apart",
        hint="multiply each frequency by the position: angle[p, i] = p * 10000^(-2i/d).",
    )


@draws_options(LEARNED, offset=lambda case: case[0].with_offset)
@draws_options(SINUSOIDAL, offset=lambda case: case[0].with_offset)
@st.composite
def out_of_range_calls(draw, offers: Offers) -> tuple[EncodingCall, str]:
    """Calls asking for positions outside 0 .. max_len - 1: past the end, or a negative offset. Without an
    offset on offer, past the end means more tokens than max_len."""
    d = 2 * draw(st.integers(1, 3), label="d/2")
    max_len = draw(st.integers(1, 8), label="max_len")
    with_offset = draw(offers.strategy("offset"), label="with_offset")
    if not with_offset:
        s = draw(st.integers(max_len + 1, max_len + 3), label="s")
        offset, why = 0, "past the end"
    else:
        s = draw(st.integers(1, 8), label="s")
        if draw(st.booleans(), label="past_the_end"):
            offset, why = draw(st.integers(max(0, max_len - s + 1), max_len + 2), label="offset"), "past the end"
        else:
            offset, why = draw(st.integers(-3, -1), label="offset"), "negative offset"
    call = EncodingCall(b=1, s=s, d=d, max_len=max_len, offset=offset, seed=draw(seeds(), label="seed"),
                        with_offset=with_offset)
    return call, why


@pytest.mark.parametrize("component", ENCODINGS)
@given(data=st.data())
def test_positional_encoding_refuses_positions_past_max_len(impl, device, component, data):
    """Positions outside 0 .. max_len - 1 raise ValueError naming the numbers; nothing is returned.

    Hint: ``table[offset : offset + s]`` silently returns fewer rows past the end (and a negative offset
    counts from the end); check ``0 <= offset`` and ``offset + s <= max_len`` first.
    """
    call, why = data.draw(out_of_range_calls(impl.offers(component)), label="case")
    module = impl.build(component, seed=call.seed, device=device, dtype=torch.float64, **call.sizes)
    x = inputs(call, device=device)
    claim = (
        f"{component}(d_model={call.d}, max_len={call.max_len}) refuses positions {call.offset} .. "
        f"{call.offset + call.s - 1} ({why}) with ValueError"
    )
    hint = "raise ValueError(f'... offset={offset}, s={s}, max_len={max_len}') before slicing the table."
    # The raw module: the suite's wrapper would turn the ValueError into a failure.
    exc = expect_value_error(lambda: call.call(module.module, x), claim=claim, hint=hint,
                             what=f"for x of shape {tuple(x.shape)} it returned")
    number = call.max_len if why == "past the end" else call.offset
    assert_true(
        str(number) in str(exc), claim=claim,
        detail=f"the ValueError says {str(exc)!r}, which does not give {'max_len' if why == 'past the end' else 'offset'}={number}",
        hint="say which positions were asked for and what max_len is.",
    )


@pytest.mark.requires(SINUSOIDAL)
@given(d=st.integers(0, 3).map(lambda k: 2 * k + 1))
def test_sinusoidal_encoding_rejects_odd_width(impl, d):
    """SinusoidalPositionalEncoding(d_model=odd) raises ValueError at construction (sin/cos pairs need an even d)."""
    cls = impl.raw(SINUSOIDAL)
    claim = f"SinusoidalPositionalEncoding(d_model={d}, max_len=4) raises ValueError"
    hint = "check d_model % 2 == 0 in __init__ and raise ValueError with the value."
    expect_value_error(lambda: cls(d_model=d, max_len=4), claim=claim, hint=hint, what="it built a")


@pytest.mark.requires(LEARNED)
@given(data=st.data())
def test_learned_embedding_gradient_reaches_exactly_the_used_rows(impl, device, data):
    """d loss / d weight is the upstream gradient summed over the batch on rows offset .. offset + s - 1,
    and exactly zero on every other row.

    Hint: index the parameter itself (``self.weight[offset:offset + s]``); ``.data``, ``.detach()`` or a
    copy made in __init__ cut the table off from autograd.
    """
    call = data.draw(encoding_calls(impl.offers(LEARNED), long_tables=False), label="call")
    module = impl.build(LEARNED, seed=call.seed, device=device, dtype=torch.float64, **call.sizes)
    x = inputs(call, device=device).requires_grad_()  # so backward runs even if the table is cut off
    upstream = tensor(call.seed + 2, call.b, call.s, call.d, dtype=torch.float64, device=device)
    backward((call.call(module, x) * upstream).sum(), module)
    grad = module.parameter_gradients()["weight"]
    claim = f"the gradient reaches rows {call.offset} .. {call.offset + call.s - 1} of the table and no others ({call})"
    assert_true(
        grad is not None, claim=claim, detail="weight.grad is None after backward",
        hint="the table must be used through the nn.Parameter, not .data or a detached copy.",
    )
    used = torch.zeros(call.max_len, 1, dtype=torch.bool, device=device)
    used[call.offset : call.offset + call.s] = True
    assert_equal(
        grad * ~used, torch.zeros_like(grad), axes="p d", claim=claim,
        hint="only the rows offset .. offset + s - 1 are added to x; an ignored offset uses rows 0 .. s - 1.",
    )
    assert_close(
        grad[call.offset : call.offset + call.s], upstream.sum(0), axes="s d", claim=claim,
        hint="row offset + j receives the gradient of token j, summed over the batch.",
    )


@pytest.mark.parametrize("component", ENCODINGS)
@given(data=st.data())
def test_positional_encoding_passes_gradcheck(impl, component, data):
    """float64 gradcheck: the gradient w.r.t. x is the identity (the encoding is added, nothing else).

    Hint: ``x += table[...]`` modifies the caller's tensor in place (and fails on a leaf that requires grad);
    return ``x + table[...]``.
    """
    call = data.draw(encoding_calls(impl.offers(component), max_s=4, long_tables=False), label="call")
    module = impl.build(component, seed=call.seed, dtype=torch.float64, **call.sizes)
    gradcheck(
        lambda x: call.call(module, x), (inputs(call),),
        claim=f"{component}'s gradient w.r.t. x is right ({call})",
        hint="add the encoding out of place; do not detach x.",
    )


@pytest.mark.parametrize("component", ENCODINGS)
@pytest.mark.parametrize("dtype", PRECISIONS)
@given(data=st.data())
def test_positional_encoding_preserves_dtype_and_device(impl, device, dtype, component, data):
    """The output has x's dtype and device, for a module moved to that dtype and device.

    Hint: a table kept as a plain attribute (not ``register_buffer``) is not moved or cast by ``.to()``.
    """
    call = data.draw(encoding_calls(impl.offers(component), long_tables=False), label="call")
    module = impl.build(component, seed=call.seed, device=device, dtype=dtype, **call.sizes)
    x = inputs(call, dtype, device)
    out = call.call(module, x)
    assert_true(
        out.dtype == dtype and out.device == x.device,
        claim=f"{component} preserves dtype and device ({call})",
        detail=f"input {dtype} on {x.device}, output {out.dtype} on {out.device}",
        hint="register the table as a buffer (or parameter) and cast the rows you add to x.dtype.",
    )
