"""The steps of `lmpipe dedup` as a map-reduce over a work folder, each resumable per unit.

Each step runs over units (an input file, a partition of the key space, a chunk of pairs). A unit
writes its files under `<work>/_work/<step>/` and then its marker `<unit>.done` (atomically, with
what the unit reports), so after a crash (kill -9 included) a rerun redoes exactly the units
without a marker. A unit's files depend only on its inputs, never on timing, worker count or
engine, so a resumed run, a `-j 8` run and a Ray run all give byte-identical output.

  scan    per input file: ftfy, normalise, short filter; the fixed records of the documents that
          are not short; per document its line, bytes, id (and source) and the SHA-256 of its
          fixed text; 128-bit keys of its normalised text (for the exact step) and of each LSH
          band, each file's keys sorted by their first 64 bits
  exact   per partition of the 64-bit key range: equal text keys -> (duplicate, first) pairs
  lsh     per partition: band keys of the documents that are not exact duplicates, grouped ->
          (document, first of its bucket) pairs, plus pairs with up to `window` earlier members,
          routed by a hash of the pair's later document into as many pair buckets as partitions
  pairs   per pair bucket: its pairs from every partition, made unique (a pair found in several
          bands was routed to the same bucket from each)
  sets    per input file (with verify): the distinct 64-bit shingle hashes of its documents that
          are in a pair, each document's written as it is made (8 bytes a character on disk)
  verify  per chunk of a pair bucket: each pair's exact n-gram Jaccard >= threshold
  decide  one unit: union-find over the documents that have a pair, the pairs streamed bucket by
          bucket; per input file its removed documents, why, and a reference to the document
          kept in their place
  then, over the documents kept: evals, eval_union, ngrams, holdout, filter (`dedup_kept.py`)

Memory: a scan holds one file's keys; an exact or lsh unit holds its partition (partitions are
sized after the scan to about `part_entries` keys each); a `pairs` unit holds one bucket of pairs;
a `sets` unit one document's set; a `verify` unit a chunk of pairs, two sets at a time (read from
the files, not mapped: the page cache holds them, not the process) and the row and offset tables
(two int64 per pair document) of the files it reads; `decide` holds the documents that have a pair
(a few int64 each) and a batch of pairs at a time. Documents are named by gid = file index << 32 |
position among the file's valid documents, so ordering by gid is input order, and "the first
document" of a group is its smallest gid. Band keys are 128-bit hashes of the band's values
(SlimPajama compared the values themselves): two different bands collide with probability
~2^-128.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from lmpipe.dataprep.clusters import (
    DECONTAMINATED,
    EXACT,
    KEPT,
    NEAR,
    SHORT,
    band_hashes,
    bucket_pairs,
    resolve,
)
from lmpipe.dataprep.dedup_settings import DedupSettings
from lmpipe.dataprep.documents import InvalidLines, field_value, read_documents
from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.folders import write_json_atomic
from lmpipe.dataprep.holdout import as_digests, text_digest
from lmpipe.dataprep.minhash import (
    LONG_TEXT_CHARS,
    distinct_shingles,
    fmix64,
    long_signature,
    normalise,
)

# Buckets every input document ends up in exactly one of, in manifest order: the first six are
# the decision codes of `clusters.py` (KEPT is the training output), then the invalid lines.
BUCKETS = (
    "kept", "short", "exact_duplicate", "near_duplicate", "decontaminated", "held_out", "invalid"
)  # fmt: skip
REASONS = {
    SHORT: "short", EXACT: "exact duplicate", NEAR: "near duplicate",
    DECONTAMINATED: "decontaminated",
}  # fmt: skip
HOLDOUT = "_holdout"  # the held-out documents' folder in the output (see `find_inputs`)
STATE = "_work"  # the steps' folder inside the stage's work folder; removed when the stage ends
# The files' layout in STATE: a work folder of another layout is started afresh, not resumed.
STATE_LAYOUT = 5
# Shingles hashed per signature batch: bounds the (num_perm, batch) temporaries of MinHasher.
_CHUNK_ROWS = 1 << 13
_KEY_DOCS = 1 << 12  # signatures per band-key batch: 2 MB at 128 permutations
# Pairs per verify unit: enough to amortise a task's start, few enough to spread over workers.
VERIFY_CHUNK = 1 << 16
_ROW_MASK = (1 << 32) - 1
SET_DTYPE = np.dtype("<u8")  # a shingle hash in the raw `sets/<file>.values` files

# --- markers and names ---------------------------------------------------------------------------


def marker(state: Path, step: str, unit: int | None = None) -> Path:
    return state / (f"{step}.done" if unit is None else f"{step}/{unit:05d}.done")


def read_marker(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def finish_unit(path: Path, info: dict[str, Any]) -> dict[str, Any]:
    # Written after every file of the unit is closed: a marker means the unit's files are whole.
    write_json_atomic(path, info)
    return info


def gids(f: int, rows: np.ndarray) -> np.ndarray:
    return (np.int64(f) << np.int64(32)) | rows.astype(np.int64)


def part_name(f: int) -> str:
    return f"part-{f:05d}.jsonl.zst"


class ZstdLines:
    """A `.zst` file of JSON lines that exists even when nothing is written to it."""

    def __init__(self, path: Path, level: int = 3):
        self._raw = open(path, "wb")
        compressor = zstandard.ZstdCompressor(level=level, write_checksum=True)  # as DocumentWriter
        self._sink = compressor.stream_writer(self._raw)
        self.lines = 0

    def write(self, record: dict[str, Any]) -> None:
        self.write_line(json.dumps(record, ensure_ascii=False).encode("utf-8"), b"\n")

    def write_line(self, line: bytes, end: bytes = b"") -> None:
        """One line; `end` is its newline when `line` lacks it (no copy of a long line to add it)."""
        self._sink.write(line)
        if end:
            self._sink.write(end)
        self.lines += 1

    def __enter__(self) -> ZstdLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sink.close()  # ends the frame and closes the file


def zstd_lines(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as raw:
        reader = zstandard.ZstdDecompressor().stream_reader(raw)
        yield from io.BufferedReader(reader)


# --- scan: one input file ------------------------------------------------------------------------


class _AllInvalid(InvalidLines):
    """InvalidLines that also keeps every bad line number, for the removal listing."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[int, str]] = []

    def add(self, line_no: int, reason: str) -> None:
        super().add(line_no, reason)
        self.lines.append((line_no, reason))


