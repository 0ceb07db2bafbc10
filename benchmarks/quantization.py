"""Benchmark: weight-only int8 linear layers against float ones, memory and matmul time (not a test).

    python benchmarks/quantization.py             # layers up to 11008 x 4096 (LLaMA-7B's MLP), m = 1, 16, 128 (~2 min)
    python benchmarks/quantization.py --quick     # two small layers, m = 1, 16 (~3 s)
    python benchmarks/quantization.py --device cuda

Memory, for (out, in) layer shapes of GPT-2 and LLaMA-7B: the bytes of a float32 and a bfloat16 weight
against int8 q plus one scale per output channel (float32 scales with a float32 layer, bfloat16 with a
bfloat16 one), computed by spec.quantization.weight_bytes and measured from the buffers of a built
Int8Linear (checked equal).

Time, side by side with the plain path in one run, for a batch of m tokens x (m, in) in float32:
    float32   F.linear(x, w)                                   (the plain path)
    int8      Int8Linear.from_float(w)(x): q widened to float32 on the fly, x q^T, times the scales
    fused     torch._weight_int8pack_mm(x, q, scale), PyTorch's weight-only int8 kernel (CPU and CUDA
              builds that have it), which reads the int8 weight without widening it in memory first
Reported as time / float32 time (< 1: faster), and the worst error of the int8 layer against the float one
as a fraction of the spec's bound (scale / 2) sum |x| (must be <= 1). Absolute times on CUDA only.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repository root

from implementations.quantization import Int8Linear  # noqa: E402
from spec.quantization import linear_error_bound, weight_bytes  # noqa: E402
from timing import median_seconds  # noqa: E402 (benchmarks/timing.py)

SHAPES = {"GPT-2 attn out (768 x 768)": (768, 768), "GPT-2 MLP up (3072 x 768)": (3072, 768),
          "LLaMA-7B q (4096 x 4096)": (4096, 4096), "LLaMA-7B MLP up (11008 x 4096)": (11008, 4096)}
QUICK_SHAPES = {"(768 x 768)": (768, 768), "(4096 x 1024)": (4096, 1024)}


def memory_table(shapes: dict[str, tuple[int, int]]) -> None:
    header = (f"{'layer (out x in)':>32} | {'float32 MiB':>11} | {'int8+scales MiB':>15} | {'ratio':>5} | "
              f"{'bf16 MiB':>8} | {'int8+bf16 scales':>16} | {'ratio':>5} | measured")
    print(header)
    print("-" * len(header))
    for name, (o, i) in shapes.items():
        f32, b16 = weight_bytes(o, i, element_bytes=4), weight_bytes(o, i, element_bytes=2)
        q32 = weight_bytes(o, i, element_bytes=1, scale_bytes=4)  # int8 q and float32 scales
        q16 = weight_bytes(o, i, element_bytes=1, scale_bytes=2)  # int8 q and bfloat16 scales
        layer = Int8Linear(in_features=i, out_features=o, bias=False)  # the buffers from_float fills
        measured = sum(t.numel() * t.element_size() for t in layer.buffers())
        mib = 1 / 2**20
        print(f"{name:>32} | {f32 * mib:>11.2f} | {q32 * mib:>15.2f} | {q32 / f32:>5.3f} | {b16 * mib:>8.2f} | "
              f"{q16 * mib:>16.2f} | {q16 / b16:>5.3f} | " + ("yes" if measured == q32 else f"NO ({measured})"))


def time_table(shapes: dict[str, tuple[int, int]], tokens: list[int], repeats: int, device: str) -> None:
    cuda = device.startswith("cuda")
    fused = hasattr(torch, "_weight_int8pack_mm")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def timed(fn) -> float:  # median wall seconds, CUDA work waited for
        return median_seconds(lambda: (fn(), sync()), repeats, warm_up=True)

    header = (f"{'layer (out x in)':>32} | {'m':>4} | {'int8 / float32':>14} | {'fused / float32':>15} | "
              f"{'error / bound':>13}" + (f" | {'float32 ms':>10}" if cuda else ""))
    print(header)
    print("-" * len(header))
    gen = torch.Generator().manual_seed(0)
    for name, (o, i) in shapes.items():
        w = (torch.randn(o, i, generator=gen) / i**0.5).to(device)
        layer = Int8Linear.from_float(w).eval()
        for m in tokens:
            x = torch.randn(m, i, generator=gen).to(device)
            with torch.inference_mode():
                plain = timed(lambda: F.linear(x, w))
                int8 = timed(lambda: layer(x))
                fused_ratio = "n/a"
                if fused:
                    try:
                        def fused_call():
                            return torch._weight_int8pack_mm(x, layer.weight_int8, layer.scale)

                        assert torch.allclose(fused_call(), layer(x), rtol=1e-4, atol=1e-4)
                        fused_ratio = f"{timed(fused_call) / plain:.2f}"
                    except RuntimeError:  # a build without the kernel for this device
                        pass
                error = (layer(x).double() - F.linear(x.double(), w.double())).abs().cpu()
            ratio = (error.numpy() / linear_error_bound(w.double().cpu().numpy(), x.double().cpu().numpy())).max()
            print(f"{name:>32} | {m:>4} | {int8 / plain:>14.2f} | {fused_ratio:>15} | {ratio:>13.3f}"
                  + (f" | {1e3 * plain:>10.3f}" if cuda else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small layers, m = 1 and 16 (about 3 s)")
    parser.add_argument("--tokens", type=int, nargs="+", help="rows m of x (default 1 16 128; quick 1 16)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    cuda = args.device.startswith("cuda")
    machine = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {machine}, {args.device}, {torch.get_num_threads()} thread(s)")
    print()
    memory_table(SHAPES)
    print()
    time_table(shapes, args.tokens or ([1, 16] if args.quick else [1, 16, 128]), args.repeats, args.device)


if __name__ == "__main__":
    main()
