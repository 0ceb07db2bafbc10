"""Properties of scaled_dot_product_attention. Spec: spec/sdpa.py."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import implementations
from properties.assertions import PRECISIONS, assert_close, assert_equal, assert_true
from properties.attention_cases import no_empty_rows, round_robin_order
from properties.options import Offers, draws_options
from properties.probes import gradcheck, jacobian, math_backend, torch_has_enable_gqa
from properties.strategies import AttentionConfig, Mask, as_mask, attention_configs, boolean_masks, seeds, tensor
from spec import sdpa as spec

pytestmark = pytest.mark.requires("scaled_dot_product_attention")
AXES = "b h s e"
SDPA = "scaled_dot_product_attention"


@dataclass(frozen=True)
class SdpaCall:
    """One call: sizes (with ev, the value head width), seed, mask (b, 1|h, s, t) or None, causal flag."""

    cfg: AttentionConfig
    ev: int
    seed: int
    mask: np.ndarray | None = None
    causal: bool = False
    grouping: str = field(default="contiguous", repr=False)

    def _repr_pretty_(self, printer, cycle) -> None:
        mask = "" if self.mask is None else f", mask={self.mask!r}"
        printer.text(f"{self.cfg}, e_v={self.ev}, causal={self.causal}{mask}, seed={self.seed}")

    def qkv(self, dtype=torch.float64, device="cpu", scale=1.0):
        c = self.cfg
        q = tensor(self.seed, c.b, c.h, c.s, c.e, dtype=dtype, device=device, scale=scale)
        k = tensor(self.seed + 1, c.b, c.g, c.t, c.e, dtype=dtype, device=device, scale=scale)
        v = tensor(self.seed + 2, c.b, c.g, c.t, self.ev, dtype=dtype, device=device)
        return q, k, v

    def m(self, device="cpu"):
        return None if self.mask is None else as_mask(self.mask, device)

    def contiguous(self, fn, q, k, v, *, mask=None, **kwargs):
        """``fn`` (contiguous head groups, as ours and torch's) computing this call's grouping: for a declared
        round-robin grouping, their query head (j % r) * g + j // r is the contiguous head j (r = h // g)."""
        if self.grouping == "contiguous":
            return fn(q, k, v, mask=mask, **kwargs)
        c = self.cfg
        order = round_robin_order(c.h, c.g).to(q.device)
        if mask is not None and mask.shape[1] == c.h:
            mask = mask[:, order]
        out = fn(q[:, order], k, v, mask=mask, **kwargs)
        return torch.empty_like(out).index_copy_(1, order, out)

    def reference(self, q, k, v) -> np.ndarray:
        return spec.scaled_dot_product_attention(*(a.detach().double().cpu().numpy() for a in (q, k, v)),
                                                 mask=self.mask, causal=self.causal, grouping=self.grouping)


@draws_options(
    SDPA,
    mask=lambda c: c.mask is not None,
    causal=lambda c: c.causal,
    unequal_lengths=lambda c: c.cfg.s != c.cfg.t,
    grouped_heads=lambda c: c.cfg.g != c.cfg.h,
    value_width=lambda c: c.ev != c.cfg.e,
)
@st.composite
def sdpa_calls(draw, offers: Offers, *, heads: str = "gqa", max_len: int = 6, min_len: int = 1, min_b: int = 1,
               masks: bool = True, causal: bool | None = None, mask_heads: bool = True) -> SdpaCall:
    """A call the implementation offers: s != t, grouped heads, a value width of its own, a mask (never
    one with an empty query row: that corner case has its own property) and a causal flag.

    causal: None draws it from the offers; True/False fixes it (the property ``needs`` that value).
    """
    if heads == "gqa" and not offers.offers("grouped_heads", True):
        heads = "mha"
    cfg = draw(attention_configs(heads=heads, cross=offers.offers("unequal_lengths", True), min_len=min_len,
                                 max_len=max_len), label="cfg")
    if cfg.b < min_b:
        cfg = replace(cfg, b=min_b)
    is_causal = draw(offers.strategy("causal"), label="causal") if causal is None else causal
    if is_causal and cfg.s > cfg.t:
        cfg = replace(cfg, s=cfg.t, t=cfg.s)  # s > t under causal leaves early queries with no key at all
    ev = draw(st.just(cfg.e) | st.integers(1, 4), label="e_v") if offers.offers("value_width", True) else cfg.e
    mask = None
    if masks and offers.offers("mask", True):
        heads_axis = draw(st.sampled_from([1, cfg.h]), label="mask_heads") if mask_heads else 1
        drawn = draw(st.none() | boolean_masks((cfg.b, heads_axis, cfg.s, cfg.t)), label="mask")
        mask = None if drawn is None else no_empty_rows(drawn, causal=is_causal, s=cfg.s, t=cfg.t)
    grouping = offers.default("head_grouping")
    return SdpaCall(cfg, ev, draw(seeds(), label="seed"), mask, is_causal, grouping)


@draws_options(SDPA, scale=lambda scale: scale is not None)
def sdpa_scales(offers: Offers) -> st.SearchStrategy[float | None]:
    """An explicit ``scale=`` (or None, the default 1/sqrt(e)) where the implementation takes one."""
    return st.sampled_from([None, 0.3]) if offers.offers("scale", True) else st.none()


def calls_of(impl, **kw):
    return sdpa_calls(impl.offers(SDPA), **kw)


@pytest.mark.parametrize("dtype", PRECISIONS)
@given(data=st.data())
def test_sdpa_agrees_with_reference(impl, device, dtype, data):
    """The output equals the spec's float64 reference, masks, causal flag and value width included.

    Hint: check the scale (1/sqrt(e), the query/key head width, not 1/sqrt(d_model) nor the value width),
    the softmax axis (keys, the last), the mask polarity (True = may attend) and the causal alignment
    (bottom-right when s != t).
    """
    call = data.draw(calls_of(impl), label="call")
    q, k, v = call.qkv(dtype, device)
    out = impl.function(SDPA)(q, k, v, mask=call.m(device), causal=call.causal)
    baseline = call.contiguous(implementations.scaled_dot_product_attention, q, k, v, mask=call.m(device),
                               causal=call.causal)
    assert_close(
        out, call.reference(q, k, v), baseline=baseline, axes=AXES,
        claim=f"scaled_dot_product_attention agrees with the spec's reference ({call.cfg}, e_v={call.ev}, "
        f"causal={call.causal}, mask={'none' if call.mask is None else tuple(call.mask.shape)}, {dtype})",
        hint="scale by 1/sqrt(e) of the query/key head width; softmax over the key axis; True = may attend; "
        "bottom-right causal alignment.",
    )


# Grouped heads only where the installed torch can compare them (enable_gqa, torch >= 2.5).
@given(data=st.data())
def test_sdpa_agrees_with_torch_sdpa(impl, data):
    """The output equals ``F.scaled_dot_product_attention`` (math backend, float64, ``enable_gqa`` for g < h).

    Causal is passed to PyTorch as an explicit bottom-right mask, since its ``is_causal`` aligns top-left.
    An implementation that declares round-robin head grouping is compared with contiguous groups of its
    query heads reordered (the same map up to that permutation).
    """
    call = data.draw(calls_of(impl, heads="gqa" if torch_has_enable_gqa() else "mha"), label="call")
    cfg = call.cfg
    q, k, v = call.qkv()
    allowed = spec.allowed_keys((cfg.b, cfg.h, cfg.s, cfg.t), call.mask, call.causal)
    extra = {"enable_gqa": True} if cfg.g != cfg.h else {}

    def torch_sdpa(q_, k_, v_, *, mask):
        with math_backend():
            return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, **extra)

    want = call.contiguous(torch_sdpa, q, k, v, mask=torch.from_numpy(allowed))
    want = torch.where(torch.from_numpy(allowed.any(-1, keepdims=True)), want, 0.0)  # torch < 2.5 gave NaN
    out = impl.function(SDPA)(q, k, v, mask=call.m(), causal=call.causal)
    assert_close(
        out, want, axes=AXES,
        claim=f"scaled_dot_product_attention agrees with torch's F.scaled_dot_product_attention ({cfg}, "
        f"causal={call.causal})",
        hint="for g < h torch repeats each KV head for a contiguous group of query heads (enable_gqa).",
    )


