"""Mixture of experts: a top-k router, sparse expert FFNs, and the router's auxiliary losses
(Switch Transformer, Mixtral, DeepSeekMoE, ST-MoE).

Signatures (constructors are keyword-only)
-------------------------------------------
    Router(*, d_model, n_experts, top_k, normalize_top_k=True)                      .forward(x) -> gates
    MixtureOfExperts(*, d_model, d_ff, n_experts, top_k, n_shared_experts=0, capacity_factor=None,
                     normalize_top_k=True, expert="swiglu")                          .forward(x) -> out
    load_balancing_loss(router_logits, *, top_k, alpha=0.01, mask=None) -> scalar
    router_z_loss(router_logits, *, mask=None) -> scalar

Shapes (glossary of spec/__init__.py, plus this family's m and k)
------------------------------------------------------------------
    m   routed experts (n_experts);   k   experts chosen per token (top_k), 1 <= k <= m
    x              (b, s, d)
    gates          (b, s, m): the routing weight of every expert for every token, 0 for the m - k not chosen
    out            (b, s, d), the dtype and device of x
    router_logits  (b, s, m) raw gate logits x W_r^T (before any softmax);  mask (b, s) bool, True = real token
    Tokens are the b*s rows of x flattened batch-first: token (i, j) is number i*s + j ("position order").

Math (one token x, a d-vector; W x means x @ W^T as in nn.Linear)
------------------------------------------------------------------
    z = W_r x                            router logits, (m,); the router has no bias (Mixtral, Switch)
    p = softmax(z)                       computed in float32 at least (float64 stays float64)
    C = the k experts with the largest z (equivalently largest p), in decreasing order: choice rank 0 .. k-1
    w_i = p_i / sum_{j in C} p_j   for i in C      normalize_top_k=True and k >= 2 (Mixtral)
    w_i = p_i                      for i in C      normalize_top_k=False (DeepSeekMoE, OLMoE), or k = 1 (Switch)
    w_i = 0                        otherwise       gates = w
    out = sum_{i in C, slot kept} w_i E_i(x) + sum_{j < n_shared_experts} S_j(x)
    E_i, S_j:  expert="swiglu":  down(silu(gate(x)) * up(x))   (spec/feed_forward.py's SwiGLU, no biases)
               expert="ffn":     down(relu(up(x)))             (Switch's T5 FFN: relu, no biases)
    Capacity (capacity_factor = c not None): with T = b*s tokens in the call, every expert accepts at most
        capacity = ceil(c * T * k / m)
    slots; see "Conventions" for which.

    load_balancing_loss (Switch eq. 4-6, generalised to top-k), over the T real tokens (mask):
        f_i = (number of slots, over real tokens and ranks, that choose expert i) / (T * k)   sum_i f_i = 1
        P_i = (1/T) sum_t softmax(z_t)_i                                                     sum_i P_i = 1
        L   = alpha * m * sum_i f_i P_i
    At perfectly uniform routing (f_i = P_i = 1/m) L = alpha for every k. f counts selections before any
    capacity drop (the loss sees logits only) and is a count: no gradient flows through it, so
        dL/dz_ti = (alpha m / T) P_ti (f_i - sum_j f_j P_tj):
    descending it lowers the logits of experts loaded above the token's P-weighted mean load.
    router_z_loss (ST-MoE eq. 5): (1/T) sum_t logsumexp(z_t)^2 over the real tokens (no coefficient: the
    caller scales it, ST-MoE uses 1e-3).

Conventions (pinned, with the reason)
-------------------------------------
* Softmax then top-k then renormalize (Mixtral's order) and top-k then softmax over the k selected logits
  are one map: softmax(z_C) = p_C / sum p_C since the softmax denominator cancels. An implementation
  declares which one it computes (``router_order``); the references do not depend on it.
* Top-1 is never renormalized: with k = 1 the weight is the full softmax probability p_top (Switch), in
  both orders and for normalize_top_k=True. A renormalized single weight is exactly 1 and cuts the router
  off from the task gradient (Megatron-LM issue #894: top-1 with softmax after top-k trained no router).
* Ties: equal logits go to the lower expert index (a stable descending sort). ``torch.topk`` does not
  promise an order among equals; random draws have ties with probability zero, a dedicated property
  makes them on purpose.
* Precision: the gate logits are computed in the input dtype (an ``nn.Linear`` of x); the softmax, the
  selection and the weights in float32 at least (HF Mixtral's ``softmax(..., dtype=torch.float)``: in
  bfloat16 the probabilities of many experts round together and the ranking is lost); the weights are cast
  to the input dtype before they multiply the experts' outputs. The losses compute in float32 at least and
  return the dtype of the logits.
* Capacity: slots are served in the order (choice rank, token position): every token's first choice
  before any token's second choice (GShard's and Switch's priority: a second choice never crowds out a
  first choice), and within a rank tokens in position order over the flattened batch (Switch's cumsum
  over the sequence: later tokens are dropped). An expert keeps the first ``capacity`` slots it is sent.
  A dropped slot contributes exactly 0 and the other weights are not renormalized; a token whose every
  slot is dropped gets an MoE output of exactly 0 (the residual stream around the layer carries it),
  plus the shared experts, which see every token. Capacity applies in eval and training alike, to the
  b*s tokens of the call (padding included: the module takes no mask).
* Without capacity the MoE is position-wise: a token's output depends on that token alone.
* ``mask`` of the losses: True = real token, as the project's masks keep what is True; padding tokens count
  nowhere (neither in f, nor in P, nor in T).

Options (declarable; properties/options.py)
-------------------------------------------
* ``normalize_top_k`` (Router, MixtureOfExperts; constructor): True (default, Mixtral) renormalizes the k
  weights to sum 1 for k >= 2; False keeps the full-softmax probabilities (DeepSeekMoE, OLMoE).
* ``router_order`` (convention, never passed): "softmax_then_topk" (default) or "topk_then_softmax"; one
  map when renormalized, so an implementation that computes the softmax over the selected logits declares
  ``{"router_order": "topk_then_softmax", "normalize_top_k": True}`` and is judged by the same reference.
* ``n_shared_experts`` (MixtureOfExperts; constructor): 0 (default), 1, 2, or any count; shared experts
  (DeepSeekMoE) process every token with weight 1.
* ``capacity_factor`` (MixtureOfExperts; constructor): None (default, no capacity: no token is dropped) or
  a positive factor; the properties draw 1.0, 0.5, 1.25 and 2.0 (binary fractions, so every order of
  evaluating c * T * k / m rounds alike).
* ``expert`` (MixtureOfExperts; constructor): "swiglu" (default; Mixtral, DeepSeekMoE) or "ffn" (Switch).
* ``mask`` (load_balancing_loss, router_z_loss; input): the call takes a padding mask.

Canonical parameters
--------------------
    Router:            weight (m, d)
    MixtureOfExperts:  router.weight (m, d)
                       experts.{i}.gate.weight (f, d), experts.{i}.up.weight (f, d), experts.{i}.down.weight (d, f)
                       shared_experts.{j}.* alike;     expert="ffn": up.weight and down.weight only
An implementation with stacked expert tensors ((m, f, d)) hands out views under these names
(``canonical_state_dict``, README "Parameter names").

Properties (properties/test_mixture_of_experts.py)
--------------------------------------------------
Router: agrees with the reference (float64, float32, CUDA half); ties go to the lower expert index; the
renormalized orders are one map. MixtureOfExperts: agrees with the dense reference (every expert on every
token, weighted by the routing); identical experts with renormalized weights equal one expert;
top_k = n_experts equals the dense softmax mixture; shared experts add the same FFN output to every token;
without capacity it is position-wise (batch elements included) and equivariant to permuting tokens; with
capacity no expert exceeds it, the dropped slots are exactly the pinned ones, and a token dropped by every
choice outputs zero; the router gets a finite nonzero gradient even at top-1; exactly the selected experts
get gradients. Losses: load_balancing_loss agrees with the reference, is alpha at uniform routing for every
top_k, applies softmax once to raw logits (collapsed routing gives alpha m / k), ignores padding, and its
gradient pushes routing toward balance; router_z_loss is the mean logsumexp^2 and ignores padding.
Learnability: a tiny MoE learns a task whose token types need different experts (a different linear map per
type), and its routing specializes by type.
"""

