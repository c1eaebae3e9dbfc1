"""Documents: JSON lines, plain (`.jsonl`), zstd- or gzip-compressed (`.jsonl.zst`, `.jsonl.gz`),
one object a line; or Parquet (`.parquet`, with the `parquet` extra), one document a row.

Each document needs a string `text`; every other field passes through. Reading streams: nothing
holds a whole file in memory (compressed data is decoded a little at a time, however well it
compresses; Parquet is read by record batches, but a row group is decoded whole). A bad line or
row (not JSON, JSON that Python cannot hold, not UTF-8, no string `text`) is either an error
naming the file and line (`strict=True`) or counted in `InvalidLines`, with the first few line
numbers kept for the report; so is an empty file, data that breaks off (the lines decoded before it are kept), and
zstd or gzip data in a file named `.jsonl` (one reason, not its bytes read as lines).
The commands count by default and stop at the first bad line with `--strict`. In a Parquet file
a "line" is a row: its 1-based number across the whole file. Parquet's values become JSON values
by the rules in `parquet.py`.
"""

from __future__ import annotations

import codecs
import itertools
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.folders import MANIFEST, NewerFormat, is_lmpipe_manifest, read_manifest
from lmpipe.dataprep.parquet import (
    batch_rows,
    is_parquet,
    open_parquet,
    parquet_rows,
    require_pyarrow,
)

SUFFIXES = (".jsonl", ".jsonl.zst", ".jsonl.gz", ".parquet")
MAX_REPORTED_LINES = 5
READ_BYTES = 1 << 20
# Compressed bytes a decoder is given at once: what one call can lose to damage (an error
# discards that call's output), and what bounds one call's output, where a whole READ_BYTES of a
# very compressible file would decode to gigabytes at once. zstd's densest block is 4 bytes for
# 128 KiB (1 KiB -> at most 32 MiB); deflate's ratio is at most ~1032:1 (16 KiB -> ~16 MiB), and
# gzip reads slower in smaller pieces.
ZSTD_PIECE_BYTES = 1 << 10
GZIP_PIECE_BYTES = 1 << 14


def is_document_file(path: Path) -> bool:
    return path.name.endswith(SUFFIXES)


def _stage_folder(folder: str, names: list[str]) -> bool:
    """Whether `folder` is an lmpipe stage's output (its manifest names the stage): the files
    beside its documents are the stage's own (manifest, removal listing, plot), not input."""
    if MANIFEST not in names:
        return False
    try:
        manifest = read_manifest(Path(folder))
    except NewerFormat:  # a newer lmpipe's output: its files are not documents to read as such
        raise
    except LmpipeError:  # not JSON, not an object: a file of the input's own
        return False
    return is_lmpipe_manifest(manifest)


def _folder_files(folder: Path, skipped: list[Path]) -> list[Path]:
    """The document files below `folder`, sorted, through links to folders as well; the other
    files go to `skipped`. Subfolders named `_x` or `.x` hold what is not the folder's documents
    (dedup's `_holdout/`, so that `lmpipe tokenize clean/` trains on the training documents only;
    `.git`): not read, nor are other files so named (Spark's `_SUCCESS`, `.crc` files) noted.
    A hidden file with a document's suffix is not read but goes to `skipped`: a copy from a Mac
    holds `._part-0001.jsonl.zst` (AppleDouble metadata, not JSON lines) beside every file."""

    def unreadable(e: OSError) -> None:  # os.walk would skip a folder it cannot list, quietly
        raise LmpipeError(f"{e.filename}: cannot read folder ({e.strerror})")

    files: list[Path] = []
    seen: dict[tuple[int, int], str] = {}  # each folder (device, inode) -> where it was reached
    for where, subfolders, names in os.walk(folder, onerror=unreadable, followlinks=True):
        st = os.stat(where)
        first = seen.setdefault((st.st_dev, st.st_ino), where)
        if first != where:  # a link to a folder read already: a loop, or its files twice
            raise LmpipeError(f"{where}: the folder {first} again, through a link; name each folder once")  # fmt: skip
        subfolders[:] = [d for d in subfolders if not d.startswith(("_", "."))]
        stage = _stage_folder(where, names)
        for name in names:
            f = Path(where, name)
            if is_document_file(f) and name.startswith("."):
                skipped.append(f)
            elif is_document_file(f):
                if not f.is_file():
                    raise LmpipeError(f"{f}: not a file (a broken link?)")
                files.append(f)
            elif not name.startswith(("_", ".")) and not stage:
                skipped.append(f)
    return sorted(files)