@pytest.mark.needs(causal=True)
@given(data=st.data())
def test_causal_sdpa_never_leaks_the_future(impl, device, data):
    """With causal=True, changing keys and values after position p changes no output at or before p.

    Query x sits at position t - s + x (bottom-right alignment). Hint: the mask keeps keys y <= x + t - s;
    an off-by-one diagonal (triu(diagonal=0)) or an upside-down triangle lets the future in.
    """
    call = data.draw(calls_of(impl, causal=True, masks=False), label="call")
    cfg, seed = call.cfg, call.seed
    cut = data.draw(st.integers(0, cfg.t - 1), label="last_visible_position")
    sdpa = impl.function(SDPA)
    q, k, v = call.qkv(device=device)
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


@pytest.mark.needs(causal=True)
@given(data=st.data())
def test_causal_sdpa_has_zero_jacobian_for_future_keys(impl, data):
    """d out[x] / d k[y] and d out[x] / d v[y] are exactly zero whenever key y is in query x's future.

    Hint: an exact zero needs exp(-inf) = 0: mask the scores before softmax, not the weights after it.
    """
    call = data.draw(calls_of(impl, heads="mha", max_len=5, causal=True, masks=False), label="call")
    cfg = call.cfg
    sdpa = impl.function(SDPA)
    q, k, v = call.qkv()
    future = ~torch.from_numpy(spec.causal_mask(cfg.s, cfg.t))  # (s, t)
    for name, fn, x in (
        ("keys", lambda k_: sdpa(q, k_, v, causal=True), k),
        ("values", lambda v_: sdpa(q, k, v_, causal=True), v),
    ):
        jac = jacobian(fn, x, SDPA)  # (b, h, s, e_v, b, h, t, e|e_v)
        block = torch.einsum("bhxibhyj->bhxy", jac.abs())  # same batch and head
        assert_equal(
            block * future, torch.zeros_like(block), axes="b h s t",
            claim=f"the Jacobian of causal attention w.r.t. future {name} is exactly zero ({cfg})",
            hint="mask with -inf (or the dtype's min) before the softmax; masking afterwards still mixes the future in.",
        )


