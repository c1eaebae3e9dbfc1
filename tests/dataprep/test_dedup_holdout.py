"""dedup's holdout, SHA-256 decontamination against eval data, and --source-field."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest

from lmpipe.dataprep.dedup import dedup
from lmpipe.dataprep.documents import find_inputs
from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.folders import partial_path
from lmpipe.dataprep.holdout import as_digests, held_out
from tests.dataprep.test_dedup import edit, kept_docs, prose, read_zst, removed_by_id, write_jsonl

# The manifest's invariant, per source and in total, for documents and for bytes.
BUCKETS = (
    "kept", "short", "exact_duplicate", "near_duplicate", "decontaminated", "held_out", "invalid"
)  # fmt: skip


def assert_counts_add_up(manifest: dict) -> None:
    counts = manifest["counts"]
    for source, c in [*counts["sources"].items(), ("total", counts["total"])]:
        for unit in ("documents", "bytes"):
            assert sum(c[b][unit] for b in BUCKETS) == c["input"][unit], (source, unit)


def held_docs(out: Path) -> list[dict]:
    return [r for p in sorted((out / "_holdout").glob("part-*.jsonl.zst")) for r in read_zst(p)]


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture
def distinct(tmp_path) -> Path:
    """200 distinct documents in two sources, plus a short one and a near duplicate."""
    raw = tmp_path / "raw"
    for s, name in enumerate(("books", "web")):
        records = [{"text": prose(s * 1000 + k), "id": f"{name}{k}"} for k in range(100)]
        records += [{"text": "tiny", "id": f"{name}-short"}]
        records += [{"text": edit(prose(s * 1000), 7), "id": f"{name}-near"}]
        write_jsonl(raw / name / "d.jsonl", records)
    return raw


def test_holdout_drawn_by_text_and_kept_out_of_training(distinct, tmp_path):
    plain = dedup([distinct], tmp_path / "plain", progress=False)
    m = dedup([distinct], tmp_path / "out", holdout=0.1, progress=False)
    train, held = kept_docs(tmp_path / "out"), held_docs(tmp_path / "out")
    # the training set and the holdout split what plain dedup keeps, in input order
    assert 5 <= len(held) <= 40
    assert sorted(r["id"] for r in train + held) == sorted(r["id"] for r in kept_docs(tmp_path / "plain"))  # fmt: skip
    assert not {r["text"] for r in train} & {r["text"] for r in held}
    # which ones: exactly those whose SHA-256 draws under the fraction with the seed (42)
    digests = as_digests(b"".join(hashlib.sha256(r["text"].encode()).digest() for r in train + held))  # fmt: skip
    assert held_out(digests, 0.1, 42).tolist() == [False] * len(train) + [True] * len(held)
    total = m["counts"]["total"]
    assert total["held_out"]["documents"] == len(held) and total["kept"]["documents"] == len(train)
    assert total["near_duplicate"]["documents"] == plain["counts"]["total"]["near_duplicate"]["documents"]  # fmt: skip
    assert_counts_add_up(m)
    assert {o["kind"] for o in m["outputs"]} == {"documents", "holdout", "removed"}
    # the next stage reads the training documents only; the holdout is read by naming it
    training = find_inputs([tmp_path / "out"])
    assert len(training) == 2 and all(f.parent == tmp_path / "out" for f in training)
    assert len(find_inputs([tmp_path / "out" / "_holdout"])) == 2
    # held-out documents are not "removed"
    assert not {r["id"] for r in held} & set(removed_by_id(tmp_path / "out"))


def test_holdout_does_not_depend_on_files_or_order_but_on_the_seed(distinct, tmp_path):
    dedup([distinct], tmp_path / "a", holdout=0.2, progress=False)
    # the same documents, all in one file, in reverse order (but for the near duplicates, whose
    # order decides which one dedup keeps)
    records = [
        r
        for name in ("web", "books")
        for r in reversed(read_jsonl(distinct / name / "d.jsonl"))
        if not r["id"].endswith("-near")
    ]
    write_jsonl(tmp_path / "one" / "all.jsonl", records)
    dedup([tmp_path / "one"], tmp_path / "b", holdout=0.2, progress=False)
    dedup([distinct], tmp_path / "c", holdout=0.2, holdout_seed=7, progress=False)

    def ids(out: str) -> set[str]:
        return {r["id"] for r in held_docs(tmp_path / out)}

    assert ids("a") == ids("b") and ids("a") != ids("c")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def evals(tmp_path, distinct) -> Path:
    """Eval data in a folder: a nested field `doc.question`, compressed and plain files.
    books3's text with its é decomposed (ftfy's NFC makes it equal), web5's text verbatim, and
    web6's text with one more character (not an exact match: kept)."""
    books = read_jsonl(distinct / "books" / "d.jsonl")
    web = read_jsonl(distinct / "web" / "d.jsonl")
    folder = tmp_path / "evals"
    write_jsonl(folder / "a.jsonl", [{"doc": {"question": web[5]["text"]}}, {"doc": {"question": web[6]["text"] + "!"}}])  # fmt: skip
    books3 = books[3]["text"].replace("river", "rive\u0301", 1)
    data = json.dumps({"doc": {"question": books3}}) + "\n"
    (folder / "b.jsonl.gz").write_bytes(gzip.compress(data.encode()))
    books[3]["text"] = books[3]["text"].replace("river", "riv\u00e9", 1)  # the corpus holds NFC é
    write_jsonl(distinct / "books" / "d.jsonl", books)
    return folder


