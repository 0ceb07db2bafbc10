"""The vision transformer in PyTorch: patch embedding, class token, learned positions, pre-norm encoder.
Spec: spec/vision_transformer.py."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from implementations.layers import EncoderLayer
from implementations.normalization import LayerNorm

__all__ = ["PatchEmbedding", "VisionTransformer"]


class PatchEmbedding(nn.Module):
    """(b, ch, ih, iw) -> (b, gh·gw, d): a convolution with kernel = stride = p, one token per patch, row-major.

    The convolution is the fast path and stores the weight in the canonical (d, ch, p, p) layout; ``unfold``
    followed by a Linear, or an einops rearrange followed by a matmul (the spec's reference), is the same map,
    which the properties check.
    """

    def __init__(self, *, image_size: int, patch_size: int, channels: int, d_model: int) -> None:
        super().__init__()
        if min(image_size, patch_size, channels, d_model) <= 0:
            raise ValueError(f"sizes must be positive: image_size={image_size}, patch_size={patch_size}, "
                             f"channels={channels}, d_model={d_model}")
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}: the last "
                             f"{image_size % patch_size} rows and columns would fit in no patch")
        self.image_size, self.patch_size, self.channels = image_size, patch_size, channels
        self.n_patches = (image_size // patch_size) ** 2
        self.proj = nn.Conv2d(channels, d_model, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        want = (self.channels, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != want:
            # A strided convolution would silently drop the rows and columns that fit in no patch.
            raise ValueError(f"images must be (b, ch, ih, iw) = (b, {', '.join(map(str, want))}) for image_size="
                             f"{self.image_size}, patch_size={self.patch_size}; got {tuple(images.shape)}")
        return rearrange(self.proj(images), "b d gh gw -> b (gh gw) d")  # row-major: token row * gw + col


class VisionTransformer(nn.Module):
    """images (b, ch, ih, iw) -> class logits (b, n_classes)."""

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        channels: int,
        d_model: int,
        n_head: int,
        n_layer: int,
        d_ff: int,
        n_classes: int,
        pool: str = "cls",
        class_token: bool = True,
        positions: str = "learned",
        qkv_bias: bool = True,
        activation: str = "gelu",
        eps: float = 1e-6,
    ) -> None:
        # activation and eps are conventions of the spec (gelu, 1e-6): a ViT may declare others; ours takes them
        # as keywords so that the suite can build it alike as a baseline.
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        if positions not in ("learned", "none"):
            raise ValueError(f"positions must be 'learned' or 'none', got {positions!r}")
        if pool == "cls" and not class_token:
            raise ValueError("pool='cls' reads the class token: pass class_token=True or pool='mean'")
        if min(n_layer, n_classes) <= 0:
            raise ValueError(f"sizes must be positive: n_layer={n_layer}, n_classes={n_classes}")
        self.pool_by = pool
        self.patch_embed = PatchEmbedding(image_size=image_size, patch_size=patch_size, channels=channels,
                                          d_model=d_model)
        self.n_prefix = int(class_token)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d_model) * 0.02) if class_token else None
        s = self.patch_embed.n_patches + self.n_prefix
        self.pos_embed = nn.Parameter(torch.randn(1, s, d_model) * 0.02) if positions == "learned" else None
        self.layers = nn.ModuleList(
            EncoderLayer(d_model=d_model, n_head=n_head, d_ff=d_ff, norm_first=True, activation=activation, eps=eps)
            for _ in range(n_layer)
        )
        if not qkv_bias:  # vit-pytorch's to_qkv: q, k and v without biases; the output projection keeps its own
            for layer in self.layers:
                for projection in (layer.self_attn.q, layer.self_attn.k, layer.self_attn.v):
                    projection.bias = None
        self.final_norm = LayerNorm(d_model=d_model, eps=eps)  # a pre-norm stack never normalised its stream
        self.head = nn.Linear(d_model, n_classes)

    def tokens(self, images: Tensor) -> Tensor:
        """(b, ch, ih, iw) -> (b, s, d): the class token, then the patches, plus the positions."""
        x = self.patch_embed(images)  # (b, gh·gw, d)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (b, 1 + gh·gw, d)
        if self.pos_embed is not None:
            x = x + self.pos_embed  # after prepending, so the class token has a position (row 0) too
        return x

    def pool(self, x: Tensor) -> Tensor:
        """(b, s, d) -> (b, d): the class token, or the mean of the patch tokens (the class token left out)."""
        return x[:, 0] if self.pool_by == "cls" else x[:, self.n_prefix :].mean(dim=1)

    def forward(self, images: Tensor) -> Tensor:
        x = self.tokens(images)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.pool(self.final_norm(x)))  # (b, c)
