"""Byte-level BPE (GPT-2 style): ``train_bpe`` and ``Tokenizer``. Spec: spec/tokenization.py.

Plain Python, no torch: a tokenizer is a function of bytes. Training keeps pair counts up to date
incrementally (only the words that contain the merged pair are touched) instead of recounting every
pair before each merge, and picks the best pair from a heap; the spec's reference recounts, and the
properties check that the two learn the same merges.
"""

from __future__ import annotations

import heapq
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import regex

from spec.tokenization import GPT2_PATTERN

__all__ = ["train_bpe", "Tokenizer"]

PRETOKEN = regex.compile(GPT2_PATTERN)
Merge = tuple[bytes, bytes]


def _special_pattern(specials: Sequence[str]) -> regex.Pattern | None:
    """One alternation, longest first, so that "<|a|><|b|>" wins over its prefix "<|a|>"."""
    if not specials:
        return None
    return regex.compile("(" + "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")")


def _segments(text: str, special: regex.Pattern | None) -> list[str]:
    """[text, special, text, special, ..., text]: specials at odd positions."""
    return [text] if special is None else special.split(text)


def _documents(source) -> list[str]:
    """A str is one document; a Path is a file; a list holds documents or files."""
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    docs = []
    for item in items:
        if isinstance(item, os.PathLike):
            docs.append(Path(item).read_bytes().decode("utf-8"))  # bytes exactly: no newline translation
        elif isinstance(item, str):
            docs.append(item)
        else:
            raise ValueError(f"train_bpe takes str documents or pathlib.Path files, got {type(item).__name__}")
    return docs


class _Greater:
    """Heap key that orders pairs descending, so the heap's minimum is the greatest pair."""

    __slots__ = ("pair",)

    def __init__(self, pair: Merge):
        self.pair = pair

    def __lt__(self, other: _Greater) -> bool:
        return self.pair > other.pair


def train_bpe(source, *, vocab_size: int, special_tokens: Sequence[str] = ()) -> tuple[dict[int, bytes], list[Merge]]:
    """Learn vocab_size - 256 - len(special_tokens) merges (fewer if no pair is left)."""
    specials = list(dict.fromkeys(special_tokens))
    if not isinstance(vocab_size, int) or vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size={vocab_size!r} must be an int >= 256 + {len(specials)} special tokens")
    special = _special_pattern(specials)
    frequency: Counter[str] = Counter()
    for doc in _documents(source):
        for segment in _segments(doc, special)[::2]:  # specials take no part in counting
            frequency.update(PRETOKEN.findall(segment))

    token: list[bytes] = [bytes([i]) for i in range(256)]  # id -> bytes, ids grow with merges
    words = [list(w.encode("utf-8")) for w in frequency]
    counts = list(frequency.values())
    pair_count: defaultdict[tuple[int, int], int] = defaultdict(int)
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> words that (may) hold it
    for w, (word, n) in enumerate(zip(words, counts)):
        for pair in zip(word, word[1:]):  # every adjacent position: "aaa" holds (a, a) twice
            pair_count[pair] += n
            where[pair].add(w)

    def entry(pair):
        return (-pair_count[pair], _Greater((token[pair[0]], token[pair[1]])), pair)

    heap = [entry(p) for p in pair_count]
    heapq.heapify(heap)
    merges: list[Merge] = []
    while len(merges) < vocab_size - 256 - len(specials) and heap:
        negative, _, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -negative or negative == 0:
            continue  # stale: the count changed after this entry was pushed
        new = len(token)
        token.append(token[pair[0]] + token[pair[1]])
        merges.append((token[pair[0]], token[pair[1]]))
        touched = set()
        for w in where.pop(pair):
            word, n = words[w], counts[w]
            merged, i = [], 0
            while i < len(word):  # non-overlapping, left to right: (a, a, a) -> (aa, a)
                if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
                    merged.append(new)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            if len(merged) == len(word):
                continue  # this word no longer held the pair
            for old in zip(word, word[1:]):
                pair_count[old] -= n
                touched.add(old)
            for fresh in zip(merged, merged[1:]):
                pair_count[fresh] += n
                where[fresh].add(w)
                touched.add(fresh)
            words[w] = merged
        pair_count.pop(pair, None)
        for p in touched:
            if pair_count.get(p, 0) > 0:
                heapq.heappush(heap, entry(p))
            else:
                pair_count.pop(p, None)
    vocab = dict(enumerate(token))
    for s in specials:
        vocab[len(vocab)] = s.encode("utf-8")
    return vocab, merges


