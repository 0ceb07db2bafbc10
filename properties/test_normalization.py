"""Properties of LayerNorm and RMSNorm. Spec: spec/normalization.py.

Every case is drawn from what the implementation offers (properties/options.py): its eps (a fixed eps is
used by the reference and never passed) and LayerNorm's bias. eps = 0 is drawn only by the properties
that stay finite there; the ones that divide a zero row by sqrt(eps) need a positive eps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from properties.attention_cases import OURS
from properties.assertions import PRECISIONS, assert_close, assert_equal, assert_true, float64_rtol
from properties.options import Offers, draws_options
from properties.plugin import backward
from properties.probes import assert_parameters_get_finite_gradients, gradcheck
from properties.strategies import seeds, sequence_shapes, tensor
from spec import normalization as spec

NORMS = ["LayerNorm", "RMSNorm"]
AXES = "b s d"


def positive(value) -> bool:
    """a positive value"""
    return value > 0


@dataclass(frozen=True)
class NormCase:
    """One norm and its input x (b, s, d): the component, sizes, seed and the options it is built with."""

    component: str
    shape: tuple[int, int, int]
    seed: int
    eps: float
    bias: bool  # LayerNorm's additive bias (RMSNorm has none: always False)

    @property
    def d(self) -> int:
        return self.shape[-1]

    @property
    def options(self) -> dict:
        return {"eps": self.eps, "bias": self.bias} if self.component == "LayerNorm" else {"eps": self.eps}

    def build(self, impl, *, device="cpu", dtype=torch.float64, params=None):
        """The component with d_model=d and this case's options (build drops the ones built in)."""
        return impl.build(self.component, seed=self.seed, device=device, dtype=dtype, params=params,
                          d_model=self.d, **self.options)

    def inputs(self, dtype=torch.float64, device="cpu") -> torch.Tensor:
        return tensor(self.seed + 1, *self.shape, dtype=dtype, device=device)

    def unit_affine(self) -> dict[str, torch.Tensor]:
        """Canonical parameters of the identity affine: weight 1 (and bias 0 where there is one)."""
        params = {"weight": torch.ones(self.d, dtype=torch.float64)}
        if self.bias:
            params["bias"] = torch.zeros(self.d, dtype=torch.float64)
        return params

    def __repr__(self) -> str:
        bias = ", bias=False" if self.component == "LayerNorm" and not self.bias else ""
        return f"{self.component}((b, s, d)={self.shape}, eps={self.eps:g}{bias})"


@draws_options("RMSNorm", eps=lambda case: case.eps)
@draws_options("LayerNorm", eps=lambda case: case.eps, bias=lambda case: case.bias)
@st.composite
def norm_cases(draw, offers: Offers, *, eps: str = "positive", min_d: int = 1, max_b: int = 2, max_s: int = 4,
               max_d: int = 6) -> NormCase:
    """A case of the offers' component that the implementation offers.

    eps: "positive" draws among the offered eps > 0 (a property dividing a zero row by sqrt(eps) needs
         one, and ``needs(eps=positive)``); "any" also draws 0.0 where it is offered (d >= 2 then keeps
         every row's variance positive); "default" takes ``offers.default("eps")``.
    """
    shape = draw(sequence_shapes(max_b=max_b, max_s=max_s, min_d=min_d, max_d=max_d), label="shape")
    if eps == "default":
        value = offers.default("eps")
    else:
        values = offers.offered("eps") if eps == "any" else offers.where("eps", positive) or offers.offered("eps")
        value = draw(st.sampled_from(values) if len(values) > 1 else st.just(values[0]), label="eps")
    bias = draw(offers.strategy("bias"), label="bias") if "bias" in offers.values else False
    return NormCase(offers.component, shape, draw(seeds(), label="seed"), value, bias)


