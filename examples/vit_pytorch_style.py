"""A vision transformer written the way lucidrains' vit-pytorch writes one, and plugged into the suite:

    pytest -n 2 -q --impl examples/vit_pytorch_style.py

The layout is vit-pytorch's: patches cut with einops' ``Rearrange('b c (h p1) (w p2) -> b (h w) (p1 p2 c)')``
and projected by an ``nn.Linear``; a class token and a learned position table (``pos_embedding``); a
``Transformer`` whose layers are bare ``ModuleList([Attention, FeedForward])`` pairs, each sublayer holding
its own pre-norm ``nn.LayerNorm`` (``x = attn(x) + x``), attention with one fused ``to_qkv`` projection, a
GELU feed-forward in an ``nn.Sequential``, a final norm, and ``mlp_head``.

It is correct in its own configuration, which is narrower than the spec's option space:

* the patch Linear reads a patch's pixels in (p1, p2, c) order, channel fastest, where the spec's
  (d, ch, p, p) weight (nn.Conv2d's layout) reads them channel slowest: the same map with the weight's
  columns permuted. ``PatchEmbedding.canonical_state_dict`` hands out the canonical weight as a permuted
  view of the Linear's, so loading writes into it and gradients are read through it;
* always a class token, always learned positions (``class_token=True``, ``positions="learned"``);
* ``pool="cls"`` only: vit-pytorch's ``pool="mean"`` is ``x.mean(dim=1)``, which averages the class token
  in with the patch tokens. The spec's mean pooling averages the patch tokens alone (timm's
  ``global_pool="avg"``), so that option is another function and is not offered;
* ``nn.LayerNorm`` with its default eps, 1e-5 (the spec's ViT convention is 1e-6), and ``nn.GELU()``, the
  exact erf form (the spec's activation).

* ``to_qkv`` without a bias, as vit-pytorch writes it: ``qkv_bias=False`` (the spec's default is timm's
  biased q, k, v).

One departure from vit-pytorch, because the spec's ViT has no switch for it: the output projection is
always there (vit-pytorch replaces it with ``nn.Identity()`` when there is one head as wide as the model).
``canonical_names`` and ``canonical_state_dict`` map the parameters to the spec's names (README,
"Parameter names"); ``SPEC_COMPONENTS`` says which class is which spec component.
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from einops.layers.torch import Rearrange
from torch import Tensor, nn

LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, used by every norm below


def pair(t):
    return t if isinstance(t, tuple) else (t, t)


class PatchEmbedding(nn.Module):
    """Cut (b, c, H, W) images into p x p patches, flatten each as (p1 p2 c), project it to dim."""

    def __init__(self, *, image_size: int, patch_size: int, channels: int, d_model: int) -> None:
        super().__init__()
        image_height, image_width = pair(image_size)
        patch_height, patch_width = pair(patch_size)
        if patch_height <= 0 or image_height <= 0 or image_height % patch_height or image_width % patch_width:
            # vit-pytorch asserts this; a ValueError that names the sizes is what the spec asks for.
            raise ValueError(f"image_size={image_size} must be a positive multiple of patch_size={patch_size}")
        self.image_size, self.patch_size, self.channels = image_height, patch_height, channels
        patch_dim = channels * patch_height * patch_width
        self.to_patches = Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_height, p2=patch_width)
        self.linear = nn.Linear(patch_dim, d_model)

    # The spec's proj.weight is (d, ch, p, p); this Linear's columns run (p1, p2, c). Hand out a permuted view:
    # writing the canonical weight into it fills the Linear, and its gradient is the Linear's, permuted.
    def canonical_state_dict(self) -> dict[str, Tensor]:
        p = self.patch_size
        return {"proj.weight": rearrange(self.linear.weight, "d (p1 p2 c) -> d c p1 p2", p1=p, p2=p),
                "proj.bias": self.linear.bias}

    def load_canonical_state_dict(self, params: dict[str, Tensor]) -> None:
        for name, view in self.canonical_state_dict().items():
            view.copy_(params[name])

    def forward(self, img: Tensor) -> Tensor:
        want = (self.channels, self.image_size, self.image_size)
        if img.dim() != 4 or tuple(img.shape[1:]) != want:
            raise ValueError(f"expected images of shape (b, {', '.join(map(str, want))}), got {tuple(img.shape)}")
        return self.linear(self.to_patches(img))


class FeedForward(nn.Module):
    """Pre-norm MLP: LayerNorm, Linear, GELU, Linear (dropout after each Linear)."""

    canonical_names = {"up": "net.1", "down": "net.4"}

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim, eps=LAYER_NORM_EPS),
            nn.Linear(dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Attention(nn.Module):
    """Pre-norm multi-head self-attention, q, k and v from one fused Linear."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = dim_head * heads
        self.heads = heads
        self.inner_dim = inner_dim
        self.scale = dim_head ** -0.5
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attend = nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(dropout)
        self.to_qkv = nn.Linear(dim, inner_dim * 3, bias=False)  # vit-pytorch's: declared qkv_bias=False
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim), nn.Dropout(dropout))

    # to_qkv's output chunks into q, k, v: its rows are three blocks, and each block is head-major (h d).
    def canonical_state_dict(self) -> dict[str, Tensor]:
        state = {}
        for name, w in zip("qkv", self.to_qkv.weight.chunk(3, dim=0)):
            state[f"{name}.weight"] = w
        state["o.weight"], state["o.bias"] = self.to_out[0].weight, self.to_out[0].bias
        return state

    def load_canonical_state_dict(self, params: dict[str, Tensor]) -> None:
        for name, view in self.canonical_state_dict().items():
            view.copy_(params[name])

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in self.to_qkv(x).chunk(3, dim=-1))
        dots = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        attn = self.dropout(self.attend(dots))
        out = rearrange(torch.matmul(attn, v), "b h n d -> b n (h d)")
        return self.to_out(out)


