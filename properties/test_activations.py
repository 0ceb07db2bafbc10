"""Properties of gelu and softmax. Spec: spec/activations.py.

Calls are drawn from what the implementation offers (properties/options.py): gelu's ``approximate``
forms, and whether softmax takes a mask. General softmax calls never contain a row whose entries are
all masked: that pinned convention (zeros) has its own property, so another convention cannot hide
every other check.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import implementations
from properties.assertions import PRECISIONS, assert_close, assert_equal, assert_true
from properties.options import Offers, draws_options
from properties.probes import gradcheck
from properties.strategies import Mask, as_mask, boolean_masks, seeds, sequence_shapes, tensor
from spec import activations as spec

AXES = "b s d"


@dataclass(frozen=True)
class GeluCall:
    """gelu on x (b, s, d) drawn from ``seed`` (times ``scale``), in the form ``approximate``."""

    shape: tuple[int, int, int]
    seed: int
    approximate: str

    def __repr__(self) -> str:
        return f"gelu(x{self.shape}, approximate={self.approximate!r})"


@draws_options("gelu", approximate=lambda call: call.approximate)
@st.composite
def gelu_calls(draw, offers: Offers, *, max_b: int = 2, max_s: int = 4, max_d: int = 6) -> GeluCall:
    """A shape, a seed and one of the offered forms (the exact one first, which Hypothesis shrinks to)."""
    shape = draw(sequence_shapes(max_b=max_b, max_s=max_s, max_d=max_d), label="shape")
    return GeluCall(shape, draw(seeds(), label="seed"), draw(offers.strategy("approximate"), label="approximate"))


@dataclass(frozen=True)
class SoftmaxCall:
    """softmax on x (b, s, d) along ``dim``, with a keep-mask (of the full shape or broadcast along the
    batch) or None."""

    shape: tuple[int, int, int]
    seed: int
    dim: int
    mask: np.ndarray | None


def without_empty_rows(mask: np.ndarray, dim: int) -> np.ndarray:
    """``mask`` with every row along ``dim`` keeping at least one entry: an empty row keeps its first.
    Rows are those of the mask's own shape, so a mask broadcast along ``dim`` (size 1 there) keeps its
    single entry, which broadcasting then repeats."""
    mask = np.array(mask, dtype=bool)
    empty = ~mask.any(axis=dim, keepdims=True)
    first = np.zeros_like(mask)
    np.put_along_axis(first, np.zeros_like(empty, dtype=np.intp), True, axis=dim)
    return (mask | (first & empty)).view(Mask)


@draws_options("softmax", mask=lambda call: call.mask is not None)
@st.composite
def softmax_calls(draw, offers: Offers, *, masked: bool | None = None) -> SoftmaxCall:
    """A (b, s, d) shape, a seed, an axis, and a keep-mask where the implementation takes one (always
    with masked=True: the property then needs mask=True). No row along ``dim`` is fully masked."""
    shape = draw(sequence_shapes(), label="shape")
    dim = draw(st.sampled_from([-1, -2, 0]), label="dim")
    use_mask = draw(offers.strategy("mask"), label="with_mask") if masked is None else masked
    mask = None
    if use_mask:
        mask_shape = draw(st.sampled_from([shape, (1, *shape[1:])]), label="mask_shape")
        mask = without_empty_rows(draw(boolean_masks(mask_shape), label="mask"), dim)
    return SoftmaxCall(shape, draw(seeds(), label="seed"), dim, mask)


def keep_of(shape, mask) -> np.ndarray:
    return np.ones(shape, dtype=bool) if mask is None else np.broadcast_to(np.asarray(mask, dtype=bool), shape)


# --------------------------------------------------------------------------------------------- gelu


@pytest.mark.requires("gelu")
@pytest.mark.parametrize("dtype", PRECISIONS)
@given(data=st.data(), scale=st.sampled_from([1.0, 3.0]))
def test_gelu_agrees_with_reference(impl, device, dtype, data, scale):
    """gelu equals the spec's float64 reference: x * Phi(x) for approximate="none", the tanh formula for
    approximate="tanh" (each form the implementation offers).

    Hint: Phi(x) = (1 + erf(x / sqrt(2))) / 2 (divide by sqrt(2) inside erf); the tanh form is
    x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))).
    """
    call = data.draw(gelu_calls(impl.offers("gelu")), label="call")
    shape, approximate = call.shape, call.approximate
    x = tensor(call.seed, *shape, dtype=dtype, device=device, scale=scale)
    out = impl.function("gelu")(x, approximate=approximate)
    want = spec.gelu(x.double().cpu().numpy(), approximate=approximate)
    assert_close(
        out, want, baseline=implementations.gelu(x, approximate=approximate), axes=AXES,
        claim=f"gelu(approximate={approximate!r}) agrees with the spec's reference ({shape}, {dtype})",
        hint="exact: 0.5 * x * (1 + erf(x / sqrt(2))); tanh: 0.5 * x * (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).",
    )


@pytest.mark.requires("gelu")
@given(data=st.data())
def test_gelu_agrees_with_torch_gelu(impl, data):
    """gelu equals ``F.gelu`` with the same ``approximate`` (float64)."""
    call = data.draw(gelu_calls(impl.offers("gelu")), label="call")
    shape, approximate = call.shape, call.approximate
    x = tensor(call.seed, *shape, dtype=torch.float64, device="cpu", scale=2.0)
    assert_close(
        impl.function("gelu")(x, approximate=approximate), F.gelu(x, approximate=approximate), axes=AXES,
        claim=f"gelu(approximate={approximate!r}) agrees with torch's F.gelu ({shape})",
        hint="F.gelu's default is the exact erf form; approximate='tanh' selects the tanh formula.",
    )


@pytest.mark.requires("gelu")
@given(data=st.data())
def test_gelu_minus_its_mirror_is_the_identity(impl, device, data):
    """gelu(x) - gelu(-x) = x for both forms (Phi(x) + Phi(-x) = 1; likewise tanh(u) + tanh(-u) = 0),
    and gelu(0) = 0 exactly. float64, up to rounding.

    Hint: gelu(x) = x * Phi(x) with the factor 1/2 in Phi = (1 + erf(x / sqrt(2))) / 2.
    """
    call = data.draw(gelu_calls(impl.offers("gelu")), label="call")
    shape, approximate = call.shape, call.approximate
    gelu = impl.function("gelu")
    x = tensor(call.seed, *shape, dtype=torch.float64, device=device, scale=2.0)
    assert_close(
        gelu(x, approximate=approximate) - gelu(-x, approximate=approximate), x, axes=AXES,
        claim=f"gelu(x) - gelu(-x) = x (approximate={approximate!r}, {shape})",
        hint="x * Phi(x) - (-x) * Phi(-x) = x (Phi(x) + Phi(-x)) = x; a missing 1/2 gives 2x.",
    )
    zero = torch.zeros(shape, dtype=torch.float64, device=device)
    assert_equal(
        gelu(zero, approximate=approximate), zero, axes=AXES,
        claim=f"gelu(0) = 0 (approximate={approximate!r})",
        hint="gelu(0) = 0 * Phi(0) = 0: nothing is added outside the product.",
    )


@pytest.mark.requires("gelu")
@pytest.mark.needs(approximate="tanh")
@given(seed=seeds(), n=st.integers(8, 64), width=st.sampled_from([3.0, 6.0]))
def test_tanh_gelu_stays_within_its_bound_of_exact_gelu(impl, device, seed, n, width):
    """|gelu(x, approximate="tanh") - x Phi(x)| <= 4.74e-4 everywhere (the measured maximum is
    4.7324e-4, at |x| = 2.699, in float64); the points are random in [-width, width] plus +-2.699.

    Hint: the constants are sqrt(2/pi) (about 0.7979) outside and 0.044715 on the cube.
    """
    x = tensor(seed, n, dtype=torch.float64, device=device) * width / 2
    x = torch.cat([x, torch.tensor([2.699, -2.699], dtype=torch.float64, device=device)])
    out = impl.function("gelu")(x, approximate="tanh")
    err = (out - torch.as_tensor(spec.gelu(x.cpu().numpy()), device=device)).abs()
    worst = int(err.argmax())
    assert_true(
        float(err.max()) <= 4.74e-4,
        claim="gelu(approximate='tanh') stays within 4.74e-4 of the exact gelu",
        detail=f"difference {float(err[worst]):.3g} at x = {float(x[worst]):.4g}",
        hint="0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): check both constants.",
    )


@pytest.mark.requires("gelu")
@pytest.mark.needs(approximate="none")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@given(points=st.integers(401, 1601), offset=st.floats(0.0, 0.01))
def test_exact_gelu_is_not_the_tanh_approximation(impl, device, dtype, points, offset):
    """On a grid over [-4, 4], gelu(x, approximate="none") stays within 1e-5 of the erf form. The tanh
    form is 4.7e-4 away near |x| = 2.70 while float32 rounding is ~1e-6, so an output 1e-5 away is
    another function; when it matches the tanh form, the failure says so.
    """
    x = (torch.linspace(-4.0, 4.0, points, dtype=torch.float64) + offset).to(device=device, dtype=dtype)
    out = impl.function("gelu")(x, approximate="none").double().cpu()
    xs = x.double().cpu().numpy()
    err = (out - torch.as_tensor(spec.gelu(xs))).abs()
    to_tanh = float((out - torch.as_tensor(spec.gelu(xs, approximate="tanh"))).abs().max())
    worst = int(err.argmax())
    looks_tanh = to_tanh < float(err.max()) / 10
    assert_true(
        float(err.max()) <= 1e-5,
        claim=f"gelu(approximate='none') is the exact erf form ({dtype})",
        detail=f"it differs from x Phi(x) by {float(err[worst]):.3g} at x = {xs[worst]:.4g}"
        + (f"; this looks like the tanh approximation (within {to_tanh:.2g} of it)" if looks_tanh else ""),
        hint="approximate='none' means 0.5 * x * (1 + erf(x / sqrt(2))); use the tanh formula only for 'tanh'.",
    )


@pytest.mark.requires("gelu")
@given(data=st.data())
def test_gelu_passes_gradcheck(impl, data):
    """float64 gradcheck: gelu's analytic gradient equals finite differences
    (d/dx x Phi(x) = Phi(x) + x phi(x) for the exact form).

    Hint: a hand-written backward must include the x * phi(x) term, not only Phi(x).
    """
    call = data.draw(gelu_calls(impl.offers("gelu"), max_b=1, max_s=2, max_d=4), label="call")
    shape, approximate = call.shape, call.approximate
    gelu = impl.function("gelu")
    gradcheck(
        lambda x: gelu(x, approximate=approximate),
        (tensor(call.seed, *shape, dtype=torch.float64, device="cpu", scale=2.0),),
        claim=f"gelu's gradient is right (approximate={approximate!r}, {shape})",
        hint="let autograd differentiate it, or return Phi(x) + x * phi(x) from backward.",
    )


# ------------------------------------------------------------------------------------------ softmax


@pytest.mark.requires("softmax")
@pytest.mark.parametrize("dtype", PRECISIONS)
@given(data=st.data())
def test_softmax_agrees_with_reference(impl, device, dtype, data):
    """softmax equals the spec's float64 reference along ``dim``, masks (True = keep) included.

    Hint: normalise along ``dim``; masked entries get weight 0 and the kept ones share all the mass.
    """
    call = data.draw(softmax_calls(impl.offers("softmax")), label="call")
    shape, seed, dim, mask = call.shape, call.seed, call.dim, call.mask
    x = tensor(seed, *shape, dtype=dtype, device=device, scale=2.0)
    m = None if mask is None else as_mask(mask, device)
    want = spec.softmax(x.double().cpu().numpy(), dim=dim, mask=mask)
    assert_close(
        impl.function("softmax")(x, dim=dim, mask=m), want, axes=AXES,
        baseline=implementations.softmax(x, dim=dim, mask=m),
        claim=f"softmax agrees with the spec's reference ({shape}, dim={dim}, mask={mask!r}, {dtype})",
        hint="exp(x - max) / sum exp(x - max) over the kept entries of each row along dim.",
    )


@pytest.mark.requires("softmax")
@given(data=st.data())
def test_softmax_agrees_with_torch_softmax(impl, data):
    """softmax equals ``F.softmax`` (float64) on logits whose masked entries are set to -inf; rows with
    no kept entry (NaN from ``F.softmax``) are compared with zeros, the spec's convention."""
    call = data.draw(softmax_calls(impl.offers("softmax")), label="call")
    shape, seed, dim, mask = call.shape, call.seed, call.dim, call.mask
    x = tensor(seed, *shape, dtype=torch.float64, device="cpu", scale=2.0)
    keep = torch.from_numpy(keep_of(shape, mask).copy())
    want = F.softmax(x.masked_fill(~keep, float("-inf")), dim=dim)
    want = torch.where(keep.any(dim=dim, keepdim=True), want, 0.0)
    m = None if mask is None else torch.from_numpy(np.asarray(mask))
    assert_close(
        impl.function("softmax")(x, dim=dim, mask=m), want, axes=AXES,
        claim=f"softmax agrees with torch's F.softmax ({shape}, dim={dim}, mask={mask!r})",
        hint="F.softmax(x.masked_fill(~mask, -inf), dim) is the masked softmax (True = keep).",
    )