def _note_skipped(skipped: list[Path], folders: list[Path]) -> None:
    """A line on stderr naming the files (sorted) of the input folders not read for their
    suffix (a `.json.gz`, `.JSONL`, `.bz2`), and one naming the hidden ones (`._x.jsonl.zst`):
    not dropped without a word, nor read as a format they may not be."""
    where = ", ".join(map(str, folders))
    hidden = [str(f) for f in skipped if f.name.startswith(".")]
    other = [str(f) for f in skipped if not f.name.startswith(".")]
    why_other = f"not {'/'.join(SUFFIXES)}"
    why_hidden = "hidden (a name starting with '.', as macOS's ._ files; name a file to read it)"
    for names, why in ((other, why_other), (hidden, why_hidden)):
        if names:
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            print(
                f"note: {len(names)} file(s) in {where} skipped: {why} ({shown})", file=sys.stderr
            )


def find_inputs(paths: Iterable[Path | str], skipped: list[Path] | None = None) -> list[Path]:
    """Expand files and folders (recursively, through links) into a sorted list of document files.
    Within a folder, subfolders whose name starts with `_` or `.` are skipped, and so are files
    whose name starts with `.`; name them to read them. Files of other suffixes and hidden ones
    in a folder are named in a note on stderr, and added to `skipped` (sorted) for a stage's
    manifest. One file reached twice (named twice, or two links to it) is an error."""
    found: list[Path] = []
    # each file (device, inode) -> the argument naming it, and the file's name there
    given: dict[tuple[int, int], tuple[Path, Path]] = {}
    skipped = [] if skipped is None else skipped
    already = len(skipped)
    folders: list[Path] = []  # those that held skipped files
    for p in map(Path, paths):
        if p.is_dir():
            before = len(skipped)
            files = _folder_files(p, skipped)
            if len(skipped) > before:
                folders.append(p)
            if not files:
                raise LmpipeError(f"{p}: folder holds no {' or '.join(SUFFIXES)} files")
        elif p.is_file():
            if not is_document_file(p):
                raise LmpipeError(f"{p}: not a {' or '.join(SUFFIXES)} file")
            files = [p]
        else:
            raise LmpipeError(f"{p}: no such file or folder")
        for f in files:
            # A file named twice (twice over, as a file and inside a folder, through a link)
            # would be read twice or, quietly, once; neither is what the user can have meant.
            # So would two links to it in one folder (a hard link, two links to one HF blob).
            st = f.stat()
            first, first_file = given.setdefault((st.st_dev, st.st_ino), (p, f))
            if first is not p:
                how = "twice" if first == p else f"as {first} and as {p}"
                raise LmpipeError(f"{f}: given {how}; name each input once")
            if first_file != f:
                raise LmpipeError(f"{f}: the file {first_file} again, through a link; name each input once")  # fmt: skip
        found.extend(files)
    if not found:
        raise LmpipeError("no input files given")
    skipped[already:] = sorted(skipped[already:])
    _note_skipped(skipped[already:], folders)
    # Here, before a stage starts: not after hours of work, at the first .parquet file.
    parquet = next(filter(is_parquet, found), None)
    if parquet is not None:
        require_pyarrow(parquet)
    return found


