"""Benchmark: a paged KV cache against contiguous per-sequence caches, memory and attention time (not a test).

    python benchmarks/paged_kv_cache.py               # 32 sequences of 16 .. 2048 positions (~25 s on a CPU)
    python benchmarks/paged_kv_cache.py --quick       # 8 sequences of 16 .. 512 positions (about a second)
    python benchmarks/paged_kv_cache.py --batch 256 --max-len 8192 --device cuda

A batch of sequences with mixed lengths (uniform in 16 .. max_len, seeded) is cached two ways:
    paged       one PagedKVCache pool; each sequence owns ceil(L / pb) blocks of pb positions, appended in
                chunks of 64 taking turns, so its blocks are scattered through the pool
    contiguous  one (g, max_len, e) cache per sequence, preallocated at the longest length a sequence may
                reach (a static cache); attention reads it padded to the batch's longest sequence with a
                key-padding mask (the plain path)
Memory: the KV slots each way reserves against the slots the sequences fill (fragmentation: what is
reserved and never filled), for several block sizes. Time: one decode query per sequence, paged_attention
against scaled_dot_product_attention on the padded contiguous cache, side by side in one run, as a ratio
(outputs checked equal). Absolute times are printed on CUDA only.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repository root

from implementations.paged_kv_cache import PagedKVCache, paged_attention  # noqa: E402
from implementations.sdpa import scaled_dot_product_attention  # noqa: E402
from spec.paged_kv_cache import blocks_needed  # noqa: E402
from timing import median_seconds  # noqa: E402 (benchmarks/timing.py)

N_HEAD, N_KV_HEAD, HEAD_DIM, CHUNK = 16, 4, 64, 64


def memory_table(lengths: list[int], max_len: int, block_sizes: list[int], measured: tuple[int, int]) -> None:
    """Slots reserved by each layout and the share of them never filled."""
    filled = sum(lengths)
    mib = lambda slots: slots * 2 * N_KV_HEAD * HEAD_DIM * 4 / 2**20  # noqa: E731 (keys and values, float32)
    rows = [("contiguous, preallocated at max_len", len(lengths) * max_len),
            ("contiguous, padded to the longest", len(lengths) * max(lengths))]
    rows += [(f"paged, block size {p}", sum(blocks_needed(n, p) for n in lengths) * p) for p in block_sizes]
    header = f"{'layout':>36} | {'slots':>9} | {'MiB':>8} | {'never filled':>12}"
    print(header)
    print("-" * len(header))
    for name, slots in rows:
        print(f"{name:>36} | {slots:>9} | {mib(slots):>8.1f} | {100 * (slots - filled) / slots:>11.1f}%")
    print(f"{'filled by the sequences':>36} | {filled:>9} | {mib(filled):>8.1f} |")
    p, owned = measured
    print(f"\nmeasured from the PagedKVCache (block size {p}): {owned} blocks owned = {owned * p} slots")


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="8 sequences of 16 .. 512 positions, 5 repeats")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.max_len, args.repeats = 8, 512, 5
    torch.set_num_threads(args.threads)
    device, p = args.device, args.block_size
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, args.max_len + 1, (args.batch,), generator=gen).tolist()
    print(f"torch {torch.__version__}, {platform.machine()}, device {device}, {args.threads} thread(s), float32; "
          f"{args.batch} sequences of {min(lengths)} .. {max(lengths)} positions (max_len {args.max_len}), "
          f"{N_HEAD} query heads, {N_KV_HEAD} KV heads, head_dim {HEAD_DIM}")
    print()
    started = time.perf_counter()

    keys = [torch.randn(N_KV_HEAD, n, HEAD_DIM, generator=gen).to(device) for n in lengths]
    values = [torch.randn(N_KV_HEAD, n, HEAD_DIM, generator=gen).to(device) for n in lengths]
    cache = PagedKVCache(num_blocks=sum(blocks_needed(n, p) for n in lengths), block_size=p, n_kv_head=N_KV_HEAD,
                         head_dim=HEAD_DIM, device=device)
    for start in range(0, max(lengths), CHUNK):  # sequences take turns: their blocks interleave in the pool
        for i, n in enumerate(lengths):
            if start < n:
                cache.append(i, keys[i][:, start : start + CHUNK], values[i][:, start : start + CHUNK])
    memory_table(lengths, args.max_len, sorted({8, 16, 32, 128, p}), (p, cache.key_blocks.shape[0] - cache.num_free_blocks))

    padded_k = torch.zeros(args.batch, N_KV_HEAD, max(lengths), HEAD_DIM, device=device)
    padded_v = torch.zeros_like(padded_k)
    for i, n in enumerate(lengths):
        padded_k[i, :, :n], padded_v[i, :, :n] = keys[i], values[i]
    keep = (torch.arange(max(lengths), device=device) < torch.tensor(lengths, device=device)[:, None])[:, None, None]
    q = torch.randn(args.batch, N_HEAD, 1, HEAD_DIM, generator=gen).to(device)
    tables, lens = cache.batch(list(range(args.batch)))

    def timed(fn) -> float:
        def call() -> None:
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
        return median_seconds(call, args.repeats, warm_up=True)

    paged = lambda: paged_attention(q, cache.key_blocks, cache.value_blocks, tables, lens)  # noqa: E731
    contiguous = lambda: scaled_dot_product_attention(q, padded_k, padded_v, mask=keep)  # noqa: E731
    diff = (paged() - contiguous()).abs().max().item()
    paged_time, contiguous_time = timed(paged), timed(contiguous)
    print()
    absolute = (f"paged {1e3 * paged_time:.3f} ms, contiguous {1e3 * contiguous_time:.3f} ms; "
                if device == "cuda" else "")
    print(f"decode attention, one query per sequence (block size {p}, medians of {args.repeats}): {absolute}"
          f"paged / contiguous time = {paged_time / contiguous_time:.2f}x; max |paged - contiguous| = {diff:.2e}")
    print(f"\n(total {time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
