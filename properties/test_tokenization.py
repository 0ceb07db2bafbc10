"""Properties of byte-level BPE: train_bpe and Tokenizer. Spec: spec/tokenization.py.

Tokenizer properties run on merges the spec's reference trainer learns (cached: the same corpus is
trained once), so a learner may plug in a Tokenizer alone. tiktoken and HF tokenizers are independent
encoders, built offline from the same ranks / merges and the same pattern.
"""

from __future__ import annotations

import functools
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from properties.assertions import assert_true, fail
from properties.options import draws_options
from properties.plugin import ComponentFailure, where_raised
from properties.probes import expect_value_error
from spec.tokenization import (
    GPT2_PATTERN,
    bytes_to_unicode,
    pieces,
    pretoken_boundaries,
    reference_decode,
    reference_encode,
    reference_train_bpe,
)

# Words that make merges happen on a few hundred characters: repeats ("aaa", overlapping pairs),
# contractions, leading spaces, digits, multi-byte characters, whitespace runs, Windows line ends.
WORDS = ["low", "lower", "newest", "widest", "aaa", "aaaa", "ab", " the", " a", "don't", "we'll", "it's", "'s",
         "über", "日本", "😀", " 12", "3,", "!!", "\n", "  ", " \n", "\r\n", "\t"]
SEPARATORS = ["", " ", "  ", "\n"]
# Special tokens, none a prefix of another (tiktoken matches specials in no particular order).
SPECIALS = ["<|endoftext|>", "<|pad|>", "<s>"]
MAX_MERGES = 40


# ---------------------------------------------------------------------------------------------------
# Calling the implementation: an exception or a wrong type is the component's failure, in one sentence


def _call(who: str, what: str, fn, *args, hint: str = "", **kwargs):
    __tracebackhide__ = True
    try:
        return fn(*args, **kwargs)
    except ComponentFailure:
        raise
    except Exception as exc:
        raised = f"{type(exc).__name__}: {exc}{where_raised(exc, fn)}"
        raise ComponentFailure(f"{who}: {what} raised {raised}{hint}") from None


def _ids(who: str, what: str, out) -> list[int]:
    __tracebackhide__ = True
    try:
        ids = list(out)
    except TypeError:
        raise ComponentFailure(f"{who}: {what} returned a {type(out).__name__}, not a list of ints") from None
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        bad = next(i for i in ids if not isinstance(i, int) or isinstance(i, bool))
        raise ComponentFailure(f"{who}: {what} returned a {type(bad).__name__} among its ids; ids are Python ints")
    return ids


class Checked:
    """The implementation's Tokenizer, called through the plain-sentence wrapper."""

    def __init__(self, impl, case: TokenizerCase):
        self.who = f"{impl}: {impl.owner('Tokenizer')}"
        kwargs = {"special_tokens": list(case.specials)} if impl.offers("Tokenizer").offers("special_tokens") else {}
        call = f"Tokenizer(vocab, merges{', special_tokens=' + repr(case.specials) if kwargs else ''})"
        self.tok = _call(self.who, call, impl.raw("Tokenizer"), dict(case.vocab), list(case.merges), **kwargs)

    def encode(self, text: str) -> list[int]:
        __tracebackhide__ = True
        return _ids(self.who, f"encode({text!r})", _call(self.who, f"encode({text!r})", self.tok.encode, text))

    def decode(self, ids: list[int]) -> str:
        __tracebackhide__ = True
        out = _call(self.who, f"decode({ids})", self.tok.decode, ids)
        if not isinstance(out, str):
            raise ComponentFailure(f"{self.who}: decode returned a {type(out).__name__}, not a str")
        return out

    def stream(self, chunks):
        """The raw iterator encode_iterable returns (for the laziness check)."""
        __tracebackhide__ = True
        method = getattr(self.tok, "encode_iterable", None)
        if not callable(method):
            raise ComponentFailure(f"{self.who}: has no method encode_iterable; if it has none, declare "
                                   "spec_options = {'encode_iterable': False} on the class")
        return _call(self.who, "encode_iterable(chunks)", method, chunks)

    def encode_iterable(self, chunks) -> list[int]:
        __tracebackhide__ = True
        what = "encode_iterable(chunks)"
        return _ids(self.who, what, _call(self.who, f"iterating {what}", list, self.stream(chunks)))