def test_decontaminate_removes_exact_eval_texts(distinct, evals, tmp_path):
    m = dedup([distinct], tmp_path / "out", decontaminate=[evals], decontaminate_field="doc.question", progress=False)  # fmt: skip
    kept = {r["id"] for r in kept_docs(tmp_path / "out")}
    removed = removed_by_id(tmp_path / "out")
    for gone in ("books3", "web5"):
        assert gone not in kept
        assert removed[gone]["reason"] == "decontaminated"
        assert removed[gone]["detail"] == "same text as an eval document"
    assert "web6" in kept
    assert m["counts"]["sources"]["books"]["decontaminated"]["documents"] == 1
    assert m["counts"]["total"]["decontaminated"]["documents"] == 2
    assert_counts_add_up(m)
    assert [(Path(e["path"]).name, e["documents"], e["invalid"]) for e in m["decontaminate"]] == [
        ("a.jsonl", 2, 0),
        ("b.jsonl.gz", 1, 0),
    ]
    # eval matches leave before the draw: neither training nor holdout
    both = dedup([distinct], tmp_path / "both", holdout=0.5, decontaminate=[evals], decontaminate_field="doc.question", progress=False)  # fmt: skip
    assert not {"books3", "web5"} & {r["id"] for r in held_docs(tmp_path / "both") + kept_docs(tmp_path / "both")}  # fmt: skip
    assert both["counts"]["total"]["decontaminated"]["documents"] == 2
    assert_counts_add_up(both)


def test_decontaminate_field_missing_is_clear(distinct, evals, tmp_path):
    with pytest.raises(
        LmpipeError, match=r"a\.jsonl:1: .*'text' is missing.*--decontaminate-field"
    ):
        dedup([distinct], tmp_path / "out", decontaminate=[evals], strict=True, progress=False)
    assert not (tmp_path / "out").exists() and not partial_path(tmp_path / "out").exists()
    m = dedup([distinct], tmp_path / "out", decontaminate=[evals], strict=False, progress=False)
    assert [e["invalid"] for e in m["decontaminate"]] == [2, 1]
    assert m["counts"]["total"]["decontaminated"]["documents"] == 0
    # an empty eval file (a failed download) is reported, not read as "nothing to remove"
    (evals / "c.jsonl").write_text("")
    m = dedup([distinct], tmp_path / "out2", decontaminate=[evals / "c.jsonl"], progress=False)
    assert m["decontaminate"][0]["invalid_examples"] == ["line 1: empty file"]
    with pytest.raises(LmpipeError, match=r"c\.jsonl: eval data for --decontaminate: empty file"):
        dedup([distinct], tmp_path / "out3", decontaminate=[evals / "c.jsonl"], strict=True, progress=False)  # fmt: skip


