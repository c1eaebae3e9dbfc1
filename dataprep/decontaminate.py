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
_POSITION = 2 * np.random.default_rng(13).integers(0, 1 << 63, 64, dtype=np.uint64) + 1


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


class NgramSet:
    """The distinct N-grams of texts added one at a time, and how many texts had fewer than n
    words. Kept as sorted arrays, merged every few thousand texts, so memory is 8 bytes an
    N-gram rather than a Python object each."""

    _MERGE_EVERY = 4096

    def __init__(self, n: int):
        self.n, self.short = n, 0
        self._parts: list[np.ndarray] = []

    def add(self, text: str) -> None:
        h = ngram_hashes(words_of(text), self.n)
        self.short += not len(h)
        self._parts.append(np.unique(h))
        if len(self._parts) >= self._MERGE_EVERY:
            self._parts = [self.array()]

    def array(self) -> np.ndarray:
        if not self._parts:
            return np.empty(0, dtype=np.uint64)
        return np.unique(np.concatenate(self._parts))


def contains_any(sorted_set: np.ndarray, values: np.ndarray) -> np.ndarray:
    """For each value, whether it is in `sorted_set` (binary search: no sort of the big set)."""
    if not len(sorted_set):
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[at] == values


def match_documents(
    texts: Iterable[tuple[int, str]], n: int, union: np.ndarray, eval_sets: list[tuple[str, Path]]
) -> dict[int, str]:
    """For each (row, text) that shares an N-gram with eval data, why: the first shared word
    sequence and the eval file it comes from. `union`: every eval file's N-grams, sorted;
    `eval_sets`: (eval file name, its N-gram set's .npy), read only to name the file of a match."""
    found: dict[int, str] = {}
    if not len(union):
        return found
    loaded: dict[str, np.ndarray] = {}  # eval sets read once, at the first match that needs them

    def holds(name: str, path: Path, value: np.ndarray) -> bool:
        if name not in loaded:
            loaded[name] = np.load(path)
        return bool(contains_any(loaded[name], value)[0])

    for row, text in texts:
        words = words_of(text)
        hit = np.flatnonzero(contains_any(union, h := ngram_hashes(words, n)))
        if not len(hit):
            continue
        first = int(hit[0])
        source = next(name for name, path in eval_sets if holds(name, path, h[first : first + 1]))
        quoted = " ".join(words[first : first + n])
        found[row] = f"shares the {n}-word sequence {quoted!r} with {source}"
    return found


def eval_set_path(folder: Path, e: int) -> Path:
    return folder / f"{e:05d}.npy"


def union_path(folder: Path) -> Path:
    return folder / "union.npy"


def write_union(folder: Path, count: int) -> int:
    """Every eval file's N-grams in one sorted array, made once for all input files; its size."""
    union = np.unique(np.concatenate([np.load(eval_set_path(folder, e)) for e in range(count)]))
    np.save(union_path(folder), union)
    return len(union)


def write_matches(path: Path, found: dict[int, str]) -> None:
    write_json_atomic(path, {"rows": list(found), "details": list(found.values())})
