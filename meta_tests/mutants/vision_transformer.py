"""Mutants of the vision transformer: PatchEmbedding and VisionTransformer, each one realistic slip."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from implementations.vision_transformer import PatchEmbedding, VisionTransformer
from meta_tests.catalog import mutant

PATCH_AGREEMENT = "test_patch_embedding_agrees_with_reference"
FORMULATIONS = "test_patch_embedding_equals_a_strided_convolution_and_unfold_then_linear"
LOCALITY = "test_each_patch_embedding_depends_only_on_its_own_pixels"
VIT_AGREEMENT = "test_vision_transformer_agrees_with_reference"


@mutant(name="PatchEmbedding_column_major", bug="patches are ordered column by column (token col * gh + row)",
        provides="PatchEmbedding", caught_by=[PATCH_AGREEMENT, FORMULATIONS, LOCALITY])
class PatchEmbedding_ColumnMajor(PatchEmbedding):
    def forward(self, images):
        return rearrange(self.proj(images), "b d gh gw -> b (gw gh) d")


@mutant(name="PatchEmbedding_pixels_in_p_p_ch_order",
        bug="patches flattened (p1 p2 ch), as vit-pytorch does, but multiplied by the conv weight read as (ch p1 p2)",
        provides="PatchEmbedding", caught_by=[PATCH_AGREEMENT, FORMULATIONS])
class PatchEmbedding_PixelOrder(PatchEmbedding):
    def forward(self, images):
        p = self.patch_size
        patches = rearrange(images, "b ch (gh p1) (gw p2) -> b (gh gw) (p1 p2 ch)", p1=p, p2=p)
        return F.linear(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)


@mutant(name="PatchEmbedding_stride_1", bug="the convolution has kernel p but stride 1: overlapping patches",
        provides="PatchEmbedding", caught_by=[PATCH_AGREEMENT, LOCALITY])
class PatchEmbedding_Stride1(PatchEmbedding):
    def forward(self, images):
        return rearrange(F.conv2d(images, self.proj.weight, self.proj.bias), "b d gh gw -> b (gh gw) d")


@mutant(name="PatchEmbedding_bare_reshape",
        bug="patches cut with a bare reshape (b, ch, ih, iw) -> (b, gh·gw, ch·p·p): strips of pixels, not tiles",
        provides="PatchEmbedding", caught_by=[PATCH_AGREEMENT, LOCALITY])
class PatchEmbedding_BareReshape(PatchEmbedding):
    def forward(self, images):
        patches = images.reshape(images.shape[0], self.n_patches, -1)
        return F.linear(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)


@mutant(name="PatchEmbedding_crops_silently",
        bug="no size checks: a strided conv silently drops the rows and columns that fit in no patch",
        provides="PatchEmbedding", caught_by=["test_image_sizes_not_divisible_by_the_patch_size_are_rejected"])
class PatchEmbedding_Crops(nn.Module):
    def __init__(self, *, image_size: int, patch_size: int, channels: int, d_model: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, d_model, kernel_size=patch_size, stride=patch_size)

    def forward(self, images):
        return self.proj(images).flatten(2).transpose(1, 2)


@mutant(name="VisionTransformer_positions_added_before_prepending",
        bug="positions are added to the patches before the class token is prepended: rows shifted by one, the "
        "class token gets none", provides="VisionTransformer", caught_by=[VIT_AGREEMENT])
class VisionTransformer_PositionsBeforeClassToken(VisionTransformer):
    def tokens(self, images):
        x = self.patch_embed(images)
        if self.pos_embed is not None:
            x = x + self.pos_embed[:, : x.shape[1]]
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x


@mutant(name="VisionTransformer_class_token_appended",
        bug="the class token is appended at the end, but the head reads position 0 (a patch)",
        provides="VisionTransformer",
        caught_by=[VIT_AGREEMENT, "test_vision_transformer_without_positions_is_invariant_to_permuting_patches"])
class VisionTransformer_ClassTokenLast(VisionTransformer):
    def tokens(self, images):
        x = self.patch_embed(images)
        if self.cls_token is not None:
            x = torch.cat([x, self.cls_token.expand(x.shape[0], -1, -1)], dim=1)
        return x if self.pos_embed is None else x + self.pos_embed


@mutant(name="VisionTransformer_mean_pooling_always", bug="the head reads the mean of the patch tokens when pool='cls'",
        provides="VisionTransformer", caught_by=[VIT_AGREEMENT])
class VisionTransformer_MeanAlways(VisionTransformer):
    def pool(self, x):
        return x[:, self.n_prefix :].mean(dim=1)


@mutant(name="VisionTransformer_causal_encoder",
        bug="the encoder masks causally (a GPT block reused): the class token at position 0 sees only itself",
        provides="VisionTransformer",
        caught_by=[VIT_AGREEMENT, "test_vision_transformer_class_token_output_depends_on_every_patch"])
class VisionTransformer_Causal(VisionTransformer):
    def forward(self, images):
        x = self.tokens(images)
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).tril()
        for layer in self.layers:
            x = layer(x, mask=causal)
        return self.head(self.pool(self.final_norm(x)))


@mutant(name="VisionTransformer_positions_never_added", bug="the learned position table is built but never added",
        provides="VisionTransformer",
        caught_by=[VIT_AGREEMENT, "test_vision_transformer_learns_which_quadrant_holds_a_bright_blob"])
class VisionTransformer_NoPositions(VisionTransformer):
    def tokens(self, images):
        x = self.patch_embed(images)
        if self.cls_token is None:
            return x
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)


@mutant(name="VisionTransformer_qkv_bias_ignored",
        bug="qkv_bias=False is accepted, but q, k and v keep biases (an nn.Linear left at its default bias=True)",
        provides="VisionTransformer", caught_by=[VIT_AGREEMENT])
class VisionTransformer_QkvBiasIgnored(VisionTransformer):
    def __init__(self, *, qkv_bias: bool = True, **kwargs):
        super().__init__(qkv_bias=True, **kwargs)