@pytest.mark.needs(causal=True)
@given(data=st.data())
def test_causal_sdpa_depends_on_the_past(impl, data):
    """With causal=True the last query sees every key: changing the first value changes its output.

    This guards against a degenerate "causal" mask that hides too much (an upside-down triangle).
    """
    call = data.draw(calls_of(impl, min_len=2, causal=True, masks=False), label="call")
    sdpa = impl.function(SDPA)
    q, k, v = call.qkv()
    v2 = v.clone()
    v2[:, :, 0] += 1.0
    before, after = sdpa(q, k, v, causal=True)[:, :, -1], sdpa(q, k, v2, causal=True)[:, :, -1]
    assert_true(
        bool((before - after).abs().amin(dim=-1).gt(0).all()),
        claim=f"the last query of causal attention depends on the first key's value ({call.cfg})",
        detail="changing v at position 0 left the last query's output unchanged",
        hint="the causal mask keeps the past (lower triangle, tril), it does not hide it.",
    )


def key_mask(keep: np.ndarray, *, causal: bool) -> np.ndarray:
    """A key mask (b, 1, 1, t) leaving every query a key: key 0 under causal (every query sees it when
    t >= s), else the last key where a row keeps none."""
    keep = np.array(keep, dtype=bool)
    if causal:
        keep[..., 0] = True
    else:
        keep[~keep.any(-1), -1] = True
    return keep.view(Mask)


