"""Documents: JSON lines, plain (`.jsonl`) or zstd-compressed (`.jsonl.zst`), one object a line.

Each object needs a string `text`; every other field passes through untouched. Reading streams:
nothing holds a whole file in memory. A bad line (not JSON, not UTF-8, no string `text`) is either
an error naming the file and line (`strict=True`, the default) or counted in `InvalidLines`, with
the first few line numbers kept for the report.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

from lmpipe.dataprep.errors import LmpipeError

SUFFIXES = (".jsonl", ".jsonl.zst")
MAX_REPORTED_LINES = 5


def is_document_file(path: Path) -> bool:
    return path.name.endswith(SUFFIXES)


def find_inputs(paths: Iterable[Path | str]) -> list[Path]:
    """Expand files and folders (recursively) into a sorted list of document files."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and is_document_file(f))
            if not files:
                raise LmpipeError(f"{p}: folder holds no {' or '.join(SUFFIXES)} files")
            found.extend(files)
        elif p.is_file():
            if not is_document_file(p):
                raise LmpipeError(f"{p}: not a {' or '.join(SUFFIXES)} file")
            found.append(p)
        else:
            raise LmpipeError(f"{p}: no such file or folder")
    if not found:
        raise LmpipeError("no input files given")
    # The same file named twice (a folder and a file inside it) would be read twice.
    return list(dict.fromkeys(found))


@dataclass
class InvalidLines:
    """Bad lines of one file: how many, and the first few line numbers with the reason."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, line_no: int, reason: str) -> None:
        self.count += 1
        if len(self.examples) < MAX_REPORTED_LINES:
            self.examples.append(f"line {line_no}: {reason}")


def open_text_lines(path: Path) -> Iterator[bytes]:
    """Raw lines of a plain or zstd-compressed file, without decoding."""
    if path.name.endswith(".zst"):
        with open(path, "rb") as raw:
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            try:
                yield from io.BufferedReader(reader, buffer_size=1 << 20)
            except zstandard.ZstdError as e:
                raise LmpipeError(f"{path}: corrupt or truncated zstd data ({e})") from None
    else:
        with open(path, "rb") as f:
            yield from f


def parse_line(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    """A record, or None and the reason it is not one."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"invalid UTF-8 at byte {e.start}"
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"not JSON ({e.msg})"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    if "text" not in record:
        return None, "no 'text' field"
    if not isinstance(record["text"], str):
        return None, f"'text' is {type(record['text']).__name__}, not a string"
    return record, ""


def read_documents(
    path: Path, strict: bool = True, invalid: InvalidLines | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, record) for each valid line; blank lines are skipped silently."""
    for line_no, raw in enumerate(open_text_lines(path), start=1):
        if not raw.strip():
            continue
        record, reason = parse_line(raw)
        if record is None:
            if strict:
                raise LmpipeError(f"{path}:{line_no}: {reason}")
            if invalid is not None:
                invalid.add(line_no, reason)
            continue
        yield line_no, record


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
        self._stream = zstandard.ZstdCompressor(level=self.level).stream_writer(self._raw)
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
