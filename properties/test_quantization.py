"""Properties of weight-only int8 quantization: quantize_int8, dequantize_int8 and Int8Linear.
Spec: spec/quantization.py (o output channels, one scale each; i input channels).

Weights are drawn with rows of different magnitudes (a factor 2^-3 .. 2^3 per row), so a scale shared by all
rows shows; some draws set entries, and a whole row, to exactly zero. Int8Linear is built with
``from_float(weight, bias)`` from seeded float weights (a quantized layer has no float parameters to load),
and judged against the float layer: within the derived bound on any weights, and equal on weights that int8
represents exactly (integers times a power-of-two row scale), where every dtype agrees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import implementations
from properties.assertions import FLOAT64_RTOL, PRECISIONS, assert_close, assert_equal, assert_true
from properties.options import Offers, draws_options
from properties.plugin import COMPONENTS, CheckedModule, ComponentFailure, Implementation, guarded_call
from properties.strategies import fewer_examples, seeds, tensor
from spec import quantization as spec

QUANTIZE, DEQUANTIZE, LINEAR = "quantize_int8", "dequantize_int8", "Int8Linear"
OURS = Implementation("ours", implementations)  # the same-dtype baseline of the error-ratio rule
AXES = "o i"


@dataclass(frozen=True)
class WeightCase:
    """A float weight (o, i) from ``seed``: N(0, 1/i) entries times 2^e per row (e in -3 .. 3); with ``zeros``,
    about a quarter of the entries and (o >= 2) the last row set to exactly zero."""

    o: int
    i: int
    seed: int
    zeros: bool = False
    bias: bool = True

    def weight(self, device="cpu", dtype=torch.float64) -> Tensor:
        rng = np.random.default_rng(self.seed)
        w = rng.standard_normal((self.o, self.i)) / np.sqrt(self.i) * 2.0 ** rng.integers(-3, 4, size=(self.o, 1))
        if self.zeros:
            w[rng.random((self.o, self.i)) < 0.25] = 0.0
            if self.o >= 2:
                w[-1] = 0.0
        return torch.as_tensor(w).to(device=device, dtype=dtype)

    def exact_weight(self, device="cpu", dtype=torch.float64) -> Tensor:
        """Integers in [-127, 127] (each row holding +-127) times 2^-e per row (e in 0 .. 6): int8 with
        per-row scales represents it exactly, and so do float64, float32, float16 and bfloat16."""
        rng = np.random.default_rng(self.seed)
        q = rng.integers(-127, 128, size=(self.o, self.i))
        q[np.arange(self.o), rng.integers(0, self.i, size=self.o)] = 127 * rng.choice([-1, 1], size=self.o)
        return torch.as_tensor(q * 2.0 ** -rng.integers(0, 7, size=(self.o, 1))).to(device=device, dtype=dtype)

    def bias_vector(self, device="cpu", dtype=torch.float64) -> Tensor | None:
        return tensor(self.seed + 2, self.o, dtype=dtype, device=device, scale=0.1) if self.bias else None

    def inputs(self, device="cpu", dtype=torch.float64) -> Tensor:
        return tensor(self.seed + 1, 2, 3, self.i, dtype=dtype, device=device)  # x (2, 3, i)

    def __repr__(self) -> str:
        extra = (", with zeros" if self.zeros else "") + ("" if self.bias else ", no bias")
        return f"weight (o={self.o}, i={self.i}), seed={self.seed}{extra}"


@st.composite
def weight_cases(draw, *, zeros: bool | None = None, max_o: int = 5, max_i: int = 6) -> WeightCase:
    """o in 1 .. 5, i in 1 .. 6, a seed, and exact zeros (drawn, or as ``zeros`` says)."""
    return WeightCase(o=draw(st.integers(1, max_o), label="o"), i=draw(st.integers(1, max_i), label="i"),
                      seed=draw(seeds(), label="seed"),
                      zeros=draw(st.booleans(), label="zeros") if zeros is None else zeros)


@draws_options(LINEAR, bias=lambda case: case.bias)
@st.composite
def layer_cases(draw, offers: Offers) -> WeightCase:
    """Weight sizes and seed as ``weight_cases`` (no zeros), and a bias where the layer offers one."""
    case = draw(weight_cases(zeros=False), label="weight")
    return WeightCase(case.o, case.i, case.seed, bias=draw(offers.strategy("bias"), label="bias"))


# ---------------------------------------------------------------------------------------------------
# Calling the implementation (quantize_int8 returns a pair; Int8Linear is built by from_float)


def checked_invoke(impl: Implementation, name: str, fn, call: str, *args: Tensor):
    """fn(*args) under the suite's wrapper (an exception or a timeout is the component's failure), and an
    argument written in place reported as such."""
    __tracebackhide__ = True
    return guarded_call(COMPONENTS[name], fn, impl.label, call, args, {})


def quantized(impl: Implementation, weight: Tensor) -> tuple[Tensor, Tensor]:
    """The implementation's (q, scale) for ``weight``, checked for the spec's types and shapes."""
    __tracebackhide__ = True
    o, i = weight.shape
    call = f"quantize_int8(weight {tuple(weight.shape)} {str(weight.dtype).removeprefix('torch.')})"
    out = checked_invoke(impl, QUANTIZE, impl.raw(QUANTIZE), call, weight)
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, Tensor) for t in out)):
        raise ComponentFailure(f"{impl}: {call} returned a {type(out).__name__}; the spec's quantize_int8 returns "
                               "(q, scale), two tensors")
    q, scale = out
    if q.dtype != torch.int8 or tuple(q.shape) != (o, i) or tuple(scale.shape) != (o,):
        raise ComponentFailure(f"{impl}: {call} returned q {q.dtype} {tuple(q.shape)} and scale {tuple(scale.shape)}; "
                               f"the spec says q torch.int8 (o, i) = {(o, i)} and one scale per output channel, "
                               f"(o,) = {(o,)}")
    return q, scale


def dequantized(impl: Implementation, q: Tensor, scale: Tensor) -> Tensor:
    return impl.function(DEQUANTIZE)(q, scale)


def int8_layer(impl: Implementation, weight: Tensor, bias: Tensor | None) -> CheckedModule:
    """Int8Linear.from_float(weight[, bias]) of the implementation, wrapped like every module under test."""
    __tracebackhide__ = True
    cls = impl.raw(LINEAR)
    call = f"Int8Linear.from_float(weight {tuple(weight.shape)}{', bias' if bias is not None else ''})"
    if not callable(getattr(cls, "from_float", None)):
        raise ComponentFailure(f"{impl}: {impl.owner(LINEAR)} has no from_float; the spec builds Int8Linear with "
                               "Int8Linear.from_float(weight, bias) from a float layer's weight (o, i) and bias (o,)")
    args = (weight,) if bias is None else (weight, bias)
    module = checked_invoke(impl, LINEAR, cls.from_float, call, *args)
    if not isinstance(module, nn.Module):
        raise ComponentFailure(f"{impl}: {call} returned a {type(module).__name__}, not a torch.nn.Module")
    config = {"in_features": weight.shape[1], "out_features": weight.shape[0], "bias": bias is not None}
    return CheckedModule(COMPONENTS[LINEAR], module.eval(), impl.label, config, impl.offers(LINEAR))


def layer_output(layer: CheckedModule, x: Tensor, o: int) -> Tensor:
    __tracebackhide__ = True
    y = layer(x)
    if tuple(y.shape) != (*x.shape[:-1], o):
        raise ComponentFailure(f"{layer}: returned shape {tuple(y.shape)} for x {tuple(x.shape)}; the spec says "
                               f"(..., o) = {(*x.shape[:-1], o)}")
    return y


def numpy(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


# ---------------------------------------------------------------------------------------------------
# quantize_int8 and dequantize_int8


@pytest.mark.parametrize("component", [QUANTIZE])
@given(case=weight_cases())
def test_quantize_int8_agrees_with_reference(impl, device, component, case):
    """q equals round(w / scale) clamped to [-127, 127] exactly and scale equals the row's largest magnitude
    / 127 (float64 rule), per output channel, with the declared rounding (ties to even by default).

    Hint: one scale per ROW (dim=1 of an (out, in) weight), max|w| / 127 (not 128, no zero point); round to
    nearest (torch.round), not truncate (.to(torch.int8) truncates).
    """
    w = case.weight(device)
    q, scale = quantized(impl, w)
    want_q, want_scale = spec.quantize_int8(numpy(w), impl.offers(component).default("rounding"))
    assert_close(scale, want_scale, axes="o", claim=f"{case}: scale = max|w_row| / 127 per output channel",
                 hint="amax of |w| over each row (dim=1), divided by 127.")
    assert_equal(q, want_q, axes=AXES, claim=f"{case}: q = clamp(round(w / scale[:, None]), -127, 127)",
                 hint="divide each row by its own scale and round to nearest; do not truncate.")


@pytest.mark.requires(QUANTIZE, DEQUANTIZE)
@given(case=weight_cases())
def test_dequantization_is_within_half_a_step_of_the_weight(impl, device, case):
    """Every dequantized entry q * scale lies within half a quantization step of its weight:
    abs(w~[a, c] - w[a, c]) <= scale[a] / 2 with scale[a] = max_c abs(w[a, c]) / 127 (float64, plus its rounding).

    Hint: rounding to nearest moves an entry by at most half a step; truncation moves it by up to a whole one,
    and a clamp that cuts the row maximum (scale = max / 128) by a whole one too.
    """
    w = case.weight(device)
    deq = dequantized(impl, *quantized(impl, w))
    w_np = numpy(w)
    error = np.abs(numpy(deq) - w_np)
    half_step = np.abs(w_np).max(axis=1, keepdims=True) / spec.QMAX / 2
    allowed = half_step * (1 + FLOAT64_RTOL) + FLOAT64_RTOL * np.abs(w_np)
    worst = np.unravel_index(np.argmax(error - allowed), error.shape)
    assert_true(bool((error <= allowed).all()), claim=f"{case}: |dequantize(quantize(w)) - w| <= scale / 2 per entry",
                detail=f"{int((error > allowed).sum())} of {error.size} entries farther; the worst at o={worst[0]}, "
                       f"i={worst[1]}: {error[worst]:.4g} > {allowed[worst]:.4g}",
                hint="round to nearest with the row's own scale max|row| / 127, and dequantize as q * scale[:, None].")


@pytest.mark.parametrize("component", [QUANTIZE])
@given(case=weight_cases())
def test_each_row_maximum_maps_to_plus_or_minus_127(impl, device, component, case):
    """In every nonzero row the entry of largest magnitude quantizes to +127 or -127 (its sign), and every q
    lies in [-127, 127]: each row uses the full symmetric int8 range, whatever the other rows hold.

    Hint: a scale per row (not one for the whole tensor: small rows would use a few levels), max|row| / 127
    (/ 128 with a clamp loses the maximum), and -128 is never used.
    """
    w = case.weight(device)
    q, _ = quantized(impl, w)
    w_np, q_np = numpy(w), numpy(q).astype(np.int64)
    nonzero = np.abs(w_np).max(axis=1) > 0
    top = np.abs(w_np).argmax(axis=1)
    at_top = q_np[np.arange(case.o), top]
    want = (127 * np.sign(w_np[np.arange(case.o), top])).astype(np.int64)
    bad = [a for a in range(case.o) if nonzero[a] and at_top[a] != want[a]]
    assert_true(not bad and bool((np.abs(q_np) <= 127).all()),
                claim=f"{case}: each nonzero row's largest |w| maps to +-127 and q stays in [-127, 127]",
                detail=(f"rows {bad} map their maximum to {[int(at_top[a]) for a in bad]}; q spans "
                        f"{int(q_np.min())} .. {int(q_np.max())}"),
                hint="scale = max|w_row| / 127 for each row separately.")


@pytest.mark.requires(QUANTIZE, DEQUANTIZE)
@given(case=weight_cases(zeros=True))
def test_zero_stays_exactly_zero(impl, device, case):
    """A weight entry of exactly 0 quantizes to q = 0 and dequantizes to exactly 0.0, and an all-zero row
    gets scale 0 (no division by zero, no NaN).

    Hint: symmetric quantization has no zero point (an asymmetric one maps 0 to a nonzero code); guard the
    division of an all-zero row (divide by 1 where the scale is 0) instead of adding an epsilon.
    """
    w = case.weight(device)
    q, scale = quantized(impl, w)
    deq = dequantized(impl, q, scale)
    zero = w == 0
    zero_rows = (~(w != 0).any(dim=1)).nonzero().flatten().tolist()
    assert_true(
        bool((q[zero] == 0).all()) and bool((deq[zero] == 0).all()) and all(scale[a].item() == 0 for a in zero_rows),
        claim=f"{case}: zero entries give q = 0 and dequantize to exactly 0; all-zero rows {zero_rows} have scale 0",
        detail=(f"q at zeros spans {q[zero].tolist()[:6]}, dequantized {deq[zero].tolist()[:6]}; scale of all-zero "
                f"rows {[scale[a].item() for a in zero_rows]}"),
        hint="q = round(w / scale) with no offset; an all-zero row's scale is max|row| / 127 = 0.",
    )


@pytest.mark.needs(rounding="half_even")
@pytest.mark.parametrize("component", [QUANTIZE])
def test_quantize_int8_rounds_ties_to_even(impl, device, component):
    """An entry exactly halfway between two steps rounds to the even one (torch.round, numpy.round and
    torch.quantize_per_channel do): with scale 1, 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -2.5 -> -2, 126.5 -> 126.

    Hint: torch.round rounds half to even; floor(x + 0.5) rounds half up, C's round() away from zero.
    """
    row = [127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]
    w = torch.tensor([row, [-x / 4 for x in row]], dtype=torch.float64, device=device)  # scales 1 and 1/4: exact
    q, _ = quantized(impl, w)
    want = torch.tensor([[127, 0, 2, 2, 0, -2, -2, 126], [-127, 0, -2, -2, 0, 2, 2, -126]], dtype=torch.int8)
    assert_equal(q.cpu(), want, axes=AXES, claim="ties round to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 126.5 -> 126",
                 hint="use torch.round (half to even); if ties go away from zero on purpose, declare "
                      "spec_options = {'rounding': 'half_away'}.")


@pytest.mark.requires(QUANTIZE, DEQUANTIZE)
@pytest.mark.parametrize("dtype", PRECISIONS)
@fewer_examples()
@given(case=weight_cases())
def test_quantize_int8_keeps_dtype_and_device(impl, device, dtype, case):
    """q is int8 on the weight's device, the scale keeps the weight's dtype and device, and dequantize_int8
    returns the scale's dtype on that device.

    Hint: compute the scale from the weight as it is (no .float()); dequantize as q.to(scale.dtype) * scale.
    """
    w = case.weight(device, dtype)
    q, scale = quantized(impl, w)
    deq = dequantized(impl, q, scale)
    seen = (q.dtype, q.device, scale.dtype, scale.device, deq.dtype, deq.device)
    want = (torch.int8, w.device, dtype, w.device, dtype, w.device)
    assert_true(seen == want, claim=f"{case}: q int8, scale and dequantized weight {dtype}, all on {w.device}",
                detail=f"(q dtype, q device, scale dtype, scale device, dequantized dtype, device) = {seen}",
                hint="keep the scale in the weight's dtype; dequantize in the scale's dtype.")


# ---------------------------------------------------------------------------------------------------
# Int8Linear


@pytest.mark.parametrize("component", [LINEAR])
@given(data=st.data())
def test_int8_linear_error_is_within_the_derived_bound(impl, device, component, data):
    """Int8Linear.from_float(w, b)(x) differs from the float layer x w^T + b, for each output a, by at most
    (scale[a] / 2) * sum_c abs(x[..., c]) with scale[a] = max abs(w[a, :]) / 127 (float64, plus its rounding).

    Hint: each weight entry moves by at most half its row's step, so output a moves by at most that times
    sum |x|; a scale shared by all rows, truncation or a lost bias breaks it.
    """
    case = data.draw(layer_cases(impl.offers(component)), label="case")
    w, x = case.weight(device), case.inputs(device)
    b = case.bias_vector(device)
    y = layer_output(int8_layer(impl, w, b), x, case.o)
    exact = numpy(x) @ numpy(w).T + (0.0 if b is None else numpy(b))
    error = np.abs(numpy(y) - exact)
    bound = spec.linear_error_bound(numpy(w), numpy(x))
    allowed = bound * (1 + FLOAT64_RTOL) + FLOAT64_RTOL * np.maximum(1.0, np.abs(exact))
    assert_true(bool((error <= allowed).all()),
                claim=f"{case}: |Int8Linear(x) - (x w^T + b)| <= (scale / 2) sum |x| per output",
                detail=f"{int((error > allowed).sum())} of {error.size} outputs farther; the worst exceeds its "
                       f"bound {float(allowed.flatten()[np.argmax(error - allowed)]):.4g} by "
                       f"{float((error - allowed).max()):.4g}",
                hint="quantize each output row with its own scale, round to nearest, and add the bias in float.")


@pytest.mark.parametrize("component", [LINEAR])
@pytest.mark.parametrize("dtype", PRECISIONS)
@given(data=st.data())
def test_int8_linear_equals_the_float_layer_on_weights_int8_represents(impl, device, dtype, component, data):
    """On weights that are integers in [-127, 127] times a power-of-two row scale (each row holding +-127),
    quantization loses nothing, so Int8Linear equals the float layer x w^T + b (float64 rule; float32 and
    CUDA half precisions by the error-ratio rule against ours), in x's dtype.

    Hint: one scale per output row, the row maximum mapped to +-127, the scale applied per output (not per
    input feature), the bias added, and the result in x's dtype.
    """
    case = data.draw(layer_cases(impl.offers(component)), label="case")
    w, x = case.exact_weight(device, dtype), case.inputs(device, dtype)
    b = case.bias_vector(device, dtype)
    y = layer_output(int8_layer(impl, w, b), x, case.o)
    expected = numpy(x.double()) @ numpy(w.double()).T + (0.0 if b is None else numpy(b.double()))
    baseline = None if dtype == torch.float64 else int8_layer(OURS, w, b)(x)
    assert_close(y, expected, axes="b s o", baseline=baseline,
                 claim=f"{case}, {dtype}: Int8Linear equals the float layer on weights int8 represents exactly",
                 hint="y = (x @ q^T) * scale + bias, with scale per output channel.")


@pytest.mark.parametrize("component", [LINEAR])
@fewer_examples()
@given(data=st.data())
def test_int8_linear_stores_int8_weights(impl, component, data):
    """The layer's state holds the weight as one int8 (o, i) tensor and otherwise only per-output-channel floats
    (scales, bias): at most o*i bytes + 2*o float32 numbers, against 4*o*i bytes for the float32 weight.

    Hint: keep q (int8) and the scales; widen q to x's dtype inside forward instead of caching a float copy.
    """
    case = data.draw(layer_cases(impl.offers(component)), label="case")
    w = case.weight(dtype=torch.float32)
    layer = int8_layer(impl, w, case.bias_vector(dtype=torch.float32))
    tensors = {**dict(layer.module.named_parameters()), **dict(layer.module.named_buffers())}
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    int8_weights = [n for n, t in tensors.items() if t.dtype == torch.int8 and tuple(t.shape) == (case.o, case.i)]
    allowed = spec.weight_bytes(case.o, case.i, element_bytes=1, scale_bytes=2 * 4)
    assert_true(len(int8_weights) == 1 and stored <= allowed,
                claim=f"{case}: the layer stores an int8 (o, i) weight and at most {allowed} bytes in all "
                      f"(float32 weight: {4 * case.o * case.i} bytes)",
                detail=f"{stored} bytes in {[(n, str(t.dtype), tuple(t.shape)) for n, t in tensors.items()]}",
                hint="register q as an int8 buffer and do not keep the float weight (or its dequantized copy).")
