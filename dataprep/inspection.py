"""`lmpipe inspect`: what a shard folder holds, checked, and optionally decoded back to documents.

`inspect_shards(folder)` opens every split with `TokenShards` (tokenizer fingerprint, sizes and,
with `verify`, sha256 checked), prints the tokenizer, per-split counts and document length
statistics, and returns them. With `decode`, it also writes every document of every split, in
shard order (train, then heldout), as JSON lines `{"text": ..., "split": ...}`, so anyone can read
exactly what training will see. The file must be new and outside the folder; it is written as
`<file>.partial` and renamed when complete. A document is decoded and written a slice of
`DECODE_TOKENS` tokens at a time, so memory does not grow with its length.
"""

from __future__ import annotations

import codecs
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.folders import check_output, partial_path, writing_into
from lmpipe.dataprep.shards import SPLITS, TokenShards

if TYPE_CHECKING:  # for annotations only: tiktoken is imported when --decode asks for it
    import tiktoken

# Tokens decoded at a time: a whole document as one Python list of ints took ~36 bytes a token
# (4.6 GB for a 140M-token document), and its text, JSON and line each a copy of it.
DECODE_TOKENS = 1 << 16


def split_summary(data: TokenShards) -> dict[str, Any]:
    lengths = data.document_lengths()
    stats = (
        {
            "min": int(lengths.min()),
            "median": float(np.median(lengths)),
            "mean": float(lengths.mean()),
            "max": int(lengths.max()),
        }
        if len(lengths)
        else {}
    )
    return {
        "n_documents": data.n_documents,
        "n_tokens": data.n_tokens,
        "n_shards": len(data.shards),
        "document_tokens": stats,
    }


def inspect_shards(
    folder: Path, *, decode: Path | None = None, verify: bool = True
) -> dict[str, Any]:
    """Summarise (and with `decode`, write out as JSON lines) a `lmpipe tokenize` folder."""
    from rich.console import Console

    folder = Path(folder)
    if decode is not None:
        decode = Path(decode)
        check_output(decode, [folder], what="--decode file")
        if decode.exists() or decode.is_symlink():
            raise LmpipeError(f"{decode}: already exists; --decode writes a new file")
        if not decode.absolute().parent.is_dir():
            raise LmpipeError(f"{decode}: no folder {decode.parent} to write it in")
    splits = {split: TokenShards(folder, split, verify) for split in SPLITS}
    manifest = splits["train"].manifest
    tok = manifest["tokenizer"]
    summary = {
        "folder": str(folder),
        "tokenizer": tok,
        "verified": verify,
        "splits": {split: split_summary(data) for split, data in splits.items()},
    }
    console = Console()
    console.print(
        f"{folder}: tokenizer {tok['name']} (ranks sha256 {tok['ranks_sha256'][:12]}...), "
        f"vocab {tok['vocab_size']:,}, end-of-text {tok['eot_id']}; "
        + ("sha256 of every file verified" if verify else "sizes checked, sha256 skipped")
    )
    for split, s in summary["splits"].items():
        lengths = s["document_tokens"]
        spread = (
            f"tokens per document min {lengths['min']:,} median {lengths['median']:,.0f} "
            f"mean {lengths['mean']:,.1f} max {lengths['max']:,}"
            if lengths
            else "no documents"
        )
        console.print(
            f"  {split:<8} {s['n_documents']:>12,} documents {s['n_tokens']:>15,} tokens "
            f"{s['n_shards']:>5} shard(s); {spread}"
        )
    if decode is not None:
        from lmpipe.dataprep.tokenizer import get_encoding

        enc = get_encoding(tok["name"])
        n = 0
        # Written under another name and renamed when complete: a failed decode leaves no file
        # that looks whole.
        partial = partial_path(decode)
        try:  # "x": a new file, never one that exists (nor what a link there points to)
            f = open(partial, "x", encoding="utf-8")
        except FileExistsError:
            raise LmpipeError(
                f"{partial}: exists (an unfinished --decode, or not lmpipe's); remove it first"
            ) from None
        with _removed_on_error(partial), f, writing_into(partial):
            for split, data in splits.items():
                for i, doc in enumerate(data.documents()):
                    try:
                        write_document(f, enc, doc, split)
                    except UnicodeDecodeError:
                        # tokenize only writes tokens of valid text, so this is a damaged shard
                        raise LmpipeError(
                            f"{folder}: {split} document {i} does not decode to UTF-8 (corrupted?)"
                        ) from None
                    n += 1
        partial.replace(decode)
        console.print(f"  decoded {n:,} documents -> {decode}")
        summary["decoded"] = n
    return summary


def write_document(out: TextIO, enc: tiktoken.Encoding, doc: np.ndarray, split: str) -> None:
    """The JSON line `{"text": ..., "split": ...}` of `doc` (tokens), as json.dumps writes it,
    decoded and written a slice of tokens at a time; UnicodeDecodeError if it is not UTF-8."""
    # Incremental: a character whose bytes span two slices is decoded whole, and bytes that are
    # not UTF-8 raise wherever they fall (at the end of the document too, with final=True).
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="strict")
    out.write('{"text": "')
    for start in range(0, len(doc), DECODE_TOKENS):
        piece = utf8.decode(enc.decode_bytes(doc[start : start + DECODE_TOKENS].tolist()))
        # json escapes character by character: the pieces' escapes make the whole text's
        out.write(json.dumps(piece, ensure_ascii=False)[1:-1])
    utf8.decode(b"", final=True)
    out.write(f'", "split": {json.dumps(split, ensure_ascii=False)}}}\n')


@contextlib.contextmanager
def _removed_on_error(path: Path) -> Iterator[None]:
    try:
        yield
    except BaseException:
        path.unlink(missing_ok=True)
        raise
