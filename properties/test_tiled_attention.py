"""Properties of tiled_attention: online softmax over key blocks (FlashAttention's algorithm).
Spec: spec/tiled_attention.py.

Calls are drawn as scaled_dot_product_attention's are (properties/test_sdpa.py: sdpa_calls), plus a block
size: 1, a divisor of t, a non-divisor (a shorter last block), one larger than t, or the implementation's
own. tiled_attention returns a pair (out, lse), so it is called through ``tiled`` below rather than the
suite's one-tensor wrapper, with the same checks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

import implementations
from properties.assertions import PRECISIONS, assert_close, assert_equal, assert_true, fail
from properties.options import Offers, draws_options
from properties.plugin import (COMPONENTS, ComponentFailure, Implementation, backward, call_arguments, describe_arguments,
                               guarded_call)
from properties.probes import CreatedTensors, math_backend, saved_for_backward
from properties.strategies import as_mask, attention_configs, boolean_masks, fewer_examples, seeds, tensor
from properties.test_sdpa import SdpaCall, sdpa_calls
from spec import sdpa as spec_sdpa
from spec.tiled_attention import log_sum_exp

TILED = "tiled_attention"
pytestmark = pytest.mark.requires(TILED)
AXES = "b h s e"
HALF = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------
# Calling the implementation: (out, lse), checked as the suite checks a one-tensor component


def tiled(impl: Implementation, q: Tensor, k: Tensor, v: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """``tiled_attention(q, k, v, **kwargs)`` of ``impl``: an exception, an input written in place, a result
    that is not (out (b, h, s, e_v), lse (b, h, s)), or a non-finite output for finite inputs is the
    component's failure. Options the implementation has built in are not passed (properties/options.py)."""
    __tracebackhide__ = True
    offers = impl.offers(TILED)
    kwargs = call_arguments(offers, kwargs)
    fn, who = impl.raw(TILED), f"{impl}: {impl.owner(TILED)}"
    result = guarded_call(COMPONENTS[TILED], fn, impl.label, impl.owner(TILED), (q, k, v), kwargs, offers=offers)
    if not (isinstance(result, (tuple, list)) and len(result) == 2 and all(isinstance(r, Tensor) for r in result)):
        raise ComponentFailure(f"{who} returned a {type(result).__name__}; the spec's tiled_attention returns "
                               "(out, lse): the output and each query's log-sum-exp")
    out, lse = result
    want = (*q.shape[:-1], v.shape[-1]), tuple(q.shape[:-1])
    if (tuple(out.shape), tuple(lse.shape)) != want:
        raise ComponentFailure(f"{who} returned out {tuple(out.shape)} and lse {tuple(lse.shape)}, but the spec says "
                               f"{want[0]} and {want[1]} for {describe_arguments((q, k, v), kwargs)}")
    if all(torch.isfinite(a).all() for a in (q, k, v)) and not torch.isfinite(out).all():
        raise ComponentFailure(f"{who} returned a non-finite output for finite inputs. A row whose keys are all "
                               "masked has l = 0: it must give zeros, not O / l.")
    if torch.isnan(lse).any() or (lse == float("inf")).any():
        raise ComponentFailure(f"{who} returned a NaN or +inf log-sum-exp (an empty row's is -inf)")
    return out, lse


# ---------------------------------------------------------------------------------------------------
# What is drawn


@dataclass(frozen=True)
class TiledCall:
    """An SDPA call (sizes, seed, mask, causal flag, head grouping), a block size (None: not passed, the
    implementation's own) and a scale (None: 1/sqrt(e))."""

    call: SdpaCall
    block_size: int | None = None
    scale: float | None = None

    def kwargs(self, device="cpu") -> dict[str, Any]:
        kw = {"mask": self.call.m(device), "causal": self.call.causal, "scale": self.scale}
        return kw if self.block_size is None else {**kw, "block_size": self.block_size}

    def reference(self, q: Tensor, k: Tensor, v: Tensor) -> np.ndarray:
        c = self.call
        return spec_sdpa.scaled_dot_product_attention(*(_numpy(a) for a in (q, k, v)), mask=c.mask, causal=c.causal,
                                                      scale=self.scale, grouping=c.grouping)

    def lse_reference(self, q: Tensor, k: Tensor) -> np.ndarray:
        c = self.call
        return log_sum_exp(_numpy(q), _numpy(k), mask=c.mask, causal=c.causal, scale=self.scale, grouping=c.grouping)

    def __repr__(self) -> str:
        c = self.call
        mask = "none" if c.mask is None else repr(c.mask)
        block = "its own" if self.block_size is None else self.block_size
        scale = "" if self.scale is None else f", scale={self.scale}"
        return f"{c.cfg}, e_v={c.ev}, block_size={block}, causal={c.causal}, mask={mask}{scale}, seed={c.seed}"

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(repr(self))


