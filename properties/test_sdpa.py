"""Properties of scaled_dot_product_attention. Spec: spec/sdpa.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import implementations
from properties.assertions import PRECISIONS, assert_close, assert_equal, assert_true
from properties.probes import gradcheck, jacobian, math_backend, torch_has_enable_gqa
from properties.strategies import AttentionConfig, as_mask, attention_configs, boolean_masks, seeds, tensor
from spec import sdpa as spec

pytestmark = pytest.mark.requires("scaled_dot_product_attention")
AXES = "b h s e"


def qkv(cfg: AttentionConfig, seed: int, dtype=torch.float64, device="cpu", scale=1.0):
    q = tensor(seed, cfg.b, cfg.h, cfg.s, cfg.e, dtype=dtype, device=device, scale=scale)
    k = tensor(seed + 1, cfg.b, cfg.g, cfg.t, cfg.e, dtype=dtype, device=device, scale=scale)
    v = tensor(seed + 2, cfg.b, cfg.g, cfg.t, cfg.e, dtype=dtype, device=device)
    return q, k, v


@st.composite
def calls(draw, heads="gqa"):
    """A configuration, a seed, and maybe a (b, h|1, s, t) mask and a causal flag."""
    cfg = draw(attention_configs(heads=heads, cross=True), label="cfg")
    mask = None
    if draw(st.booleans(), label="with_mask"):
        mask = draw(boolean_masks((cfg.b, draw(st.sampled_from([1, cfg.h]), label="mask_heads"), cfg.s, cfg.t)))
    causal = draw(st.booleans(), label="causal")
    return cfg, draw(seeds(), label="seed"), mask, causal


@pytest.mark.parametrize("dtype", PRECISIONS)
@given(call=calls())
def test_sdpa_agrees_with_reference(impl, device, dtype, call):
    """The output equals the spec's float64 reference, masks and causal flag included.

    Hint: check the scale (1/sqrt(head width), not 1/sqrt(d_model)), the softmax axis (keys, the last),
    the mask polarity (True = may attend) and the causal alignment (bottom-right when s != t).
    """
    cfg, seed, mask, causal = call
    sdpa = impl.function("scaled_dot_product_attention")
    q, k, v = qkv(cfg, seed, dtype, device)
    m = None if mask is None else as_mask(mask, device)
    out = sdpa(q, k, v, mask=m, causal=causal)
    want = spec.scaled_dot_product_attention(*(a.double().cpu().numpy() for a in (q, k, v)), mask=mask, causal=causal)
    baseline = implementations.scaled_dot_product_attention(q, k, v, mask=m, causal=causal)
    assert_close(
        out, want, baseline=baseline, axes=AXES,
        claim=f"scaled_dot_product_attention agrees with the spec's reference ({cfg}, causal={causal}, "
        f"mask={'none' if mask is None else tuple(mask.shape)}, {dtype})",
        hint="scale by 1/sqrt(e) of the head width; softmax over the key axis; True = may attend; "
        "bottom-right causal alignment.",
    )


# Grouped heads only where the installed torch can compare them (enable_gqa, torch >= 2.5).
@given(call=calls(heads="gqa" if torch_has_enable_gqa() else "mha"))
def test_sdpa_agrees_with_torch_sdpa(impl, call):
    """The output equals ``F.scaled_dot_product_attention`` (math backend, float64, ``enable_gqa`` for g < h).

    Causal is passed to PyTorch as an explicit bottom-right mask, since its ``is_causal`` aligns top-left.
    """
    cfg, seed, mask, causal = call
    q, k, v = qkv(cfg, seed)
    allowed = spec.allowed_keys((cfg.b, cfg.h, cfg.s, cfg.t), mask, causal)
    extra = {"enable_gqa": True} if cfg.g != cfg.h else {}
    with math_backend():
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.from_numpy(allowed), **extra)
    want = torch.where(torch.from_numpy(allowed.any(-1, keepdims=True)), want, 0.0)  # torch < 2.5 gave NaN
    m = None if mask is None else torch.from_numpy(mask)
    out = impl.function("scaled_dot_product_attention")(q, k, v, mask=m, causal=causal)
    assert_close(
        out, want, axes=AXES,
        claim=f"scaled_dot_product_attention agrees with torch's F.scaled_dot_product_attention ({cfg}, causal={causal})",
        hint="for g < h torch repeats each KV head for a contiguous group of query heads (enable_gqa).",
    )


@given(cfg=attention_configs(heads="gqa", cross=True), seed=seeds(), data=st.data())
def test_causal_sdpa_never_leaks_the_future(impl, device, cfg, seed, data):
    """With causal=True, changing keys and values after position p changes no output at or before p.

    Query x sits at position t - s + x (bottom-right alignment). Hint: the mask keeps keys y <= x + t - s;
    an off-by-one diagonal (triu(diagonal=0)) or an upside-down triangle lets the future in.
    """
    cut = data.draw(st.integers(0, cfg.t - 1), label="last_visible_position")
    sdpa = impl.function("scaled_dot_product_attention")
    q, k, v = qkv(cfg, seed, device=device)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, cut + 1 :] += tensor(seed + 3, *k2[:, :, cut + 1 :].shape, dtype=k.dtype, device=device)
    v2[:, :, cut + 1 :] += tensor(seed + 4, *v2[:, :, cut + 1 :].shape, dtype=v.dtype, device=device)
    rows = max(0, cut + 1 - (cfg.t - cfg.s))  # queries at positions <= cut
    before, after = sdpa(q, k, v, causal=True), sdpa(q, k2, v2, causal=True)
    assert_equal(
        after[:, :, :rows], before[:, :, :rows], axes=AXES,
        claim=f"causal attention ignores keys after position {cut} for queries at or before it ({cfg})",
        hint="query x may see keys 0 .. x + (t - s); nothing later.",
    )


@given(cfg=attention_configs(heads="mha", cross=True, max_len=5), seed=seeds())
def test_causal_sdpa_has_zero_jacobian_for_future_keys(impl, cfg, seed):
    """d out[x] / d k[y] and d out[x] / d v[y] are exactly zero whenever key y is in query x's future.

    Hint: an exact zero needs exp(-inf) = 0: mask the scores before softmax, not the weights after it.
    """
    sdpa = impl.function("scaled_dot_product_attention")
    q, k, v = qkv(cfg, seed)
    future = ~torch.from_numpy(spec.causal_mask(cfg.s, cfg.t))  # (s, t)
    for name, fn, x in (
        ("keys", lambda k_: sdpa(q, k_, v, causal=True), k),
        ("values", lambda v_: sdpa(q, k, v_, causal=True), v),
    ):
        jac = jacobian(fn, x, "scaled_dot_product_attention")  # (b, h, s, e, b, h, t, e)
        block = torch.einsum("bhxibhyj->bhxy", jac.abs())  # same batch and head
        assert_equal(
            block * future, torch.zeros_like(block), axes="b h s t",
            claim=f"the Jacobian of causal attention w.r.t. future {name} is exactly zero ({cfg})",
            hint="mask with -inf (or the dtype's min) before the softmax; masking afterwards still mixes the future in.",
        )


@given(cfg=attention_configs(heads="gqa", cross=True, min_len=2), seed=seeds())
def test_causal_sdpa_depends_on_the_past(impl, cfg, seed):
    """With causal=True the last query sees every key: changing the first value changes its output.

    This guards against a degenerate "causal" mask that hides too much (an upside-down triangle).
    """
    sdpa = impl.function("scaled_dot_product_attention")
    q, k, v = qkv(cfg, seed)
    v2 = v.clone()
    v2[:, :, 0] += 1.0
    before, after = sdpa(q, k, v, causal=True)[:, :, -1], sdpa(q, k, v2, causal=True)[:, :, -1]
    assert_true(
        bool((before - after).abs().amin(dim=-1).gt(0).all()),
        claim=f"the last query of causal attention depends on the first key's value ({cfg})",
        detail="changing v at position 0 left the last query's output unchanged",
        hint="the causal mask keeps the past (lower triangle, tril), it does not hide it.",
    )


@given(cfg=attention_configs(heads="gqa", cross=True), seed=seeds(), data=st.data())
def test_sdpa_masked_keys_have_no_influence(impl, device, cfg, seed, data):
    """Keys (and their values) whose mask is False do not change the output, in any way.

    Hint: True = may attend (SDPA's polarity); ``masked_fill(mask, -inf)`` masks the keys you meant to keep.
    """
    keep = data.draw(boolean_masks((cfg.b, 1, 1, cfg.t)), label="keep")
    sdpa = impl.function("scaled_dot_product_attention")
    q, k, v = qkv(cfg, seed, device=device)
    hidden = torch.from_numpy(~keep).to(device).reshape(cfg.b, 1, cfg.t, 1)
    k2 = torch.where(hidden, k + tensor(seed + 3, *k.shape, dtype=k.dtype, device=device), k)
    v2 = torch.where(hidden, v + tensor(seed + 4, *v.shape, dtype=v.dtype, device=device), v)
    m = as_mask(keep, device)
    assert_equal(
        sdpa(q, k2, v2, mask=m), sdpa(q, k, v, mask=m), axes=AXES,
        claim=f"masked keys have no influence on attention ({cfg}, keep={keep.reshape(cfg.b, cfg.t).astype(int).tolist()})",
        hint="the mask is True where a query MAY attend; masked keys must get weight exactly 0.",
    )


@given(cfg=attention_configs(heads="mha", cross=True, max_len=4), seed=seeds(), data=st.data())
def test_sdpa_masked_keys_get_zero_gradient(impl, cfg, seed, data):
    """d out[x] / d k[y] and d out[x] / d v[y] are exactly zero where mask[x, y] is False."""
    mask = data.draw(boolean_masks((cfg.b, cfg.h, cfg.s, cfg.t)), label="mask")
    sdpa = impl.function("scaled_dot_product_attention")
    q, k, v = qkv(cfg, seed)
    m = torch.from_numpy(mask)
    for name, fn, x in (
        ("keys", lambda k_: sdpa(q, k_, v, mask=m), k),
        ("values", lambda v_: sdpa(q, k, v_, mask=m), v),
    ):
        block = torch.einsum("bhxibhyj->bhxy", jacobian(fn, x, "scaled_dot_product_attention").abs())
        assert_equal(
            block * ~m, torch.zeros_like(block), axes="b h s t",
            claim=f"masked {name} get exactly zero gradient ({cfg})",
            hint="mask the scores with -inf before softmax, out of place (masked_fill, not masked_fill_).",
        )


@given(cfg=attention_configs(heads="gqa", cross=True), seed=seeds(), data=st.data())
def test_sdpa_fully_masked_query_rows_are_zero(impl, device, cfg, seed, data):
    """A query whose keys are all masked gets exactly zero output (never NaN), and finite gradients."""
    mask = data.draw(boolean_masks((cfg.b, 1, cfg.s, cfg.t)), label="mask")
    empty_row = data.draw(st.integers(0, cfg.s - 1), label="empty_row")
    mask[:, :, empty_row, :] = False
    sdpa = impl.function("scaled_dot_product_attention")
    q, k, v = (a.requires_grad_() for a in qkv(cfg, seed, device=device))
    m = as_mask(mask, device)
    out = sdpa(q, k, v, mask=m)
    empty = torch.from_numpy(~mask.any(-1)).to(device)  # (b, 1, s)
    assert_equal(
        out * empty[..., None], torch.zeros_like(out), axes=AXES,
        claim=f"a query row with every key masked gives zeros ({cfg})",
        hint="softmax over all -inf is NaN; give such rows zero weights (the spec, and torch >= 2.5, return 0).",
    )
    out.sum().backward()
    grads_finite = all(bool(torch.isfinite(a.grad).all()) for a in (q, k, v) if a.grad is not None)
    assert_true(
        grads_finite, claim=f"gradients stay finite with fully masked rows ({cfg})",
        detail="a gradient holds NaN or inf", hint="NaN from softmax(-inf, ..., -inf) leaks into backward too.",
    )


@given(cfg=attention_configs(heads="gqa", cross=True), seed=seeds(), mask=st.booleans(), causal=st.booleans())
def test_sdpa_batch_elements_are_independent(impl, device, cfg, seed, mask, causal):
    """Changing batch element 0 changes nothing in the other batch elements."""
    cfg = AttentionConfig(b=cfg.b + 1, s=cfg.s, t=cfg.t, h=cfg.h, g=cfg.g, e=cfg.e)
    sdpa = impl.function("scaled_dot_product_attention")
    q, k, v = qkv(cfg, seed, device=device)
    m = torch.arange(cfg.t, device=device).reshape(1, 1, 1, cfg.t) <= torch.arange(cfg.b, device=device).reshape(-1, 1, 1, 1) if mask else None
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for a, offset in ((q2, 5), (k2, 6), (v2, 7)):
        a[0] += tensor(seed + offset, *a[0].shape, dtype=a.dtype, device=device)
    assert_equal(
        sdpa(q2, k2, v2, mask=m, causal=causal)[1:], sdpa(q, k, v, mask=m, causal=causal)[1:], axes=AXES,
        claim=f"batch elements are independent ({cfg})",
        hint="a reshape or view that merges the batch axis with positions or heads mixes sequences.",
    )


@given(cfg=attention_configs(heads="gqa"), seed=seeds(), data=st.data())
def test_sdpa_is_equivariant_to_permuting_queries(impl, cfg, seed, data):
    """Without a mask, permuting the queries permutes the output rows the same way."""
    perm = torch.tensor(data.draw(st.permutations(range(cfg.s)), label="perm"))
    sdpa = impl.function("scaled_dot_product_attention")
    q, k, v = qkv(cfg, seed)
    assert_close(
        sdpa(q[:, :, perm], k, v), sdpa(q, k, v)[:, :, perm], axes=AXES,
        claim=f"permuting queries permutes the output ({cfg})",
        hint="each query's output depends on that query alone (and on all keys).",
    )


@given(cfg=attention_configs(heads="gqa", cross=True), seed=seeds(), data=st.data())
def test_sdpa_is_invariant_to_permuting_keys_with_values(impl, cfg, seed, data):
    """Without a mask (and causal=False), reordering the keys together with their values changes nothing.

    Hint: when causal=False no position may be special: is a causal mask applied regardless of the flag?
    """
    perm = torch.tensor(data.draw(st.permutations(range(cfg.t)), label="perm"))
    sdpa = impl.function("scaled_dot_product_attention")
    q, k, v = qkv(cfg, seed)
    assert_close(
        sdpa(q, k[:, :, perm], v[:, :, perm]), sdpa(q, k, v), axes=AXES,
        claim=f"attention is invariant to permuting keys together with values ({cfg})",
        hint="keys and values must stay paired, and no mask may apply when none is given.",
    )


@given(call=calls())
def test_sdpa_output_is_a_convex_combination_of_values(impl, call):
    """Each output row is a weighted average of the allowed values: constant values give that constant,
    and every output lies between the smallest and largest allowed value of each feature.

    Hint: softmax must normalise over the keys (dim=-1); over queries the weights no longer sum to 1.
    """
    cfg, seed, mask, causal = call
    sdpa = impl.function("scaled_dot_product_attention")
    q, k, v = qkv(cfg, seed)
    allowed = spec.allowed_keys((cfg.b, cfg.h, cfg.s, cfg.t), mask, causal)
    has_key = torch.from_numpy(allowed.any(-1))  # (b, h, s)
    m = None if mask is None else torch.from_numpy(mask)
    const = torch.full_like(v, 0.75)
    out = sdpa(q, k, const, mask=m, causal=causal)
    assert_close(
        out, torch.where(has_key[..., None], 0.75, 0.0).expand_as(out), axes=AXES,
        claim=f"constant values give that constant at every query with an allowed key ({cfg}, causal={causal})",
        hint="the attention weights of a row must sum to 1: softmax over the key axis.",
    )
    out = sdpa(q, k, v, mask=m, causal=causal)
    vv = v.repeat_interleave(cfg.h // cfg.g, dim=1)[:, :, None]  # (b, h, 1, t, e)
    ok = torch.from_numpy(allowed)[..., None]
    lo = torch.where(ok, vv, torch.inf).amin(dim=-2)
    hi = torch.where(ok, vv, -torch.inf).amax(dim=-2)
    # 1e-12: float64 rounding of a weighted average of at most 6 values of size ~1 is ~1e-15.
    inside = ((out >= lo - 1e-12) & (out <= hi + 1e-12)) | ~has_key[..., None]
    assert_true(
        bool(inside.all()),
        claim=f"each output lies within the range of the allowed values ({cfg}, causal={causal})",
        detail=f"{int((~inside).sum())} outputs fall outside [min, max] of the values their query may see",
        hint="attention weights are non-negative and sum to 1 over the allowed keys.",
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(cfg=attention_configs(heads="gqa", cross=True), seed=seeds(), magnitude=st.sampled_from([1e2, 1e4]))
def test_sdpa_stays_finite_for_large_scores(impl, device, dtype, cfg, seed, magnitude):
    """Scores of magnitude up to ~1e8 give a finite output within the range of the values.

    Hint: subtract each row's maximum before exp (F.softmax does); exp(1000) overflows to inf.
    """
    sdpa = impl.function("scaled_dot_product_attention")
    q, k, v = qkv(cfg, seed, dtype, device, scale=magnitude)
    out = sdpa(q, k, v, causal=True)  # checked for NaN/inf on return
    vv = v.repeat_interleave(cfg.h // cfg.g, dim=1)
    span = vv.abs().amax(dim=(-2, -1), keepdim=True)
    # Weights summing to 1 (up to rounding) over at most 6 keys: |out| exceeds max|v| by a few ulp at most.
    slack = 16 * torch.finfo(dtype).eps
    assert_true(
        bool((out.abs() <= span * (1 + slack)).all()),
        claim=f"attention over large scores stays within the values' range ({cfg}, |q|,|k| ~ {magnitude:g}, {dtype})",
        detail=f"largest |output| {out.abs().max().item():.3g} exceeds the largest |value| {span.max().item():.3g}",
        hint="use a numerically stable softmax (subtract the row max, or call F.softmax).",
    )


@given(call=calls(), extra_scale=st.sampled_from([None, 0.3]))
def test_sdpa_passes_gradcheck(impl, call, extra_scale):
    """float64 gradcheck: analytic gradients w.r.t. q, k and v equal finite differences, with masks.

    Hint: ``.detach()``, ``.data`` or ``torch.no_grad`` inside the function cut the gradient; an in-place
    masked_fill_ on a tensor autograd saved breaks backward.
    """
    cfg, seed, mask, causal = call
    sdpa = impl.function("scaled_dot_product_attention")
    m = None if mask is None else torch.from_numpy(mask)
    gradcheck(
        lambda q, k, v: sdpa(q, k, v, mask=m, causal=causal, scale=extra_scale),
        qkv(cfg, seed),
        claim=f"scaled_dot_product_attention's gradients are right ({cfg}, causal={causal}, scale={extra_scale})",
        hint="keep every step differentiable and out of place.",
    )


@pytest.mark.parametrize("dtype", PRECISIONS)
@given(cfg=attention_configs(heads="gqa", cross=True), seed=seeds())
def test_sdpa_preserves_dtype_and_device(impl, device, dtype, cfg, seed):
    """The output has the dtype and device of the inputs (batch 1, length 1 and s != t included)."""
    q, k, v = qkv(cfg, seed, dtype, device)
    out = impl.function("scaled_dot_product_attention")(q, k, v, causal=True)
    assert_true(
        out.dtype == dtype and out.device == q.device,
        claim=f"scaled_dot_product_attention preserves dtype and device ({cfg})",
        detail=f"inputs {dtype} on {q.device}, output {out.dtype} on {out.device}",
        hint="build masks and constants on q.device and cast back if you compute in another dtype.",
    )