def test_eval_data_that_breaks_off_is_counted_and_checked_before_the_corpus(
    distinct, evals, tmp_path, monkeypatch
):
    """A truncated .gz eval file keeps its lines before the break and counts one invalid line, as
    a corpus file does (it used to stop the run); under --strict it stops the run before the
    corpus is read (it used to come after every dedup step)."""
    import lmpipe.dataprep.dedup_steps as steps

    lines = [json.dumps({"doc": {"question": f"question {i} " + "lorem ipsum " * 40}}) for i in range(300)]  # fmt: skip
    whole = gzip.compress("".join(line + "\n" for line in lines).encode())
    (evals / "c.jsonl.gz").write_bytes(whole[: len(whole) * 6 // 10])  # a download cut short
    options = {"decontaminate": [evals], "decontaminate_field": "doc.question", "progress": False}
    m = dedup([distinct], tmp_path / "out", **options)
    (cut,) = [e for e in m["decontaminate"] if e["path"].endswith("c.jsonl.gz")]
    assert cut["invalid"] == 1 and "unreadable from here on" in cut["invalid_examples"][0]
    assert 0 < cut["documents"] < 300
    assert m["counts"]["total"]["decontaminated"]["documents"] == 2  # a.jsonl, b.jsonl.gz as before
    assert_counts_add_up(m)
    monkeypatch.setattr(steps, "scan_file", lambda *a: pytest.fail("the corpus was read first"))
    with pytest.raises(LmpipeError, match=r"c\.jsonl\.gz: .*(truncated|CRC|compressed)"):
        dedup([distinct], tmp_path / "strict", strict=True, **options)
    assert not (tmp_path / "strict").exists() and not partial_path(tmp_path / "strict").exists()


def test_holdout_and_evals_identical_for_workers_and_after_a_crash(distinct, evals, tmp_path, monkeypatch):  # fmt: skip
    import lmpipe.dataprep.dedup_kept as kept_steps

    options = {"holdout": 0.2, "decontaminate": [evals], "decontaminate_field": "doc.question", "decontaminate_ngrams": 13, "progress": False}  # fmt: skip
    dedup([distinct], tmp_path / "one", **options)
    dedup([distinct], tmp_path / "two", workers=2, part_entries=40, **options)
    assert tree_bytes(tmp_path / "two") == tree_bytes(tmp_path / "one")
    for step in ("eval_file", "eval_ngram_union", "ngram_file", "holdout_file"):
        real = getattr(kept_steps, step)
        monkeypatch.setattr(kept_steps, step, lambda *a: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            dedup([distinct], tmp_path / step, **options)
        monkeypatch.setattr(kept_steps, step, real)
        dedup([distinct], tmp_path / step, **options)
        assert tree_bytes(tmp_path / step) == tree_bytes(tmp_path / "one"), step
    # new eval data is new state: the partial folder of other evals is not reused
    monkeypatch.setattr(kept_steps, "filter_file", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        dedup([distinct], tmp_path / "changed", **options)
    monkeypatch.undo()
    write_jsonl(evals / "a.jsonl", [{"doc": {"question": "nothing in the corpus"}}])
    m = dedup([distinct], tmp_path / "changed", **options)
    assert m["counts"]["total"]["decontaminated"]["documents"] == 1  # books3 only


# --- n-gram decontamination ----------------------------------------------------------------------


def test_word_ngram_hashes_follow_the_normalised_words():
    from lmpipe.dataprep.decontaminate import ngram_hashes, words_of

    words = words_of("The quick, brown FOX -- jumps over the lazy dog!")
    assert words == ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]
    h = ngram_hashes(words, 3)
    assert len(h) == 7 and len(set(h.tolist())) == 7
    # the same run of words hashes alike wherever it is; its order matters
    assert ngram_hashes(words_of("x y THE QUICK BROWN"), 3)[-1] == h[0]
    assert ngram_hashes(["quick", "the", "brown"], 3)[0] != h[0]
    assert len(ngram_hashes(words, 10)) == 0 and len(ngram_hashes([], 1)) == 0


def test_ngram_decontamination_removes_documents_quoting_eval_text(distinct, tmp_path):
    web = read_jsonl(distinct / "web" / "d.jsonl")
    words7, words8 = web[7]["text"].split(" "), web[8]["text"].split(" ")
    quoted = " ".join(words7[40:60]).upper().replace(" ", ", ", 3)  # case and commas differ
    evals = write_jsonl(
        tmp_path / "evals" / "q.jsonl",
        [
            {"text": f"Question: which passage says {quoted}? Answer: that one"},
            {"text": "alpha beta " + " ".join(words8[10:22]) + " gamma"},  # only 12 words shared
            {"text": "too short to have an n-gram"},
        ],
    )
    exact_only = dedup([distinct], tmp_path / "exact", decontaminate=[evals], progress=False)
    assert exact_only["counts"]["total"]["decontaminated"]["documents"] == 0
    m = dedup([distinct], tmp_path / "out", decontaminate=[evals], decontaminate_ngrams=13, progress=False)  # fmt: skip
    kept = {r["id"] for r in kept_docs(tmp_path / "out")}
    assert "web7" not in kept and "web8" in kept
    removed = removed_by_id(tmp_path / "out")["web7"]
    assert removed["reason"] == "decontaminated"
    expected = " ".join(words7[40:53]).lower().rstrip(".")
    assert removed["detail"] == f"shares the 13-word sequence {expected!r} with {evals}"
    assert m["counts"]["sources"]["web"]["decontaminated"]["documents"] == 1
    assert m["counts"]["total"]["decontaminated"]["documents"] == 1
    assert_counts_add_up(m)
    (info,) = m["decontaminate"]
    assert info["short_for_ngrams"] == 1 and info["ngrams"] > 0
    with pytest.raises(LmpipeError, match="--decontaminate-ngrams needs"):
        dedup([distinct], tmp_path / "x", decontaminate_ngrams=13, progress=False)
    # the command line gives the same output
    from typer.testing import CliRunner

    from lmpipe.cli.app import app

    args = ["dedup", str(distinct), "-o", str(tmp_path / "cli"), "--decontaminate", str(evals)]
    result = CliRunner().invoke(app, [*args, "--decontaminate-ngrams", "13"])
    assert result.exit_code == 0, result.output
    assert tree_bytes(tmp_path / "cli") == tree_bytes(tmp_path / "out")


# --- --source-field --------------------------------------------------------------------------------


def test_source_field_counts_by_the_field(tmp_path):
    raw = tmp_path / "raw"
    write_jsonl(
        raw / "mixed" / "a.jsonl",
        [
            {"text": prose(1), "meta": {"redpajama_set_name": "RedPajamaC4"}},
            {"text": prose(2), "meta": {"redpajama_set_name": "RedPajamaBook"}},
            {"text": edit(prose(1), 3), "meta": {"redpajama_set_name": "RedPajamaBook"}},
            {"text": prose(4), "meta": {}},  # no source: invalid, counted under the folder
        ],
    )
    with pytest.raises(LmpipeError, match=r"a\.jsonl:4: no string 'meta.redpajama_set_name' field \(--source-field\)"):  # fmt: skip
        dedup([raw], tmp_path / "out", source_field="meta.redpajama_set_name", strict=True, progress=False)  # fmt: skip
    m = dedup([raw], tmp_path / "out", source_field="meta.redpajama_set_name", strict=False, progress=False)  # fmt: skip
    counts = {**m["counts"]["sources"], "total": m["counts"]["total"]}
    assert list(m["counts"]["sources"]) == ["RedPajamaBook", "RedPajamaC4", "mixed"]
    assert counts["RedPajamaBook"]["input"]["documents"] == 2
    assert counts["RedPajamaBook"]["near_duplicate"]["documents"] == 1  # of the C4 document
    assert counts["RedPajamaC4"]["kept"]["documents"] == 1
    assert counts["mixed"]["invalid"]["documents"] == counts["mixed"]["input"]["documents"] == 1
    assert counts["total"]["input"]["documents"] == 4
    assert_counts_add_up(m)


def test_find_inputs_skips_private_subfolders(tmp_path):
    for rel in ("a.jsonl", "sub/b.jsonl", "_holdout/c.jsonl", ".git/d.jsonl"):
        write_jsonl(tmp_path / "in" / rel, [{"text": "x"}])
    assert [f.name for f in find_inputs([tmp_path / "in"])] == ["a.jsonl", "b.jsonl"]
    assert [f.name for f in find_inputs([tmp_path / "in" / "_holdout"])] == ["c.jsonl"]


def test_cli_dedup_holdout_decontaminate_source_field(distinct, evals, tmp_path):
    from typer.testing import CliRunner

    from lmpipe.cli.app import app

    args = ["dedup", str(distinct), "-o", str(tmp_path / "out"), "--holdout", "0.1",
            "--decontaminate", str(evals / "a.jsonl"), "--decontaminate", str(evals / "b.jsonl.gz"),
            "--decontaminate-field", "doc.question", "--source-field", "id"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "held" in result.output
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (m["settings"]["holdout"], m["settings"]["source_field"]) == (0.1, "id")
    assert m["counts"]["total"]["decontaminated"]["documents"] == 2
    assert len(m["counts"]["sources"]) == 204  # one source per id
