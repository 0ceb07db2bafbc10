"""Properties of the transformer layers: EncoderLayer and DecoderLayer (decoder-only and encoder-decoder).
Spec: spec/layers.py.

Options an implementation lacks
-------------------------------
Every configuration is drawn from what the implementation's layer offers (its ``spec_options``,
properties/options.py): a layer built as GPT-2's block (pre-norm, gelu, no cross-attention, no GQA, no
RoPE, no cache) is checked on exactly that, and the properties that need something else are skipped,
naming it (``@pytest.mark.needs``). Options a property does not draw take ``offers.default(option)``,
and the reference follows the same value. Our implementation, like the spec, offers every option.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import implementations
from properties.assertions import PRECISIONS, assert_close, assert_equal, assert_true
from properties.options import Offers, draws_options, narrowed
from properties.plugin import CheckedModule, ComponentFailure, Implementation, backward, describe_call, draw_parameters
from properties.strategies import Mask, chunkings, optional_padding, padding_masks, seeds, tensor
from spec import COMPONENTS
from spec.kv_cache import split_points
from spec.layers import decoder_layer, encoder_layer

OURS = Implementation("ours", implementations)
LAYERS = ["EncoderLayer", "DecoderLayer"]
AXES = "b s d"


def relu_or_gelu(activation: str) -> bool:
    """relu or gelu"""
    return activation in ("relu", "gelu")


def smooth(activation: str) -> bool:
    """gelu or swiglu (smooth: no unit is dead everywhere)"""
    return activation in ("gelu", "swiglu")


def positive(p: float) -> bool:
    """a positive probability"""
    return p > 0


@dataclass(frozen=True)
class LayerCase:
    """One layer configuration, sizes named by the shape glossary (t = memory length), with its options."""

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
    eps: float = 1e-5
    bias: bool = True
    dropout: float = 0.0
    cross: bool = False  # DecoderLayer with cross-attention over a memory
    norm: str = "layer"
    g: int | None = None  # n_kv_head (DecoderLayer only; None: the keyword is not passed)
    rope: tuple[float, str] | None = None  # (base, pairing) of a RotaryEmbedding (DecoderLayer only)

    @property
    def d(self) -> int:
        return self.h * self.e

    @property
    def decoder(self) -> bool:
        return self.component == "DecoderLayer"

    def config(self) -> dict[str, Any]:
        """The constructor's keywords: every option's value, default or drawn (build drops the ones the
        implementation has built in), and n_kv_head only where drawn."""
        kw: dict[str, Any] = {"d_model": self.d, "n_head": self.h, "d_ff": self.f, "norm_first": self.norm_first,
                              "activation": self.activation, "eps": self.eps, "bias": self.bias,
                              "dropout": self.dropout}
        if self.decoder:
            kw |= {"cross_attention": self.cross, "norm": self.norm}
            if self.g is not None:
                kw["n_kv_head"] = self.g
        return kw

    def build(self, impl: Implementation, device="cpu", dtype=torch.float64, **kw) -> CheckedModule:
        __tracebackhide__ = True
        extra: dict[str, Any] = {}
        if self.rope is not None:  # the implementation's own RotaryEmbedding, built as it offers
            extra["rotary"] = impl.build("RotaryEmbedding", seed=self.seed, device=device, dtype=dtype,
                                         head_dim=self.e, base=self.rope[0], pairing=self.rope[1]).module
        return impl.build(self.component, seed=self.seed, device=device, dtype=dtype, **self.config(), **extra, **kw)

    def canonical_parameters(self) -> dict[str, Tensor]:
        return draw_parameters(COMPONENTS[self.component].parameters(**self.config()), self.seed)

    def inputs(self, device="cpu", dtype=torch.float64) -> tuple[Tensor, Tensor | None]:
        x = tensor(self.seed + 1, self.b, self.s, self.d, dtype=dtype, device=device)
        memory = tensor(self.seed + 2, self.b, self.t, self.d, dtype=dtype, device=device) if self.cross else None
        return x, memory

    def call(self, module, x: Tensor, memory: Tensor | None = None, *, keep=None, memory_keep=None,
             cache=None) -> Tensor:
        """Call with key padding masks (b, s) / (b, t) (numpy or tensor, True = real token), or None;
        only the arguments given are passed."""
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
        params = module.canonical_numpy()
        as_np = lambda a: None if a is None else a.detach().double().cpu().numpy()
        key_mask = lambda k: None if k is None else np.asarray(k)[:, None, None, :]
        if not self.decoder:
            return encoder_layer(params, as_np(x), n_head=self.h, norm_first=self.norm_first,
                                 activation=self.activation, eps=self.eps, mask=key_mask(keep))
        rope = None if self.rope is None else {"base": self.rope[0], "pairing": self.rope[1]}
        return decoder_layer(params, as_np(x), as_np(memory), n_head=self.h, n_kv_head=self.g,
                             cross_attention=self.cross, norm_first=self.norm_first, activation=self.activation,
                             norm=self.norm, eps=self.eps, mask=key_mask(keep), memory_mask=key_mask(memory_keep),
                             rope=rope)

    def __repr__(self) -> str:
        opts = [f"norm_first={self.norm_first}", f"activation={self.activation}"]
        if self.decoder:
            opts.append(f"cross_attention={self.cross}")
            opts += [f"norm={self.norm}"] if self.norm != "layer" else []
            opts += [f"n_kv_head={self.g}"] if self.g is not None else []
            opts += [f"rotary(base={self.rope[0]}, pairing={self.rope[1]})"] if self.rope is not None else []
        opts += [f"eps={self.eps:g}"] if self.eps != 1e-5 else []
        opts += ["bias=False"] if not self.bias else []
        opts += [f"dropout={self.dropout}"] if self.dropout else []
        sizes = f"b={self.b}, s={self.s}" + (f", t={self.t}" if self.cross else "")
        return f"{self.component}({', '.join(opts)}; {sizes}, h={self.h}, e={self.e}, d={self.d}, f={self.f})"


def _rope_values(rope: Offers | None, option: str, spec_values: tuple) -> tuple:
    """RotaryEmbedding's offered values of ``option`` (its spec may not list the option: then ours)."""
    if rope is None or option not in rope.values:
        return spec_values
    return rope.offered(option)


