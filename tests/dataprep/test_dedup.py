"""dedup: datasketch-identical MinHash, LSH parameters, duplicates found, distinct kept, counts."""

from __future__ import annotations

import io
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import zstandard

from lmpipe.dataprep.clusters import KEPT, NEAR, SHORT, decide, union_find
from lmpipe.dataprep.dedup import dedup
from lmpipe.dataprep.documents import find_inputs
from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.folders import partial_path
from lmpipe.dataprep.minhash import MinHasher, normalise, optimal_bands, shingle_hashes

WORDS = (
    "river stone light paper window garden silver market engine winter candle forest letter "
    "number signal harbor copper violet thunder meadow lantern basket orbit puzzle saddle "
    "tunnel velvet anchor bridge cactus falcon glacier hammer island jacket kettle ladder "
    "magnet needle oyster pepper quartz ribbon sphinx tablet umbrella vessel walnut yarrow"
).split()


def prose(seed: int, n_words: int = 120) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."


def edit(text: str, seed: int, n: int = 2) -> str:
    """Replace `n` words: a near duplicate with character 13-gram Jaccard around 0.9-0.97."""
    rng = random.Random(seed)
    words = text.split(" ")
    for i in rng.sample(range(len(words)), n):
        words[i] = "zzz" + words[i]
    return " ".join(words)


def write_jsonl(path: Path, records: list[dict], raw_lines: dict[int, str] | None = None) -> Path:
    """Records as JSON lines; `raw_lines` puts a literal line at a 0-based position."""
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    for pos, raw in sorted((raw_lines or {}).items()):
        lines.insert(pos, raw)
    data = ("\n".join(lines) + "\n").encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def read_zst(path: Path) -> list[dict]:
    with open(path, "rb") as f:
        data = zstandard.ZstdDecompressor().stream_reader(f).read()
    return [json.loads(line) for line in io.BytesIO(data)]


def kept_docs(out: Path) -> list[dict]:
    return [r for p in sorted(out.glob("part-*.jsonl.zst")) for r in read_zst(p)]


def removed_by_id(out: Path) -> dict:
    return {r.get("id"): r for r in read_zst(out / "removed.ndjson.zst")}


# --- MinHash and LSH parameters ---------------------------------------------------------------


def datasketch_values(text: str, n: int, scheme: str) -> np.ndarray:
    from datasketch import MinHash

    m = MinHash(num_perm=128, seed=1, scheme=scheme)
    grams = [text[i : i + n] for i in range(len(text) - n + 1)] or [text]
    m.update_batch([g.encode("utf-8") for g in grams])
    return m.hashvalues.astype(np.uint64)


@pytest.mark.parametrize("scheme", ["legacy", "affine32"])
def test_minhash_equals_datasketch(scheme):
    rng = random.Random(3)
    texts = [
        normalise(prose(1)),
        "café naïve façade über straße 日本語のテキスト emoji 🙂 and some more words here",
        "short",  # shorter than n: the whole string is its one shingle
        "",
        "a" * 40,  # one distinct shingle repeated
        # more distinct shingles than one chunk, so a document spans chunk boundaries
        "".join(rng.choice("abcdefghij ") for _ in range(20_000)),
    ]
    hasher = MinHasher(128, seed=1, scheme=scheme)
    ours = hasher.signatures([shingle_hashes(t, 13) for t in texts])  # one batch, many documents
    for text, row in zip(texts, ours, strict=True):
        assert np.array_equal(row.astype(np.uint64), datasketch_values(text, 13, scheme)), text[:20]
    assert not np.array_equal(ours[0], ours[1])


def test_optimal_bands_match_datasketch():
    from datasketch.lsh import _optimal_param

    assert optimal_bands(0.8, 128) == (9, 13)
    for threshold, num_perm in [(0.5, 128), (0.7, 128), (0.85, 128), (0.9, 256), (0.8, 64)]:
        assert optimal_bands(threshold, num_perm) == _optimal_param(threshold, num_perm, 0.5, 0.5)


def test_normalise_is_slimpajamas_clean():
    text = "Hello,\u00a0World!\n\n\tIt's  a\u2003TEST\x1c-- ok?  "
    expected = re.sub(r"\s+", " ", text.lower().translate(str.maketrans("", "", "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"))).strip()  # fmt: skip
    assert normalise(text) == expected == "hello world its a test ok"


