"""Inputs as they come from elsewhere: a Hugging Face snapshot's links, `zstd --long` frames, a
Mac's AppleDouble files, two links to one file, compressed data named `.jsonl`, padded gzip."""

from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path

import pytest
import zstandard

from lmpipe.dataprep.dedup import dedup
from lmpipe.dataprep.documents import InvalidLines, find_inputs, read_documents
from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.tokenize import tokenize
from tests.dataprep.test_dedup import prose

DOCS = [prose(100 + i) for i in range(5)]


def jsonl(texts: list[str]) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


@pytest.fixture
def hub(tmp_path) -> Path:
    """The Hugging Face hub cache's layout: `snapshots/<rev>/<name>` are links to `blobs/<sha>`,
    files without a suffix; the corpus has 5 documents, the eval file the first of them."""
    blobs = tmp_path / "hub" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "3f2a9c").write_bytes(zstandard.ZstdCompressor().compress(jsonl(DOCS)))
    (blobs / "77e1b0").write_bytes(zstandard.ZstdCompressor().compress(jsonl(DOCS[:1])))
    for rev, name, blob in (("abc", "train.jsonl.zst", "3f2a9c"), ("def", "evals.jsonl.zst", "77e1b0")):  # fmt: skip
        snapshot = tmp_path / "hub" / "snapshots" / rev
        snapshot.mkdir(parents=True)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob))
    return tmp_path / "hub" / "snapshots"


def test_dedup_reads_a_linked_file_by_its_own_name(hub, tmp_path):
    """By the link's name (`.jsonl.zst`), not its target's (`3f2a9c`: read as plain text, every
    line was invalid UTF-8 and nothing was kept)."""
    counts = dedup([hub / "abc"], tmp_path / "clean", progress=False)["counts"]
    assert list(counts["sources"]) == ["abc"]
    assert counts["total"]["input"]["documents"] == 5
    assert counts["total"]["kept"]["documents"] == 5
    assert counts["total"]["invalid"]["documents"] == 0
    # named directly, its source is the folder it is named in, not the link target's `blobs`
    counts = dedup([hub / "abc" / "train.jsonl.zst"], tmp_path / "one", progress=False)["counts"]
    assert list(counts["sources"]) == ["abc"]
    assert counts["sources"]["abc"]["kept"]["documents"] == 5


def test_decontaminate_reads_a_linked_eval_file(hub, tmp_path):
    manifest = dedup([hub / "abc"], tmp_path / "clean", decontaminate=[hub / "def"], progress=False)
    total = manifest["counts"]["total"]
    assert total["input"]["documents"] == 5
    assert total["decontaminated"]["documents"] == 1  # was 0: the eval file read as 2 bad lines
    assert total["kept"]["documents"] == 4
    assert total["invalid"]["documents"] == 0
    [evals] = manifest["decontaminate"]
    assert (evals["path"], evals["documents"], evals["invalid"]) == (
        str(hub / "def" / "evals.jsonl.zst"),
        1,
        0,
    )


def test_tokenize_and_dedup_read_a_snapshot_alike(gpt2, hub, tmp_path):
    tokenized = tokenize([hub / "abc"], tmp_path / "tok", holdout=0.0)
    assert (tokenized["totals"]["documents"], tokenized["totals"]["invalid"]) == (5, 0)
    counts = dedup([hub / "abc"], tmp_path / "clean", progress=False)["counts"]["total"]
    assert counts["kept"]["documents"] == tokenized["totals"]["documents"]


def test_a_zstd_long_frame_is_read(tmp_path):
    """`zstd --long=28` asks for a 256 MiB window, past the library's default limit of 128 MiB
    (it was "corrupt zstd data ... Frame requires too much memory")."""
    params = zstandard.ZstdCompressionParameters(window_log=28)
    buffer = io.BytesIO()
    # streamed (no content size in the frame): the frame keeps the window it was written with
    with zstandard.ZstdCompressor(compression_params=params).stream_writer(
        buffer, closefd=False
    ) as writer:
        writer.write(jsonl(DOCS))
    data = buffer.getvalue()
    assert zstandard.get_frame_parameters(data).window_size == 1 << 28
    path = tmp_path / "long.jsonl.zst"
    path.write_bytes(data)
    assert [r["text"] for _, r in read_documents(path)] == DOCS