_DRAWN = dict(norm_first=lambda c: c.norm_first, activation=lambda c: c.activation, eps=lambda c: c.eps,
              bias=lambda c: c.bias)


@draws_options("EncoderLayer", **_DRAWN)
@draws_options("DecoderLayer", **_DRAWN, norm=lambda c: c.norm, cross_attention=lambda c: c.cross,
               n_kv_head=lambda c: c.g is not None, rotary=lambda c: c.rope is not None)
@st.composite
def layer_cases(
    draw,
    offers: Offers,
    *,
    norm_first: bool | None = None,
    cross: bool | None = None,
    activation: Callable[[str], bool] | None = None,
    dropout: float | None = None,
    min_len: int = 1,
    min_d: int = 2,
    min_b: int = 1,
    rope: Offers | None = None,
    cached: bool = False,
) -> LayerCase:
    """A small configuration of the offers' layer, with the options it offers.

    norm_first, cross: a value the property needs (with ``needs``), or None to draw the offered ones.
    activation:        a predicate the drawn activation must satisfy (``needs(activation=...)`` on the
                       property), or None for any offered one.
    dropout:           the dropout probability (None: ``offers.default("dropout")``).
    rope:              RotaryEmbedding's offers (its base and pairing), or None for the spec's.
    cached:            grouped-query attention and RoPE wherever offered (the paths a KV cache must get right).
    Sizes: b <= 2, s, t <= 5, h <= 2, e <= 4, f <= 16, d >= min_d; e is even when RoPE may be drawn.
    d >= 2 by default: over one feature a LayerNorm returns its bias whatever the input (a pinned corner
    case the norm properties check), so a layer of width 1 would test nothing else, and a norm convention
    at d = 1 (unbiased variance: 0/0) would hide every other claim.
    """
    decoder = offers.component == "DecoderLayer"
    b = draw(st.integers(min_b, 2), label="b")
    s = draw(st.integers(min_len, 5), label="s")
    h = draw(st.integers(1, 2), label="h")
    if decoder and (not offers.offers("rotary", False) or (cached and offers.offers("rotary"))):
        e = 2 * draw(st.integers(max(1, -(-min_d // (2 * h))), 2), label="e/2")  # RoPE always: even widths
    else:
        e = draw(st.integers(max(1, -(-min_d // h)), 4), label="e")
    f = draw(st.integers(1, 16), label="f")
    if norm_first is None:
        norm_first = draw(offers.strategy("norm_first"), label="norm_first")
    activations = offers.offered("activation") if activation is None else offers.where("activation", activation)
    case = LayerCase(
        offers.component, b=b, s=s, t=s, h=h, e=e, f=f, seed=draw(seeds(), label="seed"), norm_first=norm_first,
        activation=draw(st.sampled_from(activations), label="activation"),
        eps=draw(offers.strategy("eps"), label="eps"), bias=draw(offers.strategy("bias"), label="bias"),
        dropout=offers.default("dropout") if dropout is None else dropout,
    )
    if not decoder:
        return case
    if cross is None:
        cross = draw(offers.strategy("cross_attention"), label="cross_attention")
    t = draw(st.integers(min_len, 5), label="t") if cross else s
    norm = draw(offers.strategy("norm"), label="norm")
    g = None
    prefer = lambda option: st.just(True) if cached and offers.offers(option) else offers.strategy(option)
    if draw(prefer("n_kv_head"), label="grouped_kv"):
        g = draw(st.sampled_from([k for k in range(1, h + 1) if h % k == 0]), label="n_kv_head")
    rotary = None
    if e % 2 == 0 and draw(prefer("rotary"), label="rotary"):
        rotary = (draw(st.sampled_from(_rope_values(rope, "base", (10000.0, 10.0))), label="rope_base"),
                  draw(st.sampled_from(_rope_values(rope, "pairing", ("adjacent", "half"))), label="rope_pairing"))
    return replace(case, t=t, cross=cross, norm=norm, g=g, rope=rotary)


def cases(impl: Implementation, component: str, **kwargs) -> st.SearchStrategy[LayerCase]:
    """layer_cases for ``impl``'s layer. RoPE is drawn only where the implementation also provides
    RotaryEmbedding (the layer takes one as ``rotary``)."""
    offers = impl.offers(component)
    if component != "DecoderLayer":
        return layer_cases(offers, **kwargs)
    if not impl.provides("RotaryEmbedding"):
        if not offers.offers("rotary", False):
            pytest.skip(f"{offers.describe('rotary')}, and {impl.missing_reason('RotaryEmbedding')}")
        return layer_cases(narrowed(offers, rotary=False), **kwargs)
    return layer_cases(offers, rope=impl.offers("RotaryEmbedding"), **kwargs)


# The shared strategy properties/strategies.optional_padding draws this family's padding-mask options;
# registered here so that the option meta test checks it per component.
draws_options("EncoderLayer", kwargs={"b": 2, "n": 3}, mask=lambda keep: keep is not None)(optional_padding)
draws_options("DecoderLayer", kwargs={"b": 2, "n": 3}, mask=lambda keep: keep is not None)(optional_padding)
draws_options("DecoderLayer", kwargs={"b": 2, "n": 3, "option": "memory_mask"},
              memory_mask=lambda keep: keep is not None)(optional_padding)


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
    """The layer's output equals the spec's float64 reference with the same weights, in every offered
    configuration (post-norm and pre-norm, activations, norms, eps, biases, GQA, RoPE, cross-attention),
    padding masks included (float32 and half precision by the error-ratio rule against ours in the same
    dtype). The model width is at least 2 (over one feature a LayerNorm ignores its input), and below
    float64 at least 4: a LayerNorm over two features is nearly sign(x1 - x2), so ill-conditioned that
    rounding luck, not the implementation, would decide.

    Hint: post-norm is N(x + Sublayer(x)); pre-norm is x + Sublayer(N(x)); the decoder's self-attention is
    causal and its cross-attention reads keys and values from the memory.
    """
    offers = impl.offers(component)
    case = data.draw(cases(impl, component, min_d=2 if dtype == torch.float64 else 4), label="case")
    keep = data.draw(optional_padding(offers, case.b, case.s), label="keep")
    memory_keep = data.draw(optional_padding(offers, case.b, case.t, "memory_mask"), label="memory_keep") \
        if case.cross else None
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
        "only), that every sublayer adds to the residual stream once, the norms' eps, that bias=False removes "
        "every bias, and the mask polarity (True = may attend).",
    )


def torch_layer_like(case: LayerCase, p: dict[str, Tensor]) -> nn.Module:
    """PyTorch's own layer for ``case`` (float64, eval, dropout 0) with the canonical weights ``p``."""
    kwargs = {"dim_feedforward": case.f, "dropout": 0.0, "activation": case.activation, "layer_norm_eps": case.eps,
              "batch_first": True, "norm_first": case.norm_first, "bias": case.bias, "dtype": torch.float64}
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
            mha.out_proj.weight.copy_(p[f"{prefix}.o.weight"])
            if case.bias:
                mha.in_proj_bias.copy_(torch.cat([p[f"{prefix}.{n}.bias"] for n in "qkv"]))
                mha.out_proj.bias.copy_(p[f"{prefix}.o.bias"])
        for ours, theirs in (*norms.items(), ("ff.up", layer.linear1), ("ff.down", layer.linear2)):
            theirs.weight.copy_(p[f"{ours}.weight"])
            if case.bias:
                theirs.bias.copy_(p[f"{ours}.bias"])
    return layer.eval()


def torch_offers(offers: Offers) -> Offers:
    """``offers`` narrowed to what nn.Transformer*Layer also offers: relu or gelu, LayerNorm, no GQA, no RoPE."""
    values: dict[str, Any] = {"activation": offers.where("activation", relu_or_gelu)}
    if offers.component == "DecoderLayer":
        values |= {"norm": "layer", "n_kv_head": False, "rotary": False}
    return narrowed(offers, **values)


@pytest.mark.needs(activation=relu_or_gelu)
@pytest.mark.needs("DecoderLayer", norm="layer", n_kv_head=False, rotary=False)
@pytest.mark.parametrize("norm_first", [pytest.param(False, marks=pytest.mark.needs(norm_first=False)),
                                        pytest.param(True, marks=pytest.mark.needs(norm_first=True))])
@pytest.mark.parametrize("component", LAYERS)
@given(data=st.data())
def test_layer_agrees_with_torch_transformer_layer(impl, component, norm_first, data):
    """The layer equals ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` (batch_first,
    float64, eval, dropout 0) with the weights transferred from its canonical parameters, in every
    configuration both offer (eps, bias=False included); a decoder-only layer equals
    nn.TransformerEncoderLayer with a causal mask. Padding goes in as torch's key padding masks
    (True = padding)."""
    offers = torch_offers(impl.offers(component))
    case = data.draw(layer_cases(offers, norm_first=norm_first), label="case")
    keep = data.draw(optional_padding(offers, case.b, case.s), label="keep")
    memory_keep = data.draw(optional_padding(offers, case.b, case.t, "memory_mask"), label="memory_keep") \
        if case.cross else None
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
    offers = impl.offers("EncoderLayer")
    case = data.draw(cases(impl, "EncoderLayer"), label="case")
    keep = data.draw(optional_padding(offers, case.b, case.s), label="keep")
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


@pytest.mark.needs(mask=True)
@pytest.mark.parametrize("component", LAYERS)
@given(data=st.data())
def test_layer_padding_does_not_change_real_positions(impl, device, component, data):
    """The outputs at real positions do not depend on the content of padded positions nor on how much
    padding follows them (the same sequences padded to two lengths, with different pad content); for an
    encoder-decoder layer that takes memory_mask the memory is padded the same way.

    Hint: pass the padding as a key mask, True = real token: mask[:, None, None, :] masks keys, not queries.
    """
    offers = impl.offers(component)
    case = data.draw(cases(impl, component), label="case")
    keep = data.draw(padding_masks(case.b, case.s), label="keep")  # lengths <= s
    pad_memory = case.cross and offers.offers("memory_mask")
    memory_keep = data.draw(padding_masks(case.b, case.t), label="memory_keep") if pad_memory else None
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
        memory, mk = (padded(m_all, memory_keep, case.t, more, case.seed + 20 + i) if pad_memory
                      else (m_all[:, : case.t] if case.cross else None, None))
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


@pytest.mark.needs(dropout=positive)
@pytest.mark.parametrize("component", LAYERS)
@given(data=st.data())
def test_layer_eval_mode_is_deterministic(impl, device, component, data):
    """In eval mode, with dropout > 0, two calls on the same input give identical outputs.

    Hint: use nn.Dropout (or F.dropout(..., training=self.training)): dropout acts in training mode only.
    """
    p = data.draw(st.sampled_from(impl.offers(component).where("dropout", positive)), label="dropout")
    case = data.draw(cases(impl, component, dropout=p), label="case")
    module = case.build(impl, device)
    x, memory = case.inputs(device)
    assert_equal(
        case.call(module, x, memory), case.call(module, x, memory), axes=AXES,
        claim=f"{case} in eval mode gives the same output twice",
        hint="F.dropout(x, p) defaults to training=True; pass training=self.training or use nn.Dropout.",
    )


@pytest.mark.needs(dropout=0.0)
@pytest.mark.parametrize("component", LAYERS)
@given(data=st.data())
def test_layer_train_mode_equals_eval_mode_without_dropout(impl, device, component, data):
    """With dropout 0, train mode computes exactly what eval mode computes: nothing else may depend on it.

    Hint: LayerNorm normalises each position over its features, in both modes; BatchNorm uses batch
    statistics in training and running ones in eval; and the layer must use the dropout it is given.
    """
    case = data.draw(cases(impl, component, dropout=0.0, min_b=2), label="case")
    module = case.build(impl, device)
    x, memory = case.inputs(device)
    evaluated = case.call(module, x, memory)
    module.module.train()
    assert_equal(
        case.call(module, x, memory), evaluated, axes=AXES,
        claim=f"{case} with dropout 0 computes the same in train and eval mode",
        hint="only dropout may behave differently in training (with the probability passed in, not a "
        "hard-coded one); normalise with LayerNorm, not BatchNorm.",
    )


# ---------------------------------------------------------------------------------------------------
# Structure


def zero_output_projections(params: dict[str, Tensor]) -> dict[str, Tensor]:
    zeroed = ("self_attn.o.", "cross_attn.o.", "ff.down.")
    return {k: torch.zeros_like(v) if k.startswith(zeroed) else v for k, v in params.items()}


@pytest.mark.needs(norm_first=True)
@pytest.mark.parametrize("component", LAYERS)
@given(data=st.data())
def test_pre_norm_layer_with_zero_output_projections_is_identity(impl, device, component, data):
    """A pre-norm layer whose sublayers' output projections (self_attn.o, cross_attn.o, ff.down) are zero
    returns its input exactly: each sublayer adds zero to a residual stream that is never normalised.

    Hint: pre-norm is x + Sublayer(N(x)): normalise the sublayer's input, not the stream itself, and add
    each sublayer's output once.
    """
    case = data.draw(cases(impl, component, norm_first=True), label="case")
    module = case.build(impl, device, params=zero_output_projections(case.canonical_parameters()))
    x, memory = case.inputs(device)
    assert_equal(
        case.call(module, x, memory), x, axes=AXES,
        claim=f"{case} with zero output projections is the identity",
        hint="the residual stream x must pass through untouched: x + Sublayer(N(x)), never N(x) + ... or 2x.",
    )


@pytest.mark.requires("DecoderLayer")
@pytest.mark.parametrize("cross_attention", [
    pytest.param(False, marks=pytest.mark.needs(cross_attention=False)),
    pytest.param(True, marks=pytest.mark.needs(cross_attention=True)),
])
@given(data=st.data())
def test_decoder_layer_is_causal(impl, device, cross_attention, data):
    """The decoder layer's output at position p does not depend on its inputs after p (exactly), both
    decoder-only and with cross-attention over a fixed memory.

    Hint: the self-attention must be causal (mask keys j > i), whatever mask the caller passes.
    """
    case = data.draw(cases(impl, "DecoderLayer", cross=cross_attention), label="case")
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
@pytest.mark.needs(cross_attention=True)
@given(data=st.data())
def test_decoder_layer_depends_on_every_unmasked_memory_position_only(impl, device, data):
    """Changing one memory position changes every output position if that memory position is unmasked,
    and changes nothing (exactly) if it is masked (where the layer takes memory_mask; otherwise every
    memory position is unmasked).

    Hint: keys and values of the cross-attention come from the memory, and memory_mask must reach it.
    """
    case = data.draw(cases(impl, "DecoderLayer", cross=True, min_d=4), label="case")
    if impl.offers("DecoderLayer").offers("memory_mask"):
        rows = data.draw(st.lists(st.lists(st.booleans(), min_size=case.t, max_size=case.t), min_size=case.b,
                                  max_size=case.b), label="memory_keep_rows")
        memory_keep = np.array(rows, dtype=bool).reshape(case.b, case.t)
        memory_keep[:, data.draw(st.integers(0, case.t - 1), label="always_kept")] = True
        memory_keep = memory_keep.view(Mask)
    else:
        memory_keep = None
    real = np.ones((case.b, case.t), dtype=bool) if memory_keep is None else np.asarray(memory_keep)
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
        kept = torch.as_tensor(real[:, j], device=change.device)
        masked_change = change[~kept]
        assert_equal(masked_change, torch.zeros_like(masked_change), claim=claim,
                     hint=hint + f" (memory position {j} is masked in some batch elements and changed the output)")
        assert_true(bool((change[kept] > 0).all()), claim=claim,
                    detail=f"changing unmasked memory position {j} left some output positions unchanged",
                    hint=hint)


# ---------------------------------------------------------------------------------------------------
# Gradients and the KV cache


@pytest.mark.needs(activation=smooth)
@pytest.mark.parametrize("component", LAYERS)
@given(data=st.data())
def test_every_layer_parameter_gets_a_finite_gradient(impl, device, component, data):
    """Backpropagating a loss reaches every parameter with a finite gradient, nonzero for every matrix.

    Only matrices must get a nonzero gradient: an attention's key bias adds q.b_k to every score of a row,
    which softmax cancels (its exact gradient is zero). The configurations use smooth activations (gelu,
    swiglu) and d >= 4, s, t >= 2, so that no unit is dead and no softmax has a single key by chance.
    The gradients are read from the module's own parameters, never from canonical views (a slice of a
    fused QKV weight has no ``.grad`` of its own).
    """
    case = data.draw(cases(impl, component, activation=smooth, min_len=2, min_d=4), label="case")
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


@pytest.mark.requires("DecoderLayer", "KVCache")
@pytest.mark.needs(cache=True)
@given(data=st.data())
def test_cached_decoder_layer_equals_the_full_pass(impl, device, data):
    """A decoder layer run chunk by chunk with a KV cache for its self-attention (any split, one token at a
    time included) gives the outputs of one full pass, with grouped-query attention and RoPE wherever the
    layer offers them, decoder-only or with cross-attention over a fixed memory.

    Hint: pass the cache to the self-attention; the cross-attention (recomputed from the memory) and the
    feed-forward work on each position alone.
    """
    case = data.draw(cases(impl, "DecoderLayer", cached=True), label="case")
    chunks = data.draw(chunkings(case.s), label="chunks")
    module = case.build(impl, device)
    x, memory = case.inputs(device)
    config = {"batch_size": case.b, "n_kv_head": case.h if case.g is None else case.g, "head_dim": case.e,
              "capacity": case.s, "dtype": x.dtype, "device": device}
    try:
        cache = impl.raw("KVCache")(**config)
    except Exception as exc:  # noqa: BLE001 (any failure to build it is the implementation's)
        raise ComponentFailure(f"{impl}: {describe_call('KVCache', config)} raised {type(exc).__name__}: {exc}") from None
    pieces = [case.call(module, x[:, a:b], memory, cache=cache) for a, b in split_points(case.s, chunks)]
    assert_close(
        torch.cat(pieces, dim=1), case.call(module, x, memory), axes=AXES,
        claim=f"{case} with a KV cache equals the full pass (chunks {chunks})",
        hint="the layer's cache belongs to its self-attention: pass it there (cross-attention and the "
        "feed-forward work on each position alone).",
    )