def trained(impl, source, *, vocab_size: int, specials: tuple[str, ...]):
    """The implementation's train_bpe, its result checked for type."""
    __tracebackhide__ = True
    fn = impl.raw("train_bpe")
    who = f"{impl}: {impl.owner('train_bpe')}"
    kwargs = {"special_tokens": list(specials)} if impl.offers("train_bpe").offers("special_tokens") else {}
    call = f"train_bpe(..., vocab_size={vocab_size}{', special_tokens=' + repr(list(specials)) if kwargs else ''})"
    given = "a list of Paths" if isinstance(source, list) and source and isinstance(source[0], Path) else \
        "a Path" if isinstance(source, Path) else "a list of documents" if isinstance(source, list) else ""
    option = "files" if "Path" in given else "documents"
    hint = (f" (it was given {given}; if it takes only one str, declare spec_options = {{{option!r}: False}})"
            if given else "")
    out = _call(who, call, fn, source, vocab_size=vocab_size, hint=hint, **kwargs)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], dict) and isinstance(out[1], list)):
        raise ComponentFailure(f"{who}: {call} returned a {type(out).__name__}; the spec's train_bpe returns "
                               "(vocab: dict[int, bytes], merges: list[tuple[bytes, bytes]])")
    vocab, merges = out
    if not all(isinstance(k, int) and isinstance(v, bytes) for k, v in vocab.items()):
        raise ComponentFailure(f"{who}: {call}: vocab must map int ids to bytes")
    merges = [tuple(m) for m in merges]
    if not all(len(m) == 2 and all(isinstance(t, bytes) for t in m) for m in merges):
        raise ComponentFailure(f"{who}: {call}: merges must be (bytes, bytes) pairs")
    return vocab, merges


# ---------------------------------------------------------------------------------------------------
# Strategies


@functools.lru_cache(maxsize=512)
def reference_training(documents: tuple[str, ...], vocab_size: int, specials: tuple[str, ...]):
    return reference_train_bpe(list(documents), vocab_size, specials)


# Strategies are built once per set of specials and reused: building them anew for every example
# costs Hypothesis more than the tokenizers do.
# One character repeated ("aaaaa", "日日日"): overlapping pairs, and words where a later pair outranks an
# earlier one, which is where merging by rank and merging leftmost first part ways.
RUNS = st.builds(lambda c, k: c * k, st.sampled_from(["a", "日", "!", " "]), st.integers(2, 7))
SOME_SPECIALS = st.lists(st.sampled_from(SPECIALS), min_size=1, max_size=3, unique=True).map(tuple)


@functools.lru_cache(maxsize=None)
def documents(*, specials: tuple[str, ...] = (), max_docs: int = 3,
              max_words: int = 30) -> st.SearchStrategy[list[str]]:
    """A few short documents of WORDS and RUNS (special tokens among them where given), a few hundred chars."""
    parts = st.one_of(st.sampled_from(WORDS + list(specials)), RUNS)
    doc = st.lists(st.tuples(parts, st.sampled_from(SEPARATORS)), min_size=1, max_size=max_words).map(
        lambda ws: "".join(w + s for w, s in ws))
    return st.lists(doc, min_size=1, max_size=max_docs)


def special_tokens(offers, *, required: bool = False) -> st.SearchStrategy[tuple[str, ...]]:
    """Special tokens where offered (a subset of SPECIALS, in a drawn order), else none; ``required``:
    at least one (for a property that needs special_tokens=True)."""
    if not offers.offers("special_tokens"):
        return st.just(())
    return SOME_SPECIALS if required else st.one_of(st.just(()), SOME_SPECIALS)