def baseline(case: NormCase, module, x: torch.Tensor) -> torch.Tensor:
    """Our implementation's output on x with ``module``'s parameters and the case's options: the same-dtype
    baseline of the error-ratio rule (a declared eps, e.g. 1e-6 for a LayerNorm, is built into ours too)."""
    params = {k: v.detach() for k, v in module.canonical_state().items()}
    return case.build(OURS, device=x.device, dtype=x.dtype, params=params).module(x)


def reference(case: NormCase, module, x) -> np.ndarray:
    fn = spec.layer_norm if case.component == "LayerNorm" else spec.rms_norm
    return fn(module.canonical_numpy(), x.detach().double().cpu().numpy(), eps=case.eps)


def row_statistics(component, x: np.ndarray):
    """(centre, variance) of each row as the component uses them: mean and biased variance for LayerNorm,
    0 and the mean square for RMSNorm. Shapes (..., 1)."""
    if component == "LayerNorm":
        mu = x.mean(axis=-1, keepdims=True)
        return mu, ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return np.zeros_like(x[..., :1]), (x**2).mean(axis=-1, keepdims=True)


@pytest.mark.parametrize("component", NORMS)
@pytest.mark.parametrize("dtype", PRECISIONS)
@given(data=st.data())
def test_norm_agrees_with_reference(impl, device, dtype, component, data):
    """The output equals the spec's float64 reference (the default eps and a large one, with and without
    LayerNorm's bias, as offered).

    Hint: LayerNorm divides by sqrt(biased variance + eps) (divide by d, eps inside the root); RMSNorm
    divides by sqrt(mean(x^2) + eps) with no mean subtraction and no bias; both over the last axis only.
    """
    # LayerNorm over one feature is a constant row (x - mean = 0): that pinned corner case has its own
    # property (test_layer_norm_of_a_constant_row_is_the_bias), so agreement does not shrink onto it.
    case = data.draw(norm_cases(impl.offers(component), min_d=2 if component == "LayerNorm" else 1), label="case")
    module = case.build(impl, device=device, dtype=dtype)
    x = case.inputs(dtype, device)
    assert_close(
        module(x), reference(case, module, x), baseline=baseline(case, module, x), axes=AXES,
        claim=f"{case} agrees with the spec's reference ({dtype})",
        hint="biased variance (mean of squared deviations), eps inside the square root, last axis only.",
    )


@pytest.mark.parametrize("component", NORMS)
@given(data=st.data())
def test_norm_agrees_with_torch_norm(impl, component, data):
    """The output equals ``nn.LayerNorm`` / ``nn.RMSNorm`` (float64) carrying the same weight and bias.

    ``nn.RMSNorm`` gets eps explicitly: its eps=None means finfo(dtype).eps, not the spec's 1e-6.
    """
    if component == "RMSNorm" and not hasattr(torch.nn, "RMSNorm"):
        return  # this torch has no nn.RMSNorm to compare with; the reference property still covers it
    case = data.draw(norm_cases(impl.offers(component)), label="case")
    module = case.build(impl)
    ours_params = module.canonical_state()
    if component == "LayerNorm":
        torch_norm = torch.nn.LayerNorm(case.d, eps=case.eps, bias=case.bias, dtype=torch.float64)
    else:
        torch_norm = torch.nn.RMSNorm(case.d, eps=case.eps, dtype=torch.float64)
    with torch.no_grad():
        for name, value in torch_norm.named_parameters():
            value.copy_(ours_params[name])
    x = case.inputs()
    assert_close(
        module(x), torch_norm(x), axes=AXES,
        claim=f"{case} agrees with torch.nn.{component}",
        hint="torch normalises with the biased variance and eps inside the root (RMSNorm: no mean, no bias).",
    )


