"""dedup's thresholds at their edges: the verification Jaccard, the short filter's length of the
normalised text, and which signature rows make an LSH band's key. Expected values are computed
here by hand (character 13-gram sets, lengths), never by the code under test."""

from __future__ import annotations

import random
from fractions import Fraction

import numpy as np
import pytest

from lmpipe.dataprep.clusters import KEPT, NEAR, band_hashes, decide
from lmpipe.dataprep.dedup import dedup
from tests.dataprep.test_dedup import kept_docs, removed_by_id, write_jsonl

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def letters(rng: random.Random, n: int) -> str:
    """`n` random lowercase letters: a text that normalising leaves as it is, whose 13-grams are
    all distinct (a repeat among a few hundred random 13-letter strings: ~1e-15)."""
    return "".join(rng.choice(LETTERS) for _ in range(n))


def grams(text: str) -> set[str]:
    return {text[i : i + 13] for i in range(len(text) - 12)}


def pair_at(rng: random.Random, shared: int, each: int) -> tuple[str, str, Fraction]:
    """Two texts of `each` + 12 letters with the first `shared` + 12 in common and then different
    letters, so `shared` 13-grams in common of `each` each: Jaccard shared / (2 each - shared),
    checked on the grams."""
    head, tail_a, tail_b = letters(rng, shared + 12), "a", "b"  # tails that differ at once
    a = head + tail_a + letters(rng, each - shared - 1)
    b = head + tail_b + letters(rng, each - shared - 1)
    j = Fraction(len(grams(a) & grams(b)), len(grams(a) | grams(b)))
    assert j == Fraction(shared, 2 * each - shared)
    return a, b, j


def test_verification_removes_pairs_at_or_above_the_threshold_and_keeps_those_below(
    tmp_path, monkeypatch
):
    # LSH forced to put every document in one bucket (and the window pairs every later document
    # with each earlier one): only the exact Jaccard against --threshold 0.8 decides.
    import lmpipe.dataprep.dedup_steps as steps

    def one_bucket(signatures, bands, rows):
        return np.zeros((len(signatures), bands, 2), dtype=np.uint64)

    monkeypatch.setattr(steps, "band_hashes", one_bucket)
    rng = random.Random(5)
    pairs = {
        "at": pair_at(rng, 320, 360),  # 320 / 400 = 0.8 exactly: ">=" removes it
        "above": pair_at(rng, 330, 365),  # 330 / 400 = 0.825
        "below": pair_at(rng, 312, 356),  # 312 / 400 = 0.78
    }
    assert [float(j) for _, _, j in pairs.values()] == [0.8, 0.825, 0.78]
    records = [{"text": t, "id": f"{name}-{k}"} for name, (*texts, _) in pairs.items() for k, t in enumerate(texts)]  # fmt: skip
    write_jsonl(tmp_path / "in" / "d.jsonl", records)
    manifest = dedup([tmp_path / "in"], tmp_path / "out", progress=False)
    assert manifest["settings"]["threshold"] == 0.8  # SlimPajama's default
    assert {r["id"] for r in kept_docs(tmp_path / "out")} == {"at-0", "above-0", "below-0", "below-1"}  # fmt: skip
    removed = removed_by_id(tmp_path / "out")
    assert {k: (r["reason"], r["duplicate_of"]["id"]) for k, r in removed.items()} == {
        "at-1": ("near duplicate", "at-0"),
        "above-1": ("near duplicate", "above-0"),
    }


def test_short_filter_measures_the_normalised_text(tmp_path):
    rng = random.Random(6)

    def words(n_words: int) -> list[str]:
        return [letters(rng, 4) for _ in range(n_words)]

    # normalised: 25 four-letter words and 24 spaces = 124 characters; raw: 250 with the
    # punctuation that normalising deletes
    padded = "".join(w + "!?.,;" + " " for w in words(25))
    # normalised: 40 words = 160 + 39 spaces = 199; raw: 39 more spaces and 5 at the edges = 243
    spaced = "\n\t " + "  ".join(w.upper() for w in words(40)) + " \n"
    # normalised: exactly 200 (a 200-letter word); raw 206 with quotes and a full stop
    exact = '"' + letters(rng, 200) + '." \n\n'
    assert (len(padded), len(spaced), len(exact)) == (250, 243, 206)
    write_jsonl(
        tmp_path / "in" / "d.jsonl",
        [{"text": padded, "id": "padded"}, {"text": spaced, "id": "spaced"}, {"text": exact, "id": "exact"}],
    )  # fmt: skip
    manifest = dedup([tmp_path / "in"], tmp_path / "out", progress=False)
    assert manifest["settings"]["min_chars"] == 200
    assert [r["id"] for r in kept_docs(tmp_path / "out")] == ["exact"]
    removed = removed_by_id(tmp_path / "out")
    assert {k: r["reason"] for k, r in removed.items()} == {"padded": "short", "spaced": "short"}


