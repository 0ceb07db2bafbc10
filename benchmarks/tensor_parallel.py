"""Benchmark: communication volume of tensor-parallel layers, computed and measured (not a test).

    python benchmarks/tensor_parallel.py            # d_model 512, d_ff 2048, 8 heads / 2 KV heads, b 2 x s 128
    python benchmarks/tensor_parallel.py --quick    # d_model 128, d_ff 512, b 1 x s 32
    python benchmarks/tensor_parallel.py --d-model 1024 --d-ff 4096 --tokens 512 --dtype float32

Two processes (tp = 2) are forked and joined in a gloo process group (a file rendezvous, loopback TCP).
Each builds its rank of our TensorParallelFeedForward, TensorParallelSwiGLU and TensorParallelAttention
(and the two linears alone) and runs one forward and one backward pass, with ``torch.distributed.all_reduce``
wrapped to count the collectives and the elements they carry. The computed column is Megatron-LM's
accounting (Shoeybi et al. 2019, section 3): one all-reduce of the (b, s, d) activations in the forward pass
of each block (g, after its row-parallel stage) and one in the backward pass (f, before its column-parallel
stage); a column-parallel linear alone all-reduces its (b, s, i) input gradient, a row-parallel one its (b, s, o)
output. Bytes per rank use the ring all-reduce's 2 (tp - 1) / tp times the tensor (reduce-scatter, then all-gather).
Parameters per rank are counted from the built modules, against the unsharded module's (the row-parallel
bias is replicated). Last, one all-reduce of the (b, s, d) activations is timed alone (both ranks in step
after a barrier; loopback TCP: a floor, not a network).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repository root

from implementations import tensor_parallel as tp  # noqa: E402

WORLD_SIZE = 2


def layers(d: int, f: int, h: int, g: int) -> dict[str, tuple[type, dict, int]]:
    """name -> (class, keywords, the unsharded module's parameter count). The column-parallel linear maps
    d -> f and the row-parallel one f -> d, as the two halves of the feed-forward block."""
    e = d // h
    return {
        "ColumnParallelLinear": (tp.ColumnParallelLinear, {"in_features": d, "out_features": f}, d * f + f),
        "RowParallelLinear": (tp.RowParallelLinear, {"in_features": f, "out_features": d}, f * d + d),
        "TensorParallelFeedForward": (tp.TensorParallelFeedForward, {"d_model": d, "d_ff": f}, 2 * d * f + f + d),
        "TensorParallelSwiGLU": (tp.TensorParallelSwiGLU, {"d_model": d, "d_ff": f}, 3 * d * f),
        "TensorParallelAttention": (tp.TensorParallelAttention, {"d_model": d, "n_head": h, "n_kv_head": g},
                                    2 * d * d + 2 * d * g * e + 2 * d + 2 * g * e),
    }


def computed(name: str, tokens: int, d: int) -> tuple[list[int], list[int]]:
    """Megatron's all-reduces (forward, backward) of one step of one layer, as their element counts: the
    column-parallel linear all-reduces its (b, s, d) input gradient, the row-parallel one its (b, s, d) output,
    and each block does both."""
    if name == "ColumnParallelLinear":
        return [], [tokens * d]
    if name == "RowParallelLinear":
        return [tokens * d], []
    return [tokens * d], [tokens * d]


class Counter:
    """Stands in for dist.all_reduce, recording the number of elements of every call by phase."""

    def __init__(self) -> None:
        self.calls: dict[str, list[int]] = {"forward": [], "backward": []}
        self.phase = "forward"
        self.all_reduce = dist.all_reduce

    def __call__(self, tensor, *args, **kwargs):
        self.calls[self.phase].append(tensor.numel())
        return self.all_reduce(tensor, *args, **kwargs)


def rank_main(rank: int, rendezvous: str, args, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD_SIZE)
    dtype = getattr(torch, args.dtype)
    b, s, d, f = args.batch, args.tokens, args.d_model, args.d_ff
    rows = []
    for name, (cls, keywords, _) in layers(d, f, args.heads, args.kv_heads).items():
        torch.manual_seed(0)
        module = cls(**keywords, world_size=WORLD_SIZE, rank=rank).to(dtype)
        i = f // WORLD_SIZE if name == "RowParallelLinear" else d  # the row-parallel input is this rank's slice
        x = torch.randn(b, s, i, dtype=dtype, requires_grad=True)
        counter = Counter()
        dist.all_reduce = counter  # implementations.tensor_parallel calls dist.all_reduce through the module
        out = module(x)
        counter.phase = "backward"
        out.backward(torch.ones_like(out))
        dist.all_reduce = counter.all_reduce
        params = sum(p.numel() for p in module.parameters())
        rows.append((name, counter.calls["forward"], counter.calls["backward"], params))
    # The collective alone, both ranks in step (the per-layer calls above also wait for the slower rank).
    activations = torch.randn(b * s * d, dtype=dtype)
    seconds = []
    for _ in range(args.repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(activations)
        seconds.append(time.perf_counter() - start)
    queue.put((rank, (rows, statistics.median(seconds))))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ff", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20, help="timings of the all-reduce alone")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    args = parser.parse_args()
    if args.quick:
        args.d_model, args.d_ff, args.batch, args.tokens = 128, 512, 1, 32
    context = multiprocessing.get_context("fork")
    queue = context.SimpleQueue()
    with tempfile.TemporaryDirectory() as folder:  # a file rendezvous: no port to find
        rendezvous = str(Path(folder) / "rendezvous")
        processes = [context.Process(target=rank_main, args=(rank, rendezvous, args, queue))
                     for rank in range(WORLD_SIZE)]
        for p in processes:
            p.start()
        results = dict(queue.get() for _ in processes)
        for p in processes:
            p.join()

    b, s, d, f = args.batch, args.tokens, args.d_model, args.d_ff
    size = torch.tensor([], dtype=getattr(torch, args.dtype)).element_size()
    ring = 2 * (WORLD_SIZE - 1) / WORLD_SIZE
    print(f"torch {torch.__version__}, gloo over loopback, tp = {WORLD_SIZE}, {args.dtype}, b {b} x s {s}, "
          f"d_model {d}, d_ff {f}, heads {args.heads} / KV heads {args.kv_heads}")
    header = (f"{'layer':>26} | {'all-reduces fwd / bwd':>21} | {'elements computed':>19} | "
              f"{'elements measured':>19} | {'KiB sent/rank/step':>18} | {'params/rank of unsharded':>24}")
    print(header)
    print("-" * len(header))
    print(f"{'':>26} | {'measured (computed)':>21} |")
    rows, seconds = results[0]
    unsharded_counts = [count for _, _, count in layers(d, f, args.heads, args.kv_heads).values()]
    for (name, forward, backward, params), unsharded in zip(rows, unsharded_counts):
        for rank in range(1, WORLD_SIZE):  # every rank makes the same collectives, or they would never return
            other = next(r for r in results[rank][0] if r[0] == name)
            assert (other[1], other[2]) == (forward, backward), name
        want = computed(name, b * s, d)
        got = (forward, backward)
        show = lambda pair: f"{sum(pair[0])} / {sum(pair[1])}"
        mark = "" if got == want else "  <- differs from the computed"
        kib = ring * (sum(got[0]) + sum(got[1])) * size / 1024
        counts = f"{len(got[0])} / {len(got[1])} ({len(want[0])} / {len(want[1])})"
        print(f"{name:>26} | {counts:>21} | {show(want):>19} | "
              f"{show(got):>19} | {kib:>18.1f} | {f'{params} of {unsharded}':>24}{mark}")
    per_layer = 4 * b * s * d  # attention and feed-forward: one all-reduce each way each
    others = [results[rank][1] for rank in range(1, WORLD_SIZE)]
    print(f"\nA transformer layer (attention + feed-forward) all-reduces b*s*d = {b * s * d} elements 4 times per "
          f"training step (2 forward, 2 backward): {ring * per_layer * size / 2**20:.2f} MiB sent per rank (ring, "
          f"2(tp-1)/tp of each tensor); 2 times in a forward pass only. One all-reduce of {b * s * d} elements "
          f"alone: {seconds * 1e3:.2f} ms median on rank 0 ({', '.join(f'{t * 1e3:.2f}' for t in others)} on the "
          "others), loopback TCP.")


if __name__ == "__main__":
    main()
