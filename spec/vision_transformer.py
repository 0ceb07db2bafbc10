"""The vision transformer (ViT, Dosovitskiy et al. 2021): an image cut into p x p patches, each patch a token,
a class token in front, learned positions, a pre-norm encoder stack and a classification head.

Signatures (constructors are keyword-only)
------------------------------------------
    PatchEmbedding(*, image_size, patch_size, channels, d_model)
        .forward(images) -> patches
    VisionTransformer(*, image_size, patch_size, channels, d_model, n_head, n_layer, d_ff, n_classes,
                      pool="cls", class_token=True, positions="learned")
        .forward(images) -> logits

Shapes (the glossary of spec/__init__.py, plus this family's ch, p, ih, iw, gh, gw)
----------------------------------------------------------------------------------
    ch       image channels (c is taken: classes)
    p        patch side in pixels: a patch is p x p pixels of every channel
    ih, iw   image height and width in pixels; here square, ih = iw = image_size
    gh, gw   rows and columns of the patch grid, gh = ih / p, gw = iw / p; a ViT sees gh·gw patch tokens
    images   (b, ch, ih, iw) float, channels first (torch's layout; not (b, ih, iw, ch) as PIL/numpy)
    patches  (b, gh·gw, d)                    PatchEmbedding's output, one token per patch
    x        (b, s, d), s = gh·gw + 1 with the class token (s = gh·gw without)
    logits   (b, c), c = n_classes, unnormalised (no softmax in the model)

Math (eval mode)
----------------
    PatchEmbedding, three formulations of one map (the properties check all three):
      einops:  P = rearrange(images, "b ch (gh p1) (gw p2) -> b (gh gw) (ch p1 p2)")   (b, gh·gw, ch·p·p)
               patches = P W^T + bias,  W = rearrange(proj.weight, "d ch p1 p2 -> d (ch p1 p2)")
      conv:    patches = conv2d(images, proj.weight, proj.bias, stride=p) flattened "b d gh gw -> b (gh gw) d"
      unfold:  patches = unfold(images, kernel_size=p, stride=p)^T W^T + bias   (unfold gives (b, ch·p·p, gh·gw))
    VisionTransformer (pre-norm, as ViT):
      x_0    = concat([cls_token, patches], axis=s) + pos_embed            (b, 1 + gh·gw, d)
      x_i    = EncoderLayer_i(x_{i-1}) with norm_first=True                 i = 1 .. n_layer (spec/layers.py)
      y      = final_norm(x_L)                                              every token, before pooling
      pooled = y[:, 0] (pool="cls")  or  mean_j y[:, j] over the PATCH tokens j (pool="mean")
      logits = pooled head.weight^T + head.bias

Conventions (pinned, with the reason)
-------------------------------------
* Patch order is row-major: patch (row, col) of the grid is token row·gw + col, as ViT, timm and HF flatten
  a conv's output with ``flatten(2)``. Column-major order is the same bag of patches in another order, so
  it differs from the spec once positions are added.
* A patch's pixels are flattened in (ch, p1, p2) order, channel slowest, which is ``nn.Conv2d``'s weight
  layout (d, ch, p, p) reshaped to (d, ch·p·p) and ``F.unfold``'s row order. An unfold/rearrange-then-
  Linear implementation with another pixel order ((p1 p2 ch), as vit-pytorch writes it) computes the same
  map with its Linear weight's columns permuted: it keeps its own layout and hands out the canonical
  weight as a view in ``canonical_state_dict()``, e.g.
  ``rearrange(self.linear.weight, "d (p1 p2 ch) -> d ch p1 p2", p1=p, p2=p)`` (a permuted view, so
  loading and gradients reach its own tensor; README, "Parameter names").
* Images must be exactly (ch, image_size, image_size), and image_size must be a multiple of patch_size:
  anything else raises ValueError naming the sizes. A strided convolution silently drops the last
  image_size % patch_size rows and columns, and the position table fixes the number of patches.
* The class token is prepended (position 0), and the learned positions (1 + gh·gw rows) are added after
  prepending, so the class token has a position of its own (ViT, timm's default). Without a class token
  (class_token=False) the table has gh·gw rows and pool must be "mean".
* Pre-norm encoder layers (EncoderLayer with norm_first=True) and a final LayerNorm on every token before
  the head reads it (ViT eq. 4). GELU feed-forward and LayerNorm eps 1e-6 (ViT, timm, torchvision) unless
  declared otherwise (conventions ``activation``, ``eps``).
* pool="mean" averages the final-normed PATCH tokens; a class token, if any, is left out (timm's
  global_pool="avg"). vit-pytorch's pool="mean" averages the class token in as well, and timm normalises
  after pooling (fc_norm) when it pools by mean: neither is this spec.
* The head is a single Linear (the fine-tuning head; ViT's pre-training MLP head is not specified here).

Options (declarable; properties/options.py: an implementation lists what it offers in ``spec_options``)
-------------------------------------------------------------------------------------------------------
    pool         "cls" | "mean": what the head reads                                    constructor
    class_token  True | False: a learned class token at position 0                      constructor
    positions    "learned" | "none": the learned table, or no positions (the patch-permutation
                 property needs "none"; a ViT without an off switch offers "learned" only and skips it)
    qkv_bias     True | False: the attention's q, k, v projections carry biases (timm's qkv_bias=True,
                 the default), or not (vit-pytorch's to_qkv has bias=False); the output projection, the
                 feed-forward and the norms keep theirs either way                        constructor
    activation   "gelu": a convention, never passed; a ViT with ReLU built in declares "relu"
    eps          1e-6: a convention, never passed; a ViT with another eps declares it (HF ViT: 1e-12)
PatchEmbedding has no options. The first value is the spec's default.

Canonical parameters (timm's names and layouts, so that a timm/HF checkpoint maps one to one)
---------------------------------------------------------------------------------------------
    PatchEmbedding:  proj.weight (d, ch, p, p) "weight"   proj.bias (d,) "bias"
        (d, ch, p, p) is nn.Conv2d's layout, the one ViT checkpoints store. The suite's "weight" draw divides
        by the last axis (p), not by the fan-in ch·p·p, so patch embeddings come out with variance ~ch·p:
        larger than 1, which nothing downstream of the first LayerNorm minds.
    VisionTransformer:
        patch_embed.proj.weight, patch_embed.proj.bias     (PatchEmbedding's, prefixed)
        cls_token (1, 1, d) "embedding"                    only when class_token
        pos_embed (1, s, d) "embedding"                    only when positions="learned"; s = gh·gw (+ 1)
        layers.{i}.*  EncoderLayer's (spec.layers.encoder_layer_parameters), i = 0 .. n_layer - 1; with
                      qkv_bias=False without self_attn.q.bias, self_attn.k.bias, self_attn.v.bias
        final_norm.weight (d,) final_norm.bias (d,)        head.weight (c, d) head.bias (c,)

Properties (properties/test_vision_transformer.py)
--------------------------------------------------
PatchEmbedding agrees with this reference (float64; float32 by the error-ratio rule), equals the strided
convolution and unfold-then-linear, and each patch token depends only on its own p x p tile (its Jacobian
block for every other tile is exactly zero); image sizes that are not multiples of the patch size are
refused with ValueError, at construction and in the call. VisionTransformer agrees with this reference in
every offered option; without positions its logits are invariant to permuting the image's tiles; with
pool="cls" the logits depend on every patch (the class token attends to all of them). Learnability: a tiny
ViT learns which quadrant of an 8 x 8 image holds a bright blob.
"""

