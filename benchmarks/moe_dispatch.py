"""Benchmark: sparse MoE dispatch against the dense reference computation, at 8 experts (not a test).

    python benchmarks/moe_dispatch.py             # 256, 1024, 4096 tokens; top-1 and top-2; ~20 s
    python benchmarks/moe_dispatch.py --quick     # 128 and 512 tokens; a few seconds
    python benchmarks/moe_dispatch.py --tokens 2048 --experts 8 --top-k 2 --threads 2

For each token count T and top_k, on our MixtureOfExperts (SwiGLU experts, float32, no capacity):
    sparse   ``MixtureOfExperts.forward``: each expert runs on the tokens routed to it only (k*T expert rows)
    dense    ``dense_mixture``: every expert on every token (m*T expert rows), weighted by the gates, as the
             spec's float64 reference does (spec.mixture_of_experts.mixture_of_experts)
Both run in the same process on the same module and input and must agree (max |difference| printed); the
numpy float64 reference itself is timed once, at the smallest T, and checked against both. Times are
medians of ``--repeats`` forward passes (inference mode), after one warm-up call. The expert work of the
sparse path is k/m of the dense one; the router, the dispatch bookkeeping and Python's loop over the m
experts are its overhead, which decides the speedup at small T.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repository root

from timing import median_seconds  # noqa: E402 (benchmarks/timing.py)
from implementations.mixture_of_experts import MixtureOfExperts, dense_mixture  # noqa: E402
from spec.mixture_of_experts import mixture_of_experts as reference  # noqa: E402

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--top-k", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="128 and 512 tokens, 3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.repeats = [128, 512], 3
    torch.set_num_threads(args.threads)
    m = args.experts
    print(f"torch {torch.__version__}, {platform.machine()}, {args.threads} thread(s), float32, "
          f"d_model {args.d_model}, d_ff {args.d_ff}, {m} SwiGLU experts, no capacity; medians of {args.repeats}")
    print()
    header = (f"{'tokens':>7} | {'top_k':>5} | {'sparse ms':>9} | {'dense ms':>8} | {'speedup':>7} | "
              f"{'expert rows sparse/dense':>24} | {'max |sparse - dense|':>20}")
    print(header)
    print("-" * len(header))
    started = time.perf_counter()
    checked_reference = False
    for k in args.top_k:
        torch.manual_seed(0)
        moe = MixtureOfExperts(d_model=args.d_model, d_ff=args.d_ff, n_experts=m, top_k=k).eval()
        for tokens in args.tokens:
            x = torch.randn(1, tokens, args.d_model)
            with torch.inference_mode():
                sparse_out, dense_out = moe(x), dense_mixture(moe, x)
                sparse = median_seconds(lambda: moe(x), args.repeats, warm_up=True)
                dense = median_seconds(lambda: dense_mixture(moe, x), args.repeats, warm_up=True)
            diff = (sparse_out - dense_out).abs().max().item()
            print(f"{tokens:>7} | {k:>5} | {1e3 * sparse:>9.2f} | {1e3 * dense:>8.2f} | {dense / sparse:>6.2f}x | "
                  f"{f'{k * tokens} / {m * tokens}':>24} | {diff:>20.2e}")
            if not checked_reference:
                checked_reference = True
                params = {n: p.detach().double().numpy() for n, p in moe.state_dict().items()}
                xs = x.double().numpy()
                start = time.perf_counter()
                ref = reference(params, xs, n_experts=m, top_k=k)
                ref_time = time.perf_counter() - start
                ref_note = (f"  numpy float64 reference (every expert on every token): {1e3 * ref_time:.1f} ms at "
                            f"{tokens} tokens, top_k {k}; max |sparse - reference| "
                            f"{np.abs(sparse_out.double().numpy() - ref).max():.2e}, "
                            f"max |dense - reference| {np.abs(dense_out.double().numpy() - ref).max():.2e}")
    print()
    print(ref_note)
    print(f"\n(total {time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