@dataclass(frozen=True)
class Training:
    documents: tuple[str, ...]
    vocab_size: int
    specials: tuple[str, ...]
    as_list: bool  # given as a list of documents (else one str)

    @property
    def source(self):
        return list(self.documents) if self.as_list else self.documents[0]

    def __repr__(self) -> str:
        return (f"Training(vocab_size={self.vocab_size}, specials={list(self.specials)}, "
                f"{'documents' if self.as_list else 'text'}={self.source!r})")

    def _repr_pretty_(self, printer, cycle) -> None:  # Hypothesis' report: this line, not every field
        printer.text(repr(self))


@draws_options("train_bpe", special_tokens=lambda t: bool(t.specials), documents=lambda t: t.as_list)
@st.composite
def trainings(draw, offers, *, as_list: bool | None = None) -> Training:
    """A training run: documents (a list where offered, else one str; ``as_list`` forces one), specials
    where offered, and a vocab_size of 256 + specials + up to MAX_MERGES merges."""
    specials = draw(special_tokens(offers), label="special_tokens")
    as_list = draw(offers.strategy("documents"), label="as_list") if as_list is None else as_list
    docs = draw(documents(specials=specials, max_docs=3 if as_list else 1), label="documents")
    merges = draw(st.integers(0, MAX_MERGES), label="merges")
    return Training(tuple(docs), 256 + len(specials) + merges, specials, as_list)


@dataclass(frozen=True)
class TokenizerCase:
    vocab: dict
    merges: tuple
    specials: tuple[str, ...]
    corpus: tuple[str, ...]

    def __repr__(self) -> str:
        return (f"TokenizerCase({len(self.merges)} merges learned from {list(self.corpus)!r}, "
                f"specials={list(self.specials)})")

    def _repr_pretty_(self, printer, cycle) -> None:  # Hypothesis' report: this line, not every field
        printer.text(repr(self))


@draws_options("Tokenizer", special_tokens=lambda c: bool(c.specials))
@st.composite
def tokenizer_cases(draw, offers, *, with_specials: bool = False) -> TokenizerCase:
    """Merges the spec's reference trainer learns from drawn documents, with specials where offered
    (``with_specials``: at least one)."""
    specials = draw(special_tokens(offers, required=with_specials), label="special_tokens")
    docs = tuple(draw(documents(specials=specials), label="corpus"))
    merges = MAX_MERGES - draw(st.integers(0, MAX_MERGES), label="MAX_MERGES - merges")  # many merges first
    vocab, learned = reference_training(docs, 256 + len(specials) + merges, specials)
    return TokenizerCase(vocab, tuple(learned), specials, docs)


def texts(case: TokenizerCase) -> st.SearchStrategy[str]:
    """Any Unicode text mixed with the corpus' words and runs (so merges apply) and the case's specials."""
    return _texts(case.specials)


@functools.lru_cache(maxsize=None)
def _texts(specials: tuple[str, ...]) -> st.SearchStrategy[str]:
    word = st.tuples(st.sampled_from(WORDS), st.sampled_from(SEPARATORS)).map("".join)
    extra = [st.sampled_from(specials)] if specials else []
    return st.lists(st.one_of(word, RUNS, RUNS, st.text(max_size=6), *extra), max_size=12).map("".join)


# ---------------------------------------------------------------------------------------------------
# Tokenizer


def _expected(case: TokenizerCase, text: str) -> list[int]:
    return reference_encode(text, list(case.merges), case.specials, case.vocab)


@pytest.mark.parametrize("component", ["Tokenizer"])
@given(data=st.data())
def test_decode_inverts_encode_for_every_string(impl, component, data):
    """decode(encode(s)) == s for every string, all of Unicode included.

    Hint: decode joins the ids' bytes first and decodes once: a character split across two tokens
    (any non-ASCII one before its bytes are merged) is not valid UTF-8 token by token. Encoding must
    not lose text either (every character belongs to some pre-token: keep the pattern's final \\s+)."""
    case = data.draw(tokenizer_cases(impl.offers(component)), label="case")
    text = data.draw(texts(case), label="text")
    tok = Checked(impl, case)
    back = tok.decode(tok.encode(text))
    assert_true(back == text, claim=f"decode(encode(s)) == s ({case})",
                detail=f"s={text!r}, decoded {back!r}",
                hint="decode b''.join(token bytes) once, as UTF-8; never decode token by token.")


