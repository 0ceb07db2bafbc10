"""Speculative decoding in PyTorch. Spec: spec/speculative_decoding.py.

``speculative_accept`` is the batched accept/reject kernel; ``speculative_generate`` runs rounds of
propose (draft) -> verify (one target forward) -> accept -> roll the caches back, each step one method of
``SpeculativeDecoding`` so that every step of the algorithm has one place.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["speculative_accept", "residual_distribution", "speculative_generate"]

PAD = -1  # speculative_accept's filler after the emitted tokens of a row


def residual_distribution(p: Tensor, q: Tensor) -> Tensor:
    """norm(max(0, p - q)) along the last axis: where the draft over-proposed, the target's missing mass.
    Where p == q there is no excess (and rejection never happens): p itself, never 0/0."""
    excess = (p - q).clamp(min=0)
    total = excess.sum(dim=-1, keepdim=True)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(total > 0, excess / safe, p)


def speculative_accept(p: Tensor, q: Tensor, draft_tokens: Tensor, *,
                       generator: torch.Generator | None = None) -> Tensor:
    """Accept draft token j of each row with probability min(1, p/q) until the first rejection; then emit a
    token drawn from the residual there, or, with all kd accepted, a bonus token drawn from p[:, kd].

    p (b, kd + 1, n), q (b, kd, n), draft_tokens (b, kd) -> (b, kd + 1) long: accepted tokens, the emitted one, -1.
    """
    b, kd = draft_tokens.shape
    if p.shape[:2] != (b, kd + 1) or q.shape != (b, kd, p.shape[-1]):
        raise ValueError(f"p must be (b, kd + 1, n) and q (b, kd, n) for draft_tokens (b, kd) = {(b, kd)}; "
                         f"got p {tuple(p.shape)}, q {tuple(q.shape)}")
    index = draft_tokens[..., None]
    p_x = p[:, :kd].gather(-1, index).squeeze(-1)  # (b, kd): the target's probability of each draft token
    q_x = q.gather(-1, index).squeeze(-1)  # (b, kd): the draft's
    u = torch.rand((b, kd), generator=generator, dtype=p.dtype, device=p.device)
    accepted = u * q_x < p_x  # u < p/q without dividing: a token with p = 0 is never accepted
    n_accepted = accepted.long().cumprod(dim=1).sum(dim=1)  # (b,): accepted before the first rejection
    nxt = torch.multinomial(stop_distribution(p, q, n_accepted), 1, generator=generator).squeeze(-1)
    return emitted_tokens(draft_tokens, n_accepted, nxt)


def stop_distribution(p: Tensor, q: Tensor, n_accepted: Tensor) -> Tensor:
    """(b, n): what a row's last token is drawn from: the residual at its first rejection, or p[:, kd] (the
    bonus token) when it accepted all kd."""
    kd = q.shape[1]
    rows = torch.arange(p.shape[0], device=p.device)
    p_next = p[rows, n_accepted]  # the target's distribution where the row stops
    q_next = q[rows, n_accepted.clamp(max=kd - 1)] if kd > 0 else torch.zeros_like(p_next)
    return torch.where((n_accepted < kd)[:, None], residual_distribution(p_next, q_next), p_next)


def emitted_tokens(draft_tokens: Tensor, n_accepted: Tensor, nxt: Tensor) -> Tensor:
    """(b, kd + 1): each row's accepted draft tokens, its next token nxt (b,), then -1."""
    b, kd = draft_tokens.shape
    positions = torch.arange(kd + 1, device=draft_tokens.device)
    out = torch.full((b, kd + 1), PAD, dtype=torch.long, device=draft_tokens.device)
    out[:, :kd] = torch.where(positions[:kd] < n_accepted[:, None], draft_tokens, PAD)
    out[torch.arange(b, device=draft_tokens.device), n_accepted] = nxt
    return out


def probabilities(logits: Tensor, temperature: float) -> Tensor:
    """softmax(logits / T), in float64 for float64 logits, else float32 (as DecoderOnlyLM.pick)."""
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return torch.softmax(logits.to(compute) / temperature, dim=-1)


def rollback(caches: list, length: int) -> None:
    """Forget every cached position from ``length`` on (KVCache keeps no other state: the next update
    overwrites the stale entries)."""
    for cache in caches:
        cache.length = length