# --- grouping ---------------------------------------------------------------------------------


def test_union_find_streamed_in_batches_equals_all_at_once(monkeypatch):
    import lmpipe.dataprep.clusters as clusters

    rng = np.random.default_rng(0)
    n = 5000
    pairs = rng.integers(0, n, (4000, 2))
    whole = union_find(n, pairs)
    # reference: push the smaller label across every pair until nothing changes
    ref, changed = list(range(n)), True
    while changed:
        changed = False
        for u, v in pairs.tolist():
            low = min(ref[u], ref[v])
            changed |= ref[u] != low or ref[v] != low
            ref[u] = ref[v] = low
    assert whole.tolist() == ref
    monkeypatch.setattr(clusters, "UNION_BATCH", 7)  # batches joined one after another
    assert np.array_equal(union_find(n, iter(np.array_split(pairs, 300))), whole)


def test_union_find_chain_and_order():
    # 4 - 3 - 1 and 2 - 0 - 5: chains listed out of order still collapse onto their minimum
    pairs = np.array([[4, 3], [3, 1], [5, 0], [2, 0]])
    assert union_find(7, pairs).tolist() == [0, 1, 0, 1, 1, 0, 6]


def test_decide_collapses_a_chain_of_band_collisions():
    # doc 1 shares band 0 with doc 0 and band 1 with doc 2; docs 0 and 2 share no band, so only
    # the chain A~B~C puts doc 2 with doc 0.
    sig = np.arange(4 * 6, dtype=np.uint32).reshape(4, 6) * 7 + 1000
    sig[1, 0:3] = sig[0, 0:3]
    sig[2, 3:6] = sig[1, 3:6]
    short = np.array([False, False, False, True, False])
    digests = np.arange(4 * 16, dtype=np.uint8).reshape(4, 16)
    reason, keeper = decide(short, digests, sig, bands=2, rows=3)
    assert reason.tolist() == [KEPT, NEAR, NEAR, SHORT, KEPT]
    assert keeper.tolist() == [0, 0, 0, -1, 4]


# --- the stage on constructed cases -----------------------------------------------------------


@pytest.fixture
def corpus(tmp_path) -> Path:
    """Two sources, plain and compressed files, with known duplicates:
    books/a.jsonl (read first): A, B, C, distinct 1, short, B' (near B)
    web/b.jsonl.zst: A' (near A, cross-source), C' (C with case/punctuation/whitespace changed),
                     a chain W0 ~ W1 ~ W2 (a window shifted twice), distinct 2
    """
    a, b, c = prose(1), prose(2), prose(3)
    w = prose(4, 400)
    c_variant = c.upper().replace(" ", "  \n", 5).replace(".", "!?")
    raw = tmp_path / "raw"
    write_jsonl(
        raw / "books" / "a.jsonl",
        [
            {"text": a, "id": "A", "meta": {"k": 1}},
            {"text": b, "id": "B"},
            {"text": c, "id": "C"},
            {"text": prose(10), "id": "D1"},
            {"text": "Too short to keep.", "id": "S"},
            {"text": edit(b, 1), "id": "B'"},
        ],
    )
    write_jsonl(
        raw / "web" / "b.jsonl.zst",
        [
            {"text": edit(a, 2), "id": "A'"},
            {"text": c_variant, "id": "C'"},
            {"text": w[:1800], "id": "W0"},
            {"text": w[40:1840], "id": "W1"},
            {"text": w[80:1880], "id": "W2"},
            {"text": prose(11), "id": "D2"},
        ],
    )
    return raw