@pytest.mark.requires("softmax")
@given(data=st.data())
def test_softmax_rows_sum_to_one(impl, device, data):
    """Along ``dim``, every row with at least one kept entry sums to 1 (float64, up to rounding), and
    every output is in [0, 1].

    Hint: sum over the axis you were given (dim), and renormalise over the kept entries only.
    """
    call = data.draw(softmax_calls(impl.offers("softmax")), label="call")
    shape, seed, dim, mask = call.shape, call.seed, call.dim, call.mask
    x = tensor(seed, *shape, dtype=torch.float64, device=device, scale=2.0)
    m = None if mask is None else as_mask(mask, device)
    out = impl.function("softmax")(x, dim=dim, mask=m)
    has_kept = torch.from_numpy(keep_of(shape, mask).any(axis=dim, keepdims=True)).to(device)
    total = out.sum(dim=dim, keepdim=True)
    assert_close(
        torch.where(has_kept, total, 1.0), torch.ones_like(total), axes=AXES,
        claim=f"softmax rows sum to 1 along dim={dim} ({shape}, mask={mask!r})",
        hint="divide by the sum along dim; multiplying by the mask after the softmax loses mass.",
    )
    assert_true(
        bool(((out >= 0) & (out <= 1)).all()),
        claim=f"softmax outputs lie in [0, 1] ({shape}, dim={dim})",
        detail=f"range [{float(out.min()):.3g}, {float(out.max()):.3g}]",
        hint="weights are exp(...) / sum exp(...): non-negative and at most 1.",
    )


