"""Rotary position embedding (RoPE) in PyTorch. Spec: spec/rotary_embedding.py."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

__all__ = ["RotaryEmbedding"]

PAIRINGS = ("adjacent", "half")


class RotaryEmbedding(nn.Module):
    """Rotate pair i of every head vector of token j by the angle p_j * base^(-2i/e).

    pairing "adjacent" pairs dimensions (2i, 2i + 1) (Meta's Llama, RoFormer); "half" pairs (i, i + e/2)
    (GPT-NeoX, HF rotate_half). Positions are offset + arange(s), or offset + positions with positions (s,)
    (shared by the batch) or (b, s) (one row per sequence). No parameters and no buffers: the angles are
    recomputed on every call in float32 or float64, for any position (no table to outgrow), so
    ``module.to(torch.float16)`` cannot degrade them.
    """

    def __init__(self, *, head_dim: int, base: float = 10000.0, pairing: str = "adjacent") -> None:
        super().__init__()
        if head_dim <= 0 or head_dim % 2:
            raise ValueError(f"head_dim={head_dim} must be positive and even: RoPE rotates pairs of dimensions")
        if not base > 0:
            raise ValueError(f"base={base} must be positive")
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing={pairing!r} must be one of {PAIRINGS}")
        self.head_dim, self.base, self.pairing = head_dim, float(base), pairing

    def angles(self, x: Tensor, *, offset: int, positions: Tensor | None, dtype: torch.dtype) -> Tensor:
        """p * theta_i in ``dtype`` (float32 or float64): (s, e/2) for shared positions, (b, 1, s, e/2) for
        per-sequence positions (b, s), one row per sequence and the same for each of its heads."""
        b, s = x.shape[0], x.shape[-2]
        if positions is None:
            p = torch.arange(s, device=x.device, dtype=dtype)
        else:
            if tuple(positions.shape) not in ((s,), (b, s)):
                raise ValueError(
                    f"positions must have shape (s,) = ({s},) or (b, s) = ({b}, {s}), got {tuple(positions.shape)}"
                )
            p = positions.to(device=x.device, dtype=dtype)
        p = p + offset
        theta = self.base ** (-torch.arange(0, self.head_dim, 2, device=x.device, dtype=dtype) / self.head_dim)
        angle = p[..., None] * theta  # (s, e/2) or (b, s, e/2)
        return angle[:, None] if p.dim() == 2 else angle  # (b, s, e/2) -> (b, 1, s, e/2): shared by the heads

    def forward(self, x: Tensor, *, offset: int = 0, positions: Tensor | None = None) -> Tensor:
        e = x.shape[-1]
        if e != self.head_dim:
            raise ValueError(f"x has head width {e}, but this RotaryEmbedding was built for head_dim={self.head_dim}")
        # float32 at least: in float16 the angle p * theta_i is off by ~p * 5e-4 rad (spec: Precision).
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        angle = self.angles(x, offset=offset, positions=positions, dtype=compute)
        cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)  # (s, e/2) or (b, 1, s, e/2)
        if self.pairing == "adjacent":
            u, v = x[..., 0::2], x[..., 1::2]
        else:
            u, v = x[..., : e // 2], x[..., e // 2 :]
        ru, rv = u * cos - v * sin, u * sin + v * cos
        if self.pairing == "adjacent":
            return rearrange(torch.stack([ru, rv], dim=-1), "... i two -> ... (i two)")
        return torch.cat([ru, rv], dim=-1)