def test_duplicates_found_and_distinct_kept(corpus, tmp_path):
    manifest = dedup([corpus], tmp_path / "out", progress=False)
    out = tmp_path / "out"
    kept = {r["id"] for r in kept_docs(out)}
    assert kept == {"A", "B", "C", "D1", "D2", "W0"}
    removed = removed_by_id(out)
    assert removed["S"]["reason"] == "short"
    assert removed["A'"]["reason"] == "near duplicate"  # cross-source: web vs books
    assert removed["A'"]["duplicate_of"] == {"file": str(corpus / "books" / "a.jsonl"), "line": 1, "id": "A"}  # fmt: skip
    assert removed["B'"]["duplicate_of"]["id"] == "B"
    assert removed["C'"]["reason"] == "exact duplicate"
    assert removed["C'"]["duplicate_of"]["id"] == "C"
    assert {removed["W1"]["duplicate_of"]["id"], removed["W2"]["duplicate_of"]["id"]} == {"W0"}
    total = manifest["counts"]["total"]
    assert (total["input"]["documents"], total["kept"]["documents"]) == (12, 6)
    assert (total["short"]["documents"], total["exact_duplicate"]["documents"]) == (1, 1)
    assert total["near_duplicate"]["documents"] == 4
    assert (
        manifest["counts"]["sources"]["books"]["input"]["documents"] == 6
    )  # source: the file's folder
    assert (manifest["settings"]["bands"], manifest["settings"]["rows"]) == optimal_bands(0.6, 128)


def test_slimpajamas_settings_find_the_same(corpus, tmp_path):
    manifest = dedup([corpus], tmp_path / "out", hash_scheme="legacy", verify=False, progress=False)
    assert {r["id"] for r in kept_docs(tmp_path / "out")} == {"A", "B", "C", "D1", "D2", "W0"}
    settings = manifest["settings"]
    assert (settings["bands"], settings["rows"], settings["hash"]) == (9, 13, "sha1_hash32")


def test_output_is_the_next_stages_input_and_a_rerun_removes_nothing(corpus, tmp_path):
    dedup([corpus], tmp_path / "once", progress=False)
    files = find_inputs([tmp_path / "once"])
    # one part per input file that keeps something, and not the removal listing
    assert [f.name for f in files] == ["part-00000.jsonl.zst", "part-00001.jsonl.zst"]
    again = dedup([tmp_path / "once"], tmp_path / "twice", progress=False)
    assert again["counts"]["total"]["kept"]["documents"] == 6
    assert kept_docs(tmp_path / "twice") == kept_docs(tmp_path / "once")


def test_without_exact_step_same_kept_set_and_variants_are_near(corpus, tmp_path):
    dedup([corpus], tmp_path / "with", progress=False)
    manifest = dedup([corpus], tmp_path / "without", exact=False, progress=False)
    assert kept_docs(tmp_path / "with") == kept_docs(tmp_path / "without")
    assert removed_by_id(tmp_path / "without")["C'"]["reason"] == "near duplicate"
    assert manifest["counts"]["total"]["exact_duplicate"]["documents"] == 0


def test_counts_add_up_per_source(corpus, tmp_path):
    manifest = dedup([corpus], tmp_path / "out", progress=False)
    buckets = ("kept", "short", "exact_duplicate", "near_duplicate", "decontaminated", "held_out", "invalid")  # fmt: skip
    assert set(manifest["counts"]["sources"]) == {"web", "books"}
    assert set(manifest["counts"]["total"]) == {"input", *buckets}
    for source, c in [
        *manifest["counts"]["sources"].items(),
        ("total", manifest["counts"]["total"]),
    ]:
        for unit in ("documents", "bytes"):
            assert sum(c[b][unit] for b in buckets) == c["input"][unit], (source, unit)
    books = manifest["counts"]["sources"]["books"]
    assert books["short"]["bytes"] == len(b"Too short to keep.")
    outputs = {o["file"]: o["documents"] for o in manifest["outputs"]}
    assert outputs["removed.ndjson.zst"] == 6
    assert sum(n for f, n in outputs.items() if f.startswith("part-")) == 6
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest


def test_text_fixed_and_other_fields_pass_through(tmp_path):
    filler = " " + prose(5)
    records = [
        {
            "text": "donâ€™t panic" + filler,
            "id": 7,
            "meta": {"a": [1, 2.5, None], "b": "ü"},
            "x": True,
        },  # fmt: skip
        {"text": "cafe\u0301 au lait " + prose(6), "id": "e", "meta": {}},
    ]
    write_jsonl(tmp_path / "in" / "d.jsonl", records)
    manifest = dedup([tmp_path / "in"], tmp_path / "out", progress=False)
    assert set(manifest["counts"]["sources"]) == {"in"}  # a flat folder: its own name is the source
    kept = kept_docs(tmp_path / "out")
    assert kept[0]["text"].startswith("don't panic")  # mojibake repaired (ftfy also uncurls)
    assert kept[1]["text"].startswith("caf\u00e9 au lait")  # NFC: one code point
    for before, after in zip(records, kept, strict=True):
        assert {k: v for k, v in after.items() if k != "text"} == {
            k: v for k, v in before.items() if k != "text"
        }


