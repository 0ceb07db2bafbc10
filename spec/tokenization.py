"""Byte-level BPE tokenization (GPT-2 style): training a vocabulary, and encoding and decoding with it.

Signature
---------
    train_bpe(input, *, vocab_size, special_tokens=()) -> (vocab, merges)
        input           a str (one document), a list of str (documents), or a pathlib.Path / a list of
                        Paths (files, each one document, read as UTF-8 bytes exactly)
        vocab_size      the size of the returned vocabulary, specials included (>= 256 + len(specials))
        special_tokens  strings that are never split and never merged (a sequence of str)
        vocab           dict[int, bytes]: id -> the token's bytes
        merges          list[tuple[bytes, bytes]]: the learned merges, in the order they were learned
    Tokenizer(vocab, merges, special_tokens=None)
        .encode(text: str) -> list[int]
        .decode(ids: list[int]) -> str
        .encode_iterable(chunks: Iterable[str]) -> Iterator[int]   lazily, e.g. the lines of an open file

Shapes
------
None: ids are Python ints, n = len(vocab) = 256 + len(merges) + len(special_tokens).

Math
----
Pre-tokenization: the text is split at special tokens first (they become one id each), then each piece
between them is split by GPT-2's pattern (``GPT2_PATTERN``, needs the ``regex`` package for \\p{L}):
    "Hello, world!" -> ["Hello", ",", " world", "!"]
Each pre-token is a word of UTF-8 bytes, one base token per byte; merges never cross a pre-token.
Training counts adjacent pairs over all words (weighted by how often the word occurs) and merges the
most frequent pair into a new token, vocab_size - 256 - len(specials) times (fewer if no pair is left):
    words {(l, o, w): 5, (l, o, w, e, r): 2} -> pairs {(l, o): 7, (o, w): 7, (w, e): 2, (e, r): 2}
    -> the tie (l, o) / (o, w) goes to the greater pair (o, w); words become (l, ow), (l, ow, e, r).
Encoding a word repeatedly merges, among its adjacent pairs, the one learned first (lowest rank),
leftmost occurrences first, until no adjacent pair is a merge. Decoding concatenates the ids' bytes.

Conventions (pinned, with the reason)
-------------------------------------
* Id layout: bytes 0..255 are ids 0..255, merge i creates id 256 + i, special tokens follow in the
  order given (256 + len(merges) + j). Then a merged token's id is its rank, which is exactly what
  tiktoken's ``mergeable_ranks`` are, and HF ``tokenizers`` gives added tokens the ids after its model's.
* Ties in training go to the lexicographically greater pair, pairs compared as (bytes, bytes) tuples
  (``max`` over ``(count, pair)``), so that training is deterministic whatever order the documents and
  the dict iteration take; a first-seen tie-break makes it depend on the documents' order.
* Pairs are counted at every adjacent position, overlapping ones included: the word "aaa" holds the
  pair (a, a) twice. Merging replaces non-overlapping occurrences left to right: "aaa" -> (aa, a).
* Merges never cross a pre-token boundary (the pattern's pieces), nor a document or file boundary.
* Special tokens are matched before pre-tokenization, longest first where one is a prefix of another,
  and are never split; their text takes no part in pair counting, so no merge produces or touches them.
  ``Tokenizer`` finds each special's id by its bytes in ``vocab`` (train_bpe's vocab holds them).
* Decoding joins the ids' bytes and decodes them as UTF-8 with errors="replace": an id sequence that is
  not valid UTF-8 (half a character, a lone 0xFF) gives U+FFFD for each invalid sequence, never an
  exception and never a silently dropped byte, so the output's length still shows what was there.
* Text is any Python str encodable as UTF-8 (lone surrogates are not text); decode(encode(s)) == s.
* A str input to train_bpe is always text; files are pathlib.Path objects, read as bytes and decoded as
  UTF-8 (no newline translation: "\\r\\n" stays two characters, as in the file).
* Training stops early, with fewer merges, when no adjacent pair is left; vocab_size below
  256 + len(special_tokens) is a ValueError.

Options (declarable)
--------------------
train_bpe:  special_tokens (input, default True): it takes special_tokens=; documents (input): it takes a
            list of documents; files (input): it takes pathlib.Path files.
Tokenizer:  special_tokens (input, default True): the constructor takes special_tokens=;
            encode_iterable (input, default True): it has the streaming ``encode_iterable``.
A learner may plug in a Tokenizer alone (no train_bpe): its properties run on merges the spec's
reference trainer learns.

Canonical parameters
--------------------
None (a tokenizer's state is its vocab and merges).

Properties (properties/test_tokenization.py)
--------------------------------------------
decode inverts encode for every string (all of Unicode); decode replaces invalid UTF-8 as
bytes.decode(errors="replace") does; encode equals the naive lowest-rank reference, tiktoken's encoder
built from the same ranks and pattern, and HF tokenizers' BPE on the same merges; encoding a
concatenation at a pre-token boundary concatenates the encodings; a special token in the text is one id,
and the longest one where one is a prefix of another;
encode_iterable equals encode of the joined text for any chunking, and yields before reading all its
input; training equals the reference trainer; the vocabulary has 256 + merges + specials entries;
training is deterministic and independent of the order of documents; the first merge is the most
frequent pair (ties to the greater); training on files equals training on their texts; a vocab_size
below 256 + specials is a ValueError.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

import regex

from spec.registry import Component, boolean, component

# GPT-2's pre-tokenization pattern (openai/gpt-2 encoder.py, contractions written as one group).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_PRETOKEN = regex.compile(GPT2_PATTERN)

TRAIN_BPE = component(
    Component(
        name="train_bpe",
        kind="function",
        family="tokenization",
        summary="byte-level BPE training: text, documents or files -> (vocab id -> bytes, merges)",
        options=(
            boolean("special_tokens", "it takes special_tokens= (strings never split, never merged)",
                    argument="special_tokens"),
            boolean("documents", "it takes a list of documents (merges never cross a document boundary)"),
            boolean("files", "it takes pathlib.Path files (each one document, read as UTF-8 bytes exactly)"),
        ),
    )
)

TOKENIZER = component(
    Component(
        name="Tokenizer",
        kind="class",
        family="tokenization",
        summary="byte-level BPE Tokenizer(vocab, merges, special_tokens): encode, decode, encode_iterable",
        options=(
            boolean("special_tokens", "the constructor takes special_tokens= (each one id, never split)",
                    argument="special_tokens"),
            boolean("encode_iterable", "it has encode_iterable(chunks), a lazy encoder of an iterable of str"),
        ),
    )
)


# ---------------------------------------------------------------------------------------------------
# The reference: plain Python, written apart from implementations/tokenization.py, slow on purpose.


def pieces(text: str, special_tokens: Iterable[str] = ()) -> list[tuple[str, bool]]:
    """The text cut into (piece, is_special): special tokens (longest first), and GPT-2 pre-tokens
    of the text between them. "a<|x|> b" -> [("a", False), ("<|x|>", True), (" b", False)]."""
    specials = sorted(set(special_tokens), key=len, reverse=True)
    out: list[tuple[str, bool]] = []
    i = start = 0
    while i < len(text):
        hit = next((s for s in specials if s and text.startswith(s, i)), None)
        if hit is None:
            i += 1
            continue
        out += [(p, False) for p in _PRETOKEN.findall(text[start:i])]
        out.append((hit, True))
        i = start = i + len(hit)
    out += [(p, False) for p in _PRETOKEN.findall(text[start:])]
    return out


def pretoken_boundaries(text: str, special_tokens: Iterable[str] = ()) -> list[int]:
    """Character offsets where one piece ends and the next begins (0 and len(text) excluded)."""
    bounds, at = [], 0
    for piece, _ in pieces(text, special_tokens):
        at += len(piece)
        bounds.append(at)
    return bounds[:-1]


def _merge(word: tuple[bytes, ...], pair: tuple[bytes, bytes]) -> tuple[bytes, ...]:
    """Replace non-overlapping occurrences of ``pair`` left to right: (a, a, a) + (a, a) -> (aa, a)."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def vocabulary(merges: list[tuple[bytes, bytes]], special_tokens: Iterable[str] = ()) -> dict[int, bytes]:
    """The pinned id layout: bytes, then merges in order, then specials in the order given."""
    vocab = {i: bytes([i]) for i in range(256)}
    for a, b in merges:
        vocab[len(vocab)] = a + b
    for s in dict.fromkeys(special_tokens):
        vocab[len(vocab)] = s.encode("utf-8")
    return vocab


