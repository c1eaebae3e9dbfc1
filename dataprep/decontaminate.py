"""N-gram decontamination for `lmpipe dedup --decontaminate FILES --decontaminate-ngrams N`.

SlimPajama removed a training document only when its exact text was an eval text (`holdout.py`).
A benchmark question quoted inside a longer web page passes that test, so this one also removes
every kept document that shares any sequence of N words with an eval text: the overlap test of
GPT-3's contamination study (Brown et al. 2020), which used N = 13.

Words are those of SlimPajama's normalised text (`minhash.normalise`: lowercase, ASCII punctuation
deleted, whitespace runs collapsed), so a change of case or punctuation does not hide an overlap.
An N-gram is a 64-bit hash: each word is hashed once (blake2b, the same in every process, so any
worker or engine decides alike); the N word hashes are summed, each times its own odd multiplier
(so order matters), and the sum goes through MurmurHash3's finaliser. Two different N-grams differ
in some word, whose pseudo-random hash makes the sums differ but with probability ~2^-64: with
10^7 eval N-grams and 10^11 training N-grams the expected number of false matches is ~0.05. (One
sum and one finaliser cost a fifth of mixing after every word, measured on real text.)

An eval text of fewer than N words has no N-gram; it is still matched by its exact text, and the
manifest counts such texts (`short_for_ngrams`) so a user sees how much of an eval set the N-gram
test covers. The eval N-grams are held in memory as one sorted uint64 array (8 bytes each: the
whole lm-eval zero-shot suite is a few million), and a training document is looked up with a
binary search per N-gram, so the cost is one pass over the kept documents' words.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from lmpipe.dataprep.folders import write_json_atomic
from lmpipe.dataprep.minhash import fmix64, normalised_words

NGRAMS = "ngrams"  # the step's folder: per input file, the documents that overlap an eval text
EVAL_NGRAMS = "eval_ngrams"  # per eval file, its sorted distinct N-gram hashes
_WORD_CACHE_LIMIT = 1 << 20  # words kept hashed per process (~100 MB at most); then start over
_word_cache: dict[str, int] = {}


def _word_hash(word: str) -> int:
    h = int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")
    if len(_word_cache) >= _WORD_CACHE_LIMIT:
        _word_cache.clear()
    _word_cache[word] = h
    return h


words_of = normalised_words
# One odd multiplier per position in the N-gram (N up to 64), fixed: the hashes must not depend
# on the process.
_POSITION = np.random.default_rng(13).integers(0, 1 << 63, 64, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # fmt: skip


def ngram_hashes(words: list[str], n: int) -> np.ndarray:
    """The hash of every run of `n` consecutive words (with repeats), in order; empty when there
    are fewer than `n` words."""
    count = len(words) - n + 1
    if count < 1:
        return np.empty(0, dtype=np.uint64)
    # Natural text repeats its words (Zipf), so most lookups hit the cache.
    cache = _word_cache
    w = np.fromiter(
        (cache[x] if x in cache else _word_hash(x) for x in words), np.uint64, len(words)
    )
    h = w[:count] * _POSITION[0]
    for k in range(1, n):
        h += w[k : k + count] * _POSITION[k]
    return fmix64(h)


def eval_ngram_set(texts: Iterable[str], n: int) -> tuple[np.ndarray, int]:
    """The sorted distinct N-gram hashes of `texts`, and how many texts have fewer than n words."""
    parts, short = [], 0
    for text in texts:
        h = ngram_hashes(words_of(text), n)
        short += not len(h)
        parts.append(np.unique(h))
    found = np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.uint64)
    return found, short


def contains_any(sorted_set: np.ndarray, values: np.ndarray) -> np.ndarray:
    """For each value, whether it is in `sorted_set` (binary search: no sort of the big set)."""
    if not len(sorted_set):
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[at] == values


def match_documents(
    texts: Iterable[tuple[int, str]], n: int, eval_sets: list[tuple[str, np.ndarray]]
) -> dict[int, str]:
    """For each (row, text) that shares an N-gram with an eval file, why: the first shared word
    sequence and the eval file it comes from. `eval_sets`: (eval file name, its N-gram set)."""
    union = np.unique(np.concatenate([s for _, s in eval_sets])) if eval_sets else None
    found: dict[int, str] = {}
    if union is None or not len(union):
        return found
    for row, text in texts:
        words = words_of(text)
        hit = np.flatnonzero(contains_any(union, h := ngram_hashes(words, n)))
        if not len(hit):
            continue
        first = int(hit[0])
        source = next(name for name, s in eval_sets if contains_any(s, h[first : first + 1])[0])
        quoted = " ".join(words[first : first + n])
        found[row] = f"shares the {n}-word sequence {quoted!r} with {source}"
    return found


def write_eval_ngrams(folder: Path, e: int, texts: Iterable[str], n: int) -> dict[str, Any]:
    """Save eval file e's N-gram set; what the manifest reports of it."""
    found, short = eval_ngram_set(texts, n)
    np.save(folder / f"{e:05d}.npy", found)
    return {"ngrams": len(found), "short_for_ngrams": short}


def load_eval_ngrams(folder: Path, names: list[str]) -> list[tuple[str, np.ndarray]]:
    return [(name, np.load(folder / f"{e:05d}.npy")) for e, name in enumerate(names)]


def write_matches(path: Path, found: dict[int, str]) -> None:
    write_json_atomic(path, {"rows": list(found), "details": list(found.values())})