@dataclass
class InvalidLines:
    """Bad lines of one file: how many, and the first few line numbers with the reason; and its
    blank lines, which are skipped and counted apart (they are not documents, nor bad ones)."""

    count: int = 0
    examples: list[str] = field(default_factory=list)
    blank: int = 0

    def add(self, line_no: int, reason: str) -> None:
        self.count += 1
        if len(self.examples) < MAX_REPORTED_LINES:
            self.examples.append(f"line {line_no}: {reason}")


def print_invalid(console: Any, entries: Iterable[dict[str, Any]]) -> None:
    """Report the bad lines a stage skipped: one line per file with its count and first examples
    (`entries`: manifest input entries with `path`, `invalid`, `invalid_examples`)."""
    entries = list(entries)
    blank = [e for e in entries if e.get("blank_lines")]
    if blank:
        console.print(
            f"note: {sum(e['blank_lines'] for e in blank):,} blank line(s) in {len(blank)} "
            "file(s) were skipped (counted in the manifest as blank_lines)",
            soft_wrap=True,
            highlight=False,
        )
    bad = [e for e in entries if e["invalid"]]
    if not bad:
        return
    total = sum(e["invalid"] for e in bad)
    # soft_wrap: paths and line numbers stay whole on one line, for copying and grep
    console.print(
        f"[yellow]warning:[/] {total:,} invalid line(s) in {len(bad)} file(s) were skipped "
        "(counted in the manifest; --strict stops at the first):",
        soft_wrap=True,
    )
    for e in bad:
        console.print(
            f"  {e['path']}: {e['invalid']:,} ({'; '.join(e['invalid_examples'])})",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


def decoded_chunks(
    raw: BinaryIO,
    path: Path,
    new_decoder: Callable[[], Any],
    error: type[Exception],
    what: str,
    piece_bytes: int,
    zero_padded: bool = False,
) -> Iterator[bytes]:
    """Decompressed bytes of every frame (zstd) or member (gzip) in `raw`, in order, in blocks of
    about `READ_BYTES`. A file whose last frame stops before its end (a truncated download, a
    writer killed mid-file) is an error, not a short file: the libraries' stream readers would
    end quietly there. Damage is an error too, raised after every byte decoded before it.
    `zero_padded`: zero bytes where a member would start are padding, skipped (gzip's rule)."""
    decoder, fed = new_decoder(), False
    block: list[bytes] = []  # decoded, not yet yielded
    size, problem = 0, ""
    try:
        while chunk := raw.read(READ_BYTES):
            view = memoryview(chunk)
            for start in range(0, len(chunk), piece_bytes):  # (see ZSTD_PIECE_BYTES)
                piece = view[start : start + piece_bytes]
                while piece:
                    if zero_padded and not fed:
                        # (a copy of one piece, only where a member would start)
                        piece = memoryview(bytes(piece).lstrip(b"\0"))
                        if not piece:
                            break
                    fed = True
                    decoded = decoder.decompress(piece)
                    if decoded:
                        block.append(decoded)
                        size += len(decoded)
                    if not decoder.eof:
                        break
                    piece = decoder.unused_data  # the next frame starts within this piece
                    decoder, fed = new_decoder(), False
                if size >= READ_BYTES:
                    yield b"".join(block)
                    block, size = [], 0
    except error as e:
        # Its checksum covers a whole member or frame, checked at its end: the lines decoded
        # before the error may be altered too (kept, as they cannot be told apart; the file is
        # named with this reason, and is best fetched again).
        problem = f"corrupt {what} data ({e}; lines read before it may be damaged too)"
    else:
        if fed and not decoder.eof:
            problem = f"truncated {what} data (the last frame is incomplete)"
    if block:
        yield b"".join(block)
    if problem:
        raise LmpipeError(f"{path}: {problem}")


# The largest window a zstd frame may ask for (`zstd --long=31`), not the library's default limit
# of 128 MiB: big corpora are often compressed with `--long`, and a reader needs the frame's
# window in memory whatever lmpipe allows, so a lower limit only refuses valid files.
ZSTD_MAX_WINDOW = 1 << 31


def zstd_chunks(raw: BinaryIO, path: Path) -> Iterator[bytes]:
    return decoded_chunks(
        raw,
        path,
        zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).decompressobj,
        zstandard.ZstdError,
        "zstd",
        ZSTD_PIECE_BYTES,
    )