@pytest.mark.needs(mask=True)
@given(data=st.data())
def test_sdpa_masked_keys_have_no_influence(impl, device, data):
    """Keys (and their values) whose mask is False do not change the output, in any way.

    Hint: True = may attend (SDPA's polarity); ``masked_fill(mask, -inf)`` masks the keys you meant to keep.
    """
    call = data.draw(calls_of(impl, masks=False), label="call")
    cfg, seed = call.cfg, call.seed
    keep = key_mask(data.draw(boolean_masks((cfg.b, 1, 1, cfg.t)), label="keep"), causal=call.causal)
    sdpa = impl.function(SDPA)
    q, k, v = call.qkv(device=device)
    hidden = torch.from_numpy(~keep).to(device).reshape(cfg.b, 1, cfg.t, 1)
    k2 = torch.where(hidden, k + tensor(seed + 3, *k.shape, dtype=k.dtype, device=device), k)
    v2 = torch.where(hidden, v + tensor(seed + 4, *v.shape, dtype=v.dtype, device=device), v)
    m = as_mask(keep, device)
    assert_equal(
        sdpa(q, k2, v2, mask=m, causal=call.causal), sdpa(q, k, v, mask=m, causal=call.causal), axes=AXES,
        claim=f"masked keys have no influence on attention ({cfg}, causal={call.causal}, "
        f"keep={keep.reshape(cfg.b, cfg.t).astype(int).tolist()})",
        hint="the mask is True where a query MAY attend; masked keys must get weight exactly 0.",
    )


@pytest.mark.needs(mask=True)
@given(data=st.data())
def test_sdpa_masked_keys_get_zero_gradient(impl, data):
    """d out[x] / d k[y] and d out[x] / d v[y] are exactly zero where mask[x, y] is False."""
    call = data.draw(calls_of(impl, heads="mha", max_len=4, masks=False), label="call")
    cfg = call.cfg
    mask = no_empty_rows(data.draw(boolean_masks((cfg.b, cfg.h, cfg.s, cfg.t)), label="mask"),
                         causal=call.causal, s=cfg.s, t=cfg.t)
    sdpa = impl.function(SDPA)
    q, k, v = call.qkv()
    m = torch.from_numpy(mask)
    for name, fn, x in (
        ("keys", lambda k_: sdpa(q, k_, v, mask=m, causal=call.causal), k),
        ("values", lambda v_: sdpa(q, k, v_, mask=m, causal=call.causal), v),
    ):
        block = torch.einsum("bhxibhyj->bhxy", jacobian(fn, x, SDPA).abs())
        assert_equal(
            block * ~m, torch.zeros_like(block), axes="b h s t",
            claim=f"masked {name} get exactly zero gradient ({cfg}, causal={call.causal})",
            hint="mask the scores with -inf before softmax, out of place (masked_fill, not masked_fill_).",
        )


@pytest.mark.needs(mask=True, empty_rows=True)
@given(data=st.data())
def test_sdpa_fully_masked_query_rows_are_zero(impl, device, data):
    """A query whose keys are all masked gets exactly zero output (never NaN), and finite gradients."""
    call = data.draw(calls_of(impl, masks=False), label="call")
    cfg = call.cfg
    mask = np.array(data.draw(boolean_masks((cfg.b, 1, cfg.s, cfg.t)), label="mask"))
    empty_row = data.draw(st.integers(0, cfg.s - 1), label="empty_row")
    mask[:, :, empty_row, :] = False
    sdpa = impl.function(SDPA)
    q, k, v = (a.requires_grad_() for a in call.qkv(device=device))
    out = sdpa(q, k, v, mask=as_mask(mask, device), causal=call.causal)
    allowed = spec.allowed_keys((cfg.b, 1, cfg.s, cfg.t), mask, call.causal)
    empty = torch.from_numpy(~allowed.any(-1)).to(device)  # (b, 1, s)
    assert_equal(
        out * empty[..., None], torch.zeros_like(out), axes=AXES,
        claim=f"a query row with every key masked gives zeros ({cfg}, causal={call.causal})",
        hint="softmax over all -inf is NaN; give such rows zero weights (the spec, and torch >= 2.5, return 0).",
    )
    out.sum().backward()
    grads_finite = all(bool(torch.isfinite(a.grad).all()) for a in (q, k, v) if a.grad is not None)
    assert_true(
        grads_finite, claim=f"gradients stay finite with fully masked rows ({cfg})",
        detail="a gradient holds NaN or inf", hint="NaN from softmax(-inf, ..., -inf) leaks into backward too.",
    )


