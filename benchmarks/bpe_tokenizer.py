"""Benchmark: byte-level BPE training and encoding, ours against HF tokenizers and tiktoken (not a test).

    python benchmarks/bpe_tokenizer.py              # 4 MB of generated text, 1000 merges (~1 min)
    python benchmarks/bpe_tokenizer.py --quick      # 0.5 MB, 300 merges (a few seconds)
    python benchmarks/bpe_tokenizer.py --megabytes 8 --merges 2000

The text is generated (no download): words of 1-4 syllables drawn with Zipf-like frequencies, sentences
with punctuation, digits, contractions, newlines and a few non-ASCII words, so pre-tokens repeat as in
real text. One run, one process:

training   ``implementations.tokenization.train_bpe`` (incremental pair counts + a heap) against HF
           tokenizers' ``BpeTrainer`` (Rust, several threads) on the same documents, ByteLevel
           pre-tokenizer without a prefix space, the 256-byte initial alphabet, the same number of merges.
           tiktoken has no trainer (only ``tiktoken._educational``, a teaching recount), so it is not timed
           here; instead the spec's reference trainer (a recount per merge) is timed on a 100 kB slice against
           ours on the same slice, which is the point of incremental updates.
encoding   our ``Tokenizer.encode`` against tiktoken's ``Encoding`` built offline from our ranks and the
           GPT-2 pattern, and HF tokenizers' ``BPE`` built from our merges (through GPT-2's bytes-to-unicode
           table), one call on the whole text each (HF also as encode_batch over the documents, in
           parallel), with a check that all give the same ids. Throughput in MB/s of UTF-8 input, medians of --repeats.
Our numbers are pure Python; the ratios say how far a readable implementation is from the Rust ones.
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repository root

from timing import median_seconds  # noqa: E402 (benchmarks/timing.py)
from implementations.tokenization import Tokenizer, train_bpe  # noqa: E402
from spec.tokenization import GPT2_PATTERN, bytes_to_unicode, reference_train_bpe  # noqa: E402

SPECIAL = "<|endoftext|>"


def generated_documents(megabytes: float, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    syllables = [a + b for a in "bcdfghklmnprstvwz" for b in ["a", "e", "i", "o", "u", "ou", "ea", "ai"]]
    lexicon = ["".join(rng.choice(syllables) for _ in range(rng.choice([1, 1, 2, 2, 3, 4]))) for _ in range(5000)]
    lexicon += ["don't", "it's", "we'll", "they're", "über", "naïve", "日本語", "café", "2024", "3.14"]
    weights = [1.0 / (rank + 1) for rank in range(len(lexicon))]
    target, docs, size = int(megabytes * 1_000_000), [], 0
    while size < target:
        sentences = []
        for _ in range(rng.randint(3, 12)):
            words = rng.choices(lexicon, weights, k=rng.randint(4, 18))
            words[0] = words[0].capitalize()
            sentences.append(" ".join(words) + rng.choice([".", ".", ",", "!", "?", ":"]))
        doc = " ".join(sentences) + rng.choice(["\n", "\n\n", "  \n"])
        docs.append(doc)
        size += len(doc.encode("utf-8"))
    return docs

def hf_trained(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer as HF, models, pre_tokenizers, trainers

    tok = HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=0)
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def hf_encoder(vocab: dict[int, bytes], merges):
    from tokenizers import AddedToken, Tokenizer as HF, decoders, models, pre_tokenizers

    table = bytes_to_unicode()
    show = lambda token: "".join(table[b] for b in token)  # noqa: E731
    tok = HF(models.BPE({show(t): i for i, t in vocab.items()}, [(show(a), show(b)) for a, b in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(SPECIAL, special=True, normalized=False)])
    return tok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--megabytes", type=float, default=4.0)
    parser.add_argument("--merges", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="0.5 MB, 300 merges")
    args = parser.parse_args()
    if args.quick:
        args.megabytes, args.merges, args.repeats = 0.5, 300, 1

    import tiktoken
    import tokenizers

    docs = generated_documents(args.megabytes)
    text = SPECIAL.join(docs)
    megabytes = len(text.encode("utf-8")) / 1e6
    vocab_size = 256 + args.merges + 1
    print(f"python {platform.python_version()}, tokenizers {tokenizers.__version__}, tiktoken {tiktoken.__version__}; "
          f"{megabytes:.2f} MB of generated text in {len(docs)} documents, {args.merges} merges")

    print("\ntraining")
    start = time.perf_counter()
    vocab, merges = train_bpe(docs, vocab_size=vocab_size, special_tokens=[SPECIAL])
    ours = time.perf_counter() - start
    start = time.perf_counter()
    hf_trained(docs, vocab_size)
    hf = time.perf_counter() - start
    print(f"  ours (incremental, Python)   {ours:8.2f} s")
    print(f"  HF tokenizers (Rust)         {hf:8.2f} s   ours / HF = {ours / hf:.1f}x")
    cut, slice_merges = [], 0
    for doc in docs:  # a ~100 kB slice for the recounting reference
        cut.append(doc)
        slice_merges += len(doc)
        if slice_merges > 100_000:
            break
    small = min(args.merges, 300)
    start = time.perf_counter()
    ours_small = train_bpe(cut, vocab_size=256 + small)
    t_ours = time.perf_counter() - start
    start = time.perf_counter()
    ref_small = reference_train_bpe(cut, 256 + small)
    t_ref = time.perf_counter() - start
    print(f"  on a 100 kB slice, {small} merges: ours {t_ours:.2f} s, the spec's recount per merge {t_ref:.2f} s "
          f"(recount / ours = {t_ref / t_ours:.0f}x; same merges: {ours_small == ref_small})")
    print("  tiktoken: no trainer (tiktoken._educational is a teaching recount), not timed")

    print("\nencoding (the whole text, one call each)")
    ours_tok = Tokenizer(vocab, merges, [SPECIAL])
    enc = tiktoken.Encoding("bench", pat_str=GPT2_PATTERN,
                            mergeable_ranks={t: i for i, t in vocab.items() if i < 256 + len(merges)},
                            special_tokens={SPECIAL: 256 + len(merges)})
    hf_tok = hf_encoder(vocab, merges)
    special_id = 256 + len(merges)

    def hf_batch():  # documents in parallel, the special token between them: exact, since specials split first
        out = []
        for k, e in enumerate(hf_tok.encode_batch(docs, add_special_tokens=False)):
            out += ([special_id] if k else []) + e.ids
        return out

    ids_ours = Tokenizer(vocab, merges, [SPECIAL]).encode(text)  # a fresh cache: the first pass, timed below too
    ids_tiktoken = enc.encode(text, allowed_special="all")
    ids_hf = hf_tok.encode(text, add_special_tokens=False).ids
    same = ids_ours == ids_tiktoken == ids_hf == hf_batch()
    t_ours = median_seconds(lambda: Tokenizer(vocab, merges, [SPECIAL]).encode(text), args.repeats)
    t_ours_warm = median_seconds(lambda: ours_tok.encode(text), args.repeats)
    t_tiktoken = median_seconds(lambda: enc.encode(text, allowed_special="all"), args.repeats)
    t_hf = median_seconds(lambda: hf_tok.encode(text, add_special_tokens=False), args.repeats)
    t_hf_batch = median_seconds(hf_batch, args.repeats)
    print(f"  ours (cold word cache)       {megabytes / t_ours:8.2f} MB/s")
    print(f"  ours (warm word cache)       {megabytes / t_ours_warm:8.2f} MB/s")
    print(f"  tiktoken                     {megabytes / t_tiktoken:8.2f} MB/s   "
          f"tiktoken / ours = {t_ours / t_tiktoken:.1f}x (cold)")
    print(f"  HF tokenizers (one call)     {megabytes / t_hf:8.2f} MB/s   HF / ours = {t_ours / t_hf:.1f}x (cold)")
    print(f"  HF tokenizers (batch of docs){megabytes / t_hf_batch:8.2f} MB/s   "
          f"HF batch / ours = {t_ours / t_hf_batch:.1f}x (cold)")
    print(f"  {len(ids_ours)} ids ({len(text.encode()) / len(ids_ours):.2f} bytes per id); "
          f"all three give the same ids: {same}")


if __name__ == "__main__":
    main()
