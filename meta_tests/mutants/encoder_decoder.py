"""Mutants of the encoder-decoder model, and the decoder-only mutant the copy learnability test catches."""

from __future__ import annotations

import contextlib

import torch

import implementations.attention as attention_module
from implementations.decoder_only import DecoderOnlyLM
from implementations.encoder_decoder import EncoderDecoderModel, key_mask
from meta_tests.catalog import mutant


@contextlib.contextmanager
def attention_never_causal():
    """Every attention module of ours ignores causal=True while the block runs (it sees the future)."""
    original = attention_module.scaled_dot_product_attention

    def sdpa(q, k, v, *, mask=None, causal=False, **kwargs):
        return original(q, k, v, mask=mask, causal=False, **kwargs)

    attention_module.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        attention_module.scaled_dot_product_attention = original


@mutant(name="EncoderDecoderModel_memory_mask_ignored", bug="cross-attention reads padded memory positions (no memory mask)",
        provides="EncoderDecoderModel",
        caught_by=["test_encoder_decoder_ignores_padded_source_positions", "test_encoder_decoder_model_agrees_with_reference"])
class EncoderDecoderModel_MemoryMaskIgnored(EncoderDecoderModel):
    def decode(self, tgt, memory, *, src_mask=None, tgt_mask=None, cache=None):
        return super().decode(tgt, memory, src_mask=None, tgt_mask=tgt_mask, cache=cache)


@mutant(name="EncoderDecoderModel_memory_mask_inverted",
        bug="cross-attention mask polarity inverted (True = ignore, nn.Transformer's memory_key_padding_mask)",
        provides="EncoderDecoderModel", caught_by=["test_encoder_decoder_depends_on_every_real_source_position"])
class EncoderDecoderModel_MemoryMaskInverted(EncoderDecoderModel):
    def decode(self, tgt, memory, *, src_mask=None, tgt_mask=None, cache=None):
        if src_mask is None:
            src_mask = torch.ones(memory.shape[:2], dtype=torch.bool, device=memory.device)
        return super().decode(tgt, memory, src_mask=~src_mask, tgt_mask=tgt_mask, cache=cache)


@mutant(name="EncoderDecoderModel_decoder_not_causal", bug="the decoder's self-attention sees later target tokens",
        provides="EncoderDecoderModel",
        caught_by=["test_encoder_decoder_is_causal_end_to_end", "test_encoder_decoder_model_agrees_with_reference"])
class EncoderDecoderModel_NotCausal(EncoderDecoderModel):
    def decode(self, *args, **kwargs):
        with attention_never_causal():
            return super().decode(*args, **kwargs)


@mutant(name="EncoderDecoderModel_decoder_ignores_the_memory",
        bug="cross-attention reads a zeroed memory: the decoder never sees the source",
        provides="EncoderDecoderModel",
        caught_by=["test_encoder_decoder_learns_to_reverse", "test_encoder_decoder_model_agrees_with_reference"])
class EncoderDecoderModel_IgnoresMemory(EncoderDecoderModel):
    # Teacher forcing still trains (the target prefix predicts something), but reversing needs the source:
    # held-out accuracy stays near chance, whatever the seed (the causality mutant only failed by its seed).
    def decode(self, tgt, memory, **kwargs):
        return super().decode(tgt, torch.zeros_like(memory), **kwargs)


@mutant(name="EncoderDecoderModel_encoder_causal", bug="the encoder is given the decoder's causal mask",
        provides="EncoderDecoderModel",
        caught_by=["test_encoder_decoder_memory_sees_every_source_position",
                   "test_encoder_decoder_model_agrees_with_reference"])
class EncoderDecoderModel_EncoderCausal(EncoderDecoderModel):
    def encode(self, src, *, src_mask=None):
        t = src.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=src.device).tril()
        mask = causal if src_mask is None else causal & key_mask(src_mask)
        x = self.embed(self.src_embed, src)
        for layer in self.encoder:
            x = layer(x, mask=mask)
        return x if self.encoder_norm is None else self.encoder_norm(x)


@mutant(name="EncoderDecoderModel_encoder_ignores_src_mask", bug="src_mask reaches cross-attention but not the encoder",
        provides="EncoderDecoderModel",
        caught_by=["test_encoder_decoder_ignores_padded_source_positions",
                   "test_encoder_decoder_model_agrees_with_reference"])
class EncoderDecoderModel_EncoderIgnoresMask(EncoderDecoderModel):
    def encode(self, src, *, src_mask=None):
        return super().encode(src, src_mask=None)