@pytest.mark.parametrize(
    "bad, reason",
    [("{not json", "not JSON"), ('{"id": 1}', "no 'text'"), ('{"text": 5}', "'text' is int")],
)
def test_bad_line_strict_errors_and_leaves_nothing(tmp_path, bad, reason):
    path = write_jsonl(tmp_path / "in" / "d.jsonl.zst", [{"text": prose(1)}, {"text": prose(2)}], {1: bad})  # fmt: skip
    out = tmp_path / "out"
    with pytest.raises(LmpipeError, match=re.escape(f"{path}:2: ") + ".*" + re.escape(reason)):
        dedup([tmp_path / "in"], out, strict=True, progress=False)
    assert not out.exists() and not partial_path(out).exists()


def test_bad_lines_counted_as_invalid_when_not_strict(tmp_path):
    write_jsonl(tmp_path / "in" / "s1" / "d.jsonl", [{"text": prose(1), "id": "ok"}], {0: "{x", 1: '{"text": 5}'})  # fmt: skip
    write_jsonl(tmp_path / "in" / "s2" / "e.jsonl", [{"text": prose(2)}])
    manifest = dedup([tmp_path / "in"], tmp_path / "out", strict=False, progress=False)
    assert manifest["counts"]["sources"]["s1"]["invalid"]["documents"] == 2
    assert manifest["counts"]["sources"]["s1"]["input"]["documents"] == 3
    assert manifest["counts"]["sources"]["s2"]["invalid"]["documents"] == 0
    assert manifest["counts"]["total"]["kept"]["documents"] == 2
    listing = read_zst(tmp_path / "out" / "removed.ndjson.zst")
    assert [(r["line"], r["reason"]) for r in listing] == [(1, "invalid"), (2, "invalid")]


def test_finished_output_refused_without_overwrite(corpus, tmp_path):
    out = tmp_path / "out"
    dedup([corpus], out, progress=False)
    stamp = (out / "manifest.json").read_text()
    with pytest.raises(LmpipeError, match="already exists"):
        dedup([corpus], out, progress=False)
    assert (out / "manifest.json").read_text() == stamp
    dedup([corpus], out, overwrite=True, progress=False)
    assert (out / "manifest.json").is_file() and not partial_path(out).exists()


def test_input_inside_output_refused(corpus, tmp_path):
    with pytest.raises(
        LmpipeError, match="the output folder contains .*books, which this stage reads"
    ):
        dedup([corpus / "books"], corpus, overwrite=True, progress=False)
    assert (corpus / "books" / "a.jsonl").is_file()


# --- the command line -------------------------------------------------------------------------