@pytest.mark.parametrize("component", ["Tokenizer"])
@given(data=st.data())
def test_decode_replaces_invalid_utf8_like_bytes_decode(impl, component, data):
    """decode of any id sequence (half a character, a lone 0xFF) equals b''.join(their bytes).decode("utf-8",
    errors="replace"): each invalid sequence becomes U+FFFD, nothing is dropped, nothing raises.

    Hint: errors="ignore" drops bytes silently; errors="strict" raises on the first partial character."""
    case = data.draw(tokenizer_cases(impl.offers(component)), label="case")
    n = 256 + len(case.merges)  # specials are valid UTF-8 anyway
    ids = data.draw(st.lists(st.one_of(st.integers(0x80, 0xFF), st.integers(0, n - 1)), max_size=8), label="ids")
    got, want = Checked(impl, case).decode(ids), reference_decode(ids, case.vocab)
    assert_true(got == want, claim=f"decode({ids}) == b''.join(bytes).decode('utf-8', errors='replace') ({case})",
                detail=f"decoded {got!r}, expected {want!r}",
                hint="decode the joined bytes with errors='replace' (U+FFFD per invalid sequence).")


@pytest.mark.parametrize("component", ["Tokenizer"])
@given(data=st.data())
def test_encode_equals_the_naive_lowest_rank_reference(impl, component, data):
    """encode equals the naive reference: within each pre-token, repeatedly apply the lowest-ranked
    (earliest learned) merge present, until none applies; specials are one id each.

    Hint: merge by rank, not by the pairs' position in the word (leftmost first) or their frequency;
    and never merge across a pre-token boundary."""
    case = data.draw(tokenizer_cases(impl.offers(component)), label="case")
    text = data.draw(texts(case), label="text")
    got, want = Checked(impl, case).encode(text), _expected(case, text)
    assert_true(got == want, claim=f"encode equals the lowest-rank-first reference ({case})",
                detail=f"encode({text!r}) = {got}, the reference gives {want} (pieces {pieces(text, case.specials)})",
                hint="apply the lowest-ranked merge among the word's adjacent pairs, repeatedly.")


@pytest.mark.parametrize("component", ["Tokenizer"])
@given(data=st.data())
def test_encode_of_a_concatenation_at_a_pretoken_boundary_is_the_concatenation(impl, component, data):
    """Cut a text where one pre-token ends and the next begins (and a alone ends there too):
    encode(a + b) == encode(a) + encode(b), at every such cut.

    Hint: a merge that crosses pre-tokens (the two spaces of "x  low" split as " ", " low"; "!'" + "s")
    breaks this; pre-tokenize with the GPT-2 pattern and merge inside each pre-token only."""
    case = data.draw(tokenizer_cases(impl.offers(component)), label="case")
    text = data.draw(texts(case), label="text")
    # Boundaries of the whole text that also split a + b the same way on both sides.
    cuts = [c for c in pretoken_boundaries(text, case.specials)
            if pieces(text[:c], case.specials) + pieces(text[c:], case.specials) == pieces(text, case.specials)]
    if not cuts:  # a text of one pre-token: add two, whose boundary is always a clean cut
        text += " low lower"
        cuts = [c for c in pretoken_boundaries(text, case.specials)
                if pieces(text[:c], case.specials) + pieces(text[c:], case.specials) == pieces(text, case.specials)]
    tok = Checked(impl, case)
    whole = tok.encode(text)
    for cut in cuts:
        a, b = text[:cut], text[cut:]
        parts = tok.encode(a) + tok.encode(b)
        assert_true(whole == parts, claim=f"encode(a + b) == encode(a) + encode(b) at a pre-token boundary ({case})",
                    detail=f"a={a!r}, b={b!r}: encode(a + b) = {whole}, encode(a) + encode(b) = {parts}",
                    hint="merges must stay inside pre-tokens.")