@pytest.mark.parametrize("component", NORMS)
@given(data=st.data(), factor=st.sampled_from([1e-2, 0.5, 3.0, 1e2]))
def test_norm_is_invariant_to_positive_rescaling(impl, component, data, factor):
    """N(a x) = N(x) for a > 0: exactly as eps -> 0 (checked with eps = 0 where offered), and for eps > 0

        |N(a x)_i - N(x)_i| <= |w_i| * |z_i| * eps * max(1, 1/a^2) / (2 var),

    z_i = (x_i - mu) / sqrt(var) (LayerNorm: mu the row mean, var the biased variance; RMSNorm: mu = 0,
    var = mean(x^2)). Derivation: N(a x)_i = w_i z_i f(eps / a^2) + b_i and N(x)_i = w_i z_i f(eps) + b_i, with
    f(delta) = (1 + delta / var)^(-1/2) in [1 - delta / (2 var), 1], so the two factors differ by at most
    max(eps, eps / a^2) / (2 var). On top, the float64 rule 1e-9 * (1 + |N(x)_i|) for rounding (the
    float32 rule's relative slack for an implementation that declares float32 compute).

    Hint: divide by the standard deviation (its square root), not the variance.
    """
    case = data.draw(norm_cases(impl.offers(component), eps="any", min_d=2), label="case")
    module = case.build(impl)
    x = case.inputs()
    base, scaled = module(x).detach(), module(factor * x).detach()
    xn = x.numpy()
    mu, var = row_statistics(component, xn)
    weight = np.abs(module.canonical_state()["weight"].detach().double().numpy())
    bound = weight * np.abs(xn - mu) / np.sqrt(var) * case.eps * max(1.0, factor**-2) / (2.0 * var)
    allowed = bound + float64_rtol() * (1.0 + base.abs().numpy())  # float32's rule for declared float32 compute
    excess = (scaled - base).abs().numpy() - allowed
    worst = np.unravel_index(int(excess.argmax()), excess.shape)
    assert_true(
        bool((excess <= 0).all()),
        claim=f"{case} is invariant to rescaling each row by a = {factor:g} > 0",
        detail=f"|N(a x) - N(x)| = {abs(float((scaled - base)[worst])):.3g} at (b, s, d)={tuple(int(i) for i in worst)}, "
        f"above the derived bound {float(allowed[worst]):.3g}",
        hint="N(a x) must equal N(x) up to the eps effect: divide by sqrt(variance + eps), not by the variance.",
    )


@pytest.mark.requires("LayerNorm")
@given(data=st.data(), magnitude=st.sampled_from([1.0, 30.0]))
def test_layer_norm_is_invariant_to_shifting_each_row(impl, data, magnitude):
    """LayerNorm(x + c) = LayerNorm(x) for a constant c per row, for every eps (the mean absorbs c and
    the variance does not see it), up to float64 rounding.

    Hint: the variance is the mean of (x - mean)^2; mean(x^2) alone changes when the row is shifted.
    """
    case = data.draw(norm_cases(impl.offers("LayerNorm")), label="case")
    b, s, d = case.shape
    module = case.build(impl)
    x = case.inputs()
    shift = tensor(case.seed + 2, b, s, 1, dtype=torch.float64, device="cpu", scale=magnitude)
    assert_close(
        module(x + shift), module(x), axes=AXES,
        claim=f"{case} is invariant to adding a constant to each row (|c| ~ {magnitude:g})",
        hint="subtract the row mean before computing the variance.",
    )


@pytest.mark.requires("LayerNorm")
@given(data=st.data())
def test_layer_norm_rows_have_mean_zero_and_unit_variance(impl, data):
    """With weight 1 (and bias 0) every output row has mean 0 and biased variance var / (var + eps), which
    is 1 - eps / (var + eps): 1 as eps -> 0 (var the biased variance of the input row).

    Derivation: out = (x - mu) / sqrt(var + eps), so mean(out) = 0 and mean(out^2) = var / (var + eps).
    Rows have d >= 2 features (a one-feature row has variance 0 and normalises to 0).
    Hint: the variance divides by d (biased, ``unbiased=False``); torch.var's default divides by d - 1.
    """
    case = data.draw(norm_cases(impl.offers("LayerNorm"), min_d=2), label="case")
    module = case.build(impl, params=case.unit_affine())
    x = case.inputs()
    out = module(x)
    _, var = row_statistics("LayerNorm", x.numpy())
    assert_close(
        out.mean(dim=-1, keepdim=True), np.zeros_like(var), axes=AXES,
        claim=f"identity-affine {case}: rows have mean 0",
        hint="subtract the mean over the last axis.",
    )
    assert_close(
        out.pow(2).mean(dim=-1, keepdim=True), var / (var + case.eps), axes=AXES,
        claim=f"identity-affine {case}: rows have biased variance var / (var + eps)",
        hint="the biased variance divides by d; dividing by d - 1 leaves rows with variance (d - 1) / d.",
    )


