"""dedup's holdout takes the share it is asked for, and exactly the documents holdout.py's
docstring names: a keyed 64-bit BLAKE2b of the text's SHA-256 (key: the seed) below `fraction`
of the 64-bit range. The draws are recomputed here with hashlib, not by `held_out`."""

from __future__ import annotations

import hashlib
from fractions import Fraction

import numpy as np
import pytest

from lmpipe.dataprep.dedup import dedup
from lmpipe.dataprep.holdout import as_digests, held_out
from tests.dataprep.test_dedup import kept_docs, prose, read_zst, write_jsonl


def drawn(digest: bytes, fraction: float, seed: int) -> bool:
    """The holdout rule written out: the seed as 8 little-endian bytes is the BLAKE2b key, the
    8-byte digest read little-endian is the draw, compared exactly with fraction * 2**64."""
    key = seed.to_bytes(8, "little", signed=True)
    draw = int.from_bytes(hashlib.blake2b(digest, digest_size=8, key=key).digest(), "little")
    return draw < Fraction(fraction) * 2**64


@pytest.mark.parametrize(
    ("fraction", "low", "high"),
    [
        # 100,000 draws: binomial std sqrt(p (1 - p) / n) = 0.00095 at 0.1 and 0.00013 at
        # SlimPajama's 0.0017; the bounds are 5 std, so a half (or double) share falls outside.
        (0.1, 0.095, 0.105),
        (0.0017, 0.00105, 0.00235),
    ],
)
def test_held_out_takes_the_asked_share(fraction, low, high):
    digests = as_digests(np.random.default_rng(0).bytes(32 * 100_000))
    share = held_out(digests, fraction, 42).mean()
    assert low < share < high


def test_held_out_draws_by_the_documented_keyed_hash():
    rng = np.random.default_rng(1)
    raw = [rng.bytes(32) for _ in range(2000)]
    for fraction, seed in [(0.1, 42), (0.5, 7), (0.5, -3)]:
        want = [drawn(d, fraction, seed) for d in raw]
        assert 0 < sum(want) < len(raw)
        assert held_out(as_digests(b"".join(raw)), fraction, seed).tolist() == want


def test_dedup_holds_out_the_documents_whose_text_draws_under_the_fraction(tmp_path):
    texts = [prose(k) for k in range(60)]
    write_jsonl(tmp_path / "in" / "d.jsonl", [{"text": t, "id": k} for k, t in enumerate(texts)])
    manifest = dedup([tmp_path / "in"], tmp_path / "out", holdout=0.3, progress=False)
    # ASCII prose: ftfy's fixed text is the text itself, so its SHA-256 is of the input
    want = {k for k, t in enumerate(texts) if drawn(hashlib.sha256(t.encode()).digest(), 0.3, 42)}
    held = [r for p in sorted((tmp_path / "out" / "_holdout").glob("*.jsonl.zst")) for r in read_zst(p)]  # fmt: skip
    assert {r["id"] for r in held} == want and 6 <= len(want) <= 30
    assert {r["id"] for r in kept_docs(tmp_path / "out")} == set(range(60)) - want
    assert manifest["counts"]["total"]["held_out"]["documents"] == len(want)
