"""Properties of the attention modules: SelfAttention, MultiHeadAttention, CrossAttention, and the
attention-module properties MultiQueryAttention and GroupedQueryAttention share. Spec: spec/attention.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from einops import rearrange
from hypothesis import given
from hypothesis import strategies as st

from properties.assertions import PRECISIONS, assert_close, assert_equal, assert_true
from properties.attention_cases import ATTENTION_MODULES, OURS, SELF_ATTENTION_MODULES, attention_cases
from properties.plugin import backward
from properties.probes import assert_parameters_get_finite_gradients, gradcheck, jacobian
from properties.strategies import Mask, boolean_masks, padding_masks, tensor

AXES = "b s d"


@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("component", ATTENTION_MODULES)
@given(data=st.data())
def test_attention_module_agrees_with_reference(impl, device, dtype, component, data):
    """The module's output equals the spec's float64 reference with the same weights, masks included.

    Hint: split heads as (b, s, h, e) -> (b, h, s, e) (transpose, not a bare view), scale by 1/sqrt(e) of
    the head, and merge back with the inverse transpose.
    """
    case = data.draw(attention_cases(impl.offers(component)), label="case")
    mask, causal = case.mask, case.causal
    module = case.build(impl, device, dtype)
    x, context = case.inputs(device, dtype)
    out = case.call(module, x, context, mask=mask, causal=causal)
    baseline = case.call(case.build(OURS, device, dtype, params=case.ours_params(module)), x, context, mask=mask,
                         causal=causal)
    assert_close(
        out, case.reference(module, x, context, mask=mask, causal=causal), baseline=baseline, axes=AXES,
        claim=f"{case} agrees with the spec's reference ({dtype}, causal={causal}, mask={mask!r})",
        hint="check the head split/merge (transpose, not view), the scale 1/sqrt(head width), "
        "the mask polarity (True = may attend) and every bias.",
    )


@pytest.mark.needs(causal=True)
@pytest.mark.parametrize("component", SELF_ATTENTION_MODULES)
@given(data=st.data())
def test_causal_attention_never_leaks_the_future(impl, device, component, data):
    """With causal=True, changing the inputs after position p changes no output at or before p."""
    case = data.draw(attention_cases(impl.offers(component), causal=True, masks=False), label="case")
    cut = data.draw(st.integers(0, case.cfg.s - 1), label="last_unchanged_position")
    module = case.build(impl, device)
    x, _ = case.inputs(device)
    x2 = x.clone()
    x2[:, cut + 1 :] += tensor(case.seed + 7, *x2[:, cut + 1 :].shape, dtype=x.dtype, device=device)
    assert_equal(
        case.call(module, x2, causal=True)[:, : cut + 1], case.call(module, x, causal=True)[:, : cut + 1],
        axes=AXES,
        claim=f"causal {case} ignores inputs after position {cut} at positions up to {cut}",
        hint="the causal mask must keep keys j <= i for query i: torch.ones(s, s).tril() is 'may attend'.",
    )


@pytest.mark.needs(causal=True)
@pytest.mark.parametrize("component", SELF_ATTENTION_MODULES)
@given(data=st.data())
def test_causal_attention_has_zero_jacobian_for_future_inputs(impl, component, data):
    """d out[i] / d x[j] is exactly zero for every j > i under causal=True."""
    case = data.draw(attention_cases(impl.offers(component), max_len=4, causal=True, masks=False), label="case")
    module = case.build(impl)
    x, _ = case.inputs()
    jac = jacobian(lambda x_: case.call(module, x_, causal=True), x, module)  # (b, s, d, b, s, d)
    blocks = torch.einsum("bidbje->bij", jac.abs())
    future = torch.ones(case.cfg.s, case.cfg.s, dtype=torch.bool).triu(1)
    assert_equal(
        blocks * future, torch.zeros_like(blocks), axes="b s t",
        claim=f"the Jacobian of causal {case} w.r.t. future inputs is exactly zero",
        hint="mask the scores with -inf before the softmax; every later position must get weight exactly 0.",
    )


@pytest.mark.needs(causal=True)
@pytest.mark.parametrize("component", SELF_ATTENTION_MODULES)
@given(data=st.data())
def test_causal_attention_depends_on_the_past(impl, component, data):
    """With causal=True the last position still depends on the first: the mask hides only the future."""
    case = data.draw(attention_cases(impl.offers(component), min_len=2, causal=True, masks=False), label="case")
    module = case.build(impl)
    x, _ = case.inputs()
    x2 = x.clone()
    x2[:, 0] += 1.0
    change = (case.call(module, x2, causal=True)[:, -1] - case.call(module, x, causal=True)[:, -1]).abs()
    assert_true(
        bool(change.amax(dim=-1).gt(0).all()),
        claim=f"the last position of causal {case} depends on the first position",
        detail="changing position 0 left the last position's output unchanged",
        hint="a lower-triangular mask (tril), not an upper one; and is the causal flag wired to the mask?",
    )


@pytest.mark.needs(mask=True)
@pytest.mark.parametrize("component", ATTENTION_MODULES)
@given(data=st.data())
def test_attention_masked_keys_have_no_influence(impl, device, component, data):
    """Padding: changing the inputs at masked key positions changes no output at the real positions."""
    case = data.draw(attention_cases(impl.offers(component), masks=False), label="case")
    c = case.cfg
    keep = data.draw(padding_masks(c.b, c.t), label="keep")  # (b, t)
    module = case.build(impl, device)
    x, context = case.inputs(device)
    hidden = torch.from_numpy(~keep).to(device)[..., None]
    mask = keep[:, None, None, :].view(Mask)
    if case.cross:
        context2 = torch.where(hidden, context + 1.5, context)
        before, after = case.call(module, x, context, mask=mask), case.call(module, x, context2, mask=mask)
    else:
        x2 = torch.where(hidden, x + 1.5, x)
        # Padded positions' own outputs may change (they are queries too); real positions' may not.
        before = case.call(module, x, mask=mask, causal=case.causal) * ~hidden
        after = case.call(module, x2, mask=mask, causal=case.causal) * ~hidden
    assert_equal(
        after, before, axes=AXES,
        claim=f"{case}: masked (padding) keys have no influence on real positions (keep={keep.astype(int).tolist()})",
        hint="the mask is True for keys that MAY be attended; a (b, t) padding mask becomes mask[:, None, None, :] "
        "so that it masks keys (the last axis), not queries.",
    )


@pytest.mark.needs(mask=True, empty_rows=True)
@pytest.mark.parametrize("component", ATTENTION_MODULES)
@given(data=st.data())
def test_attention_fully_masked_query_row_gives_finite_output(impl, device, component, data):
    """A query row whose keys are all masked gives a finite output: the output projection of zeros."""
    case = data.draw(attention_cases(impl.offers(component), masks=False), label="case")
    c = case.cfg
    mask = np.asarray(data.draw(boolean_masks((c.b, 1, c.s, c.t)), label="mask")).copy()
    mask[:, :, data.draw(st.integers(0, c.s - 1), label="empty_row")] = False
    module = case.build(impl, device)
    x, context = case.inputs(device)
    out = case.call(module, x, context, mask=mask.view(Mask), causal=case.causal)  # NaN/inf: reported by the call
    assert_close(
        out, case.reference(module, x, context, mask=mask, causal=case.causal), axes=AXES,
        claim=f"{case}: a query with every key masked gives the spec's finite output (the output bias)",
        hint="softmax over a row of -inf is NaN: give such rows zero weights.",
    )


@pytest.mark.parametrize("component", ATTENTION_MODULES)
@given(data=st.data())
def test_attention_batch_elements_are_independent(impl, device, component, data):
    """Changing batch element 0 changes no output of the other batch elements."""
    case = data.draw(attention_cases(impl.offers(component), min_b=2), label="case")
    mask, causal = case.mask, case.causal
    module = case.build(impl, device)
    x, context = case.inputs(device)
    x2 = x.clone()
    x2[0] += 1.0
    context2 = None if context is None else context.clone()
    if context2 is not None:
        context2[0] -= 1.0
    assert_equal(
        case.call(module, x2, context2, mask=mask, causal=causal)[1:],
        case.call(module, x, context, mask=mask, causal=causal)[1:], axes=AXES,
        claim=f"{case}: batch elements are independent",
        hint="reshapes must keep the batch axis apart; with batch_first confusion attention runs over the batch.",
    )


@pytest.mark.needs(causal=False)
@pytest.mark.parametrize("component", SELF_ATTENTION_MODULES)
@given(data=st.data())
def test_self_attention_is_equivariant_to_permuting_positions(impl, component, data):
    """Without a mask or positions, permuting the input positions permutes the output the same way."""
    case = data.draw(attention_cases(impl.offers(component), causal=False, masks=False), label="case")
    perm = torch.tensor(data.draw(st.permutations(range(case.cfg.s)), label="perm"))
    module = case.build(impl)
    x, _ = case.inputs()
    assert_close(
        case.call(module, x[:, perm]), case.call(module, x)[:, perm], axes=AXES,
        claim=f"{case} is equivariant to permuting positions",
        hint="splitting heads with a bare .view(b, h, s, e) (no transpose) mixes positions into heads.",
    )


@pytest.mark.requires("CrossAttention")
@given(data=st.data())
def test_cross_attention_is_invariant_to_permuting_the_context(impl, data):
    """Permuting the context positions (keys and values together) leaves the output unchanged."""
    case = data.draw(attention_cases(impl.offers("CrossAttention"), masks=False), label="case")
    perm = torch.tensor(data.draw(st.permutations(range(case.cfg.t)), label="perm"))
    module = case.build(impl)
    x, context = case.inputs()
    assert_close(
        case.call(module, x, context[:, perm]), case.call(module, x, context), axes=AXES,
        claim=f"{case} is invariant to permuting the context",
        hint="keys and values both come from the context; queries come from x.",
    )


@pytest.mark.requires("MultiHeadAttention", "SelfAttention")
@given(data=st.data())
def test_multi_head_attention_with_one_head_equals_self_attention(impl, data):
    """MultiHeadAttention(n_head=1) with SelfAttention's weights computes the same function."""
    both = impl.offers("SelfAttention") & impl.offers("MultiHeadAttention")
    case = data.draw(attention_cases(both, component="SelfAttention"), label="case")
    mask, causal = case.mask, case.causal
    single = case.build(impl)
    params = {k: v.detach().clone() for k, v in single.canonical_state().items()}
    mha = impl.build("MultiHeadAttention", seed=case.seed, d_model=case.cfg.d, n_head=1, bias=case.bias,
                     params=params)
    x, _ = case.inputs()
    m = None if mask is None else torch.from_numpy(np.asarray(mask))
    assert_close(
        mha(x, **({"mask": m} if m is not None else {}), causal=causal),
        case.call(single, x, mask=mask, causal=causal), axes=AXES,
        claim=f"MultiHeadAttention with one head equals SelfAttention ({case.cfg}, causal={causal})",
        hint="with one head the head width is d_model: scale by 1/sqrt(d_model) in both.",
    )


