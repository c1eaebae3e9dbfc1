"""dedup's verify steps: memory does not grow with the documents that have a pair (R22), and a
shingle-set unit cut short is redone whole."""

from __future__ import annotations

import json
import random
import sys
import tracemalloc
from pathlib import Path

import pytest

import lmpipe.dataprep.dedup_steps as steps
from lmpipe.dataprep.dedup import dedup
from lmpipe.dataprep.folders import partial_path

PAIRS = 300  # documents, each with a near copy: 600 documents, 3.8 MB, every one in a pair
WORDS = 800  # about 5,000 characters a document


def paired_corpus(folder: Path) -> Path:
    """One file of distinct documents, each followed by a copy with every 100th word changed
    (13-gram Jaccard ~0.9: a verified near duplicate)."""
    rng = random.Random(0)
    vocabulary = [f"w{rng.getrandbits(24):06x}" for _ in range(4000)]
    lines = []
    for k in range(PAIRS):
        words = [rng.choice(vocabulary) for _ in range(WORDS)]
        lines.append(json.dumps({"text": " ".join(words), "id": f"a{k}"}))
        for i in range(0, WORDS, 100):
            words[i] = words[i][::-1] + "q"
        lines.append(json.dumps({"text": " ".join(words), "id": f"b{k}"}))
    folder.mkdir()
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def pair_characters(folder: Path) -> int:
    lines = (folder / "pairs.jsonl").read_text().splitlines()
    return sum(len(json.loads(line)["text"]) for line in lines)


def test_shingle_sets_are_written_as_they_are_made(tmp_path, monkeypatch):
    """The sets unit held every pair document's set (8 bytes a character), then a copy of them
    all: 16 bytes a character of a file's pair documents (1.5 GB for a 100 MB file). Now it
    holds one document's set at a time."""
    raw = paired_corpus(tmp_path / "raw")
    chars = pair_characters(raw)
    real, peaks = steps.shingle_sets_file, []

    def measured(*args):
        tracemalloc.start()
        try:
            info = real(*args)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        return info

    monkeypatch.setattr(steps, "shingle_sets_file", measured)
    m = dedup([raw], tmp_path / "out", progress=False)
    assert m["counts"]["total"]["near_duplicate"]["documents"] == PAIRS  # every copy verified
    assert len(peaks) == 1 and chars > 3_800_000
    # the old unit traced 61.6 MB (16 * chars); now 0.5 MB: a document's set, the row tables
    assert peaks[0] < 2 * chars, f"{peaks[0]:,} bytes traced for {chars:,} characters"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_verify_reads_the_sets_without_mapping_them(tmp_path, monkeypatch):
    """A memory-mapped set stays in the process's RSS once touched, and the pairs touch the sets
    of the whole corpus (8 bytes a character): verify reads the two sets it compares instead."""
    raw = paired_corpus(tmp_path / "raw")
    chars = pair_characters(raw)
    real, growth = steps.verify_chunk, []

    def rss_kb(field: str) -> int:
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line.split()[1] for line in status if line.startswith(field)))

    def measured(*args):
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS (VmHWM) := RSS now
        before = rss_kb("VmRSS:")
        info = real(*args)
        growth.append((rss_kb("VmHWM:") - before) * 1024)
        return info

    monkeypatch.setattr(steps, "verify_chunk", measured)
    m = dedup([raw], tmp_path / "out", progress=False)
    assert m["counts"]["total"]["near_duplicate"]["documents"] == PAIRS
    assert len(growth) == 1  # 300 pairs: one verify unit
    # mapped, the sets added 30 MB (8 * chars) to the peak RSS; read, nothing measurable
    assert growth[0] < 2 * chars, f"peak RSS grew {growth[0]:,} bytes in verify"


def test_a_sets_unit_cut_short_is_written_again(tmp_path, monkeypatch):
    """A crash mid-unit leaves part of the values file and no marker: the rerun writes the file
    from the start, and the output is that of an uninterrupted run."""
    raw = paired_corpus(tmp_path / "raw")
    dedup([raw], tmp_path / "clean", progress=False)
    real, calls = steps.distinct_shingles, []

    def crash_on_tenth(*args):
        calls.append(1)
        if len(calls) == 10:
            raise RuntimeError("crash")
        return real(*args)

    monkeypatch.setattr(steps, "distinct_shingles", crash_on_tenth)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="crash"):
        dedup([raw], out, progress=False)
    state = partial_path(out) / steps.STATE
    assert (state / "sets" / "00000.values").stat().st_size > 0
    assert not steps.marker(state, "sets", 0).exists()
    monkeypatch.undo()
    dedup([raw], out, progress=False)
    for name in ("manifest.json", "part-00000.jsonl.zst", "removed.ndjson.zst"):
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name