def tiktoken_encoding(case: TokenizerCase):
    import tiktoken

    ranks = {token: i for i, token in case.vocab.items() if i < 256 + len(case.merges)}
    specials = {s: next(i for i, t in case.vocab.items() if t == s.encode("utf-8")) for s in case.specials}
    return tiktoken.Encoding("spec_bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def hf_tokenizer(case: TokenizerCase):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    table = bytes_to_unicode()
    show = lambda token: "".join(table[b] for b in token)  # noqa: E731
    model = models.BPE({show(t): i for i, t in case.vocab.items()}, [(show(a), show(b)) for a, b in case.merges])
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in case.specials])
    return tok


@pytest.mark.parametrize("component", ["Tokenizer"])
@given(data=st.data())
def test_encode_equals_tiktoken_on_the_same_ranks(impl, component, data):
    """encode equals tiktoken's encoder built offline from the same ranks (merge i = rank 256 + i), the
    GPT-2 pattern and the same special tokens, for any text.

    Hint: tiktoken merges the adjacent pair whose concatenation has the lowest rank; yours should pick
    the same (the lowest-ranked merge) and pre-tokenize with the same pattern."""
    case = data.draw(tokenizer_cases(impl.offers(component)), label="case")
    text = data.draw(texts(case), label="text")
    got = Checked(impl, case).encode(text)
    want = tiktoken_encoding(case).encode(text, allowed_special="all")
    assert_true(got == want, claim=f"encode equals tiktoken on the same ranks ({case})",
                detail=f"encode({text!r}) = {got}, tiktoken gives {want}",
                hint="merge by rank within GPT-2 pre-tokens; specials as one id.")


@pytest.mark.parametrize("component", ["Tokenizer"])
@given(data=st.data())
def test_encode_equals_hf_tokenizers_bpe_on_the_same_merges(impl, component, data):
    """encode equals HF tokenizers' BPE model on the same merges (stored through GPT-2's bytes-to-unicode
    table), with the ByteLevel pre-tokenizer (no prefix space, GPT-2 regex) and the same special tokens.

    Hint: HF applies merges by rank inside each ByteLevel pre-token, as the spec does."""
    case = data.draw(tokenizer_cases(impl.offers(component)), label="case")
    text = data.draw(texts(case), label="text")
    got = Checked(impl, case).encode(text)
    want = hf_tokenizer(case).encode(text, add_special_tokens=False).ids
    assert_true(got == want, claim=f"encode equals HF tokenizers' BPE on the same merges ({case})",
                detail=f"encode({text!r}) = {got}, tokenizers gives {want}",
                hint="merge by rank within GPT-2 pre-tokens; specials as one id.")


@pytest.mark.needs(special_tokens=True)
@pytest.mark.parametrize("component", ["Tokenizer"])
@given(data=st.data())
def test_a_special_token_in_the_text_is_one_id(impl, component, data):
    """A special token in the text encodes to its one id (after the merges' ids), whatever surrounds it,
    and decodes back to itself.

    Hint: split the text on the special tokens (longest first) before pre-tokenizing; otherwise
    "<|endoftext|>" becomes "<", "|", "endoftext", "|>"."""
    case = data.draw(tokenizer_cases(impl.offers(component), with_specials=True), label="case")
    special = data.draw(st.sampled_from(case.specials), label="special")
    before, after = data.draw(texts(case), label="before"), data.draw(texts(case), label="after")
    text = before + special + after
    tok = Checked(impl, case)
    special_id = next(i for i, t in case.vocab.items() if t == special.encode("utf-8"))
    got, want = tok.encode(text), _expected(case, text)
    assert_true(tok.encode(special) == [special_id], claim=f"encode({special!r}) is its one id {special_id} ({case})",
                detail=f"encode({special!r}) = {tok.encode(special)}", hint="match specials before pre-tokenizing.")
    assert_true(got == want, claim=f"a special token inside a text is one id ({case})",
                detail=f"encode({text!r}) = {got}, expected {want} (id {special_id} for {special!r})",
                hint="split on special tokens first; they are never merged with their neighbours.")
    back = tok.decode([special_id])
    assert_true(back == special, claim=f"decode([{special_id}]) gives the special token back ({case})",
                detail=f"decoded {back!r}", hint="a special token's bytes are its UTF-8 text.")


