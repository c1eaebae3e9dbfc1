"""`lmpipe tokenize`: exact round trip through GPT-2, held-out split, counts, bad input, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zstandard

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.folders import partial_path
from lmpipe.dataprep.shards import TokenShards
from lmpipe.dataprep.tokenize import tokenize

TEXTS = [
    "Hello world",
    "Grüße aus Köln — naïve façade, 東京都, Ελληνικά, עברית, русский текст.",
    "emoji: 👩‍👩‍👧‍👦 🏳️‍🌈 🤖🚀 and a flag 🇫🇷",
    "",
    "   \n\t  \r\n ",
    "the special string <|endoftext|> is data here, and <|endoftext|> again",
    "<|endoftext|>",
    "x" * 7 + "long document. " * 15000,  # about 225 kB: many BPE words, one document
    "tab\tseparated\tand trailing newline\n",
    "Hello world",  # an exact duplicate: must land in the same split as the first
] + [f"document number {i}: {'lorem ipsum ' * (i % 13)}" for i in range(200)]


def write_jsonl(path: Path, records: list[dict], compress: bool = False) -> Path:
    data = "".join(json.dumps(r, ensure_ascii=bool(len(path.name) % 2)) + "\n" for r in records)
    if compress:
        path.write_bytes(zstandard.ZstdCompressor().compress(data.encode("utf-8")))
    else:
        path.write_text(data, encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    half = len(TEXTS) // 2
    write_jsonl(folder / "a.jsonl", [{"text": t, "id": i} for i, t in enumerate(TEXTS[:half])])
    write_jsonl(folder / "b.jsonl.zst", [{"text": t} for t in TEXTS[half:]], compress=True)
    return folder


def decoded(gpt2, folder: Path, split: str) -> list[str]:
    return [gpt2.decode(d.tolist()) for d in TokenShards(folder, split).documents()]


def test_hello_world_ids(gpt2, tmp_path: Path) -> None:
    assert gpt2.encode_ordinary("Hello world") == [15496, 995]
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "Hello world"}])
    tokenize([src], tmp_path / "tok", holdout=0.0)
    assert TokenShards(tmp_path / "tok").tokens(0, 3).tolist() == [15496, 995, 50256]


def test_round_trip_is_exact(gpt2, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "tok"
    manifest = tokenize([corpus], out, holdout=0.3, seed=1, shard_tokens=1000)
    train, heldout = decoded(gpt2, out, "train"), decoded(gpt2, out, "heldout")
    assert len(heldout) > 20 and len(train) > 100
    assert (
        len(manifest["splits"]["train"]["shards"])
        > 3
        < len(manifest["splits"]["heldout"]["shards"])
    )
    # input order is kept within each split, so the two lists interleave back into the input
    held_flags = [t in set(heldout) for t in TEXTS]
    assert [t for t, h in zip(TEXTS, held_flags, strict=True) if not h] == train
    assert [t for t, h in zip(TEXTS, held_flags, strict=True) if h] == heldout
    # "<|endoftext|>" inside a document is ordinary text: the only 50256s are document ends
    for split in ("train", "heldout"):
        for doc in TokenShards(out, split).documents():
            assert 50256 not in doc


def test_holdout_is_disjoint_deterministic_and_seeded(gpt2, corpus: Path, tmp_path: Path) -> None:
    a = tokenize([corpus], tmp_path / "a", holdout=0.25, seed=3)
    b = tokenize([corpus], tmp_path / "b", holdout=0.25, seed=3, workers=2)
    c = tokenize([corpus], tmp_path / "c", holdout=0.25, seed=4)
    assert a["splits"] == b["splits"]  # sha256 of every file: byte-identical for any workers
    assert a["splits"] != c["splits"]
    train, heldout = (
        set(decoded(gpt2, tmp_path / "a", "train")),
        set(decoded(gpt2, tmp_path / "a", "heldout")),
    )
    assert not train & heldout  # the duplicate "Hello world" went to one side only
    assert 0.15 < a["totals"]["heldout_documents"] / a["totals"]["documents"] < 0.35


def test_many_batches_and_workers_give_identical_shards(
    gpt2, corpus: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr("lmpipe.dataprep.tokenize.BATCH_BYTES", 300)
    one = tokenize([corpus], tmp_path / "one", holdout=0.1, shard_tokens=3000)
    three = tokenize([corpus], tmp_path / "three", holdout=0.1, shard_tokens=3000, workers=3)
    assert one["splits"] == three["splits"]
    for shard in one["splits"]["train"]["shards"]:
        assert (tmp_path / "one" / shard["bin"]).read_bytes() == (
            tmp_path / "three" / shard["bin"]
        ).read_bytes()


def test_manifest_counts_add_up(gpt2, corpus: Path, tmp_path: Path) -> None:
    m = tokenize([corpus], tmp_path / "tok", holdout=0.2)
    t = m["totals"]
    assert t["documents"] == len(TEXTS) == t["train_documents"] + t["heldout_documents"]
    assert t["lines"] == t["documents"] + t["invalid"] and t["invalid"] == 0
    assert t["tokens"] == t["train_tokens"] + t["heldout_tokens"]
    assert sum(e["documents"] for e in m["inputs"]) == t["documents"]
    assert [Path(e["path"]).name for e in m["inputs"]] == ["a.jsonl", "b.jsonl.zst"]
    assert all(len(e["sha256"]) == 64 for e in m["inputs"])
    for split in ("train", "heldout"):
        s = m["splits"][split]
        assert (
            s["n_tokens"] == t[f"{split}_tokens"] == TokenShards(tmp_path / "tok", split).n_tokens
        )
    assert m["tokenizer"]["name"] == "gpt2" and m["tokenizer"]["eot_id"] == 50256
    assert m["dtype"] == "<u2" and m["format_version"] == 1


def test_manifest_of_another_tokenizer_is_refused(gpt2, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "tok"
    tokenize([corpus], out)
    TokenShards(out)  # the real fingerprint is accepted
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["tokenizer"]["ranks_sha256"] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LmpipeError, match="another tokenizer"):
        TokenShards(out)


BAD_LINES = [
    b'{"text": "fine"}\n',
    b"not json\n",
    b'{"meta": 1}\n',
    b'{"text": "bad \xff utf8"}\n',
    b"\n",  # blank lines are skipped, not counted
    b'{"text": "lone \\ud800 surrogate"}\n',
    b'{"text": 5}\n',
    b'{"text": "also fine"}\n',
]


def test_bad_input_strict_leaves_no_output(gpt2, tmp_path: Path) -> None:
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b"".join(BAD_LINES))
    out = tmp_path / "tok"
    with pytest.raises(LmpipeError, match=r"bad.jsonl:2: not JSON"):
        tokenize([src], out, strict=True)
    assert not out.exists() and not partial_path(out).exists()
    src.write_bytes(BAD_LINES[0] + BAD_LINES[5])
    with pytest.raises(LmpipeError, match=r"bad.jsonl:2: .*surrogate"):
        tokenize([src], out, strict=True)
    assert not out.exists() and not partial_path(out).exists()
    with pytest.raises(LmpipeError, match="no such file"):
        tokenize([tmp_path / "missing.jsonl"], out, strict=True)


def test_bad_lines_counted_when_not_strict(gpt2, tmp_path: Path) -> None:
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b"".join(BAD_LINES))
    m = tokenize([src], tmp_path / "tok", strict=False)
    (entry,) = m["inputs"]
    assert entry["documents"] == 2 and entry["invalid"] == 5
    assert [e.split(":")[0] for e in entry["invalid_examples"]] == [
        f"line {n}" for n in (2, 3, 4, 6, 7)
    ]
    assert entry["blank_lines"] == m["totals"]["blank_lines"] == 1
    assert m["totals"]["lines"] == 8  # every line: documents + invalid + blank
    assert decoded(gpt2, tmp_path / "tok", "train") == ["fine", "also fine"]


def test_existing_output_needs_overwrite(gpt2, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "tok"
    tokenize([corpus], out)
    with pytest.raises(LmpipeError, match="already exists"):
        tokenize([corpus], out)
    tokenize([corpus], out, overwrite=True, holdout=0.0)
    assert TokenShards(out, "heldout").n_documents == 0


def test_cli_tokenize(gpt2, corpus: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lmpipe.cli.app import app

    runner = CliRunner()
    out = tmp_path / "tok"
    result = runner.invoke(
        app, ["tokenize", str(corpus), "-o", str(out), "--holdout", "0.1", "--shard-tokens", "4000"]
    )
    assert result.exit_code == 0, result.output
    assert f"{len(TEXTS)} documents" in result.output
    shards = TokenShards(out)
    assert len(shards.shards) > 1 and shards.n_documents < len(TEXTS)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"".join(BAD_LINES))
    result = runner.invoke(app, ["tokenize", str(bad), "-o", str(tmp_path / "x"), "--strict"])
    assert result.exit_code == 2 and "bad.jsonl:2" in result.output
    result = runner.invoke(app, ["tokenize", str(bad), "-o", str(tmp_path / "x")])
    assert result.exit_code == 0 and "5 invalid line(s) in 1 file(s)" in result.output
    assert "bad.jsonl: 5 (line 2: not JSON" in result.output
    assert (
        np.sum(
            [
                e["invalid"]
                for e in json.loads((tmp_path / "x" / "manifest.json").read_text())["inputs"]
            ]
        )
        == 5
    )


KILLABLE = """
import sys, time
from pathlib import Path
import lmpipe.dataprep.tokenize as t
t.BATCH_BYTES = 200
encode = t.encode_batch
def slow(batch):
    time.sleep(0.02)  # slow enough that the parent kills it mid-run, on any machine
    return encode(batch)