def _numpy(a: Tensor) -> np.ndarray:
    return a.detach().double().cpu().numpy()


def block_sizes(t: int, *, below_t: bool = False) -> st.SearchStrategy[int]:
    """Key block lengths for t keys: 1, a divisor of t, a non-divisor (a shorter last block), or (unless
    ``below_t``) one larger than t (a single block); the kinds t has no instance of are left out."""
    kinds = [st.just(1)] if t > 1 or not below_t else []
    divisors = [n for n in range(2, t) if t % n == 0]
    non_divisors = [n for n in range(2, t) if t % n]
    kinds += [st.sampled_from(divisors)] if divisors else []
    kinds += [st.sampled_from(non_divisors)] if non_divisors else []
    kinds += [] if below_t else [st.integers(t + 1, 2 * t + 1)]
    return st.one_of(kinds)


_DRAWN = dict(
    causal=lambda c: c.call.causal,
    grouped_heads=lambda c: c.call.cfg.g != c.call.cfg.h,
    block_size=lambda c: c.block_size is not None,
)


def _block_and_scale(draw, offers: Offers, t: int, below_t: bool) -> dict[str, Any]:
    block = None
    if offers.offers("block_size", True):
        sizes = block_sizes(t, below_t=below_t)
        block = draw(sizes if below_t else st.none() | sizes, label="block_size")
    scale = draw(st.sampled_from([None, 0.3]), label="scale") if offers.offers("scale", True) else None
    return {"block_size": block, "scale": scale}


@draws_options(TILED, **_DRAWN, mask=lambda c: c.call.mask is not None, scale=lambda c: c.scale is not None,
               unequal_lengths=lambda c: c.call.cfg.s != c.call.cfg.t, value_width=lambda c: c.call.ev != c.call.cfg.e)
@st.composite
def tiled_calls(draw, offers: Offers, *, min_len: int = 1, max_len: int = 6, below_t: bool = False,
                masks: bool = True, mask_heads: bool = True) -> TiledCall:
    """A call the implementation offers: sdpa_calls' sizes, masks (never an empty query row) and causal flag,
    a scale where it takes one, and a block size where it takes one (``below_t``: always one smaller than t,
    so that there are several blocks)."""
    call = draw(sdpa_calls(offers, min_len=min_len, max_len=max_len, masks=masks, mask_heads=mask_heads), label="call")
    return TiledCall(call, **_block_and_scale(draw, offers, call.cfg.t, below_t))


@draws_options(TILED, **_DRAWN)
@st.composite
def flash_calls(draw, offers: Offers) -> TiledCall:
    """Calls PyTorch's flash-attention kernel takes on the CPU and on CUDA alike: s = t (so that its top-left
    causal alignment is the spec's bottom-right), no mask, e = e_v in {8, 16} (CUDA's kernel needs a multiple
    of 8), b <= 2, 16 to 32 positions."""
    heads = "gqa" if offers.offers("grouped_heads", True) else "mha"
    cfg = draw(attention_configs(heads=heads, min_len=16, max_len=32), label="cfg")
    cfg = replace(cfg, e=draw(st.sampled_from([8, 16]), label="e"))
    call = SdpaCall(cfg, cfg.e, draw(seeds(), label="seed"), None, draw(offers.strategy("causal"), label="causal"),
                    offers.default("head_grouping"))
    return TiledCall(call, **_block_and_scale(draw, offers, cfg.t, False))


