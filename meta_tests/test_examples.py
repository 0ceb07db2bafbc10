"""The examples prove the option space: five correct files written unlike ours declare what they lack and
pass the properties in their own configuration, and the buggy attention file keeps failing with the
messages that name its bugs.

* examples/gpt_block.py: GPT-2 (causal-only fused-QKV attention without a mask, learned positions,
  LayerNorm with a fixed eps, exact GELU, pre-norm, tied head, no cache);
* examples/llama_block.py: LLaMA (no biases, contiguous GQA, half-split RoPE and RMSNorm computed in
  float32 and declared so, SwiGLU, untied head, no cache);
* examples/post_norm_seq2seq.py: the original encoder-decoder (post-norm, ReLU, sinusoidal positions with
  sqrt(d)-scaled embeddings, -1e9 masking declared as empty_rows=False, no cache);
* examples/dpo_trainer_style.py: DPO as a TRL-style trainer writes it (-100 labels, shift, log_softmax and
  gather; TRL's dpo_loss with label_smoothing, the reference detached inside, detached rewards; the sum
  only, declared as average_log_prob=False);
* examples/vit_pytorch_style.py: ViT as vit-pytorch writes it (Rearrange to (p1 p2 c) patches then a Linear,
  mapped to the conv layout by a permuted view; class token, learned positions, pre-norm sublayers with
  their norms inside, fused to_qkv; pool="cls" only, since its mean pooling counts the class token;
  nn.LayerNorm's eps 1e-5 declared).

Each example is loaded the way ``--impl`` loads it (properties.plugin.load_implementation validates every
declaration), and a few representative properties run on it directly, as the mutant tests do: agreement
with the reference, causality, padding, a structural property or two, and the LLaMA example's learnability
(the cheapest training run; the other examples' learnability costs seconds of CI and is checked by their
full runs). The full runs (``pytest -n 2 --impl examples/<file>.py``, figures in the README) check
everything else; this module keeps CI to seconds.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import Phase, settings

from meta_tests.catalog import all_properties
from properties.options import unmet_need
from properties.plugin import Implementation, load_implementation

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PROPERTIES = all_properties()
_LOADED: dict[str, Implementation] = {}
EXAMPLES_PER_PROPERTY = 6  # derandomized: enough to meet each configuration the example offers, and cheap


def example(stem: str) -> Implementation:
    """examples/<stem>.py, loaded (and its declarations validated) once per process."""
    if stem not in _LOADED:
        _LOADED[stem] = load_implementation(str(EXAMPLES / f"{stem}.py"))
    return _LOADED[stem]


@contextlib.contextmanager
def few_examples(fn, *, shrink: bool = False):
    """A few derandomized examples without the example database (and without shrinking unless asked: a
    correct example needs no shrinking, and the buggy file's messages are read after it)."""
    original = getattr(fn, "_hypothesis_internal_use_settings", None)
    if original is None:  # a plain test (learnability)
        yield
        return
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if shrink else [])
    fn._hypothesis_internal_use_settings = settings(original, max_examples=EXAMPLES_PER_PROPERTY, derandomize=True,
                                                    database=None, phases=phases, report_multiple_bugs=False)
    try:
        yield
    finally:
        fn._hypothesis_internal_use_settings = original


def marks_of(name: str, params: dict[str, Any]) -> list:
    """The marks a collected item of property ``name`` carries: the function's, its module's
    (``pytestmark``), and those of the parametrize values given in ``params``."""
    fn = PROPERTIES[name]
    module_marks = getattr(sys.modules[fn.__module__], "pytestmark", [])
    module_marks = module_marks if isinstance(module_marks, list) else [module_marks]
    marks = list(getattr(fn, "pytestmark", [])) + module_marks
    for mark in list(marks):
        if mark.name != "parametrize":
            continue
        names = [n.strip() for n in mark.args[0].split(",")] if isinstance(mark.args[0], str) else list(mark.args[0])
        for value in mark.args[1]:
            if hasattr(value, "marks") and len(names) == 1 and value.values[0] == params.get(names[0], object()):
                marks += list(value.marks)
    return marks


def skip_reason(name: str, impl: Implementation, **params: Any) -> str | None:
    """The reason the suite's plug-in would skip property ``name`` for ``impl`` at collection, or None:
    as properties/pytest_plugin.py does, the components are the ``component`` parameter and the
    ``requires`` marks, and each ``needs`` mark is checked against their offers."""
    marks = marks_of(name, params)
    components = [params["component"]] if "component" in params else []
    components += [c for m in marks if m.name == "requires" for c in m.args]
    missing = [c for c in components if not impl.provides(c)]
    if missing:
        return "; ".join(impl.missing_reason(c) for c in missing)
    for mark in (m for m in marks if m.name == "needs"):
        for component in ([a for a in mark.args if a in components] if mark.args else components):
            reason = unmet_need(impl.offers(component), mark.kwargs)
            if reason:
                return reason
    return None