class Tokenizer:
    """Encode with merges by rank (the lowest-ranked adjacent pair first), decode with errors="replace"."""

    def __init__(self, vocab: dict[int, bytes], merges: Sequence[Merge], special_tokens: Sequence[str] | None = None):
        self.vocab = dict(vocab)
        self.ids = {b: i for i, b in self.vocab.items()}
        missing = [b for i in range(256) if (b := bytes([i])) not in self.ids]
        if missing:
            raise ValueError(f"vocab lacks {len(missing)} of the 256 single bytes (first {missing[0]!r})")
        self.ranks: dict[tuple[int, int], tuple[int, int]] = {}  # (left id, right id) -> (rank, merged id)
        for rank, (a, b) in enumerate(merges):
            if a + b not in self.ids or a not in self.ids or b not in self.ids:
                raise ValueError(f"merge {rank} ({a!r}, {b!r}) names a token that is not in vocab")
            self.ranks.setdefault((self.ids[a], self.ids[b]), (rank, self.ids[a + b]))
        self.specials = list(dict.fromkeys(special_tokens or ()))
        for s in self.specials:
            if s.encode("utf-8") not in self.ids:
                self.ids[s.encode("utf-8")] = len(self.vocab)
                self.vocab[len(self.vocab)] = s.encode("utf-8")
        self.special = _special_pattern(self.specials)
        self.margin = max([3, *map(len, self.specials)])  # see encode_iterable
        self._cache: dict[str, list[int]] = {}

    def _word(self, pretoken: str) -> list[int]:
        if pretoken in self._cache:
            return self._cache[pretoken]
        ids = list(pretoken.encode("utf-8"))
        while len(ids) > 1:
            rank, pair = min((self.ranks.get(p, (float("inf"), 0))[0], p) for p in zip(ids, ids[1:]))
            if rank == float("inf"):
                break
            new, merged, i = self.ranks[pair][1], [], 0
            while i < len(ids):
                if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
                    merged.append(new)
                    i += 2
                else:
                    merged.append(ids[i])
                    i += 1
            ids = merged
        if len(self._cache) < 100_000:
            self._cache[pretoken] = ids
        return ids

    def _pieces(self, text: str) -> Iterator[tuple[int, int, str, bool]]:
        """(start, end, piece, is_special) over the text."""
        at = 0
        for k, segment in enumerate(_segments(text, self.special)):
            if k % 2:
                yield at, at + len(segment), segment, True
                at += len(segment)
                continue
            for m in PRETOKEN.finditer(segment):
                yield at + m.start(), at + m.end(), m.group(), False
            at += len(segment)

    def _encode_piece(self, piece: str, special: bool) -> list[int]:
        return [self.ids[piece.encode("utf-8")]] if special else self._word(piece)

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for _, _, piece, special in self._pieces(text):
            out += self._encode_piece(piece, special)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")

    def encode_iterable(self, chunks: Iterable[str]) -> Iterator[int]:
        """Lazily encode an iterable of str (a file's lines) exactly as encode of their concatenation.

        A chunk boundary may fall inside a pre-token ("we'l" + "l") or a special token, so text is
        held back until no later text can change how it splits: a piece ending at b is final once
        ``margin`` more characters follow it (the pattern looks at most 3 characters ahead of a match's
        start, "'ll", and one past its end; a special token is at most its own length)."""
        pending = ""
        for chunk in chunks:
            pending += chunk
            cut = 0
            for _, end, piece, special in self._pieces(pending):
                if end + self.margin > len(pending):
                    break
                # The piece as the whole buffer split it: re-splitting the prefix alone would let the
                # pattern see its end ("a \n" + "x": " \n" alone is one piece, " ", "\n" before "x").
                yield from self._encode_piece(piece, special)
                cut = end
            pending = pending[cut:]
        yield from self.encode(pending)