def calls_of(impl: Implementation, **kwargs) -> st.SearchStrategy[TiledCall]:
    return tiled_calls(impl.offers(TILED), **kwargs)


# ---------------------------------------------------------------------------------------------------
# Agreement


@pytest.mark.parametrize("dtype", PRECISIONS)
@given(data=st.data())
def test_tiled_attention_agrees_with_reference(impl, device, dtype, data):
    """The output equals spec/sdpa.py's float64 reference for every block size (1, a divisor of t, a
    non-divisor, larger than t), masks, causal flag (bottom-right), scale, grouped heads and value width
    included; float32 and half precision by the error-ratio rule against our plain SDPA.

    Hint: when the running maximum grows, rescale BOTH the numerator O and the normalizer l by
    exp(m_old - m_new); visit the last, shorter block; offset the causal mask by the block's first key.
    """
    tc = data.draw(calls_of(impl), label="call")
    q, k, v = tc.call.qkv(dtype, device)
    out, _ = tiled(impl, q, k, v, **tc.kwargs(device))
    baseline = tc.call.contiguous(implementations.scaled_dot_product_attention, q, k, v, mask=tc.call.m(device),
                                  causal=tc.call.causal, scale=tc.scale)
    assert_close(
        out, tc.reference(q, k, v), baseline=baseline, axes=AXES,
        claim=f"tiled_attention's output agrees with the spec's reference ({tc}, {dtype})",
        hint="O' = e^(m - m') O + e^(S - m') V and l' = e^(m - m') l + rowsum(e^(S - m')) for every block, "
        "the last partial one included; out = O / l.",
    )


@given(data=st.data())
def test_tiled_attention_log_sum_exp_agrees_with_reference(impl, data):
    """lse[b, i, x] = log sum_y exp(scale * <q_x, k_y>) over the allowed keys y (natural log, of the scaled
    scores), float64, for every block size.

    Hint: lse = m + log(l) with the final running maximum and normalizer; m alone misses log(l), and a
    normalizer that was not rescaled when m grew gives a wrong l.
    """
    tc = data.draw(calls_of(impl), label="call")
    q, k, v = tc.call.qkv()
    _, lse = tiled(impl, q, k, v, **tc.kwargs())
    assert_close(
        lse, tc.lse_reference(q, k), axes="b h s",
        claim=f"tiled_attention's log-sum-exp agrees with the reference ({tc})",
        hint="return m + log(l) (not m), with l rescaled by exp(m_old - m_new) whenever m grows.",
    )


def torch_sdpa(q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor, scale: float | None) -> Tensor:
    """``F.scaled_dot_product_attention`` (math backend) with contiguous KV groups repeated by autograd."""
    r = q.shape[1] // k.shape[1]
    with math_backend():
        return F.scaled_dot_product_attention(q, k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1),
                                              attn_mask=mask, scale=scale)


@given(data=st.data())
def test_tiled_attention_gradients_agree_with_torch_sdpa(impl, data):
    """The gradients w.r.t. q, k and v equal those of ``F.scaled_dot_product_attention`` (math backend,
    float64, an explicit bottom-right mask), for every block size, masks and grouped heads included.

    Hint: recompute each block's P = exp(S - lse) in backward (not exp(S - m), not another block's P);
    dS = P * (dP - D) with D = rowsum(dout * out); sum dK and dV over the query heads of a KV group.
    """
    tc = data.draw(calls_of(impl), label="call")
    c = tc.call
    q, k, v = (a.requires_grad_() for a in c.qkv())
    out, _ = tiled(impl, q, k, v, **tc.kwargs())
    weights = tensor(c.seed + 5, *out.shape, dtype=out.dtype, device=out.device)
    backward((out * weights).sum(), f"{impl}: {TILED}")
    q2, k2, v2 = (a.detach().clone().requires_grad_() for a in (q, k, v))
    allowed = torch.from_numpy(spec_sdpa.allowed_keys((c.cfg.b, c.cfg.h, c.cfg.s, c.cfg.t), c.mask, c.causal))
    want = c.contiguous(torch_sdpa, q2, k2, v2, mask=allowed, scale=tc.scale)
    (want * weights).sum().backward()
    for name, got, expected in (("q", q, q2), ("k", k, k2), ("v", v, v2)):
        if got.grad is None:
            fail(f"tiled_attention passes a gradient to {name} ({tc})", "its .grad is None",
                 "return a gradient for q, k and v from backward (and nothing detached in forward).")
        assert_close(
            got.grad, expected.grad, axes=AXES,
            claim=f"tiled_attention's gradient w.r.t. {name} equals F.scaled_dot_product_attention's ({tc})",
            hint="P = exp(S - lse) recomputed per block; dS = P * (dout V^T - rowsum(dout * out)); dK, dV summed "
            "over each KV head's group of query heads.",
        )


