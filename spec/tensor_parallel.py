"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019, section 3): one layer's weights split over tp ranks.

Signatures (constructors are keyword-only; every one takes the unsharded module's keywords plus these two)
------------------------------------------------------------------------------------------------------
    ColumnParallelLinear(*, in_features, out_features, bias=True, world_size, rank)               .forward(x)
    RowParallelLinear(*, in_features, out_features, bias=True, world_size, rank)                  .forward(x)
    TensorParallelFeedForward(*, d_model, d_ff, activation="relu", bias=True, world_size, rank)   .forward(x)
    TensorParallelSwiGLU(*, d_model, d_ff, world_size, rank)                                      .forward(x)
    TensorParallelAttention(*, d_model, n_head, n_kv_head, bias=True, world_size, rank)  .forward(x, *, causal=False)
    every module: .load_full_state_dict(state)   state: the UNSHARDED module's canonical parameters (below);
                                                 the module keeps its rank's shard of each (option full_state)
The modules communicate over torch.distributed's default process group (any backend; the properties use
gloo on the CPU), whose size is world_size and in which this process is ``rank``. Constructors never
communicate: a module can be built, and its sizes validated, without a process group.

Shapes (the glossary of spec/__init__.py, plus this family's tp, i, o)
----------------------------------------------------------------------
    tp = world_size   the number of ranks one layer is split over (tensor-parallel size)
    i, o              a linear layer's input and output features (in_features, out_features)
    ColumnParallelLinear:  x (b, s, i) -> (b, s, o/tp)    this rank's slice of the output features
    RowParallelLinear:     x (b, s, i/tp) -> (b, s, o)    x is this rank's slice of the input features
    TensorParallelFeedForward, TensorParallelSwiGLU, TensorParallelAttention: x (b, s, d) -> (b, s, d),
    the same full input and the same full output on every rank.

Math (rank p of tp; W_p the rows, W^p the columns that rank p holds; "f" and "g" are Megatron's operators)
------------------------------------------------------------------------------------------------------
    column-parallel:  y_p = f(x) W_p^T + b_p         f: identity forward, all-reduce (sum) of dL/dx backward
    row-parallel:     y = g(x_p (W^p)^T) + b         g: all-reduce (sum) forward, identity backward;
                                                     since x W^T = sum_p x_p (W^p)^T, y equals the full layer
    feed-forward:     out = row(act(column(x)))     act is elementwise, so each rank applies it to its hidden slice
    SwiGLU:           out = row(silu(column_gate(x)) * column_up(x))   gate and up split over the same hidden units
    attention:        rank p computes heads p*h/tp .. (p+1)*h/tp - 1 from the column-parallel q, k, v (its kv heads
                      p*g/tp .. (p+1)*g/tp - 1 are exactly the ones its query heads read), then the row-parallel
                      output projection sums every rank's heads: out = g(sum over its heads) + b_o
    Backward: the input gradient of every column-parallel stage is all-reduced (each rank holds the part that
    flows through its own shard); the gradient of every shard is the matching slice of the unsharded gradient,
    and a replicated parameter (a row-parallel bias) gets the full gradient on every rank.

Conventions (pinned, with the reason)
-------------------------------------
* Contiguous shards: rank p holds rows p*n/tp .. (p+1)*n/tp - 1 (column-parallel weights and biases, n
  output features) or those columns (row-parallel weights, n input features), as Megatron's
  ``split_tensor_along_last_dim``, torch.distributed.tensor's ``Shard`` and HF's tp_plan slice. A
  column-parallel stage and the row-parallel stage that reads its output must use the same map, or
  hidden units meet the wrong weights; a checkpoint saved per rank can only be read back by a tool that
  slices the same way. Because heads own contiguous features (spec/attention.py), contiguous rows are
  contiguous heads, and with contiguous GQA groups (query head i reads KV head i // (h/g)) a rank's query
  heads read exactly its own KV heads.
* The row-parallel bias is replicated (every rank holds all of it) and added once, after the all-reduce:
  added before it, it is counted tp times.
* The collectives are autograd Functions (Megatron's conjugate pair): f before each column-parallel stage
  (one all-reduce of the input gradient), g after each row-parallel stage (one all-reduce of the output).
  A plain ``dist.all_reduce`` call is invisible to autograd; ``torch.distributed.nn.functional.all_reduce``
  also all-reduces in backward, which counts the gradient tp times.
* SwiGLU's gate and up (and attention's q, k and v) are split over the same hidden units (heads) on a
  rank; stored fused per rank ([gate_p; up_p], as Megatron's linear_fc1), they are sliced one by one and then
  concatenated: slicing the fused unsharded [gate; up] in tp pieces hands rank 0 only gates.
* tp must divide the features split (o, i, d_ff, n_head and n_kv_head; KV heads are split, not
  replicated), and 0 <= rank < tp: otherwise ValueError at construction.

Options (declarable; properties/options.py)
-------------------------------------------
* ``full_state`` (input, every module): True (default) if the module offers ``load_full_state_dict`` and
  slices its own shards from the unsharded weights; False: the suite hands it the pinned shards as its
  canonical parameters and the convention property is skipped.
* ``bias`` (constructor; not SwiGLU): True (default) or False, as the unsharded module.
* ``activation`` (constructor, TensorParallelFeedForward): "relu" (default) or "gelu", as FeedForward.
* ``causal`` (call, TensorParallelAttention): False (default) or True, as the attention modules.

Canonical parameters
--------------------
Each rank's module is named like the unsharded one and holds its shards (``canonical_state_dict`` may
expose a fused per-rank weight as views, as examples/fused_qkv_attention.py does):
    ColumnParallelLinear:       weight (o/tp, i)   bias (o/tp,)
    RowParallelLinear:          weight (o, i/tp)   bias (o,)       replicated
    TensorParallelFeedForward:  up.weight (f/tp, d)  up.bias (f/tp,)  down.weight (d, f/tp)  down.bias (d,)
    TensorParallelSwiGLU:       gate.weight (f/tp, d)  up.weight (f/tp, d)  down.weight (d, f/tp)
    TensorParallelAttention:    q.weight (h/tp*e, d)  k.weight, v.weight (g/tp*e, d)  o.weight (d, h/tp*e),
                                q/k/v biases sliced alike, o.bias (d,) replicated
The unsharded modules (``UNSHARDED``) carry the full shapes: a plain nn.Linear, FeedForward, SwiGLU and
GroupedQueryAttention (spec/feed_forward.py, spec/attention.py).

Properties (properties/test_tensor_parallel.py; tp = 2 gloo processes on the CPU, started by the test)
-----------------------------------------------------------------------------------------------------
every rank's output equals the unsharded module's on the same weights (its slice, for column-parallel);
after backward, every rank's input gradient equals the unsharded one (its slice, for row-parallel) and
every shard's gradient is the matching slice of the unsharded gradient; load_full_state_dict leaves rank p
holding exactly the contiguous shards of ``shard`` below; sizes tp does not divide, and ranks outside
0 .. tp - 1, are refused with ValueError (in one process: constructors never communicate).
"""

from __future__ import annotations

import numpy as np

from spec.attention import CAUSAL, attention
from spec.feed_forward import FEED_FORWARD, feed_forward, linear, swiglu
from spec.registry import COMPONENTS, Component, Param, boolean, component, same_shape_as_first_input

ROWS, COLUMNS, WHOLE = 0, 1, None  # the axis of a weight each rank slices (WHOLE: replicated)

FULL_STATE = boolean("full_state", "load_full_state_dict(state) takes the unsharded weights and keeps this rank's "
                     "shard (False: the suite loads the pinned shards itself)")
BIAS = boolean("bias", "biases as the unsharded module (the row-parallel one replicated, added once)", kind="init")
ACTIVATION = FEED_FORWARD.option("activation")


def linear_parameters(*, in_features: int, out_features: int, bias: bool = True, **_) -> dict[str, Param]:
    """A plain nn.Linear's: weight (o, i) and bias (o,)."""
    params = {"weight": Param((out_features, in_features))}
    if bias:
        params["bias"] = Param((out_features,), "bias")
    return params


def _parameters_of(name: str):
    """The registered component's canonical parameters (looked up when called: every family is registered)."""
    return lambda **config: COMPONENTS[name].parameters(**config)


# component -> (the unsharded module's spec name, or None for a plain nn.Linear; its canonical parameters)
UNSHARDED = {
    "ColumnParallelLinear": (None, linear_parameters),
    "RowParallelLinear": (None, linear_parameters),
    "TensorParallelFeedForward": ("FeedForward", _parameters_of("FeedForward")),
    "TensorParallelSwiGLU": ("SwiGLU", _parameters_of("SwiGLU")),
    "TensorParallelAttention": ("GroupedQueryAttention", _parameters_of("GroupedQueryAttention")),
}
_PROJECTIONS = {f"{p}.{kind}": ROWS for p in "qkv" for kind in ("weight", "bias")}
# component -> canonical parameter -> the axis its shards are cut along
SHARDING = {
    "ColumnParallelLinear": {"weight": ROWS, "bias": ROWS},
    "RowParallelLinear": {"weight": COLUMNS, "bias": WHOLE},
    "TensorParallelFeedForward": {"up.weight": ROWS, "up.bias": ROWS, "down.weight": COLUMNS, "down.bias": WHOLE},
    "TensorParallelSwiGLU": {"gate.weight": ROWS, "up.weight": ROWS, "down.weight": COLUMNS},
    "TensorParallelAttention": {**_PROJECTIONS, "o.weight": COLUMNS, "o.bias": WHOLE},
}


def full_parameters(name: str, **config) -> dict[str, Param]:
    """The unsharded module's canonical parameters (full shapes) for TP component ``name``."""
    return UNSHARDED[name][1](**config)


def sharded_parameters(name: str):
    """The canonical parameters of one rank's module: the unsharded shapes, cut by tp along their axis."""

    def parameters(*, world_size: int, rank: int, **config) -> dict[str, Param]:
        out = {}
        for key, param in full_parameters(name, **config).items():
            shape = list(param.shape)
            axis = SHARDING[name][key]
            if axis is not None:
                shape[axis] //= world_size
            out[key] = Param(tuple(shape), param.init)
        return out

    return parameters


def _register(name: str, summary: str, output_shape, options) -> Component:
    return component(Component(name=name, kind="module", family="tensor_parallel", summary=summary,
                               parameters=sharded_parameters(name), output_shape=output_shape, options=options))


# A rank's output width is not knowable from x alone for the two linears (o/tp, o): the properties check it.
COLUMN_PARALLEL_LINEAR = _register("ColumnParallelLinear", "column-parallel linear: this rank's output features",
                                   None, (BIAS, FULL_STATE))
ROW_PARALLEL_LINEAR = _register("RowParallelLinear", "row-parallel linear: partial outputs all-reduced, bias once",
                                None, (BIAS, FULL_STATE))
TENSOR_PARALLEL_FEED_FORWARD = _register("TensorParallelFeedForward", "FeedForward split column- then row-parallel",
                                         same_shape_as_first_input, (ACTIVATION, BIAS, FULL_STATE))
TENSOR_PARALLEL_SWIGLU = _register("TensorParallelSwiGLU", "SwiGLU: gate and up column-parallel, down row-parallel",
                                   same_shape_as_first_input, (FULL_STATE,))
TENSOR_PARALLEL_ATTENTION = _register("TensorParallelAttention", "grouped-query attention split by heads over ranks",
                                      same_shape_as_first_input, (BIAS, CAUSAL, FULL_STATE))
TENSOR_PARALLEL_MODULES = list(UNSHARDED)


# ---------------------------------------------------------------------------------------------------
# The float64 reference: the pinned shards, and what each rank must compute (numpy, apart from the torch code)


def shard_range(size: int, *, rank: int, world_size: int) -> range:
    """The indices rank ``rank`` holds of an axis of ``size`` cut in tp contiguous pieces: 6 features over
    2 ranks -> rank 0: 0, 1, 2; rank 1: 3, 4, 5."""
    n = size // world_size
    return range(rank * n, (rank + 1) * n)


def shard(name: str, full: dict[str, np.ndarray], *, rank: int, world_size: int) -> dict[str, np.ndarray]:
    """Rank ``rank``'s canonical parameters of TP component ``name``, cut from the unsharded ones."""
    out = {}
    for key, value in full.items():
        axis = SHARDING[name][key]
        value = np.asarray(value, dtype=np.float64)
        if axis is not None:
            value = np.take(value, shard_range(value.shape[axis], rank=rank, world_size=world_size), axis=axis)
        out[key] = value
    return out


def rank_input(name: str, x: np.ndarray, *, rank: int, world_size: int) -> np.ndarray:
    """What rank ``rank`` is given of the unsharded input x (b, s, i): its features for RowParallelLinear
    (the output of a column-parallel stage), all of x otherwise."""
    if name != "RowParallelLinear":
        return x
    return x[..., shard_range(x.shape[-1], rank=rank, world_size=world_size)]


def rank_output(name: str, y: np.ndarray, *, rank: int, world_size: int) -> np.ndarray:
    """What rank ``rank`` must return of the unsharded output y: its features for ColumnParallelLinear,
    all of y otherwise (the row-parallel all-reduce gives every rank the whole)."""
    if name != "ColumnParallelLinear":
        return y
    return y[..., shard_range(y.shape[-1], rank=rank, world_size=world_size)]


def unsharded(name: str, full: dict[str, np.ndarray], x: np.ndarray, *, causal: bool = False, **config) -> np.ndarray:
    """The unsharded module's float64 output on x (b, s, i or d), from its canonical parameters."""
    if name in ("ColumnParallelLinear", "RowParallelLinear"):
        return linear(np.asarray(x, dtype=np.float64), np.asarray(full["weight"]), full.get("bias"))
    if name == "TensorParallelFeedForward":
        return feed_forward(full, x, activation=config.get("activation", "relu"))
    if name == "TensorParallelSwiGLU":
        return swiglu(full, x)
    return attention(full, x, n_head=config["n_head"], n_kv_head=config["n_kv_head"], causal=causal)