@pytest.mark.requires("softmax")
@given(data=st.data(), magnitude=st.sampled_from([1.0, 1e3]))
def test_softmax_is_invariant_to_shifting_each_row(impl, device, data, magnitude):
    """softmax(x + c) = softmax(x) when c is constant along ``dim`` (it may differ between rows),
    float64 up to rounding; shifts up to ~1e3 included.

    Hint: exp(x + c) = exp(x) exp(c) and exp(c) cancels within the row along dim; subtract the row max
    so exp(x + c) does not overflow.
    """
    call = data.draw(softmax_calls(impl.offers("softmax")), label="call")
    shape, seed, dim, mask = call.shape, call.seed, call.dim, call.mask
    x = tensor(seed, *shape, dtype=torch.float64, device=device, scale=2.0)
    row_shape = list(shape)
    row_shape[dim] = 1
    c = tensor(seed + 1, *row_shape, dtype=torch.float64, device=device, scale=magnitude)
    m = None if mask is None else as_mask(mask, device)
    softmax = impl.function("softmax")
    assert_close(
        softmax(x + c, dim=dim, mask=m), softmax(x, dim=dim, mask=m), axes=AXES,
        claim=f"softmax is invariant to adding a per-row constant along dim={dim} ({shape}, |c| ~ {magnitude:g})",
        hint="normalise along dim (the rows the constant is shared by), after subtracting the row max.",
    )


