"""dedup: SlimPajama's cleaning and MinHash-LSH deduplication (seeds-spec section 5).

`dedup(inputs, out)` reads `.jsonl` / `.jsonl.zst` documents and, across all sources at once:
fixes each text with ftfy (NFC) -> drops it when its normalised form (lowercase, no ASCII
punctuation, whitespace runs collapsed) is shorter than `min_chars` -> drops exact duplicates of
the normalised text -> drops near duplicates: MinHash over character n-grams (datasketch-identical
sha1 signatures), LSH banding at the Jaccard threshold, connected components of the candidate
pairs; the first document of each group in input order is kept. Kept records are unchanged but
for the fixed `text`. `out` gets `part-*.jsonl.zst`, `removed.ndjson.zst` (every removed document,
why, and the kept document it duplicates) and `manifest.json` with per-source document and byte
counts (input = kept + short + exact + near duplicate + invalid), written last.

The steps are separate functions so that a map-reduce can replace the middle later:
`scan_file` (map, per input file) -> `band_keys` -> `candidate_pairs` -> `union_find` ->
`decide` -> the filter pass (map, per input file).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import string
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from lmpipe.dataprep.documents import DocumentWriter, InvalidLines, find_inputs, read_documents
from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.folders import sha256_file, staged_output, write_manifest

# Buckets every input document ends up in exactly one of, in manifest order.
BUCKETS = ("kept", "short", "exact_duplicate", "near_duplicate", "invalid")
KEPT, SHORT, EXACT, NEAR = 0, 1, 2, 3
REASONS = {SHORT: "short", EXACT: "exact duplicate", NEAR: "near duplicate"}

_PUNCTUATION = str.maketrans("", "", string.punctuation)

# datasketch's constants (minhash.py): the legacy scheme permutes within the Mersenne prime 2^61-1
# and keeps the low 32 bits.
MERSENNE_PRIME = np.uint64((1 << 61) - 1)
MAX_HASH = np.uint64((1 << 32) - 1)
SCHEMES = ("legacy", "affine32")
# Shingles permuted at once: 8192 x 128 x 8 bytes = 8 MiB per temporary, cache-friendly enough.
_CHUNK_ROWS = 1 << 13


def normalise(text: str) -> str:
    """SlimPajama's clean(): lowercase, delete ASCII punctuation, one space per whitespace run."""
    # str.split() splits on exactly the characters re's \s matches in a str pattern (both use
    # Py_UNICODE_ISSPACE), and drops the ends, so this equals re.sub(r"\s+", " ", t).strip().
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """datasketch's sha1_hash32 of each distinct character n-gram of `text` (UTF-8), as uint32.

    A text shorter than `ngram` has no n-grams; SlimPajama's code gave it an empty (all-max)
    signature, which would make every such text a duplicate of every other. We use the whole string
    as its one shingle instead. With the default `min_chars` (200 > 13) this never happens.
    """
    if len(text) < ngram:
        grams: Iterable[str] = (text,)
    else:
        # A set: min over permutations is the same for repeated shingles, and hashing is the cost.
        grams = {text[i : i + ngram] for i in range(len(text) - ngram + 1)}
    sha1 = hashlib.sha1
    digests = b"".join([sha1(g.encode("utf-8")).digest() for g in grams])
    # sha1_hash32 = struct.unpack("<I", digest[:4]): the first little-endian word of each digest.
    return np.frombuffer(digests, dtype="<u4").reshape(-1, 5)[:, 0].copy()


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, datasketch 2.0's pre-mix for its affine32 scheme."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


