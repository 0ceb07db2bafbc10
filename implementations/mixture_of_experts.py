"""Mixture of experts in PyTorch: Router, MixtureOfExperts (sparse dispatch), load_balancing_loss and
router_z_loss. Spec: spec/mixture_of_experts.py (m experts, k chosen per token, T = b*s tokens).

The forward pass dispatches sparsely: each expert runs only on the tokens sent to it and kept. Its
results land in a (T*k, d) buffer at slot t*k + r (token t's choice of rank r): every slot is written at
most once, so the combine is a plain weighted sum over ranks, deterministic on every device (no atomic
index_add). ``dense_mixture`` below is the readable dense path (every expert on every token, weighted by
the gates), which benchmarks/moe_dispatch.py times against the sparse one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Router", "MixtureOfExperts", "load_balancing_loss", "router_z_loss"]

EXPERT_KINDS = ("swiglu", "ffn")
ROUTER_ORDERS = ("softmax_then_topk", "topk_then_softmax")


def _routing_dtype(logits: Tensor) -> Tensor:
    """Routing math runs in float32 at least: bfloat16 probabilities of many experts round together."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def top_k_choice(z: Tensor, top_k: int) -> Tensor:
    """(..., m) -> (..., k) expert indices, largest logit first; ties to the lower index. torch.topk does
    not promise an order among equal values; a stable descending sort keeps them in index order."""
    return torch.sort(z, dim=-1, descending=True, stable=True).indices[..., :top_k]


def route_logits(logits: Tensor, *, top_k: int, normalize_top_k: bool = True,
                 router_order: str = "softmax_then_topk") -> tuple[Tensor, Tensor]:
    """Router logits (..., m) -> (weights (..., k), choice (..., k)), weights in float32 at least.

    Top-1 keeps the full softmax probability whatever the order: renormalizing one weight gives exactly
    1, and the router would get no gradient from the output (Megatron-LM #894)."""
    z = _routing_dtype(logits)
    choice = top_k_choice(z, top_k)
    if normalize_top_k and top_k > 1 and router_order == "topk_then_softmax":
        return torch.softmax(z.gather(-1, choice), dim=-1), choice
    weights = torch.softmax(z, dim=-1).gather(-1, choice)
    if normalize_top_k and top_k > 1:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, choice


class Router(nn.Module):
    """Linear gate (no bias), softmax, top-k. ``forward`` returns the dense gates (b, s, m), zero for
    the experts not chosen; ``route`` returns the k weights and choices the MoE dispatches with."""

    def __init__(self, *, d_model: int, n_experts: int, top_k: int, normalize_top_k: bool = True,
                 router_order: str = "softmax_then_topk") -> None:
        super().__init__()
        if d_model <= 0 or n_experts <= 0:
            raise ValueError(f"Router: sizes must be positive, got d_model={d_model}, n_experts={n_experts}")
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"Router: top_k must be in 1 .. n_experts, got top_k={top_k}, n_experts={n_experts}")
        if not isinstance(normalize_top_k, bool):
            raise ValueError(f"Router: normalize_top_k must be True or False, got {normalize_top_k!r}")
        if router_order not in ROUTER_ORDERS:
            raise ValueError(f"Router: router_order must be one of {ROUTER_ORDERS}, got {router_order!r}")
        if router_order == "topk_then_softmax" and not normalize_top_k:
            raise ValueError("Router: router_order='topk_then_softmax' always renormalizes; it needs normalize_top_k=True")
        self.n_experts, self.top_k = n_experts, top_k
        self.normalize_top_k, self.router_order = normalize_top_k, router_order
        self.weight = nn.Parameter(torch.randn(n_experts, d_model) / math.sqrt(d_model))

    def logits(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)  # (..., m), in x's dtype

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return route_logits(self.logits(x), top_k=self.top_k, normalize_top_k=self.normalize_top_k,
                            router_order=self.router_order)

    def forward(self, x: Tensor) -> Tensor:
        weights, choice = self.route(x)
        gates = torch.zeros(*choice.shape[:-1], self.n_experts, dtype=weights.dtype, device=weights.device)
        return gates.scatter(-1, choice, weights).to(x.dtype)  # (b, s, m)


