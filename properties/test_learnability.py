"""Learnability: tiny models of the implementation under test learn simple synthetic tasks.

These are plain pytest tests, not Hypothesis properties: each trains one tiny model (d_model 16-32, 1-2
layers) with Adam for a fixed number of steps on data generated here under a fixed seed, on the CPU, then
checks held-out performance against a threshold with a wide margin. A correct implementation clears every
threshold by far; a model that is broken in a way the other properties might miss in isolation (attention
that sees the future during training, positions missing, a squashed output) does not. Marked ``slow``:
``pytest -m "not slow"`` skips them.

Weights start from the canonical parameters (spec/registry.Param) drawn from the seed, so every
implementation starts from the same point; the data, the mini-batches and dropout come from fixed seeds.
The losses are torch's (cross-entropy, MSE): these tests judge the models, the losses have their own.

Each model is trained in the configuration its implementation offers (properties/options.py): options it
has built in are never passed (a GPT-2-style model learns with its learned positions, LayerNorm and GELU),
the others take the spec's defaults, and generation uses the cache only where the model has one.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from properties.assertions import assert_equal, assert_true
from properties.plugin import CheckedModule, Implementation
from properties.training import SEED, data_generator, train

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------------------------------------
# Tasks: data and tiny models


COPY_K, COPY_SYMBOLS = 4, 6  # copy 4 symbols out of 6; the separator is token 6


def copy_data(n: int, salt: int) -> Tensor:
    """(n, 2k + 1): x_0 .. x_{k-1}, SEP, x_0 .. x_{k-1}."""
    x = torch.randint(0, COPY_SYMBOLS, (n, COPY_K), generator=data_generator(salt))
    return torch.cat([x, torch.full((n, 1), COPY_SYMBOLS), x], dim=1)


def build_lm(impl: Implementation, **extra) -> CheckedModule:
    return impl.build("DecoderOnlyLM", seed=SEED, dtype=torch.float32, vocab_size=COPY_SYMBOLS + 1, d_model=32,
                      n_head=2, n_layer=1, d_ff=64, max_len=2 * COPY_K + 1, **extra)


ORDER_LEN, ORDER_VOCAB = 6, 8


def order_data(n: int, salt: int) -> tuple[Tensor, Tensor]:
    """Sequences of 6 tokens whose first and last differ; label 1 when the first is larger than the last."""
    gen = data_generator(salt)
    tokens = torch.randint(0, ORDER_VOCAB, (n, ORDER_LEN), generator=gen)
    shift = torch.randint(1, ORDER_VOCAB, (n,), generator=gen)
    tokens[:, -1] = (tokens[:, 0] + shift) % ORDER_VOCAB
    return tokens, (tokens[:, 0] > tokens[:, -1]).long()


MEAN_MAX_LEN, MEAN_VOCAB = 8, 10


def mean_data(n: int, salt: int, *, padded: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded sequences of 1 .. 8 tokens (``padded=False``: all of 8 tokens, for a model without a
    padding mask); the target is the mean real token / (vocab - 1), in [0, 1]."""
    gen = data_generator(salt)
    tokens = torch.randint(0, MEAN_VOCAB, (n, MEAN_MAX_LEN), generator=gen)
    lengths = torch.randint(1, MEAN_MAX_LEN + 1, (n, 1), generator=gen)
    if not padded:
        lengths = torch.full_like(lengths, MEAN_MAX_LEN)
    mask = torch.arange(MEAN_MAX_LEN)[None, :] < lengths
    target = (tokens * mask).sum(1, keepdim=True) / lengths / (MEAN_VOCAB - 1)
    return tokens, mask, target.float()


def build_encoder(impl: Implementation, *, n_outputs: int, max_len: int, vocab: int, **extra) -> CheckedModule:
    return impl.build("EncoderOnlyModel", seed=SEED, dtype=torch.float32, vocab_size=vocab, d_model=32, n_head=2,
                      n_layer=1, d_ff=64, max_len=max_len, n_outputs=n_outputs, **extra)


REVERSE_K, REVERSE_SYMBOLS = 4, 6  # reverse 4 symbols out of 6; target BOS is token 6


def reverse_data(n: int, salt: int) -> tuple[Tensor, Tensor]:
    """src (n, k) and tgt (n, 1 + k) = BOS, then src reversed."""
    src = torch.randint(0, REVERSE_SYMBOLS, (n, REVERSE_K), generator=data_generator(salt))
    return src, torch.cat([torch.full((n, 1), REVERSE_SYMBOLS), src.flip(1)], dim=1)