from __future__ import annotations

import math

import numpy as np
from einops import einsum, rearrange

from spec.feed_forward import linear, silu
from spec.registry import Component, Option, Param, boolean, component, same_shape_as_first_input

EXPERT_KINDS = ("swiglu", "ffn")
ROUTER_ORDERS = ("softmax_then_topk", "topk_then_softmax")


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_capacity_factor(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0)


NORMALIZE_TOP_K = boolean("normalize_top_k", "renormalize the k >= 2 chosen weights to sum 1 (Mixtral); False keeps "
                          "the full-softmax probabilities (DeepSeekMoE, OLMoE)", kind="init")
ROUTER_ORDER = Option("router_order", ROUTER_ORDERS, "convention",
                      "softmax over all experts then top-k (and renormalize), or top-k then softmax over the "
                      "selected logits: one map when renormalized")
N_SHARED_EXPERTS = Option("n_shared_experts", (0, 1, 2), "init",
                          "shared experts that see every token with weight 1 (DeepSeekMoE)", accepts=_is_count)
CAPACITY_FACTOR = Option("capacity_factor", (None, 1.0, 0.5, 1.25, 2.0), "init",
                         "None: no capacity; c: each expert keeps at most ceil(c * b*s * k / m) slots",
                         accepts=_is_capacity_factor)
