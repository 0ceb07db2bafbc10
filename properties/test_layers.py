"""Properties of the transformer layers: EncoderLayer and DecoderLayer (decoder-only and encoder-decoder).
Spec: spec/layers.py.

Options an implementation lacks
-------------------------------
A layer class may list the spec options it does not offer in a class attribute ``unsupported_options``
("option=value", or a bare option name for any value but the default), as the PyTorch adapter does
(nn.Transformer*Layer has no SwiGLU, RMSNorm, GQA, RoPE or KV cache). The configurations below are drawn
from the options the implementation offers, so such a layer is checked on everything it does support and
never failed for what it declared it lacks. Our implementation, like the spec, offers every option.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import implementations
from properties.assertions import PRECISIONS, assert_close, assert_equal, assert_true
from properties.plugin import (
    CheckedModule,
    ComponentFailure,
    Implementation,
    backward,
    describe_call,
    draw_parameters,
)
from properties.strategies import Mask, chunkings, padding_masks, seeds, tensor
from spec import COMPONENTS
from spec.kv_cache import split_points
from spec.layers import ACTIVATIONS, NORMS, decoder_layer, encoder_layer

OURS = Implementation("ours", implementations)
LAYERS = ["EncoderLayer", "DecoderLayer"]
AXES = "b s d"
EPS = 1e-5


def offers(impl: Implementation | None, component: str, option: str, value: Any = None) -> bool:
    """Whether ``impl``'s ``component`` offers ``option`` (= ``value``); see the module docstring."""
    if impl is None:
        return True
    declared = getattr(impl.raw(component), "unsupported_options", ())
    return option not in declared and f"{option}={value}" not in declared


@dataclass(frozen=True)
class LayerCase:
    """One layer configuration, sizes named by the shape glossary (t = memory length)."""

    component: str
    b: int
    s: int
    t: int
    h: int
    e: int
    f: int
    seed: int
    norm_first: bool = False
    activation: str = "relu"
    cross: bool = False  # DecoderLayer with cross-attention over a memory
    norm: str = "layer"
    g: int | None = None  # n_kv_head (DecoderLayer only)
    rope: tuple[float, str] | None = None  # (base, pairing) of a RotaryEmbedding (DecoderLayer only)
    dropout: float = 0.0

    @property
    def d(self) -> int:
        return self.h * self.e

    @property
    def decoder(self) -> bool:
        return self.component == "DecoderLayer"

    def ctor(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"d_model": self.d, "n_head": self.h, "d_ff": self.f, "norm_first": self.norm_first,
                              "dropout": self.dropout, "activation": self.activation}
        if self.decoder:
            kw["cross_attention"] = self.cross
            if self.norm != "layer":
                kw["norm"] = self.norm
            if self.g is not None:
                kw["n_kv_head"] = self.g
        return kw

    def build(self, impl: Implementation, device="cpu", dtype=torch.float64, **kw) -> CheckedModule:
        __tracebackhide__ = True
        extra: dict[str, Any] = {}
        if self.rope is not None:
            config = {"head_dim": self.e, "base": self.rope[0], "pairing": self.rope[1]}
            try:
                extra["rotary"] = impl.raw("RotaryEmbedding")(**config)
            except Exception as exc:  # noqa: BLE001 (any failure to build it is the implementation's)
                raise ComponentFailure(
                    f"{impl}: {describe_call('RotaryEmbedding', config)} raised {type(exc).__name__}: {exc}"
                ) from None
        return impl.build(self.component, seed=self.seed, device=device, dtype=dtype, **self.ctor(), **extra, **kw)

    def canonical_parameters(self) -> dict[str, Tensor]:
        return draw_parameters(COMPONENTS[self.component].parameters(**self.ctor()), self.seed)

    def inputs(self, device="cpu", dtype=torch.float64) -> tuple[Tensor, Tensor | None]:
        x = tensor(self.seed + 1, self.b, self.s, self.d, dtype=dtype, device=device)
        memory = tensor(self.seed + 2, self.b, self.t, self.d, dtype=dtype, device=device) if self.cross else None
        return x, memory

    def call(self, module, x: Tensor, memory: Tensor | None = None, *, keep=None, memory_keep=None,
             cache=None) -> Tensor:
        """Call with key padding masks (b, s) / (b, t) (numpy or tensor, True = real token), or None."""
        __tracebackhide__ = True
        kwargs: dict[str, Any] = {}
        if keep is not None:
            kwargs["mask"] = torch.as_tensor(np.asarray(keep), device=x.device)[:, None, None, :]
        if memory_keep is not None:
            kwargs["memory_mask"] = torch.as_tensor(np.asarray(memory_keep), device=x.device)[:, None, None, :]
        if cache is not None:
            kwargs["cache"] = cache
        if self.cross:
            return module(x, memory, **kwargs)
        return module(x, **kwargs)

    def reference(self, module: CheckedModule, x, memory=None, *, keep=None, memory_keep=None) -> np.ndarray:
        params = {k: v.detach().double().cpu().numpy() for k, v in module.canonical_state().items()}
        as_np = lambda a: None if a is None else a.detach().double().cpu().numpy()
        key_mask = lambda k: None if k is None else np.asarray(k)[:, None, None, :]
        if not self.decoder:
            return encoder_layer(params, as_np(x), n_head=self.h, norm_first=self.norm_first,
                                 activation=self.activation, eps=EPS, mask=key_mask(keep))
        rope = None if self.rope is None else {"base": self.rope[0], "pairing": self.rope[1]}
        return decoder_layer(params, as_np(x), as_np(memory), n_head=self.h, n_kv_head=self.g,
                             cross_attention=self.cross, norm_first=self.norm_first, activation=self.activation,
                             norm=self.norm, eps=EPS, mask=key_mask(keep), memory_mask=key_mask(memory_keep),
                             rope=rope)

    def __repr__(self) -> str:
        opts = [f"norm_first={self.norm_first}", f"activation={self.activation}"]
        if self.decoder:
            opts.append(f"cross_attention={self.cross}")
            opts += [f"norm={self.norm}"] if self.norm != "layer" else []
            opts += [f"n_kv_head={self.g}"] if self.g is not None else []
            opts += [f"rotary(base={self.rope[0]}, pairing={self.rope[1]})"] if self.rope is not None else []
        opts += [f"dropout={self.dropout}"] if self.dropout else []
        sizes = f"b={self.b}, s={self.s}" + (f", t={self.t}" if self.cross else "")
        return f"{self.component}({', '.join(opts)}; {sizes}, h={self.h}, e={self.e}, d={self.d}, f={self.f})"