@pytest.mark.requires("softmax")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(data=st.data(), magnitude=st.sampled_from([1e2, 1e4]))
def test_softmax_stays_finite_for_large_inputs(impl, device, dtype, data, magnitude):
    """Inputs of magnitude ~1e4 give finite weights in [0, 1] (exp(1e4) overflows any float dtype).

    Hint: subtract each row's maximum before exp (F.softmax does).
    """
    call = data.draw(softmax_calls(impl.offers("softmax")), label="call")
    shape, seed, dim, mask = call.shape, call.seed, call.dim, call.mask
    x = tensor(seed, *shape, dtype=dtype, device=device, scale=magnitude)
    m = None if mask is None else as_mask(mask, device)
    out = impl.function("softmax")(x, dim=dim, mask=m)  # checked for NaN/inf on return
    assert_true(
        bool(((out >= 0) & (out <= 1)).all()),
        claim=f"softmax of inputs ~{magnitude:g} stays in [0, 1] ({shape}, dim={dim}, {dtype})",
        detail=f"range [{float(out.min()):.3g}, {float(out.max()):.3g}]",
        hint="exp(x - max(x)) has every exponent <= 0.",
    )


@pytest.mark.requires("softmax")
@pytest.mark.needs(mask=True)
@given(data=st.data())
def test_softmax_masked_entries_are_exactly_zero(impl, device, data):
    """Entries whose mask is False (True = keep) are exactly 0.

    Hint: fill the logits where the mask is False with -inf (``masked_fill(~mask, -inf)``), not where it is True.
    """
    call = data.draw(softmax_calls(impl.offers("softmax"), masked=True), label="call")
    shape, seed, dim, mask = call.shape, call.seed, call.dim, call.mask
    x = tensor(seed, *shape, dtype=torch.float64, device=device, scale=2.0)
    out = impl.function("softmax")(x, dim=dim, mask=as_mask(mask, device))
    dropped = torch.from_numpy(~keep_of(shape, mask)).to(device)
    assert_equal(
        torch.where(dropped, out, 0.0), torch.zeros_like(out), axes=AXES,
        claim=f"softmax gives exactly 0 where the mask is False ({shape}, dim={dim}, mask={mask!r})",
        hint="True = keep (the attention masks' polarity); masked entries become exp(-inf) = 0.",
    )


