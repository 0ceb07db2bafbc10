"""Benchmark: activation checkpointing of decoder layers, ours and torch.utils.checkpoint, against the plain
stack, side by side in one run (not a test).

    python benchmarks/activation_checkpointing.py            # 4 layers, s = 256 and 512 (~20 s)
    python benchmarks/activation_checkpointing.py --quick    # 2 layers, s = 128 (~2 s)

A stack of our DecoderLayers (decoder-only: no cross-attention; d_model 256, 8 heads, d_ff 1024, pre-norm,
dropout 0.1 in training mode, float32, batch 2, one CPU thread by default), run three ways on the same
weights and seed: plain; each layer wrapped by our ``checkpointed``; each layer run through
``torch.utils.checkpoint.checkpoint(use_reentrant=False)``. Per way:
    memory  what is kept between forward and backward: the bytes of the tensors the forward created that are
            still alive when it returns (the graph's saved activations, the checkpoints' inputs, the output;
            followed through every torch call: properties/probes.py's CreatedTensors), and
            the bytes autograd's saved-tensor hook sees (what a checkpoint hides from it is not counted);
            on CUDA, torch.cuda.memory_allocated after the forward, and the peak of forward + backward.
    time    the median forward + backward time, relative to the plain stack (on CUDA also in ms); the ways
            take turns (three rounds of median_seconds each).
The gradients of every parameter are checked to be identical (torch.equal) across the three ways.
The first call of torch.utils.checkpoint imports torch._dynamo; it is made before anything is timed.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repository root

from implementations.activation_checkpointing import checkpointed  # noqa: E402
from implementations.layers import DecoderLayer  # noqa: E402
from properties.probes import CreatedTensors, saved_for_backward  # noqa: E402
from timing import median_seconds  # noqa: E402

LAYER = dict(d_model=256, n_head=8, d_ff=1024, cross_attention=False, norm_first=True, dropout=0.1)


class TorchCheckpointed(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return torch_checkpoint(self.layer, x, use_reentrant=False)


def stacks(n_layer: int, device: str) -> dict[str, nn.Sequential]:
    torch.manual_seed(0)
    plain = nn.Sequential(*[DecoderLayer(**LAYER) for _ in range(n_layer)]).to(device).train()
    return {
        "plain": plain,
        "ours": nn.Sequential(*[checkpointed(layer) for layer in copy.deepcopy(plain)]),
        "torch": nn.Sequential(*[TorchCheckpointed(layer) for layer in copy.deepcopy(plain)]),
    }


def step(model: nn.Sequential, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks for every way
    model(x).sum().backward()


def interleaved_medians(steps: dict[str, object], repeats: int, rounds: int = 3) -> dict[str, float]:
    """Per way, the median over ``rounds`` of median_seconds(step, repeats), the ways taking turns in every
    round: on a shared machine, timing one way after the other measures the load as much as the way."""
    seen: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(rounds):
        for name, fn in steps.items():
            seen[name].append(median_seconds(fn, repeats, warm_up=round_ == 0))
    return {name: statistics.median(values) for name, values in seen.items()}


def kept_after_forward(model: nn.Sequential, x: torch.Tensor, cuda: bool) -> tuple[int, int]:
    """(bytes of created tensors alive after the forward, bytes the saved-tensor hook sees)."""
    torch.manual_seed(1)
    params = list(model.parameters())
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out, saved = saved_for_backward(lambda: model(x), exclude=params)
        alive = torch.cuda.memory_allocated() - before
    else:
        with CreatedTensors(live=True) as created:
            out, saved = saved_for_backward(lambda: model(x), exclude=params)
        alive = created.live
    out.sum().backward()  # frees the graph
    return alive, sum(saved.values())


def cuda_step_peak(model: nn.Sequential, x: torch.Tensor) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step(model, x)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 layers, s = 128, fewer repeats")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    n_layer, lengths = (2, [128]) if args.quick else (args.layers, args.lengths)
    repeats = 3 if args.quick else args.repeats
    cuda = args.device.startswith("cuda")
    torch.set_num_threads(args.threads)
    models = stacks(n_layer, args.device)
    where = torch.cuda.get_device_name() if cuda else f"{platform.machine()}, {args.threads} thread(s)"
    print(f"torch {torch.__version__}, {where}, float32; {n_layer} x DecoderLayer({LAYER}), batch {args.batch}")

    start = time.perf_counter()
    x0 = torch.randn(1, 4, LAYER["d_model"], device=args.device)
    step(models["torch"], x0)  # imports torch._dynamo
    print(f"first torch.utils.checkpoint call (imports torch._dynamo): {time.perf_counter() - start:.2f} s\n")

    head = (f"{'s':>5} | {'way':>6} | {'kept after forward MiB':>22} | {'hook-saved MiB':>14} | "
            f"{'fwd+bwd vs plain':>16}"
            + (f" | {'fwd+bwd ms':>10} | {'fwd+bwd peak MiB':>16}" if cuda else "") + " | same gradients")
    print(head + "\n" + "-" * len(head))
    for s in lengths:
        x = torch.randn(args.batch, s, LAYER["d_model"], generator=torch.Generator().manual_seed(s)).to(args.device)
        grads = {}
        for name, model in models.items():
            step(model, x)
            grads[name] = [p.grad.clone() for p in model.parameters()]
        same = {name: all(torch.equal(a, b) for a, b in zip(grads[name], grads["plain"])) for name in models}
        times = interleaved_medians({name: (lambda m=model: step(m, x)) for name, model in models.items()}, repeats)
        for name, model in models.items():
            alive, hooked = kept_after_forward(model, x, cuda)
            line = (f"{s:>5} | {name:>6} | {alive / 2**20:>22.2f} | {hooked / 2**20:>14.2f} | "
                    f"{times[name] / times['plain']:>15.2f}x")
            if cuda:
                line += f" | {1e3 * times[name]:>10.2f} | {cuda_step_peak(model, x) / 2**20:>16.2f}"
            print(line + f" | {'yes' if same[name] else 'NO'}")


if __name__ == "__main__":
    main()