from __future__ import annotations

import numpy as np
from einops import rearrange

from spec.layers import _prefixed, encoder_layer, encoder_layer_parameters, norm_parameters, sub
from spec.normalization import layer_norm
from spec.registry import Component, Option, Param, boolean, component

EPS = 1e-6
POOLS = ("cls", "mean")
POSITIONS = ("learned", "none")


def check_image_size(*, image_size: int, patch_size: int) -> None:
    """image_size must be a positive multiple of patch_size (ValueError naming both otherwise)."""
    if patch_size <= 0 or image_size <= 0 or image_size % patch_size:
        raise ValueError(f"image_size={image_size} must be a positive multiple of patch_size={patch_size}")


def patch_embedding_parameters(*, patch_size, channels, d_model, **_) -> dict[str, Param]:
    return {"proj.weight": Param((d_model, channels, patch_size, patch_size)), "proj.bias": Param((d_model,), "bias")}


def vision_transformer_parameters(
    *, image_size, patch_size, channels, d_model, n_head, n_layer, d_ff, n_classes, class_token=True,
    positions="learned", qkv_bias=True, **_,
) -> dict[str, Param]:
    params = _prefixed("patch_embed", patch_embedding_parameters(patch_size=patch_size, channels=channels,
                                                                 d_model=d_model))
    if class_token:
        params["cls_token"] = Param((1, 1, d_model), "embedding")
    if positions == "learned":
        params["pos_embed"] = Param((1, (image_size // patch_size) ** 2 + int(class_token), d_model), "embedding")
    for i in range(n_layer):
        # The activation is gelu or relu (a convention): both have the same parameters.
        layer = encoder_layer_parameters(d_model=d_model, n_head=n_head, d_ff=d_ff)
        if not qkv_bias:
            layer = {name: param for name, param in layer.items()
                     if name not in ("self_attn.q.bias", "self_attn.k.bias", "self_attn.v.bias")}
        params |= _prefixed(f"layers.{i}", layer)
    params |= _prefixed("final_norm", norm_parameters(d_model=d_model, norm="layer"))
    return params | {"head.weight": Param((n_classes, d_model)), "head.bias": Param((n_classes,), "bias")}


PATCH_EMBEDDING = component(Component(
    name="PatchEmbedding", kind="module", family="vision_transformer",
    summary="an image cut into p x p patches, each projected to d (a conv with kernel = stride = p)",
    parameters=patch_embedding_parameters,
))
VISION_TRANSFORMER = component(Component(
    name="VisionTransformer", kind="module", family="vision_transformer",
    summary="ViT: patch embedding, class token, learned positions, pre-norm encoder, final norm, linear head",
    parameters=vision_transformer_parameters,
    options=(
        Option("pool", POOLS, "init", "the head reads the class token ('cls') or the mean of the patch tokens"),
        boolean("class_token", "a learned class token at position 0 (False: patch tokens only, pool='mean')",
                kind="init"),
        Option("positions", POSITIONS, "init", "learned positions added after prepending the class token, or none"),
        boolean("qkv_bias", "the attention's q, k, v projections carry biases (timm); False: vit-pytorch's "
                "bias-free to_qkv (the output projection, feed-forward and norms keep theirs)", kind="init"),
        Option("activation", ("gelu", "relu"), "convention", "the encoder layers' feed-forward activation"),
        Option("eps", (EPS,), "convention", "the eps of every LayerNorm (a ViT with another built in declares it)",
               accepts=lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0),
    ),
))


def patchify(images: np.ndarray, *, patch_size: int) -> np.ndarray:
    """(b, ch, ih, iw) -> (b, gh·gw, ch·p·p): row-major patches, each flattened channel first."""
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"images must be (b, ch, ih, iw) with ih = iw, got {images.shape}")
    check_image_size(image_size=images.shape[-1], patch_size=patch_size)
    return rearrange(images, "b ch (gh p1) (gw p2) -> b (gh gw) (ch p1 p2)", p1=patch_size, p2=patch_size)


def patch_embedding(params: dict[str, np.ndarray], images: np.ndarray) -> np.ndarray:
    """The float64 reference of PatchEmbedding: (b, ch, ih, iw) -> (b, gh·gw, d)."""
    weight = np.asarray(params["proj.weight"], dtype=np.float64)  # (d, ch, p, p)
    patches = patchify(images, patch_size=weight.shape[-1])
    return patches @ rearrange(weight, "d ch p1 p2 -> (ch p1 p2) d") + np.asarray(params["proj.bias"])


def vision_transformer(
    params: dict[str, np.ndarray], images: np.ndarray, *, n_head: int, n_layer: int, pool: str = "cls",
    class_token: bool = True, positions: str = "learned", activation: str = "gelu", eps: float = EPS,
) -> np.ndarray:
    """The float64 reference of VisionTransformer (eval mode): (b, ch, ih, iw) -> (b, c)."""
    if pool == "cls" and not class_token:
        raise ValueError("pool='cls' needs the class token")
    p = {name: np.asarray(value, dtype=np.float64) for name, value in params.items()}
    x = patch_embedding(sub(p, "patch_embed"), images)  # (b, gh·gw, d)
    if class_token:
        x = np.concatenate([np.broadcast_to(p["cls_token"], (x.shape[0], 1, x.shape[2])), x], axis=1)
    if positions == "learned":
        x = x + p["pos_embed"]  # after prepending: row 0 is the class token's position
    for i in range(n_layer):
        x = encoder_layer(sub(p, f"layers.{i}"), x, n_head=n_head, norm_first=True, activation=activation, eps=eps)
    y = layer_norm(sub(p, "final_norm"), x, eps=eps)
    pooled = y[:, 0] if pool == "cls" else y[:, int(class_token):].mean(axis=1)
    return pooled @ p["head.weight"].T + p["head.bias"]