class Transformer(nn.Module):
    """depth x (x = attn(x) + x; x = ff(x) + x), then a final LayerNorm."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.layers = nn.ModuleList([])
        for _ in range(depth):
            self.layers.append(nn.ModuleList([
                Attention(dim, heads=heads, dim_head=dim_head, dropout=dropout),
                FeedForward(dim, mlp_dim, dropout=dropout),
            ]))
        # Each layer is a bare ModuleList with its norms inside the sublayers, so the spec's per-layer names
        # (i.self_attn, i.self_attn_norm, i.ff, i.ff_norm) are spelled out for this depth.
        self.canonical_names = {}
        for i in range(depth):
            self.canonical_names |= {f"{i}.self_attn": f"layers.{i}.0", f"{i}.self_attn_norm": f"layers.{i}.0.norm",
                                     f"{i}.ff": f"layers.{i}.1", f"{i}.ff_norm": f"layers.{i}.1.net.0"}

    def forward(self, x: Tensor) -> Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.norm(x)


class ViT(nn.Module):
    """Patch embedding, class token, learned positions, pre-norm Transformer, the class token's output -> head."""

    # pool="mean" exists below as vit-pytorch has it, but it averages the class token too: not the spec's
    # mean pooling (patch tokens only), so only "cls" is offered. No switch for the class token or positions.
    spec_options = {"pool": "cls", "class_token": True, "positions": "learned", "qkv_bias": False,
                    "eps": LAYER_NORM_EPS, "activation": "gelu"}
    canonical_names = {"patch_embed": "to_patch_embedding", "pos_embed": "pos_embedding", "layers": "transformer",
                       "final_norm": "transformer.norm", "head": "mlp_head"}

    def __init__(self, *, image_size: int, patch_size: int, channels: int, d_model: int, n_head: int, n_layer: int,
                 d_ff: int, n_classes: int, pool: str = "cls", dropout: float = 0.0, emb_dropout: float = 0.0) -> None:
        super().__init__()
        if pool not in {"cls", "mean"}:
            raise ValueError(f"pool must be 'cls' (class token) or 'mean' (mean pooling), got {pool!r}")
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} must be divisible by n_head={n_head}")
        self.to_patch_embedding = PatchEmbedding(image_size=image_size, patch_size=patch_size, channels=channels,
                                                 d_model=d_model)
        num_patches = (image_size // patch_size) ** 2
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, d_model))
        self.cls_token = nn.Parameter(torch.randn(1, 1, d_model))
        self.dropout = nn.Dropout(emb_dropout)
        self.transformer = Transformer(d_model, n_layer, n_head, d_model // n_head, d_ff, dropout)
        self.pool = pool
        self.to_latent = nn.Identity()
        self.mlp_head = nn.Linear(d_model, n_classes)

    def forward(self, img: Tensor) -> Tensor:
        x = self.to_patch_embedding(img)
        b, n, _ = x.shape
        cls_tokens = repeat(self.cls_token, "1 1 d -> b 1 d", b=b)
        x = torch.cat((cls_tokens, x), dim=1)
        x += self.pos_embedding[:, :(n + 1)]
        x = self.dropout(x)
        x = self.transformer(x)
        x = x.mean(dim=1) if self.pool == "mean" else x[:, 0]
        return self.mlp_head(self.to_latent(x))


# vit-pytorch's names -> the spec's components.
SPEC_COMPONENTS = {
    "VisionTransformer": ViT,
    "FeedForward": None,  # vit-pytorch's FeedForward normalises its input: not the spec's FeedForward
}
