"""Benchmark: the three formulations of the patch embedding, and a small ViT's forward pass (not a test).

    python benchmarks/vision_transformer.py             # 224 x 224 images, ViT-Ti/16 and ViT-B/16 widths (~10 s)
    python benchmarks/vision_transformer.py --quick     # 64 x 64 images, batch 4 (~1 s)
    python benchmarks/vision_transformer.py --batch 16 --threads 2

Patch embedding (spec/vision_transformer.py: one map, three formulations), on the same weights and images:
    conv      our PatchEmbedding: nn.Conv2d(kernel_size=p, stride=p), flattened "b d gh gw -> b (gh gw) d"
    unfold    F.unfold(images, p, stride=p) (b, ch·p·p, gh·gw), transposed, then F.linear with the weight
              reshaped to (d, ch·p·p)
    einops    rearrange "b ch (gh p1) (gw p2) -> b (gh gw) (ch p1 p2)", then F.linear (the spec's reference,
              in torch)
Each is timed (median of --repeats calls, after a warm-up, float32, inference mode) and compared with the
conv (max |difference|). Then our VisionTransformer (ViT-Ti/16 shape: d 192, 3 heads, d_ff 768, 12 layers
unless --quick) is timed on the same images: images per second, and the share of the forward pass that
the patch embedding takes.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repository root

from timing import median_seconds  # noqa: E402 (benchmarks/timing.py)
from implementations.vision_transformer import PatchEmbedding, VisionTransformer  # noqa: E402


def formulations(embed: PatchEmbedding) -> dict[str, callable]:
    p, weight, bias = embed.patch_size, embed.proj.weight, embed.proj.bias
    flat = weight.reshape(weight.shape[0], -1)  # (d, ch·p·p): the conv layout's (ch, p1, p2) order
    return {
        "conv": embed,
        "unfold": lambda x: F.linear(F.unfold(x, kernel_size=p, stride=p).transpose(1, 2), flat, bias),
        "einops": lambda x: F.linear(rearrange(x, "b ch (gh p1) (gw p2) -> b (gh gw) (ch p1 p2)", p1=p, p2=p),
                                     flat, bias),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--widths", type=int, nargs="+", default=[192, 768], help="d_model: ViT-Ti 192, ViT-B 768")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="64 x 64 images, batch 4, widths 192, 2 layers")
    args = parser.parse_args()
    if args.quick:
        args.image_size, args.batch, args.widths, args.layers, args.repeats = 64, 4, [192], 2, 3
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    s, p, b = args.image_size, args.patch_size, args.batch
    images = torch.randn(b, 3, s, s)
    print(f"torch {torch.__version__}, {platform.machine()}, {args.threads} thread(s), float32; batch {b} of "
          f"3 x {s} x {s} images, patches {p} x {p} ({(s // p) ** 2} tokens); medians of {args.repeats}")
    print()
    header = f"{'d_model':>7} | {'formulation':>11} | {'ms':>8} | {'vs conv':>7} | {'max |diff| vs conv':>18}"
    print(header)
    print("-" * len(header))
    conv_ms = {}
    with torch.inference_mode():
        for d in args.widths:
            embed = PatchEmbedding(image_size=s, patch_size=p, channels=3, d_model=d).eval()
            reference = embed(images)
            for name, fn in formulations(embed).items():
                ms = 1e3 * median_seconds(lambda: fn(images), args.repeats, warm_up=True)
                conv_ms.setdefault(d, ms)
                diff = (fn(images) - reference).abs().max().item()
                print(f"{d:>7} | {name:>11} | {ms:>8.2f} | {ms / conv_ms[d]:>6.2f}x | {diff:>18.2e}")
        print()
        d = args.widths[0]
        vit = VisionTransformer(image_size=s, patch_size=p, channels=3, d_model=d, n_head=3, n_layer=args.layers,
                                d_ff=4 * d, n_classes=1000).eval()
        seconds = median_seconds(lambda: vit(images), args.repeats, warm_up=True)
        print(f"VisionTransformer d_model {d}, 3 heads, d_ff {4 * d}, {args.layers} layers, 1000 classes: "
              f"{1e3 * seconds:.1f} ms per batch, {b / seconds:.1f} images/s; the patch embedding is "
              f"{100 * conv_ms[d] / 1e3 / seconds:.1f}% of it")


if __name__ == "__main__":
    main()