def build_seq2seq(impl: Implementation, **extra) -> CheckedModule:
    """A small EncoderDecoderModel with the canonical parameters (the paper's embedding initialisation)."""
    config = dict(src_vocab_size=REVERSE_SYMBOLS, tgt_vocab_size=REVERSE_SYMBOLS + 1, d_model=32, n_head=2,
                  n_layer=1, d_ff=64, max_len=REVERSE_K + 1, **extra)
    return impl.build("EncoderDecoderModel", seed=SEED, dtype=torch.float32, **config)


# --------------------------------------------------------------------------------------------------------
# The tests


@pytest.mark.requires("DecoderOnlyLM")
def test_decoder_only_lm_learns_to_copy(impl):
    """A 1-layer DecoderOnlyLM (d_model 32) trained 150 Adam steps on "x_0..x_3 SEP x_0..x_3" copies held-out
    sequences: greedy generation after SEP gets at least 90% of the tokens right (chance: 17%).

    Hint: a model that trains well but generates badly sees the future during training (teacher forcing
    with a non-causal mask lets position p read token p + 1).
    """
    train_set, held_out = copy_data(2000, salt=1), copy_data(200, salt=2)
    model = build_lm(impl)

    def loss_of_batch(index):
        tokens = train_set[index]
        logits = model(tokens)  # (b, 2k + 1, n)
        return F.cross_entropy(logits[:, COPY_K:-1].reshape(-1, logits.shape[-1]), tokens[:, COPY_K + 1 :].reshape(-1))

    losses = train(model, loss_of_batch, steps=150, lr=3e-3, batch=64, n_train=len(train_set))
    out = model.method("generate", held_out[:, : COPY_K + 1], max_new_tokens=COPY_K)
    accuracy = (out[:, COPY_K + 1 :] == held_out[:, COPY_K + 1 :]).float().mean().item()
    assert_true(accuracy >= 0.9, claim="a tiny DecoderOnlyLM learns to copy 4 tokens after a separator",
                detail=f"held-out greedy copy accuracy {accuracy:.3f} < 0.9 (train loss {losses[0]:.3f} -> {losses[-1]:.3f})",
                hint="causal self-attention during training; positions at their true offsets while generating.")


@pytest.mark.requires("EncoderOnlyModel")
def test_encoder_only_classifier_learns_token_order(impl):
    """A 1-layer EncoderOnlyModel classifier (d_model 32) trained 250 Adam steps learns whether the first token
    of 6 is larger than the last: held-out accuracy at least 85% (without positions: about chance).

    Hint: this needs to know which token is first and which is last: add the learned positions.
    """
    (train_x, train_y), (test_x, test_y) = order_data(2000, salt=3), order_data(400, salt=4)
    model = build_encoder(impl, n_outputs=2, max_len=ORDER_LEN, vocab=ORDER_VOCAB)
    losses = train(model, lambda i: F.cross_entropy(model(train_x[i]), train_y[i]),
                   steps=250, lr=3e-3, batch=64, n_train=len(train_x))
    with torch.no_grad():
        accuracy = (model(test_x).argmax(-1) == test_y).float().mean().item()
    assert_true(accuracy >= 0.85, claim="a tiny EncoderOnlyModel classifier learns whether the first token exceeds the last",
                detail=f"held-out accuracy {accuracy:.3f} < 0.85 (train loss {losses[0]:.3f} -> {losses[-1]:.3f})",
                hint="learned positions added to the embeddings; outputs are logits (no softmax in the model).")


@pytest.mark.requires("EncoderOnlyModel")
def test_encoder_only_regressor_learns_the_mean_token_value(impl):
    """A 1-layer EncoderOnlyModel regressor (n_outputs=1) trained 250 Adam steps on right-padded sequences of
    1 .. 8 tokens predicts the normalised mean real token with held-out MSE below 0.004, about a tenth of
    the targets' variance (about 0.035). A model without a padding mask learns from unpadded sequences of 8
    tokens instead, to a tenth of their variance.

    Hint: the output is the head's raw value (no softmax or sigmoid), pooled over the real tokens only.
    """
    padded = impl.offers("EncoderOnlyModel").offers("mask")
    (train_x, train_m, train_y), (test_x, test_m, test_y) = (mean_data(2000, salt=5, padded=padded),
                                                             mean_data(400, salt=6, padded=padded))
    model = build_encoder(impl, n_outputs=1, max_len=MEAN_MAX_LEN, vocab=MEAN_VOCAB)

    def predict(x, m):
        return model(x, mask=m) if padded else model(x)

    losses = train(model, lambda i: F.mse_loss(predict(train_x[i], train_m[i]), train_y[i]),
                   steps=250, lr=3e-3, batch=64, n_train=len(train_x))
    with torch.no_grad():
        mse = F.mse_loss(predict(test_x, test_m), test_y).item()
    # About a tenth of the targets' variance: 0.004 for the padded data (variance ~0.035), and a tenth of
    # the smaller variance of 8-token means (~0.013) for a model without a padding mask.
    bound = 0.004 if padded else 0.1 * test_y.var().item()
    assert_true(mse < bound, claim="a tiny EncoderOnlyModel regressor learns the normalised mean token value",
                detail=f"held-out MSE {mse:.4g} >= {bound:.3g}; target variance {test_y.var().item():.4g} "
                f"(train loss {losses[0]:.4g} -> {losses[-1]:.4g}, padded: {padded})",
                hint="regression outputs are raw values; the mean pools real positions only.")


