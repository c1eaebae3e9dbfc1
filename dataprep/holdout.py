"""Holdout and decontamination, SlimPajama's steps 8-9 (seeds-spec 5.1), for `lmpipe dedup`.

A document's text identity is the SHA-256 of its ftfy-fixed text in UTF-8 (`text_digest`), as in
SlimPajama's dedup_train.py. After dedup has decided, among the documents it kept:

  1. those whose digest is in an eval set (`--decontaminate`) are removed: "decontaminated";
  2. of the rest, `held_out` picks the holdout by a seeded hash of the digest, so the choice
     depends only on the text, the fraction and the seed, never on input order, workers or
     engine (SlimPajama shuffled with seed 42 and took the first 0.17%: the same in distribution);
  3. the rest whose digest equals a held-out document's are removed: "decontaminated". Dedup
     leaves no two kept documents with the same text, and equal texts are chosen alike, so this
     removes nothing today; it is SlimPajama's guarantee, checked rather than assumed.

Digest sets are sorted numpy arrays of 32-byte values (`DIGEST`): 32 bytes a document, and
membership is a sort-merge (`np.isin`), not a set of Python objects.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from lmpipe.dataprep.documents import InvalidLines, ending_at_break, field_value, read_records
from lmpipe.dataprep.errors import LmpipeError

DIGEST = np.dtype("V32")


def text_digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def as_digests(joined: bytes) -> np.ndarray:
    """Concatenated 32-byte digests as a `DIGEST` array."""
    return np.frombuffer(joined, dtype=DIGEST)


def digest_set(parts: Iterable[np.ndarray]) -> np.ndarray:
    """The sorted distinct digests of all `parts`."""
    found = [p for p in parts if len(p)]
    return np.unique(np.concatenate(found)) if found else np.empty(0, dtype=DIGEST)


def held_out(digests: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Which of `digests` go to the holdout: a keyed 64-bit BLAKE2b of each digest (read as a
    little-endian integer) below `fraction` of the 64-bit range. The key is the seed (8 bytes,
    little-endian, signed), so another seed draws another holdout."""
    if fraction <= 0.0 or len(digests) == 0:
        return np.zeros(len(digests), dtype=bool)
    key = seed.to_bytes(8, "little", signed=True)
    draws = np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(d.tobytes(), digest_size=8, key=key).digest(), "little")
            for d in digests
        ),
        dtype=np.uint64,
        count=len(digests),
    )
    # float -> int before the comparison: 2**64 * fraction does not fit a uint64 when fraction = 1
    return draws < np.uint64(min(int(fraction * 2.0**64), 2**64 - 1))


def read_field(
    path: Path, field: str, strict: bool, invalid: InvalidLines
) -> Iterator[tuple[int, str]]:
    """(line number, the string at `field`) of each line (or Parquet row) of an eval file;
    `field` may be dotted (`doc.question`). A line without it is an error under `strict`, else
    counted in `invalid`, and so is an empty file (one invalid line: a failed download must not
    turn decontamination off unnoticed). Data that breaks off (a truncated .zst / .gz) ends the
    file as it does a corpus file: an error under `strict`, else one invalid line, the lines
    before it kept."""
    seen = False
    for line_no, record, reason in ending_at_break(read_records(path), path, strict):
        if record is None and not reason:  # a blank line: counted apart
            invalid.blank += 1
            continue
        seen = True
        value = None
        if record is not None:
            value = field_value(record, field)
            if not isinstance(value, str):
                got = "missing" if value is None else f"a {type(value).__name__}"
                reason = f"field {field!r} is {got}, not a string (--decontaminate-field)"
        if reason:
            if strict:
                raise LmpipeError(f"{path}:{line_no}: eval data for --decontaminate: {reason}")
            invalid.add(line_no, reason)
            continue
        assert isinstance(value, str)
        yield line_no, value
    if not seen:
        if strict:
            raise LmpipeError(f"{path}: eval data for --decontaminate: empty file")
        invalid.add(1, "empty file")
