"""Benchmark: greedy speculative decoding against plain cached greedy decoding (not a test).

    python benchmarks/speculative_decoding.py            # 64 new tokens, k 1 2 4 6, drafts of 1 and 2 layers (~25 s)
    python benchmarks/speculative_decoding.py --quick    # 16 new tokens, k 2 4, a 1-layer draft (~5 s)
    python benchmarks/speculative_decoding.py --device cuda --new-tokens 256

Target: our DecoderOnlyLM (d_model 256, 4 heads, 8 layers, SwiGLU d_ff 1024, RoPE, vocabulary 512, float32,
batch 1, torch's default initialisation, no training). Draft: a truncated copy of the target, its embedding,
first L layers, final norm and head (the same tensors), so a draft forward costs about L/8 of the target's
layers. Nothing is trained: an untrained draft of another seed would agree with the target about 1/512 of the
time and show nothing, while a truncated copy agrees as often as the first layers already decide the argmax,
which is how self-speculative decoding (LayerSkip, Draft & Verify) builds its drafts. A noisy copy of the
whole target would agree too, but costs as much as the target, so it could only lose time.

For each draft and k, side by side with the plain path on the same prompt in one run:
    tokens / target forward   new tokens divided by the target's forward passes (plain decoding: 1.0)
    accepted                  accepted proposals / proposals
    draft forwards            the draft's forward passes
    speedup                   plain wall time / speculative wall time (median of --repeats runs)
Both paths must produce the same tokens (checked: greedy speculative decoding is exact). Absolute times are
printed on CUDA only; on a shared CPU only ratios measured in one run mean anything.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repository root

from implementations.decoder_only import DecoderOnlyLM  # noqa: E402
from implementations.speculative_decoding import ForwardCounter, speculative_generate  # noqa: E402
from timing import median_seconds  # noqa: E402 (benchmarks/timing.py)

MODEL = dict(vocab_size=512, d_model=256, n_head=4, d_ff=1024, positions="rope", norm="rms", activation="swiglu")
TARGET_LAYERS = 8


def models(draft_layers: list[int], max_len: int, device: str) -> tuple[DecoderOnlyLM, dict[int, DecoderOnlyLM]]:
    torch.manual_seed(0)
    target = DecoderOnlyLM(**MODEL, n_layer=TARGET_LAYERS, max_len=max_len).to(device).eval()
    drafts = {}
    for layers in draft_layers:
        draft = DecoderOnlyLM(**MODEL, n_layer=layers, max_len=max_len).to(device).eval()
        kept = {name: value for name, value in target.state_dict().items()
                if not name.startswith("layers.") or int(name.split(".")[1]) < layers}
        draft.load_state_dict(kept)  # embedding, layers 0 .. layers - 1, final norm, head: the target's own
        drafts[layers] = draft
    return target, drafts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 new tokens, k 2 4, a 1-layer draft")
    parser.add_argument("--new-tokens", type=int, help="tokens generated (default 64; quick 16)")
    parser.add_argument("--prompt", type=int, default=32, help="prompt length (default 32)")
    parser.add_argument("--k", type=int, nargs="+", help="draft tokens per round (default 1 2 4 6; quick 2 4)")
    parser.add_argument("--draft-layers", type=int, nargs="+", help="draft depths (default 1 2; quick 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    new = args.new_tokens or (16 if args.quick else 64)
    ks = args.k or ([2, 4] if args.quick else [1, 2, 4, 6])
    depths = args.draft_layers or ([1] if args.quick else [1, 2])
    cuda = args.device.startswith("cuda")
    target, drafts = models(depths, args.prompt + new, args.device)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(MODEL["vocab_size"], (1, args.prompt), generator=gen).to(args.device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def timed(fn) -> float:  # median wall seconds, CUDA work waited for
        return median_seconds(lambda: (fn(), sync()), args.repeats, warm_up=True)

    machine = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {machine}, {args.device}, {torch.get_num_threads()} thread(s), float32, batch 1")
    print(f"target: {MODEL} n_layer={TARGET_LAYERS}; prompt {args.prompt} tokens, {new} greedy tokens")
    with torch.inference_mode():
        plain_tokens = target.generate(prompt, max_new_tokens=new)
        plain = timed(lambda: target.generate(prompt, max_new_tokens=new))
    print("plain cached decoding: 1.00 tokens per target forward"
          + (f", {1e3 * plain / new:.3f} ms/token" if cuda else ""))
    print()
    header = (f"{'draft':>10} | {'k':>2} | {'tokens/target fwd':>17} | {'accepted':>8} | {'draft fwds':>10} | "
              f"{'speedup':>7} | " + ("ms/token | " if cuda else "") + "same tokens")
    print(header)
    print("-" * len(header))
    for layers, draft in drafts.items():
        for k in ks:
            counted_target, counted_draft = ForwardCounter(target), ForwardCounter(draft)
            with torch.inference_mode():
                out = speculative_generate(counted_target, counted_draft, prompt, max_new_tokens=new, k=k)
                seconds = timed(lambda: speculative_generate(target, draft, prompt, max_new_tokens=new, k=k))
            proposed = counted_draft.calls  # one draft forward per proposal
            accepted = new - counted_target.calls  # each round emits its accepted proposals plus one token
            print(f"{f'{layers}/{TARGET_LAYERS} layers':>10} | {k:>2} | {new / counted_target.calls:>17.2f} | "
                  f"{accepted / max(proposed, 1):>8.2f} | {counted_draft.calls:>10} | {plain / seconds:>6.2f}x | "
                  + (f"{1e3 * seconds / new:>8.3f} | " if cuda else "")
                  + ("yes" if torch.equal(out, plain_tokens) else "NO"))


if __name__ == "__main__":
    main()