class MinHasher:
    """Vectorised MinHash, value for value equal to `datasketch.MinHash(num_perm, seed, scheme=..)`.

    `scheme="legacy"` is the only scheme of datasketch < 2.0 (SlimPajama pinned 1.5.9), so its
    signatures reproduce SlimPajama's decisions; "affine32" is datasketch 2.0's default.
    """

    def __init__(self, num_perm: int = 128, seed: int = 1, scheme: str = "legacy"):
        if scheme not in SCHEMES:
            raise LmpipeError(f"hash scheme must be one of {', '.join(SCHEMES)}, not {scheme!r}")
        self.num_perm, self.seed, self.scheme = num_perm, seed, scheme
        # Same generator, same draw order as datasketch's MinHash._init_permutations.
        gen = np.random.RandomState(seed)
        if scheme == "legacy":
            pairs = [
                (
                    gen.randint(1, MERSENNE_PRIME, dtype=np.uint64),
                    gen.randint(0, MERSENNE_PRIME, dtype=np.uint64),
                )
                for _ in range(num_perm)
            ]
            self.a, self.b = np.array(pairs, dtype=np.uint64).T.copy()
        else:
            self.a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(
                1
            )
            self.b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)

    def _permute(self, hv: np.ndarray) -> np.ndarray:
        """(shingles,) sha1_hash32 values -> (num_perm, shingles) permuted values as uint32.

        Permutations along the first axis, so the per-document minimum runs over contiguous rows;
        the arithmetic is in place because the temporaries, not the multiplies, cost the time."""
        if self.scheme == "affine32":
            x = _fmix32(hv.astype(np.uint32))[None, :] * self.a[:, None]
            x += self.b[:, None]  # wraps modulo 2^32, as datasketch's uint32 arithmetic does
            return x
        # a * h overflows 64 bits; datasketch computes it in numpy uint64, which wraps modulo 2^64
        # before the % prime. We do the same arithmetic, so the values agree bit for bit.
        x = self.a[:, None] * hv.astype(np.uint64)[None, :]
        x += self.b[:, None]
        # x % (2^61 - 1) without a division: x = hi * 2^61 + lo == hi + lo (mod 2^61 - 1), and
        # hi + lo < 2 * (2^61 - 1), so one conditional subtraction finishes it.
        y = x & MERSENNE_PRIME
        x >>= np.uint64(61)
        y += x
        np.subtract(y, MERSENNE_PRIME, out=y, where=y >= MERSENNE_PRIME)
        y &= MAX_HASH
        return y.astype(np.uint32)

    def signatures(self, hashes: Sequence[np.ndarray]) -> np.ndarray:
        """One signature row (uint32, num_perm) per document, from each one's shingle hashes."""
        out = np.full((len(hashes), self.num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
        if not hashes:
            return out
        lengths = np.array([len(h) for h in hashes])
        doc = np.repeat(np.arange(len(hashes)), lengths)
        hv = np.concatenate(hashes)
        # Chunks of shingles bound memory for any document size; a document cut by a chunk
        # boundary gets the minimum of its parts.
        for start in range(0, len(hv), _CHUNK_ROWS):
            phv = self._permute(hv[start : start + _CHUNK_ROWS])
            seg = doc[start : start + _CHUNK_ROWS]
            firsts = np.flatnonzero(np.r_[True, seg[1:] != seg[:-1]])
            rows = seg[firsts]
            out[rows] = np.minimum(out[rows], np.minimum.reduceat(phv, firsts, axis=1).T)
        return out


def optimal_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) minimising false positive + false negative area, as datasketch's
    `_optimal_param(threshold, num_perm, 0.5, 0.5)` chooses: 0.8 and 128 give (9, 13)."""
    # P(candidate | J=s) = 1 - (1 - s^r)^b is a polynomial of degree b*r <= num_perm, so
    # Gauss-Legendre with more than num_perm/2 nodes integrates it exactly (datasketch: scipy quad).
    x, w = np.polynomial.legendre.leggauss(num_perm // 2 + 2)
    s_lo, w_lo = threshold / 2 * (x + 1), w * threshold / 2
    s_hi, w_hi = threshold + (1 - threshold) / 2 * (x + 1), w * (1 - threshold) / 2
    best, opt = float("inf"), (0, 0)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = float(np.dot(w_lo, 1 - (1 - s_lo**r) ** b))
            fn = float(np.dot(w_hi, (1 - s_hi**r) ** b))
            if 0.5 * fp + 0.5 * fn < best:
                best, opt = 0.5 * fp + 0.5 * fn, (b, r)
    return opt


# --- map: one input file -> its documents' facts and signatures -------------------------------


class _AllInvalid(InvalidLines):
    """InvalidLines that also keeps every bad line number, for the removal listing."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[int, str]] = []

    def add(self, line_no: int, reason: str) -> None:
        super().add(line_no, reason)
        self.lines.append((line_no, reason))


@dataclass
class FileScan:
    """What the map step learns about one input file. Arrays have one entry per valid document,
    except `digests` and `signatures`, which have one row per document that is not short."""

    path: Path
    source: str
    fixed: Path  # the fixed records of the documents that are not short, in order (temporary)
    lines: np.ndarray  # int64 line numbers
    nbytes: np.ndarray  # int64 UTF-8 bytes of the input `text`
    short: np.ndarray  # bool
    ids: list[Any]  # the `id` field, or None
    digests: np.ndarray  # (not short, 16) uint8: blake2b of the normalised text
    signatures: np.ndarray  # (not short, num_perm) uint32
    invalid: _AllInvalid = field(default_factory=_AllInvalid)


def scan_file(
    path: Path,
    source: str,
    fixed: Path,
    hasher: MinHasher,
    *,
    min_chars: int = 200,
    ngram: int = 13,
    strict: bool = True,
    on_document: Callable[[], None] | None = None,
) -> FileScan:
    """Read one file: ftfy each text, normalise, mark short, hash; write fixed records to `fixed`."""
    import ftfy  # imported here: the CLI keeps heavy imports out of `lmpipe --help`

    invalid = _AllInvalid()
    lines, nbytes, short, ids = [], [], [], []
    digests: list[bytes] = []
    sig_parts: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    pending_rows = 0
    with open(fixed, "wb") as raw, zstandard.ZstdCompressor(level=1).stream_writer(raw) as sink:
        for line_no, record in read_documents(path, strict, invalid):
            text = record["text"]
            lines.append(line_no)
            nbytes.append(len(text.encode("utf-8")))
            ids.append(record.get("id"))
            record["text"] = ftfy.fix_text(text, normalization="NFC")
            norm = normalise(record["text"])
            short.append(len(norm) < min_chars)
            if on_document is not None:
                on_document()
            if short[-1]:
                continue
            sink.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
            digests.append(hashlib.blake2b(norm.encode("utf-8"), digest_size=16).digest())
            pending.append(shingle_hashes(norm, ngram))
            pending_rows += len(pending[-1])
            if pending_rows >= _CHUNK_ROWS:
                sig_parts.append(hasher.signatures(pending))
                pending, pending_rows = [], 0
    sig_parts.append(hasher.signatures(pending))
    return FileScan(
        path=path,
        source=source,
        fixed=fixed,
        lines=np.array(lines, dtype=np.int64),
        nbytes=np.array(nbytes, dtype=np.int64),
        short=np.array(short, dtype=bool),
        ids=ids,
        digests=np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(-1, 16),
        signatures=np.concatenate(sig_parts),
        invalid=invalid,
    )


# --- reduce: band keys -> candidate pairs -> components -> decisions ---------------------------


def _rows_as_keys(matrix: np.ndarray) -> np.ndarray:
    """Each row of a 2-D array as one opaque, comparable value (numpy void)."""
    matrix = np.ascontiguousarray(matrix)
    return matrix.view(np.dtype((np.void, matrix.shape[1] * matrix.itemsize))).ravel()


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> list[np.ndarray]:
    """Per band, each document's key: its `rows` signature values in that band, compared whole
    (datasketch keys a band by the bytes of its values; no hash of them, so no extra collisions)."""
    return [_rows_as_keys(signatures[:, i * rows : (i + 1) * rows]) for i in range(bands)]


def first_of_equal(keys: np.ndarray) -> np.ndarray:
    """For each position, the first position holding an equal key."""
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    return first[inverse.ravel()]


def candidate_pairs(keys_per_band: Iterable[np.ndarray]) -> np.ndarray:
    """(pairs, 2) of (document, first document with the same key in some band), like SlimPajama's
    generate_duplicate_pairs.py; documents are positions in the key arrays."""
    found = []
    for keys in keys_per_band:
        first = first_of_equal(keys)
        doc = np.flatnonzero(first != np.arange(len(keys)))
        found.append(np.stack([doc, first[doc]], axis=1))
    pairs = np.concatenate(found) if found else np.empty((0, 2), dtype=np.int64)
    return np.unique(pairs, axis=0) if len(pairs) else pairs.astype(np.int64)


def union_find(n: int, pairs: np.ndarray) -> np.ndarray:
    """The smallest member of each document's connected component (the partition union-find over
    the pairs gives), for documents 0..n-1.

    Vectorised as hooking + pointer jumping: every label points to a smaller (or equal) member of
    the same component; each round hooks the root of the larger side of every unsatisfied pair onto
    the smaller root, then flattens. At the fixed point the component's minimum is its own label.
    """
    labels = np.arange(n, dtype=np.int64)
    if len(pairs) == 0:
        return labels
    u, v = pairs[:, 0], pairs[:, 1]
    while True:
        lu, lv = labels[u], labels[v]
        open_ = lu != lv
        if not open_.any():
            return labels
        lo = np.minimum(lu[open_], lv[open_])
        np.minimum.at(labels, lu[open_], lo)
        np.minimum.at(labels, lv[open_], lo)
        while True:  # pointer jumping until every label is a root
            jumped = labels[labels]
            if np.array_equal(jumped, labels):
                break
            labels = jumped


def decide(
    short: np.ndarray,
    digests: np.ndarray,
    signatures: np.ndarray,
    bands: int,
    rows: int,
    exact: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Per document (input order): its bucket (KEPT, SHORT, EXACT, NEAR) and the document kept in
    its place (itself when kept, -1 when short). `digests` and `signatures` hold the documents that
    are not short, in order."""
    n = len(short)
    reason = np.full(n, SHORT, dtype=np.int8)
    keeper = np.full(n, -1, dtype=np.int64)
    cand = np.flatnonzero(~short)
    if len(cand) == 0:
        return reason, keeper
    # Exact duplicates of the normalised text first: they would collide in every band anyway, and
    # leaving them out of LSH keeps the pair lists small. The kept set equals LSH alone: the first
    # of an exact group is also the first of the component that contains it.
    first = first_of_equal(_rows_as_keys(digests)) if exact else np.arange(len(cand))
    is_exact = first != np.arange(len(cand))
    reps = np.flatnonzero(~is_exact)
    lsh = candidate_pairs(band_keys(signatures[reps], bands, rows))
    pairs = np.concatenate(
        [reps[lsh], np.stack([np.flatnonzero(is_exact), first[is_exact]], axis=1)]
    )
    root = union_find(len(cand), pairs)
    reason[cand] = np.where(root == np.arange(len(cand)), KEPT, np.where(is_exact, EXACT, NEAR))
    keeper[cand] = cand[root]
    return reason, keeper


# --- the stage -----------------------------------------------------------------------------------


def source_of(path: Path, inputs: Sequence[Path]) -> str:
    """The folder a file sits in; for a folder input, the first folder below it if nested."""
    for given in inputs:
        if given.is_dir():
            try:
                rel = path.relative_to(given)
            except ValueError:
                continue
            return rel.parts[0] if len(rel.parts) > 1 else given.resolve().name
    return path.resolve().parent.name


# Not `.jsonl.zst`: the output folder is the next stage's input, and `find_inputs` takes every
# `.jsonl.zst` in it as documents; the listing's records have no `text`.
REMOVED = "removed.ndjson.zst"


class _ZstdLines:
    """A `.jsonl.zst` file of JSON lines that exists even when nothing is written to it."""

    def __init__(self, path: Path, level: int = 3):
        self._raw = open(path, "wb")
        self._sink = zstandard.ZstdCompressor(level=level).stream_writer(self._raw)
        self.lines = 0

    def write(self, record: dict[str, Any]) -> None:
        self._sink.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self.lines += 1

    def __enter__(self) -> _ZstdLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sink.close()  # ends the frame and closes the file


def _empty_counts() -> dict[str, dict[str, int]]:
    return {b: {"documents": 0, "bytes": 0} for b in ("input", *BUCKETS)}


def count_file(c: dict[str, dict[str, int]], scan: FileScan, reason: np.ndarray) -> None:
    """Add one file's documents to its source's counts. Bytes are those of the input `text`;
    an invalid line has no text, so it counts as a document of 0 bytes."""
    c["input"]["documents"] += len(reason) + scan.invalid.count
    c["input"]["bytes"] += int(scan.nbytes.sum())
    c["invalid"]["documents"] += scan.invalid.count
    for code, bucket in enumerate(BUCKETS[:4]):
        c[bucket]["documents"] += int((reason == code).sum())
        c[bucket]["bytes"] += int(scan.nbytes[reason == code].sum())


def check_counts(c: dict[str, dict[str, int]], source: str) -> None:
    """Every input document is in exactly one bucket; anything else is a bug in this module."""
    for unit in ("documents", "bytes"):
        total = sum(c[b][unit] for b in BUCKETS)
        if total != c["input"][unit]:
            raise AssertionError(
                f"dedup counts of {source}: {unit} {total} != input {c['input'][unit]}"
            )


def _doc_ref(scan: FileScan, j: int) -> dict[str, Any]:
    ref: dict[str, Any] = {"file": str(scan.path), "line": int(scan.lines[j])}
    if scan.ids[j] is not None:
        ref["id"] = scan.ids[j]
    return ref


def removal_listing(
    scan: FileScan,
    reason: np.ndarray,
    keeper: np.ndarray,
    ref: Callable[[int], dict[str, Any]],
) -> list[dict[str, Any]]:
    """The removed documents of one file, in line order: where, why, and the kept document."""
    listing: list[dict[str, Any]] = [
        {"file": str(scan.path), "line": line_no, "reason": "invalid", "detail": why}
        for line_no, why in scan.invalid.lines
    ]
    for j in np.flatnonzero(reason != KEPT):
        entry = {**_doc_ref(scan, int(j)), "reason": REASONS[int(reason[j])]}
        if reason[j] != SHORT:
            entry["duplicate_of"] = ref(int(keeper[j]))
        listing.append(entry)
    return sorted(listing, key=lambda e: e["line"])


def kept_records(scan: FileScan, reason: np.ndarray) -> Iterator[dict[str, Any]]:
    """The kept (ftfy-fixed) records of one file, in input order, from the scan's fixed file."""
    not_short = np.flatnonzero(~scan.short)
    with open(scan.fixed, "rb") as raw:
        lines = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
        for j, line in zip(not_short, lines, strict=True):
            if reason[j] == KEPT:
                yield json.loads(line)


def print_summary(counts: dict[str, dict[str, dict[str, int]]], console: Any) -> None:
    """SlimPajama's per-source table: documents per bucket and the share of bytes removed."""
    from rich import box
    from rich.table import Table

    # Two-line headings and a light box keep the table inside 80 columns.
    table = Table(
        title="lmpipe dedup: documents per source", box=box.SIMPLE_HEAD, collapse_padding=True
    )
    table.add_column("source", no_wrap=True)
    for head in ("input", "kept", "short", "exact\ndup", "near\ndup", "invalid", "bytes\nremoved"):
        table.add_column(head, justify="right", no_wrap=True)
    for name, c in counts.items():
        removed = c["input"]["bytes"] - c["kept"]["bytes"]
        share = 100.0 * removed / c["input"]["bytes"] if c["input"]["bytes"] else 0.0
        cells = [f"{c[b]['documents']:,}" for b in ("input", *BUCKETS)]
        table.add_row(name, *cells, f"{share:.2f}%", style="bold" if name == "total" else None)
    console.print(table)


def dedup(
    inputs: list[Path],
    out: Path,
    *,
    min_chars: int = 200,
    threshold: float = 0.8,
    num_perm: int = 128,
    ngram: int = 13,
    strict: bool = True,
    overwrite: bool = False,
    exact: bool = True,
    hash_scheme: str = "legacy",
    progress: bool = True,
) -> dict[str, Any]:
    """Clean and deduplicate `inputs` into the folder `out`; returns the manifest."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if min_chars < 0 or ngram < 1 or num_perm < 2 or not 0.0 < threshold < 1.0:
        raise LmpipeError(
            "dedup settings: need min_chars >= 0, ngram >= 1, num_perm >= 2, 0 < threshold < 1"
        )
    inputs = [Path(p) for p in inputs]
    files = find_inputs(inputs)
    out = Path(out)
    for f in files:  # --overwrite must never delete what it reads
        if out.resolve() in f.resolve().parents:
            raise LmpipeError(f"{f}: input lies inside the output folder {out}")
    hasher = MinHasher(num_perm, seed=1, scheme=hash_scheme)
    bands, rows = optimal_bands(threshold, num_perm)
    settings = {
        "min_chars": min_chars, "threshold": threshold, "num_perm": num_perm, "ngram": ngram,
        "bands": bands, "rows": rows, "hash": "sha1_hash32", "hash_scheme": hash_scheme,
        "seed": 1, "exact": exact, "keep": "first", "strict": strict,
        "fix_text": "ftfy.fix_text(normalization='NFC')",
    }  # fmt: skip
    err = Console(stderr=True)
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=True, disable=not progress,
    )  # fmt: skip

    with staged_output(out, overwrite) as work:
        tmp = work / "_fixed"
        tmp.mkdir()
        scans: list[FileScan] = []
        with bar:  # transient: the bars disappear, the summary table stays
            task = bar.add_task("fix, normalise, MinHash", total=None)
            for i, path in enumerate(files):
                bar.update(task, description=f"fix, normalise, MinHash: {path.name}")
                scans.append(
                    scan_file(
                        path, source_of(path, inputs), tmp / f"{i:05d}.jsonl.zst", hasher,
                        min_chars=min_chars, ngram=ngram, strict=strict,
                        on_document=lambda: bar.advance(task),
                    )
                )  # fmt: skip
            bar.remove_task(task)
        short = np.concatenate([s.short for s in scans])
        reason, keeper = decide(
            short,
            np.concatenate([s.digests for s in scans]),
            np.concatenate([s.signatures for s in scans]),
            bands, rows, exact,
        )  # fmt: skip
        # Global document index -> (scan, position) to name the kept document of a duplicate.
        offsets = np.cumsum([0] + [len(s.lines) for s in scans])

        def ref(g: int) -> dict[str, Any]:
            k = int(np.searchsorted(offsets, g, side="right")) - 1
            return _doc_ref(scans[k], g - int(offsets[k]))

        counts: dict[str, dict[str, dict[str, int]]] = {}
        shard_docs: dict[str, int] = {}
        with bar, DocumentWriter(work) as writer, _ZstdLines(work / REMOVED) as removed:
            task = bar.add_task("write kept documents", total=len(short))
            for k, scan in enumerate(scans):
                mine = reason[offsets[k] : offsets[k + 1]]
                count_file(counts.setdefault(scan.source, _empty_counts()), scan, mine)
                for entry in removal_listing(scan, mine, keeper[offsets[k] : offsets[k + 1]], ref):
                    removed.write(entry)
                for record in kept_records(scan, mine):
                    writer.write(record)
                    name = writer.files[-1].name
                    shard_docs[name] = shard_docs.get(name, 0) + 1
                bar.advance(task, len(mine))
        shutil.rmtree(tmp)
        counts["total"] = {
            b: {u: sum(c[b][u] for c in counts.values()) for u in ("documents", "bytes")}
            for b in ("input", *BUCKETS)
        }
        for name, c in counts.items():
            check_counts(c, name)
        outputs = [
            {"file": name, "kind": kind, "sha256": sha256_file(work / name), "documents": n}
            for name, kind, n in [
                *((name, "documents", n) for name, n in shard_docs.items()),
                (REMOVED, "removed", removed.lines),
            ]
        ]
        manifest = write_manifest(
            work, "dedup", settings=settings,
            inputs=[{"path": str(f), "sha256": sha256_file(f), "bytes": f.stat().st_size} for f in files],
            outputs=outputs, counts=counts,
        )  # fmt: skip
    if progress:
        print_summary(counts, Console())
    return manifest
