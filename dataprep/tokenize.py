"""`lmpipe tokenize`: documents -> packed GPT-2 token shards (train and held-out), format in shards.py.

Contract: every valid document of the inputs (in `find_inputs` order, then line order) is encoded
with tiktoken's GPT-2 BPE as ordinary text (a literal "<|endoftext|>" inside a document is data,
not the special token), followed by end-of-text 50256, and appended to exactly one split. A
document goes to `heldout` when blake2b(text as UTF-8, key=str(seed), 8-byte digest) read as a
little-endian uint64 is below `holdout * 2**64`: the choice depends only on the text and the seed,
so identical documents land in the same split and the training split never holds a held-out text.
Output is byte-identical for any number of `workers` (encoding threads; tiktoken releases the GIL),
since results are written in input order. Bad lines are counted per file in the manifest (the
default) or stop the run with the file and line (`strict`); the counts add up: documents + invalid
+ blank_lines = lines (an empty file, or compressed data that breaks off, is one invalid line).
With `split_by_field`, each document goes to the token folder of its field's value under `out`
(`folder_for`), all written in the same pass, and `out/manifest.json` lists the folders.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import re
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmpipe.dataprep.documents import (
    InvalidLines,
    field_value,
    find_inputs,
    print_invalid,
    read_documents,
)
from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.folders import MANIFEST, sha256_file, staged_output, write_manifest
from lmpipe.dataprep.shards import SPLITS, TOKEN_DTYPE, ShardWriter, format_fields
from lmpipe.dataprep.tokenizer import EOT_ID, NAME, VOCAB_SIZE, get_encoding, ranks_sha256

# About 0.1 s of encoding per task: large enough to amortise the thread hand-off, small enough to
# keep memory flat and the progress bar moving.
BATCH_BYTES = 1 << 20
# Where no bar is shown (stderr not a terminal), how often at most a line says how far the input
# has been read (seconds): a line a minute, not one a batch.
PLAIN_EVERY = 60.0


def holdout_threshold(holdout: float) -> int:
    return min(int(holdout * 2**64), 2**64)


def is_heldout(text_utf8: bytes, key: bytes, threshold: int) -> bool:
    digest = hashlib.blake2b(text_utf8, digest_size=8, key=key).digest()
    return int.from_bytes(digest, "little") < threshold


@dataclass
class FileStats:
    path: Path
    documents: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    invalid: InvalidLines = field(default_factory=InvalidLines)


@dataclass
class Batch:
    """Texts of one input file, in order, with each one's split and output folder ("" unless
    split by a field)."""

    texts: list[str] = field(default_factory=list)
    heldout: list[bool] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)
    n_bytes: int = 0


_NOT_IN_NAMES = re.compile(r"[^A-Za-z0-9._-]")


def folder_for(value: str) -> str:
    """The folder a `--split-by-field` value writes to: its letters, digits, '.', '_' and '-',
    any other character as '_'; never a hidden or private name (those get an 'x' first: a folder
    starting with '.' or '_' is skipped when its parent is read as input), nor the parent's
    manifest.json; a name past 100 characters is cut and ends with a hash of the whole value."""
    name = _NOT_IN_NAMES.sub("_", value)
    if name[:1] in ("", ".", "_") or name == MANIFEST:
        name = "x" + name
    if len(name) > 100:
        name = name[:83] + "-" + hashlib.blake2b(value.encode("utf-8"), digest_size=8).hexdigest()
    return name


@dataclass
class FieldSplit:
    """`--split-by-field`: the dotted field, and each output folder's value so far."""

    dotted: str
    values: dict[str, str] = field(default_factory=dict)

    def folder(self, record: dict[str, Any]) -> str | None:
        """The record's folder; None when it has no string value there."""
        value = field_value(record, self.dotted)
        if not isinstance(value, str) or not value:
            return None
        name = folder_for(value)
        first = self.values.setdefault(name, value)
        if first != value:
            raise LmpipeError(
                f"--split-by-field {self.dotted}: values {first!r} and {value!r} both make "
                f"folder {name!r}"
            )
        return name