def test_cli_dedup(corpus, tmp_path):
    from typer.testing import CliRunner

    from lmpipe.cli.app import app

    result = CliRunner().invoke(app, ["dedup", str(corpus), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "near" in result.output and "all sources" in result.output
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]["total"]["kept"]["documents"] == 6  # fmt: skip

    # Bad lines are counted, reported and listed by default; --strict stops at the first.
    bad = write_jsonl(tmp_path / "bad" / "x.jsonl", [{"text": prose(1)}], {1: "oops"})
    (tmp_path / "bad" / "empty.jsonl").write_text("\n")
    result = CliRunner().invoke(app, ["dedup", str(tmp_path / "bad"), "-o", str(tmp_path / "out2")])
    assert result.exit_code == 0, result.output
    assert "2 invalid line(s) in 2 file(s)" in result.output
    assert f"{bad}: 1 (line 2: not JSON" in result.output
    assert "empty.jsonl: 1 (line 1: empty file" in result.output
    manifest = json.loads((tmp_path / "out2" / "manifest.json").read_text())
    assert [(Path(e["path"]).name, e["invalid"]) for e in manifest["inputs"]] == [("empty.jsonl", 1), ("x.jsonl", 1)]  # fmt: skip
    assert manifest["counts"]["total"]["invalid"]["documents"] == 2
    removed = read_zst(tmp_path / "out2" / "removed.ndjson.zst")
    assert sorted((Path(r["file"]).name, r["line"], r["reason"]) for r in removed) == [("empty.jsonl", 1, "invalid"), ("x.jsonl", 2, "invalid")]  # fmt: skip
    result = CliRunner().invoke(app, ["dedup", str(bad), "-o", str(tmp_path / "out3"), "--strict"])
    assert result.exit_code == 2
    assert f"{bad}:2:" in result.output
    assert not (tmp_path / "out3").exists()


# --- verification, workers, keep, the fast path of ftfy ------------------------------------------


def test_verify_drops_a_false_candidate_and_keeps_a_true_pair(tmp_path, monkeypatch):
    # LSH forced to put every document in one bucket: without verification everything collapses
    # into the first document; with it only the true near duplicate (J > 0.9) is removed.
    import lmpipe.dataprep.dedup_steps as steps

    a, d1, d2 = prose(1), prose(2), prose(3)
    write_jsonl(
        tmp_path / "in" / "d.jsonl",
        [{"text": a, "id": "A"}, {"text": d1, "id": "D1"}, {"text": edit(a, 1), "id": "A'"}, {"text": d2, "id": "D2"}],
    )  # fmt: skip

    def one_bucket(signatures, bands, rows):
        return np.zeros((len(signatures), bands, 2), dtype=np.uint64)

    monkeypatch.setattr(steps, "band_hashes", one_bucket)
    dedup([tmp_path / "in"], tmp_path / "plain", verify=False, progress=False)
    assert {r["id"] for r in kept_docs(tmp_path / "plain")} == {"A"}
    manifest = dedup([tmp_path / "in"], tmp_path / "verified", progress=False)  # the default
    assert {r["id"] for r in kept_docs(tmp_path / "verified")} == {"A", "D1", "D2"}
    assert removed_by_id(tmp_path / "verified")["A'"]["duplicate_of"]["id"] == "A"
    assert manifest["settings"]["verify"] is True


def test_verify_joins_a_pair_whose_bucket_first_is_not_similar():
    # Bucket [0, 1, 2] in one band: 0 is unlike both, 1 ~ 2. SlimPajama pairs each with the first
    # only; after verification that pairing would lose 1 ~ 2, the window keeps it.
    sig = np.array([[5, 5], [5, 5], [5, 5]], dtype=np.uint32)
    short = np.zeros(3, dtype=bool)
    digests = np.arange(48, dtype=np.uint8).reshape(3, 16)

    def similar(pairs):
        return np.array([set(p) == {1, 2} for p in pairs.tolist()])

    reason, keeper = decide(short, digests, sig, bands=1, rows=2, verify=similar)
    assert reason.tolist() == [KEPT, KEPT, KEPT]
    reason, keeper = decide(short, digests, sig, bands=1, rows=2, verify=similar, window=8)
    assert reason.tolist() == [KEPT, KEPT, NEAR] and keeper.tolist() == [0, 1, 1]


def test_workers_give_byte_identical_output(corpus, tmp_path):
    (corpus / "web" / "more.jsonl").write_text(
        "".join(json.dumps({"text": prose(20 + i), "id": f"M{i}"}) + "\n" for i in range(5))
    )
    for j in (1, 2):
        dedup([corpus], tmp_path / f"j{j}", workers=j, hash_scheme="oph", verify=True, progress=False)  # fmt: skip
    one, two = sorted((tmp_path / "j1").iterdir()), sorted((tmp_path / "j2").iterdir())
    assert [p.name for p in one] == [p.name for p in two]
    for x, y in zip(one, two, strict=True):
        assert x.read_bytes() == y.read_bytes(), x.name
    assert {r["id"] for r in kept_docs(tmp_path / "j2")} >= {"A", "B", "C", "M0", "M4"}


def test_keep_longest(tmp_path):
    short_a = prose(1, 100)
    long_a = short_a + " " + " ".join(prose(2, 4).split()[:4])  # a few words longer: J ~ 0.95
    write_jsonl(
        tmp_path / "in" / "d.jsonl",
        [{"text": short_a, "id": "short"}, {"text": prose(3), "id": "other"}, {"text": long_a, "id": "long"}],
    )  # fmt: skip
    manifest = dedup([tmp_path / "in"], tmp_path / "out", keep="longest", progress=False)
    assert {r["id"] for r in kept_docs(tmp_path / "out")} == {"other", "long"}
    assert removed_by_id(tmp_path / "out")["short"]["duplicate_of"]["id"] == "long"
    assert manifest["settings"]["keep"] == "longest"


def test_lsh_threshold_sets_the_bands(corpus, tmp_path):
    manifest = dedup([corpus], tmp_path / "out", lsh_threshold=0.7, progress=False)
    settings = manifest["settings"]
    assert (settings["bands"], settings["rows"]) == optimal_bands(0.7, 128) != (9, 13)
    assert manifest["counts"]["total"]["kept"]["documents"] == 6


# --- the map-reduce: partitions, resume after a crash ---------------------------------------------


@pytest.fixture
def many_files(tmp_path) -> Path:
    """Twelve files in three sources: near and exact duplicates within and across files, a short
    document and a bad line per source, so that every step has several units with work in them."""
    raw = tmp_path / "many"
    base = [prose(100 + k) for k in range(8)]
    for f in range(12):
        records = [{"text": prose(1000 + f * 10 + k), "id": f"u{f}.{k}"} for k in range(3)]
        records.append({"text": edit(base[f % 8], f), "id": f"n{f}"})  # near base[f % 8]
        records.append({"text": base[(f + 3) % 8].upper(), "id": f"e{f}"})  # exact, once normalised
        records.append({"text": "short", "id": f"s{f}"})
        write_jsonl(raw / f"src{f % 3}" / f"f{f:02d}.jsonl", records, {2: "{not json"})
    return raw


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_partitions_and_workers_do_not_change_a_byte(many_files, tmp_path, monkeypatch):
    import lmpipe.dataprep.dedup_steps as steps

    runs = {
        "one": {},
        "tiny_partitions": {"part_entries": 7},
        "workers": {"part_entries": 50, "workers": 2},
    }
    for name, options in runs.items():
        if name == "tiny_partitions":
            monkeypatch.setattr(steps, "VERIFY_CHUNK", 2)
        dedup([many_files], tmp_path / name, strict=False, progress=False, **options)
    one = folder_bytes(tmp_path / "one")
    assert len([n for n in one if n.startswith("part-")]) == 12
    for name in runs:
        assert folder_bytes(tmp_path / name) == one, name
    kept = {r["id"] for r in kept_docs(tmp_path / "one")}
    assert {f"u{f}.{k}" for f in range(12) for k in range(3)} <= kept
    # 8 base texts, each behind 3 of the 24 edited (n) and upper-cased (e) copies: one kept each
    assert len(kept & ({f"n{f}" for f in range(12)} | {f"e{f}" for f in range(12)})) == 8


STEPS = ["scan_file", "exact_partition", "lsh_partition", "merge_bucket", "shingle_sets_file",
         "verify_chunk", "decide_all", "filter_file"]  # fmt: skip


def step_module(name: str):
    """The module whose attribute `dedup` calls for a step: dedup_kept for the last steps."""
    import lmpipe.dataprep.dedup_kept as kept_steps
    import lmpipe.dataprep.dedup_steps as steps

    return kept_steps if hasattr(kept_steps, name) else steps


@pytest.mark.parametrize("step", STEPS)
def test_a_crash_in_any_step_resumes_to_identical_output(many_files, tmp_path, monkeypatch, step):
    import lmpipe.dataprep.dedup_steps as steps

    options = {"strict": False, "progress": False, "part_entries": 30}
    dedup([many_files], tmp_path / "clean", **options)
    monkeypatch.setattr(steps, "VERIFY_CHUNK", 3)  # several verify units, same output
    real, calls = getattr(step_module(step), step), []

    def crash_on_second(*args):
        calls.append(1)
        if len(calls) == 2 or step == "decide_all":
            raise RuntimeError("crash")
        return real(*args)

    monkeypatch.setattr(step_module(step), step, crash_on_second)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="crash"):
        dedup([many_files], out, **options)
    assert not out.exists() and partial_path(out).exists()
    done_before = sorted(p.name for p in partial_path(out).rglob("*.done"))
    monkeypatch.setattr(step_module(step), step, real)
    redone = []
    for name in STEPS:  # count what the rerun does: only units without a marker
        fn = getattr(step_module(name), name)
        monkeypatch.setattr(
            step_module(name), name, lambda *a, fn=fn, name=name: redone.append(name) or fn(*a)
        )
    dedup([many_files], out, **options)
    assert folder_bytes(out) == folder_bytes(tmp_path / "clean")
    assert not partial_path(out).exists()
    if step != "scan_file":
        assert "scan_file" not in redone and len(done_before) >= 12
    assert step in redone