def _keys_sorted(keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(entries, 3) uint64 [k1, k2, row], sorted by k1, so a partition is one contiguous slice."""
    table = np.column_stack([keys.reshape(-1, 2), rows.astype(np.uint64)])
    return table[np.argsort(table[:, 0], kind="stable")]


def scan_file(state: Path, f: int, path: Path, settings: DedupSettings) -> dict[str, Any]:
    """Read input file `f`: fix each text as ftfy does (unless not `fix`), normalise, mark short
    (shorter than `min_chars`; 0 marks none), hash (no MinHash without the near-duplicate step);
    write the scan files. With `source_field`, each document's
    source is read from it: a record without a string there is an invalid line (an error under
    `strict`)."""
    hasher, fix = settings.hasher(), settings.fixer_fn()
    bands, rows = settings.bands_rows
    min_chars, ngram, strict = settings.min_chars, settings.ngram, settings.strict
    source_field = settings.source_field
    base = state / "scan" / f"{f:05d}"
    invalid = _AllInvalid()
    lines, nbytes, short, ids, sources = [], [], [], [], []
    digests: list[bytes] = []
    shas: list[bytes] = []
    key_parts: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    pending_rows = 0

    sig_parts: list[np.ndarray] = []

    def flush(last: bool = False, signature: np.ndarray | None = None) -> None:
        """Sign the pending documents (then append `signature`, a long text's, in its place)."""
        if hasher is None:
            return
        sig_parts.append(hasher.signatures(pending))
        pending.clear()
        if signature is not None:
            sig_parts.append(signature)
        # Keys by the thousand documents: whole-array passes, and memory bounded within a file.
        if last or sum(len(p) for p in sig_parts) >= _KEY_DOCS:
            key_parts.append(band_hashes(np.concatenate(sig_parts), bands, rows))
            sig_parts.clear()

    with ZstdLines(Path(f"{base}.fixed.jsonl.zst"), level=1) as fixed:
        for line_no, record in read_documents(path, strict, invalid):
            if source_field is not None:
                source = field_value(record, source_field)
                if not isinstance(source, str) or not source:
                    why = f"no string {source_field!r} field (--source-field)"
                    if strict:
                        raise LmpipeError(f"{path}:{line_no}: {why}")
                    invalid.add(line_no, why)
                    continue
                sources.append(source)
            lines.append(line_no)
            nbytes.append(len(record["text"].encode("utf-8")))
            ids.append(record.get("id"))
            if fix:  # (the original text is not kept beside the fixed one: it may be 40 MB)
                record["text"] = fix(record["text"])
            norm = normalise(record["text"])
            short.append(len(norm) < min_chars)
            if short[-1]:
                continue
            fixed.write(record)
            shas.append(text_digest(record["text"]))
            digests.append(hashlib.blake2b(norm.encode("utf-8"), digest_size=16).digest())
            if hasher is None:
                continue
            if len(norm) > LONG_TEXT_CHARS:  # signed piece by piece: memory of a piece
                flush(signature=long_signature(hasher, norm, ngram))
                pending_rows = 0
                continue
            pending.append(hasher.shingles(norm, ngram))
            pending_rows += len(pending[-1])
            if pending_rows >= _CHUNK_ROWS:
                flush()
                pending_rows = 0
    flush(last=True)
    short_a = np.array(short, dtype=bool)
    kept_rows = np.flatnonzero(~short_a)
    text_keys = np.frombuffer(b"".join(digests), dtype=np.uint64).reshape(-1, 2)
    np.save(f"{base}.text.npy", _keys_sorted(text_keys, kept_rows))
    if hasher is not None:
        band_keys = np.concatenate(key_parts)  # (not short, bands, 2)
        np.save(f"{base}.bands.npy", _keys_sorted(band_keys, np.repeat(kept_rows, bands)))
    np.save(f"{base}.sha.npy", as_digests(b"".join(shas)))
    np.savez(
        f"{base}.meta.npz",
        lines=np.array(lines, dtype=np.int64),
        nbytes=np.array(nbytes, dtype=np.int64),
        short=short_a,
    )
    with open(f"{base}.ids.json", "w", encoding="utf-8") as out:
        found = {"ids": ids, "invalid": invalid.lines, "sources": sources if source_field else None}
        json.dump(found, out, ensure_ascii=False)
    return finish_unit(
        marker(state, "scan", f),
        {
            "documents": len(lines),
            "not_short": len(kept_rows),
            "invalid": invalid.count,
            "invalid_examples": invalid.examples,
            "blank_lines": invalid.blank,
        },
    )


def load_meta(state: Path, f: int) -> dict[str, np.ndarray]:
    with np.load(state / "scan" / f"{f:05d}.meta.npz") as meta:
        return {k: meta[k] for k in meta.files}


def load_ids(state: Path, f: int) -> dict[str, Any]:
    return json.loads((state / "scan" / f"{f:05d}.ids.json").read_text(encoding="utf-8"))


# --- exact and lsh: one partition of the key range -------------------------------------------


def _partition(state: Path, kind: str, p: int, parts: int, files: list[int]) -> np.ndarray:
    """(entries, 3) [k1, k2, gid] of every listed file's `kind` keys with k1 in partition p."""
    lo, hi = (p << 64) // parts, ((p + 1) << 64) // parts
    found = []
    for f in files:
        table = np.load(state / "scan" / f"{f:05d}.{kind}.npy", mmap_mode="r")
        k1 = table[:, 0]
        a = int(np.searchsorted(k1, np.uint64(lo))) if p else 0
        b = int(np.searchsorted(k1, np.uint64(hi))) if p + 1 < parts else len(table)
        piece = np.array(table[a:b])
        piece[:, 2] = gids(f, piece[:, 2]).astype(np.uint64)
        found.append(piece)
    return np.concatenate(found) if found else np.empty((0, 3), dtype=np.uint64)


def exact_partition(state: Path, p: int, parts: int, files: list[int]) -> dict[str, Any]:
    """(duplicate, first) pairs of documents whose normalised texts are equal, in partition p."""
    keys = _partition(state, "text", p, parts, files)
    pairs = bucket_pairs(keys[:, 0], keys[:, 1], keys[:, 2].astype(np.int64))
    np.save(state / "exact" / f"{p:05d}.npy", pairs)
    return finish_unit(marker(state, "exact", p), {"pairs": len(pairs)})


def exact_pairs(state: Path) -> np.ndarray:
    found = [np.load(path) for path in sorted((state / "exact").glob("*.npy"))]
    return np.concatenate(found) if found else np.empty((0, 2), dtype=np.int64)


def lsh_partition(
    state: Path, p: int, parts: int, files: list[int], window: int, buckets: int
) -> dict[str, Any]:
    """Candidate pairs of the documents (not exact duplicates) whose band keys are in partition
    p, in one file ordered by pair bucket, with each bucket's offsets (so P partitions write P
    files, not P x buckets). Holds the exact duplicates' gids (one int64 each) to leave them
    out."""
    keys = _partition(state, "bands", p, parts, files)
    gid = keys[:, 2].astype(np.int64)
    keep = ~np.isin(gid, exact_pairs(state)[:, 0])
    pairs = bucket_pairs(keys[keep, 0], keys[keep, 1], gid[keep], window)
    # By the later document: the same pair from another band, in another partition, goes to
    # the same bucket, where `merge_bucket` makes it one.
    route = (fmix64(pairs[:, 0].astype(np.uint64)) % np.uint64(buckets)).astype(np.int64)
    order = np.argsort(route, kind="stable")
    np.save(state / "lsh" / f"{p:05d}.npy", pairs[order])
    offsets = np.searchsorted(route[order], np.arange(buckets + 1))
    np.save(state / "lsh" / f"{p:05d}.offsets.npy", offsets.astype(np.int64))
    return finish_unit(marker(state, "lsh", p), {"pairs": len(pairs)})


def pair_bucket(state: Path, q: int) -> Path:
    return state / "pairs" / f"{q:05d}.npy"


def merge_bucket(state: Path, q: int, parts: int) -> dict[str, Any]:
    """Pair bucket q's pairs from every partition, unique (a pair found in two bands is found
    twice); which input files its documents are in."""
    found = []
    for p in range(parts):  # its slice of each partition's file, read through a memory map
        at = np.load(state / "lsh" / f"{p:05d}.offsets.npy")
        found.append(np.load(state / "lsh" / f"{p:05d}.npy", mmap_mode="r")[at[q] : at[q + 1]])
    pairs = np.concatenate(found) if found else np.empty((0, 2), dtype=np.int64)
    pairs = np.unique(pairs, axis=0) if len(pairs) else pairs
    np.save(pair_bucket(state, q), pairs)
    files = np.unique(pairs.ravel() >> 32).tolist()
    return finish_unit(marker(state, "pairs", q), {"pairs": len(pairs), "files": files})


# --- verify: exact Jaccard of the candidate pairs ------------------------------------------------


def shingle_sets_file(state: Path, f: int, ngram: int, buckets: list[int]) -> dict[str, Any]:
    """The sorted distinct shingle hashes of file f's documents that are in a candidate pair,
    recomputed from the fixed records (one hash per shingle: cheap, and only for these), in
    `sets/<f>.values` (raw SET_DTYPE, each document's set after the last), with the documents'
    rows and their sets' offsets. `buckets`: the pair buckets that hold a document of file f."""
    mine = []
    for q in buckets:  # one bucket in memory at a time
        docs = np.load(pair_bucket(state, q)).ravel()
        mine.append(np.unique(docs[(docs >> 32) == f] & _ROW_MASK))
    wanted = np.unique(np.concatenate(mine)).tolist()
    meta = load_meta(state, f)
    found, offsets = [], [0]
    nxt = iter(wanted)
    want = next(nxt, None)
    rows = np.flatnonzero(~meta["short"]).tolist()
    fixed = zstd_lines(state / "scan" / f"{f:05d}.fixed.jsonl.zst")
    base = state / "sets" / f"{f:05d}"
    # Each set goes to disk as it is made: holding them all until the end (and then their
    # concatenation) took 16 bytes per character of the file's pair documents. A unit cut short
    # leaves a short file and no marker, so a rerun writes it again from the start.
    with open(f"{base}.values", "wb") as values:
        for row, line in zip(rows, fixed, strict=False):  # stops early once all are found
            if want is None:
                break
            if row == want:
                text = normalise(json.loads(line)["text"])
                shingles = distinct_shingles(text, ngram).astype(SET_DTYPE, copy=False)
                values.write(shingles.data)
                offsets.append(offsets[-1] + len(shingles))
                found.append(row)
                want = next(nxt, None)
    np.save(f"{base}.rows.npy", np.array(found, dtype=np.int64))
    np.save(f"{base}.offsets.npy", np.array(offsets, dtype=np.int64))
    return finish_unit(marker(state, "sets", f), {"documents": len(found)})


def verify_chunk(
    state: Path, q: int, start: int, stop: int, unit: int, threshold: float
) -> dict[str, Any]:
    """Whether each pair start..stop of pair bucket q (verify unit `unit`) reaches `threshold` in
    exact Jaccard (exact but for 64-bit hash collisions, ~2^-64), from the shingle sets."""
    pairs = np.load(pair_bucket(state, q), mmap_mode="r")[start:stop]
    opened: dict[int, tuple[np.ndarray, np.ndarray, io.BufferedReader]] = {}

    def shingles(g: int) -> np.ndarray:
        f, row = g >> 32, g & _ROW_MASK
        if f not in opened:
            base = state / "sets" / f"{f:05d}"
            values = files.enter_context(open(f"{base}.values", "rb"))
            opened[f] = (np.load(f"{base}.rows.npy"), np.load(f"{base}.offsets.npy"), values)
        rows, offsets, values = opened[f]
        k = int(np.searchsorted(rows, row))
        # Read, not memory-mapped: a map keeps every page it touched in the process's RSS, and
        # the pairs touch the sets of the whole corpus at random (8 bytes a character).
        found = np.empty(int(offsets[k + 1] - offsets[k]), dtype=SET_DTYPE)
        values.seek(int(offsets[k]) * SET_DTYPE.itemsize)
        if values.readinto(found.data) != found.nbytes:  # (a buffered readinto reads until full)
            raise LmpipeError(f"{values.name}: shorter than its offsets (a damaged work folder)")
        return found

    ok = np.empty(len(pairs), dtype=bool)
    with contextlib.ExitStack() as files:
        for k, (a, b) in enumerate(np.asarray(pairs).tolist()):
            x, y = shingles(a), shingles(b)
            inter = len(np.intersect1d(x, y, assume_unique=True))
            ok[k] = inter / (len(x) + len(y) - inter) >= threshold
    np.save(state / "verify" / f"{unit:05d}.npy", ok)
    return finish_unit(marker(state, "verify", unit), {"pairs": len(ok), "kept": int(ok.sum())})


# --- decide: the components, one unit ------------------------------------------------------------


def doc_ref(path: str, lines: np.ndarray, ids: list[Any], row: int) -> dict[str, Any]:
    ref: dict[str, Any] = {"file": path, "line": int(lines[row])}
    if ids[row] is not None:
        ref["id"] = ids[row]
    return ref


def verify_units(sizes: list[int]) -> list[tuple[int, int, int]]:
    """(pair bucket, first pair, end) of every verify unit, in unit order, for pair buckets of
    these sizes (decided here, in the driver, so workers never slice by their own constant)."""
    return [
        (q, a, min(a + VERIFY_CHUNK, n))
        for q, n in enumerate(sizes)
        for a in range(0, n, VERIFY_CHUNK)
    ]


def near_pairs(
    state: Path, sizes: list[int], units: list[tuple[int, int, int]], verify: bool
) -> Iterator[np.ndarray]:
    """Each pair bucket's pairs (those that passed `verify`, with it), one bucket at a time;
    `units`: the verify units (`verify_units`) that checked them."""
    checked: list[list[int]] = [[] for _ in sizes]  # the verify units of each bucket, in order
    for u, (q, _, _) in enumerate(units):
        checked[q].append(u)
    for q in range(len(sizes)):
        pairs = np.load(pair_bucket(state, q))
        if verify and len(pairs):
            ok = [np.load(state / "verify" / f"{u:05d}.npy") for u in checked[q]]
            pairs = pairs[np.concatenate(ok)]
        yield pairs


def decide_all(
    state: Path,
    names: list[str],
    settings: DedupSettings,
    sizes: list[int],
    units: list[tuple[int, int, int]],
) -> dict[str, Any]:
    """Union-find over the documents with a pair (`sizes`: the pairs of each bucket, `units`: the
    verify units that checked them); writes
    `decide/<file>.json` for each file with removed documents: their rows, reasons and the
    reference of the document kept instead."""
    verify = settings.verify
    exact = exact_pairs(state)  # one per exact duplicate: as many as nodes at most
    ends = [np.unique(exact)] + [np.unique(p) for p in near_pairs(state, sizes, units, verify)]
    nodes = np.unique(np.concatenate(ends))
    del ends
    files = nodes >> 32
    priority = None
    if settings.keep == "longest":
        priority = np.empty(len(nodes), dtype=np.int64)
        for f in np.unique(files).tolist():
            at = np.flatnonzero(files == f)
            priority[at] = load_meta(state, f)["nbytes"][nodes[at] & _ROW_MASK]
    near = (np.searchsorted(nodes, p) for p in near_pairs(state, sizes, units, verify))
    reason, root = resolve(len(nodes), near, np.searchsorted(nodes, exact), priority)
    gone = np.flatnonzero(reason != KEPT)
    keepers = nodes[root[gone]]
    refs: dict[int, dict[str, Any]] = {}
    for f in np.unique(keepers >> 32).tolist():
        lines, ids = load_meta(state, f)["lines"], load_ids(state, f)["ids"]
        for g in np.unique(keepers[(keepers >> 32) == f]).tolist():
            refs[g] = doc_ref(names[f], lines, ids, g & _ROW_MASK)
    for f in np.unique(files[gone]).tolist():
        mine = gone[files[gone] == f]
        listing = {
            "rows": (nodes[mine] & _ROW_MASK).tolist(),
            "reasons": reason[mine].tolist(),
            "duplicate_of": [refs[g] for g in nodes[root[mine]].tolist()],
        }
        write_json_atomic(state / "decide" / f"{f:05d}.json", listing)
    # Component sizes (a kept document and every document removed in its place), for the
    # manifest and clusters.png; JSON object keys are strings, so sizes are too.
    members, clusters = np.unique(np.unique(root, return_counts=True)[1], return_counts=True)
    cluster_sizes = {
        str(k): int(v) for k, v in zip(members.tolist(), clusters.tolist(), strict=True)
    }
    info = {"documents": len(nodes), "removed": len(gone), "cluster_sizes": cluster_sizes}
    return finish_unit(marker(state, "decide"), info)
