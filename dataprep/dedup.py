"""dedup: SlimPajama's cleaning and MinHash-LSH deduplication (seeds-spec section 5).

`dedup(inputs, out)` reads `.jsonl` / `.jsonl.zst` documents and, across all sources at once:
fixes each text with ftfy (NFC) -> drops it when its normalised form (lowercase, no ASCII
punctuation, whitespace runs collapsed) is shorter than `min_chars` -> drops exact duplicates of
the normalised text -> drops near duplicates: MinHash over character n-grams (`minhash.py`:
datasketch-identical sha1 signatures, or the faster one-permutation scheme), LSH banding tuned
for the Jaccard threshold (or a lower `lsh_threshold`), optionally `verify` (the exact n-gram
Jaccard of each candidate pair, edges below the threshold dropped), connected components of the
remaining pairs; per group the first document in input order is kept (or the longest). Kept
records are unchanged but for the fixed `text`. `out` gets `part-*.jsonl.zst`,
`removed.ndjson.zst` (every removed document, why, and the kept document it duplicates) and
`manifest.json` with per-source document and byte counts (input = kept + short + exact + near
duplicate + invalid), written last. The output is the same for any number of `workers`.

The steps are separate functions so that a map-reduce can replace the middle later:
`scan_file` (map, per input file; a process pool with `workers`) -> `band_keys` ->
`candidate_pairs` -> verification -> `union_find` -> `decide` -> the filter pass (per input file).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from lmpipe.dataprep.documents import DocumentWriter, InvalidLines, find_inputs, read_documents
from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.folders import sha256_file, staged_output, write_manifest

# Re-exported: the signature side used to live here, and callers import it from the stage.
from lmpipe.dataprep.minhash import (  # noqa: F401
    SCHEMES,
    MinHasher,
    OnePermHasher,
    _rows_as_keys,
    band_keys,
    candidate_pairs,
    fast_shingle_hashes,
    first_of_equal,
    make_hasher,
    normalise,
    optimal_bands,
    shingle_hashes,
)

# Shingles hashed per signature batch: bounds the (num_perm, batch) temporaries of MinHasher.
_CHUNK_ROWS = 1 << 13

# Buckets every input document ends up in exactly one of, in manifest order.
BUCKETS = ("kept", "short", "exact_duplicate", "near_duplicate", "invalid")
KEPT, SHORT, EXACT, NEAR = 0, 1, 2, 3
REASONS = {SHORT: "short", EXACT: "exact duplicate", NEAR: "near duplicate"}

# What ftfy.fix_text can change in ASCII text: HTML entities (&), line breaks (\r) and the control
# characters it deletes (0x00-0x08, 0x0b, 0x0e-0x1f, 0x7f; \x1b starts terminal escapes). Every
# other fixer and NFC act on non-ASCII characters only, so ASCII text without these is returned
# unchanged, and skipping the call saves about a quarter of the stage's time on English text.
_FTFY_ASCII_TRIGGERS = re.compile(r"[&\r\x00-\x08\x0b\x0e-\x1f\x7f]")


def fix_text(text: str) -> str:
    """`ftfy.fix_text(text, normalization="NFC")`, without the call where it cannot change text."""
    if text.isascii() and not _FTFY_ASCII_TRIGGERS.search(text):
        return text
    import ftfy  # imported here: the CLI keeps heavy imports out of `lmpipe --help`

    return ftfy.fix_text(text, normalization="NFC")


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
    hasher: MinHasher | OnePermHasher,
    *,
    min_chars: int = 200,
    ngram: int = 13,
    strict: bool = True,
    on_document: Callable[[], None] | None = None,
) -> FileScan:
    """Read one file: ftfy each text, normalise, mark short, hash; write fixed records to `fixed`."""
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
            record["text"] = fix_text(text)
            norm = normalise(record["text"])
            short.append(len(norm) < min_chars)
            if on_document is not None:
                on_document()
            if short[-1]:
                continue
            sink.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
            digests.append(hashlib.blake2b(norm.encode("utf-8"), digest_size=16).digest())
            pending.append(hasher.shingles(norm, ngram))
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
    *,
    verify: Callable[[np.ndarray], np.ndarray] | None = None,
    window: int = 0,
    priority: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per document (input order): its bucket (KEPT, SHORT, EXACT, NEAR) and the document kept in
    its place (itself when kept, -1 when short). `digests` and `signatures` hold the documents that
    are not short, in order; so do the pairs `verify` gets (it returns which to keep) and
    `priority` (per component the highest is kept, ties to the first; None: the first)."""
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
    lsh = reps[candidate_pairs(band_keys(signatures[reps], bands, rows), window)]
    if verify is not None and len(lsh):
        lsh = lsh[verify(lsh)]
    pairs = np.concatenate([lsh, np.stack([np.flatnonzero(is_exact), first[is_exact]], axis=1)])
    root = union_find(len(cand), pairs)
    if priority is not None:
        # The member with the highest priority (then the first) stands for its component.
        order = np.lexsort((np.arange(len(cand)), -priority, root))
        heads = order[np.r_[True, root[order][1:] != root[order][:-1]]]
        best = np.empty(len(cand), dtype=np.int64)
        best[root[heads]] = heads
        root = best[root]
    same_text = first == first[root]
    reason[cand] = np.where(root == np.arange(len(cand)), KEPT, np.where(same_text, EXACT, NEAR))
    keeper[cand] = cand[root]
    return reason, keeper


