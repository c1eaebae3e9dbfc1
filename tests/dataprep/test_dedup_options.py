"""dedup's selectable steps (--fix-text, --exact, --near, --min-chars 0) and its cluster sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmpipe.dataprep.dedup import dedup
from tests.dataprep.test_dedup import edit, kept_docs, prose, removed_by_id, write_jsonl

# ftfy repairs this (UTF-8 read as Windows-1252); the text is long enough to pass the short filter.
MOJIBAKE = "The Mona Lisa doesnâ€™t have eyebrows. " + prose(11)
FIXED = "The Mona Lisa doesn't have eyebrows. " + prose(11)  # ftfy also uncurls quotes


def run_cli(*args: str) -> str:
    from typer.testing import CliRunner

    from lmpipe.cli.app import app

    result = CliRunner().invoke(app, ["dedup", *args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture
def mojibake(tmp_path) -> Path:
    return write_jsonl(tmp_path / "raw" / "web" / "a.jsonl", [
        {"text": MOJIBAKE, "id": "m"}, {"text": prose(12), "id": "p"},
    ])  # fmt: skip


def test_fix_text_repairs_and_no_fix_text_passes_through(mojibake, tmp_path):
    run_cli(str(mojibake), "-o", str(tmp_path / "fixed"))
    assert kept_docs(tmp_path / "fixed")[0]["text"] == FIXED
    run_cli(str(mojibake), "-o", str(tmp_path / "raw-out"), "--no-fix-text")
    assert kept_docs(tmp_path / "raw-out")[0]["text"] == MOJIBAKE
    m = json.loads((tmp_path / "raw-out" / "manifest.json").read_text())
    assert m["settings"]["fix_text"] is None


def test_no_fix_text_is_not_resumed_from_a_fixed_scan(mojibake, tmp_path, monkeypatch):
    """The setting is in the resume fingerprint: a crashed run's ftfy-fixed scan is not reused."""
    import lmpipe.dataprep.dedup_kept as kept_steps

    monkeypatch.setattr(kept_steps, "filter_file", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        dedup([mojibake], tmp_path / "out", progress=False)
    monkeypatch.undo()
    dedup([mojibake], tmp_path / "out", fix=False, progress=False)
    assert kept_docs(tmp_path / "out")[0]["text"] == MOJIBAKE


def test_no_fix_text_decontaminates_against_unfixed_eval_texts(mojibake, tmp_path):
    evals = write_jsonl(tmp_path / "evals" / "e.jsonl", [{"text": MOJIBAKE}])
    fixed = dedup([mojibake], tmp_path / "a", decontaminate=[evals], progress=False)
    raw = dedup([mojibake], tmp_path / "b", decontaminate=[evals], fix=False, progress=False)
    # both sides are fixed, or neither: the same text matches either way
    assert fixed["counts"]["total"]["decontaminated"]["documents"] == 1
    assert raw["counts"]["total"]["decontaminated"]["documents"] == 1


@pytest.fixture
def copies(tmp_path) -> Path:
    """A document, a copy differing in case/punctuation/whitespace only, and a verbatim copy."""
    text = prose(21)
    return write_jsonl(tmp_path / "raw" / "web" / "a.jsonl", [
        {"text": text, "id": "A"}, {"text": text.upper().replace(" ", "  ") + "!!", "id": "A-case"},
        {"text": prose(22), "id": "B"}, {"text": text, "id": "A-copy"},
    ])  # fmt: skip


def test_no_exact_removes_copies_as_near_duplicates(copies, tmp_path):
    run_cli(str(copies), "-o", str(tmp_path / "with"))
    run_cli(str(copies), "-o", str(tmp_path / "without"), "--no-exact")
    assert kept_docs(tmp_path / "without") == kept_docs(tmp_path / "with")
    assert [d["id"] for d in kept_docs(tmp_path / "without")] == ["A", "B"]
    with_, without = removed_by_id(tmp_path / "with"), removed_by_id(tmp_path / "without")
    for doc in ("A-case", "A-copy"):
        assert with_[doc]["reason"] == "exact duplicate"
        assert without[doc]["reason"] == "near duplicate"
        assert without[doc]["duplicate_of"]["id"] == "A"
    m = json.loads((tmp_path / "without" / "manifest.json").read_text())
    assert m["settings"]["exact"] is False
    assert m["counts"]["total"]["exact_duplicate"]["documents"] == 0
    assert m["counts"]["total"]["near_duplicate"]["documents"] == 2


def test_no_near_removes_exact_duplicates_only(copies, tmp_path):
    near_copy = {"text": edit(prose(21), 5), "id": "A-near"}  # an edited copy of A: J ~ 0.9
    raw = write_jsonl(copies, [*map(json.loads, copies.read_text().splitlines()), near_copy])
    run_cli(str(raw), "-o", str(tmp_path / "with"))
    run_cli(str(raw), "-o", str(tmp_path / "exact-only"), "--no-near")
    assert [d["id"] for d in kept_docs(tmp_path / "with")] == ["A", "B"]
    assert [d["id"] for d in kept_docs(tmp_path / "exact-only")] == ["A", "B", "A-near"]
    removed = removed_by_id(tmp_path / "exact-only")
    assert {doc: r["reason"] for doc, r in removed.items()} == {"A-case": "exact duplicate", "A-copy": "exact duplicate"}  # fmt: skip
    m = json.loads((tmp_path / "exact-only" / "manifest.json").read_text())
    assert m["settings"]["near"] is False
    assert m["counts"]["total"]["near_duplicate"]["documents"] == 0
    assert m["cluster_sizes"] == {"3": 1}  # A with its two exact copies


def test_min_chars_zero_turns_the_short_filter_off(tmp_path):
    raw = write_jsonl(tmp_path / "raw" / "web" / "a.jsonl", [
        {"text": "", "id": "empty"}, {"text": "Hi!", "id": "hi"}, {"text": "abc", "id": "abc"},
        {"text": "  ", "id": "blank"}, {"text": "hi", "id": "hi-again"}, {"text": prose(31), "id": "p"},
    ])  # fmt: skip
    default = dedup([raw], tmp_path / "default", progress=False)
    assert default["counts"]["total"]["short"]["documents"] == 5
    m = dedup([raw], tmp_path / "off", min_chars=0, progress=False)
    total = m["counts"]["total"]
    assert total["short"]["documents"] == 0
    # shorter than an n-gram: the whole normalised text is the one shingle, so only equal
    # normalised texts meet ("" and "  "; "Hi!" and "hi"), as exact duplicates
    assert [d["id"] for d in kept_docs(tmp_path / "off")] == ["empty", "hi", "abc", "p"]
    removed = removed_by_id(tmp_path / "off")
    assert {k: (r["reason"], r["duplicate_of"]["id"]) for k, r in removed.items()} == {
        "blank": ("exact duplicate", "empty"), "hi-again": ("exact duplicate", "hi"),
    }  # fmt: skip
    assert m["settings"]["min_chars"] == 0


# --- cluster sizes -----------------------------------------------------------------------------


@pytest.fixture
def clustered(tmp_path) -> Path:
    """One cluster of 3 (a chain across two files), two of 2 (a near and an exact pair), and
    five documents without duplicates."""
    a, b, c = prose(41), prose(42), prose(43)
    write_jsonl(tmp_path / "raw" / "web" / "a.jsonl", [
        {"text": a, "id": "A"}, {"text": b, "id": "B"}, {"text": c, "id": "C"},
        *({"text": prose(50 + k), "id": f"x{k}"} for k in range(5)),
    ])  # fmt: skip
    write_jsonl(tmp_path / "raw" / "books" / "b.jsonl", [
        {"text": edit(a, 1), "id": "A1"}, {"text": edit(edit(a, 1), 2), "id": "A2"},
        {"text": edit(b, 3), "id": "B1"}, {"text": c.upper(), "id": "C1"},
    ])  # fmt: skip
    return tmp_path / "raw"


def test_manifest_has_the_cluster_size_distribution(clustered, tmp_path):
    m = dedup([clustered], tmp_path / "out", progress=False)
    assert m["cluster_sizes"] == {"2": 2, "3": 1}
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["cluster_sizes"] == {"2": 2, "3": 1}
    removed = m["counts"]["total"]["exact_duplicate"]["documents"] + m["counts"]["total"]["near_duplicate"]["documents"]  # fmt: skip
    assert removed == sum((int(k) - 1) * v for k, v in m["cluster_sizes"].items())


def test_cluster_sizes_empty_without_duplicates(tmp_path):
    raw = write_jsonl(tmp_path / "raw" / "a.jsonl", [{"text": prose(k)} for k in range(3)])
    assert dedup([raw], tmp_path / "out", progress=False)["cluster_sizes"] == {}


def test_clusters_png_is_a_png(clustered, tmp_path):
    pytest.importorskip("matplotlib")
    dedup([clustered], tmp_path / "out", progress=False)
    data = (tmp_path / "out" / "clusters.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert data[-8:-4] == b"IEND"
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert "clusters.png" not in {o["file"] for o in m["outputs"]}  # same manifest without it
    dedup([clustered], tmp_path / "again", workers=2, progress=False)
    assert (tmp_path / "again" / "clusters.png").read_bytes() == data


def test_no_matplotlib_no_png_and_a_line_in_the_summary(clustered, tmp_path, monkeypatch):
    import lmpipe.dataprep.cluster_plot as cluster_plot

    monkeypatch.setattr(cluster_plot, "have_matplotlib", lambda: False)
    output = run_cli(str(clustered), "-o", str(tmp_path / "out"))
    assert not (tmp_path / "out" / "clusters.png").exists()
    assert "pip install 'lmpipe[plot]'" in " ".join(output.split())
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["cluster_sizes"] == {"2": 2, "3": 1}


def test_write_cluster_png_with_many_sizes(tmp_path):
    pytest.importorskip("matplotlib")
    from lmpipe.dataprep.cluster_plot import write_cluster_png

    assert write_cluster_png({"2": 900, "3": 40, "17": 2, "400": 1}, tmp_path / "a.png")
    assert write_cluster_png({}, tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
