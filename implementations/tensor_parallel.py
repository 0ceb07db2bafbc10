"""Megatron-style tensor parallelism on torch.distributed: column- and row-parallel linears, and the
feed-forward blocks and grouped-query attention built from them. Spec: spec/tensor_parallel.py.

Every module is one rank's part of the unsharded layer: it holds its rank's contiguous shard of each weight,
and the collectives run over torch.distributed's default process group. Constructors never communicate.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from implementations.activations import gelu
from implementations.feed_forward import ACTIVATIONS
from implementations.sdpa import scaled_dot_product_attention

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "TensorParallelFeedForward",
    "TensorParallelSwiGLU",
    "TensorParallelAttention",
]


# ---------------------------------------------------------------------------------------------------
# Megatron's conjugate operators f and g, as autograd Functions


def all_reduce_sum(t: Tensor) -> Tensor:
    """The sum of ``t`` over every rank, as a new contiguous tensor (gloo needs contiguous memory, and the
    tensor autograd saved or handed in must not be overwritten)."""
    out = t.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


class CopyToTensorParallelRegion(torch.autograd.Function):
    """f: the identity forward; backward, the sum over ranks of the input gradient. Each rank's
    column-parallel shard sees all of x but passes back only the gradient through its own rows."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return all_reduce_sum(grad)


class ReduceFromTensorParallelRegion(torch.autograd.Function):
    """g: forward, the sum over ranks of the partial outputs; backward, the identity (every rank holds the
    same full output, so each passes the same gradient to its own part)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return all_reduce_sum(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


# ---------------------------------------------------------------------------------------------------
# Sizes and shards


def check_sizes(name: str, *, world_size: int, rank: int, **sizes: int) -> None:
    """Positive sizes, and a rank of the world."""
    for what, size in sizes.items():
        if size <= 0:
            raise ValueError(f"{name}: {what} must be positive, got {what}={size}")
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"{name}: need world_size >= 1 and 0 <= rank < world_size, got world_size={world_size}, "
                         f"rank={rank}")


def split_size(name: str, what: str, size: int, world_size: int) -> int:
    """size / tp, refusing a size that tp does not divide (every rank must hold an equal shard)."""
    if size % world_size:
        raise ValueError(f"{name}: world_size={world_size} does not divide {what}={size}")
    return size // world_size


def shard_of(full: Tensor, axis: int, *, rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s contiguous piece of ``full`` along ``axis`` (torch.chunk's pieces, all equal here)."""
    return full.chunk(world_size, dim=axis)[rank]