def run(name: str, impl: Implementation, *, shrink: bool = False, **params: Any) -> None:
    """Run property ``name`` on ``impl`` on the CPU (float64 where it takes a dtype), with ``params`` for its
    parametrized arguments; fail if the suite's plug-in would have skipped it."""
    reason = skip_reason(name, impl, **params)
    assert reason is None, f"{name} would be skipped for {impl}: {reason}"
    fn = PROPERTIES[name]
    wanted = inspect.signature(fn).parameters
    args = {"impl": impl, "device": "cpu", "dtype": torch.float64, **params}
    with few_examples(fn, shrink=shrink):
        fn(**{k: v for k, v in args.items() if k in wanted})


# ---------------------------------------------------------------------------------------------------
# The correct examples: (property, its parametrize values) that must hold.

HOLDS = {
    "gpt_block": [
        ("test_decoder_only_lm_agrees_with_reference", {"positions": "learned", "tie": True}),
        ("test_decoder_only_lm_is_causal_end_to_end", {}),
        ("test_causal_attention_never_leaks_the_future", {"component": "MultiHeadAttention"}),
        ("test_pre_norm_layer_with_zero_output_projections_is_identity", {"component": "DecoderLayer"}),
    ],
    "llama_block": [
        ("test_decoder_only_lm_agrees_with_reference", {"positions": "rope", "tie": False}),
        ("test_decoder_only_lm_is_causal_end_to_end", {}),
        ("test_right_padded_batch_matches_each_sequence_alone", {}),
        ("test_gqa_equals_mha_with_repeated_kv_heads", {}),
        ("test_decoder_only_lm_learns_to_copy", {}),
    ],
    "post_norm_seq2seq": [
        ("test_encoder_decoder_model_agrees_with_reference", {}),
        ("test_encoder_decoder_is_causal_end_to_end", {}),
        ("test_encoder_decoder_ignores_padded_source_positions", {}),
        ("test_attention_masked_keys_have_no_influence", {"component": "CrossAttention"}),
    ],
    "dpo_trainer_style": [
        ("test_sequence_logprobs_agrees_with_reference", {}),
        ("test_dpo_loss_agrees_with_reference", {}),
        ("test_dpo_loss_sends_no_gradient_to_the_reference", {}),
    ],
    "vit_pytorch_style": [
        ("test_patch_embedding_equals_a_strided_convolution_and_unfold_then_linear", {}),
        ("test_vision_transformer_agrees_with_reference", {}),
        ("test_vision_transformer_class_token_output_depends_on_every_patch", {}),
    ],
}


def _id(stem: str, prop: str, params: dict[str, Any]) -> str:
    return f"{stem}:{prop}" + "".join(f"[{k}={v}]" for k, v in params.items())


RUNS = [(stem, prop, params) for stem, runs in HOLDS.items() for prop, params in runs]


@pytest.mark.parametrize("stem, prop, params", RUNS, ids=[_id(*r) for r in RUNS])
def test_correct_example_passes_the_property(stem, prop, params):
    """Each correct example, in the configuration it declares, passes agreement, causality, padding or a
    structural property (and the LLaMA example learnability) (a regression here is a false alarm of the
    suite or a broken example)."""
    run(prop, example(stem), **params)


# What each correct example lacks, and the skip reason a property that needs it gets.
LACKS = [
    ("gpt_block", "test_right_padded_batch_matches_each_sequence_alone", {},
     "needs mask=True; GPT (as DecoderOnlyLM) offers mask=False only"),
    ("gpt_block", "test_decoder_only_lm_agrees_with_reference", {"positions": "learned", "tie": False},
     "needs tie_weights=False; GPT (as DecoderOnlyLM) offers tie_weights=True only"),
    ("gpt_block", "test_attention_masked_keys_have_no_influence", {"component": "MultiHeadAttention"},
     "needs mask=True; CausalSelfAttention (as MultiHeadAttention) offers mask=False only"),
    ("llama_block", "test_decoder_only_lm_cached_logits_equal_the_full_pass", {},
     "needs cache=True; Transformer (as DecoderOnlyLM) offers cache=False only"),
    ("llama_block", "test_rope_pairings_are_one_map_up_to_deinterleaving", {},
     "needs pairing='adjacent'; RotaryEmbedding offers pairing='half' only"),
    ("post_norm_seq2seq", "test_attention_fully_masked_query_row_gives_finite_output",
     {"component": "MultiHeadAttention"},
     "needs empty_rows=True; MultiHeadedAttention (as MultiHeadAttention) offers empty_rows=False only"),
    ("post_norm_seq2seq", "test_pre_norm_layer_with_zero_output_projections_is_identity",
     {"component": "EncoderLayer"}, "needs norm_first=True; EncoderLayer offers norm_first=False only"),
    # No property needs average_log_prob=True (the agreement property just draws the sum only): what the
    # trainer file lacks that skips a property is a model of its own.
    ("dpo_trainer_style", "test_decoder_only_lm_agrees_with_reference", {"positions": "learned", "tie": False},
     f"DecoderOnlyLM is not provided by {EXAMPLES / 'dpo_trainer_style.py'}"),
    ("vit_pytorch_style", "test_vision_transformer_without_positions_is_invariant_to_permuting_patches", {},
     "needs positions='none'; ViT (as VisionTransformer) offers positions='learned' only"),
]