def test_hidden_files_in_a_folder_are_skipped_and_noted(tmp_path, capsys):
    """A Mac's `._a.jsonl.zst` (AppleDouble metadata) was read as a document file: a corrupt zstd
    line, or the end of a --strict run."""
    mac = tmp_path / "mac"
    mac.mkdir()
    (mac / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl(DOCS)))
    (mac / "._a.jsonl.zst").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    (mac / ".b.jsonl").write_bytes(jsonl(DOCS[:1]))
    (mac / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")  # not a document's suffix: silent
    skipped: list[Path] = []
    assert find_inputs([mac], skipped) == [mac / "a.jsonl.zst"]
    assert skipped == [mac / "._a.jsonl.zst", mac / ".b.jsonl"]
    assert capsys.readouterr().err == (
        f"note: 2 file(s) in {mac} skipped: hidden (a name starting with '.', as macOS's ._ files;"
        f" name a file to read it) ({mac}/._a.jsonl.zst, {mac}/.b.jsonl)\n"
    )
    manifest = dedup([mac], tmp_path / "clean", strict=True, progress=False)
    assert manifest["counts"]["total"]["kept"]["documents"] == 5
    assert manifest["skipped_inputs"] == [str(mac / "._a.jsonl.zst"), str(mac / ".b.jsonl")]
    # named, a hidden file is read
    assert find_inputs([mac / ".b.jsonl"]) == [mac / ".b.jsonl"]


@pytest.mark.parametrize("link", ["hard", "symbolic"])
def test_two_links_to_one_file_in_a_folder_are_an_error(tmp_path, link):
    """Named, the two were refused; inside a folder both were read (every document twice)."""
    folder = tmp_path / "hl"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(jsonl(DOCS))
    if link == "hard":
        os.link(folder / "a.jsonl", folder / "b.jsonl")
    else:
        (folder / "b.jsonl").symlink_to("a.jsonl")
    with pytest.raises(LmpipeError) as e:
        find_inputs([folder])
    assert str(e.value) == (
        f"{folder}/b.jsonl: the file {folder}/a.jsonl again, through a link; name each input once"
    )
    # named on the command line, as before
    with pytest.raises(LmpipeError, match=r"b\.jsonl: given as .*a\.jsonl and as .*b\.jsonl;"):
        find_inputs([folder / "a.jsonl", folder / "b.jsonl"])


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (
            zstandard.ZstdCompressor().compress(jsonl(DOCS)),
            "zstd data in a .jsonl file: name it .jsonl.zst",
        ),  # fmt: skip
        (gzip.compress(jsonl(DOCS)), "gzip data in a .jsonl file: name it .jsonl.gz"),
    ],
)
def test_compressed_data_named_jsonl_is_one_clear_reason(tmp_path, data, reason):
    """It was a few arbitrary "invalid UTF-8" lines, as many as the data's newline bytes."""
    path = tmp_path / "b.jsonl"
    path.write_bytes(data)
    invalid = InvalidLines()
    assert list(read_documents(path, strict=False, invalid=invalid)) == []
    assert invalid.count == 1
    assert invalid.examples == [f"line 1: unreadable from here on ({reason})"]
    with pytest.raises(LmpipeError) as e:
        list(read_documents(path, strict=True))
    assert str(e.value) == f"{path}: {reason}"


def test_zero_padding_after_a_gzip_member_is_the_end(tmp_path):
    """`gzip -t` and Python's gzip accept zeros after a member (it was "corrupt gzip data")."""
    path = tmp_path / "p.jsonl.gz"
    padding = bytes(512)
    path.write_bytes(gzip.compress(jsonl(DOCS[:2])) + padding + gzip.compress(jsonl(DOCS[2:])) + padding)  # fmt: skip
    assert gzip.decompress(path.read_bytes()) == jsonl(DOCS)
    invalid = InvalidLines()
    assert [r["text"] for _, r in read_documents(path, strict=False, invalid=invalid)] == DOCS
    assert invalid.count == 0
    # bytes other than zeros after a member are still damage
    path.write_bytes(gzip.compress(jsonl(DOCS)) + b"\x00\x00junk")
    with pytest.raises(LmpipeError, match=r"p\.jsonl\.gz: corrupt gzip data"):
        list(read_documents(path, strict=True))
