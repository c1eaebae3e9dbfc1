"""One-permutation MinHash: an unbiased Jaccard estimate, deterministic, no empty bins."""

from __future__ import annotations

import random

import numpy as np

from lmpipe.dataprep.minhash import OnePermHasher, fast_shingle_hashes, make_hasher, normalise


def words(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice("alpha beta gamma delta epsilon zeta eta theta iota kappa".split()) + str(rng.randint(0, 99)) for _ in range(n)]  # fmt: skip


def jaccard(a: str, b: str) -> float:
    x, y = set(fast_shingle_hashes(a, 13).tolist()), set(fast_shingle_hashes(b, 13).tolist())
    return len(x & y) / len(x | y)


def test_fast_shingles_are_the_distinct_ngrams():
    text = normalise("The quick brown fox jumps over the lazy dog; the quick brown fox again.")
    grams = {text[i : i + 13] for i in range(len(text) - 12)}
    assert len(np.unique(fast_shingle_hashes(text, 13))) == len(grams)
    assert len(fast_shingle_hashes("short", 13)) == 1  # shorter than n: one shingle
    assert fast_shingle_hashes("ab" * 20, 13)[0] != fast_shingle_hashes("ba" * 20, 13)[0]


def test_equal_bins_estimate_the_jaccard():
    hasher = OnePermHasher(128, seed=1)
    errors = []
    for seed in range(30):
        base = words(seed, 300)
        other = list(base)
        rng = random.Random(seed)
        for i in rng.sample(range(300), rng.randint(5, 80)):
            other[i] = "zz" + other[i]
        a, b = " ".join(base), " ".join(other)
        sig = hasher.signatures([fast_shingle_hashes(a, 13), fast_shingle_hashes(b, 13)])
        errors.append(float((sig[0] == sig[1]).mean()) - jaccard(a, b))
    assert abs(np.mean(errors)) < 0.03  # unbiased
    assert np.std(errors) < 0.07  # about sqrt(J(1-J)/128) for k-permutation MinHash


def test_densified_short_documents_have_no_empty_bins_and_are_deterministic():
    texts = ["a short text of forty characters or so..", " ".join(words(1, 500))]
    hashes = [fast_shingle_hashes(t, 13) for t in texts]
    sig = make_hasher("oph", 128).signatures(hashes)
    assert (sig != np.iinfo(np.uint32).max).all()  # 28 shingles, 128 bins: all filled
    assert np.array_equal(sig, OnePermHasher(128, seed=1).signatures(hashes[::-1])[::-1])
    assert not np.array_equal(sig, OnePermHasher(128, seed=2).signatures(hashes))
