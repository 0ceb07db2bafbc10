"""How the attention properties build and call each attention module, in one table.

The five modules differ in constructor keywords (SelfAttention has no n_head), in call signature
(CrossAttention takes a context and no causal flag) and in mask rank (SelfAttention's mask has no head
axis). Properties are written once against :class:`AttentionCase` and parametrized over the components.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import strategies as st
from torch import Tensor

import implementations
from properties.plugin import CheckedModule, Implementation
from properties.strategies import AttentionConfig, attention_configs, boolean_masks, seeds, tensor
from spec.attention import attention as reference_attention

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


@dataclass(frozen=True)
class AttentionCase:
    component: str
    cfg: AttentionConfig
    seed: int

    @property
    def cross(self) -> bool:
        return HEADS[self.component][1]

    @property
    def ctor(self) -> dict[str, int]:
        c = self.cfg
        if self.component == "SelfAttention":
            return {"d_model": c.d}
        if self.component == "GroupedQueryAttention":
            return {"d_model": c.d, "n_head": c.h, "n_kv_head": c.g}
        return {"d_model": c.d, "n_head": c.h}

    def build(self, impl: Implementation, device="cpu", dtype=torch.float64, **kw) -> CheckedModule:
        return impl.build(self.component, seed=self.seed, device=device, dtype=dtype, **self.ctor, **kw)

    def inputs(self, device="cpu", dtype=torch.float64) -> tuple[Tensor, Tensor | None]:
        c = self.cfg
        x = tensor(self.seed + 1, c.b, c.s, c.d, dtype=dtype, device=device)
        context = tensor(self.seed + 2, c.b, c.t, c.d, dtype=dtype, device=device) if self.cross else None
        return x, context

    def call(self, module, x: Tensor, context: Tensor | None = None, *, mask=None, causal=False) -> Tensor:
        """Call with a spec mask broadcastable to (b, h, s, t) (numpy or tensor); adapts it per module."""
        __tracebackhide__ = True
        if mask is not None:
            mask = torch.as_tensor(np.asarray(mask), device=x.device)
            if self.component == "SelfAttention":
                mask = mask[:, 0]  # (b, 1, s, t) -> (b, s, t): SelfAttention has no head axis
        kwargs = {} if mask is None else {"mask": mask}
        if self.cross:
            return module(x, context, **kwargs)
        if causal:
            kwargs["causal"] = True
        return module(x, **kwargs)

    def reference(self, module: CheckedModule, x, context=None, *, mask=None, causal=False) -> np.ndarray:
        params = {k: v.detach().double().cpu().numpy() for k, v in module.canonical_state().items()}
        return reference_attention(
            params,
            x.detach().double().cpu().numpy(),
            None if context is None else context.detach().double().cpu().numpy(),
            n_head=self.cfg.h,
            n_kv_head=self.cfg.g,
            mask=None if mask is None else np.asarray(mask),
            causal=causal,
        )

    def __repr__(self) -> str:
        return f"{self.component} {self.cfg}"


@st.composite
def attention_cases(
    draw, component: str, *, min_len: int = 1, max_len: int = 6, min_b: int = 1, even_head_dim: bool = False
):
    heads, cross = HEADS[component]
    cfg = draw(
        attention_configs(heads=heads, cross=cross, min_len=min_len, max_len=max_len, even_head_dim=even_head_dim),
        label="cfg",
    )
    if cfg.b < min_b:
        cfg = AttentionConfig(b=min_b, s=cfg.s, t=cfg.t, h=cfg.h, g=cfg.g, e=cfg.e)
    return AttentionCase(component, cfg, draw(seeds(), label="seed"))


def masks_for(case, data, *, allow_causal=True):
    """A mask (b, 1, s, t) or None, and a causal flag (never for cross-attention)."""
    c = case.cfg
    mask = data.draw(st.none() | boolean_masks((c.b, 1, c.s, c.t)), label="mask")
    causal = allow_causal and not case.cross and data.draw(st.booleans(), label="causal")
    return mask, causal
