"""Mutants of the tensor-parallel modules: the collectives misplaced, the shards cut the wrong way, a
size not checked. Each is one change to ours, and each runs in the same two-process gloo group as the
properties (the group is forked after the mutant is loaded, so the workers hold it)."""

from __future__ import annotations

import warnings

import torch
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from implementations.tensor_parallel import (
    ColumnParallelLinear,
    CopyToTensorParallelRegion,
    ReduceFromTensorParallelRegion,
    RowParallelLinear,
    TensorParallelAttention,
    TensorParallelFeedForward,
    TensorParallelSwiGLU,
    shard_of,
)
from implementations.sdpa import scaled_dot_product_attention
from meta_tests.catalog import mutant

OUTPUT = "test_tensor_parallel_output_equals_the_unsharded_module"
GRADIENTS = "test_tensor_parallel_gradients_equal_the_unsharded_module"
SHARDS = "test_tensor_parallel_ranks_hold_the_pinned_contiguous_shards"
REJECTS = "test_tensor_parallel_modules_reject_sizes_the_world_size_does_not_divide"


def interleaved(full: Tensor, axis: int, *, rank: int, world_size: int) -> Tensor:
    """Every tp-th row (column) from ``rank`` on: Megatron's stride > 1 layout, or a [::tp] slice."""
    index = [slice(None)] * full.dim()
    index[axis] = slice(rank, None, world_size)
    return full[tuple(index)]


@mutant(name="RowParallelLinear_bias_on_every_rank", provides="RowParallelLinear",
        bug="the bias is added to each rank's partial output before the all-reduce, so it is counted tp times",
        caught_by=[OUTPUT])
class BiasOnEveryRank(RowParallelLinear):
    def forward(self, x):
        return ReduceFromTensorParallelRegion.apply(F.linear(x, self.weight, self.bias))


@mutant(name="RowParallelLinear_all_reduce_differentiated_again", provides="RowParallelLinear",
        bug="the forward all-reduce is torch.distributed.nn.functional.all_reduce, whose backward all-reduces "
        "the gradient again: every gradient tp times too large",
        caught_by=[GRADIENTS])
class AllReduceTwice(RowParallelLinear):
    def forward(self, x):
        with warnings.catch_warnings():  # torch 2.6+ calls it deprecated; it still differentiates this way
            warnings.simplefilter("ignore", FutureWarning)
            y = dist_nn.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


@mutant(name="ColumnParallelLinear_no_backward_all_reduce", provides="ColumnParallelLinear",
        bug="no f operator: the input gradient is not all-reduced, so each rank keeps the part through its shard",
        caught_by=[GRADIENTS])
class NoBackwardAllReduce(ColumnParallelLinear):
    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


@mutant(name="ColumnParallelLinear_weight_gradient_all_reduced", provides="ColumnParallelLinear",
        bug="the weight also passes f, so its gradient is summed over ranks as in data parallelism: each rank "
        "holds the sum of different shards' gradients",
        caught_by=[GRADIENTS])
class WeightGradientAllReduced(ColumnParallelLinear):
    def forward(self, x):
        return F.linear(CopyToTensorParallelRegion.apply(x), CopyToTensorParallelRegion.apply(self.weight), self.bias)


@mutant(name="ColumnParallelLinear_size_not_checked", provides="ColumnParallelLinear",
        bug="out_features // world_size without checking the remainder: the last features belong to no rank",
        caught_by=[REJECTS])
class SizeNotChecked(ColumnParallelLinear):
    def __init__(self, *, in_features, out_features, bias=True, world_size, rank):
        even = out_features // world_size * world_size
        super().__init__(in_features=in_features, out_features=max(even, world_size), bias=bias,
                         world_size=world_size, rank=min(max(rank, 0), world_size - 1))


@mutant(name="TensorParallelFeedForward_up_rows_interleaved", provides="TensorParallelFeedForward",
        bug="up's rows are cut interleaved (rank p: rows p, p + tp, ...) but down's columns contiguously: hidden "
        "units meet the wrong down weights",
        caught_by=[OUTPUT, SHARDS])
class InterleavedUpRows(TensorParallelFeedForward):
    def load_full_state_dict(self, state):
        super().load_full_state_dict(state)
        tp, p = self.up.world_size, self.up.rank
        self.up.weight.data.copy_(interleaved(state["up.weight"], 0, rank=p, world_size=tp))
        if self.up.bias is not None:
            self.up.bias.data.copy_(interleaved(state["up.bias"], 0, rank=p, world_size=tp))


@mutant(name="TensorParallelSwiGLU_fused_gate_up_cut_whole", provides="TensorParallelSwiGLU",
        bug="the unsharded [gate; up] is fused first and then cut in tp pieces: rank 0 holds only gate rows, "
        "rank 1 only up rows",
        caught_by=[OUTPUT, SHARDS])
class FusedGateUpCutWhole(TensorParallelSwiGLU):
    def load_full_state_dict(self, state):
        fused = torch.cat([state["gate.weight"], state["up.weight"]])  # (2f, d)
        self.gate_up.weight.data.copy_(shard_of(fused, 0, rank=self.rank, world_size=self.world_size))
        self.down.weight.data.copy_(shard_of(state["down.weight"], 1, rank=self.rank, world_size=self.world_size))


@mutant(name="TensorParallelAttention_kv_heads_interleaved", provides="TensorParallelAttention",
        bug="KV heads are dealt round-robin (rank p: KV heads p, p + tp, ...) while query heads are cut "
        "contiguously: a query head reads another group's keys and values",
        caught_by=[OUTPUT, SHARDS])
class KVHeadsInterleaved(TensorParallelAttention):
    def load_full_state_dict(self, state):
        super().load_full_state_dict(state)
        e = self.k.weight.shape[0] // self.n_kv_head
        for name in ("k", "v"):
            for kind, param in getattr(self, name).named_parameters():
                full = state[f"{name}.{kind}"]
                heads = full.reshape(-1, e, *full.shape[1:])  # (g, e, ...): one entry per KV head
                mine = interleaved(heads, 0, rank=self.rank, world_size=self.world_size)
                param.data.copy_(mine.reshape(param.shape))


@mutant(name="TensorParallelAttention_no_backward_all_reduce", provides="TensorParallelAttention",
        bug="q, k and v read x without the f operator: the input gradient is only this rank's heads' part",
        caught_by=[GRADIENTS])
class AttentionNoBackwardAllReduce(TensorParallelAttention):
    def forward(self, x, *, causal=False):
        q = rearrange(self.q(x), "b s (h e) -> b h s e", h=self.n_head)
        k = rearrange(self.k(x), "b t (g e) -> b g t e", g=self.n_kv_head)
        v = rearrange(self.v(x), "b t (g e) -> b g t e", g=self.n_kv_head)
        return self.o(rearrange(scaled_dot_product_attention(q, k, v, causal=causal), "b h s e -> b s (h e)"))