@pytest.mark.needs("MultiHeadAttention", causal=False)
@pytest.mark.requires("CrossAttention", "MultiHeadAttention")
@given(data=st.data())
def test_cross_attention_on_its_own_input_equals_multi_head_attention(impl, data):
    """CrossAttention(x, context=x) equals MultiHeadAttention(x) with the same weights and mask."""
    both = impl.offers("MultiHeadAttention") & impl.offers("CrossAttention")
    case = data.draw(attention_cases(both, component="MultiHeadAttention", causal=False), label="case")
    mask = case.mask
    mha = case.build(impl)
    params = {k: v.detach().clone() for k, v in mha.canonical_state().items()}
    cross = impl.build("CrossAttention", seed=case.seed, params=params, **case.ctor)
    x, _ = case.inputs()
    kwargs = {} if mask is None else {"mask": torch.from_numpy(np.asarray(mask))}
    assert_close(
        cross(x, x, **kwargs), mha(x, causal=False, **kwargs), axes=AXES,
        claim=f"CrossAttention with the context equal to its input equals MultiHeadAttention ({case.cfg})",
        hint="cross-attention is self-attention whose keys and values come from elsewhere; no causal mask.",
    )


@pytest.mark.requires("MultiHeadAttention")
@given(data=st.data())
def test_multi_head_attention_agrees_with_torch_multihead_attention(impl, data):
    """MultiHeadAttention equals ``torch.nn.MultiheadAttention`` (batch_first, float64) with the weights
    transferred and the mask inverted to its polarity (True = ignore)."""
    case = data.draw(attention_cases(impl.offers("MultiHeadAttention")), label="case")
    mask, causal = case.mask, case.causal
    module = case.build(impl)
    p = module.canonical_state()
    c = case.cfg
    torch_mha = torch.nn.MultiheadAttention(c.d, c.h, bias=case.bias, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        torch_mha.in_proj_weight.copy_(torch.cat([p["q.weight"], p["k.weight"], p["v.weight"]]))
        torch_mha.out_proj.weight.copy_(p["o.weight"])
        if case.bias:
            torch_mha.in_proj_bias.copy_(torch.cat([p["q.bias"], p["k.bias"], p["v.bias"]]))
            torch_mha.out_proj.bias.copy_(p["o.bias"])
    allowed = torch.ones(c.b, c.h, c.s, c.t, dtype=torch.bool)
    if mask is not None:
        allowed = allowed & torch.from_numpy(np.asarray(mask))
    if causal:
        allowed = allowed & torch.ones(c.s, c.t, dtype=torch.bool).tril()
    x, _ = case.inputs()
    want, _ = torch_mha(x, x, x, attn_mask=~rearrange(allowed, "b h s t -> (b h) s t"), need_weights=False)
    want = torch.where(torch.isnan(want), torch.zeros_like(want), want)  # older torch: NaN rows
    assert_close(
        case.call(module, x, mask=mask, causal=causal), want, axes=AXES,
        claim=f"{case} agrees with torch.nn.MultiheadAttention (weights transferred, causal={causal})",
        hint="nn.MultiheadAttention packs q, k, v as in_proj_weight rows [q; k; v] and scales by 1/sqrt(head width).",
    )


@pytest.mark.parametrize("component", ATTENTION_MODULES)
@given(data=st.data())
def test_attention_module_passes_gradcheck(impl, component, data):
    """float64 gradcheck w.r.t. the inputs (and the context), with masks.

    Hint: ``.detach()``, ``.data`` or an in-place ``masked_fill_`` on a tensor autograd saved break it.
    """
    case = data.draw(attention_cases(impl.offers(component), max_len=4), label="case")
    mask, causal = case.mask, case.causal
    module = case.build(impl)
    x, context = case.inputs()
    if case.cross:
        fn, inputs = (lambda x_, c_: case.call(module, x_, c_, mask=mask)), (x, context)
    else:
        fn, inputs = (lambda x_: case.call(module, x_, mask=mask, causal=causal)), (x,)
    gradcheck(fn, inputs, claim=f"{case}'s input gradients are right (causal={causal}, mask={mask!r})",
              hint="keep every step differentiable and out of place (masked_fill, not masked_fill_).")


@pytest.mark.parametrize("component", ATTENTION_MODULES)
@given(data=st.data())
def test_every_attention_parameter_gets_a_finite_gradient(impl, device, component, data):
    """Backpropagating a loss reaches every parameter with a finite gradient, nonzero for every matrix.

    Only matrices must get a nonzero gradient: the key bias adds q.b_k to every score of a row, which
    softmax cancels, so its exact gradient is zero (a fact worth knowing, not a bug).
    """
    # No mask: a query that sees a single key has constant weights, so q and k rightly get no gradient.
    case = data.draw(attention_cases(impl.offers(component), min_len=2, masks=False), label="case")
    module = case.build(impl, device)
    x, context = case.inputs(device)
    out = case.call(module, x, context, mask=case.mask, causal=case.causal)
    backward((out * tensor(case.seed + 9, *out.shape, dtype=out.dtype, device=device)).sum(), module)
    assert_parameters_get_finite_gradients(
        dict(module.module.named_parameters()),
        claim=f"{case}: every parameter receives a finite gradient (nonzero for matrices)",
        hint="a parameter without gradient is unused or cut off by .detach() / torch.no_grad().",
    )


@pytest.mark.needs(mask=True)
@pytest.mark.requires("CrossAttention")
@given(data=st.data())
def test_cross_attention_masked_context_gets_zero_gradient(impl, data):
    """Masked context positions receive exactly zero gradient, and real ones a nonzero gradient."""
    case = data.draw(attention_cases(impl.offers("CrossAttention"), masks=False), label="case")
    keep = data.draw(padding_masks(case.cfg.b, case.cfg.t), label="keep")
    module = case.build(impl)
    x, context = case.inputs()
    context.requires_grad_()
    out = case.call(module, x, context, mask=keep[:, None, None, :].view(Mask))
    backward(out.sum(), module)
    claim = f"{case}: masked context positions get exactly zero gradient, real ones a nonzero one"
    hint = "keys and values come from the context; mask the scores before softmax (masking afterwards leaks)."
    grad = context.grad
    assert_true(grad is not None, claim=claim, detail="no gradient reaches the context at all", hint=hint)
    hidden = torch.from_numpy(~keep)[..., None]
    assert_equal(grad * hidden, torch.zeros_like(context), axes=AXES, claim=claim, hint=hint)
    reached = grad.abs().sum(-1)[torch.from_numpy(keep)]
    assert_true(bool((reached > 0).all()), claim=claim,
                detail=f"{int((reached == 0).sum())} real context positions get no gradient", hint=hint)


@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("component", ATTENTION_MODULES)
@given(data=st.data())
def test_attention_module_preserves_dtype_and_device(impl, device, dtype, component, data):
    """The output has the dtype and device of the input (batch 1, length 1 and s != t included)."""
    case = data.draw(attention_cases(impl.offers(component)), label="case")
    mask, causal = case.mask, case.causal
    x, context = case.inputs(device, dtype)
    out = case.call(case.build(impl, device, dtype), x, context, mask=mask, causal=causal)
    assert_true(
        out.dtype == dtype and out.device == x.device,
        claim=f"{case} preserves dtype and device",
        detail=f"input {dtype} on {x.device}, output {out.dtype} on {out.device}",
        hint="create masks and constants on x.device, in x.dtype (torch.ones(..., device=x.device)).",
    )
