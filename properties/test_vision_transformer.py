"""Properties of the vision transformer: PatchEmbedding and VisionTransformer. Spec: spec/vision_transformer.py."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from properties.assertions import PRECISIONS, assert_close, assert_equal, assert_true
from properties.attention_cases import OURS
from properties.options import Offers, draws_options
from properties.plugin import CheckedModule, Implementation, backward, constructor_arguments, constructor_defaults
from properties.probes import expect_value_error, jacobian
from properties.strategies import fewer_examples, seeds, tensor
from properties.training import train
from spec.vision_transformer import patch_embedding, vision_transformer

PATCH, VIT = "PatchEmbedding", "VisionTransformer"
AXES = "b s d"


def tiles_permuted(images: Tensor, perm: Tensor, p: int) -> Tensor:
    """The image with its p x p tiles moved: tile perm[k] goes to grid cell k (row-major cells)."""
    tiles = rearrange(images, "b ch (gh p1) (gw p2) -> b (gh gw) ch p1 p2", p1=p, p2=p)
    gh = images.shape[-2] // p
    return rearrange(tiles[:, perm], "b (gh gw) ch p1 p2 -> b ch (gh p1) (gw p2)", gh=gh)


def per_tile(pixels: Tensor, p: int) -> Tensor:
    """(..., ih, iw) magnitudes summed per p x p tile -> (..., gh·gw), tiles row-major."""
    return reduce(pixels.abs(), "... (gh p1) (gw p2) -> ... (gh gw)", "sum", p1=p, p2=p)


# --------------------------------------------------------------------------------------------------------
# PatchEmbedding


@dataclass(frozen=True)
class PatchCase:
    """One patch embedding: b images of ch channels, a g x g grid of p x p patches (image_size g·p), width d."""

    b: int
    ch: int
    p: int
    g: int
    d: int
    seed: int

    def config(self) -> dict:
        return dict(image_size=self.g * self.p, patch_size=self.p, channels=self.ch, d_model=self.d)

    def build(self, impl: Implementation, device="cpu", dtype=torch.float64) -> CheckedModule:
        return impl.build(PATCH, seed=self.seed, device=device, dtype=dtype, **self.config())

    def images(self, device="cpu", dtype=torch.float64) -> Tensor:
        side = self.g * self.p
        return tensor(self.seed + 1, self.b, self.ch, side, side, dtype=dtype, device=device)

    def __repr__(self) -> str:
        return (f"PatchEmbedding(image_size={self.g * self.p}, patch_size={self.p}, channels={self.ch}, "
                f"d_model={self.d}) on b={self.b} images, seed={self.seed}")


@st.composite
def patch_cases(draw, *, max_b: int = 2) -> PatchCase:
    """Tiny patch embeddings: 1-3 channels, patches of 1-3 pixels, a grid of 1-3 x 1-3 patches, d <= 4."""
    return PatchCase(b=draw(st.integers(1, max_b), label="b"), ch=draw(st.integers(1, 3), label="ch"),
                     p=draw(st.integers(1, 3), label="p"), g=draw(st.integers(1, 3), label="g"),
                     d=draw(st.integers(1, 4), label="d"), seed=draw(seeds(), label="seed"))


@pytest.mark.requires(PATCH)
@pytest.mark.parametrize("dtype", PRECISIONS)
@given(case=patch_cases())
def test_patch_embedding_agrees_with_reference(impl, device, dtype, case):
    """The patch tokens equal the spec's float64 reference with the same weights (float32 by the error-ratio
    rule against ours): rearrange "b ch (gh p1) (gw p2) -> b (gh gw) (ch p1 p2)", then the projection.

    Hint: patches are taken row by row (token row * gw + col) and each is flattened channel first, as the
    (d, ch, p, p) weight of nn.Conv2d(kernel_size=p, stride=p) reads it.
    """
    module = case.build(impl, device, dtype)
    images = case.images(device, dtype)
    out = module(images)
    baseline = None if dtype == torch.float64 else case.build(OURS, device, dtype)(images)
    assert_close(out, patch_embedding(module.canonical_numpy(), images.cpu().double().numpy()), baseline=baseline,
                 axes=AXES, claim=f"{case} agrees with the spec's reference ({dtype})",
                 hint="stride = kernel = patch_size; flatten the grid row-major (b d gh gw -> b (gh gw) d); "
                 "a Linear over patches must read pixels in the weight's (ch, p1, p2) order.")


@pytest.mark.requires(PATCH)
@given(case=patch_cases())
def test_patch_embedding_equals_a_strided_convolution_and_unfold_then_linear(impl, device, case):
    """Three formulations, one map: the patch tokens equal conv2d(images, proj.weight, proj.bias, stride=p)
    flattened row-major, and F.unfold(images, p, stride=p) followed by the same weight as a (d, ch·p·p) Linear.

    Hint: unfold's rows are (ch, p1, p2) with the channel slowest, and its columns are the patches row by row:
    a Linear over another pixel order needs its weight's columns permuted to match the conv layout.
    """
    module = case.build(impl, device)
    images = case.images(device)
    out = module(images)
    state = module.canonical_state()
    weight, bias = state["proj.weight"].detach(), state["proj.bias"].detach()  # (d, ch, p, p), (d,)
    conv = rearrange(F.conv2d(images, weight, bias, stride=case.p), "b d gh gw -> b (gh gw) d")
    unfolded = F.unfold(images, kernel_size=case.p, stride=case.p)  # (b, ch·p·p, gh·gw)
    linear = F.linear(rearrange(unfolded, "b k n -> b n k"), weight.reshape(case.d, -1), bias)
    for name, expected in (("conv2d with kernel = stride = p", conv), ("unfold, then a Linear", linear)):
        assert_close(out, expected, axes=AXES, claim=f"{case} equals {name}",
                     hint="tokens row-major over the grid, pixels of a patch in (ch, p1, p2) order, stride p.")


@pytest.mark.requires(PATCH)
@given(case=patch_cases(max_b=1))
def test_each_patch_embedding_depends_only_on_its_own_pixels(impl, case):
    """Patch token k depends on the pixels of tile k (row k // gw, column k % gw) and on no other pixel: its
    Jacobian block for every other tile is exactly zero, and the block for its own tile is not.

    Hint: a bare reshape of (b, ch, ih, iw) into (b, gh·gw, ch·p·p) makes each "patch" a strip of
    consecutive pixels, not a square tile; cut tiles with rearrange (or unfold) and a stride of p.
    """
    module = case.build(impl)
    images = case.images()
    n = case.g * case.g
    out = module(images)
    claim = f"{case}: each patch token depends on its own {case.p} x {case.p} tile only"
    assert_true(tuple(out.shape) == (1, n, case.d), claim=claim,
                detail=f"output shape {tuple(out.shape)}, but a {case.g} x {case.g} grid gives {(1, n, case.d)}",
                hint="kernel_size = stride = patch_size: a stride of 1 gives overlapping patches.")
    jac = jacobian(lambda x: module(x), images, module)  # (1, n, d, 1, ch, ih, iw)
    blocks = per_tile(reduce(jac.abs(), "1 n d 1 ch ih iw -> n ih iw", "sum"), case.p)  # (token, tile)
    elsewhere = blocks * ~torch.eye(n, dtype=torch.bool)
    assert_equal(elsewhere, torch.zeros_like(elsewhere), axes="token tile", claim=claim,
                 hint="token k must read tile k: rows (k // gw)·p .. +p, columns (k % gw)·p .. +p; row-major order.")
    own = blocks.diagonal()
    assert_true(bool((own > 0).all()), claim=claim,
                detail=f"tokens {(own == 0).nonzero().flatten().tolist()} do not depend on their own tile",
                hint="every token is the projection of its own tile's pixels.")


@pytest.mark.parametrize("component", [PATCH, VIT])
@fewer_examples()
@given(data=st.data())
def test_image_sizes_not_divisible_by_the_patch_size_are_rejected(impl, device, component, data):
    """An image_size that is not a multiple of patch_size raises ValueError at construction, and an image
    whose side is not image_size raises ValueError in the call; both messages name the offending size.

    Hint: nn.Conv2d(kernel_size=p, stride=p) silently drops the image_size % p last rows and columns; check
    ``image_size % patch_size == 0`` in __init__ and the image's shape in forward, and say what was given.
    """
    p = data.draw(st.integers(2, 4), label="p")
    g = data.draw(st.integers(1, 3), label="g")
    rest = data.draw(st.integers(1, p - 1), label="image_size % p")
    ch, side = data.draw(st.integers(1, 2), label="ch"), g * p + rest
    sizes = dict(patch_size=p, channels=ch, d_model=4)
    if component == VIT:
        sizes |= dict(n_head=2, n_layer=1, d_ff=4, n_classes=2)
    offers = impl.offers(component)
    kwargs = constructor_arguments(offers, {**constructor_defaults(offers), **sizes, "image_size": side})
    hint = "check image_size % patch_size == 0 in __init__ and the image's (ch, ih, iw) in forward (ValueError)."
    claim = f"{component}(image_size={side}, patch_size={p}) raises ValueError naming image_size={side}"
    built = expect_value_error(lambda: impl.raw(component)(**kwargs), claim=claim, hint=hint, what="it built a")
    assert_true(str(side) in str(built), claim=claim, detail=f"the ValueError says {str(built)!r}",
                hint="say which image_size and patch_size were given.")
    module = impl.build(component, seed=data.draw(seeds(), label="seed"), device=device, image_size=g * p, **sizes)
    images = tensor(0, 1, ch, side, side, dtype=torch.float64, device=device)
    claim = f"{component}(image_size={g * p}, patch_size={p}) refuses a {side} x {side} image with ValueError"
    called = expect_value_error(lambda: module.module(images), claim=claim, hint=hint,
                                what=f"for images of shape {tuple(images.shape)} it returned")
    assert_true(str(side) in str(called), claim=claim, detail=f"the ValueError says {str(called)!r}",
                hint="say which image shape was given and which the module takes.")


# --------------------------------------------------------------------------------------------------------
# VisionTransformer


@dataclass(frozen=True)
class VitCase:
    """One ViT and batch (b images of ch channels, a g x g grid of p x p patches, h heads of width e,
    f feed-forward width, c classes), its seed and options (activation and eps are conventions: the
    implementation's own, never passed)."""

    b: int
    ch: int
    p: int
    g: int
    h: int
    e: int
    layers: int
    f: int
    c: int
    seed: int
    pool: str = "cls"
    class_token: bool = True
    positions: str = "learned"
    qkv_bias: bool = True
    activation: str = "gelu"
    eps: float = 1e-6

    @property
    def d(self) -> int:
        return self.h * self.e

    def config(self) -> dict:
        return dict(image_size=self.g * self.p, patch_size=self.p, channels=self.ch, d_model=self.d, n_head=self.h,
                    n_layer=self.layers, d_ff=self.f, n_classes=self.c, pool=self.pool,
                    class_token=self.class_token, positions=self.positions, qkv_bias=self.qkv_bias)

    def build(self, impl: Implementation, device="cpu", dtype=torch.float64) -> CheckedModule:
        return impl.build(VIT, seed=self.seed, device=device, dtype=dtype, **self.config())

    def build_ours_alike(self, device="cpu", dtype=torch.float64) -> CheckedModule:
        """Ours in the same configuration, conventions included (a declared relu or eps): the baseline."""
        return OURS.build(VIT, seed=self.seed, device=device, dtype=dtype, **self.config(),
                          activation=self.activation, eps=self.eps)

    def images(self, device="cpu", dtype=torch.float64, b: int | None = None) -> Tensor:
        side = self.g * self.p
        return tensor(self.seed + 1, b or self.b, self.ch, side, side, dtype=dtype, device=device)

    def reference(self, model: CheckedModule, images: Tensor) -> np.ndarray:
        return vision_transformer(model.canonical_numpy(), images.cpu().double().numpy(), n_head=self.h,
                                  n_layer=self.layers, pool=self.pool, class_token=self.class_token,
                                  positions=self.positions, activation=self.activation, eps=self.eps)

    def __repr__(self) -> str:
        options = f"pool={self.pool}, class_token={self.class_token}, positions={self.positions}"
        options += "" if self.qkv_bias else ", qkv_bias=False"
        options += f", activation={self.activation}" if self.activation != "gelu" else ""
        options += f", eps={self.eps:g}" if self.eps != 1e-6 else ""
        return (f"VisionTransformer case(b={self.b}, ch={self.ch}, image_size={self.g * self.p}, p={self.p}, "
                f"h={self.h}, e={self.e}, d={self.d}, n_layer={self.layers}, f={self.f}, c={self.c}, {options}, "
                f"seed={self.seed})")


@draws_options(VIT, pool=lambda case: case.pool, class_token=lambda case: case.class_token,
               positions=lambda case: case.positions, qkv_bias=lambda case: case.qkv_bias)
@st.composite
def vision_transformer_cases(draw, offers: Offers, *, min_g: int = 1, max_b: int = 2, positions: str | None = None,
                             class_token: bool | None = None, pool: str | None = None) -> VitCase:
    """Tiny ViTs of the options ``offers`` offers: 1-2 channels, patches of 1-2 pixels, a grid of up to 3 x 3,
    3 <= d_model <= 8, 1-2 layers; pool, class_token and positions drawn unless given (pool="cls" only with
    the class token), qkv_bias drawn, activation and eps the implementation's own.

    d_model >= 3 because a LayerNorm over 1 or 2 features leaves at most a sign.
    """
    if class_token is None:
        # Without the class token the head must pool by mean: draw False only where mean pooling is offered.
        class_token = draw(st.sampled_from(offers.where("class_token", lambda v: v or offers.offers("pool", "mean"))),
                           label="class_token")
    if pool is None:
        pool = draw(offers.strategy("pool"), label="pool") if class_token else "mean"
    h = draw(st.integers(1, 2), label="h")
    return VitCase(
        b=draw(st.integers(1, max_b), label="b"), ch=draw(st.integers(1, 2), label="ch"),
        p=draw(st.integers(1, 2), label="p"), g=draw(st.integers(min_g, 3), label="g"), h=h,
        e=draw(st.integers(-(-3 // h), 8 // h), label="e"), layers=draw(st.integers(1, 2), label="n_layer"),
        f=draw(st.integers(1, 8), label="f"), c=draw(st.integers(1, 3), label="c"), seed=draw(seeds(), label="seed"),
        pool=pool, class_token=class_token,
        positions=positions or draw(offers.strategy("positions"), label="positions"),
        qkv_bias=draw(offers.strategy("qkv_bias"), label="qkv_bias"),
        activation=offers.default("activation"), eps=offers.default("eps"),
    )


def run(model: CheckedModule, images: Tensor) -> Tensor:
    """model(images) with the spec's output shape (b, n_classes) checked."""
    __tracebackhide__ = True
    out = model(images)
    want = (images.shape[0], model.config["n_classes"])
    assert_true(tuple(out.shape) == want, claim=f"{model} returns (b, n_classes) = {want}",
                detail=f"shape {tuple(out.shape)}", hint="pool the tokens (b, s, d) -> (b, d) before the head.")
    return out


@pytest.mark.requires(VIT)
@pytest.mark.parametrize("dtype", PRECISIONS)
@given(data=st.data())
def test_vision_transformer_agrees_with_reference(impl, device, dtype, data):
    """The logits equal the spec's float64 reference with the same weights, in every offered pool, class token,
    positions and qkv_bias option (float32 by the error-ratio rule against ours in the same configuration).

    Hint: prepend the class token, THEN add the (1 + gh·gw)-row position table (row 0 is the class token's);
    pre-norm layers, the final norm on every token, and the head reads position 0 (pool="cls") or the mean
    of the patch tokens (pool="mean").
    """
    case = data.draw(vision_transformer_cases(impl.offers(VIT)), label="case")
    model = case.build(impl, device, dtype)
    images = case.images(device, dtype)
    out = run(model, images)
    baseline = None if dtype == torch.float64 else run(case.build_ours_alike(device, dtype), images)
    assert_close(out, case.reference(model, images), baseline=baseline, axes="b c",
                 claim=f"{case} agrees with the spec's reference ({dtype})",
                 hint="cls token first, positions added after prepending, pre-norm layers, final norm, and the "
                 "pool the option names.")


@pytest.mark.requires(VIT)
@pytest.mark.needs(positions="none")
@given(data=st.data())
def test_vision_transformer_without_positions_is_invariant_to_permuting_patches(impl, data):
    """Without positions, moving the image's p x p tiles around leaves the logits unchanged (float64): the
    encoder is equivariant to permuting the patch tokens, and the class token (or the mean of the patch
    tokens) does not see their order.

    Hint: a head that reads a patch token (the class token appended at the end but position 0 read) or
    "patches" that are not whole tiles make the output depend on where the tiles are.
    """
    case = data.draw(vision_transformer_cases(impl.offers(VIT), min_g=2, positions="none"), label="case")
    perm = torch.tensor(data.draw(st.permutations(range(case.g * case.g)), label="perm"))
    model = case.build(impl)
    images = case.images()
    assert_close(run(model, tiles_permuted(images, perm, case.p)), run(model, images), axes="b c",
                 claim=f"{case}: permuting the image's tiles ({perm.tolist()}) leaves the logits unchanged",
                 hint="with no positions, only the class token (position 0) or the mean of the patch tokens may "
                 "reach the head.")


@pytest.mark.requires(VIT)
@pytest.mark.needs(class_token=True, pool="cls")
@given(data=st.data())
def test_vision_transformer_class_token_output_depends_on_every_patch(impl, data):
    """With pool="cls" the logits depend on the pixels of every patch: the class token attends to all of
    them (a random projection of the gradient w.r.t. the image is nonzero on every p x p tile).

    Hint: the encoder is not causal (a GPT block's causal mask lets the class token at position 0 see only
    itself), and the head reads the class token AFTER the encoder, not the one that went in.
    """
    case = data.draw(vision_transformer_cases(impl.offers(VIT), max_b=1, class_token=True, pool="cls"),
                     label="case")
    model = case.build(impl)
    images = case.images().requires_grad_(True)
    out = run(model, images)
    backward((out * tensor(case.seed + 2, *out.shape, dtype=out.dtype, device="cpu")).sum(), model)
    seen = per_tile(images.grad.sum(dim=(0, 1)).abs(), case.p) if images.grad is not None else None
    claim = f"{case}: the class token's logits depend on every one of the {case.g * case.g} patches"
    assert_true(seen is not None, claim=claim, detail="the image got no gradient at all",
                hint="the logits must be computed from the images (no .detach()).")
    blind = (seen == 0).nonzero().flatten().tolist()
    assert_true(not blind, claim=claim, detail=f"zero gradient on patches {blind} (row-major)",
                hint="no causal mask in the encoder; read x[:, 0] after the layers and the final norm.")


# --------------------------------------------------------------------------------------------------------
# Learnability


QUADRANT_SIDE, QUADRANT_PATCH, QUADRANT_SEED = 8, 2, 20240611


def quadrant_data(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(n, 1, 8, 8) images of noise N(0, 0.5^2) with one bright 3 x 3 blob (+2) somewhere inside one 4 x 4
    quadrant; the label is the quadrant, 0 .. 3 row-major (top-left, top-right, bottom-left, bottom-right).
    A quadrant is 2 x 2 patches and the blob straddles patch borders, so the model must learn where each
    patch lies; every patch looks alike in every quadrant."""
    half = QUADRANT_SIDE // 2
    label = torch.randint(0, 4, (n,), generator=gen)
    images = 0.5 * torch.randn(n, 1, QUADRANT_SIDE, QUADRANT_SIDE, generator=gen)
    corner = torch.randint(0, half - 2, (n, 2), generator=gen) + half * torch.stack([label // 2, label % 2], dim=1)
    rows = corner[:, :1] + torch.arange(3)  # (n, 3)
    cols = corner[:, 1:] + torch.arange(3)
    images[torch.arange(n)[:, None, None], 0, rows[:, :, None], cols[:, None, :]] += 2.0
    return images, label


@pytest.mark.slow
@pytest.mark.requires(VIT)
def test_vision_transformer_learns_which_quadrant_holds_a_bright_blob(impl):
    """A 1-layer ViT (8 x 8 images, 2 x 2 patches, d_model 16, 4 heads) trained 100 Adam steps to say which
    quadrant holds a bright 3 x 3 blob classifies at least 90% of held-out images right (chance: 25%; measured
    0.998 here, 0.967 to 1.0 over ten other seeds of data and weights, 0.25 to 0.29 without positions). The
    options are the implementation's defaults (the spec's where offered).

    Hint: the patch tokens alone are a bag: without learned positions (or with positions the model never adds)
    the blob looks the same in every quadrant, and the model stays near chance.
    """
    # Four heads, not two: early in training attention tends to lock onto fixed positions, and two heads
    # reading two fixed patches cannot tell four quadrants apart (two heads stalled at 75% on some seeds).
    gen = torch.Generator().manual_seed(QUADRANT_SEED)
    x_train, y_train = quadrant_data(2048, gen)
    x_test, y_test = quadrant_data(512, gen)
    model = impl.build(VIT, seed=QUADRANT_SEED, dtype=torch.float32, image_size=QUADRANT_SIDE,
                       patch_size=QUADRANT_PATCH, channels=1, d_model=16, n_head=4, n_layer=1, d_ff=32, n_classes=4)
    losses = train(model, lambda index: F.cross_entropy(model(x_train[index]), y_train[index]), steps=100, lr=1e-2,
                   batch=32, n_train=len(x_train))
    with torch.no_grad():
        accuracy = (run(model, x_test).argmax(dim=-1) == y_test).float().mean().item()
    assert_true(accuracy >= 0.9, claim="a tiny VisionTransformer learns which quadrant holds a bright blob",
                detail=f"held-out accuracy {accuracy:.3f} < 0.9 (train loss {losses[0]:.3f} -> {losses[-1]:.3f})",
                hint="check test_vision_transformer_agrees_with_reference first; positions must be added.")