@pytest.mark.needs(special_tokens=True)
@pytest.mark.parametrize("component", ["Tokenizer"])
@given(data=st.data())
def test_overlapping_special_tokens_match_longest_first(impl, component, data):
    """Where one special token is a prefix of another ("<|im|>" and "<|im|><|end|>"), the longer one is
    matched: "<|im|><|end|>" in the text is one id, whatever order the specials were given in.

    Hint: build the special-token alternation sorted by length, longest first; a regex alternation
    takes the first alternative that matches, not the longest."""
    specials = tuple(data.draw(st.permutations(["<|im|>", "<|im|><|end|>", "<|end|>"]), label="special_tokens"))
    docs = tuple(data.draw(documents(specials=specials), label="corpus"))
    vocab, merges = reference_training(docs, 256 + len(specials) + 10, specials)
    case = TokenizerCase(vocab, tuple(merges), specials, docs)
    text = data.draw(texts(case), label="text") + "<|im|><|end|>"
    got, want = Checked(impl, case).encode(text), _expected(case, text)
    assert_true(got == want, claim=f"the longest special token wins where one is a prefix of another ({case})",
                detail=f"encode({text!r}) = {got}, expected {want}",
                hint="sort the special tokens by length, longest first, before joining them into one pattern.")


@pytest.mark.needs(encode_iterable=True)
@pytest.mark.parametrize("component", ["Tokenizer"])
@given(data=st.data())
def test_encode_iterable_equals_encode_of_the_joined_text(impl, component, data):
    """For any cut of a text into chunks (inside words, contractions, whitespace runs and special tokens
    included), encode_iterable(chunks) yields encode(''.join(chunks)).

    Hint: a chunk boundary is not a pre-token boundary: "we'l" + "l" is one pre-token "'ll", "a \\n" + "b"
    splits " ", "\\n"; hold back the text whose split later text may change."""
    case = data.draw(tokenizer_cases(impl.offers(component)), label="case")
    text = data.draw(texts(case), label="text")
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=6), label="cuts")) if text else []
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)]) if a < b]
    tok = Checked(impl, case)
    got, want = tok.encode_iterable(iter(chunks)), tok.encode(text)
    assert_true(got == want, claim=f"encode_iterable(chunks) == encode(''.join(chunks)) ({case})",
                detail=f"chunks {chunks}: encode_iterable gives {got}, encode gives {want}",
                hint="buffer across chunk boundaries until the pre-tokens there are final.")


@pytest.mark.needs(encode_iterable=True)
@pytest.mark.parametrize("component", ["Tokenizer"])
@given(data=st.data())
def test_encode_iterable_yields_before_reading_all_its_input(impl, component, data):
    """encode_iterable is lazy: over 50 lines it yields its first id before it has read the last line,
    so a file larger than memory can be encoded.

    Hint: a generator that joins all chunks first (or returns encode(''.join(chunks))) reads everything."""
    case = data.draw(tokenizer_cases(impl.offers(component)), label="case")
    line = data.draw(st.sampled_from(["low lower newest\n", "don't stop 12 times\n", "日本 über 😀\n"]),
                     label="line")
    read = []

    def lines():
        for k in range(50):
            read.append(k)
            yield line

    tok = Checked(impl, case)
    stream = tok.stream(lines())
    first = _call(tok.who, "next(encode_iterable(lines))", next, iter(stream), None)
    assert_true(first is not None and len(read) < 50,
                claim=f"encode_iterable yields before reading all 50 lines ({case})",
                detail=f"it had read {len(read)} lines at its first id {first!r}",
                hint="yield the ids of finished pre-tokens as you go (a generator with yield from).")


# ---------------------------------------------------------------------------------------------------
# train_bpe