@pytest.mark.requires("LayerNorm")
@given(data=st.data())
def test_layer_norm_affine_acts_elementwise(impl, data):
    """LayerNorm(x) = weight * LayerNorm_identity(x) + bias, feature by feature (no bias with bias=False).

    Hint: scale by ``weight`` and add ``bias`` after normalising, not before.
    """
    case = data.draw(norm_cases(impl.offers("LayerNorm")), label="case")
    module = case.build(impl)
    plain = case.build(impl, params=case.unit_affine())
    x = case.inputs()
    params = module.canonical_state()
    bias = params["bias"].detach() if case.bias else 0.0
    assert_close(
        module(x), plain(x) * params["weight"].detach() + bias, axes=AXES,
        claim=f"{case}: the weight and bias act elementwise after normalising",
        hint="out = normalised * weight + bias; both parameters have shape (d,).",
    )


@pytest.mark.requires("LayerNorm")
@pytest.mark.needs(eps=positive)
@given(data=st.data(), value=st.sampled_from([0.0, 0.7, -3.0]))
def test_layer_norm_of_a_constant_row_is_the_bias(impl, data, value):
    """A constant row has x - mean = 0 and variance 0, so it normalises to 0 (finite, thanks to eps > 0)
    and the output is ``bias`` (zeros with bias=False); up to float64 rounding (the mean of d equal
    numbers may round).

    Hint: keep eps inside the square root: 0 / sqrt(0) is NaN.
    """
    case = data.draw(norm_cases(impl.offers("LayerNorm")), label="case")
    module = case.build(impl)
    x = torch.full(case.shape, value, dtype=torch.float64)
    bias = module.canonical_state()["bias"].detach() if case.bias else torch.zeros(case.d, dtype=torch.float64)
    assert_close(
        module(x), bias.expand(case.shape), axes=AXES,
        claim=f"{case} of a constant row ({value:g}) is the bias",
        hint="(x - mean) is exactly 0; only the bias remains, provided eps keeps the division finite.",
    )


@pytest.mark.parametrize("component", NORMS)
@given(data=st.data())
def test_norm_rows_are_independent(impl, component, data):
    """Changing one row x[b, s, :] changes no other row's output, bit for bit.

    Hint: statistics are taken over the last axis only (dim=-1), not over positions or the batch.
    """
    case = data.draw(norm_cases(impl.offers(component)), label="case")
    b, s, d = case.shape
    s += 1  # at least two positions
    row = (data.draw(st.integers(0, b - 1), label="row_b"), data.draw(st.integers(0, s - 1), label="row_s"))
    module = case.build(impl)
    x = tensor(case.seed + 1, b, s, d, dtype=torch.float64, device="cpu")
    x2 = x.clone()
    x2[row] += tensor(case.seed + 2, d, dtype=torch.float64, device="cpu")
    others = torch.ones(b, s, dtype=torch.bool)
    others[row] = False
    assert_equal(
        module(x2)[others], module(x)[others],
        claim=f"{case} rows are independent: changing row (b, s)={row} changes no other row ({(b, s, d)})",
        hint="mean and variance are over dim=-1 with keepdim=True; a mean over dim=1 mixes positions.",
    )


