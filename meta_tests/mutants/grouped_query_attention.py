"""Mutants of MultiQueryAttention and GroupedQueryAttention."""

from __future__ import annotations

from einops import rearrange, repeat
from torch import nn

from implementations.attention import ProjectedAttention
from implementations.grouped_query_attention import GroupedQueryAttention
from implementations.sdpa import scaled_dot_product_attention
from meta_tests.catalog import mutant


@mutant(
    name="GroupedQueryAttention_round_robin",
    bug="KV heads repeated round-robin: query head i reads KV head i % n_kv_head (x-transformers' layout)",
    caught_by=["test_gqa_equals_mha_with_repeated_kv_heads"],
    provides="GroupedQueryAttention",
)
class RoundRobinGQA(GroupedQueryAttention):
    def attend(self, x, context, *, mask, causal, cache=None):
        r = self.n_head // self.n_kv_head
        q = rearrange(self.q(x), "b s (h e) -> b h s e", h=self.n_head)
        k = repeat(self.k(context), "b t (g e) -> b (r g) t e", g=self.n_kv_head, r=r)
        v = repeat(self.v(context), "b t (g e) -> b (r g) t e", g=self.n_kv_head, r=r)
        a = scaled_dot_product_attention(q, k, v, mask=mask, causal=causal)
        return self.o(rearrange(a, "b h s e -> b s (h e)"))


@mutant(
    name="MultiQueryAttention_kv_to_d_model",
    bug="MQA whose k and v project to d_model and keep only the first head: no memory saved",
    caught_by=["test_kv_projections_have_the_spec_sizes"],
    provides="MultiQueryAttention",
)
class WideKVMultiQueryAttention(ProjectedAttention):
    def __init__(self, *, d_model: int, n_head: int) -> None:
        super().__init__(d_model=d_model, n_head=n_head, n_kv_head=1)
        self.k_full = nn.Linear(d_model, d_model)  # the learner's original projection, still allocated
        self.v_full = nn.Linear(d_model, d_model)

    def forward(self, x, *, mask=None, causal=False):
        return self.attend(x, x, mask=mask, causal=causal)


@mutant(
    name="MultiQueryAttention_is_mha",
    bug="MQA implemented as MHA plus an unused n_kv_head argument (n_head KV heads)",
    caught_by=["test_gqa_with_one_kv_head_equals_mqa", "test_kv_projections_have_the_spec_sizes"],
    provides="MultiQueryAttention",
)
class MhaAsMqa(ProjectedAttention):
    def __init__(self, *, d_model: int, n_head: int) -> None:
        super().__init__(d_model=d_model, n_head=n_head, n_kv_head=n_head)

    def canonical_state_dict(self):
        # Hands the suite the first KV head only, so the weights load, but attends with all of them.
        e = self.head_dim
        state = dict(self.named_parameters())
        for name in ("k", "v"):
            state[f"{name}.weight"] = state[f"{name}.weight"][:e]
            state[f"{name}.bias"] = state[f"{name}.bias"][:e]
        return state

    def forward(self, x, *, mask=None, causal=False):
        return self.attend(x, x, mask=mask, causal=causal)


@mutant(
    name="GroupedQueryAttention_ignores_n_kv_head_groups",
    bug="GQA repeats KV heads with .repeat on the head axis (tiles the group sequence)",
    caught_by=["test_gqa_with_n_head_kv_heads_equals_mha", "test_gqa_equals_mha_with_repeated_kv_heads"],
    provides="GroupedQueryAttention",
)
class SwappedHeadsGQA(GroupedQueryAttention):
    """Reverses the KV heads before repeating: right sizes, wrong pairing of query and KV heads."""

    def attend(self, x, context, *, mask, causal, cache=None):
        q = rearrange(self.q(x), "b s (h e) -> b h s e", h=self.n_head)
        k = rearrange(self.k(context), "b t (g e) -> b g t e", g=self.n_kv_head).flip(1)
        v = rearrange(self.v(context), "b t (g e) -> b g t e", g=self.n_kv_head).flip(1)
        a = scaled_dot_product_attention(q, k, v, mask=mask, causal=causal)
        return self.o(rearrange(a, "b h s e -> b s (h e)"))