class Expert(nn.Module):
    """down(silu(gate(x)) * up(x)) ("swiglu") or down(relu(up(x))) ("ffn"); no biases."""

    def __init__(self, *, d_model: int, d_ff: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "swiglu":
            self.gate = nn.Linear(d_model, d_ff, bias=False)
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        hidden = F.silu(self.gate(x)) * self.up(x) if self.kind == "swiglu" else F.relu(self.up(x))
        return self.down(hidden)


class MixtureOfExperts(nn.Module):
    """Top-k routed experts plus shared experts, with an optional capacity per expert (spec for the
    pinned drop order: slots by choice rank, then token position)."""

    def __init__(self, *, d_model: int, d_ff: int, n_experts: int, top_k: int, n_shared_experts: int = 0,
                 capacity_factor: float | None = None, normalize_top_k: bool = True,
                 router_order: str = "softmax_then_topk", expert: str = "swiglu") -> None:
        super().__init__()
        if d_ff <= 0:
            raise ValueError(f"MixtureOfExperts: d_ff must be positive, got d_ff={d_ff}")
        if not isinstance(n_shared_experts, int) or isinstance(n_shared_experts, bool) or n_shared_experts < 0:
            raise ValueError(f"MixtureOfExperts: n_shared_experts must be a count >= 0, got {n_shared_experts!r}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"MixtureOfExperts: capacity_factor must be None or > 0, got {capacity_factor!r}")
        if expert not in EXPERT_KINDS:
            raise ValueError(f"MixtureOfExperts: expert must be one of {EXPERT_KINDS}, got expert={expert!r}")
        self.router = Router(d_model=d_model, n_experts=n_experts, top_k=top_k, normalize_top_k=normalize_top_k,
                             router_order=router_order)
        self.experts = nn.ModuleList(Expert(d_model=d_model, d_ff=d_ff, kind=expert) for _ in range(n_experts))
        self.shared_experts = nn.ModuleList(
            Expert(d_model=d_model, d_ff=d_ff, kind=expert) for _ in range(n_shared_experts))
        self.n_experts, self.top_k, self.capacity_factor = n_experts, top_k, capacity_factor

    def capacity(self, tokens: int) -> int | None:
        """ceil(capacity_factor * tokens * k / m) slots per expert, or None."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * tokens * self.top_k / self.n_experts)

    def kept_slots(self, choice: Tensor) -> Tensor:
        """(T, k) choices -> (T, k) bool: served rank by rank, in token order within a rank; an expert
        keeps the first `capacity` slots sent to it. E.g. k = 1, capacity 1, choices [2, 2, 0] ->
        [True, False, True]."""
        limit = self.capacity(choice.shape[0])
        if limit is None:
            return torch.ones_like(choice, dtype=torch.bool)
        queue = choice.t().reshape(-1)  # (k*T,): rank 0 of every token, then rank 1, ...
        sent = F.one_hot(queue, self.n_experts)  # (k*T, m)
        place = (sent.cumsum(0) * sent).sum(-1) - 1  # 0-based place of each slot in its expert's queue
        return (place < limit).reshape(self.top_k, -1).t()

    def forward(self, x: Tensor) -> Tensor:
        b, s, d = x.shape
        tokens = x.reshape(b * s, d)  # (T, d), position order
        weights, choice = self.router.route(tokens)  # (T, k) each
        keep = self.kept_slots(choice)
        slots, outputs = [], []
        for i, expert in enumerate(self.experts):
            token, rank = torch.nonzero((choice == i) & keep, as_tuple=True)
            if token.numel():
                slots.append(token * self.top_k + rank)
                outputs.append(expert(tokens[token]))
        buffer = tokens.new_zeros(b * s * self.top_k, d)  # dropped and unused slots stay 0
        if slots:
            buffer = buffer.index_put((torch.cat(slots),), torch.cat(outputs))  # each slot written once
        out = (weights.to(x.dtype)[..., None] * buffer.reshape(b * s, self.top_k, d)).sum(1)  # (T, d)
        for shared in self.shared_experts:
            out = out + shared(tokens)
        return out.reshape(b, s, d)


def dense_mixture(moe: MixtureOfExperts, x: Tensor) -> Tensor:
    """The readable dense path: every expert on every token, weighted by the gates after capacity (0 where
    not chosen or dropped). Equal to ``moe(x)``; m times the expert work."""
    b, s, d = x.shape
    tokens = x.reshape(b * s, d)
    weights, choice = moe.router.route(tokens)
    kept = weights * moe.kept_slots(choice)
    gates = torch.zeros(b * s, moe.n_experts, dtype=kept.dtype, device=x.device).scatter(-1, choice, kept)
    outputs = torch.stack([expert(tokens) for expert in moe.experts])  # (m, T, d)
    out = torch.einsum("tm,mtd->td", gates.to(x.dtype), outputs)
    for shared in moe.shared_experts:
        out = out + shared(tokens)
    return out.reshape(b, s, d)


def _real_tokens(router_logits: Tensor, mask: Tensor | None) -> Tensor:
    z = _routing_dtype(router_logits).reshape(-1, router_logits.shape[-1])  # (T, m)
    return z if mask is None else z[mask.reshape(-1)]


def load_balancing_loss(router_logits: Tensor, *, top_k: int, alpha: float = 0.01, mask: Tensor | None = None) -> Tensor:
    """Switch's alpha * m * sum_i f_i P_i from raw logits (b, s, m): f_i the share of the real tokens'
    k slots choosing expert i (a count: no gradient), P_i the mean full-softmax probability."""
    z = _real_tokens(router_logits, mask)
    n_tokens, m = z.shape
    counts = F.one_hot(top_k_choice(z, top_k), m).sum(dim=(0, 1))  # (m,)
    f = counts.to(z.dtype) / (n_tokens * top_k)
    P = torch.softmax(z, dim=-1).mean(dim=0)
    return (alpha * m * (f * P).sum()).to(router_logits.dtype)


def router_z_loss(router_logits: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """ST-MoE: the mean over real tokens of logsumexp(z)^2 (unscaled)."""
    z = _real_tokens(router_logits, mask)
    return (torch.logsumexp(z, dim=-1) ** 2).mean().to(router_logits.dtype)