@pytest.mark.parametrize("rows", [3, 4])  # odd: the last uint64 word of a band is half padding
def test_a_band_key_depends_on_every_row_of_its_band_and_on_no_other(rows):
    bands = 3
    rng = np.random.default_rng(rows)
    base = rng.integers(0, 2**32, bands * rows + 2, dtype=np.uint32)  # 2 values past the bands
    variants = [base]
    for pos in range(len(base)):  # base with one value changed, at each position in turn
        v = base.copy()
        v[pos] ^= np.uint32(1 << 7)
        variants.append(v)
    sig = np.stack(variants)
    keys = band_hashes(sig, bands, rows)
    assert keys.shape == (len(sig), bands, 2)
    for b in range(bands):
        band = slice(b * rows, (b + 1) * rows)
        for i in range(len(sig)):
            same_values = np.array_equal(sig[i, band], base[band])
            assert np.array_equal(keys[i, b], keys[0, b]) == same_values, (b, i)
    # equal values in different bands give different keys (the band's index is in its key)
    twin = np.tile(base[:rows], bands)[None, :]
    twin_keys = band_hashes(twin, bands, rows)[0]
    assert len({tuple(k) for k in twin_keys.tolist()}) == bands


def test_without_verification_a_pair_that_differs_in_each_bands_last_row_is_no_candidate():
    # bands=2, rows=3. Doc 1 equals doc 0 but for the last value of each band: no band in
    # common, so no candidate. Doc 2 equals doc 0 in band 1 alone: one band in common, a pair.
    sig = np.array(
        [
            [10, 11, 12, 13, 14, 15],
            [10, 11, 99, 13, 14, 98],
            [70, 71, 72, 13, 14, 15],
        ],
        dtype=np.uint32,
    )
    short = np.zeros(3, dtype=bool)
    digests = np.arange(3 * 16, dtype=np.uint8).reshape(3, 16)
    reason, keeper = decide(short, digests, sig, bands=2, rows=3)
    assert reason.tolist() == [KEPT, KEPT, NEAR] and keeper.tolist() == [0, 1, 0]


def test_without_verification_the_groups_are_datasketchs_lsh_candidates():
    # datasketch's MinHashLSH (the library SlimPajama used) with the same bands and rows: two
    # documents are candidates when any band's values are equal. dedup's groups without
    # verification are the connected components of those candidate pairs.
    from datasketch import MinHash, MinHashLSH

    bands, rows, n = 4, 3, 40
    rng = np.random.default_rng(2)
    sig = rng.integers(0, 2**32, (n, bands * rows), dtype=np.uint32)
    for _ in range(25):  # copy one band of an earlier document, whole or but for one value
        i, j = sorted(rng.choice(n, 2, replace=False))
        start = int(rng.integers(bands)) * rows
        sig[j, start : start + rows] = sig[i, start : start + rows]
        if rng.random() < 0.5:
            sig[j, start + int(rng.integers(rows))] ^= np.uint32(1)

    def minhash(k: int) -> MinHash:
        return MinHash(bands * rows, hashvalues=sig[k].astype(np.uint64), scheme="legacy")

    lsh = MinHashLSH(num_perm=bands * rows, params=(bands, rows))
    for k in range(n):
        lsh.insert(k, minhash(k))
    group = list(range(n))  # union-find over datasketch's candidates, smallest member as root

    def root(k: int) -> int:
        while group[k] != k:
            k = group[k]
        return k

    for k in range(n):
        for other in lsh.query(minhash(k)):
            a, b = sorted((root(k), root(other)))
            group[b] = a
    want = [root(k) for k in range(n)]
    assert 3 <= len(set(want)) <= n - 5  # some groups, not one
    digests = np.arange(2 * n, dtype=np.uint64).view(np.uint8).reshape(n, 16)  # all distinct
    _, keeper = decide(np.zeros(n, dtype=bool), digests, sig, bands=bands, rows=rows)
    assert keeper.tolist() == want