@pytest.mark.requires("EncoderDecoderModel")
def test_encoder_decoder_learns_to_reverse(impl):
    """A 1-layer EncoderDecoderModel (d_model 32) trained 200 Adam steps with teacher forcing reverses held-out
    sequences of 4 symbols: greedy generation gets at least 90% of the tokens right (chance: 17%).

    Hint: a model that trains well but generates badly sees the future during training: the decoder's
    self-attention must be causal.
    """
    (train_src, train_tgt), (test_src, test_tgt) = reverse_data(2000, salt=7), reverse_data(200, salt=8)
    model = build_seq2seq(impl)

    def loss_of_batch(index):
        logits = model(train_src[index], train_tgt[index, :-1])  # predict tgt[1:] from tgt[:-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), train_tgt[index, 1:].reshape(-1))

    losses = train(model, loss_of_batch, steps=200, lr=3e-3, batch=64, n_train=len(train_src))
    out = model.method("generate", test_src, bos_id=REVERSE_SYMBOLS, max_new_tokens=REVERSE_K)
    accuracy = (out[:, 1:] == test_tgt[:, 1:]).float().mean().item()
    assert_true(accuracy >= 0.9, claim="a tiny EncoderDecoderModel learns to reverse 4 tokens",
                detail=f"held-out greedy accuracy {accuracy:.3f} < 0.9 (train loss {losses[0]:.3f} -> {losses[-1]:.3f})",
                hint="causal decoder self-attention, cross-attention to the memory, positions offset while generating.")


def training_dropout(impl: Implementation, component: str) -> float:
    """Dropout 0.1 where offered; else another positive probability the model offers; else its own (a model
    without dropout still trains deterministically, which is the claim)."""
    offers = impl.offers(component)
    if offers.offers("dropout", 0.1):
        return 0.1
    return (offers.where("dropout", lambda p: p > 0) or (offers.default("dropout"),))[0]


def _short_training(impl: Implementation, component: str) -> list[float]:
    """20 Adam steps of a tiny model with dropout (0.1 where offered), in train mode; the losses."""
    p = training_dropout(impl, component)
    if component == "DecoderOnlyLM":
        data = copy_data(256, salt=9)
        model = build_lm(impl, dropout=p)
        loss = lambda i: F.cross_entropy(model(data[i]).flatten(0, 1), data[i].roll(-1, 1).flatten())
    elif component == "EncoderOnlyModel":
        x, y = order_data(256, salt=9)
        model = build_encoder(impl, n_outputs=2, max_len=ORDER_LEN, vocab=ORDER_VOCAB, dropout=p)
        loss = lambda i: F.cross_entropy(model(x[i]), y[i])
    else:
        src, tgt = reverse_data(256, salt=9)
        model = build_seq2seq(impl, dropout=p)
        loss = lambda i: F.cross_entropy(model(src[i], tgt[i, :-1]).flatten(0, 1), tgt[i, 1:].flatten())
    return train(model, loss, steps=20, lr=3e-3, batch=32, n_train=256)


@pytest.mark.parametrize("component", [pytest.param(c, marks=pytest.mark.requires(c))
                                       for c in ("EncoderOnlyModel", "EncoderDecoderModel", "DecoderOnlyLM")])
def test_training_under_a_seed_is_deterministic(impl, component):
    """Training a tiny model twice with dropout 0.1 (where offered) under the same seeds (torch.manual_seed, the
    data's and the mini-batches' generators) gives bit-identical losses at every step.

    Hint: every random draw (dropout masks included) must come from torch's seeded generators, never from
    Python's random, numpy's global state or the clock.
    """
    first, second = _short_training(impl, component), _short_training(impl, component)
    assert_equal(torch.tensor(second), torch.tensor(first), axes="step",
                 claim=f"training a tiny {component} twice under the same seed gives the same losses",
                 hint="draw dropout masks with torch (nn.Dropout, torch.rand), which torch.manual_seed seeds.")