def gzip_chunks(raw: BinaryIO, path: Path) -> Iterator[bytes]:
    import zlib

    # 16 + MAX_WBITS: a gzip header, not a zlib one. Zero bytes after a member are padding
    # (tape blocks, a file written in fixed-size records): gzip -t and Python's gzip accept it.
    return decoded_chunks(
        raw,
        path,
        lambda: zlib.decompressobj(16 + zlib.MAX_WBITS),
        zlib.error,
        "gzip",
        GZIP_PIECE_BYTES,
        zero_padded=True,
    )


# The first bytes of compressed data in a file named as plain JSON lines: read as text, it
# would be a few arbitrary "invalid UTF-8" lines (as many as its `\n` bytes), its documents lost.
COMPRESSED_MAGIC = ((b"\x28\xb5\x2f\xfd", "zstd", ".jsonl.zst"), (b"\x1f\x8b", "gzip", ".jsonl.gz"))


def open_text_lines(path: Path, on_bytes: Callable[[int], None] | None = None) -> Iterator[bytes]:
    """Raw lines (without their newline) of a plain, zstd- or gzip-compressed file, not decoded.
    A line of many blocks is joined once, so its memory is its size, however long it is.

    `on_bytes(n)` is told after each block how many more bytes of the file itself (compressed
    bytes for `.zst`) have been consumed, so a progress bar moves within a large file; the calls
    add up to the file's size once it is read through."""
    with open(path, "rb") as raw:
        blocks: Iterator[bytes]
        if path.name.endswith(".zst"):
            blocks = zstd_chunks(raw, path)
        elif path.name.endswith(".gz"):
            blocks = gzip_chunks(raw, path)
        else:
            first = raw.read(READ_BYTES)
            for magic, what, suffix in COMPRESSED_MAGIC:
                if first.startswith(magic):
                    raise LmpipeError(f"{path}: {what} data in a .jsonl file: name it {suffix}")
            blocks = itertools.chain([first], iter(lambda: raw.read(READ_BYTES), b""))
        reported = 0
        rest: list[bytes] = []  # the start of a line that continues in the next block(s)
        for block in blocks:
            lines = block.split(b"\n")
            if len(lines) > 1:
                lines[0] = b"".join([*rest, lines[0]])
                rest = []
            last = lines.pop()
            if last:
                rest.append(last)
            lines.reverse()
            while lines:  # popped as they go: a long line is not kept alive by this list
                yield lines.pop()
            if on_bytes is not None:
                position = raw.tell()
                on_bytes(position - reported)
                reported = position
        if rest:
            yield b"".join(rest)  # a last line without a newline
        if on_bytes is not None:
            on_bytes(raw.tell() - reported)


def field_value(record: Any, path: str) -> Any:
    """The value at a dotted `path` (`meta.redpajama_set_name`) in a JSON record; None if absent."""
    for key in path.split("."):
        if not isinstance(record, dict) or key not in record:
            return None
        record = record[key]
    return record


def record_problem(record: dict[str, Any]) -> str:
    """Why a record (a JSON line's object, a Parquet row) is not a document; "" when it is."""
    if "text" not in record:
        return "no 'text' field"
    if not isinstance(record["text"], str):
        return f"'text' is {type(record['text']).__name__}, not a string"
    return ""


