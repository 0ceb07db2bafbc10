"""Benchmark: greedy decoding with and without the KV cache, on this CPU (not a test).

    python benchmarks/kv_cache_decoding.py            # contexts 128, 512, 1024; about a minute
    python benchmarks/kv_cache_decoding.py --quick    # contexts 32, 64, 128; a few seconds

For each context length L: a prompt of L tokens, then ``--new-tokens`` greedy steps, timed step by step.
    cached    prefill the prompt once into new_cache, then feed one token per step (attention reads the cache)
    uncached  run the whole sequence (L .. L + N - 1 tokens) through the model at every step
Both paths run in the same process on the same model and must produce the same tokens (checked). The
cached cost per token grows only with the attention over the cache (O(L) numbers, small next to the
per-token projections at these sizes), so it stays almost flat; the uncached cost grows with L (O(L) of
everything, plus O(L^2) attention). Prefill time is reported apart.

The last table is the cache's size per token: measured from DecoderOnlyLM.new_cache, against
spec.grouped_query_attention.kv_size_per_token (2 * n_kv_head * head_dim numbers per token and layer).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repository root

from implementations.decoder_only import DecoderOnlyLM  # noqa: E402
from spec.grouped_query_attention import kv_size_per_token  # noqa: E402

MODEL = dict(vocab_size=256, d_model=128, n_head=4, n_layer=4, d_ff=512, positions="rope", norm="rms",
             activation="swiglu")


def build(max_len: int, n_kv_head: int | None = None) -> DecoderOnlyLM:
    torch.manual_seed(0)
    return DecoderOnlyLM(**MODEL, max_len=max_len, n_kv_head=n_kv_head).eval()


@torch.inference_mode()
def cached_decode(model: DecoderOnlyLM, prompt: torch.Tensor, new: int) -> tuple[torch.Tensor, float, list[float]]:
    """Greedy decoding with the cache: (tokens, prefill seconds, seconds of each new token)."""
    cache = model.new_cache(batch_size=prompt.shape[0], capacity=prompt.shape[1] + new)
    start = time.perf_counter()
    logits = model(prompt, cache=cache)[:, -1]
    prefill = time.perf_counter() - start
    seq, steps = prompt, []
    for _ in range(new):
        start = time.perf_counter()
        nxt = logits.argmax(dim=-1, keepdim=True)
        logits = model(nxt, cache=cache)[:, -1]
        steps.append(time.perf_counter() - start)
        seq = torch.cat([seq, nxt], dim=1)
    return seq, prefill, steps


@torch.inference_mode()
def uncached_decode(model: DecoderOnlyLM, prompt: torch.Tensor, new: int) -> tuple[torch.Tensor, list[float]]:
    """Greedy decoding without a cache: every step runs the whole sequence. (tokens, seconds per token)."""
    seq, steps = prompt, []
    for _ in range(new):
        start = time.perf_counter()
        nxt = model(seq)[:, -1].argmax(dim=-1, keepdim=True)
        steps.append(time.perf_counter() - start)
        seq = torch.cat([seq, nxt], dim=1)
    return seq, steps


def ms(seconds: list[float]) -> float:
    """Median milliseconds per token: robust to the other jobs of a shared machine (a mean is not)."""
    ordered = sorted(seconds)
    mid = len(ordered) // 2
    return 1e3 * (ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2)


def decoding_table(lengths: list[int], new: int) -> None:
    model = build(max(lengths) + new + 1)
    gen = torch.Generator().manual_seed(0)
    warm = torch.randint(MODEL["vocab_size"], (1, 16), generator=gen)
    cached_decode(model, warm, 4), uncached_decode(model, warm, 4)  # first-call costs out of the table

    header = (f"{'context':>8} | {'cached ms/tok':>13} | {'uncached ms/tok':>15} | {'cached tok/s':>12} | "
              f"{'uncached tok/s':>14} | {'speedup':>7} | {'prefill ms':>10} | same tokens")
    print(header)
    print("-" * len(header))
    first = None
    flat = []
    for length in lengths:
        prompt = torch.randint(MODEL["vocab_size"], (1, length), generator=gen)
        seq_c, prefill, steps_c = cached_decode(model, prompt, new)
        seq_u, steps_u = uncached_decode(model, prompt, new)
        c, u = ms(steps_c), ms(steps_u)
        first = first or c
        flat.append((length, c / first))
        print(f"{length:>8} | {c:>13.3f} | {u:>15.3f} | {1e3 / c:>12.1f} | {1e3 / u:>14.1f} | "
              f"{u / c:>6.1f}x | {1e3 * prefill:>10.1f} | {'yes' if torch.equal(seq_c, seq_u) else 'NO'}")
    print()
    print("cached cost per token relative to the shortest context: "
          + ", ".join(f"L={length}: {r:.2f}x" for length, r in flat))


def cache_size_table(capacity: int) -> None:
    d, h = MODEL["d_model"], MODEL["n_head"]
    header = (f"{'config':>10} | {'n_kv_head':>9} | {'measured / token / layer':>24} | {'spec kv_size_per_token':>22} | "
              f"{'all layers, KiB per token':>25} | {f'KiB at {capacity} tokens':>20}")
    print(header)
    print("-" * len(header))
    for name, g in (("MHA", h), ("GQA", h // 2), ("MQA", 1)):
        model = build(capacity, n_kv_head=None if g == h else g)
        caches = model.new_cache(batch_size=1, capacity=capacity)
        per_layer = (caches[0].keys.numel() + caches[0].values.numel()) // capacity
        spec = kv_size_per_token(d_model=d, n_head=h, n_kv_head=g)
        item = caches[0].keys.element_size()
        all_layers = sum(c.keys.numel() + c.values.numel() for c in caches) * item
        print(f"{name:>10} | {g:>9} | {per_layer:>24} | {spec:>22} | {all_layers / capacity / 1024:>25.2f} | "
              f"{all_layers / 1024:>20.1f}" + ("" if per_layer == spec else "   MISMATCH"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short contexts and few tokens (seconds)")
    parser.add_argument("--lengths", type=int, nargs="+", help="context lengths (default 128 512 1024)")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per context (default 32; quick 8)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: small decode steps suffer from thread contention)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lengths = args.lengths or ([32, 64, 128] if args.quick else [128, 512, 1024])
    new = args.new_tokens or (8 if args.quick else 32)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), "
          f"float32, batch 1")
    print(f"model: {MODEL}; {new} greedy tokens after each prompt")
    print()
    start = time.perf_counter()
    decoding_table(lengths, new)
    print()
    cache_size_table(max(lengths))
    print(f"\n(total {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