class SpeculativeDecoding:
    """One run of speculative_generate on a (1, s0) prompt. ``target`` and ``draft`` follow DecoderOnlyLM's
    call contract: ``model(tokens, cache=caches)`` -> logits (1, s, n), and ``new_cache``."""

    def __init__(self, target: nn.Module, draft: nn.Module, prompt: Tensor, *, max_new_tokens: int, k: int,
                 temperature: float, generator: torch.Generator | None) -> None:
        if prompt.dim() != 2 or prompt.shape[0] != 1:
            raise ValueError(f"prompt must be (1, s0): speculative decoding runs one sequence, got "
                             f"{tuple(prompt.shape)}")
        if k < 1 or max_new_tokens < 0 or temperature < 0:
            raise ValueError(f"need k >= 1, max_new_tokens >= 0, temperature >= 0; got k={k}, "
                             f"max_new_tokens={max_new_tokens}, temperature={temperature}")
        self.target, self.draft, self.k = target, draft, k
        self.temperature, self.generator = temperature, generator
        self.end = prompt.shape[1] + max_new_tokens
        self.seq = prompt
        self.target_cache = target.new_cache(batch_size=1, capacity=self.end)
        self.draft_cache = draft.new_cache(batch_size=1, capacity=self.end)
        self.target_seen = self.draft_seen = 0  # positions each cache holds (all of them valid)

    def run(self) -> Tensor:
        while self.seq.shape[1] < self.end:
            start = self.seq.shape[1]
            proposals, q = self.propose(min(self.k, self.end - start - 1))
            p = self.verify(proposals)
            emitted = self.accept(p, q, proposals)
            self.seq = torch.cat([self.seq, emitted], dim=1)
            self.roll_back(start + emitted.shape[1] - 1)  # the prefix and the accepted proposals stay valid
        return self.seq

    def propose(self, count: int) -> tuple[Tensor, Tensor | None]:
        """``count`` draft tokens (1, count), one draft forward each, and (sampling) their q (1, count, n)."""
        tokens, dists = self.seq[:, self.draft_seen :], []
        proposals = self.seq[:, :0]
        for _ in range(count):
            logits = self.draft(tokens, cache=self.draft_cache)[:, -1]  # (1, n)
            self.draft_seen += tokens.shape[1]
            if self.temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                dists.append(probabilities(logits, self.temperature))
                nxt = torch.multinomial(dists[-1], 1, generator=self.generator)
            proposals = torch.cat([proposals, nxt.to(self.seq.dtype)], dim=1)
            tokens = proposals[:, -1:]
        return proposals, (torch.stack(dists, dim=1) if dists else None)

    def verify(self, proposals: Tensor) -> Tensor:
        """One target forward over its unseen tokens and the proposals: the logits (1, count + 1, n) that
        follow the prefix and each proposal."""
        fed = torch.cat([self.seq[:, self.target_seen :], proposals], dim=1)
        logits = self.target(fed, cache=self.target_cache)
        self.target_seen += fed.shape[1]
        return logits[:, -(proposals.shape[1] + 1) :]

    def accept(self, logits: Tensor, q: Tensor | None, proposals: Tensor) -> Tensor:
        """The emitted tokens (1, a + 1): the a accepted proposals and the target's own next token."""
        if self.temperature == 0:
            best = logits.argmax(dim=-1)  # (1, count + 1)
            agree = (best[:, :-1] == proposals).long().cumprod(dim=1)
            a = int(agree.sum())
            return torch.cat([proposals[:, :a], best[:, a : a + 1].to(proposals.dtype)], dim=1)
        if q is None:  # nothing proposed (the last round): a plain sample from the target
            q = probabilities(logits[:, :0], self.temperature)
        p = probabilities(logits, self.temperature)
        row = speculative_accept(p, q.to(p.dtype), proposals, generator=self.generator)[0]
        return row[row != PAD][None].to(proposals.dtype)

    def roll_back(self, valid: int) -> None:
        self.target_seen, self.draft_seen = min(self.target_seen, valid), min(self.draft_seen, valid)
        rollback(self.target_cache, self.target_seen)
        rollback(self.draft_cache, self.draft_seen)


@torch.no_grad()
def speculative_generate(target: nn.Module, draft: nn.Module, prompt: Tensor, *, max_new_tokens: int, k: int,
                         temperature: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
    """(1, s0) -> (1, s0 + max_new_tokens): the target's greedy tokens (temperature 0), or a sample of its
    softmax(logits / T) decoding, with the draft proposing k tokens per target forward."""
    return SpeculativeDecoding(target, draft, prompt, max_new_tokens=max_new_tokens, k=k, temperature=temperature,
                               generator=generator).run()


class ForwardCounter(nn.Module):
    """Wraps a model and counts its forward calls and the tokens fed to them (properties and benchmarks read
    how many target passes speculative decoding took); everything else is the wrapped model's. ``name``
    is what it prints as (a report names "the target", not the model's whole module tree)."""

    def __init__(self, model: nn.Module, name: str = "model") -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.calls = 0
        self.tokens = 0

    def __repr__(self) -> str:
        return f"{self.name} ({type(self.model).__name__})"

    def forward(self, tokens: Tensor, **kwargs) -> Tensor:
        self.calls += 1
        self.tokens += tokens.shape[-1]
        return self.model(tokens, **kwargs)

    def new_cache(self, **kwargs):
        return self.model.new_cache(**kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)