@pytest.mark.needs(mask=True, empty_rows=True)
@given(data=st.data())
def test_tiled_attention_fully_masked_rows_are_zero(impl, device, data):
    """A query whose keys are all masked gets out = 0 exactly and lse = -inf (the log of an empty sum), with
    finite gradients, for every block size.

    Hint: such a row keeps l = 0 and m = -inf: shift its exponentials by 0 (exp(-inf - (-inf)) is NaN) and
    return 0, not O / l.
    """
    tc = data.draw(calls_of(impl, masks=False), label="call")
    cfg = tc.call.cfg
    mask = np.array(data.draw(boolean_masks((cfg.b, 1, cfg.s, cfg.t)), label="mask"))
    empty_row = data.draw(st.integers(0, cfg.s - 1), label="empty_row")
    mask[:, :, empty_row, :] = False
    q, k, v = (a.requires_grad_() for a in tc.call.qkv(device=device))
    kwargs = {**tc.kwargs(device), "mask": as_mask(mask, device)}
    out, lse = tiled(impl, q, k, v, **kwargs)
    assert_equal(out[:, :, empty_row], torch.zeros_like(out[:, :, empty_row]), axes="b h e",
                 claim=f"a fully masked query row gives zeros ({tc}, row {empty_row})",
                 hint="l = 0 for that row: return 0 there instead of O / l.")
    assert_true(bool((lse[:, :, empty_row] == float("-inf")).all()),
                claim=f"a fully masked query row's log-sum-exp is -inf ({tc}, row {empty_row})",
                detail=f"lse there is {lse[:, :, empty_row].flatten()[:4].tolist()}",
                hint="log of an empty sum: m + log(l) with l = 0 is -inf; do not replace it by 0 or m.")
    backward(out.sum(), f"{impl}: {TILED}")
    bad = [name for name, a in (("q", q), ("k", k), ("v", v)) if a.grad is None or not torch.isfinite(a.grad).all()]
    assert_true(not bad, claim=f"gradients stay finite with a fully masked row ({tc}, row {empty_row})",
                detail=f"missing or non-finite gradient for {', '.join(bad)}",
                hint="in backward, P = exp(S - lse) is exp(-inf - (-inf)) = NaN on that row: make it 0.")


# ---------------------------------------------------------------------------------------------------
# Memory: the (s, t) score matrix is never created