def reference_train_bpe(documents: list[str], vocab_size: int,
                        special_tokens: Iterable[str] = ()) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Naive training: recount every pair before each merge."""
    specials = list(dict.fromkeys(special_tokens))
    words: Counter[tuple[bytes, ...]] = Counter()
    for doc in documents:
        for piece, special in pieces(doc, specials):
            if not special:
                words[tuple(bytes([b]) for b in piece.encode("utf-8"))] += 1
    merges: list[tuple[bytes, bytes]] = []
    while len(merges) < vocab_size - 256 - len(specials):
        counts: Counter[tuple[bytes, bytes]] = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):  # every adjacent position: "aaa" counts (a, a) twice
                counts[pair] += n
        if not counts:
            break
        best = max(counts, key=lambda p: (counts[p], p))
        merges.append(best)
        merged: Counter[tuple[bytes, ...]] = Counter()
        for word, n in words.items():
            merged[_merge(word, best)] += n
        words = merged
    return vocabulary(merges, specials), merges


def reference_encode(text: str, merges: list[tuple[bytes, bytes]], special_tokens: Iterable[str] = (),
                     vocab: dict[int, bytes] | None = None) -> list[int]:
    """Naive encoding: in each pre-token, repeatedly apply the lowest-ranked merge present."""
    vocab = vocab if vocab is not None else vocabulary(merges, special_tokens)
    ids = {token: i for i, token in vocab.items()}
    rank = {pair: r for r, pair in enumerate(merges)}
    out: list[int] = []
    for piece, special in pieces(text, special_tokens):
        if special:
            out.append(ids[piece.encode("utf-8")])
            continue
        word = tuple(bytes([b]) for b in piece.encode("utf-8"))
        while True:
            present = [pair for pair in zip(word, word[1:]) if pair in rank]
            if not present:
                break
            word = _merge(word, min(present, key=rank.__getitem__))
        out += [ids[token] for token in word]
    return out


def reference_decode(ids: list[int], vocab: dict[int, bytes]) -> str:
    return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, the alphabet HF ``tokenizers`` stores byte-level
    vocabularies in: printable Latin-1 bytes stand for themselves, the rest map to U+0100 onwards."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table
