"""Properties of LayerNorm and RMSNorm. Spec: spec/normalization.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import implementations
from properties.assertions import PRECISIONS, assert_close, assert_equal, assert_true
from properties.plugin import Implementation, backward
from properties.probes import assert_parameters_get_finite_gradients, gradcheck
from properties.strategies import seeds, sequence_shapes, tensor
from spec import normalization as spec

NORMS = ["LayerNorm", "RMSNorm"]
DEFAULT_EPS = {"LayerNorm": 1e-5, "RMSNorm": 1e-6}
AXES = "b s d"
OURS = Implementation("ours", implementations)  # the same-dtype baseline of the error-ratio rule


def build(impl, component, d, seed, *, eps=None, device="cpu", dtype=torch.float64, params=None):
    """The component with d_model=d (eps passed only when given, so defaults are exercised too)."""
    extra = {} if eps is None else {"eps": eps}
    return impl.build(component, seed=seed, device=device, dtype=dtype, params=params, d_model=d, **extra)


def unit_affine(component, d):
    """Canonical parameters of the identity affine: weight 1 (and bias 0 for LayerNorm)."""
    params = {"weight": torch.ones(d, dtype=torch.float64)}
    if component == "LayerNorm":
        params["bias"] = torch.zeros(d, dtype=torch.float64)
    return params


def numpy_params(module) -> dict[str, np.ndarray]:
    return {name: value.detach().double().cpu().numpy() for name, value in module.canonical_state().items()}


def reference(component, module, x, eps):
    fn = spec.layer_norm if component == "LayerNorm" else spec.rms_norm
    return fn(numpy_params(module), x.detach().double().cpu().numpy(), eps=eps)


def row_statistics(component, x: np.ndarray):
    """(centre, variance) of each row as the component uses them: mean and biased variance for LayerNorm,
    0 and the mean square for RMSNorm. Shapes (..., 1)."""
    if component == "LayerNorm":
        mu = x.mean(axis=-1, keepdims=True)
        return mu, ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return np.zeros_like(x[..., :1]), (x**2).mean(axis=-1, keepdims=True)


@pytest.mark.parametrize("component", NORMS)
@pytest.mark.parametrize("dtype", PRECISIONS)
@given(shape=sequence_shapes(), seed=seeds(), eps=st.sampled_from([None, 1e-2]))
def test_norm_agrees_with_reference(impl, device, dtype, component, shape, seed, eps):
    """The output equals the spec's float64 reference (default eps and a large one).

    Hint: LayerNorm divides by sqrt(biased variance + eps) (divide by d, eps inside the root); RMSNorm
    divides by sqrt(mean(x^2) + eps) with no mean subtraction and no bias; both over the last axis only.
    """
    module = build(impl, component, shape[-1], seed, eps=eps, device=device, dtype=dtype)
    x = tensor(seed + 1, *shape, dtype=dtype, device=device)
    baseline = build(OURS, component, shape[-1], seed, eps=eps, device=device, dtype=dtype).module(x)
    want = reference(component, module, x, DEFAULT_EPS[component] if eps is None else eps)
    assert_close(
        module(x), want, baseline=baseline, axes=AXES,
        claim=f"{component} agrees with the spec's reference (b, s, d={shape}, eps={eps or 'default'}, {dtype})",
        hint="biased variance (mean of squared deviations), eps inside the square root, last axis only.",
    )


@pytest.mark.parametrize("component", NORMS)
@given(shape=sequence_shapes(), seed=seeds(), eps=st.sampled_from([None, 1e-2]))
def test_norm_agrees_with_torch_norm(impl, component, shape, seed, eps):
    """The output equals ``nn.LayerNorm`` / ``nn.RMSNorm`` (float64) carrying the same weight and bias.

    ``nn.RMSNorm`` gets eps explicitly: its eps=None means finfo(dtype).eps, not the spec's 1e-6.
    """
    if component == "RMSNorm" and not hasattr(torch.nn, "RMSNorm"):
        return  # this torch has no nn.RMSNorm to compare with; the reference property still covers it
    b, s, d = shape
    eps_value = DEFAULT_EPS[component] if eps is None else eps
    module = build(impl, component, d, seed, eps=eps)
    ours_params = module.canonical_state()
    if component == "LayerNorm":
        torch_norm = torch.nn.LayerNorm(d, eps=eps_value, dtype=torch.float64)
    else:
        torch_norm = torch.nn.RMSNorm(d, eps=eps_value, dtype=torch.float64)
    with torch.no_grad():
        for name, value in torch_norm.named_parameters():
            value.copy_(ours_params[name])
    x = tensor(seed + 1, *shape, dtype=torch.float64, device="cpu")
    assert_close(
        module(x), torch_norm(x), axes=AXES,
        claim=f"{component} agrees with torch.nn.{component} (b, s, d={shape}, eps={eps_value:g})",
        hint="torch normalises with the biased variance and eps inside the root (RMSNorm: no mean, no bias).",
    )


@pytest.mark.parametrize("component", NORMS)
@given(
    shape=sequence_shapes(min_d=2),
    seed=seeds(),
    factor=st.sampled_from([1e-2, 0.5, 3.0, 1e2]),
    eps=st.sampled_from([0.0, None, 1e-2]),
)
def test_norm_is_invariant_to_positive_rescaling(impl, component, shape, seed, factor, eps):
    """N(a x) = N(x) for a > 0: exactly as eps -> 0 (checked with eps = 0), and for eps > 0 within

        |N(a x)_i - N(x)_i| <= |w_i| * |z_i| * eps * max(1, 1/a^2) / (2 var),

    z_i = (x_i - mu) / sqrt(var) (LayerNorm: mu the row mean, var the biased variance; RMSNorm: mu = 0,
    var = mean(x^2)). Derivation: N(a x)_i = w_i z_i f(eps / a^2) and N(x)_i = w_i z_i f(eps), with
    f(delta) = (1 + delta / var)^(-1/2) in [1 - delta / (2 var), 1], so the two factors differ by at most
    max(eps, eps / a^2) / (2 var). On top, the float64 rule 1e-9 * (1 + |N(x)_i|) for rounding.

    Hint: divide by the standard deviation (its square root), not the variance.
    """
    b, s, d = shape
    eps_value = DEFAULT_EPS[component] if eps is None else eps
    module = build(impl, component, d, seed, eps=eps)
    x = tensor(seed + 1, *shape, dtype=torch.float64, device="cpu")
    base, scaled = module(x).detach(), module(factor * x).detach()
    xn = x.numpy()
    mu, var = row_statistics(component, xn)
    weight = np.abs(module.canonical_state()["weight"].detach().double().numpy())
    bound = weight * np.abs(xn - mu) / np.sqrt(var) * eps_value * max(1.0, factor**-2) / (2.0 * var)
    allowed = bound + 1e-9 * (1.0 + base.abs().numpy())
    excess = (scaled - base).abs().numpy() - allowed
    worst = np.unravel_index(int(excess.argmax()), excess.shape)
    assert_true(
        bool((excess <= 0).all()),
        claim=f"{component} is invariant to rescaling each row by a = {factor:g} > 0 "
        f"(b, s, d={shape}, eps={eps_value:g})",
        detail=f"|N(a x) - N(x)| = {abs(float((scaled - base)[worst])):.3g} at (b, s, d)={tuple(int(i) for i in worst)}, "
        f"above the derived bound {float(allowed[worst]):.3g}",
        hint="N(a x) must equal N(x) up to the eps effect: divide by sqrt(variance + eps), not by the variance.",
    )


@pytest.mark.requires("LayerNorm")
@given(shape=sequence_shapes(), seed=seeds(), magnitude=st.sampled_from([1.0, 30.0]), eps=st.sampled_from([None, 1e-2]))
def test_layer_norm_is_invariant_to_shifting_each_row(impl, shape, seed, magnitude, eps):
    """LayerNorm(x + c) = LayerNorm(x) for a constant c per row, for every eps (the mean absorbs c and
    the variance does not see it), up to float64 rounding.

    Hint: the variance is the mean of (x - mean)^2; mean(x^2) alone changes when the row is shifted.
    """
    b, s, d = shape
    module = build(impl, "LayerNorm", d, seed, eps=eps)
    x = tensor(seed + 1, *shape, dtype=torch.float64, device="cpu")
    shift = tensor(seed + 2, b, s, 1, dtype=torch.float64, device="cpu", scale=magnitude)
    assert_close(
        module(x + shift), module(x), axes=AXES,
        claim=f"LayerNorm is invariant to adding a constant to each row (b, s, d={shape}, |c| ~ {magnitude:g})",
        hint="subtract the row mean before computing the variance.",
    )


@pytest.mark.requires("LayerNorm")
@given(shape=sequence_shapes(min_d=2), seed=seeds(), eps=st.sampled_from([None, 1e-2]))
def test_layer_norm_rows_have_mean_zero_and_unit_variance(impl, shape, seed, eps):
    """With weight 1 and bias 0 every output row has mean 0 and biased variance var / (var + eps), which
    is 1 - eps / (var + eps): 1 as eps -> 0 (var the biased variance of the input row).

    Derivation: out = (x - mu) / sqrt(var + eps), so mean(out) = 0 and mean(out^2) = var / (var + eps).
    Rows have d >= 2 features (a one-feature row has variance 0 and normalises to 0).
    Hint: the variance divides by d (biased, ``unbiased=False``); torch.var's default divides by d - 1.
    """
    b, s, d = shape
    eps_value = DEFAULT_EPS["LayerNorm"] if eps is None else eps
    module = build(impl, "LayerNorm", d, seed, eps=eps, params=unit_affine("LayerNorm", d))
    x = tensor(seed + 1, *shape, dtype=torch.float64, device="cpu")
    out = module(x)
    _, var = row_statistics("LayerNorm", x.numpy())
    assert_close(
        out.mean(dim=-1, keepdim=True), np.zeros_like(var), axes=AXES,
        claim=f"identity-affine LayerNorm rows have mean 0 (b, s, d={shape})",
        hint="subtract the mean over the last axis.",
    )
    assert_close(
        out.pow(2).mean(dim=-1, keepdim=True), var / (var + eps_value), axes=AXES,
        claim=f"identity-affine LayerNorm rows have biased variance var / (var + eps) (b, s, d={shape}, eps={eps_value:g})",
        hint="the biased variance divides by d; dividing by d - 1 leaves rows with variance (d - 1) / d.",
    )


@pytest.mark.requires("LayerNorm")
@given(shape=sequence_shapes(), seed=seeds())
def test_layer_norm_affine_acts_elementwise(impl, shape, seed):
    """LayerNorm(x) = weight * LayerNorm_identity(x) + bias, feature by feature.

    Hint: scale by ``weight`` and add ``bias`` after normalising, not before.
    """
    b, s, d = shape
    module = build(impl, "LayerNorm", d, seed)
    plain = build(impl, "LayerNorm", d, seed, params=unit_affine("LayerNorm", d))
    x = tensor(seed + 1, *shape, dtype=torch.float64, device="cpu")
    params = module.canonical_state()
    assert_close(
        module(x), plain(x) * params["weight"].detach() + params["bias"].detach(), axes=AXES,
        claim=f"LayerNorm's weight and bias act elementwise after normalising (b, s, d={shape})",
        hint="out = normalised * weight + bias; both parameters have shape (d,).",
    )


@pytest.mark.requires("LayerNorm")
@given(shape=sequence_shapes(), seed=seeds(), value=st.sampled_from([0.0, 0.7, -3.0]))
def test_layer_norm_of_a_constant_row_is_the_bias(impl, shape, seed, value):
    """A constant row has x - mean = 0 and variance 0, so it normalises to 0 (finite, thanks to eps > 0)
    and the output is ``bias``; up to float64 rounding (the mean of d equal numbers may round).

    Hint: keep eps inside the square root: 0 / sqrt(0) is NaN.
    """
    b, s, d = shape
    module = build(impl, "LayerNorm", d, seed)
    x = torch.full(shape, value, dtype=torch.float64)
    bias = module.canonical_state()["bias"].detach()
    assert_close(
        module(x), bias.expand(shape), axes=AXES,
        claim=f"LayerNorm of a constant row ({value:g}) is the bias (b, s, d={shape})",
        hint="(x - mean) is exactly 0; only the bias remains, provided eps keeps the division finite.",
    )


@pytest.mark.parametrize("component", NORMS)
@given(shape=sequence_shapes(), seed=seeds(), data=st.data())
def test_norm_rows_are_independent(impl, component, shape, seed, data):
    """Changing one row x[b, s, :] changes no other row's output, bit for bit.

    Hint: statistics are taken over the last axis only (dim=-1), not over positions or the batch.
    """
    b, s, d = shape
    s += 1  # at least two positions
    row = (data.draw(st.integers(0, b - 1), label="row_b"), data.draw(st.integers(0, s - 1), label="row_s"))
    module = build(impl, component, d, seed)
    x = tensor(seed + 1, b, s, d, dtype=torch.float64, device="cpu")
    x2 = x.clone()
    x2[row] += tensor(seed + 2, d, dtype=torch.float64, device="cpu")
    others = torch.ones(b, s, dtype=torch.bool)
    others[row] = False
    assert_equal(
        module(x2)[others], module(x)[others],
        claim=f"{component} rows are independent: changing row (b, s)={row} changes no other row ({(b, s, d)})",
        hint="mean and variance are over dim=-1 with keepdim=True; a mean over dim=1 mixes positions.",
    )


@pytest.mark.requires("RMSNorm")
@given(shape=sequence_shapes(), seed=seeds())
def test_rms_norm_is_odd(impl, shape, seed):
    """RMSNorm(-x) = -RMSNorm(x), exactly: mean(x^2) does not see the sign and everything else is a
    product, and negation commutes with rounding.

    Hint: RMSNorm has no additive term: multiply by the weight, do not add it (and there is no bias).
    """
    module = build(impl, "RMSNorm", shape[-1], seed)
    x = tensor(seed + 1, *shape, dtype=torch.float64, device="cpu")
    assert_equal(
        module(-x), -module(x), axes=AXES,
        claim=f"RMSNorm is odd: RMSNorm(-x) = -RMSNorm(x) (b, s, d={shape})",
        hint="x / sqrt(mean(x^2) + eps) * weight changes sign with x; an added term breaks that.",
    )


@pytest.mark.requires("RMSNorm")
@given(shape=sequence_shapes(), seed=seeds(), shift=st.sampled_from([0.5, 1.0, -2.0]), eps=st.sampled_from([None, 1e-2]))
def test_rms_norm_does_not_subtract_the_mean(impl, shape, seed, shift, eps):
    """RMSNorm is not shift-invariant (a LayerNorm handed in as RMSNorm fails here): for a row x with
    mean 0 and unit weight, mean(RMSNorm(x + c)) = c / sqrt(mean(x^2) + c^2 + eps), since
    mean((x + c)^2) = mean(x^2) + c^2. Subtracting the mean would give 0.

    Hint: RMSNorm divides by the root mean square of x itself; no centring.
    """
    b, s, d = shape
    eps_value = DEFAULT_EPS["RMSNorm"] if eps is None else eps
    module = build(impl, "RMSNorm", d, seed, eps=eps, params=unit_affine("RMSNorm", d))
    x = tensor(seed + 1, *shape, dtype=torch.float64, device="cpu")
    x = x - x.mean(dim=-1, keepdim=True)
    ms = x.pow(2).mean(dim=-1, keepdim=True)
    want = shift / torch.sqrt(ms + shift**2 + eps_value)
    assert_close(
        module(x + shift).mean(dim=-1, keepdim=True), want, axes=AXES,
        claim=f"RMSNorm keeps the mean: a centred row shifted by c = {shift:g} has output mean "
        f"c / sqrt(mean(x^2) + c^2 + eps) (b, s, d={shape})",
        hint="do not subtract the mean in RMSNorm (that is LayerNorm without a bias).",
    )


@pytest.mark.requires("RMSNorm")
@given(shape=sequence_shapes(), seed=seeds(), eps=st.sampled_from([None, 1e-2]))
def test_rms_norm_output_has_unit_rms(impl, shape, seed, eps):
    """With weight 1 each output row has root mean square sqrt(ms / (ms + eps)) (ms = mean(x^2) of the
    input row), which tends to 1 as eps -> 0. Derivation: mean(out^2) = ms / (ms + eps).

    Hint: the mean of squares divides by d; the L2 norm (no 1/d) leaves rows with RMS 1/sqrt(d).
    """
    b, s, d = shape
    eps_value = DEFAULT_EPS["RMSNorm"] if eps is None else eps
    module = build(impl, "RMSNorm", d, seed, eps=eps, params=unit_affine("RMSNorm", d))
    x = tensor(seed + 1, *shape, dtype=torch.float64, device="cpu")
    ms = x.pow(2).mean(dim=-1, keepdim=True)
    assert_close(
        module(x).pow(2).mean(dim=-1, keepdim=True).sqrt(), torch.sqrt(ms / (ms + eps_value)), axes=AXES,
        claim=f"unit-weight RMSNorm rows have RMS sqrt(ms / (ms + eps)) (b, s, d={shape}, eps={eps_value:g})",
        hint="divide by sqrt(mean(x^2) + eps): the mean over d features, not the sum.",
    )


@pytest.mark.requires("RMSNorm")
@given(shape=sequence_shapes(), seed=seeds())
def test_rms_norm_of_the_zero_row_is_zero(impl, device, shape, seed):
    """RMSNorm maps the zero row to exactly zero: 0 * (1 / sqrt(0 + eps)) * weight = 0.

    Hint: eps inside the square root keeps this finite; an added weight or bias makes it nonzero.
    """
    module = build(impl, "RMSNorm", shape[-1], seed, device=device)
    x = torch.zeros(shape, dtype=torch.float64, device=device)
    assert_equal(
        module(x), torch.zeros_like(x), axes=AXES,
        claim=f"RMSNorm of the zero row is zero (b, s, d={shape})",
        hint="x / sqrt(mean(x^2) + eps) * weight is 0 when x is 0.",
    )


@pytest.mark.parametrize("component", NORMS)
@given(shape=sequence_shapes(min_d=2), seed=seeds())
def test_norm_does_not_overflow_in_float16(impl, device, component, shape, seed):
    """In float16, rows whose largest |entry| is 6e4 (float16's largest finite value is 65504, and
    x^2 ~ 3.6e9) normalise correctly: the spec computes half inputs in float32 and casts back.

    This is a claim about one dtype, not a comparison of precisions, so it runs on the CPU as well
    (torch's CPU kernels handle float16 for every op involved). The allowance is one float16 unit in the
    last place of max(1, |expected|), 2^-10 relative: the final cast rounds by half a unit, float32
    arithmetic adds ~1e-6. The expected value is the float64 reference on the same float16 inputs and
    weights. A norm computed in float16 returns 0 or NaN instead.
    Rows have d >= 2 entries of both signs: a constant row tests nothing here (torch's CPU float16
    LayerNorm returns ~0.99 for a constant row of 6e4, an accuracy issue outside this claim).

    Hint: ``h = x.float()``, normalise, then ``.to(x.dtype)``.
    """
    b, s, d = shape
    module = build(impl, component, d, seed, device=device, dtype=torch.float16)
    z = tensor(seed + 1, *shape, dtype=torch.float64, device="cpu")
    x = (6e4 * z / z.abs().amax(dim=-1, keepdim=True)).to(device=device, dtype=torch.float16)
    out = module(x).detach()
    want = torch.as_tensor(reference(component, module, x, DEFAULT_EPS[component]))
    err = (out.double().cpu() - want).abs()
    allowed = 2.0**-10 * want.abs().clamp(min=1.0)
    worst = np.unravel_index(int((err - allowed).argmax()), tuple(err.shape))
    assert_true(
        out.dtype == torch.float16 and bool((err <= allowed).all()),
        claim=f"{component} does not overflow in float16 for entries up to 6e4 (b, s, d={shape}, {device})",
        detail=f"output dtype {out.dtype}; at (b, s, d)={tuple(int(i) for i in worst)} expected "
        f"{float(want[worst]):.5g}, got {float(out[worst]):.5g} (allowed error {float(allowed[worst]):.3g})",
        hint="compute the statistics in float32 (x.float()) and cast the result back to float16.",
    )


@pytest.mark.parametrize("component", NORMS)
@given(shape=sequence_shapes(max_b=1, max_s=2, max_d=4), seed=seeds(), eps=st.sampled_from([None, 1e-2]))
def test_norm_passes_gradcheck(impl, component, shape, seed, eps):
    """float64 gradcheck: the analytic gradient w.r.t. x equals finite differences.

    Hint: ``.detach()`` on the mean or the variance (a "stop-gradient" shortcut) changes the gradient.
    """
    module = build(impl, component, shape[-1], seed, eps=eps)
    gradcheck(
        module, (tensor(seed + 1, *shape, dtype=torch.float64, device="cpu"),),
        claim=f"{component}'s input gradient is right (b, s, d={shape})",
        hint="keep every step of the statistics differentiable.",
    )


@pytest.mark.parametrize("component", NORMS)
@given(shape=sequence_shapes(min_d=2), seed=seeds())
def test_norm_parameters_get_finite_nonzero_gradients(impl, component, shape, seed):
    """After backward of a random linear function of the output, every canonical parameter has a finite
    gradient that is not all zero (d loss / d weight = sum of g * normalised x; / d bias = sum of g).
    Rows have d >= 2 features: a LayerNorm row of one feature normalises to 0, so its weight gets none.

    Hint: parameters must be ``nn.Parameter`` with requires_grad=True and used without ``.data``.
    """
    module = build(impl, component, shape[-1], seed)
    x = tensor(seed + 1, *shape, dtype=torch.float64, device="cpu")
    probe = tensor(seed + 2, *shape, dtype=torch.float64, device="cpu")
    backward((module(x) * probe).sum(), module)
    assert_parameters_get_finite_gradients(
        module.canonical_state(), nonzero="all",
        claim=f"{component}'s parameters get finite, nonzero gradients (b, s, d={shape})",
        hint="register it as nn.Parameter (requires_grad=True) and use it in forward without .data or .detach().",
    )
