"""Benchmark: decoding with a rolling KV cache of `window` positions against a full KV cache (not a test).

    python benchmarks/sliding_window.py               # window 256, contexts 256 .. 8192 (~15 s on a CPU)
    python benchmarks/sliding_window.py --quick       # window 64, contexts 64 .. 1024 (a few seconds)
    python benchmarks/sliding_window.py --window 4096 --lengths 4096 16384 --device cuda

One SlidingWindowAttention layer (Mistral's shape scaled down: d_model 256, 8 heads, 2 KV heads, RoPE),
decoded two ways with the same weights, side by side in one run:
    rolling  a RollingKVCache of `window` slots: attention reads the held window plus the new token
    full     a KVCache of every position (the plain path): GroupedQueryAttention with the banded mask
             over all cached keys
For each context length L, both prefill L tokens (in chunks of `window`), then decode --new-tokens tokens
one at a time; the outputs must agree (checked). Reported: cache bytes after L + new tokens (rolling stays
2 * b * g * w * e numbers, full grows with L) and the time per decoded token as a ratio full / rolling.
Absolute times are printed on CUDA only: on a shared CPU only the ratio measured in one run means anything.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repository root

from implementations.grouped_query_attention import GroupedQueryAttention  # noqa: E402
from implementations.kv_cache import KVCache  # noqa: E402
from implementations.rotary_embedding import RotaryEmbedding  # noqa: E402
from implementations.sliding_window import RollingKVCache, SlidingWindowAttention, sliding_window_mask  # noqa: E402
from timing import median_seconds  # noqa: E402 (benchmarks/timing.py)

D_MODEL, N_HEAD, N_KV_HEAD = 256, 8, 2


def cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for t in (cache.keys, cache.values))


@torch.inference_mode()
def run(length: int, window: int, new: int, repeats: int, device: str) -> tuple[int, int, float, float, float]:
    """(rolling bytes, full bytes for ``length`` positions, rolling s/token, full s/token, max |rolling - full|)
    at context ``length``."""
    torch.manual_seed(0)
    rotary = RotaryEmbedding(head_dim=D_MODEL // N_HEAD)
    swa = SlidingWindowAttention(d_model=D_MODEL, n_head=N_HEAD, n_kv_head=N_KV_HEAD, window=window,
                                 rotary=rotary).to(device).eval()
    gqa = GroupedQueryAttention(d_model=D_MODEL, n_head=N_HEAD, n_kv_head=N_KV_HEAD, rotary=rotary).to(device).eval()
    gqa.load_state_dict(swa.state_dict())  # the same q, k, v, o
    steps = new + repeats + 1  # the decode check, then the timed steps (and the timer's warm-up)
    x = torch.randn(1, length + steps, D_MODEL, device=device)
    head_dim = D_MODEL // N_HEAD
    rolling = RollingKVCache(batch_size=1, n_kv_head=N_KV_HEAD, head_dim=head_dim, window=window, device=device)
    full = KVCache(batch_size=1, n_kv_head=N_KV_HEAD, head_dim=head_dim, capacity=length + steps, device=device)

    def full_step(chunk: torch.Tensor) -> torch.Tensor:
        s, t = chunk.shape[1], full.length + chunk.shape[1]
        return gqa(chunk, mask=sliding_window_mask(s, t, window=window, device=device), cache=full)

    for start in range(0, length, window):  # prefill in chunks of the window
        swa(x[:, start : min(start + window, length)], cache=rolling)
        full_step(x[:, start : min(start + window, length)])
    position, diff = length, 0.0
    for _ in range(new):
        token = x[:, position : position + 1]
        diff = max(diff, (swa(token, cache=rolling) - full_step(token)).abs().max().item())
        position += 1
    cursor = {"rolling": position, "full": position}

    def decode(which: str) -> None:
        token = x[:, cursor[which] : cursor[which] + 1]
        swa(token, cache=rolling) if which == "rolling" else full_step(token)
        cursor[which] += 1
        if device == "cuda":
            torch.cuda.synchronize()

    rolling_time = median_seconds(lambda: decode("rolling"), repeats, warm_up=True)
    full_time = median_seconds(lambda: decode("full"), repeats, warm_up=True)
    return cache_bytes(rolling), cache_bytes(full) // full.capacity * length, rolling_time, full_time, diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096, 8192])
    parser.add_argument("--new-tokens", type=int, default=8, help="decoded tokens checked against the full cache")
    parser.add_argument("--repeats", type=int, default=21, help="decoded tokens timed per path (median)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="window 64, contexts 64 .. 1024, 9 repeats")
    args = parser.parse_args()
    if args.quick:
        args.window, args.lengths, args.repeats = 64, [64, 256, 1024], 9
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    print(f"torch {torch.__version__}, {platform.machine()}, device {args.device}, {args.threads} thread(s), float32, "
          f"batch 1; SlidingWindowAttention d_model {D_MODEL}, {N_HEAD} heads, {N_KV_HEAD} KV heads, RoPE, "
          f"window {args.window}; medians of {args.repeats} decoded tokens")
    print()
    header = (f"{'context':>8} | {'rolling KiB':>11} | {'full KiB':>9} | {'full / rolling memory':>21} | "
              + (f"{'rolling ms/tok':>14} | {'full ms/tok':>11} | " if cuda else "")
              + f"{'full / rolling time':>19} | {'max |rolling - full|':>20}")
    print(header)
    print("-" * len(header))
    started = time.perf_counter()
    for length in args.lengths:
        rb, fb, rt, ft, diff = run(length, args.window, args.new_tokens, args.repeats, args.device)
        times = f"{1e3 * rt:>14.3f} | {1e3 * ft:>11.3f} | " if cuda else ""
        print(f"{length:>8} | {rb / 1024:>11.1f} | {fb / 1024:>9.1f} | {fb / rb:>20.2f}x | {times}{ft / rt:>18.2f}x | "
              f"{diff:>20.2e}")
    print(f"\n(total {time.perf_counter() - started:.1f} s; full KiB: the context's positions, not the capacity)")


if __name__ == "__main__":
    main()