# JSON may spell a UTF-16 surrogate alone (`"\\ud800"`): json.loads accepts it, but the string
# is not Unicode text that any UTF-8 file (or the tokenizer) can hold. Lines with such an escape
# (or with an escaped backslash before "ud8..", which this also matches) get the full check.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def surrogate_problem(value: Any, path: tuple[str, ...] = (), key: bool = False) -> str:
    """Why a parsed JSON value is not valid Unicode text (a lone surrogate in a string or a key,
    named by its dotted path), or ""."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            dotted = f"'{'.'.join(path)}'" if path else "the record"
            where = f"a key in {dotted}" if key else dotted
            return f"{where} holds a lone surrogate (U+{ord(value[e.start]):04X}) at character {e.start}"
        return ""
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = [(str(i), sub) for i, sub in enumerate(value)]
    else:
        return ""
    for name, sub in items:
        problem = surrogate_problem(name, path, key=True) or surrogate_problem(sub, (*path, name))
        if problem:
            return problem
    return ""


# Python's json gives up near its recursion limit (1,000 frames, less those of its caller), so
# how deep a line may nest would depend on the stage and worker reading it: a fixed limit well
# below it treats a line alike everywhere, and leaves the stack room to check and write it.
MAX_JSON_DEPTH = 500
TOO_DEEP = f"JSON nested deeper than {MAX_JSON_DEPTH} levels"


def json_depth(value: Any) -> int:
    """How many arrays and objects nest in a parsed JSON value, the outermost counted: level by
    level, without recursion (the value may nest as deep as json.loads allows)."""
    depth, level = 0, [value] if isinstance(value, (dict, list)) else []
    while level:
        depth += 1
        level = [
            sub
            for v in level
            for sub in (v.values() if isinstance(v, dict) else v)
            if isinstance(sub, (dict, list))
        ]
    return depth


def parse_json(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    """A line's JSON object, or None and the reason it is not one (no field is checked beyond
    being valid Unicode text)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"invalid UTF-8 at byte {e.start}"
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"not JSON ({e.msg})"
    except RecursionError:  # valid JSON nested deeper than Python's recursion limit
        return None, TOO_DEEP
    except ValueError as e:  # valid JSON: an integer past Python's 4,300-digit limit
        return None, f"JSON Python cannot read ({str(e).split(':')[0]})"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    # (depth <= the brackets a line opens: most lines open too few to need the walk)
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and json_depth(record) > MAX_JSON_DEPTH:
        return None, TOO_DEEP
    if _SURROGATE_ESCAPE.search(text):
        problem = surrogate_problem(record)
        if problem:
            return None, problem
    return record, ""


def read_records(
    path: Path, on_bytes: Callable[[int], None] | None = None
) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    """(line number, record, "") of each line of a JSON-lines file or each row of a Parquet file,
    or (line number, None, why not); no field is checked (eval data need not have `text`). A
    blank line is (line number, None, ""). `on_bytes`: progress, as in `open_text_lines`."""
    if is_parquet(path):
        require_pyarrow(path)  # an install problem, never an invalid line
        yield from parquet_rows(path, on_bytes)
        return
    line_no = 0
    # (not enumerate: it keeps its last (number, line) pair alive, a 40 MB line with it)
    for raw in open_text_lines(path, on_bytes):
        line_no += 1
        if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]  # a byte-order mark some editors write first
        blank = not raw or raw.isspace()  # (not raw.strip(): that copies a 40 MB line)
        entry = (line_no, None, "") if blank else (line_no, *parse_json(raw))
        del raw  # not held while the caller works on the record
        yield entry


def _documents(
    entries: Iterator[tuple[int, dict[str, Any] | None, str]],
) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    """`entries` with each record that is not a document (no string `text`) turned into why."""
    for line_no, record, reason in entries:
        if record is not None:
            reason = record_problem(record)
        yield line_no, None if reason else record, reason


# --- Parquet (`parquet.py`) ------------------------------------------------------------------