def shingle_sets(scans: Sequence[FileScan], docs: np.ndarray, ngram: int) -> dict[int, np.ndarray]:
    """The distinct 64-bit shingle hashes of the given documents (positions among the documents
    that are not short, over all scans), read back from the scans' fixed files."""
    ends = np.cumsum([int((~s.short).sum()) for s in scans])
    sets: dict[int, np.ndarray] = {}
    wanted = iter(np.unique(docs).tolist())
    nxt = next(wanted, None)
    for k, scan in enumerate(scans):
        start = int(ends[k - 1]) if k else 0
        if nxt is None or nxt >= ends[k]:
            continue
        with open(scan.fixed, "rb") as raw:
            lines = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
            for row, line in enumerate(lines, start):
                if row == nxt:
                    text = normalise(json.loads(line)["text"])
                    sets[row] = np.unique(fast_shingle_hashes(text, ngram))
                    nxt = next(wanted, None)
                    if nxt is None or nxt >= ends[k]:
                        break
    return sets


def jaccard_of_pairs(pairs: np.ndarray, sets: dict[int, np.ndarray]) -> np.ndarray:
    """Jaccard of each pair's shingle sets (exact but for 64-bit hash collisions, ~2^-64)."""
    out = np.empty(len(pairs))
    for k, (a, b) in enumerate(pairs.tolist()):
        x, y = sets[a], sets[b]
        inter = len(np.intersect1d(x, y, assume_unique=True))
        out[k] = inter / (len(x) + len(y) - inter)
    return out


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


def _scan_job(job: tuple[Any, ...], options: dict[str, Any]) -> FileScan:
    return scan_file(*job, **options)


def _scan_in_pool(
    jobs: list[tuple[Any, ...]],
    options: dict[str, Any],
    workers: int,
    advance: Callable[[int], None],
) -> list[FileScan]:
    """`scan_file` of every job on a process pool, results in job order (so the output does not
    depend on `workers`). Each file is one task: the unit that a later resume would record."""
    import concurrent.futures as cf
    import multiprocessing

    # spawn: not fork, since the parent may hold threads (rich's progress refresher), and not
    # forkserver, whose workers are not children of this process, so their CPU time would be
    # missing from this process's accounting (and from any benchmark of it).
    context = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(_scan_job, job, options) for job in jobs]
        for future in cf.as_completed(futures):
            advance(len(future.result().lines))
        return [f.result() for f in futures]


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
    hash_scheme: str = "oph",
    verify: bool = True,
    lsh_threshold: float | None = None,
    keep: str = "first",
    workers: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Clean and deduplicate `inputs` into the folder `out`; returns the manifest.

    `verify`: keep only candidate pairs whose true n-gram Jaccard reaches `threshold`.
    `lsh_threshold`: the Jaccard the LSH bands are tuned for; default `threshold` - 0.2 with
    `verify` (LSH then misses almost no true pair, and verification removes the extra candidates:
    recall 0.999 and precision 1.0 on benchmarks/dedup_bench.py, where 0.8 gave 0.87), else
    `threshold`. `hash_scheme="legacy", verify=False` is SlimPajama's run, decision for decision.
    `keep`: "first" (input order) or "longest" (most bytes, then first) per group.
    `workers`: processes for the per-file step; the output is the same for any number."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if lsh_threshold is None:
        lsh_threshold = max(0.05, threshold - 0.2) if verify else threshold
    if min_chars < 0 or ngram < 1 or num_perm < 2 or not 0.0 < threshold < 1.0:
        raise LmpipeError(
            "dedup settings: need min_chars >= 0, ngram >= 1, num_perm >= 2, 0 < threshold < 1"
        )
    if not 0.0 < lsh_threshold < 1.0 or keep not in ("first", "longest") or workers < 1:
        raise LmpipeError(
            "dedup settings: need 0 < lsh_threshold < 1, keep first or longest, workers >= 1"
        )
    inputs = [Path(p) for p in inputs]
    files = find_inputs(inputs)
    out = Path(out)
    for f in files:  # --overwrite must never delete what it reads
        if out.resolve() in f.resolve().parents:
            raise LmpipeError(f"{f}: input lies inside the output folder {out}")
    hasher = make_hasher(hash_scheme, num_perm, seed=1)
    bands, rows = optimal_bands(lsh_threshold, num_perm)
    settings = {
        "min_chars": min_chars, "threshold": threshold, "num_perm": num_perm, "ngram": ngram,
        "bands": bands, "rows": rows, "lsh_threshold": lsh_threshold, "verify": verify,
        "hash": "fnv1a64+fmix64" if hash_scheme == "oph" else "sha1_hash32",
        "hash_scheme": hash_scheme, "seed": 1, "exact": exact, "keep": keep, "strict": strict,
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
        jobs = [
            (path, source_of(path, inputs), tmp / f"{i:05d}.jsonl.zst", hasher)
            for i, path in enumerate(files)
        ]
        options = {"min_chars": min_chars, "ngram": ngram, "strict": strict}
        with bar:  # transient: the bars disappear, the summary table stays
            task = bar.add_task("fix, normalise, MinHash", total=None)
            if workers == 1:
                scans = [
                    scan_file(*job, **options, on_document=lambda: bar.advance(task))
                    for job in jobs
                ]
            else:
                scans = _scan_in_pool(jobs, options, workers, lambda n: bar.advance(task, n))
            bar.remove_task(task)
        short = np.concatenate([s.short for s in scans])
        not_short = ~short

        def verified(pairs: np.ndarray) -> np.ndarray:
            return jaccard_of_pairs(pairs, shingle_sets(scans, pairs, ngram)) >= threshold

        reason, keeper = decide(
            short,
            np.concatenate([s.digests for s in scans]),
            np.concatenate([s.signatures for s in scans]),
            bands, rows, exact,
            verify=verified if verify else None,
            # With verification, an edge to a bucket's first document can fail where one to a
            # later member holds: look at a few more members of each bucket.
            window=8 if verify else 0,
            priority=np.concatenate([s.nbytes for s in scans])[not_short] if keep == "longest" else None,
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
