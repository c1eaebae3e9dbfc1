"""Token shards: the packed, tokenizer-stamped output of `lmpipe tokenize`, and their reader.

A shard folder holds, for each split (`train`, `heldout`), a sequence of shard pairs and one
`manifest.json`, written last (a folder without it is unfinished):

    train-00000.bin   tokens: flat little-endian uint16 (`<u2`), no header. Every document is
                      followed by the end-of-text id (GPT-2: 50256), so the file is the
                      concatenation `doc0 EOT doc1 EOT ...`; an empty document is a lone EOT.
    train-00000.idx   document offsets: little-endian uint64 (`<u8`), no header, n_docs + 1
                      entries; document i is tokens [idx[i], idx[i+1]) of the .bin, its EOT
                      included (the last token of that range); idx[0] = 0, idx[-1] = n_tokens.
    heldout-00000.bin / .idx   the same for the held-out split.
    manifest.json     {"format": "lmpipe-tokens", "format_version": 1,
                       "tokenizer": {"name", "ranks_sha256", "vocab_size", "eot_id"},
                       "dtype": "<u2", "index_dtype": "<u8",
                       "splits": {split: {"n_tokens", "n_documents",
                                          "shards": [{"bin", "idx", "n_tokens", "n_documents",
                                                      "bin_sha256", "idx_sha256"}, ...]}},
                       "inputs": [...], "totals": {...}, "settings": {...}}

`format_version` is the tokenize stage's manifest version too (`folders.FORMAT_VERSIONS`): a
higher one is a newer lmpipe's folder, refused by `read_manifest` in one line; unknown keys are
ignored (an addition an older reader may skip keeps the version).

Documents never straddle shards; a shard is closed after the document that brings it to
`shard_tokens` tokens or more. The global token stream of a split is its shards in manifest order.
A user's own tool reads a split with `numpy.fromfile(bin, "<u2")` and `numpy.fromfile(idx, "<u8")`.

`ShardWriter` writes one split from token arrays (tokenize is: encode, then `ShardWriter`);
`TokenShards` reads one split through `numpy.memmap`, never loading a shard whole, and refuses a
folder whose manifest lacks a field or holds one of the wrong type, names a shard otherwise than
`ShardWriter` does (so nothing outside the folder, of another split or twice is read), or whose
tokenizer fingerprint, file sizes or (with `verify`) sha256 disagree with its manifest.
"""

from __future__ import annotations

import collections
import hashlib
import reprlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.folders import FORMAT_VERSIONS, read_manifest, sha256_file, write_manifest

FORMAT = "lmpipe-tokens"
FORMAT_VERSION = FORMAT_VERSIONS["tokenize"]  # also the tokenize stage's manifest version
SPLITS = ("train", "heldout")
TOKEN_DTYPE = np.dtype("<u2")
INDEX_DTYPE = np.dtype("<u8")
# Open memmaps hold a file descriptor each; a 600B-token corpus has thousands of shards.
MAX_OPEN_SHARDS = 64


def shard_names(split: str, index: int) -> tuple[str, str]:
    stem = f"{split}-{index:05d}"
    return f"{stem}.bin", f"{stem}.idx"