@st.composite
def layer_cases(
    draw,
    component: str,
    impl: Implementation | None = None,
    *,
    norm_first: bool | None = None,
    cross: bool | None = None,
    torch_options: bool = False,
    activations: tuple[str, ...] = ACTIVATIONS,
    min_len: int = 1,
    min_d: int = 1,
    min_b: int = 1,
    dropout: float | None = 0.0,
    cached: bool = False,
) -> LayerCase:
    """A small layer configuration with the options ``impl`` offers.

    torch_options: only what nn.Transformer*Layer offers (LayerNorm, relu/gelu, MHA, no RoPE).
    cached:        decoder-only with grouped-query attention and RoPE (the KV-cache configuration).
    dropout:       None draws a positive dropout probability.
    """
    decoder = component == "DecoderLayer"
    b = draw(st.integers(min_b, 2), label="b")
    s = draw(st.integers(min_len, 5), label="s")
    h = draw(st.integers(1, 2), label="h")
    e_min = max(1, -(-min_d // h))
    e = 2 * draw(st.integers(1, 2), label="e/2") if cached else draw(st.integers(e_min, 4), label="e")
    f = draw(st.integers(1, 16), label="f")
    if norm_first is None:
        norm_first = draw(st.booleans(), label="norm_first")
    if torch_options:
        activations = tuple(a for a in activations if a != "swiglu")
    activations = tuple(a for a in activations if offers(impl, component, "activation", a))
    activation = draw(st.sampled_from(activations), label="activation")
    p = draw(st.floats(0.1, 0.5), label="dropout") if dropout is None else dropout
    case = LayerCase(component, b=b, s=s, t=s, h=h, e=e, f=f, seed=draw(seeds(), label="seed"),
                     norm_first=norm_first, activation=activation, dropout=p)
    if not decoder:
        return case
    if cached:
        cross = False
    elif cross is None:
        cross = draw(st.booleans(), label="cross_attention")
    t = draw(st.integers(min_len, 5), label="t") if cross else s
    norms = ("layer",) if torch_options else tuple(n for n in NORMS if offers(impl, component, "norm", n))
    norm = draw(st.sampled_from(norms), label="norm")
    g = rope = None
    kv_heads = [k for k in range(1, h + 1) if h % k == 0]
    if cached:
        g = draw(st.sampled_from(kv_heads), label="n_kv_head")
    elif not torch_options and offers(impl, component, "n_kv_head"):
        g = draw(st.none() | st.sampled_from(kv_heads), label="n_kv_head")
    rotary_offered = impl is None or (impl.provides("RotaryEmbedding") and offers(impl, component, "rotary"))
    if cached or (not torch_options and e % 2 == 0 and rotary_offered and draw(st.booleans(), label="rotary")):
        rope = (draw(st.sampled_from([10000.0, 10.0]), label="rope_base"),
                draw(st.sampled_from(["adjacent", "half"]), label="rope_pairing"))
    return replace(case, t=t, cross=cross, norm=norm, g=g, rope=rope)


def optional_padding(b: int, n: int) -> st.SearchStrategy[np.ndarray | None]:
    """No mask, or a key padding mask (b, n) with real tokens first (True = real)."""
    return st.none() | padding_masks(b, n)


def at_real_positions(out: Tensor, keep: np.ndarray, n: int) -> Tensor:
    """out[:, :n] with the padded positions (keep False) zeroed: the outputs a padding claim is about."""
    real = torch.as_tensor(np.asarray(keep), device=out.device)[:, :n, None]
    return torch.where(real, out[:, :n], torch.zeros_like(out[:, :n]))


# ---------------------------------------------------------------------------------------------------
# Agreement


@pytest.mark.parametrize("component", LAYERS)
@pytest.mark.parametrize("dtype", PRECISIONS)
@given(data=st.data())
def test_layer_agrees_with_reference(impl, device, dtype, component, data):
    """The layer's output equals the spec's float64 reference with the same weights, post-norm and pre-norm,
    padding masks included (float32 and half precision by the error-ratio rule against ours in the same
    dtype). Below float64 the model width is at least 4: a LayerNorm over two features is nearly
    sign(x1 - x2), so ill-conditioned that rounding luck, not the implementation, would decide.

    Hint: post-norm is N(x + Sublayer(x)); pre-norm is x + Sublayer(N(x)); the decoder's self-attention is
    causal and its cross-attention reads keys and values from the memory.
    """
    case = data.draw(layer_cases(component, impl, min_d=1 if dtype == torch.float64 else 4), label="case")
    keep = data.draw(optional_padding(case.b, case.s), label="keep")
    memory_keep = data.draw(optional_padding(case.b, case.t), label="memory_keep") if case.cross else None
    module = case.build(impl, device, dtype)
    x, memory = case.inputs(device, dtype)
    out = case.call(module, x, memory, keep=keep, memory_keep=memory_keep)
    baseline = None
    if dtype != torch.float64:
        baseline = case.call(case.build(OURS, device, dtype), x, memory, keep=keep, memory_keep=memory_keep)
    assert_close(
        out, case.reference(module, x, memory, keep=keep, memory_keep=memory_keep), baseline=baseline, axes=AXES,
        claim=f"{case} agrees with the spec's reference ({dtype}, keep={keep!r}, memory_keep={memory_keep!r})",
        hint="check where each norm sits (post-norm: after the residual add; pre-norm: on the sublayer's input "
        "only), that every sublayer adds to the residual stream once, and the mask polarity (True = may attend).",
    )


def torch_layer_like(case: LayerCase, p: dict[str, Tensor]) -> nn.Module:
    """PyTorch's own layer for ``case`` (float64, eval, dropout 0) with the canonical weights ``p``."""
    kwargs = {"dim_feedforward": case.f, "dropout": 0.0, "activation": case.activation, "layer_norm_eps": EPS,
              "batch_first": True, "norm_first": case.norm_first, "dtype": torch.float64}
    if case.cross:
        layer = nn.TransformerDecoderLayer(case.d, case.h, **kwargs)
        attentions = {"self_attn": layer.self_attn, "cross_attn": layer.multihead_attn}
        norms = {"self_attn_norm": layer.norm1, "cross_attn_norm": layer.norm2, "ff_norm": layer.norm3}
    else:
        layer = nn.TransformerEncoderLayer(case.d, case.h, **kwargs)
        attentions = {"self_attn": layer.self_attn}
        norms = {"self_attn_norm": layer.norm1, "ff_norm": layer.norm2}
    with torch.no_grad():
        for prefix, mha in attentions.items():
            mha.in_proj_weight.copy_(torch.cat([p[f"{prefix}.{n}.weight"] for n in "qkv"]))
            mha.in_proj_bias.copy_(torch.cat([p[f"{prefix}.{n}.bias"] for n in "qkv"]))
            mha.out_proj.weight.copy_(p[f"{prefix}.o.weight"])
            mha.out_proj.bias.copy_(p[f"{prefix}.o.bias"])
        for prefix, norm in norms.items():
            norm.weight.copy_(p[f"{prefix}.weight"])
            norm.bias.copy_(p[f"{prefix}.bias"])
        for ours, theirs in (("ff.up", layer.linear1), ("ff.down", layer.linear2)):
            theirs.weight.copy_(p[f"{ours}.weight"])
            theirs.bias.copy_(p[f"{ours}.bias"])
    return layer.eval()


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("component", LAYERS)
@given(data=st.data())
def test_layer_agrees_with_torch_transformer_layer(impl, component, norm_first, data):
    """The layer equals ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` (batch_first,
    float64, eval, dropout 0) with the weights transferred from its canonical parameters; a decoder-only
    layer equals nn.TransformerEncoderLayer with a causal mask. Padding goes in as torch's key padding
    masks (True = padding)."""
    case = data.draw(layer_cases(component, impl, norm_first=norm_first, torch_options=True), label="case")
    keep = data.draw(optional_padding(case.b, case.s), label="keep")
    memory_keep = data.draw(optional_padding(case.b, case.t), label="memory_keep") if case.cross else None
    module = case.build(impl)
    layer = torch_layer_like(case, {k: v.detach() for k, v in module.canonical_state().items()})
    x, memory = case.inputs()
    pad = None if keep is None else ~torch.from_numpy(np.asarray(keep))
    causal = torch.ones(case.s, case.s, dtype=torch.bool).triu(1)  # True = masked (torch's polarity)
    if case.cross:
        memory_pad = None if memory_keep is None else ~torch.from_numpy(np.asarray(memory_keep))
        want = layer(x, memory, tgt_mask=causal, tgt_key_padding_mask=pad, memory_key_padding_mask=memory_pad)
    elif case.decoder:
        want = layer(x, src_mask=causal, src_key_padding_mask=pad)
    else:
        want = layer(x, src_key_padding_mask=pad)
    assert_close(
        case.call(module, x, memory, keep=keep, memory_keep=memory_keep), want, axes=AXES,
        claim=f"{case} agrees with torch's nn.Transformer*Layer (keep={keep!r}, memory_keep={memory_keep!r})",
        hint="nn.Transformer*Layer: post-norm norm1(x + sa(x)), norm2(x + ff(x)) by default; norm_first=True "
        "is x + sa(norm1(x)); linear1/linear2 are ff.up/ff.down.",
    )


# ---------------------------------------------------------------------------------------------------
# Symmetries and masks


@pytest.mark.requires("EncoderLayer")
@given(data=st.data())
def test_encoder_layer_is_equivariant_to_permuting_positions(impl, device, data):
    """Without positional information, permuting the input positions (and a padding mask with them)
    permutes the output the same way.

    Hint: an encoder is bidirectional: no causal mask; and head splits must keep positions apart.
    """
    case = data.draw(layer_cases("EncoderLayer", impl), label="case")
    keep = data.draw(optional_padding(case.b, case.s), label="keep")
    perm = data.draw(st.permutations(range(case.s)), label="perm")
    module = case.build(impl, device)
    x, _ = case.inputs(device)
    index = torch.tensor(perm, device=x.device)
    permuted_keep = None if keep is None else np.asarray(keep)[:, perm].view(Mask)
    assert_close(
        case.call(module, x[:, index], keep=permuted_keep), case.call(module, x, keep=keep)[:, index], axes=AXES,
        claim=f"{case} is equivariant to permuting positions (perm={perm}, keep={keep!r})",
        hint="an encoder layer must not mask causally, and must not mix positions anywhere but in attention.",
    )


@pytest.mark.parametrize("component", LAYERS)
@given(data=st.data())
def test_layer_padding_does_not_change_real_positions(impl, device, component, data):
    """The outputs at real positions do not depend on the content of padded positions nor on how much
    padding follows them (the same sequences padded to two lengths, with different pad content); for an
    encoder-decoder layer the memory is padded the same way.

    Hint: pass the padding as a key mask, True = real token: mask[:, None, None, :] masks keys, not queries.
    """
    case = data.draw(layer_cases(component, impl), label="case")
    keep = data.draw(padding_masks(case.b, case.s), label="keep")  # lengths <= s
    memory_keep = data.draw(padding_masks(case.b, case.t), label="memory_keep") if case.cross else None
    extra = data.draw(st.tuples(st.integers(0, 3), st.integers(0, 3)), label="extra_padding")
    module = case.build(impl, device)
    x_all = tensor(case.seed + 1, case.b, case.s + 3, case.d, dtype=torch.float64, device=device)
    m_all = tensor(case.seed + 2, case.b, case.t + 3, case.d, dtype=torch.float64, device=device)

    def padded(full, real_keep, n, more, noise_seed):
        """Real tokens of ``full`` where real_keep, noise elsewhere, padded to n + more positions."""
        k = np.zeros((case.b, n + more), dtype=bool)
        k[:, :n] = np.asarray(real_keep)
        noise = tensor(noise_seed, case.b, n + more, case.d, dtype=torch.float64, device=device, scale=3.0)
        real = torch.as_tensor(k, device=device)[..., None]
        return torch.where(real, full[:, : n + more], noise), k.view(Mask)

    outs = []
    for i, more in enumerate(extra):
        x, k = padded(x_all, keep, case.s, more, case.seed + 10 + i)
        memory, mk = padded(m_all, memory_keep, case.t, more, case.seed + 20 + i) if case.cross else (None, None)
        outs.append(at_real_positions(case.call(module, x, memory, keep=k, memory_keep=mk), keep, case.s))
    assert_close(
        outs[1], outs[0], axes=AXES,
        claim=f"{case}: padding content and amount do not change real positions (keep={keep!r}, "
        f"memory_keep={memory_keep!r}, extra padding {extra[0]} vs {extra[1]})",
        hint="True = real token; a padding mask must reach every attention over padded keys "
        "(the memory's padding goes to the cross-attention as memory_mask).",
    )


# ---------------------------------------------------------------------------------------------------
# Train and eval mode


@pytest.mark.parametrize("component", LAYERS)
@given(data=st.data())
def test_layer_eval_mode_is_deterministic(impl, device, component, data):
    """In eval mode, with dropout > 0, two calls on the same input give identical outputs.

    Hint: use nn.Dropout (or F.dropout(..., training=self.training)): dropout acts in training mode only.
    """
    case = data.draw(layer_cases(component, impl, dropout=None), label="case")
    module = case.build(impl, device)
    x, memory = case.inputs(device)
    assert_equal(
        case.call(module, x, memory), case.call(module, x, memory), axes=AXES,
        claim=f"{case} in eval mode gives the same output twice",
        hint="F.dropout(x, p) defaults to training=True; pass training=self.training or use nn.Dropout.",
    )


@pytest.mark.parametrize("component", LAYERS)
@given(data=st.data())
def test_layer_train_mode_equals_eval_mode_without_dropout(impl, device, component, data):
    """With dropout 0, train mode computes exactly what eval mode computes: nothing else may depend on it.

    Hint: LayerNorm normalises each position over its features, in both modes; BatchNorm uses batch
    statistics in training and running ones in eval.
    """
    case = data.draw(layer_cases(component, impl, min_b=2), label="case")
    module = case.build(impl, device)
    x, memory = case.inputs(device)
    evaluated = case.call(module, x, memory)
    module.module.train()
    assert_equal(
        case.call(module, x, memory), evaluated, axes=AXES,
        claim=f"{case} with dropout 0 computes the same in train and eval mode",
        hint="only dropout may behave differently in training; normalise with LayerNorm, not BatchNorm.",
    )


# ---------------------------------------------------------------------------------------------------
# Structure


def zero_output_projections(params: dict[str, Tensor]) -> dict[str, Tensor]:
    zeroed = ("self_attn.o.", "cross_attn.o.", "ff.down.")
    return {k: torch.zeros_like(v) if k.startswith(zeroed) else v for k, v in params.items()}


@pytest.mark.parametrize("component", LAYERS)
@given(data=st.data())
def test_pre_norm_layer_with_zero_output_projections_is_identity(impl, device, component, data):
    """A pre-norm layer whose sublayers' output projections (self_attn.o, cross_attn.o, ff.down) are zero
    returns its input exactly: each sublayer adds zero to a residual stream that is never normalised.

    Hint: pre-norm is x + Sublayer(N(x)): normalise the sublayer's input, not the stream itself, and add
    each sublayer's output once.
    """
    case = data.draw(layer_cases(component, impl, norm_first=True), label="case")
    module = case.build(impl, device, params=zero_output_projections(case.canonical_parameters()))
    x, memory = case.inputs(device)
    assert_equal(
        case.call(module, x, memory), x, axes=AXES,
        claim=f"{case} with zero output projections is the identity",
        hint="the residual stream x must pass through untouched: x + Sublayer(N(x)), never N(x) + ... or 2x.",
    )


@pytest.mark.requires("DecoderLayer")
@pytest.mark.parametrize("cross_attention", [False, True])
@given(data=st.data())
def test_decoder_layer_is_causal(impl, device, cross_attention, data):
    """The decoder layer's output at position p does not depend on its inputs after p (exactly), both
    decoder-only and with cross-attention over a fixed memory.

    Hint: the self-attention must be causal (mask keys j > i), whatever mask the caller passes.
    """
    case = data.draw(layer_cases("DecoderLayer", impl, cross=cross_attention), label="case")
    cut = data.draw(st.integers(0, case.s - 1), label="last_unchanged_position")
    module = case.build(impl, device)
    x, memory = case.inputs(device)
    x2 = x.clone()
    x2[:, cut + 1 :] += tensor(case.seed + 7, *x2[:, cut + 1 :].shape, dtype=x.dtype, device=device)
    assert_equal(
        case.call(module, x2, memory)[:, : cut + 1], case.call(module, x, memory)[:, : cut + 1], axes=AXES,
        claim=f"{case} ignores inputs after position {cut} at positions up to {cut}",
        hint="call the self-attention with causal=True; the cross-attention (memory) needs no causal mask.",
    )


@pytest.mark.requires("DecoderLayer")
@given(data=st.data())
def test_decoder_layer_depends_on_every_unmasked_memory_position_only(impl, device, data):
    """Changing one memory position changes every output position if that memory position is unmasked,
    and changes nothing (exactly) if it is masked.

    Hint: keys and values of the cross-attention come from the memory, and memory_mask must reach it.
    """
    case = data.draw(layer_cases("DecoderLayer", impl, cross=True, min_d=4), label="case")
    rows = data.draw(st.lists(st.lists(st.booleans(), min_size=case.t, max_size=case.t), min_size=case.b,
                              max_size=case.b), label="memory_keep_rows")
    memory_keep = np.array(rows, dtype=bool).reshape(case.b, case.t)
    memory_keep[:, data.draw(st.integers(0, case.t - 1), label="always_kept")] = True
    memory_keep = memory_keep.view(Mask)
    module = case.build(impl, device)
    x, memory = case.inputs(device)
    out = case.call(module, x, memory, memory_keep=memory_keep)
    claim = f"{case}: each output depends on every unmasked memory position and on no masked one " \
            f"(memory_keep={memory_keep!r})"
    hint = "cross-attention: queries from x, keys and values from memory; mask with memory_mask (True = real)."
    for j in range(case.t):
        memory2 = memory.clone()
        memory2[:, j] += tensor(case.seed + 30 + j, case.b, case.d, dtype=memory.dtype, device=device)
        change = (case.call(module, x, memory2, memory_keep=memory_keep) - out).abs().amax(dim=-1)  # (b, s)
        kept = torch.as_tensor(memory_keep[:, j], device=change.device)
        masked_change = change[~kept]
        assert_equal(masked_change, torch.zeros_like(masked_change), claim=claim,
                     hint=hint + f" (memory position {j} is masked in some batch elements and changed the output)")
        assert_true(bool((change[kept] > 0).all()), claim=claim,
                    detail=f"changing unmasked memory position {j} left some output positions unchanged",
                    hint=hint)


# ---------------------------------------------------------------------------------------------------
# Gradients and the KV cache


@pytest.mark.parametrize("component", LAYERS)
@given(data=st.data())
def test_every_layer_parameter_gets_a_finite_gradient(impl, device, component, data):
    """Backpropagating a loss reaches every parameter with a finite gradient, nonzero for every matrix.

    Only matrices must get a nonzero gradient: an attention's key bias adds q.b_k to every score of a row,
    which softmax cancels (its exact gradient is zero). The configurations use smooth activations (gelu,
    swiglu) and d >= 4, s, t >= 2, so that no unit is dead and no softmax has a single key by chance.
    """
    case = data.draw(layer_cases(component, impl, activations=("gelu", "swiglu"), min_len=2, min_d=4), label="case")
    module = case.build(impl, device)
    x, memory = case.inputs(device)
    out = case.call(module, x, memory)
    backward((out * tensor(case.seed + 9, *out.shape, dtype=out.dtype, device=device)).sum(), module)
    problems = []
    for name, p in module.module.named_parameters():
        if p.grad is None:
            problems.append(f"{name}: no gradient")
        elif not torch.isfinite(p.grad).all():
            problems.append(f"{name}: non-finite gradient")
        elif p.dim() >= 2 and not p.grad.abs().sum() > 0:
            problems.append(f"{name}: zero gradient")
    assert_true(
        not problems, claim=f"{case}: every parameter receives a finite gradient (nonzero for matrices)",
        detail="; ".join(problems),
        hint="a parameter without gradient is unused (a norm built but another one applied) or cut off by "
        ".detach() / torch.no_grad().",
    )


@pytest.mark.requires("DecoderLayer", "KVCache", "RotaryEmbedding")
@given(data=st.data())
def test_cached_decoder_layer_equals_the_full_pass(impl, device, data):
    """A decoder-only layer with grouped-query attention and RoPE, run chunk by chunk with a KV cache
    (any split, one token at a time included), gives the outputs of one full pass.

    Hint: pass the cache to the self-attention; every other part of the layer is position-wise.
    """
    for option in ("n_kv_head", "rotary"):
        if not offers(impl, "DecoderLayer", option):
            pytest.skip(f"DecoderLayer of {impl} declares {option} unsupported")
    case = data.draw(layer_cases("DecoderLayer", impl, cached=True), label="case")
    chunks = data.draw(chunkings(case.s), label="chunks")
    module = case.build(impl, device)
    x, _ = case.inputs(device)
    config = {"batch_size": case.b, "n_kv_head": case.g, "head_dim": case.e, "capacity": case.s, "dtype": x.dtype,
              "device": device}
    try:
        cache = impl.raw("KVCache")(**config)
    except Exception as exc:  # noqa: BLE001 (any failure to build it is the implementation's)
        raise ComponentFailure(f"{impl}: {describe_call('KVCache', config)} raised {type(exc).__name__}: {exc}") from None
    pieces = [case.call(module, x[:, a:b], cache=cache) for a, b in split_points(case.s, chunks)]
    assert_close(
        torch.cat(pieces, dim=1), case.call(module, x), axes=AXES,
        claim=f"{case} with a KV cache equals the full pass (chunks {chunks})",
        hint="the layer's cache belongs to its self-attention: pass it there (cross-attention and the "
        "feed-forward work on each position alone).",
    )