EXPERT = Option("expert", EXPERT_KINDS, "init", "the expert FFN: swiglu (no biases) or relu ffn (no biases)")
LOSS_MASK = boolean("mask", "the call takes a padding mask (b, s), True = real token", argument="mask")


def expert_parameters(prefix: str, *, d_model: int, d_ff: int, expert: str) -> dict[str, Param]:
    params = {}
    if expert == "swiglu":
        params[f"{prefix}.gate.weight"] = Param((d_ff, d_model))
    params[f"{prefix}.up.weight"] = Param((d_ff, d_model))
    params[f"{prefix}.down.weight"] = Param((d_model, d_ff))
    return params


def moe_parameters(*, d_model: int, d_ff: int, n_experts: int, n_shared_experts: int = 0, expert: str = "swiglu",
                   **_) -> dict[str, Param]:
    """router.weight (m, d), then every routed expert's and every shared expert's weights."""
    params = {"router.weight": Param((n_experts, d_model))}
    for i in range(n_experts):
        params.update(expert_parameters(f"experts.{i}", d_model=d_model, d_ff=d_ff, expert=expert))
    for j in range(n_shared_experts):
        params.update(expert_parameters(f"shared_experts.{j}", d_model=d_model, d_ff=d_ff, expert=expert))
    return params


def _scalar(*args, **kwargs) -> tuple[int, ...]:
    return ()


