"""Hypothesis strategies: configurations drawn small, tensors drawn from seeds.

Shapes and configurations are drawn by Hypothesis, so a failure shrinks to the smallest configuration.
Tensor *values* come from a drawn seed through a ``torch.Generator`` (float64 on the CPU, then cast and
moved), so a failure replays exactly and the same seed gives the same values on every device and dtype.
Magnitudes stay near 1: at |score| >> 10 softmax turns one-hot and masks stop mattering, hiding bugs.

Valid configurations are built directly (draw heads and head width, then multiply) instead of filtered,
so no health check needs silencing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import settings
from hypothesis import strategies as st
from torch import Tensor


def seeds() -> st.SearchStrategy[int]:
    """Seeds for tensor values and parameters."""
    return st.integers(min_value=0, max_value=2**32 - 1)


def tensor(seed: int, *shape: int, dtype: torch.dtype, device: str | torch.device, scale: float = 1.0) -> Tensor:
    """A standard-normal tensor (times ``scale``) from ``seed``: identical values on every device."""
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)


@dataclass(frozen=True)
class AttentionConfig:
    """Sizes of one attention call, named by the shape glossary (spec/__init__.py).

    b batch, s query positions, t key positions, h query heads, g key/value heads, e head width.
    """

    b: int
    s: int
    t: int
    h: int
    g: int
    e: int

    @property
    def d(self) -> int:
        return self.h * self.e

    def __repr__(self) -> str:
        return f"AttentionConfig(b={self.b}, s={self.s}, t={self.t}, h={self.h}, g={self.g}, e={self.e}, d={self.d})"


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


@st.composite
def attention_configs(
    draw,
    *,
    heads: str = "mha",
    cross: bool = False,
    max_b: int = 2,
    max_len: int = 6,
    max_h: int = 4,
    max_e: int = 4,
    min_len: int = 1,
    even_head_dim: bool = False,
) -> AttentionConfig:
    """Attention sizes.

    heads:  "single" (h = g = 1), "mha" (g = h), "mqa" (g = 1), "gqa" (any g dividing h, h >= 2)
            or "grouped" (g a proper divisor of h, 1 < g < h, so the head mapping matters).
    cross:  keys come from another sequence, so t is drawn apart from s; otherwise t = s.
    even_head_dim: draw an even head width (RoPE rotates pairs of dimensions).
    """
    b = draw(st.integers(1, max_b), label="b")
    s = draw(st.integers(min_len, max_len), label="s")
    t = draw(st.integers(min_len, max_len), label="t") if cross else s
    if heads == "single":
        h = g = 1
    elif heads == "grouped":
        # h with a divisor strictly between 1 and h: 4 (g=2) or 6 (g=2, 3).
        h = draw(st.sampled_from([4, 6]), label="h")
        g = draw(st.sampled_from([k for k in _divisors(h) if 1 < k < h]), label="g")
    else:
        h = draw(st.integers(2 if heads == "gqa" else 1, max_h), label="h")
        g = {"mha": h, "mqa": 1}.get(heads) or draw(st.sampled_from(_divisors(h)), label="g")
    e = 2 * draw(st.integers(1, max_e // 2), label="e/2") if even_head_dim else draw(st.integers(1, max_e), label="e")
    return AttentionConfig(b=b, s=s, t=t, h=h, g=g, e=e)


class Mask(np.ndarray):
    """A boolean numpy mask that prints as rows of 1/0, so a failure report shows it in one line."""

    def __repr__(self) -> str:
        a = np.asarray(self)
        rows = a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1)
        return f"mask{a.shape}[" + " ".join("".join("1" if x else "0" for x in r) for r in rows) + "]"

    __str__ = __repr__


def boolean_masks(shape: tuple[int, ...]) -> st.SearchStrategy[np.ndarray]:
    """Any boolean mask of ``shape`` (True = may attend); shrinks towards all True.

    Drawn as one integer whose set bits are the masked-out entries: a single draw (``arrays`` of booleans
    costs a draw per entry, the suite's largest overhead), and shrinking the integer towards 0 shrinks the
    mask towards "everything allowed".
    """
    n = int(np.prod(shape))

    def unpack(bits: int) -> np.ndarray:
        hidden = np.array([(bits >> i) & 1 for i in range(n)], dtype=bool)
        return (~hidden).reshape(shape).view(Mask)

    return st.integers(0, 2**n - 1).map(unpack)


@st.composite
def padding_masks(draw, b: int, t: int) -> np.ndarray:
    """Key padding masks (b, t), True = real token, each row with at least one real key at the front.

    Real tokens come first and padding last (right padding), the layout tokenizers produce.
    """
    lengths = draw(st.lists(st.integers(1, t), min_size=b, max_size=b), label="lengths")
    return (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).view(Mask)


def optional_padding(offers, b: int, n: int, option: str = "mask") -> st.SearchStrategy[np.ndarray | None]:
    """No mask, or a right-padding mask (b, n) (True = real token, padding_masks) where the component under
    test takes ``option`` (mask, src_mask, tgt_mask, memory_mask: an "input" option of its offers)."""
    return offers.strategy(option).flatmap(lambda given: padding_masks(b, n) if given else st.none())


def as_mask(mask: np.ndarray | None, device: str | torch.device) -> Tensor | None:
    """A drawn numpy mask as a bool tensor on ``device``; None stays None (no mask given)."""
    return None if mask is None else torch.as_tensor(np.asarray(mask), dtype=torch.bool, device=device)


@st.composite
def sequence_shapes(draw, *, max_b: int = 2, max_s: int = 4, min_d: int = 1, max_d: int = 6) -> tuple[int, int, int]:
    """(b, s, d) for position-wise layers (norms, feed-forward): batch, positions, model width, drawn small."""
    b = draw(st.integers(1, max_b), label="b")
    s = draw(st.integers(1, max_s), label="s")
    d = draw(st.integers(min_d, max_d), label="d")
    return b, s, d


@st.composite
def chunkings(draw, total: int) -> list[int]:
    """Ways to cut ``total`` positions into consecutive chunks (a prefill, then more), e.g. 6 -> [3, 1, 2].

    Shrinks towards one chunk; one token at a time ([1] * total) is drawn explicitly now and then.
    """
    if total > 1 and draw(st.booleans(), label="one_token_at_a_time"):
        return [1] * total
    cuts = draw(st.sets(st.integers(1, total - 1), max_size=total - 1), label="cuts") if total > 1 else set()
    bounds = [0, *sorted(cuts), total]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def fewer_examples(divisor: int = 2) -> settings:
    """``@fewer_examples()`` on a property whose claim is structural (a dtype kept, a size refused, bytes
    stored) and met alike by every configuration: the loaded profile's example count over ``divisor``, at
    least 3. Read when the test module is imported (after the profile is loaded), so the thorough profile
    still deepens such a property, which a fixed ``@settings(max_examples=5)`` would not."""
    return settings(max_examples=max(3, settings.default.max_examples // divisor))