@pytest.mark.parametrize("component", ["train_bpe"])
@given(data=st.data())
def test_training_equals_the_reference_trainer(impl, component, data):
    """train_bpe learns exactly the reference's merges and vocabulary: most frequent pair first (pairs
    counted at every adjacent position, "aaa" holding (a, a) twice), ties to the greater pair, never
    across pre-tokens, documents or special tokens; ids bytes, then merges, then specials.

    Hint: after each merge update the counts of the pairs around every replaced occurrence (an
    incremental update that misses a repeated pair drifts from a recount)."""
    t = data.draw(trainings(impl.offers(component)), label="training")
    vocab, merges = trained(impl, t.source, vocab_size=t.vocab_size, specials=t.specials)
    want_vocab, want_merges = reference_training(t.documents, t.vocab_size, t.specials)
    if merges != want_merges:
        k = next((i for i, (a, b) in enumerate(zip(merges, want_merges)) if a != b), min(len(merges), len(want_merges)))
        fail(f"train_bpe learns the reference's merges ({t})",
             f"merge {k} is {merges[k] if k < len(merges) else 'missing'}, the reference's is "
             f"{want_merges[k] if k < len(want_merges) else 'none'} ({len(merges)} vs {len(want_merges)} merges)",
             "count every adjacent pair (overlaps too) within pre-tokens, excluding specials; ties go to the "
             "greater (bytes, bytes) pair.")
    differ = sorted(i for i in set(vocab) | set(want_vocab) if vocab.get(i) != want_vocab.get(i))
    assert_true(vocab == want_vocab, claim=f"train_bpe's vocab follows the id layout ({t})",
                detail=f"ids that differ: {differ[:8]}",
                hint="ids 0..255 are the bytes, 256 + i is merge i, specials follow in the order given.")


@pytest.mark.parametrize("component", ["train_bpe"])
@given(data=st.data())
def test_vocabulary_size_is_256_plus_merges_plus_specials(impl, component, data):
    """len(vocab) == 256 + len(merges) + len(special_tokens) <= vocab_size, with equality while pairs
    remain; the ids are 0 .. len(vocab) - 1.

    Hint: vocab_size counts the special tokens: learn vocab_size - 256 - len(specials) merges."""
    t = data.draw(trainings(impl.offers(component)), label="training")
    vocab, merges = trained(impl, t.source, vocab_size=t.vocab_size, specials=t.specials)
    _, want_merges = reference_training(t.documents, t.vocab_size, t.specials)
    size = 256 + len(merges) + len(t.specials)
    assert_true(len(vocab) == size and sorted(vocab) == list(range(size)) and size <= t.vocab_size
                and len(merges) == len(want_merges),
                claim=f"the vocabulary has 256 + merges + specials ids, at most vocab_size ({t})",
                detail=f"len(vocab) = {len(vocab)}, {len(merges)} merges (the reference learns {len(want_merges)}), "
                       f"{len(t.specials)} specials, vocab_size {t.vocab_size}",
                hint="learn vocab_size - 256 - len(special_tokens) merges (fewer only when no pair is left).")


@pytest.mark.parametrize("component", ["train_bpe"])
@given(short=st.integers(1, 3), specials=st.lists(st.sampled_from(SPECIALS), max_size=3, unique=True))
def test_training_rejects_a_vocab_size_below_256_plus_specials(impl, component, short, specials):
    """vocab_size < 256 + len(special_tokens) raises ValueError: the bytes and the specials alone
    exceed it, so no vocabulary of that size exists.

    Hint: check vocab_size >= 256 + len(special_tokens) before training, and raise ValueError."""
    offers = impl.offers(component)
    specials = specials if offers.offers("special_tokens") else []
    kwargs = {"special_tokens": specials} if offers.offers("special_tokens") else {}
    vocab_size = 256 + len(specials) - short
    expect_value_error(lambda: impl.raw("train_bpe")("low lower newest", vocab_size=vocab_size, **kwargs),
                       claim=f"train_bpe(vocab_size={vocab_size}, special_tokens={specials}) raises ValueError",
                       hint="256 byte tokens and the specials must fit: raise ValueError naming the numbers.")