ROUTER = component(
    Component(
        name="Router",
        kind="module",
        family="mixture_of_experts",
        summary="linear gate, softmax, top-k (renormalized for k >= 2); returns dense (b, s, m) gates",
        parameters=lambda *, d_model, n_experts, **_: {"weight": Param((n_experts, d_model))},
        output_shape=None,  # (b, s, n_experts): the call does not know m, the properties check it
        options=(NORMALIZE_TOP_K, ROUTER_ORDER),
    )
)
MIXTURE_OF_EXPERTS = component(
    Component(
        name="MixtureOfExperts",
        kind="module",
        family="mixture_of_experts",
        summary="top-k routed expert FFNs (SwiGLU or FFN), shared experts, optional capacity",
        parameters=moe_parameters,
        output_shape=same_shape_as_first_input,
        options=(NORMALIZE_TOP_K, ROUTER_ORDER, N_SHARED_EXPERTS, CAPACITY_FACTOR, EXPERT),
    )
)
LOAD_BALANCING_LOSS = component(
    Component(
        name="load_balancing_loss",
        kind="function",
        family="mixture_of_experts",
        summary="Switch auxiliary loss alpha * m * sum_i f_i P_i from raw router logits",
        output_shape=_scalar,
        options=(LOSS_MASK,),
    )
)
ROUTER_Z_LOSS = component(
    Component(
        name="router_z_loss",
        kind="function",
        family="mixture_of_experts",
        summary="ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2",
        output_shape=_scalar,
        options=(LOSS_MASK,),
    )
)


# ---------------------------------------------------------------------------------------------------
# The float64 reference (numpy + einops), written apart from implementations/mixture_of_experts.py.


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def logsumexp(z: np.ndarray) -> np.ndarray:
    top = z.max(axis=-1)
    return top + np.log(np.exp(z - top[..., None]).sum(axis=-1))


def top_k_choice(logits: np.ndarray, top_k: int) -> np.ndarray:
    """(..., m) -> (..., k): the k largest logits' expert indices, largest first; ties to the lower index
    (a stable sort of -z keeps equal entries in index order)."""
    return np.argsort(-logits, axis=-1, kind="stable")[..., :top_k]