@pytest.mark.requires("RMSNorm")
@given(data=st.data())
def test_rms_norm_is_odd(impl, data):
    """RMSNorm(-x) = -RMSNorm(x), exactly: mean(x^2) does not see the sign and everything else is a
    product, and negation commutes with rounding.

    Hint: RMSNorm has no additive term: multiply by the weight, do not add it (and there is no bias).
    """
    case = data.draw(norm_cases(impl.offers("RMSNorm")), label="case")
    module = case.build(impl)
    x = case.inputs()
    assert_equal(
        module(-x), -module(x), axes=AXES,
        claim=f"{case} is odd: RMSNorm(-x) = -RMSNorm(x)",
        hint="x / sqrt(mean(x^2) + eps) * weight changes sign with x; an added term breaks that.",
    )


@pytest.mark.requires("RMSNorm")
@given(data=st.data(), shift=st.sampled_from([0.5, 1.0, -2.0]))
def test_rms_norm_does_not_subtract_the_mean(impl, data, shift):
    """RMSNorm is not shift-invariant (a LayerNorm handed in as RMSNorm fails here): for a row x with
    mean 0 and unit weight, mean(RMSNorm(x + c)) = c / sqrt(mean(x^2) + c^2 + eps), since
    mean((x + c)^2) = mean(x^2) + c^2. Subtracting the mean would give 0.

    Hint: RMSNorm divides by the root mean square of x itself; no centring.
    """
    case = data.draw(norm_cases(impl.offers("RMSNorm")), label="case")
    module = case.build(impl, params=case.unit_affine())
    x = case.inputs()
    x = x - x.mean(dim=-1, keepdim=True)
    ms = x.pow(2).mean(dim=-1, keepdim=True)
    want = shift / torch.sqrt(ms + shift**2 + case.eps)
    assert_close(
        module(x + shift).mean(dim=-1, keepdim=True), want, axes=AXES,
        claim=f"{case} keeps the mean: a centred row shifted by c = {shift:g} has output mean "
        "c / sqrt(mean(x^2) + c^2 + eps)",
        hint="do not subtract the mean in RMSNorm (that is LayerNorm without a bias).",
    )


@pytest.mark.requires("RMSNorm")
@given(data=st.data())
def test_rms_norm_output_has_unit_rms(impl, data):
    """With weight 1 each output row has root mean square sqrt(ms / (ms + eps)) (ms = mean(x^2) of the
    input row), which tends to 1 as eps -> 0. Derivation: mean(out^2) = ms / (ms + eps).

    Hint: the mean of squares divides by d; the L2 norm (no 1/d) leaves rows with RMS 1/sqrt(d).
    """
    case = data.draw(norm_cases(impl.offers("RMSNorm")), label="case")
    module = case.build(impl, params=case.unit_affine())
    x = case.inputs()
    ms = x.pow(2).mean(dim=-1, keepdim=True)
    assert_close(
        module(x).pow(2).mean(dim=-1, keepdim=True).sqrt(), torch.sqrt(ms / (ms + case.eps)), axes=AXES,
        claim=f"unit-weight {case}: rows have RMS sqrt(ms / (ms + eps))",
        hint="divide by sqrt(mean(x^2) + eps): the mean over d features, not the sum.",
    )


@pytest.mark.requires("RMSNorm")
@pytest.mark.needs(eps=positive)
@given(data=st.data())
def test_rms_norm_of_the_zero_row_is_zero(impl, device, data):
    """RMSNorm maps the zero row to exactly zero: 0 * (1 / sqrt(0 + eps)) * weight = 0.

    Hint: eps inside the square root keeps this finite; an added weight or bias makes it nonzero.
    """
    case = data.draw(norm_cases(impl.offers("RMSNorm")), label="case")
    module = case.build(impl, device=device)
    x = torch.zeros(case.shape, dtype=torch.float64, device=device)
    assert_equal(
        module(x), torch.zeros_like(x), axes=AXES,
        claim=f"{case} of the zero row is zero",
        hint="x / sqrt(mean(x^2) + eps) * weight is 0 when x is 0.",
    )