@pytest.mark.parametrize("stem, prop, params, reason", LACKS, ids=[_id(*case[:3]) for case in LACKS])
def test_correct_example_is_skipped_where_it_lacks_an_option(stem, prop, params, reason):
    """A property that needs what the example does not offer is skipped, naming the option and the class."""
    assert skip_reason(prop, example(stem), **params) == reason


def test_declarations_describe_the_configurations():
    """The declarations are read as intended: a few offers of each example, and declared float32 compute."""
    gpt, llama, seq2seq = example("gpt_block"), example("llama_block"), example("post_norm_seq2seq")
    assert gpt.offers("DecoderOnlyLM").offered("positions") == ("learned",)
    assert gpt.offers("MultiHeadAttention").offered("causal") == (True,)
    assert gpt.offers("LayerNorm").offered("eps") == (1e-5,)
    assert gpt.offers("DecoderLayer").offered("bias") == (True, False)  # nanoGPT's bias switch
    assert llama.offers("DecoderOnlyLM").default("eps") == 1e-6
    assert llama.offers("GroupedQueryAttention").offered("bias") == (False,)
    for name in ("RMSNorm", "RotaryEmbedding", "DecoderLayer", "DecoderOnlyLM"):
        assert llama.offers(name).compute_dtype == torch.float32, name
    assert llama.offers("GroupedQueryAttention").compute_dtype is None  # exact in float64 without RoPE
    assert not llama.provides("FeedForward")  # its FeedForward class is the spec's SwiGLU
    assert seq2seq.offers("EncoderDecoderModel").default("eps") == 1e-6
    assert seq2seq.offers("CrossAttention").offered("empty_rows") == (False,)
    dpo, vit = example("dpo_trainer_style"), example("vit_pytorch_style")
    assert dpo.offers("sequence_logprobs").offered("average_log_prob") == (False,)  # the sum only
    assert dpo.offers("dpo_loss").offered("label_smoothing") == (0.0, 0.1, 0.3)  # conservative DPO, undeclared
    assert vit.offers("VisionTransformer").offered("pool") == ("cls",)  # its mean pooling counts the class token
    assert vit.offers("VisionTransformer").default("eps") == 1e-5
    assert not vit.provides("FeedForward")  # vit-pytorch's FeedForward normalises its input


# ---------------------------------------------------------------------------------------------------
# The buggy example: each bug fails its property with the sentence that names it.

BUGS = [
    ("mask polarity inverted", "test_attention_masked_keys_have_no_influence", {"component": "MultiHeadAttention"},
     "check its polarity: True = may attend"),
    ("triu(diagonal=0) causal mask hides the diagonal", "test_causal_attention_never_leaks_the_future",
     {"component": "MultiHeadAttention"}, "the causal mask must keep keys j <= i for query i"),
    ("round-robin GQA grouping, undeclared", "test_gqa_equals_mha_with_repeated_kv_heads", {},
     "the output matches round_robin grouping instead: query head i reads KV head i % 2"),
]


@pytest.mark.parametrize("bug, prop, params, message", BUGS, ids=[b[0] for b in BUGS])
def test_buggy_attention_fails_with_the_message_naming_its_bug(bug, prop, params, message):
    """examples/buggy_attention.py, run as a learner runs it, fails the property with the sentence the
    README shows for the bug, not an unrelated one."""
    with pytest.raises(AssertionError) as caught:
        run(prop, example("buggy_attention"), shrink=True, **params)
    said = " ".join(str(caught.value).split())
    if message not in said:
        pytest.fail(f"{bug}: expected the failure to say {message!r}; it says instead:\n{caught.value}", pytrace=False)