def route(logits: np.ndarray, *, top_k: int, normalize_top_k: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Dense gates (..., m) (0 for experts not chosen) and the choice (..., k) in rank order."""
    z = np.asarray(logits, dtype=np.float64)
    p = softmax(z)
    choice = top_k_choice(z, top_k)
    chosen = np.take_along_axis(p, choice, axis=-1)
    if normalize_top_k and top_k > 1:
        chosen = chosen / chosen.sum(axis=-1, keepdims=True)
    gates = np.zeros_like(p)
    np.put_along_axis(gates, choice, chosen, axis=-1)
    return gates, choice


def capacity(capacity_factor: float, *, tokens: int, top_k: int, n_experts: int) -> int:
    """ceil(capacity_factor * tokens * top_k / n_experts): slots one expert accepts."""
    return math.ceil(capacity_factor * tokens * top_k / n_experts)


def kept_slots(choice: np.ndarray, *, n_experts: int, capacity_factor: float | None) -> np.ndarray:
    """(T, k) bool for flattened tokens: which slots their experts keep. Slots are served by choice rank,
    then token position; each expert keeps the first ``capacity`` it is sent."""
    tokens, top_k = choice.shape
    if capacity_factor is None:
        return np.ones(choice.shape, dtype=bool)
    limit = capacity(capacity_factor, tokens=tokens, top_k=top_k, n_experts=n_experts)
    served = np.zeros(n_experts, dtype=int)
    keep = np.zeros(choice.shape, dtype=bool)
    for rank in range(top_k):
        for t in range(tokens):
            e = choice[t, rank]
            keep[t, rank] = served[e] < limit
            served[e] += 1
    return keep


def dispatch(logits: np.ndarray, *, top_k: int, normalize_top_k: bool = True,
             capacity_factor: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For router logits (b, s, m): the gates after capacity (b, s, m) (dropped slots 0) and the kept
    slots as a (b, s, m) bool (token sent to expert i and kept)."""
    b, s, m = logits.shape
    flat = rearrange(np.asarray(logits, dtype=np.float64), "b s m -> (b s) m")
    gates, choice = route(flat, top_k=top_k, normalize_top_k=normalize_top_k)
    keep = kept_slots(choice, n_experts=m, capacity_factor=capacity_factor)
    kept = np.zeros_like(gates, dtype=bool)
    np.put_along_axis(kept, choice, keep, axis=-1)
    back = lambda a: rearrange(a, "(b s) m -> b s m", b=b)
    return back(gates * kept), back(kept)


def expert_ffn(params: dict[str, np.ndarray], prefix: str, x: np.ndarray, *, expert: str) -> np.ndarray:
    """One expert on every row of x: SwiGLU or relu FFN, no biases."""
    up = linear(x, params[f"{prefix}.up.weight"])
    hidden = silu(linear(x, params[f"{prefix}.gate.weight"])) * up if expert == "swiglu" else np.maximum(up, 0.0)
    return linear(hidden, params[f"{prefix}.down.weight"])


def mixture_of_experts(params: dict[str, np.ndarray], x: np.ndarray, *, n_experts: int, top_k: int,
                       normalize_top_k: bool = True, n_shared_experts: int = 0,
                       capacity_factor: float | None = None, expert: str = "swiglu",
                       router_logits: np.ndarray | None = None) -> np.ndarray:
    """The dense float64 reference: every expert runs on every token, and its output is weighted by the
    token's gate for it (0 where not chosen or dropped). ``router_logits`` (b, s, m), if given, replaces
    x W_r^T (the half-precision properties pass the logits rounded as the pinned dtype contract says)."""
    p = {name: np.asarray(value, dtype=np.float64) for name, value in params.items()}
    x = np.asarray(x, dtype=np.float64)
    logits = linear(x, p["router.weight"]) if router_logits is None else np.asarray(router_logits, np.float64)
    gates, _ = dispatch(logits, top_k=top_k, normalize_top_k=normalize_top_k, capacity_factor=capacity_factor)
    outputs = np.stack([expert_ffn(p, f"experts.{i}", x, expert=expert) for i in range(n_experts)])  # (m, b, s, d)
    out = einsum(gates, outputs, "b s m, m b s d -> b s d")
    for j in range(n_shared_experts):
        out = out + expert_ffn(p, f"shared_experts.{j}", x, expert=expert)
    return out


def _real_rows(logits: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    flat = rearrange(np.asarray(logits, dtype=np.float64), "b s m -> (b s) m")
    if mask is None:
        return flat
    return flat[rearrange(np.asarray(mask, dtype=bool), "b s -> (b s)")]


def routed_fractions(logits: np.ndarray, *, top_k: int, mask: np.ndarray | None = None) -> np.ndarray:
    """f (m,): the share of the real tokens' k slots that choose each expert (sums to 1)."""
    z = _real_rows(logits, mask)
    counts = np.bincount(top_k_choice(z, top_k).reshape(-1), minlength=z.shape[-1])
    return counts / (z.shape[0] * top_k)


def load_balancing_loss(logits: np.ndarray, *, top_k: int, alpha: float = 0.01,
                        mask: np.ndarray | None = None) -> float:
    """alpha * m * sum_i f_i P_i over the real tokens (float64)."""
    z = _real_rows(logits, mask)
    f = routed_fractions(logits, top_k=top_k, mask=mask)
    P = softmax(z).mean(axis=0)
    return float(alpha * z.shape[-1] * (f * P).sum())


def load_balancing_loss_gradient(logits: np.ndarray, *, top_k: int, alpha: float = 0.01,
                                 mask: np.ndarray | None = None) -> np.ndarray:
    """dL/dz (b, s, m): (alpha m / T) P_ti (f_i - sum_j f_j P_tj) at real tokens, 0 at padding."""
    z = np.asarray(logits, dtype=np.float64)
    keep = np.ones(z.shape[:2], dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    f = routed_fractions(z, top_k=top_k, mask=keep)
    p = softmax(z)
    mean_load = einsum(p, f, "b s m, m -> b s")[..., None]
    grad = alpha * z.shape[-1] / keep.sum() * p * (f - mean_load)
    return grad * keep[..., None]


def router_z_loss(logits: np.ndarray, *, mask: np.ndarray | None = None) -> float:
    """Mean over the real tokens of logsumexp(z)^2 (float64)."""
    return float((logsumexp(_real_rows(logits, mask)) ** 2).mean())
