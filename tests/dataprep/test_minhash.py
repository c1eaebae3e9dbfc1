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


# --- long texts, a piece at a time ------------------------------------------------------------


def test_long_texts_normalise_to_the_same_string_piece_by_piece(monkeypatch):
    import lmpipe.dataprep.minhash as minhash

    rng = random.Random(3)
    gaps = [" ", "  ", "\n\n", "\t", "\u00a0", "\u2003 ", "\x1c"]  # \x1c: str.split() splits there
    pieces = ["ΟΔΟΣ", "Straße", "İstanbul", "word.", "(x)", "fine", "ΣΑΣ", "a,b"] + words(0, 20)
    texts = ["".join(rng.choice(pieces) + rng.choice(gaps) for _ in range(400)) for _ in range(5)]
    texts.append("x" * 300)  # no whitespace at all
    texts.append("  leading and trailing  ")
    want = [" ".join(minhash.normalised_words(t)) for t in texts]
    monkeypatch.setattr(minhash, "LONG_TEXT_CHARS", 17)  # every text is "long" now
    assert [minhash.normalise(t) for t in texts] == want


def test_long_text_signatures_and_sets_equal_the_whole_texts():
    from lmpipe.dataprep.minhash import distinct_shingles, long_signature, text_pieces

    text = normalise(" ".join(words(5, 2000)))
    pieces = list(text_pieces(text, 13, piece=1000))
    assert len(pieces) > 10 and all(len(p) >= 13 for p in pieces)
    assert {p[i : i + 13] for p in pieces for i in range(len(p) - 12)} == {
        text[i : i + 13] for i in range(len(text) - 12)
    }
    for scheme in ("oph", "legacy", "affine32"):
        hasher = make_hasher(scheme, 128)
        whole = hasher.signatures([hasher.shingles(text, 13)])
        assert np.array_equal(long_signature(hasher, text, 13, piece=1000), whole), scheme
    assert np.array_equal(
        distinct_shingles(text, 13, piece=1000), np.unique(fast_shingle_hashes(text, 13))
    )


def test_dedup_decides_the_same_when_every_text_is_long(tmp_path, monkeypatch):
    """The long-text path (pieces) through the whole stage: byte-identical output."""
    import json

    import lmpipe.dataprep.dedup_steps as steps
    import lmpipe.dataprep.minhash as minhash
    from lmpipe.dataprep.dedup import dedup

    base = [" ".join(words(seed, 300)) for seed in range(6)]
    near = [b.replace(b.split()[7], "changed", 1) for b in base[:3]]
    (tmp_path / "in").mkdir()
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(base + near)]
    (tmp_path / "in" / "a.jsonl").write_text("\n".join(lines) + "\n")
    dedup([tmp_path / "in"], tmp_path / "short", progress=False)
    monkeypatch.setattr(minhash, "LONG_TEXT_CHARS", 200)
    monkeypatch.setattr(steps, "LONG_TEXT_CHARS", 200)
    m = dedup([tmp_path / "in"], tmp_path / "long", progress=False)
    assert m["counts"]["total"]["near_duplicate"]["documents"] == 3
    for name in ("part-00000.jsonl.zst", "removed.ndjson.zst"):
        assert (tmp_path / "short" / name).read_bytes() == (tmp_path / "long" / name).read_bytes()