@given(data=st.data())
def test_sdpa_batch_elements_are_independent(impl, device, data):
    """Changing batch element 0 changes nothing in the other batch elements."""
    call = data.draw(calls_of(impl, min_b=2), label="call")
    sdpa = impl.function(SDPA)
    q, k, v = call.qkv(device=device)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for a, offset in ((q2, 5), (k2, 6), (v2, 7)):
        a[0] += tensor(call.seed + offset, *a[0].shape, dtype=a.dtype, device=device)
    m = call.m(device)
    assert_equal(
        sdpa(q2, k2, v2, mask=m, causal=call.causal)[1:], sdpa(q, k, v, mask=m, causal=call.causal)[1:],
        axes=AXES,
        claim=f"batch elements are independent ({call.cfg}, causal={call.causal})",
        hint="a reshape or view that merges the batch axis with positions or heads mixes sequences.",
    )


@pytest.mark.needs(causal=False)
@given(data=st.data())
def test_sdpa_is_equivariant_to_permuting_queries(impl, data):
    """Without a mask, permuting the queries permutes the output rows the same way."""
    call = data.draw(calls_of(impl, causal=False, masks=False), label="call")
    perm = torch.tensor(data.draw(st.permutations(range(call.cfg.s)), label="perm"))
    sdpa = impl.function(SDPA)
    q, k, v = call.qkv()
    assert_close(
        sdpa(q[:, :, perm], k, v, causal=False), sdpa(q, k, v, causal=False)[:, :, perm], axes=AXES,
        claim=f"permuting queries permutes the output ({call.cfg})",
        hint="each query's output depends on that query alone (and on all keys).",
    )


@pytest.mark.needs(causal=False)
@given(data=st.data())
def test_sdpa_is_invariant_to_permuting_keys_with_values(impl, data):
    """Without a mask (and causal=False), reordering the keys together with their values changes nothing.

    Hint: when causal=False no position may be special: is a causal mask applied regardless of the flag?
    """
    call = data.draw(calls_of(impl, causal=False, masks=False), label="call")
    perm = torch.tensor(data.draw(st.permutations(range(call.cfg.t)), label="perm"))
    sdpa = impl.function(SDPA)
    q, k, v = call.qkv()
    assert_close(
        sdpa(q, k[:, :, perm], v[:, :, perm], causal=False), sdpa(q, k, v, causal=False), axes=AXES,
        claim=f"attention is invariant to permuting keys together with values ({call.cfg})",
        hint="keys and values must stay paired, and no mask may apply when none is given.",
    )


