"""Mutants of the decoder-only language model: each a realistic bug, as the smallest change to ours."""

from __future__ import annotations

import torch
from torch import nn

from implementations.decoder_only import DecoderOnlyLM
from implementations.kv_cache import KVCache
from implementations.rotary_embedding import RotaryEmbedding
from meta_tests.catalog import mutant

LM = "DecoderOnlyLM"


@mutant(name="DecoderOnlyLM_final_norm_missing", bug="the head reads the residual stream without the final norm",
        provides=LM, caught_by=["test_decoder_only_lm_agrees_with_reference",
                                "test_every_lm_parameter_gets_a_finite_gradient_from_next_token_loss"])
class FinalNormMissing(DecoderOnlyLM):
    def logits(self, x):
        return self.output(x)


@mutant(name="DecoderOnlyLM_tied_head_is_a_copy", bug="tie_weights copies the embedding into a separate head",
        provides=LM, params={"tie": True},
        caught_by=["test_tied_head_is_the_embedding", "test_decoder_only_lm_agrees_with_reference"])
class TiedHeadIsACopy(DecoderOnlyLM):
    def __init__(self, **kw):
        super().__init__(**kw)
        if self.head is None:
            self.head = nn.Linear(self.d_model, self.vocab_size, bias=False)
            self.head.weight = nn.Parameter(self.embed.weight.detach().clone())


@mutant(name="DecoderOnlyLM_tied_head_detached", bug="the tied head uses embed.weight.detach(): no gradient from the head",
        provides=LM, caught_by=["test_tied_head_is_the_embedding"])
class TiedHeadDetached(DecoderOnlyLM):
    def output(self, x):
        weight = self.embed.weight.detach() if self.head is None else self.head.weight
        return x @ weight.T


@mutant(name="DecoderOnlyLM_causal_mask_missing", bug="the layers' self-attention is called with causal=False",
        provides=LM, caught_by=["test_decoder_only_lm_is_causal_end_to_end", "test_decoder_only_lm_agrees_with_reference"])
class CausalMaskMissing(DecoderOnlyLM):
    def __init__(self, **kw):
        super().__init__(**kw)
        for layer in self.layers:
            attend = layer.self_attn.forward
            layer.self_attn.forward = lambda x, *, mask=None, causal=False, cache=None, attend=attend: attend(
                x, mask=mask, causal=False, cache=cache)


class _RotaryWithoutOffset(RotaryEmbedding):
    def forward(self, x, *, offset=0, positions=None):
        return super().forward(x, offset=0, positions=positions)


@mutant(name="DecoderOnlyLM_rope_offset_ignored_when_cached", bug="RoPE rotates every cached chunk from position 0",
        provides=LM, params={"positions": "rope"},
        caught_by=["test_decoder_only_lm_cached_logits_equal_the_full_pass", "test_greedy_generation_with_cache_equals_without"])
class RopeOffsetIgnored(DecoderOnlyLM):
    def __init__(self, **kw):
        super().__init__(**kw)
        if self.positions == "rope":
            rotary = _RotaryWithoutOffset(head_dim=self.head_dim)
            for layer in self.layers:
                layer.self_attn.rotary = rotary


@mutant(name="DecoderOnlyLM_learned_positions_restart_per_chunk",
        bug="learned positions restart at row 0 for every cached chunk", provides=LM, params={"positions": "learned"},
        caught_by=["test_decoder_only_lm_cached_logits_equal_the_full_pass"])
class LearnedPositionsRestart(DecoderOnlyLM):
    def embed_tokens(self, tokens, start):
        return super().embed_tokens(tokens, 0)


@mutant(name="DecoderOnlyLM_cache_not_used", bug="the cache is never updated nor read: each chunk is decoded alone",
        provides=LM, caught_by=["test_decoder_only_lm_cached_logits_equal_the_full_pass",
                                "test_greedy_generation_with_cache_equals_without"])
class CacheNotUsed(DecoderOnlyLM):
    def forward(self, tokens, *, mask=None, cache=None):
        return super().forward(tokens, mask=mask, cache=None)


@mutant(name="DecoderOnlyLM_uncached_generation_feeds_last_token",
        bug="generation without a cache re-feeds only the last token (no context)", provides=LM,
        caught_by=["test_greedy_generation_with_cache_equals_without"])
class UncachedFeedsLastToken(DecoderOnlyLM):
    @torch.no_grad()
    def generate(self, prompt, *, max_new_tokens, use_cache=True, temperature=0.0, generator=None):
        if use_cache:
            return super().generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, generator=generator)
        seq = prompt
        for _ in range(max_new_tokens):
            nxt = self.pick(self(seq[:, -1:])[:, -1], temperature, generator)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
        return seq


@mutant(name="DecoderOnlyLM_samples_from_global_rng", bug="sampling ignores the generator and uses the global RNG",
        provides=LM, caught_by=["test_seeded_sampling_is_reproducible"])
class SamplesFromGlobalRng(DecoderOnlyLM):
    def pick(self, logits, temperature, generator):
        if temperature == 0:
            return logits.argmax(dim=-1)
        return torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1).squeeze(-1)


@mutant(name="DecoderOnlyLM_temperature_multiplies", bug="logits are multiplied by the temperature, not divided",
        provides=LM, caught_by=["test_sampling_at_vanishing_temperature_is_greedy"])
class TemperatureMultiplies(DecoderOnlyLM):
    def pick(self, logits, temperature, generator):
        if temperature == 0:
            return logits.argmax(dim=-1)
        return torch.multinomial(torch.softmax(logits * temperature, dim=-1), 1, generator=generator).squeeze(-1)


@mutant(name="DecoderOnlyLM_cache_sized_by_n_head", bug="new_cache allocates n_head KV heads, not n_kv_head",
        provides=LM, caught_by=["test_new_cache_sizes_follow_spec"])
class CacheSizedByNHead(DecoderOnlyLM):
    def new_cache(self, *, batch_size, capacity):
        w = self.embed.weight
        return [KVCache(batch_size=batch_size, n_kv_head=self.n_head, head_dim=self.head_dim, capacity=capacity,
                        dtype=w.dtype, device=w.device) for _ in range(self.n_layer)]


@mutant(name="DecoderOnlyLM_padding_mask_inverted", bug="the key padding mask is read with True = padding",
        provides=LM, caught_by=["test_right_padded_batch_matches_each_sequence_alone",
                                "test_decoder_only_lm_agrees_with_reference"])
class PaddingMaskInverted(DecoderOnlyLM):
    def forward(self, tokens, *, mask=None, cache=None):
        return super().forward(tokens, mask=None if mask is None else ~mask, cache=cache)


@mutant(name="DecoderOnlyLM_bias_ignored", bug="bias=False is accepted but every projection and norm keeps its bias",
        provides=LM, caught_by=["test_decoder_only_lm_agrees_with_reference"])
class BiasIgnored(DecoderOnlyLM):
    def __init__(self, **kw):
        super().__init__(**{**kw, "bias": True})
