"""Mutants of byte-level BPE: the tokenizer and the trainer."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import regex

from implementations import tokenization as ours
from implementations.tokenization import PRETOKEN, Tokenizer, train_bpe
from meta_tests.catalog import mutant
from spec.tokenization import GPT2_PATTERN

# --- Tokenizer ---------------------------------------------------------------------------------------


@mutant(name="Tokenizer_merges_leftmost_first", provides="Tokenizer",
        bug="merges applied in the order the word's pairs appear (leftmost mergeable pair first) instead of by rank",
        caught_by=["test_encode_equals_the_naive_lowest_rank_reference",
                   "test_encode_equals_tiktoken_on_the_same_ranks",
                   "test_encode_equals_hf_tokenizers_bpe_on_the_same_merges"])
class Tokenizer_LeftmostFirst(Tokenizer):
    def _word(self, pretoken):
        ids = list(pretoken.encode("utf-8"))
        merged = True
        while merged:
            merged = False
            for i, pair in enumerate(zip(ids, ids[1:])):
                if pair in self.ranks:
                    ids[i : i + 2] = [self.ranks[pair][1]]
                    merged = True
                    break
        return ids


@mutant(name="Tokenizer_merges_across_pretokens", provides="Tokenizer",
        bug="no pre-tokenization: merges cross pre-token boundaries (a word's last letter with the next space)",
        caught_by=["test_encode_of_a_concatenation_at_a_pretoken_boundary_is_the_concatenation",
                   "test_encode_equals_the_naive_lowest_rank_reference",
                   "test_encode_equals_tiktoken_on_the_same_ranks",
                   "test_encode_equals_hf_tokenizers_bpe_on_the_same_merges"])
class Tokenizer_AcrossPretokens(Tokenizer):
    def _pieces(self, text):
        at = 0
        for k, segment in enumerate(ours._segments(text, self.special)):
            if segment:
                yield at, at + len(segment), segment, bool(k % 2)
            at += len(segment)


@mutant(name="Tokenizer_splits_special_tokens", provides="Tokenizer",
        bug="special tokens are encoded as ordinary text (split into bytes and merges)",
        caught_by=["test_a_special_token_in_the_text_is_one_id", "test_encode_equals_tiktoken_on_the_same_ranks"])
class Tokenizer_SplitsSpecials(Tokenizer):
    def __init__(self, vocab, merges, special_tokens=None):
        super().__init__(vocab, merges, special_tokens)
        self.special = None


@mutant(name="Tokenizer_special_tokens_in_given_order", provides="Tokenizer",
        bug="special tokens joined into one pattern in the order given, so a shorter prefix wins over a longer token",
        caught_by=["test_overlapping_special_tokens_match_longest_first"])
class Tokenizer_SpecialsInGivenOrder(Tokenizer):
    def __init__(self, vocab, merges, special_tokens=None):
        super().__init__(vocab, merges, special_tokens)
        if self.specials:
            self.special = regex.compile("(" + "|".join(regex.escape(s) for s in self.specials) + ")")


@mutant(name="Tokenizer_decode_drops_invalid_utf8", provides="Tokenizer",
        bug="decode drops invalid UTF-8 (errors='ignore') instead of replacing it with U+FFFD",
        caught_by=["test_decode_replaces_invalid_utf8_like_bytes_decode"])
class Tokenizer_DecodeIgnores(Tokenizer):
    def decode(self, ids):
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="ignore")


@mutant(name="Tokenizer_decodes_token_by_token", provides="Tokenizer",
        bug="decode decodes each token's bytes separately, breaking characters split across tokens",
        caught_by=["test_decode_inverts_encode_for_every_string"])
class Tokenizer_TokenByToken(Tokenizer):
    def decode(self, ids):
        return "".join(self.vocab[i].decode("utf-8", errors="replace") for i in ids)


_NO_TRAILING_WHITESPACE = regex.compile(GPT2_PATTERN.removesuffix(r"|\s+"))


@mutant(name="Tokenizer_pattern_drops_whitespace", provides="Tokenizer",
        bug="pre-tokenizer pattern without its final \\s+ alternative: whitespace before a word after a newline "
            "is lost",
        caught_by=["test_decode_inverts_encode_for_every_string"])
class Tokenizer_DropsWhitespace(Tokenizer):
    def _pieces(self, text):
        at = 0
        for k, segment in enumerate(ours._segments(text, self.special)):
            if k % 2:
                yield at, at + len(segment), segment, True
            else:
                for m in _NO_TRAILING_WHITESPACE.finditer(segment):
                    yield at + m.start(), at + m.end(), m.group(), False
            at += len(segment)


@mutant(name="Tokenizer_encode_iterable_per_chunk", provides="Tokenizer",
        bug="encode_iterable encodes each chunk on its own, so a chunk boundary splits a pre-token",
        caught_by=["test_encode_iterable_equals_encode_of_the_joined_text"])
class Tokenizer_PerChunk(Tokenizer):
    def encode_iterable(self, chunks):
        for chunk in chunks:
            yield from self.encode(chunk)


@mutant(name="Tokenizer_encode_iterable_reads_everything", provides="Tokenizer",
        bug="encode_iterable joins every chunk before encoding (not streaming)",
        caught_by=["test_encode_iterable_yields_before_reading_all_its_input"])
class Tokenizer_ReadsEverything(Tokenizer):
    def encode_iterable(self, chunks):
        return iter(self.encode("".join(chunks)))


# --- train_bpe ---------------------------------------------------------------------------------------


def _naive_train(source, vocab_size, special_tokens, *, choose, count_pairs, split=True, specials_count=True):
    """A recounting trainer with pluggable pair choice and pair counting (the mutants' common core)."""
    specials = list(dict.fromkeys(special_tokens))
    special = ours._special_pattern(specials)
    words: Counter = Counter()
    for doc in ours._documents(source):
        segments = ours._segments(doc, special)[::2] if split else [doc]
        for segment in segments:
            for w in (PRETOKEN.findall(segment) if split else [segment]):
                words[tuple(bytes([b]) for b in w.encode("utf-8"))] += 1
    merges = []
    budget = vocab_size - 256 - (len(specials) if specials_count else 0)
    while len(merges) < budget:
        counts: dict = {}
        for word, n in words.items():
            for pair in count_pairs(word):
                counts[pair] = counts.get(pair, 0) + n
        if not counts:
            break
        best = choose(counts)
        merges.append(best)
        new: Counter = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new[tuple(out)] += n
        words = new
    vocab = {i: bytes([i]) for i in range(256)}
    for a, b in merges:
        vocab[len(vocab)] = a + b
    for s in specials:
        vocab[len(vocab)] = s.encode("utf-8")
    return vocab, merges


def _greatest(counts):
    return max(counts, key=lambda p: (counts[p], p))


def _all_pairs(word):
    return zip(word, word[1:])


@mutant(name="train_bpe_tie_break_reversed", provides="train_bpe",
        bug="ties go to the lexicographically smaller pair",
        caught_by=["test_training_equals_the_reference_trainer", "test_the_first_merge_is_the_most_frequent_pair"])
def train_bpe_smaller_ties(source, *, vocab_size, special_tokens=()):
    choose = lambda counts: min(counts, key=lambda p: (-counts[p], p))  # noqa: E731
    return _naive_train(source, vocab_size, special_tokens, choose=choose, count_pairs=_all_pairs)


@mutant(name="train_bpe_first_seen_tie_break", provides="train_bpe",
        bug="ties go to the pair seen first (max over a dict in insertion order), so document order matters",
        caught_by=["test_training_is_deterministic_and_independent_of_document_order",
                   "test_training_equals_the_reference_trainer"])
def train_bpe_first_seen(source, *, vocab_size, special_tokens=()):
    return _naive_train(source, vocab_size, special_tokens, choose=lambda c: max(c, key=c.get), count_pairs=_all_pairs)


def _non_overlapping(word):
    """Counts a repeated pair as str.count does: (a, a, a) holds (a, a) once."""
    i = 0
    while i + 1 < len(word):
        yield word[i], word[i + 1]
        i += 2 if word[i] == word[i + 1] else 1


@mutant(name="train_bpe_overlapping_pairs_counted_once", provides="train_bpe",
        bug="off-by-one in counting overlapping pairs: 'aaa' counts (a, a) once, not twice",
        caught_by=["test_training_equals_the_reference_trainer", "test_the_first_merge_is_the_most_frequent_pair"])
def train_bpe_overlap(source, *, vocab_size, special_tokens=()):
    return _naive_train(source, vocab_size, special_tokens, choose=_greatest, count_pairs=_non_overlapping)


@mutant(name="train_bpe_merges_across_pretokens", provides="train_bpe",
        bug="training counts pairs over whole documents, across pre-tokens (and special tokens)",
        caught_by=["test_training_equals_the_reference_trainer", "test_the_first_merge_is_the_most_frequent_pair"])
def train_bpe_no_pretokens(source, *, vocab_size, special_tokens=()):
    return _naive_train(source, vocab_size, special_tokens, choose=_greatest, count_pairs=_all_pairs, split=False)


@mutant(name="train_bpe_vocab_size_ignores_specials", provides="train_bpe",
        bug="learns vocab_size - 256 merges and then adds the specials, so the vocabulary outgrows vocab_size",
        caught_by=["test_vocabulary_size_is_256_plus_merges_plus_specials"])
def train_bpe_too_many(source, *, vocab_size, special_tokens=()):
    return _naive_train(source, vocab_size, special_tokens, choose=_greatest, count_pairs=_all_pairs,
                        specials_count=False)


@mutant(name="train_bpe_reads_files_in_text_mode", provides="train_bpe",
        bug="files read with open(path).read(), which turns '\\r\\n' into '\\n'",
        caught_by=["test_training_on_files_equals_training_on_their_texts"])
def train_bpe_text_mode(source, *, vocab_size, special_tokens=()):
    items = [source] if isinstance(source, (str, Path)) else list(source)
    texts = [open(item, encoding="utf-8").read() if isinstance(item, Path) else item for item in items]
    return train_bpe(texts, vocab_size=vocab_size, special_tokens=special_tokens)


@mutant(name="train_bpe_accepts_too_small_vocab_size", provides="train_bpe",
        bug="no check of vocab_size: a size below 256 + specials returns a larger vocabulary instead of raising",
        caught_by=["test_training_rejects_a_vocab_size_below_256_plus_specials"])
def train_bpe_no_check(source, *, vocab_size, special_tokens=()):
    return train_bpe(source, vocab_size=max(vocab_size, 256 + len(set(special_tokens))), special_tokens=special_tokens)