@given(data=st.data())
def test_sdpa_output_is_a_convex_combination_of_values(impl, data):
    """Each output row is a weighted average of the allowed values: constant values give that constant,
    and every output lies between the smallest and largest allowed value of each feature.

    Hint: softmax must normalise over the keys (dim=-1); over queries the weights no longer sum to 1.
    """
    call = data.draw(calls_of(impl), label="call")
    cfg = call.cfg
    sdpa = impl.function(SDPA)
    q, k, v = call.qkv()
    allowed = torch.from_numpy(spec.allowed_keys((cfg.b, cfg.h, cfg.s, cfg.t), call.mask, call.causal))
    m = call.m()
    const = torch.full_like(v, 0.75)
    out = sdpa(q, k, const, mask=m, causal=call.causal)
    assert_close(
        out, torch.full_like(out, 0.75), axes=AXES,
        claim=f"constant values give that constant at every query ({cfg}, causal={call.causal})",
        hint="the attention weights of a row must sum to 1: softmax over the key axis.",
    )
    out = sdpa(q, k, v, mask=m, causal=call.causal)
    r = cfg.h // cfg.g
    vv = v.repeat_interleave(r, dim=1) if call.grouping == "contiguous" else v.repeat(1, r, 1, 1)
    vv = vv[:, :, None]  # (b, h, 1, t, e_v)
    ok = allowed[..., None]
    lo = torch.where(ok, vv, torch.inf).amin(dim=-2)
    hi = torch.where(ok, vv, -torch.inf).amax(dim=-2)
    # 1e-12: float64 rounding of a weighted average of at most 6 values of size ~1 is ~1e-15.
    inside = (out >= lo - 1e-12) & (out <= hi + 1e-12)
    assert_true(
        bool(inside.all()),
        claim=f"each output lies within the range of the allowed values ({cfg}, causal={call.causal})",
        detail=f"{int((~inside).sum())} outputs fall outside [min, max] of the values their query may see",
        hint="attention weights are non-negative and sum to 1 over the allowed keys.",
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(data=st.data(), magnitude=st.sampled_from([1e2, 1e4]))
def test_sdpa_stays_finite_for_large_scores(impl, device, dtype, data, magnitude):
    """Scores of magnitude up to ~1e8 give the reference's output (finite, within the values' range),
    with and without a mask and causal flag: softmax subtracts each row's maximum, so its one-hot limit
    is exact, and nothing overflows to inf or NaN (a NaN replaced by zeros afterwards is caught too).

    Hint: subtract each row's maximum before exp (F.softmax does); exp(1000) overflows to inf.
    """
    call = data.draw(calls_of(impl), label="call")
    q, k, v = call.qkv(dtype, device, scale=magnitude)
    out = impl.function(SDPA)(q, k, v, mask=call.m(device), causal=call.causal)  # NaN/inf: reported on return
    baseline = call.contiguous(implementations.scaled_dot_product_attention, q, k, v, mask=call.m(device),
                               causal=call.causal)
    assert_close(
        out, call.reference(q, k, v), baseline=None if dtype == torch.float64 else baseline, axes=AXES,
        claim=f"attention over large scores equals the reference ({call.cfg}, |q|,|k| ~ {magnitude:g}, "
        f"causal={call.causal}, mask={'none' if call.mask is None else 'drawn'}, {dtype})",
        hint="use a numerically stable softmax (subtract the row max, or call F.softmax); exp(score) "
        "overflows to inf and inf / inf is NaN, which zeroing afterwards does not repair.",
    )


@given(data=st.data())
def test_sdpa_passes_gradcheck(impl, data):
    """float64 gradcheck: analytic gradients w.r.t. q, k and v equal finite differences, with masks.

    Hint: ``.detach()``, ``.data`` or ``torch.no_grad`` inside the function cut the gradient; an in-place
    masked_fill_ on a tensor autograd saved breaks backward.
    """
    offers = impl.offers(SDPA)
    call = data.draw(sdpa_calls(offers), label="call")
    extra_scale = data.draw(sdpa_scales(offers), label="scale")
    sdpa = impl.function(SDPA)
    m = call.m()
    gradcheck(
        lambda q, k, v: sdpa(q, k, v, mask=m, causal=call.causal, scale=extra_scale),
        call.qkv(),
        claim=f"scaled_dot_product_attention's gradients are right ({call.cfg}, causal={call.causal}, "
        f"scale={extra_scale})",
        hint="keep every step differentiable and out of place.",
    )


@pytest.mark.parametrize("dtype", PRECISIONS)
@given(data=st.data())
def test_sdpa_preserves_dtype_and_device(impl, device, dtype, data):
    """The output has the dtype and device of the inputs (batch 1, length 1 and s != t included)."""
    call = data.draw(calls_of(impl), label="call")
    q, k, v = call.qkv(dtype, device)
    out = impl.function(SDPA)(q, k, v, mask=call.m(device), causal=call.causal)
    assert_true(
        out.dtype == dtype and out.device == q.device,
        claim=f"scaled_dot_product_attention preserves dtype and device ({call.cfg})",
        detail=f"inputs {dtype} on {q.device}, output {out.dtype} on {out.device}",
        hint="build masks and constants on q.device and cast back if you compute in another dtype.",
    )
