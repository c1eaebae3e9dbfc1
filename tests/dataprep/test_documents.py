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
    path.parent.mkdir(parents=True, exist_ok=True)
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


# --- input folders: links followed, other files named ------------------------------------------


def test_find_inputs_follows_folder_links_and_notes_other_suffixes(tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    write_lines(elsewhere / "l.jsonl", ['{"text": "linked"}'])
    d = tmp_path / "d"
    d.mkdir()
    (d / "linked").symlink_to(elsewhere)
    for name in ("a.jsonl", "c4-train.00000-of-01024.json.gz", "x.JSONL", "y.jsonl.bz2", "z.xz"):
        (d / name).write_text("")
    for name in ("_SUCCESS", ".part-0.crc"):  # a writer's markers, named like private folders
        (d / name).write_text("")
    found = find_inputs([d])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["d/a.jsonl", "d/linked/l.jsonl"]
    err = capsys.readouterr().err
    assert err == (
        f"note: 4 file(s) in {d} skipped: not .jsonl/.jsonl.zst/.jsonl.gz/.parquet "
        f"({d}/c4-train.00000-of-01024.json.gz, {d}/x.JSONL, {d}/y.jsonl.bz2, ...)\n"
    )
    # given by name, a file of another suffix is still an error, not read as some format
    with pytest.raises(LmpipeError, match=r"c4-train.*json\.gz: not a \.jsonl or"):
        find_inputs([d / "c4-train.00000-of-01024.json.gz"])


def test_a_stage_output_folder_reads_without_a_note(tmp_path, capsys):
    from lmpipe.dataprep.folders import write_manifest

    write_lines(tmp_path / "clean" / "part-00000.jsonl.zst", ['{"text": "kept"}'])
    for name in ("removed.ndjson.zst", "clusters.png"):
        (tmp_path / "clean" / name).write_bytes(b"")
    write_manifest(tmp_path / "clean", "dedup")
    assert [p.name for p in find_inputs([tmp_path / "clean"])] == ["part-00000.jsonl.zst"]
    assert capsys.readouterr().err == ""
    (tmp_path / "clean" / "manifest.json").write_text('{"not": "lmpipe"}')  # someone else's
    find_inputs([tmp_path / "clean"])
    assert "note: 3 file(s)" in capsys.readouterr().err


@pytest.mark.parametrize("target", ["..", "../b"])
def test_a_folder_reached_twice_through_links_is_an_error(tmp_path, target):
    for sub in ("a", "b"):
        write_lines(tmp_path / "d" / sub / "x.jsonl", ['{"text": "once"}'])
    (tmp_path / "d" / "a" / "link").symlink_to(target)  # a loop, or b's files a second time
    with pytest.raises(LmpipeError, match=r"through a link; name each folder once"):
        find_inputs([tmp_path / "d"])


def test_a_broken_link_named_as_a_document_is_an_error(tmp_path):
    write_lines(tmp_path / "d" / "a.jsonl", ['{"text": "here"}'])
    (tmp_path / "d" / "gone.jsonl").symlink_to(tmp_path / "nowhere.jsonl")
    with pytest.raises(LmpipeError, match=r"gone\.jsonl: not a file \(a broken link\?\)"):
        find_inputs([tmp_path / "d"])


# --- lines Python's json cannot hold ----------------------------------------------------------


def nested(depth: int) -> str:
    """A valid JSON document whose outermost object holds `depth` levels in all."""
    return '{"text": "deep", "meta": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


def test_lines_json_cannot_hold_are_invalid_lines(tmp_path):
    path = tmp_path / "j.jsonl"
    lines = ['{"text": "a"}', nested(500), nested(501), nested(5000), '{"text": "b", "n": ' + "9" * 5000 + "}", '{"text": "c"}']  # fmt: skip
    write_lines(path, lines)
    invalid = InvalidLines()
    good = [n for n, _ in read_documents(path, strict=False, invalid=invalid)]
    assert good == [1, 2, 6]  # 500 levels are read, wherever the reader is called from
    assert invalid.count == 3
    assert invalid.examples == [
        "line 3: JSON nested deeper than 500 levels",
        "line 4: JSON nested deeper than 500 levels",
        "line 5: JSON Python cannot read (Exceeds the limit (4300 digits) for integer string conversion)",
    ]  # fmt: skip
    with pytest.raises(LmpipeError) as e:
        list(read_documents(path))
    assert str(e.value) == f"{path}:3: JSON nested deeper than 500 levels"


# --- compressed data: damage keeps what came before, memory stays bounded ----------------------


def numbered_lines(n: int) -> bytes:
    rng = random.Random(1)  # text that does not compress to nothing
    words = ["".join(rng.choice("abcdefghij") for _ in range(6)) for _ in range(3000)]
    return "".join(
        json.dumps({"text": f"{i} " + " ".join(rng.choices(words, k=30))}) + "\n" for i in range(n)
    ).encode()


def test_damage_in_a_zstd_file_keeps_the_lines_decoded_before_it(tmp_path):
    data = numbered_lines(20000)
    z = bytearray(zstandard.ZstdCompressor(level=1).compress(data))
    at = int(len(z) * 0.8)
    z[at : at + 64] = bytes(b ^ 0x5A for b in z[at : at + 64])
    path = tmp_path / "c.jsonl.zst"
    path.write_bytes(bytes(z))
    decoder, before = zstandard.ZstdDecompressor().decompressobj(), b""  # what decodes, by byte
    with pytest.raises(zstandard.ZstdError):
        for k in range(len(z)):
            before += decoder.decompress(bytes(z[k : k + 1]))
    invalid = InvalidLines()
    good = [n for n, _ in read_documents(path, strict=False, invalid=invalid)]
    complete = before.count(b"\n")
    assert complete > 10000
    assert good == list(range(1, complete + 1))  # every line decodable before the damage
    assert invalid.count == 1 and invalid.examples[0].startswith(f"line {complete + 1}: unreadable")


def test_a_gzip_member_that_fails_its_check_keeps_its_lines(tmp_path):
    import gzip

    data = numbered_lines(5000)
    z = bytearray(gzip.compress(data))
    z[-8] ^= 0xFF  # the CRC: every byte decodes, then the check fails
    path = tmp_path / "g.jsonl.gz"
    path.write_bytes(bytes(z))
    invalid = InvalidLines()
    good = [n for n, _ in read_documents(path, strict=False, invalid=invalid)]
    # all but the lines of the last piece given to the decoder (its output is lost with the
    # error): a few dozen at most, where one read of the whole file lost all 5,000
    assert good == list(range(1, len(good) + 1)) and 4900 < len(good) < 5000
    assert invalid.examples == [f"line {len(good) + 1}: unreadable from here on (corrupt gzip data (Error -3 while decompressing data: incorrect data check; lines read before it may be damaged too))"]  # fmt: skip


@pytest.mark.parametrize("suffix", [".zst", ".gz"])
def test_a_very_compressible_file_decodes_in_bounded_blocks(tmp_path, suffix):
    import gzip

    from lmpipe.dataprep import documents

    line = b'{"text": "the same line"}\n'
    data = line * ((64 << 20) // len(line))  # 64 MiB from a few kB
    compressed = zstandard.compress(data, 1) if suffix == ".zst" else gzip.compress(data, 1)
    path = tmp_path / f"r.jsonl{suffix}"
    path.write_bytes(compressed)
    chunks = documents.zstd_chunks if suffix == ".zst" else documents.gzip_chunks
    with open(path, "rb") as raw:
        sizes = [len(block) for block in chunks(raw, path)]
    assert sum(sizes) == len(data)
    # one block is READ_BYTES and at most one decoder call past it (32 MiB for zstd, ~16 for gzip)
    assert max(sizes) < documents.READ_BYTES + (32 << 20) and len(sizes) > 2