def test_other_settings_do_not_resume_a_partial_folder(many_files, tmp_path, monkeypatch):
    import lmpipe.dataprep.dedup_steps as steps

    monkeypatch.setattr(steps, "decide_all", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        dedup([many_files], tmp_path / "out", strict=False, progress=False)
    monkeypatch.undo()
    dedup([many_files], tmp_path / "out", strict=False, progress=False, keep="longest")
    dedup([many_files], tmp_path / "clean", strict=False, progress=False, keep="longest")
    assert folder_bytes(tmp_path / "out") == folder_bytes(tmp_path / "clean")


def test_resume_with_other_part_entries_starts_afresh(many_files, tmp_path, monkeypatch):
    """Partitions and pair buckets follow part_entries: a rerun with another value must not read
    the crashed run's units as its own."""
    import lmpipe.dataprep.dedup_steps as steps

    monkeypatch.setattr(steps, "decide_all", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        dedup([many_files], tmp_path / "out", progress=False, part_entries=30)
    monkeypatch.undo()
    dedup([many_files], tmp_path / "out", progress=False)
    dedup([many_files], tmp_path / "clean", progress=False)
    assert folder_bytes(tmp_path / "out") == folder_bytes(tmp_path / "clean")


@pytest.mark.parametrize("near", [True, False])
def test_keep_longest_without_any_duplicate(tmp_path, near):
    raw = write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": prose(k)} for k in range(3)])
    m = dedup([raw], tmp_path / "out", keep="longest", near=near, progress=False)
    assert m["counts"]["total"]["kept"]["documents"] == 3 and m["cluster_sizes"] == {}


KILLABLE = """
import sys, time
from pathlib import Path
import lmpipe.dataprep.dedup_kept as kept_steps
import lmpipe.dataprep.dedup_steps as steps
for module, name in [(steps, "scan_file"), (steps, "exact_partition"), (steps, "lsh_partition"),
                     (steps, "shingle_sets_file"), (steps, "verify_chunk"), (kept_steps, "filter_file")]:
    def slow(*args, fn=getattr(module, name)):
        time.sleep(0.05)  # slow enough that the parent kills it mid-step, on any machine
        return fn(*args)
    setattr(module, name, slow)
from lmpipe.dataprep.dedup import dedup
dedup([Path(sys.argv[1])], Path(sys.argv[2]), strict=False, progress=False, part_entries=30)
"""


@pytest.mark.parametrize("step, units", [("scan", 5), ("lsh", 2), ("filter", 4)])
def test_killed_run_reruns_to_identical_output(many_files, tmp_path, step, units):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(many_files), str(out)])
    markers = partial_path(out) / "_work" / step
    deadline = time.monotonic() + 120
    while len(list(markers.glob("*.done"))) < units and time.monotonic() < deadline:
        assert proc.poll() is None, "finished before it could be killed"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and partial_path(out).exists()
    dedup([many_files], out, strict=False, progress=False, part_entries=30)
    dedup([many_files], tmp_path / "clean", strict=False, progress=False)
    assert folder_bytes(out) == folder_bytes(tmp_path / "clean")


