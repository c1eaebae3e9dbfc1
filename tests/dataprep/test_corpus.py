"""The demo corpus: real stdlib prose, deterministic, with injected material dedup must remove."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import zstandard

from lmpipe.dataprep.corpus import (
    DOCSTRINGS,
    MIN_JACCARD,
    TOPICS,
    build_demo_corpus,
    jaccard,
    write_demo_corpus,
)
from lmpipe.dataprep.dedup import dedup
from lmpipe.dataprep.documents import find_inputs, read_documents
from lmpipe.dataprep.minhash import normalise


@pytest.fixture(scope="module")
def built():
    return build_demo_corpus(seed=0)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    raw = tmp_path_factory.mktemp("demo") / "raw"
    return raw, write_demo_corpus(raw, seed=0)


def ordered(corpus):
    """All records in dedup's input order (sources sorted by folder name)."""
    return [r for source in sorted(corpus) for r in corpus[source]]


def test_real_prose_of_the_right_size(built):
    corpus, summary = built
    records = ordered(corpus)
    assert 1_000 <= summary["documents"] == len(records)
    assert 1_000_000 <= summary["bytes"] <= 3_000_000
    assert set(summary["sources"]) == {TOPICS, DOCSTRINGS}
    assert len({r["id"] for r in records}) == len(records)
    for r in records:
        assert set(r) == {"text", "meta", "id"} and isinstance(r["text"], str)
        assert r["meta"]["source"] in (TOPICS, DOCSTRINGS) and r["meta"]["name"]
    assert any("for" in r["text"] and "statement" in r["text"] for r in corpus[TOPICS])


def test_deterministic_per_seed(built):
    again, _ = build_demo_corpus(seed=0)
    other, _ = build_demo_corpus(seed=1)
    assert again == built[0]
    assert other != built[0]


def test_injected_material_is_what_it_claims(built):
    corpus, summary = built
    records = ordered(corpus)
    position = {r["id"]: i for i, r in enumerate(records)}
    by_id = {r["id"]: r for r in records}
    ids = summary["ids"]
    assert len(ids["near_duplicate"]) == summary["near_duplicates"] >= 30
    assert len(ids["exact_duplicate"]) == summary["exact_duplicates"] >= 15
    assert len(ids["short"]) == summary["short"] >= 20
    cross = 0
    for kind in ("near_duplicate", "exact_duplicate"):
        for copy_id in ids[kind]:
            original_id = copy_id.rsplit("~", 1)[0]
            copy, original = by_id[copy_id], by_id[original_id]
            assert position[copy_id] > position[original_id]  # dedup keeps the original
            cross += copy["meta"]["source"] != original["meta"]["source"]
            assert copy["text"] != original["text"]
            if kind == "near_duplicate":
                assert normalise(copy["text"]) != normalise(original["text"])
                assert jaccard(copy["text"], original["text"]) >= MIN_JACCARD
            else:
                assert normalise(copy["text"]) == normalise(original["text"])
    assert cross == summary["cross_source"] > 0
    short = set(ids["short"])
    for r in records:
        assert (len(normalise(r["text"])) < 200) == (r["id"] in short)


def test_written_files_read_back(written):
    raw, summary = written
    files = find_inputs([raw])
    assert [f.relative_to(raw).as_posix() for f in files] == [
        "pydoc_topics/part-0.jsonl",
        "stdlib_docstrings/part-0.jsonl.zst",
        "stdlib_docstrings/part-1.jsonl.zst",
    ]
    assert sum(1 for f in files for _ in read_documents(f)) == summary["documents"]


def test_dedup_removes_the_injected_material(written, tmp_path):
    raw, summary = written
    manifest = dedup([raw], tmp_path / "clean", progress=False)
    total = manifest["counts"]["total"]
    assert total["input"]["documents"] == summary["documents"]
    # The real docstrings hold natural duplicates too, hence >=.
    assert total["short"]["documents"] >= summary["short"]
    assert total["exact_duplicate"]["documents"] >= summary["exact_duplicates"]
    assert total["near_duplicate"]["documents"] >= summary["near_duplicates"]
    with open(tmp_path / "clean" / "removed.ndjson.zst", "rb") as f:
        data = zstandard.ZstdDecompressor().stream_reader(f).read()
    reason = {r["id"]: r["reason"] for r in map(json.loads, io.BytesIO(data))}
    ids = summary["ids"]
    assert all(reason.get(i) == "near duplicate" for i in ids["near_duplicate"])
    assert all(reason.get(i) == "exact duplicate" for i in ids["exact_duplicate"])
    assert all(reason.get(i) == "short" for i in ids["short"])
    kept = total["kept"]["documents"]
    assert kept == summary["documents"] - len(reason)


def test_rewriting_replaces_its_own_files(tmp_path: Path):
    first = write_demo_corpus(tmp_path / "raw", seed=0)
    second = write_demo_corpus(tmp_path / "raw", seed=0)
    assert first == second
    assert sorted(p.name for p in (tmp_path / "raw").rglob("*.jsonl*")) == [
        "part-0.jsonl",
        "part-0.jsonl.zst",
        "part-1.jsonl.zst",
    ]