@pytest.mark.requires("softmax")
@pytest.mark.needs(mask=True, empty_rows=True)
@given(data=st.data())
def test_softmax_fully_masked_rows_are_zero(impl, device, data):
    """A row (along ``dim``) whose entries are all masked gives zeros, never NaN, and finite gradients.

    Hint: softmax over all -inf is NaN; give such rows finite logits, then zero them.
    """
    call = data.draw(softmax_calls(impl.offers("softmax"), masked=True), label="call")
    shape, seed, dim, mask = call.shape, call.seed, call.dim, call.mask
    mask = np.array(np.broadcast_to(mask, shape))
    index = [data.draw(st.integers(0, n - 1), label=f"row_axis{i}") for i, n in enumerate(shape)]
    index[dim] = slice(None)
    mask[tuple(index)] = False
    x = tensor(seed, *shape, dtype=torch.float64, device=device, scale=2.0).requires_grad_()
    out = impl.function("softmax")(x, dim=dim, mask=as_mask(mask, device))
    empty = torch.from_numpy(~mask.any(axis=dim, keepdims=True)).to(device)
    assert_equal(
        torch.where(empty, out, 0.0), torch.zeros_like(out), axes=AXES,
        claim=f"softmax of a fully masked row is zero ({shape}, dim={dim})",
        hint="rows with no kept entry return zeros (the convention of attention, spec/sdpa.py).",
    )
    (out * tensor(seed + 1, *shape, dtype=torch.float64, device=device)).sum().backward()
    assert_true(
        x.grad is not None and bool(torch.isfinite(x.grad).all()),
        claim=f"softmax gradients stay finite with fully masked rows ({shape}, dim={dim})",
        detail="no gradient" if x.grad is None else "a gradient holds NaN or inf",
        hint="NaN from softmax(-inf, ..., -inf) leaks into backward even if the output is zeroed in place.",
    )


@pytest.mark.requires("softmax")
@given(data=st.data())
def test_softmax_passes_gradcheck(impl, data):
    """float64 gradcheck: softmax's analytic gradient (masks included) equals finite differences.

    Hint: the normaliser (the row sum) depends on x too; ``.detach()`` on it drops a term of the gradient.
    """
    call = data.draw(softmax_calls(impl.offers("softmax")), label="call")
    shape, seed, dim, mask = call.shape, call.seed, call.dim, call.mask
    m = None if mask is None else torch.from_numpy(np.asarray(mask))
    softmax = impl.function("softmax")
    gradcheck(
        lambda x: softmax(x, dim=dim, mask=m),
        (tensor(seed, *shape, dtype=torch.float64, device="cpu"),),
        claim=f"softmax's gradient is right ({shape}, dim={dim}, mask={mask!r})",
        hint="keep every step differentiable and out of place.",
    )