@pytest.mark.parametrize("component", NORMS)
@given(data=st.data())
def test_norm_does_not_overflow_in_float16(impl, device, component, data):
    """In float16, rows whose largest |entry| is 6e4 (float16's largest finite value is 65504, and
    x^2 ~ 3.6e9) normalise correctly: the spec computes half inputs in float32 and casts back.

    This is a claim about one dtype, not a comparison of precisions, so it runs on the CPU as well
    (torch's CPU kernels handle float16 for every op involved). The allowance is one float16 unit in the
    last place of max(1, |expected|), 2^-10 relative: the final cast rounds by half a unit, float32
    arithmetic adds ~1e-6. The expected value is the float64 reference on the same float16 inputs and
    weights, at the implementation's eps. A norm computed in float16 returns 0 or NaN instead.
    Rows have d >= 2 entries of both signs: a constant row tests nothing here (torch's CPU float16
    LayerNorm returns ~0.99 for a constant row of 6e4, an accuracy issue outside this claim).

    Hint: ``h = x.float()``, normalise, then ``.to(x.dtype)``.
    """
    case = data.draw(norm_cases(impl.offers(component), eps="default", min_d=2), label="case")
    module = case.build(impl, device=device, dtype=torch.float16)
    z = case.inputs()
    x = (6e4 * z / z.abs().amax(dim=-1, keepdim=True)).to(device=device, dtype=torch.float16)
    out = module(x).detach()
    want = torch.as_tensor(reference(case, module, x))
    err = (out.double().cpu() - want).abs()
    allowed = 2.0**-10 * want.abs().clamp(min=1.0)
    worst = np.unravel_index(int((err - allowed).argmax()), tuple(err.shape))
    assert_true(
        out.dtype == torch.float16 and bool((err <= allowed).all()),
        claim=f"{case} does not overflow in float16 for entries up to 6e4 ({device})",
        detail=f"output dtype {out.dtype}; at (b, s, d)={tuple(int(i) for i in worst)} expected "
        f"{float(want[worst]):.5g}, got {float(out[worst]):.5g} (allowed error {float(allowed[worst]):.3g})",
        hint="compute the statistics in float32 (x.float()) and cast the result back to float16.",
    )


@pytest.mark.parametrize("component", NORMS)
@given(data=st.data())
def test_norm_passes_gradcheck(impl, component, data):
    """float64 gradcheck: the analytic gradient w.r.t. x equals finite differences.

    Hint: ``.detach()`` on the mean or the variance (a "stop-gradient" shortcut) changes the gradient.
    """
    case = data.draw(norm_cases(impl.offers(component), max_b=1, max_s=2, max_d=4), label="case")
    module = case.build(impl)
    gradcheck(
        module, (case.inputs(),),
        claim=f"{case}'s input gradient is right",
        hint="keep every step of the statistics differentiable.",
    )


@pytest.mark.parametrize("component", NORMS)
@given(data=st.data())
def test_norm_parameters_get_finite_nonzero_gradients(impl, component, data):
    """After backward of a random linear function of the output, every canonical parameter has a finite
    gradient that is not all zero (d loss / d weight = sum of g * normalised x; / d bias = sum of g).
    Rows have d >= 2 features: a LayerNorm row of one feature normalises to 0, so its weight gets none.

    Hint: parameters must be ``nn.Parameter`` with requires_grad=True and used without ``.data``.
    """
    case = data.draw(norm_cases(impl.offers(component), min_d=2), label="case")
    module = case.build(impl)
    x = case.inputs()
    probe = tensor(case.seed + 2, *case.shape, dtype=torch.float64, device="cpu")
    backward((module(x) * probe).sum(), module)
    assert_parameters_get_finite_gradients(
        module, nonzero="all",
        claim=f"{case}: the parameters get finite, nonzero gradients",
        hint="register it as nn.Parameter (requires_grad=True) and use it in forward without .data or .detach().",
    )