@pytest.mark.needs(block_size=True)
@given(data=st.data())
def test_tiled_attention_never_materializes_the_score_matrix(impl, data):
    """With blocks shorter than t (16 to 20 positions), forward and backward never create a tensor with as
    many elements as the (b, h, s, t) score array, and the tensors saved for backward (beyond the inputs)
    take fewer bytes than it: each block's probabilities are recomputed from the saved log-sum-exp.

    Watched with a TorchFunctionMode (the new tensors of every torch function called, the backward of a
    torch.autograd.Function included) and a saved-tensors hook.
    Hint: differentiating through the block loop with autograd keeps every block's probabilities, s * t
    numbers in all; write the backward (torch.autograd.Function) and save q, k, v, out and lse only.
    """
    tc = data.draw(calls_of(impl, min_len=16, max_len=20, below_t=True, mask_heads=False), label="call")
    cfg = tc.call.cfg
    q, k, v = (a.requires_grad_() for a in tc.call.qkv())
    kwargs = tc.kwargs()
    scores = cfg.b * cfg.h * cfg.s * cfg.t
    with CreatedTensors() as created:
        (out, _), saved = saved_for_backward(lambda: tiled(impl, q, k, v, **kwargs),
                                             exclude=[a for a in (q, k, v, kwargs["mask"]) if a is not None])
    with created.watching_backward(out):
        backward((out * out.detach()).sum(), f"{impl}: {TILED}")
    size, shape, op = created.largest
    assert_true(
        size < scores,
        claim=f"tiled attention never creates a tensor as large as the score array ({tc})",
        detail=f"{op} created a tensor of shape {shape} ({size} elements); (b, h, s, t) holds {scores}",
        hint="compute scores, probabilities and their gradients one key block at a time; never concatenate "
        "the blocks.",
    )
    kept, score_bytes = sum(saved.values()), scores * q.element_size()
    assert_true(
        kept < score_bytes,
        claim=f"what tiled attention saves for backward is smaller than the score array ({tc})",
        detail=f"tensors saved for backward beyond q, k, v and the mask take {kept} bytes ({len(saved)} "
        f"storages); the (b, h, s, t) score array takes {score_bytes}",
        hint="a torch.autograd.Function that saves q, k, v, out and lse and recomputes each block's "
        "P = exp(S - lse) in backward; autograd through the loop saves every block.",
    )


# ---------------------------------------------------------------------------------------------------
# Precision: against PyTorch's flash-attention kernel in the same dtype


def flash_sdpa(q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None, causal: bool,
               scale: float | None) -> Tensor:
    """``F.scaled_dot_product_attention`` forced onto its flash-attention backend (CPU or CUDA kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    r = q.shape[1] // k.shape[1]
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1),
                                              is_causal=causal, scale=scale)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@given(data=st.data())
def test_tiled_attention_is_as_accurate_as_flash_attention(impl, device, dtype, data):
    """The output's largest error against the float64 reference is at most twice that of PyTorch's
    flash-attention kernel (``F.scaled_dot_product_attention``, flash backend) in the same dtype, plus 8 ulp:
    float32 on the CPU, float16 and bfloat16 on CUDA (the error-ratio rule of flash-attention's own tests).

    Hint: keep m, l and O in float32 for float16/bfloat16 inputs and cast the output back once; compute the
    scores in the working precision, not in a lower one for speed.
    """
    if torch.device(device).type == "cuda" and dtype == torch.float32:
        pytest.skip("PyTorch's CUDA flash-attention kernel takes float16 and bfloat16 only")
    tc = data.draw(flash_calls(impl.offers(TILED)), label="call")
    q, k, v = tc.call.qkv(dtype, device)
    out, _ = tiled(impl, q, k, v, **tc.kwargs(device))
    flash = tc.call.contiguous(flash_sdpa, q, k, v, causal=tc.call.causal, scale=tc.scale)
    assert_close(
        out, tc.reference(q, k, v), baseline=flash, axes=AXES,
        claim=f"tiled attention is as accurate as PyTorch's flash attention ({tc}, {dtype})",
        hint="accumulate in float32 whatever the input dtype (float64 stays float64); cast out back once.",
    )


@pytest.mark.parametrize("dtype", PRECISIONS)
@fewer_examples()
@given(data=st.data())
def test_tiled_attention_preserves_dtype_and_device(impl, device, dtype, data):
    """out has the dtype and device of q; lse has q's device and dtype, float32 for float16/bfloat16 inputs
    (as FlashAttention's softmax_lse: backward recomputes exp(S - lse) from it)."""
    tc = data.draw(calls_of(impl), label="call")
    q, k, v = tc.call.qkv(dtype, device)
    out, lse = tiled(impl, q, k, v, **tc.kwargs(device))
    lse_dtype = torch.float32 if dtype in HALF else dtype
    assert_true(
        out.dtype == dtype and lse.dtype == lse_dtype and out.device == lse.device == q.device,
        claim=f"tiled_attention preserves dtype and device ({tc})",
        detail=f"inputs {dtype} on {q.device}: out {out.dtype} on {out.device}, lse {lse.dtype} on {lse.device}",
        hint=f"cast out back to the input dtype; lse is {lse_dtype} for {dtype} inputs.",
    )