class ShardWriter:
    """Write one split of a shard folder from documents given as token arrays.

    `add(docs)` appends documents (each without its end-of-text; the writer appends it) in order;
    `close()` finishes the last shard and returns the split's manifest entry. Files are hashed as
    they are written, so closing a shard never re-reads it.
    """

    def __init__(
        self,
        folder: Path,
        split: str,
        *,
        eot_id: int,
        vocab_size: int,
        shard_tokens: int = 128 << 20,
    ) -> None:
        if shard_tokens < 1:
            raise LmpipeError(f"shard_tokens must be at least 1, got {shard_tokens}")
        if vocab_size > np.iinfo(TOKEN_DTYPE).max + 1:
            raise ValueError(f"vocab_size {vocab_size} does not fit {TOKEN_DTYPE}")
        self.folder, self.split = Path(folder), split
        self.eot_id, self.vocab_size, self.shard_tokens = eot_id, vocab_size, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._file: Any = None
        self._digest: Any = None
        self._offsets: list[int] = []

    def _open(self) -> None:
        bin_name, _ = shard_names(self.split, len(self.shards))
        self._file = open(self.folder / bin_name, "wb")
        self._digest = hashlib.sha256()
        self._offsets = [0]

    def _finish_shard(self) -> None:
        self._file.close()
        bin_name, idx_name = shard_names(self.split, len(self.shards))
        index = np.asarray(self._offsets, dtype=INDEX_DTYPE).tobytes()
        (self.folder / idx_name).write_bytes(index)
        self.shards.append(
            {
                "bin": bin_name,
                "idx": idx_name,
                "n_tokens": self._offsets[-1],
                "n_documents": len(self._offsets) - 1,
                "bin_sha256": self._digest.hexdigest(),
                "idx_sha256": hashlib.sha256(index).hexdigest(),
            }
        )
        self._file = None

    def _write(self, tokens: np.ndarray) -> None:
        data = tokens.tobytes()
        self._file.write(data)
        self._digest.update(data)

    def add(self, docs: Sequence[Sequence[int] | np.ndarray]) -> None:
        """Append documents (token ids without end-of-text), in order."""
        if not docs:
            return
        eot = np.array([self.eot_id], dtype=np.int64)
        parts = [p for d in docs for p in (np.asarray(d, dtype=np.int64).reshape(-1), eot)]
        lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
        flat = np.concatenate(parts)
        if flat.min() < 0 or flat.max() >= self.vocab_size:
            raise ValueError(f"token id outside [0, {self.vocab_size}) in a document")
        self.add_packed(flat.astype(TOKEN_DTYPE), lengths)

    def add_packed(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents already packed: `flat` is `doc EOT doc EOT ...` as uint16, `lengths`
        the tokens of each document with its EOT. The fast path: one array per batch, because
        per-document numpy calls would cost more than the encoding."""
        ends = np.cumsum(lengths, dtype=np.int64)
        if len(flat) != (int(ends[-1]) if len(ends) else 0) or np.any(lengths < 1):
            raise ValueError("packed tokens and document lengths disagree")
        if len(ends) and np.any(flat[ends - 1] != self.eot_id):
            raise ValueError("a packed document does not end with end-of-text")
        # Split the batch at document boundaries into the current and following shards.
        pos = 0
        for length, end in zip(lengths.tolist(), ends.tolist(), strict=True):
            if self._file is None:
                self._open()
            self._offsets.append(self._offsets[-1] + length)
            if self._offsets[-1] >= self.shard_tokens:
                self._write(flat[pos:end])
                pos = end
                self._finish_shard()
        if pos < len(flat):
            self._write(flat[pos:])

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # On failure the half-written shard is abandoned (its folder is discarded by the stage);
        # on success the caller has already called close() and this does nothing.
        if exc_type is not None and self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> dict[str, Any]:
        """Finish the open shard; the split's manifest entry (counts and shard list)."""
        if self._file is not None:
            self._finish_shard()
        return {
            "n_tokens": sum(s["n_tokens"] for s in self.shards),
            "n_documents": sum(s["n_documents"] for s in self.shards),
            "shards": self.shards,
        }


def format_fields(
    splits: dict[str, dict[str, Any]],
    *,
    tokenizer_name: str,
    tokenizer_sha256: str,
    vocab_size: int,
    eot_id: int,
) -> dict[str, Any]:
    """The manifest fields that describe the format; a stage adds inputs, totals and settings."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tokenizer": {
            "name": tokenizer_name,
            "ranks_sha256": tokenizer_sha256,
            "vocab_size": vocab_size,
            "eot_id": eot_id,
        },
        "dtype": TOKEN_DTYPE.str,
        "index_dtype": INDEX_DTYPE.str,
        "splits": splits,
    }


# What a manifest's fields hold, in words for check_manifest's errors.
KINDS = {int: "an integer >= 0", str: "a string", dict: "a JSON object", list: "a list"}
SHARD_FIELDS = {"n_tokens": int, "n_documents": int, "bin_sha256": str, "idx_sha256": str}


def check_manifest(manifest: dict[str, Any], where: Path) -> None:
    """Refuse, in one line naming `where` (the manifest.json) and the key, a manifest whose
    fields the reader uses are missing or of the wrong type: counts integers >= 0 (not bools, not
    NaN, which Python's json reads), names and digests strings, `vocab_size` one that token ids
    of `TOKEN_DTYPE` can reach, and every shard named exactly as `ShardWriter` names it (every
    lmpipe has: `shard_names`), so that no name reaches outside the folder or into another split
    and no shard is listed twice."""

    def fail(key: str, why: str) -> NoReturn:
        raise LmpipeError(f"{where}: {key} {why}")

    def get(entry: dict[str, Any], name: str, key: str, kind: type) -> Any:
        """entry[name], of type `kind` (an int >= 0); `key` is entry's own key, "" at the top."""
        full = f"{key}.{name}" if key else name
        if name not in entry:
            fail(full, "is missing")
        value = entry[name]
        wrong = not isinstance(value, kind) or isinstance(value, bool)
        if wrong or isinstance(value, int) and value < 0:
            fail(full, f"is {reprlib.repr(value)}, not {KINDS[kind]}")
        return value

    tok = get(manifest, "tokenizer", "", dict)
    get(tok, "name", "tokenizer", str)
    get(tok, "ranks_sha256", "tokenizer", str)
    vocab_size, most = get(tok, "vocab_size", "tokenizer", int), np.iinfo(TOKEN_DTYPE).max + 1
    if not 1 <= vocab_size <= most:
        fail(
            "tokenizer.vocab_size",
            f"is {reprlib.repr(vocab_size)}, outside [1, {most}] ({TOKEN_DTYPE} ids)",
        )
    eot_id = get(tok, "eot_id", "tokenizer", int)
    if eot_id >= vocab_size:
        fail("tokenizer.eot_id", f"is {eot_id}, outside the vocabulary ({vocab_size} ids)")
    for split in get(manifest, "splits", "", dict):
        key = f"splits.{split}"
        if "/" in split or "\0" in split:  # a path, or a name no file can have
            fail(key, "is not a plain name (shard files are named after their split)")
        entry = get(manifest["splits"], split, "splits", dict)
        get(entry, "n_tokens", key, int)
        get(entry, "n_documents", key, int)
        for i, shard in enumerate(get(entry, "shards", key, list)):
            if not isinstance(shard, dict):
                fail(f"{key}.shards[{i}]", f"is {reprlib.repr(shard)}, not {KINDS[dict]}")
            for field, name in zip(("bin", "idx"), shard_names(split, i), strict=True):
                if get(shard, field, f"{key}.shards[{i}]", str) != name:
                    fail(
                        f"{key}.shards[{i}].{field}",
                        f"is {reprlib.repr(shard[field])}, not {name!r}: shard files are read only "
                        "under the names lmpipe writes, in the folder and their split",
                    )
            for field, kind in SHARD_FIELDS.items():
                get(shard, field, f"{key}.shards[{i}]", kind)
            # ShardWriter closes a shard only after a document (numpy cannot map an empty file)
            if shard["n_documents"] < 1 or shard["n_tokens"] < shard["n_documents"]:
                fail(
                    f"{key}.shards[{i}]",
                    f"holds {shard['n_documents']} documents in {shard['n_tokens']} tokens; lmpipe "
                    "writes at least one document to a shard, each ending with end-of-text",
                )


class TokenShards:
    """One split of a shard folder as a single token stream, read through `numpy.memmap`.

    Opening checks the manifest (format, `check_manifest`, tokenizer fingerprint), every shard
    file's size and, with `verify`, its sha256; any mismatch is an `LmpipeError` naming the file.
    `tokenizer_sha256` is the fingerprint of the tokenizer in use; by default it is
    `ranks_sha256()` of the manifest's tokenizer (which loads its files); pass it to read shards
    without the tokenizer files.
    `mixture`: the caller reads `--data NAME=PATH:WEIGHT` sources, so the error for a folder of
    `--split-by-field` folders suggests that form (otherwise a path, PATH/NAME).
    """

    def __init__(
        self,
        folder: Path,
        split: str = "train",
        verify: bool = True,
        *,
        tokenizer_sha256: str | None = None,
        mixture: bool = False,
    ) -> None:
        self.folder = Path(folder)
        self.split = split
        manifest = read_manifest(self.folder, "tokenize")
        self.manifest = manifest
        where = self.folder / "manifest.json"
        if "split_by_field" in manifest:
            names = ", ".join(manifest.get("sources", {})) or "none"
            # only `lmpipe train` and `sweep` take named sources; eval, inspect, coord-check a path
            use = f"--data NAME={self.folder}/NAME:WEIGHT" if mixture else f"{self.folder}/NAME"
            raise LmpipeError(
                f"{self.folder}: holds one token folder per value of "
                f"{manifest['split_by_field']} ({names}); use those, e.g. {use}"
            )
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise LmpipeError(
                f"{where}: shard format {manifest.get('format')!r} version "
                f"{manifest.get('format_version')!r}; this lmpipe reads {FORMAT!r} "
                f"version {FORMAT_VERSION}"
            )
        check_manifest(manifest, where)
        tok = manifest["tokenizer"]
        if tokenizer_sha256 is None:
            from lmpipe.dataprep.tokenizer import ranks_sha256

            tokenizer_sha256 = ranks_sha256(tok["name"])
        if tok["ranks_sha256"] != tokenizer_sha256:
            raise LmpipeError(
                f"{where}: made with another tokenizer (ranks sha256 {tok['ranks_sha256'][:12]}..., "
                f"the tokenizer in use has {tokenizer_sha256[:12]}...); re-tokenize the documents"
            )
        if (
            manifest.get("dtype") != TOKEN_DTYPE.str
            or manifest.get("index_dtype") != INDEX_DTYPE.str
        ):
            raise LmpipeError(f"{where}: unsupported dtypes {manifest.get('dtype')!r}")
        if split not in manifest["splits"]:
            raise LmpipeError(f"{where}: no split {split!r} (has {', '.join(manifest['splits'])})")
        self.eot_id: int = tok["eot_id"]
        self.vocab_size: int = tok["vocab_size"]
        entry = manifest["splits"][split]
        self.shards: list[dict[str, Any]] = entry["shards"]
        self.n_tokens: int = entry["n_tokens"]
        self.n_documents: int = entry["n_documents"]
        self._check_files(verify)
        sizes = np.array([s["n_tokens"] for s in self.shards], dtype=np.int64)
        # starts[i] is the global position of shard i's first token; starts[-1] == n_tokens.
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        if int(self._starts[-1]) != self.n_tokens:
            raise LmpipeError(f"{where}: split {split!r} token count disagrees with its shards")
        self._maps: collections.OrderedDict[int, np.memmap] = collections.OrderedDict()

    def _check_files(self, verify: bool) -> None:
        for s in self.shards:
            for key, size in (
                ("bin", s["n_tokens"] * TOKEN_DTYPE.itemsize),
                ("idx", (s["n_documents"] + 1) * INDEX_DTYPE.itemsize),
            ):
                path = self.folder / s[key]
                if not path.is_file():
                    raise LmpipeError(f"{path}: shard file missing")
                actual = path.stat().st_size
                if actual != size:
                    raise LmpipeError(
                        f"{path}: {actual} bytes, the manifest says {size} (truncated or replaced)"
                    )
        if verify:
            self.verify_checksums()

    def verify_checksums(self, part: int = 0, parts: int = 1) -> None:
        """Check the sha256 of every `parts`-th shard from `part` on (so that several ranks can
        share the hashing of a large split); a mismatch is an `LmpipeError` naming the file."""
        for s in self.shards[part::parts]:
            for key in ("bin", "idx"):
                path = self.folder / s[key]
                if sha256_file(path) != s[f"{key}_sha256"]:
                    raise LmpipeError(f"{path}: sha256 differs from the manifest (corrupted)")

    def _shard(self, i: int) -> np.memmap:
        """Shard i's tokens, mapped; a small LRU keeps the number of open files bounded."""
        m = self._maps.get(i)
        if m is None:
            n = self.shards[i]["n_tokens"]
            path = self.folder / self.shards[i]["bin"]
            # numpy refuses to map an empty file; an empty shard cannot be written anyway.
            m = np.memmap(path, dtype=TOKEN_DTYPE, mode="r", shape=(n,))
            self._maps[i] = m
            if len(self._maps) > MAX_OPEN_SHARDS:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(i)
        return m

    def read_into(self, start: int, out: np.ndarray) -> None:
        """Fill `out` with stream tokens [start, start + len(out)), across shard boundaries."""
        stop = start + len(out)
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.n_tokens})")
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos = start
        while pos < stop:
            base = int(self._starts[i])
            take = min(stop, int(self._starts[i + 1])) - pos
            if take > 0:
                piece = out[pos - start : pos - start + take]
                piece[:] = self._shard(i)[pos - base : pos - base + take]
                self._check_ids(piece, i, pos - base)
                pos += take
            i += 1

    def _check_ids(self, tokens: np.ndarray, shard: int, offset: int) -> None:
        """Refuse ids outside the manifest's vocabulary, which only a damaged shard holds (one
        read without its sha256 check): a model would index past its embedding table."""
        if len(tokens) and int(tokens.max()) >= self.vocab_size:
            at = int(np.argmax(tokens >= self.vocab_size))
            raise LmpipeError(
                f"{self.folder / self.shards[shard]['bin']}: token id {int(tokens[at])} at token "
                f"offset {offset + at} is outside the vocabulary ({self.vocab_size} ids); the shard "
                "is damaged (`lmpipe inspect` checks its sha256)"
            )

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """A copy of stream tokens [start, stop) as uint16."""
        out = np.empty(max(stop - start, 0), dtype=TOKEN_DTYPE)
        if stop < start:
            raise IndexError(f"token range [{start}, {stop}) is reversed")
        self.read_into(start, out)
        return out

    def offsets(self, shard: int) -> np.ndarray:
        """Shard `shard`'s document offsets (n_docs + 1 entries), checked for consistency."""
        s = self.shards[shard]
        path = self.folder / s["idx"]
        idx = np.fromfile(path, dtype=INDEX_DTYPE)
        # Cheap structural checks catch a corrupted index even when sha256 was skipped.
        if len(idx) != s["n_documents"] + 1 or idx[0] != 0 or int(idx[-1]) != s["n_tokens"]:
            raise LmpipeError(f"{path}: document index disagrees with the manifest")
        if len(idx) > 1 and np.any(np.diff(idx.astype(np.int64)) < 1):
            raise LmpipeError(f"{path}: document offsets are not increasing")
        return idx

    def documents(self) -> Iterator[np.ndarray]:
        """Each document's tokens (uint16, without the trailing end-of-text), in stream order."""
        for i, s in enumerate(self.shards):
            idx = self.offsets(i).astype(np.int64)
            tokens = self._shard(i)
            ends = idx[1:] - 1
            if len(ends) and np.any(tokens[ends] != self.eot_id):
                raise LmpipeError(
                    f"{self.folder / s['bin']}: a document does not end with end-of-text "
                    f"{self.eot_id} (corrupted shard or index)"
                )
            for start, end in zip(idx[:-1].tolist(), ends.tolist(), strict=True):
                doc = np.array(tokens[start:end])
                self._check_ids(doc, i, start)
                yield doc

    def document_lengths(self) -> np.ndarray:
        """Tokens per document (end-of-text excluded), in stream order."""
        parts = [np.diff(self.offsets(i).astype(np.int64)) - 1 for i in range(len(self.shards))]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def write_shard_folder(
    folder: Path,
    splits: dict[str, Sequence[Sequence[int] | np.ndarray]],
    *,
    tokenizer_name: str | None = None,
    tokenizer_sha256: str | None = None,
    vocab_size: int | None = None,
    eot_id: int | None = None,
    shard_tokens: int = 128 << 20,
    **fields: Any,
) -> dict[str, Any]:
    """Write a complete shard folder (manifest included) from token arrays, one list per split.

    For tests and for users' own tokenizers; `lmpipe tokenize` streams through `ShardWriter`.
    Tokenizer fields left out are GPT-2's (the fingerprint then needs its files). Returns the
    manifest.
    """
    from lmpipe.dataprep import tokenizer

    tokenizer_name = tokenizer_name or tokenizer.NAME
    vocab_size = vocab_size or tokenizer.VOCAB_SIZE
    eot_id = tokenizer.EOT_ID if eot_id is None else eot_id
    tokenizer_sha256 = tokenizer_sha256 or tokenizer.ranks_sha256(tokenizer_name)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries = {}
    for split in dict.fromkeys([*SPLITS, *splits]):
        with ShardWriter(
            folder, split, eot_id=eot_id, vocab_size=vocab_size, shard_tokens=shard_tokens
        ) as writer:
            writer.add(list(splits.get(split, [])))
            entries[split] = writer.close()
    return write_manifest(
        folder,
        "tokenize",
        **format_fields(
            entries,
            tokenizer_name=tokenizer_name,
            tokenizer_sha256=tokenizer_sha256,
            vocab_size=vocab_size,
            eot_id=eot_id,
        ),
        **fields,
    )
