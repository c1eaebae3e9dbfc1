"""Reading documents: plain and zstd lines, progress in file bytes, bad lines named or counted."""

from __future__ import annotations

import json
import random

import pytest
import zstandard

from lmpipe.dataprep.documents import InvalidLines, find_inputs, read_documents
from lmpipe.dataprep.errors import LmpipeError


def write_lines(path, lines):
    data = "".join(line + "\n" for line in lines).encode()
    if path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.zst"])
def test_progress_reports_add_up_to_the_file_size(tmp_path, name):
    path = tmp_path / name
    rng = random.Random(0)  # text that does not compress to nothing: several reads of the file
    words = ["".join(rng.choice("abcdefghij") for _ in range(6)) for _ in range(3000)]
    write_lines(
        path, [json.dumps({"text": " ".join(rng.choices(words, k=60))}) for _ in range(8000)]
    )
    seen = []
    records = list(read_documents(path, on_bytes=seen.append))
    assert len(records) == 8000
    assert sum(seen) == path.stat().st_size
    assert len([n for n in seen if n > 0]) > 1  # it moved within the file, not only at the end


def test_bad_lines_are_named_or_counted(tmp_path):
    path = tmp_path / "b.jsonl"
    write_lines(
        path, ['{"text": "ok"}', "not json", '{"id": 1}', '{"text": 3}', "", '{"text": "fine"}']
    )
    with pytest.raises(LmpipeError, match=r"b\.jsonl:2: not JSON"):
        list(read_documents(path))
    invalid = InvalidLines()
    good = [n for n, _ in read_documents(path, strict=False, invalid=invalid)]
    assert good == [1, 6]
    assert invalid.count == 3
    assert invalid.examples == [
        "line 2: not JSON (Expecting value)",
        "line 3: no 'text' field",
        "line 4: 'text' is int, not a string",
    ]


def test_truncated_zstd_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "c.jsonl.zst"
    write_lines(path, [json.dumps({"text": f"line {i} of a file cut short"}) for i in range(2000)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LmpipeError, match=r"c\.jsonl\.zst: truncated zstd data"):
        list(read_documents(path))


def test_find_inputs_expands_folders_sorted(tmp_path):
    (tmp_path / "d" / "x").mkdir(parents=True)
    for name in ("d/b.jsonl", "d/x/a.jsonl.zst", "d/notes.txt"):
        (tmp_path / name).write_text("")
    found = find_inputs([tmp_path / "d"])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["d/b.jsonl", "d/x/a.jsonl.zst"]


def test_multi_frame_zstd_and_a_last_line_without_newline(tmp_path):
    path = tmp_path / "m.jsonl.zst"
    c = zstandard.ZstdCompressor()
    frames = [c.compress(b'{"text": "one"}\n'), c.compress(b'{"text": "two"}\n{"text": "three"}')]
    path.write_bytes(b"".join(frames))
    assert [r["text"] for _, r in read_documents(path)] == ["one", "two", "three"]


def test_gzip_documents_read_like_plain_ones_and_truncation_is_an_error(tmp_path):
    import gzip

    lines = [json.dumps({"text": f"document {k} é", "id": k}) for k in range(2000)]
    data = ("\n".join(lines) + "\n").encode("utf-8")
    (tmp_path / "a.jsonl").write_bytes(data)
    half = len(data) // 2  # two gzip members, as `cat a.gz b.gz` makes
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(data[:half]) + gzip.compress(data[half:]))
    assert [p.name for p in find_inputs([tmp_path])] == ["a.jsonl", "a.jsonl.gz"]
    plain = list(read_documents(tmp_path / "a.jsonl"))
    assert list(read_documents(tmp_path / "a.jsonl.gz")) == plain and len(plain) == 2000
    whole = gzip.compress(data)
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) - 20])
    with pytest.raises(LmpipeError, match="truncated gzip"):
        list(read_documents(tmp_path / "cut.jsonl.gz"))


def test_truncated_zstd_keeps_what_precedes_when_counting(tmp_path):
    path = tmp_path / "t.jsonl.zst"
    write_lines(path, [json.dumps({"text": f"line {i} of a file cut short"}) for i in range(20000)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    invalid = InvalidLines()
    good = [n for n, _ in read_documents(path, strict=False, invalid=invalid)]
    assert good == list(range(1, len(good) + 1)) and 0 < len(good) < 20000
    assert invalid.count == 1
    assert invalid.examples == [
        f"line {len(good) + 1}: unreadable from here on (truncated zstd data (the last frame is incomplete))"
    ]


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file_is_one_invalid_line_or_an_error(tmp_path, content):
    path = tmp_path / "e.jsonl"
    path.write_bytes(content)
    invalid = InvalidLines()
    assert list(read_documents(path, strict=False, invalid=invalid)) == []
    assert invalid.count == 1 and invalid.examples == ["line 1: empty file (no non-blank line)"]
    with pytest.raises(LmpipeError, match=r"e\.jsonl: empty file"):
        list(read_documents(path, strict=True))