def read_batches(
    path: Path,
    *,
    strict: bool,
    stats: FileStats,
    key: bytes,
    threshold: int,
    split: FieldSplit | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator[Batch]:
    batch = Batch()
    for line_no, record in read_documents(path, strict, stats.invalid, on_bytes):
        folder = ""
        if split is not None:
            found = split.folder(record)
            if found is None:
                why = f"no string {split.dotted!r} field (--split-by-field)"
                if strict:
                    raise LmpipeError(f"{path}:{line_no}: {why}")
                stats.invalid.add(line_no, why)
                continue
            folder = found
        text = record["text"]
        utf8 = text.encode("utf-8")  # valid: read_documents refuses lone surrogates
        held = is_heldout(utf8, key, threshold)
        stats.documents["heldout" if held else "train"] += 1
        batch.texts.append(text)
        batch.heldout.append(held)
        batch.folders.append(folder)
        batch.n_bytes += len(utf8)
        if batch.n_bytes >= BATCH_BYTES:
            yield batch
            batch = Batch()
    if batch.texts:
        yield batch


Packed = dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]


def encode_batch(batch: Batch) -> Packed:
    """Encode a batch and pack each (folder, split) as (`doc EOT doc EOT ...` uint16, lengths
    with EOT)."""
    enc = get_encoding()
    # encode_to_numpy with nothing allowed or disallowed is encode_ordinary (special-token text is
    # ordinary text), but fills a numpy buffer instead of a Python list: about 1.5x faster.
    arrays = [
        enc.encode_to_numpy(t, allowed_special=set(), disallowed_special=()) for t in batch.texts
    ]
    eot = np.array([EOT_ID], dtype=np.uint32)
    packed: Packed = {}
    for folder in dict.fromkeys(batch.folders):
        for split, want in (("train", False), ("heldout", True)):
            docs = [
                a
                for a, h, f in zip(arrays, batch.heldout, batch.folders, strict=True)
                if h == want and f == folder
            ]
            if not docs:
                continue
            flat = np.concatenate([p for a in docs for p in (a, eot)])
            if flat.max() >= VOCAB_SIZE:  # GPT-2 ids always fit; this guards the uint16 cast
                raise RuntimeError(f"token id {int(flat.max())} does not fit {TOKEN_DTYPE}")
            lengths = np.fromiter((len(a) + 1 for a in docs), dtype=np.int64, count=len(docs))
            packed[folder, split] = (flat.astype(TOKEN_DTYPE), lengths)
    return packed


class PlainProgress:
    """What `tokenize` uses of rich's Progress, for a stderr that is not a terminal (nohup,
    sbatch, a pipe), where rich's bar shows nothing: at most every PLAIN_EVERY seconds, a line
    with the input read so far, the file being read and the tokens written."""

    def __init__(self) -> None:
        self.start = self.last = time.monotonic()
        self.total = self.read = 0
        self.fields: dict[str, Any] = {}

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def add_task(self, description: str, total: int, **fields: Any) -> int:
        self.total, self.fields = total, {"description": description, **fields}
        return 0

    def update(self, task: int, **fields: Any) -> None:
        self.fields.update(fields)

    def advance(self, task: int, n: int) -> None:
        self.read += n
        now = time.monotonic()
        if now - self.last < PLAIN_EVERY:
            return
        self.last = now
        share = self.read / self.total if self.total else 1.0
        print(
            f"tokenize: {self.read / 1e6:,.1f} of {self.total / 1e6:,.1f} MB read ({share:.0%}), "
            f"{self.fields['description']}, {self.fields['tokens']:,} tokens, "
            f"{now - self.start:,.0f} s",
            file=sys.stderr,
            flush=True,
        )


