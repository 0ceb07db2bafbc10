"""Benchmark: KV cache bytes per token of multi-head latent attention against MHA, GQA and MQA (not a test).

    python benchmarks/mla_cache.py                 # DeepSeek-V2, DeepSeek-V3 and a small model, bfloat16
    python benchmarks/mla_cache.py --dtype float32 --context 32768

For each configuration the cache is allocated (batch 1, capacity 1) and its bytes per token and layer are
measured from its tensors: MLA's LatentKVCache holds the latent and the rotated shared key, (d_c + d_h^R)
numbers (DeepSeek-V2, Table 1); a KVCache of the same head width d_h and n_head query heads holds 2 g d_h
(g = n_head for MHA, g groups for GQA, 1 for MQA). Each measurement is checked against the spec's formula
(spec.multi_head_latent_attention.mla_cache_numbers_per_token, spec.grouped_query_attention.kv_size_per_token).
"Equivalent GQA groups" is (d_c + d_h^R) / (2 d_h): the paper's "GQA with only 2.25 groups" for DeepSeek-V2.

Before the table, a small MLA decodes a sequence one token at a time through its latent cache, in both the
naive and the absorbed form, and must reproduce the full pass (a check that the cache measured is the cache
that works).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repository root

from implementations.kv_cache import KVCache  # noqa: E402
from implementations.multi_head_latent_attention import LatentKVCache, MultiHeadLatentAttention  # noqa: E402
from implementations.rotary_embedding import RotaryEmbedding  # noqa: E402
from spec.grouped_query_attention import kv_size_per_token  # noqa: E402
from spec.multi_head_latent_attention import mla_cache_numbers_per_token  # noqa: E402

# name: (d_model, n_head, head_dim d_h, kv_rank d_c, rope_dim d_h^R, layers, GQA groups to compare)
CONFIGS = {
    "DeepSeek-V2": (5120, 128, 128, 512, 64, 60, 8),
    "DeepSeek-V3": (7168, 128, 128, 512, 64, 61, 8),
    "small (d_c = 4 d_h, d_h^R = d_h / 2)": (128, 4, 32, 128, 16, 4, 2),
}


def bytes_per_token(tensors: list[torch.Tensor], capacity: int) -> int:
    return sum(t.numel() * t.element_size() for t in tensors) // capacity


def measured(kind: str, *, n_head: int, head_dim: int, kv_rank: int, rope_dim: int, groups: int,
             dtype: torch.dtype) -> tuple[int, int]:
    """(bytes per token and layer measured from an allocated cache, numbers by the spec's formula)."""
    if kind == "MLA":
        cache = LatentKVCache(batch_size=1, kv_rank=kv_rank, rope_dim=rope_dim, capacity=1, dtype=dtype)
        return (bytes_per_token([cache.latents, cache.rope_keys], 1),
                mla_cache_numbers_per_token(kv_rank=kv_rank, rope_dim=rope_dim))
    g = {"MHA": n_head, "GQA": groups, "MQA": 1}[kind]
    cache = KVCache(batch_size=1, n_kv_head=g, head_dim=head_dim, capacity=1, dtype=dtype)
    return (bytes_per_token([cache.keys, cache.values], 1),
            kv_size_per_token(d_model=n_head * head_dim, n_head=n_head, n_kv_head=g))


def decoding_check() -> None:
    """A small MLA decoded one token at a time through its latent cache equals the full pass."""
    torch.manual_seed(0)
    d, h, e, l, r, s = 64, 4, 16, 64, 8, 24
    mla = MultiHeadLatentAttention(d_model=d, n_head=h, head_dim=e, kv_rank=l, q_rank=48, rope_dim=r,
                                   rotary=RotaryEmbedding(head_dim=r)).double().eval()
    x = torch.randn(2, s, d, dtype=torch.float64)
    with torch.no_grad():
        full = mla(x, causal=True)
        for absorbed in (False, True):
            cache = LatentKVCache(batch_size=2, kv_rank=l, rope_dim=r, capacity=s, dtype=torch.float64)
            steps = torch.cat([mla(x[:, i : i + 1], causal=True, cache=cache, absorbed=absorbed) for i in range(s)], 1)
            err = float((steps - full).abs().max())
            form = "absorbed" if absorbed else "naive"
            print(f"decoding check ({form} form, {s} tokens one at a time, float64): max |cached - full| = {err:.2e}"
                  f" ({'ok' if err < 1e-9 else 'MISMATCH'}); cache holds {cache.numbers_per_token} numbers per token")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--context", type=int, default=131072, help="tokens for the per-sequence totals")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, cache dtype {args.dtype}, per-sequence totals at {args.context} tokens\n")
    decoding_check()
    for name, (d, h, e, l, r, layers, groups) in CONFIGS.items():
        print(f"\n{name}: d_model {d}, n_head {h}, d_h {e}, d_c {l}, d_h^R {r}, {layers} layers; "
              f"equivalent GQA groups (d_c + d_h^R) / (2 d_h) = {(l + r) / (2 * e):g}")
        header = (f"{'cache':>14} | {'numbers/token/layer':>19} | {'formula':>22} | {'bytes/token/layer':>17} | "
                  f"{'KiB/token (all layers)':>22} | {'GiB per sequence':>16} | {'vs MHA':>7}")
        print(header)
        print("-" * len(header))
        mha_bytes = measured("MHA", n_head=h, head_dim=e, kv_rank=l, rope_dim=r, groups=groups, dtype=dtype)[0]
        for kind, formula in (("MHA", "2 n_h d_h"), ("GQA", f"2 n_g d_h, n_g = {groups}"), ("MQA", "2 d_h"),
                              ("MLA", "d_c + d_h^R")):
            got, numbers = measured(kind, n_head=h, head_dim=e, kv_rank=l, rope_dim=r, groups=groups, dtype=dtype)
            assert got == numbers * torch.finfo(dtype).bits // 8, f"{kind}: measured {got} bytes, formula {numbers}"
            label = kind if kind != "GQA" else f"GQA ({groups} groups)"
            print(f"{label:>14} | {got // (torch.finfo(dtype).bits // 8):>19} | {formula:>22} | {got:>17} | "
                  f"{got * layers / 1024:>22.2f} | {got * layers * args.context / 2**30:>16.2f} | "
                  f"{got / mha_bytes:>7.2%}")


if __name__ == "__main__":
    main()