@mutant(name="EncoderDecoderModel_positions_not_offset_when_cached",
        bug="a cached chunk gets positions from 0 instead of cache[0].length",
        provides="EncoderDecoderModel",
        caught_by=["test_encoder_decoder_cached_decoding_equals_teacher_forcing",
                   "test_encoder_decoder_greedy_generation_with_cache_equals_without"])
class EncoderDecoderModel_NoOffset(EncoderDecoderModel):
    def embed(self, table, tokens, *, offset=0):
        return super().embed(table, tokens, offset=0)


@mutant(name="EncoderDecoderModel_cache_not_used", bug="decode ignores the cache: each chunk restarts at position 0, alone",
        provides="EncoderDecoderModel", caught_by=["test_encoder_decoder_cached_decoding_equals_teacher_forcing"])
class EncoderDecoderModel_CacheIgnored(EncoderDecoderModel):
    def decode(self, tgt, memory, *, src_mask=None, tgt_mask=None, cache=None):
        return super().decode(tgt, memory, src_mask=src_mask, tgt_mask=tgt_mask, cache=None)


@mutant(name="EncoderDecoderModel_embeddings_not_scaled", bug="embeddings are not multiplied by sqrt(d_model)",
        provides="EncoderDecoderModel", caught_by=["test_encoder_decoder_model_agrees_with_reference"])
class EncoderDecoderModel_NotScaled(EncoderDecoderModel):
    def embed(self, table, tokens, *, offset=0):
        return self.dropout(self.positions(table(tokens), offset=offset))


@mutant(name="EncoderDecoderModel_final_norms_not_applied", bug="pre-norm builds encoder_norm/decoder_norm but never applies them",
        provides="EncoderDecoderModel",
        caught_by=["test_every_encoder_decoder_parameter_gets_a_finite_gradient",
                   "test_encoder_decoder_model_agrees_with_reference"])
class EncoderDecoderModel_FinalNormsUnused(EncoderDecoderModel):
    def encode(self, src, *, src_mask=None):
        x = self.embed(self.src_embed, src)
        for layer in self.encoder:
            x = layer(x, mask=key_mask(src_mask))
        return x  # self.encoder_norm forgotten

    def decode(self, tgt, memory, *, src_mask=None, tgt_mask=None, cache=None):
        y = self.embed(self.tgt_embed, tgt, offset=0 if cache is None else cache[0].length)
        for i, layer in enumerate(self.decoder):
            y = layer(y, memory, mask=key_mask(tgt_mask), memory_mask=key_mask(src_mask),
                      cache=None if cache is None else cache[i])
        return self.head(y)  # self.decoder_norm forgotten


@mutant(name="EncoderDecoderModel_generate_reads_first_position",
        bug="generation without the cache takes the argmax of the first position's logits, not the last's",
        provides="EncoderDecoderModel", params={"use_cache": False},
        caught_by=["test_encoder_decoder_greedy_generation_is_the_argmax_of_teacher_forcing",
                   "test_encoder_decoder_greedy_generation_with_cache_equals_without"])
class EncoderDecoderModel_FirstPosition(EncoderDecoderModel):
    @torch.no_grad()
    def generate(self, src, *, bos_id, max_new_tokens, src_mask=None, use_cache=True):
        if use_cache:
            return super().generate(src, bos_id=bos_id, max_new_tokens=max_new_tokens, src_mask=src_mask)
        memory = self.encode(src, src_mask=src_mask)
        out = torch.full((src.shape[0], 1), bos_id, dtype=torch.long, device=src.device)
        for _ in range(max_new_tokens):
            logits = self.decode(out, memory, src_mask=src_mask)
            out = torch.cat([out, logits[:, 0].argmax(dim=-1, keepdim=True)], dim=1)
        return out


# The copy learnability test (properties/test_learnability.py) needs a DecoderOnlyLM mutant: the classic
# teacher-forcing bug, attention that sees the next token while training, which trains to a low loss and then
# cannot generate.
@mutant(name="DecoderOnlyLM_sees_the_future_in_training", bug="self-attention is not causal (teacher forcing cheats)",
        provides="DecoderOnlyLM", caught_by=["test_decoder_only_lm_learns_to_copy"])
class DecoderOnlyLM_NotCausal(DecoderOnlyLM):
    def forward(self, *args, **kwargs):
        with attention_never_causal():
            return super().forward(*args, **kwargs)