def _parquet_entries(
    path: Path, strict: bool, on_bytes: Callable[[int], None] | None
) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    """Every row of a Parquet file: (row number, record, "") or (row number, None, reason)."""
    with open_parquet(path) as file:
        names = file.schema_arrow.names
        if "text" not in names:
            # A file-wide fault, named once under strict; otherwise counted per row, so that
            # documents + invalid = rows, as documents + invalid = non-blank lines in JSON lines.
            shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
            reason = f"no 'text' column (columns: {shown})"
            if strict:
                raise LmpipeError(f"{path}: {reason}")
            if on_bytes is not None:
                on_bytes(path.stat().st_size)
            yield from ((row_no, None, reason) for row_no in range(1, file.metadata.num_rows + 1))
            return
        yield from _documents(batch_rows(file, path, on_bytes))


def read_documents(
    path: Path,
    strict: bool = True,
    invalid: InvalidLines | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, record) for each valid line (row, for Parquet); blank lines are skipped
    silently, but a file with no other line (no row) is one invalid line ("empty file") or, when
    strict, an error. `on_bytes` reports reading progress in file bytes (see `open_text_lines`).
    Data that breaks off (a truncated or corrupt .zst / .gz / .parquet) ends the file: an error
    when strict, otherwise one invalid line after the last one read, the lines before it kept."""
    if is_parquet(path):
        require_pyarrow(path)  # an install problem, never an invalid line
        entries = _parquet_entries(path, strict, on_bytes)
        empty = "empty file (no rows)"
    else:
        entries = _documents(read_records(path, on_bytes))
        empty = "empty file (no non-blank line)"
    seen = False
    for line_no, record, reason in ending_at_break(entries, path, strict or invalid is None):
        if record is None and not reason:  # a blank line: not a document, counted apart
            if invalid is not None:
                invalid.blank += 1
            continue
        seen = True
        if record is None:
            if strict:
                raise LmpipeError(f"{path}:{line_no}: {reason}")
            if invalid is not None:
                invalid.add(line_no, reason)
            continue
        yield line_no, record
    if not seen:  # an empty file is bad input too: often a failed download or export
        if strict:
            raise LmpipeError(f"{path}: {empty}")
        if invalid is not None:
            invalid.add(1, empty)


def ending_at_break(
    entries: Iterator[tuple[int, dict[str, Any] | None, str]], path: Path, strict: bool
) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    """`entries` up to data that breaks off (a truncated or corrupt .zst / .gz / .parquet): its
    error when `strict`, else one last invalid entry after the last line read, "unreadable from
    here on", so that the lines before it are kept and the break is counted as a bad line."""
    line_no = 0
    try:
        for line_no, record, reason in entries:
            yield line_no, record, reason
    except LmpipeError as e:
        if strict:
            raise
        yield line_no + 1, None, f"unreadable from here on ({str(e).removeprefix(f'{path}: ')})"


class DocumentWriter:
    """Write records as `.jsonl.zst` shards of about `shard_bytes` uncompressed bytes each.

    Shards are named `{prefix}-{index:05d}.jsonl.zst`; `files` lists what was written, in order.
    """

    def __init__(
        self, folder: Path, prefix: str = "part", shard_bytes: int = 256 << 20, level: int = 3
    ):
        self.folder, self.prefix, self.shard_bytes, self.level = folder, prefix, shard_bytes, level
        self.files: list[Path] = []
        self._stream: Any = None
        self._raw: Any = None
        self._written = 0

    def _open_next(self) -> None:
        self.close()
        path = self.folder / f"{self.prefix}-{len(self.files):05d}.jsonl.zst"
        self.files.append(path)
        self._raw = open(path, "wb")
        # With each frame's checksum: damage to a shard is then an error on reading, not text
        # that silently differs (a reader checks it at the frame's end).
        compressor = zstandard.ZstdCompressor(level=self.level, write_checksum=True)
        self._stream = compressor.stream_writer(self._raw)
        self._written = 0

    def write(self, record: dict[str, Any]) -> None:
        if self._stream is None or self._written >= self.shard_bytes:
            self._open_next()
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        self._stream.write(line)
        self._written += len(line)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()  # also closes the raw file and ends the zstd frame
            self._stream = self._raw = None

    def __enter__(self) -> DocumentWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
