"""How the attention properties build and call each attention module, in one table.

The five modules differ in constructor keywords (SelfAttention has no n_head), in call signature
(CrossAttention takes a context and no causal flag) and in mask rank (SelfAttention's mask has no head
axis). Properties are written once against :class:`AttentionCase` and parametrized over the components.

Every case is drawn from what the implementation offers (properties/options.py): its biases, whether it
takes a mask, whether it is causal, its GQA head grouping. General cases never contain a query row with
no allowed key: that pinned corner case has its own properties, so that one convention (zeros, NaN, a
uniform average) cannot hide every other check.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from hypothesis import strategies as st
from torch import Tensor

import implementations
from properties.options import Offers, draws_options
from properties.plugin import CheckedModule, Implementation
from properties.strategies import AttentionConfig, Mask, attention_configs, boolean_masks, seeds, tensor
from spec.attention import attention as reference_attention
from spec.sdpa import causal_mask

OURS = Implementation("ours", implementations)

# component -> (kind of heads drawn, takes a context)
HEADS = {
    "SelfAttention": ("single", False),
    "MultiHeadAttention": ("mha", False),
    "CrossAttention": ("mha", True),
    "MultiQueryAttention": ("mqa", False),
    "GroupedQueryAttention": ("gqa", False),
}
ATTENTION_MODULES = list(HEADS)
SELF_ATTENTION_MODULES = [c for c in HEADS if not HEADS[c][1]]


def round_robin_order(h: int, g: int) -> Tensor:
    """The query heads of a round-robin grouping (head i reads KV head i % g) in contiguous order: their
    head (j % r) * g + j // r reads the KV head that contiguous head j reads (j // r, r = h // g). The two
    groupings are one map up to this permutation of query heads."""
    r = h // g
    return torch.tensor([(j % r) * g + j // r for j in range(h)])


@dataclass(frozen=True)
class AttentionCase:
    """One attention module configuration and call: sizes, seed, options, mask and causal flag."""

    component: str
    cfg: AttentionConfig
    seed: int
    bias: bool = True
    mask: np.ndarray | None = None  # (b, 1, s, t), True = may attend
    causal: bool = False
    offers: Offers | None = field(default=None, compare=False, repr=False)

    @property
    def cross(self) -> bool:
        return HEADS[self.component][1]

    @property
    def grouping(self) -> str:
        """The GQA head mapping the implementation declares (the spec's is "contiguous")."""
        if self.offers is None or "head_grouping" not in self.offers.values:
            return "contiguous"
        return self.offers.default("head_grouping")

    @property
    def ctor(self) -> dict[str, int]:
        c = self.cfg
        if self.component == "SelfAttention":
            sizes = {"d_model": c.d}
        elif self.component == "GroupedQueryAttention":
            sizes = {"d_model": c.d, "n_head": c.h, "n_kv_head": c.g}
        else:
            sizes = {"d_model": c.d, "n_head": c.h}
        return {**sizes, "bias": self.bias}

    def build(self, impl: Implementation, device="cpu", dtype=torch.float64, **kw) -> CheckedModule:
        return impl.build(self.component, seed=self.seed, device=device, dtype=dtype, **self.ctor, **kw)

    def ours_params(self, module: CheckedModule) -> dict[str, Tensor]:
        """``module``'s canonical parameters arranged so that our implementation (contiguous groups)
        computes the same function: for a declared round-robin grouping, query head j of ours is head
        (j % r) * g + j // r of theirs (r = h // g), for the query rows and the output columns alike."""
        params = {k: v.detach().clone() for k, v in module.canonical_state().items()}
        if self.grouping == "contiguous":
            return params
        c = self.cfg
        order = round_robin_order(c.h, c.g)
        rows = (order[:, None] * c.e + torch.arange(c.e)).reshape(-1)  # head order -> feature order
        params["q.weight"] = params["q.weight"][rows]
        if "q.bias" in params:
            params["q.bias"] = params["q.bias"][rows]
        params["o.weight"] = params["o.weight"][:, rows]
        return params

    def inputs(self, device="cpu", dtype=torch.float64) -> tuple[Tensor, Tensor | None]:
        c = self.cfg
        x = tensor(self.seed + 1, c.b, c.s, c.d, dtype=dtype, device=device)
        context = tensor(self.seed + 2, c.b, c.t, c.d, dtype=dtype, device=device) if self.cross else None
        return x, context

    def call(self, module, x: Tensor, context: Tensor | None = None, *, mask=None, causal=False) -> Tensor:
        """Call with a spec mask broadcastable to (b, h, s, t) (numpy or tensor); adapts it per module.
        ``causal`` is always passed to self-attention (the wrapper drops it where it is built in)."""
        __tracebackhide__ = True
        kwargs = {}
        if mask is not None:
            mask = torch.as_tensor(np.asarray(mask), device=x.device)
            if self.component == "SelfAttention":
                mask = mask[:, 0]  # (b, 1, s, t) -> (b, s, t): SelfAttention has no head axis
            kwargs["mask"] = mask
        if self.cross:
            return module(x, context, **kwargs)
        return module(x, causal=causal, **kwargs)

    def reference(self, module: CheckedModule, x, context=None, *, mask=None, causal=False) -> np.ndarray:
        params = module.canonical_numpy()
        return reference_attention(
            params,
            x.detach().double().cpu().numpy(),
            None if context is None else context.detach().double().cpu().numpy(),
            n_head=self.cfg.h,
            n_kv_head=self.cfg.g,
            mask=None if mask is None else np.asarray(mask),
            causal=causal,
            grouping=self.grouping,
        )

    def __repr__(self) -> str:
        options = "" if self.bias else ", bias=False"
        return f"{self.component} {self.cfg}{options}"

    def _repr_pretty_(self, printer, cycle) -> None:
        """How Hypothesis prints a falsifying case: sizes, options, mask and causal flag on one line."""
        mask = "" if self.mask is None else f", mask={self.mask!r}"
        printer.text(f"{self!r}, causal={self.causal}{mask}, seed={self.seed}")


def no_empty_rows(mask: np.ndarray, *, causal: bool, s: int, t: int) -> np.ndarray:
    """``mask`` with every query row given at least one allowed key: where a row would be empty, its
    diagonal key x + t - s is allowed, which causal alignment always allows (self-attention: t = s);
    without causal any key would do, and the diagonal clipped into 0 .. t - 1 is one."""
    mask = np.array(mask, dtype=bool)
    allowed = mask & causal_mask(s, t) if causal else mask
    empty = ~allowed.any(-1)  # (b, h|1, s)
    rows = np.nonzero(empty)
    mask[(*rows, np.clip(rows[-1] + (t - s), 0, t - 1))] = True
    return mask.view(Mask)


@draws_options(
    "MultiHeadAttention",
    kwargs={"component": "MultiHeadAttention"},
    bias=lambda case: case.bias,
    mask=lambda case: case.mask is not None,
    causal=lambda case: case.causal,
)
@st.composite
def attention_cases(
    draw, offers: Offers, *, component: str | None = None, min_len: int = 1, max_len: int = 6, min_b: int = 1,
    even_head_dim: bool = False, heads: str | None = None, masks: bool = True, causal: bool | None = None,
):
    """A configuration of ``component`` (default: the offers' component) that the implementation offers.

    masks:  draw a mask where the implementation takes one (never one with an empty query row).
    causal: None draws the flag from the offers; True/False fixes it (the property then ``needs`` it).
    heads:  override the kind of heads drawn (see strategies.attention_configs).
    """
    component = component or offers.component
    kind, cross = HEADS[component]
    cfg = draw(
        attention_configs(heads=heads or kind, cross=cross, min_len=min_len, max_len=max_len,
                          even_head_dim=even_head_dim),
        label="cfg",
    )
    if cfg.b < min_b:
        cfg = AttentionConfig(b=min_b, s=cfg.s, t=cfg.t, h=cfg.h, g=cfg.g, e=cfg.e)
    bias = draw(offers.strategy("bias"), label="bias")
    is_causal = False
    if not cross:
        is_causal = draw(offers.strategy("causal"), label="causal") if causal is None else causal
    mask = None
    if masks and offers.offers("mask", True):
        drawn = draw((st.none() if offers.offers("mask", False) else st.nothing())
                     | boolean_masks((cfg.b, 1, cfg.s, cfg.t)), label="mask")
        mask = None if drawn is None else no_empty_rows(drawn, causal=is_causal, s=cfg.s, t=cfg.t)
    return AttentionCase(component, cfg, draw(seeds(), label="seed"), bias=bias, mask=mask, causal=is_causal,
                         offers=offers)