t.encode_batch = slow
t.tokenize([Path(sys.argv[1])], Path(sys.argv[2]), holdout=0.2, shard_tokens=500)
"""


def test_killed_run_reruns_to_identical_shards(gpt2, corpus: Path, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "tok"
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(corpus), str(out)], env=os.environ)
    deadline = time.monotonic() + 120
    while len(list(partial_path(out).glob("*.bin"))) < 3 and time.monotonic() < deadline:
        assert proc.poll() is None, "finished before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # killed mid-run, shards written: not before it started (then the rerun would test nothing)
    assert len(list(partial_path(out).glob("*.bin"))) >= 3, "no shard written in 120 s"
    assert not out.exists() and partial_path(out).exists()  # unfinished, and not mistaken
    killed_then_rerun = tokenize([corpus], out, holdout=0.2, shard_tokens=500)
    assert not partial_path(out).exists()
    clean = tokenize([corpus], tmp_path / "clean", holdout=0.2, shard_tokens=500)
    assert killed_then_rerun["splits"] == clean["splits"]  # every shard's sha256
    assert (out / "manifest.json").read_bytes() == (
        tmp_path / "clean" / "manifest.json"
    ).read_bytes()


def test_inspect_decodes_what_training_sees(gpt2, corpus: Path, tmp_path: Path) -> None:
    from lmpipe.dataprep.inspection import inspect_shards

    tokenize([corpus], tmp_path / "tok", holdout=0.3)
    summary = inspect_shards(tmp_path / "tok", decode=tmp_path / "docs.jsonl")
    records = [json.loads(line) for line in (tmp_path / "docs.jsonl").read_text().splitlines()]
    assert summary["decoded"] == len(records) == len(TEXTS)
    assert sorted(r["text"] for r in records) == sorted(TEXTS)
    held = [r["text"] for r in records if r["split"] == "heldout"]
    assert held == decoded(gpt2, tmp_path / "tok", "heldout")
    train = summary["splits"]["train"]
    assert train["n_documents"] + summary["splits"]["heldout"]["n_documents"] == len(TEXTS)
    assert train["document_tokens"]["min"] == 0  # the empty document


# --- --split-by-field: one token folder per source, for a mixture -------------------------

SOURCES = ["RedPajamaC4", "RedPajamaBook", "Red/Pajama ArXiv", ".hidden"]


def test_split_by_field_round_trip(gpt2, tmp_path: Path) -> None:
    records = [
        {"text": t, "meta": {"redpajama_set_name": SOURCES[i % 4]}} for i, t in enumerate(TEXTS)
    ]
    records.insert(5, {"text": "no source here", "meta": {}})
    records.insert(9, {"text": "a number for a source", "meta": {"redpajama_set_name": 7}})
    src = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "tok"
    m = tokenize([src], out, holdout=0.1, split_by_field="meta.redpajama_set_name", workers=2)
    folders = {"RedPajamaC4", "RedPajamaBook", "Red_Pajama_ArXiv", "x.hidden"}
    assert set(m["sources"]) == folders and {p.name for p in out.iterdir() if p.is_dir()} == folders
    assert {f: s["value"] for f, s in m["sources"].items()}[
        "Red_Pajama_ArXiv"
    ] == "Red/Pajama ArXiv"
    # every valid document in exactly one folder, the one its field names, in input order
    for i, value in enumerate(SOURCES):
        folder = next(f for f, s in m["sources"].items() if s["value"] == value)
        got = decoded(gpt2, out / folder, "train") + decoded(gpt2, out / folder, "heldout")
        want = [t for j, t in enumerate(TEXTS) if j % 4 == i]
        assert sorted(got) == sorted(want)
        sub = json.loads((out / folder / "manifest.json").read_text())
        assert sub["totals"]["documents"] == len(want) == m["sources"][folder]["documents"]
    t = m["totals"]
    assert t["documents"] == len(TEXTS) and t["invalid"] == 2 and t["folders"] == 4
    assert t["lines"] == t["documents"] + t["invalid"] + t["blank_lines"] == len(records)
    assert t["tokens"] == sum(s["tokens"] for s in m["sources"].values())
    with pytest.raises(LmpipeError, match=r"tok: holds one token folder per value of meta\.redpajama_set_name"):  # fmt: skip
        TokenShards(out)


def test_split_values_that_make_one_folder_name_are_refused(gpt2, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "a", "src": "a b"}, {"text": "b", "src": "a/b"}])  # fmt: skip
    with pytest.raises(LmpipeError, match=r"values 'a b' and 'a/b' both make folder 'a_b'"):
        tokenize([src], tmp_path / "tok", split_by_field="src")
    assert not (tmp_path / "tok").exists() and not partial_path(tmp_path / "tok").exists()
    with pytest.raises(LmpipeError, match=r"in\.jsonl:1: no string 'nope' field"):
        tokenize([src], tmp_path / "tok", split_by_field="nope", strict=True)


def test_split_values_that_would_be_the_manifest_or_too_long_get_safe_names(gpt2, tmp_path: Path) -> None:  # fmt: skip
    long = "a" * 300
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "x", "src": "manifest.json"}, {"text": "y", "src": long}])  # fmt: skip
    m = tokenize([src], tmp_path / "tok", split_by_field="src")
    names = sorted(m["sources"])
    assert (
        names[1] == "xmanifest.json"
        and len(names[0]) == 100
        and names[0].startswith("a" * 83 + "-")
    )
    assert {s["value"] for s in m["sources"].values()} == {"manifest.json", long}
    assert (tmp_path / "tok" / "manifest.json").is_file()


def test_off_a_terminal_progress_is_plain_lines_on_stderr(
    gpt2, corpus: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """rich's bar went to stdout, where off a terminal its last frame landed among the summary;
    now stdout is the summary's, and stderr gets a plain line at most every PLAIN_EVERY
    seconds (here at every block read)."""
    import re

    import lmpipe.dataprep.tokenize as tokenize_module

    monkeypatch.setattr(tokenize_module, "PLAIN_EVERY", 0.0, raising=False)
    tokenize([corpus], tmp_path / "tok")
    out, err = capsys.readouterr()
    assert out.startswith(f"tokenize: {len(TEXTS)} documents, ")  # the summary
    assert "MB read" not in out and "━" not in out
    line = r"tokenize: [\d,.]+ of ([\d,.]+) MB read \((\d+)%\), (\S+), [\d,]+ tokens, \d+ s"
    found = [re.fullmatch(line, x) for x in err.splitlines()]
    assert found and all(found), err
    assert [m.group(3) for m in found][-1] == "b.jsonl.zst" and found[-1].group(2) == "100"


DECODE_TEXTS = [
    'quotes " and \\ backslashes, \x00 \x1f controls, \n newlines \t tabs, \u2028 separators',
    "Grüße aus Köln, 東京都, emoji 👩‍👩‍👧‍👦 🇫🇷",
    "",
    "<|endoftext|> as data",
]


def byte_tokens(gpt2, data: bytes) -> list[int]:
    """One token per byte: every multi-byte character is split across tokens."""
    return [gpt2.encode_single_token(bytes([b])) for b in data]


@pytest.mark.parametrize("slice_tokens", [1, 2, 3, 1 << 16])
def test_inspect_decodes_a_slice_at_a_time_as_the_whole(
    gpt2, tmp_path: Path, monkeypatch, slice_tokens: int
) -> None:
    """Slices of a document cut its characters anywhere: the file is still, byte for byte, the
    json.dumps of each whole decoded text."""
    import lmpipe.dataprep.inspection as inspection
    from lmpipe.dataprep.shards import write_shard_folder

    monkeypatch.setattr(inspection, "DECODE_TOKENS", slice_tokens, raising=False)
    train = [gpt2.encode_ordinary(t) for t in DECODE_TEXTS]
    train += [byte_tokens(gpt2, t.encode("utf-8")) for t in DECODE_TEXTS]
    heldout = [gpt2.encode_ordinary(DECODE_TEXTS[1] * 50)]
    write_shard_folder(tmp_path / "tok", {"train": train, "heldout": heldout})
    inspection.inspect_shards(tmp_path / "tok", decode=tmp_path / "docs.jsonl")
    want = "".join(
        json.dumps({"text": gpt2.decode(doc, errors="strict"), "split": split}, ensure_ascii=False)
        + "\n"
        for split, docs in (("train", train), ("heldout", heldout))
        for doc in docs
    )
    assert (tmp_path / "docs.jsonl").read_bytes() == want.encode("utf-8")
    assert [json.loads(x)["text"] for x in want.split("\n")[:8]] == DECODE_TEXTS * 2


@pytest.mark.parametrize(
    "data",
    [b"ok \xf0a", b"ok \xe6\x97", b"\x97 ok", b"ok \xed\xa0\x80"],
    ids=["lead-then-ascii", "cut-at-the-end", "stray-continuation", "surrogate"],
)
@pytest.mark.parametrize("slice_tokens", [1, 4, 1 << 16])
def test_inspect_refuses_a_document_that_is_not_utf8_wherever_the_slices_fall(
    gpt2, tmp_path: Path, monkeypatch, data: bytes, slice_tokens: int
) -> None:
    import lmpipe.dataprep.inspection as inspection
    from lmpipe.dataprep.shards import write_shard_folder

    monkeypatch.setattr(inspection, "DECODE_TOKENS", slice_tokens, raising=False)
    docs = [gpt2.encode_ordinary("fine"), byte_tokens(gpt2, data)]
    write_shard_folder(tmp_path / "tok", {"train": docs})
    with pytest.raises(UnicodeDecodeError):
        gpt2.decode(docs[1], errors="strict")  # what the whole document gives
    with pytest.raises(LmpipeError, match=r"tok: train document 1 does not decode to UTF-8"):
        inspection.inspect_shards(tmp_path / "tok", decode=tmp_path / "docs.jsonl")
    assert not (tmp_path / "docs.jsonl").exists()
    assert not partial_path(tmp_path / "docs.jsonl").exists()


def test_inspect_decode_memory_does_not_grow_with_a_document(gpt2, tmp_path: Path) -> None:
    """A whole document as one Python list of ints took ~36 bytes a token (4.6 GB for R22's
    140M-token document); a slice at a time, it is the document's uint16 copy and a slice."""
    import tracemalloc

    from lmpipe.dataprep.inspection import inspect_shards
    from lmpipe.dataprep.shards import write_shard_folder

    doc = np.tile(np.array(gpt2.encode_ordinary(DECODE_TEXTS[1] + " "), np.uint16), 60_000)
    assert len(doc) > 1_500_000
    write_shard_folder(tmp_path / "tok", {"train": [doc]})
    tracemalloc.start()
    try:
        inspect_shards(tmp_path / "tok", decode=tmp_path / "docs.jsonl")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    record = json.loads((tmp_path / "docs.jsonl").read_text(encoding="utf-8"))
    assert record["text"] == (DECODE_TEXTS[1] + " ") * 60_000
    # measured: 94 MB before (the list, the text, its JSON); now 8.9 MB (the uint16 copy, a slice)
    assert peak < 8 * len(doc), f"{peak:,} bytes traced for {len(doc):,} tokens"