@pytest.mark.needs(documents=True)
@pytest.mark.parametrize("component", ["train_bpe"])
@given(data=st.data())
def test_training_is_deterministic_and_independent_of_document_order(impl, component, data):
    """Training twice gives the same result, and so does training on the documents in another order.

    Hint: break ties by the pair itself (the greater pair wins), never by which pair was seen first."""
    t = data.draw(trainings(impl.offers(component), as_list=True), label="training")
    order = data.draw(st.permutations(list(t.documents)), label="order")
    first = trained(impl, list(t.documents), vocab_size=t.vocab_size, specials=t.specials)
    again = trained(impl, list(t.documents), vocab_size=t.vocab_size, specials=t.specials)
    shuffled = trained(impl, list(order), vocab_size=t.vocab_size, specials=t.specials)
    assert_true(first == again, claim=f"training is deterministic ({t})", detail="two runs learned different merges",
                hint="no randomness, no set iteration order in the choice of a pair.")
    assert_true(first[1] == shuffled[1], claim=f"training does not depend on the order of documents ({t})",
                detail=f"documents in order {order!r} give merges {shuffled[1][:6]}..., "
                       f"in the given order {first[1][:6]}...",
                hint="a tie goes to the lexicographically greater pair, not to the first seen.")


@pytest.mark.parametrize("component", ["train_bpe"])
@given(data=st.data())
def test_the_first_merge_is_the_most_frequent_pair(impl, component, data):
    """The first merge is the most frequent adjacent byte pair within pre-tokens (overlapping pairs
    counted: "aaa" holds (a, a) twice), ties going to the lexicographically greater pair.

    Hint: count zip(word, word[1:]) for each pre-token, times its frequency; max over (count, pair)."""
    t = data.draw(trainings(impl.offers(component)), label="training")
    t = Training(t.documents, max(t.vocab_size, 257 + len(t.specials)), t.specials, t.as_list)
    counts: Counter = Counter()
    for doc in t.documents:  # counted here, apart from the reference trainer
        for piece, special in pieces(doc, t.specials):
            raw = piece.encode("utf-8")
            for pair in zip(raw, raw[1:]) if not special else ():
                counts[(bytes([pair[0]]), bytes([pair[1]]))] += 1
    if not counts:
        return  # no pair at all (a corpus of single bytes): nothing to merge
    best = max(counts, key=lambda p: (counts[p], p))
    _, merges = trained(impl, t.source, vocab_size=t.vocab_size, specials=t.specials)
    got = merges[0] if merges else None
    assert_true(got == best, claim=f"the first merge is the most frequent pair ({t})",
                detail=f"first merge {got} (count {counts.get(got, 0)}), the most frequent is {best} "
                       f"(count {counts[best]})",
                hint="count overlapping pairs ('aaa' has (a, a) twice); ties go to the greater pair.")


@pytest.mark.needs(files=True)
@pytest.mark.parametrize("component", ["train_bpe"])
@given(data=st.data())
def test_training_on_files_equals_training_on_their_texts(impl, component, data):
    """train_bpe on pathlib.Path files (each one document) learns what it learns from their texts: the
    files are read as UTF-8 bytes exactly, Windows line ends ("\\r\\n") included.

    Hint: open(path) translates "\\r\\n" to "\\n"; read_bytes().decode("utf-8") (or newline="") does not."""
    t = data.draw(trainings(impl.offers(component)), label="training")
    texts_ = [d.replace("\n", "\r\n") for d in t.documents]  # every line ends the Windows way
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"doc{k}.txt" for k in range(len(texts_))]
        for path, text in zip(paths, texts_):
            path.write_bytes(text.encode("utf-8"))
        got = trained(impl, paths if t.as_list else paths[0], vocab_size=t.vocab_size, specials=t.specials)
    want = reference_training(tuple(texts_), t.vocab_size, t.specials)
    assert_true(got[1] == want[1], claim=f"training on files equals training on their texts ({t})",
                detail=f"from files: {got[1][:6]}..., from the texts: {want[1][:6]}...",
                hint="read files as bytes and decode UTF-8, without newline translation.")
