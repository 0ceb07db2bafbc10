"""Benchmark: tiled attention (online softmax over key blocks) against the plain computation and PyTorch's
F.scaled_dot_product_attention, side by side in one run (not a test).

    python benchmarks/tiled_attention.py                  # s = t = 256 .. 2048 on the CPU (~30 s)
    python benchmarks/tiled_attention.py --quick          # s = t = 128 .. 512 (~3 s)
    python benchmarks/tiled_attention.py --device cuda    # on a GPU: absolute times and CUDA peak memory too

For each length s (= t, causal, b 1, h 8, e 64, float32, one CPU thread by default):
    memory  the peak bytes of the tensors the attention call creates (inputs excluded), naive (our readable
            SDPA: the (s, t) scores, then softmax) against tiled (ours, block_size 128), forward under
            no_grad; and the bytes autograd saves for backward (inputs excluded) when gradients are needed.
            On the CPU the peak is followed through every torch call of the Python code (a TorchFunctionMode
            and the created storages' lifetimes: properties/probes.py's CreatedTensors), so it
            cannot see inside F.scaled_dot_product_attention's fused kernel, which is left out there; on CUDA
            torch.cuda.max_memory_allocated measures all three.
    time    the median forward (and forward + backward) time of tiled and naive relative to
            F.scaled_dot_product_attention (its default backend: flash attention on this CPU), the three taking
            turns (three rounds of median_seconds); ratios only on the CPU (a shared machine); absolute
            milliseconds as well on CUDA.
The three outputs are checked to agree before anything is timed.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repository root

from implementations.sdpa import scaled_dot_product_attention as naive_attention  # noqa: E402
from implementations.tiled_attention import tiled_attention  # noqa: E402
from properties.probes import CreatedTensors, saved_for_backward  # noqa: E402
from activation_checkpointing import interleaved_medians  # noqa: E402  (benchmarks/, the ways take turns)

SHAPE = dict(b=1, h=8, e=64)


def inputs(s: int, device: str, dtype: torch.dtype, grad: bool = False) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(s)
    b, h, e = SHAPE["b"], SHAPE["h"], SHAPE["e"]
    return tuple(torch.randn(b, h, s, e, generator=gen).to(device=device, dtype=dtype).requires_grad_(grad)
                 for _ in range(3))


def paths(block: int) -> dict[str, object]:
    return {
        "naive": lambda q, k, v: naive_attention(q, k, v, causal=True),
        "tiled": lambda q, k, v: tiled_attention(q, k, v, causal=True, block_size=block)[0],
        "F.sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),  # s = t: same triangle
    }


def cpu_peak(fn, q, k, v) -> int:
    """Peak bytes of the tensors created by ``fn(q, k, v)`` under no_grad (inputs excluded)."""
    with torch.no_grad(), CreatedTensors(live=True) as created:
        fn(q, k, v)
    return created.peak


def cuda_peak(fn, q, k, v, *, backward: bool) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    if backward:
        fn(q, k, v).sum().backward()
    else:
        with torch.no_grad():
            fn(q, k, v)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def saved_bytes(fn, q, k, v) -> int:
    _, saved = saved_for_backward(lambda: fn(q, k, v), exclude=(q, k, v))
    return sum(saved.values())


def step_of(fn, q, k, v, *, backward: bool, cuda: bool):
    def step():
        if backward:
            for a in (q, k, v):
                a.grad = None
            fn(q, k, v).sum().backward()
        else:
            with torch.no_grad():
                fn(q, k, v)
        if cuda:
            torch.cuda.synchronize()

    return step


def mib(n: int) -> str:
    return f"{n / 2**20:8.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--quick", action="store_true", help="lengths 128, 256, 512 and fewer repeats")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or float16/bfloat16 (CUDA default)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    lengths = [128, 256, 512] if args.quick else args.lengths
    repeats = 3 if args.quick else args.repeats
    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype or ("float16" if cuda else "float32"))
    torch.set_num_threads(args.threads)
    fns = paths(args.block_size)
    where = torch.cuda.get_device_name() if cuda else f"{platform.machine()}, {args.threads} thread(s)"
    print(f"torch {torch.__version__}, {where}, {str(dtype).removeprefix('torch.')}, b={SHAPE['b']} "
          f"h={SHAPE['h']} e={SHAPE['e']}, causal, tiled block_size={args.block_size}\n")

    rows = []
    for s in lengths:
        q, k, v = inputs(s, args.device, dtype)
        outs = {name: fn(q, k, v) for name, fn in fns.items()}
        worst = max((outs[n].float() - outs["F.sdpa"].float()).abs().max().item() for n in ("naive", "tiled"))
        qg, kg, vg = inputs(s, args.device, dtype, grad=True)
        row = {"s": s, "agree": worst}
        if cuda:
            for name, fn in fns.items():
                row[f"peak {name}"] = cuda_peak(fn, q, k, v, backward=False)
                row[f"train peak {name}"] = cuda_peak(fn, qg, kg, vg, backward=True)
        else:
            row["peak naive"], row["peak tiled"] = (cpu_peak(fns[n], q, k, v) for n in ("naive", "tiled"))
        row["saved naive"], row["saved tiled"] = (saved_bytes(fns[n], qg, kg, vg) for n in ("naive", "tiled"))
        for mode, args_ in (("fwd", (q, k, v)), ("fwd+bwd", (qg, kg, vg))):
            steps = {name: step_of(fn, *args_, backward=mode != "fwd", cuda=cuda) for name, fn in fns.items()}
            row |= {f"{mode} {name}": t for name, t in interleaved_medians(steps, repeats).items()}
        rows.append(row)

    print("memory (MiB): forward peak of the tensors the call creates, and bytes saved for backward")
    head = f"{'s':>6} | {'fwd naive':>9} | {'fwd tiled':>9} | {'naive/tiled':>11} | {'saved naive':>11} | " \
           f"{'saved tiled':>11} | {'naive/tiled':>11}"
    if cuda:
        head += f" | {'fwd F.sdpa':>10} | {'train naive':>11} | {'train tiled':>11} | {'train F.sdpa':>12}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        line = (f"{r['s']:>6} | {mib(r['peak naive']):>9} | {mib(r['peak tiled']):>9} | "
                f"{r['peak naive'] / r['peak tiled']:>10.1f}x | {mib(r['saved naive']):>11} | "
                f"{mib(r['saved tiled']):>11} | {r['saved naive'] / r['saved tiled']:>10.1f}x")
        if cuda:
            line += (f" | {mib(r['peak F.sdpa']):>10} | {mib(r['train peak naive']):>11} | "
                     f"{mib(r['train peak tiled']):>11} | {mib(r['train peak F.sdpa']):>12}")
        print(line)
    first = rows[0]
    print("\ngrowth of the forward peak from s =", first["s"], ":",
          ", ".join(f"s={r['s']}: naive {r['peak naive'] / first['peak naive']:.1f}x, "
                    f"tiled {r['peak tiled'] / first['peak tiled']:.1f}x" for r in rows[1:]),
          f"(s grows {rows[-1]['s'] // first['s']}x)")

    print("\ntime relative to F.scaled_dot_product_attention (1.00 = as fast; larger = slower)")
    head = f"{'s':>6} | {'fwd naive':>9} | {'fwd tiled':>9} | {'fwd+bwd naive':>13} | {'fwd+bwd tiled':>13}"
    if cuda:
        head += f" | {'F.sdpa fwd ms':>13} | {'F.sdpa fwd+bwd ms':>17}"
    print(head + " | outputs agree to\n" + "-" * (len(head) + 19))
    for r in rows:
        fwd, both = (r[f"fwd {n}"] / r["fwd F.sdpa"] for n in ("naive", "tiled")), \
            (r[f"fwd+bwd {n}"] / r["fwd+bwd F.sdpa"] for n in ("naive", "tiled"))
        line = f"{r['s']:>6} | " + " | ".join(f"{x:>9.2f}" for x in fwd) + " | " + " | ".join(f"{x:>13.2f}" for x in both)
        if cuda:
            line += f" | {1e3 * r['fwd F.sdpa']:>13.3f} | {1e3 * r['fwd+bwd F.sdpa']:>17.3f}"
        print(line + f" | {r['agree']:.1e}")


if __name__ == "__main__":
    main()