def _copy(param: Tensor, value: Tensor, name: str) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise ValueError(f"{name}: a shard of shape {tuple(value.shape)} does not fit {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(value)


def _children_state(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}


# ---------------------------------------------------------------------------------------------------
# The two linears


class ParallelLinear(nn.Module):
    """The shared body of the two linears: sizes checked, and the weight (and bias) of the shapes one rank
    holds, initialised as nn.Linear. ``SPLIT`` names the features cut over the ranks."""

    SPLIT: str

    def __init__(self, *, in_features: int, out_features: int, bias: bool = True, world_size: int, rank: int) -> None:
        super().__init__()
        name, sizes = type(self).__name__, {"in_features": in_features, "out_features": out_features}
        check_sizes(name, world_size=world_size, rank=rank, **sizes)
        local = split_size(name, self.SPLIT, sizes[self.SPLIT], world_size)
        self.world_size, self.rank = world_size, rank
        rows, columns = (local, in_features) if self.SPLIT == "out_features" else (out_features, local)
        bound = columns ** -0.5
        self.weight = nn.Parameter(torch.empty(rows, columns).uniform_(-bound, bound))
        if bias:  # column-parallel: this rank's rows of it; row-parallel: all of it, replicated
            self.bias = nn.Parameter(torch.empty(rows).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)


class ColumnParallelLinear(ParallelLinear):
    """y_p = f(x) W_p^T + b_p: rank p holds output features p*o/tp .. (p+1)*o/tp - 1 (rows of the weight and
    the bias) and returns them; x (b, s, i) -> (b, s, o/tp)."""

    SPLIT = "out_features"

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(CopyToTensorParallelRegion.apply(x), self.weight, self.bias)  # (b, s, o/tp)

    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        for name, value in state.items():
            _copy(getattr(self, name), shard_of(value, 0, rank=self.rank, world_size=self.world_size), name)


class RowParallelLinear(ParallelLinear):
    """y = g(x_p (W^p)^T) + b: rank p holds input features p*i/tp .. (p+1)*i/tp - 1 (columns of the weight)
    and is given those features of the input; the bias is replicated and added once, after the sum.
    x (b, s, i/tp) -> (b, s, o), the same on every rank."""

    SPLIT = "in_features"

    def forward(self, x: Tensor) -> Tensor:
        y = ReduceFromTensorParallelRegion.apply(F.linear(x, self.weight))  # (b, s, o): every rank's part summed
        return y if self.bias is None else y + self.bias

    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        _copy(self.weight, shard_of(state["weight"], 1, rank=self.rank, world_size=self.world_size), "weight")
        if self.bias is not None:
            _copy(self.bias, state["bias"], "bias")  # replicated


# ---------------------------------------------------------------------------------------------------
# The blocks


class TensorParallelFeedForward(nn.Module):
    """FeedForward split over the hidden units: up column-parallel, act on this rank's f/tp units, down
    row-parallel. x (b, s, d) -> (b, s, d) on every rank."""

    def __init__(self, *, d_model: int, d_ff: int, activation: str = "relu", bias: bool = True, world_size: int,
                 rank: int) -> None:
        super().__init__()
        check_sizes("TensorParallelFeedForward", world_size=world_size, rank=rank, d_model=d_model, d_ff=d_ff)
        split_size("TensorParallelFeedForward", "d_ff", d_ff, world_size)
        if activation not in ACTIVATIONS:
            raise ValueError(f"TensorParallelFeedForward: activation must be one of {ACTIVATIONS}, "
                             f"got activation={activation!r}")
        self.activation = activation
        sizes = {"bias": bias, "world_size": world_size, "rank": rank}
        self.up = ColumnParallelLinear(in_features=d_model, out_features=d_ff, **sizes)
        self.down = RowParallelLinear(in_features=d_ff, out_features=d_model, **sizes)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.up(x)  # (b, s, f/tp)
        hidden = F.relu(hidden) if self.activation == "relu" else gelu(hidden)
        return self.down(hidden)  # (b, s, d)

    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        self.up.load_full_state_dict(_children_state(state, "up"))
        self.down.load_full_state_dict(_children_state(state, "down"))


class TensorParallelSwiGLU(nn.Module):
    """SwiGLU split over the hidden units. Gate and up are one column-parallel layer per rank, [gate_p; up_p]
    (Megatron's fused linear_fc1: one all-reduce of the input gradient instead of two); the canonical
    gate.weight and up.weight are views of its two halves. x (b, s, d) -> (b, s, d) on every rank."""

    def __init__(self, *, d_model: int, d_ff: int, world_size: int, rank: int) -> None:
        super().__init__()
        check_sizes("TensorParallelSwiGLU", world_size=world_size, rank=rank, d_model=d_model, d_ff=d_ff)
        self.local = split_size("TensorParallelSwiGLU", "d_ff", d_ff, world_size)
        self.world_size, self.rank = world_size, rank
        # out_features 2 * d_ff over tp ranks: 2 f/tp rows each, filled by load_full_state_dict as [gate_p; up_p].
        self.gate_up = ColumnParallelLinear(in_features=d_model, out_features=2 * d_ff, bias=False,
                                            world_size=world_size, rank=rank)
        self.down = RowParallelLinear(in_features=d_ff, out_features=d_model, bias=False, world_size=world_size,
                                      rank=rank)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.gate_up(x).split(self.local, dim=-1)  # (b, s, f/tp) each
        return self.down(F.silu(gate) * value)

    def canonical_state_dict(self) -> dict[str, Tensor]:
        fused = self.gate_up.weight
        return {"gate.weight": fused[: self.local], "up.weight": fused[self.local:], "down.weight": self.down.weight}

    def load_canonical_state_dict(self, params: dict[str, Tensor]) -> None:
        for name, view in self.canonical_state_dict().items():
            _copy(view, params[name], name)

    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        # Gate and up are sliced one by one, then fused: rank p's gate rows and up rows are the same units.
        sliced = {name: shard_of(state[name], 0, rank=self.rank, world_size=self.world_size)
                  for name in ("gate.weight", "up.weight")}
        sliced["down.weight"] = shard_of(state["down.weight"], 1, rank=self.rank, world_size=self.world_size)
        self.load_canonical_state_dict(sliced)


class TensorParallelAttention(nn.Module):
    """Grouped-query attention split by heads: rank p computes query heads p*h/tp .. (p+1)*h/tp - 1, which read
    exactly its KV heads p*g/tp .. (p+1)*g/tp - 1 (contiguous groups); q, k and v are column-parallel (one f for
    the three), the output projection row-parallel. x (b, s, d) -> (b, s, d) on every rank."""

    def __init__(self, *, d_model: int, n_head: int, n_kv_head: int, bias: bool = True, world_size: int,
                 rank: int) -> None:
        super().__init__()
        name = "TensorParallelAttention"
        check_sizes(name, world_size=world_size, rank=rank, d_model=d_model, n_head=n_head, n_kv_head=n_kv_head)
        if d_model % n_head or n_head % n_kv_head:
            raise ValueError(f"{name}: need n_head dividing d_model and n_kv_head dividing n_head, got "
                             f"d_model={d_model}, n_head={n_head}, n_kv_head={n_kv_head}")
        self.n_head = split_size(name, "n_head", n_head, world_size)  # this rank's heads
        self.n_kv_head = split_size(name, "n_kv_head", n_kv_head, world_size)
        self.world_size, self.rank = world_size, rank
        e = d_model // n_head  # the head width of the unsharded module
        self.q = nn.Linear(d_model, self.n_head * e, bias=bias)  # column-parallel: this rank's heads' rows
        self.k = nn.Linear(d_model, self.n_kv_head * e, bias=bias)
        self.v = nn.Linear(d_model, self.n_kv_head * e, bias=bias)
        self.o = RowParallelLinear(in_features=n_head * e, out_features=d_model, bias=bias, world_size=world_size,
                                   rank=rank)

    def forward(self, x: Tensor, *, causal: bool = False) -> Tensor:
        x = CopyToTensorParallelRegion.apply(x)  # f once for q, k and v: one all-reduce of dL/dx in backward
        q = rearrange(self.q(x), "b s (h e) -> b h s e", h=self.n_head)  # this rank's h/tp heads
        k = rearrange(self.k(x), "b t (g e) -> b g t e", g=self.n_kv_head)  # and its g/tp kv heads
        v = rearrange(self.v(x), "b t (g e) -> b g t e", g=self.n_kv_head)
        a = scaled_dot_product_attention(q, k, v, causal=causal)  # local head j reads local kv head j // (h/g)
        return self.o(rearrange(a, "b h s e -> b s (h e)"))

    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        for name in ("q", "k", "v"):
            layer = getattr(self, name)
            for kind, param in layer.named_parameters():
                value = shard_of(state[f"{name}.{kind}"], 0, rank=self.rank, world_size=self.world_size)
                _copy(param, value, f"{name}.{kind}")
        self.o.load_full_state_dict(_children_state(state, "o"))