def make_progress() -> Any:
    """The bar on stderr (stdout is the summary's), or plain lines where it is not a terminal."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    err = Console(stderr=True)
    if not err.is_terminal:
        return PlainProgress()
    return Progress(
        TextColumn("tokenize {task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[tokens]:,} tokens"),
        console=err,
    )


def tokenize(
    inputs: list[Path],
    out: Path,
    *,
    holdout: float = 0.0017,
    seed: int = 0,
    shard_tokens: int = 128 << 20,
    strict: bool = False,
    overwrite: bool = False,
    workers: int = 1,
    split_by_field: str | None = None,
) -> dict[str, Any]:
    """Encode documents into a shard folder at `out`; returns its manifest. With
    `split_by_field` (dotted, e.g. meta.redpajama_set_name), one shard folder per value of that
    field under `out` (`folder_for`), each with its own manifest, in one pass; `out/manifest.json`
    then lists the folders, and a record without the field is an invalid line."""
    # Named as `lmpipe tokenize`'s flags, which is where these come from.
    if not 0.0 <= holdout <= 1.0:
        raise LmpipeError(f"--holdout {holdout}: between 0 and 1")
    if seed < 0:
        raise LmpipeError(f"--holdout-seed {seed}: 0 or more")
    if shard_tokens < 1:
        raise LmpipeError(f"--shard-tokens {shard_tokens}: at least 1")
    if workers < 1:
        raise LmpipeError(f"-j {workers}: at least 1")
    if split_by_field == "":
        raise LmpipeError("--split-by-field: name a field (dotted for nested: meta.source)")
    skipped: list[Path] = []
    files = find_inputs(inputs, skipped)
    split = FieldSplit(split_by_field) if split_by_field else None
    get_encoding()  # a missing tokenizer fails here, before any output exists
    key, threshold = str(seed).encode(), holdout_threshold(holdout)
    out = Path(out)
    all_stats: list[FileStats] = []
    input_sha: list[str] = []
    total_bytes = sum(f.stat().st_size for f in files)

    with contextlib.ExitStack() as stack:
        work = stack.enter_context(
            staged_output(out, stage="tokenize", reads=[*inputs, *files], overwrite=overwrite)
        )
        writers: dict[tuple[str, str], ShardWriter] = {}

        def writer(folder: str, split_name: str) -> ShardWriter:
            """A folder's writers, made when its first document arrives ("": `out` itself)."""
            if (folder, split_name) not in writers:
                (work / folder).mkdir(exist_ok=True)
                for name in SPLITS:
                    writers[folder, name] = stack.enter_context(
                        ShardWriter(
                            work / folder,
                            name,
                            eot_id=EOT_ID,
                            vocab_size=VOCAB_SIZE,
                            shard_tokens=shard_tokens,
                        )  # fmt: skip
                    )
            return writers[folder, split_name]

        if split is None:
            writer("", "train")  # one folder, written even when no document is valid
        progress = stack.enter_context(make_progress())
        bar = progress.add_task("", total=total_bytes, tokens=0)
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=workers))
        # Futures are consumed in submission order, so output does not depend on `workers`; the
        # bound keeps memory flat while every thread has work queued.
        pending: collections.deque[Future[Packed]] = collections.deque()
        n_tokens = 0

        def drain(keep: int) -> None:
            nonlocal n_tokens
            while len(pending) > keep:
                for (folder, split_name), (flat, lengths) in pending.popleft().result().items():
                    writer(folder, split_name).add_packed(flat, lengths)
                    n_tokens += len(flat)
                progress.update(bar, tokens=n_tokens)

        try:
            for path in files:
                progress.update(bar, description=path.name)
                input_sha.append(sha256_file(path))
                stats = FileStats(path)
                all_stats.append(stats)
                for batch in read_batches(
                    path,
                    strict=strict,
                    stats=stats,
                    key=key,
                    threshold=threshold,
                    split=split,
                    on_bytes=lambda n: progress.advance(bar, n),
                ):
                    pending.append(pool.submit(encode_batch, batch))
                    drain(2 * workers)
            drain(0)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        entries = [input_entry(s, sha) for s, sha in zip(all_stats, input_sha, strict=True)]
        settings: dict[str, Any] = {
            "holdout": holdout,
            "seed": seed,
            "shard_tokens": shard_tokens,
            "strict": strict,
        }
        folders = sorted({folder for folder, _ in writers})
        made = {}
        for folder in folders:
            splits = {name: writers[folder, name].close() for name in SPLITS}
            made[folder] = write_manifest(
                work / folder,
                "tokenize",
                **format_fields(
                    splits,
                    tokenizer_name=NAME,
                    tokenizer_sha256=ranks_sha256(),
                    vocab_size=VOCAB_SIZE,
                    eot_id=EOT_ID,
                ),
                inputs=entries,
                skipped_inputs=[str(f) for f in skipped],
                totals=totals(splits, all_stats) if split is None else folder_totals(splits),
                settings=settings
                if split is None
                else {
                    **settings,
                    "split_by_field": split.dotted,
                    "value": split.values[folder],
                },  # fmt: skip
            )
        if split is None:
            manifest = made[""]
        else:
            manifest = write_manifest(
                work,
                "tokenize",
                split_by_field=split.dotted,
                sources={
                    folder: {"value": split.values[folder], **source_totals(m)}
                    for folder, m in made.items()
                },
                inputs=entries,
                skipped_inputs=[str(f) for f in skipped],
                totals=split_totals(made, all_stats),
                settings=settings,
            )
    print_summary(manifest, out)
    return manifest