def test_ray_engine_gives_the_local_output(many_files, tmp_path):
    try:
        import ray  # noqa: F401
    except ImportError:
        pytest.skip("ray is not installed (optional extra: pip install 'lmpipe[ray]')")
    options = {"strict": False, "progress": False, "part_entries": 30}
    dedup([many_files], tmp_path / "local", **options)
    dedup([many_files], tmp_path / "ray", engine="ray", workers=2, **options)
    assert folder_bytes(tmp_path / "ray") == folder_bytes(tmp_path / "local")
    # a bad line (many_files has some) under --strict is the task's own one-line error, not
    # Ray's wrapper with the worker's traceback
    with pytest.raises(LmpipeError) as raised:
        dedup([many_files], tmp_path / "strict", engine="ray", workers=2, strict=True, progress=False)  # fmt: skip
    assert re.fullmatch(rf"{re.escape(str(many_files))}/\S+\.jsonl:\d+: not JSON \(.*\)", str(raised.value))  # fmt: skip


def test_ray_engine_missing_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("no ray here")
        return real_import(name, *args, **kwargs)

    write_jsonl(tmp_path / "in" / "d.jsonl", [{"text": prose(1)}])
    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(LmpipeError, match=re.escape("pip install 'lmpipe[ray]'")):
        dedup([tmp_path / "in"], tmp_path / "out", engine="ray", progress=False)
    assert not (tmp_path / "out").exists() and not partial_path(tmp_path / "out").exists()