def input_entry(stats: FileStats, sha256: str) -> dict[str, Any]:
    return {
        "path": str(stats.path),
        "sha256": sha256,
        "documents": sum(stats.documents.values()),
        **{f"{split}_documents": n for split, n in stats.documents.items()},
        "invalid": stats.invalid.count,
        "invalid_examples": stats.invalid.examples,
        "blank_lines": stats.invalid.blank,
    }


def totals(splits: dict[str, dict[str, Any]], stats: list[FileStats]) -> dict[str, int]:
    documents = sum(s["n_documents"] for s in splits.values())
    invalid = sum(s.invalid.count for s in stats)
    blank = sum(s.invalid.blank for s in stats)
    return {
        "files": len(stats),
        "lines": documents + invalid + blank,
        "documents": documents,
        "invalid": invalid,
        "blank_lines": blank,
        "tokens": sum(s["n_tokens"] for s in splits.values()),
        **{f"{split}_documents": splits[split]["n_documents"] for split in SPLITS},
        **{f"{split}_tokens": splits[split]["n_tokens"] for split in SPLITS},
    }


def folder_totals(splits: dict[str, dict[str, Any]]) -> dict[str, int]:
    """One field value's folder: its documents and tokens (the lines belong to the inputs, whose
    counts are in the parent folder's manifest)."""
    return {
        "documents": sum(s["n_documents"] for s in splits.values()),
        "tokens": sum(s["n_tokens"] for s in splits.values()),
        **{f"{split}_documents": splits[split]["n_documents"] for split in SPLITS},
        **{f"{split}_tokens": splits[split]["n_tokens"] for split in SPLITS},
    }


def source_totals(manifest: dict[str, Any]) -> dict[str, int]:
    t = manifest["totals"]
    return {k: t[k] for k in ("documents", "tokens", "train_documents", "heldout_documents")}


def split_totals(made: dict[str, dict[str, Any]], stats: list[FileStats]) -> dict[str, int]:
    """The totals of a split output: every folder's documents and tokens, every input's lines."""
    documents = sum(m["totals"]["documents"] for m in made.values())
    invalid = sum(s.invalid.count for s in stats)
    blank = sum(s.invalid.blank for s in stats)
    return {
        "files": len(stats),
        "folders": len(made),
        "lines": documents + invalid + blank,
        "documents": documents,
        "invalid": invalid,
        "blank_lines": blank,
        "tokens": sum(m["totals"]["tokens"] for m in made.values()),
    }


def print_summary(manifest: dict[str, Any], out: Path) -> None:
    from rich.console import Console

    console = Console()
    t = manifest["totals"]
    console.print(
        f"tokenize: {t['documents']:,} documents, {t['tokens']:,} tokens from {t['files']} "
        f"file(s) -> {out}"
    )
    if "sources" in manifest:
        console.print(f"  one token folder per value of {manifest['split_by_field']}:")
        for folder, source in manifest["sources"].items():
            console.print(
                f"  {out / folder}  {source['documents']:>12,} documents "
                f"{source['tokens']:>15,} tokens  ({source['value']!r})",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
        console.print(f"  invalid  {t['invalid']:>12,} lines")
        print_invalid(console, manifest["inputs"])
        return
    for split in SPLITS:
        s = manifest["splits"][split]
        console.print(
            f"  {split:<8} {s['n_documents']:>12,} documents {s['n_tokens']:>15,} tokens "
            f"{len(s['shards']):>5} shard(s)"
        )
    console.print(f"  invalid  {t['invalid']:>12,} lines")
    print_invalid(console, manifest["inputs"])