def test_a_resume_that_names_the_files_another_way_gives_its_own_output(tmp_path, monkeypatch):
    """Killed after every step, then rerun on the same files named from a deeper folder: the
    finished units hold the first names (source `corpus`, not `a` and `b`), so the run must start
    afresh and equal an uninterrupted run of the second command."""
    import lmpipe.dataprep.dedup as stage

    corpus = tmp_path / "nest" / "corpus"
    write_jsonl(corpus / "a" / "d.jsonl", [{"text": prose(i)} for i in range(6)])
    write_jsonl(corpus / "b" / "d.jsonl", [{"text": prose(100 + i)} for i in range(4)])
    out = tmp_path / "out"
    monkeypatch.setattr(stage, "write_cluster_png", lambda *a: 1 / 0)  # after the last step
    with pytest.raises(ZeroDivisionError):
        dedup([tmp_path / "nest"], out, progress=False)
    monkeypatch.undo()
    assert partial_path(out).is_dir()
    resumed = dedup([corpus], out, progress=False)
    dedup([corpus], tmp_path / "ref", progress=False)
    assert sorted(resumed["counts"]["sources"]) == ["a", "b"]
    assert folder_bytes(out) == folder_bytes(tmp_path / "ref")


def test_off_a_terminal_each_step_says_when_it_ends(corpus, tmp_path, capsys, monkeypatch):
    """Under nohup or sbatch rich's bar shows nothing: a plain line on stderr as each step ends
    (and, at most every PLAIN_EVERY seconds, how far a long step has come); stdout is the
    summary's. A resumed run says which steps had finished before it."""
    import lmpipe.dataprep.dedup as dedup_module
    import lmpipe.dataprep.dedup_steps as steps

    def lines(err: str) -> list[str]:
        return [re.sub(r"\d+ s$", "N s", line) for line in err.splitlines()]

    decide_all = steps.decide_all
    monkeypatch.setattr(steps, "decide_all", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        dedup([corpus], tmp_path / "out", part_entries=20)
    assert lines(capsys.readouterr().err) == [
        "dedup: fix, normalise, MinHash done: 2 unit(s), N s",
        "dedup: exact duplicates done: 1 unit(s), N s",
        "dedup: LSH buckets done: 10 unit(s), N s",
        "dedup: candidate pairs done: 10 unit(s), N s",
        "dedup: shingle sets done: 2 unit(s), N s",
        "dedup: verify pairs done: 4 unit(s), N s",
    ]
    monkeypatch.setattr(steps, "decide_all", decide_all)
    monkeypatch.setattr(dedup_module, "PLAIN_EVERY", 0.0)  # a line as each unit ends
    dedup([corpus], tmp_path / "out", part_entries=20)
    out, err = capsys.readouterr()
    assert lines(err) == [
        "dedup: fix, normalise, MinHash done: 2 unit(s), before this run",
        "dedup: exact duplicates done: 1 unit(s), before this run",
        "dedup: LSH buckets done: 10 unit(s), before this run",
        "dedup: candidate pairs done: 10 unit(s), before this run",
        "dedup: shingle sets done: 2 unit(s), before this run",
        "dedup: verify pairs done: 4 unit(s), before this run",
        "dedup: components done: 1 unit(s), N s",
        "dedup: write kept documents: 1 of 2 units done, N s",
        "dedup: write kept documents done: 2 unit(s), N s",
    ]
    assert "unit(s)" not in out and "all sources" in out
