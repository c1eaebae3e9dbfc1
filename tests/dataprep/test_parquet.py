"""Parquet input: the same documents as JSON lines, values made JSON, bad rows named or counted."""

from __future__ import annotations

import datetime
import decimal
import json
from pathlib import Path

import pytest

pa = pytest.importorskip("pyarrow", reason="reading .parquet needs the `parquet` extra (pyarrow)")
pq = pytest.importorskip("pyarrow.parquet")

from lmpipe.dataprep import parquet  # noqa: E402  (after the skip: pyarrow is optional)
from lmpipe.dataprep.dedup import dedup  # noqa: E402
from lmpipe.dataprep.documents import InvalidLines, find_inputs, read_documents  # noqa: E402
from lmpipe.dataprep.errors import LmpipeError  # noqa: E402
from lmpipe.dataprep.shards import TokenShards  # noqa: E402
from lmpipe.dataprep.tokenize import tokenize  # noqa: E402
from tests.dataprep.test_dedup import edit, kept_docs, prose, read_zst, write_jsonl  # noqa: E402
from tests.dataprep.test_tokenize import TEXTS  # noqa: E402


def write_parquet(path: Path, table: pa.Table | list[dict], **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not isinstance(table, pa.Table):
        table = pa.Table.from_pylist(table)
    pq.write_table(table, path, **options)
    return path


def read(path: Path) -> tuple[list[tuple[int, dict]], InvalidLines]:
    invalid = InvalidLines()
    return list(read_documents(path, strict=False, invalid=invalid)), invalid


def many_rows(n: int) -> pa.Table:
    return pa.table(
        {"text": [f"row {i}: a few words of text" for i in range(n)], "id": list(range(n))}
    )


# --- the stages read Parquet as they read JSON lines ----------------------------------------------


def dedup_records() -> list[dict]:
    """Distinct, exact and near duplicates, short and a null text; every record has every field
    (a Parquet row always has every column)."""
    a, b, c = prose(1), prose(2), prose(3)
    texts = [a, b, "Too short to keep.", c, edit(a, 1), None, b, prose(4), edit(c, 2), prose(5)]
    texts += [prose(10 + k) if k % 3 else edit(b, 10 + k) for k in range(20)]
    return [
        {"text": t, "id": f"d{k}", "meta": {"k": k, "tags": ["x"] * (k % 3)}}
        for k, t in enumerate(texts)
    ]


def test_dedup_decides_and_keeps_alike_from_jsonl_and_parquet(tmp_path):
    records = dedup_records()
    write_jsonl(tmp_path / "j" / "src" / "a.jsonl", records)
    write_parquet(tmp_path / "p" / "src" / "a.parquet", records, row_group_size=7)
    assert pq.ParquetFile(tmp_path / "p" / "src" / "a.parquet").metadata.num_row_groups == 5
    runs = {k: dedup([tmp_path / k], tmp_path / f"out-{k}", progress=False) for k in "jp"}

    kept = kept_docs(tmp_path / "out-j")
    assert kept == kept_docs(tmp_path / "out-p")
    assert 10 < len(kept) < len(records)  # something of each kind was removed
    assert runs["j"]["counts"] == runs["p"]["counts"]
    assert runs["p"]["counts"]["total"]["invalid"]["documents"] == 1

    def removed(k: str, name: str) -> list[dict]:
        text = json.dumps(read_zst(tmp_path / f"out-{k}" / "removed.ndjson.zst"))
        return json.loads(text.replace(str(tmp_path / k / "src" / name), "FILE"))

    listing = removed("p", "a.parquet")
    assert listing == removed("j", "a.jsonl")
    assert {e["reason"] for e in listing} == {
        "short",
        "exact duplicate",
        "near duplicate",
        "invalid",
    }
    invalid = {"file": "FILE", "line": 6, "reason": "invalid"}
    assert [e for e in listing if e["reason"] == "invalid"] == [
        {**invalid, "detail": "'text' is NoneType, not a string"}
    ]


def token_docs(folder: Path) -> dict[str, list[list[int]]]:
    return {
        s: [d.tolist() for d in TokenShards(folder, s).documents()] for s in ("train", "heldout")
    }


def test_tokenize_gives_the_same_tokens_from_jsonl_and_parquet(gpt2, tmp_path):
    records = [{"text": t, "id": i} for i, t in enumerate(TEXTS)] + [{"text": None, "id": -1}]
    write_jsonl(tmp_path / "j" / "a.jsonl", records)
    write_parquet(tmp_path / "p" / "a.parquet", records, row_group_size=50)
    runs = {
        k: tokenize([tmp_path / k], tmp_path / f"tok-{k}", holdout=0.3, seed=1, shard_tokens=1000)
        for k in "jp"
    }
    assert runs["j"]["totals"] == runs["p"]["totals"]
    assert runs["p"]["totals"]["invalid"] == 1
    assert runs["p"]["inputs"][0]["invalid_examples"] == [
        f"line {len(TEXTS) + 1}: 'text' is NoneType, not a string"
    ]
    docs = {k: token_docs(tmp_path / f"tok-{k}") for k in "jp"}
    assert docs["j"] == docs["p"]
    assert all(docs["p"].values())  # both splits hold documents
    assert sorted(gpt2.decode(d) for split in docs["p"].values() for d in split) == sorted(TEXTS)


def test_find_inputs_takes_parquet_files(tmp_path):
    write_parquet(tmp_path / "d" / "b.parquet", many_rows(3))
    write_jsonl(tmp_path / "d" / "a.jsonl", [{"text": "x"}])
    assert [p.name for p in find_inputs([tmp_path / "d"])] == ["a.jsonl", "b.parquet"]
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(LmpipeError, match=r"not a \.jsonl or .* or \.parquet file"):
        find_inputs([tmp_path / "notes.txt"])


def test_missing_pyarrow_is_an_error_before_any_work(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "a.parquet", many_rows(3))
    real = parquet.importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "pyarrow" else real(name, *args)

    monkeypatch.setattr(parquet.importlib.util, "find_spec", find_spec)
    expected = r"a\.parquet: reading \.parquet needs pyarrow: pip install 'lmpipe\[parquet\]'"
    with pytest.raises(LmpipeError, match=expected):
        find_inputs([tmp_path])
    with pytest.raises(LmpipeError, match=expected):  # never counted as an invalid line
        read(path)


# --- values -------------------------------------------------------------------------------------


def test_extra_columns_become_json_values_and_pass_through_dedup(tmp_path):
    utc = datetime.timezone.utc
    table = pa.table(
        {
            "text": [prose(1), prose(2)],
            "n": pa.array([1, None], pa.int64()),
            "score": [0.5, 2.0],
            "meta": [{"k": 1, "tags": ["a", "b"]}, {"k": None, "tags": []}],
            "nothing": pa.nulls(2),
            # 1 ns past a whole microsecond: cut to microseconds, whether pandas is installed or not
            "ts": pa.array([1_700_000_000_123_456_001, None], pa.timestamp("ns", tz="UTC")),
            "local": [datetime.datetime(2024, 5, 1, 12, 30), datetime.datetime(2024, 5, 1)],
            "day": [datetime.date(2024, 5, 1), datetime.date(1999, 12, 31)],
            "clock": [datetime.time(7, 5, 3), datetime.time(0, 0, 0, 250)],
            "wait": pa.array([datetime.timedelta(seconds=90, microseconds=5), None]),
            "price": pa.array(
                [decimal.Decimal(v) for v in ("12.50", "-0.01")], pa.decimal128(6, 2)
            ),
            "raw": [b"caf\xc3\xa9", b"\xff\x00\x01"],
            "attrs": pa.array([[("lang", "en")], []], pa.map_(pa.string(), pa.string())),
            "events": [[{"at": datetime.datetime(2020, 1, 1, tzinfo=utc)}], None],
        }
    )
    path = write_parquet(tmp_path / "in" / "typed.parquet", table)
    expected = [
        {
            "text": prose(1), "n": 1, "score": 0.5, "meta": {"k": 1, "tags": ["a", "b"]},
            "nothing": None, "ts": "2023-11-14T22:13:20.123456+00:00",
            "local": "2024-05-01T12:30:00", "day": "2024-05-01", "clock": "07:05:03",
            "wait": 90.000005, "price": "12.50", "raw": "café", "attrs": [["lang", "en"]],
            "events": [{"at": "2020-01-01T00:00:00+00:00"}],
        },
        {
            "text": prose(2), "n": None, "score": 2.0, "meta": {"k": None, "tags": []},
            "nothing": None, "ts": None, "local": "2024-05-01T00:00:00", "day": "1999-12-31",
            "clock": "00:00:00.000250", "wait": None, "price": "-0.01", "raw": "/wAB",
            "attrs": [], "events": None,
        },
    ]  # fmt: skip
    assert [r for _, r in read_documents(path)] == expected
    dedup([tmp_path / "in"], tmp_path / "out", progress=False)
    assert kept_docs(tmp_path / "out") == expected  # written out as JSON and read back the same


def test_plain_columns_are_not_converted(tmp_path, monkeypatch):
    def never(value):
        raise AssertionError(f"converted {value!r}")

    monkeypatch.setattr(parquet, "json_value", never)
    table = pa.table(
        {
            "text": ["a", "b"],
            "id": [1, 2],
            "score": pa.array([0.5, None], pa.float32()),
            "meta": [{"tags": ["x"], "ok": True}, None],
            "lang": pa.array(["en", "en"]).dictionary_encode(),
        }
    )
    path = write_parquet(tmp_path / "plain.parquet", table)
    assert [r["meta"] for _, r in read_documents(path)] == [{"tags": ["x"], "ok": True}, None]


# --- bad rows and bad files -------------------------------------------------------------------


def test_bad_text_rows_are_named_or_counted_by_row_number(tmp_path):
    path = write_parquet(tmp_path / "b.parquet", [{"text": t} for t in ["ok", None, "fine", None]])
    with pytest.raises(LmpipeError, match=r"b\.parquet:2: 'text' is NoneType, not a string"):
        list(read_documents(path))
    good, invalid = read(path)
    assert [n for n, _ in good] == [1, 3]
    assert invalid.count == 2
    assert invalid.examples == [
        "line 2: 'text' is NoneType, not a string",
        "line 4: 'text' is NoneType, not a string",
    ]


@pytest.mark.parametrize(
    ("column", "kind"), [(pa.array([1, 2, 3]), "int"), (pa.array([b"a", b"b", b"c"]), "bytes")]
)
def test_text_of_another_type_is_invalid_on_every_row(tmp_path, column, kind):
    # binary `text` is not decoded as other binary columns are: a document is a string column
    path = write_parquet(tmp_path / "t.parquet", pa.table({"text": column}))
    with pytest.raises(LmpipeError, match=rf"t\.parquet:1: 'text' is {kind}, not a string"):
        list(read_documents(path))
    good, invalid = read(path)
    assert good == [] and invalid.count == 3


def test_a_row_python_cannot_read_is_invalid_and_its_batch_neighbours_kept(tmp_path):
    # A string column with invalid UTF-8, as a writer that does not check may leave it.
    values = b"okbad\xffok"
    offsets = pa.array([0, 2, 6, 8], pa.int32()).buffers()[1]
    meta = pa.Array.from_buffers(pa.string(), 3, [None, offsets, pa.py_buffer(values)])
    path = write_parquet(tmp_path / "u.parquet", pa.table({"text": ["a", "b", "c"], "meta": meta}))
    good, invalid = read(path)
    assert good == [(1, {"text": "a", "meta": "ok"}), (3, {"text": "c", "meta": "ok"})]
    assert invalid.examples == ["line 2: column 'meta': invalid UTF-8 at byte 3"]
    with pytest.raises(LmpipeError, match=r"u\.parquet:2: column 'meta': invalid UTF-8"):
        list(read_documents(path))


def test_no_text_column_is_one_error_or_every_row_invalid(tmp_path):
    path = write_parquet(tmp_path / "n.parquet", pa.table({"content": ["a", "b"], "id": [1, 2]}))
    with pytest.raises(LmpipeError) as e:
        list(read_documents(path))
    assert str(e.value) == f"{path}: no 'text' column (columns: content, id)"
    good, invalid = read(path)
    assert good == [] and invalid.count == 2  # documents + invalid = rows
    assert invalid.examples[0] == "line 1: no 'text' column (columns: content, id)"


def test_zero_rows_is_an_empty_file(tmp_path):
    path = write_parquet(tmp_path / "e.parquet", pa.table({"text": pa.array([], pa.string())}))
    good, invalid = read(path)
    assert good == [] and invalid.examples == ["line 1: empty file (no rows)"]
    with pytest.raises(LmpipeError, match=r"e\.parquet: empty file"):
        list(read_documents(path))


@pytest.mark.parametrize("content", [b"", b"PAR1 not really", b'{"text": "a JSON line"}\n'])
def test_a_file_that_is_not_parquet_is_unreadable(tmp_path, content):
    path = tmp_path / "x.parquet"
    path.write_bytes(content)
    with pytest.raises(LmpipeError, match=r"x\.parquet: not a readable parquet file \(.+\)"):
        list(read_documents(path))
    good, invalid = read(path)
    assert good == [] and invalid.count == 1
    assert invalid.examples[0].startswith("line 1: unreadable from here on (not a readable parquet")


def test_truncated_parquet_is_an_error_or_one_invalid_line(tmp_path):
    path = write_parquet(tmp_path / "cut.parquet", many_rows(3000), row_group_size=1000)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the footer, which locates every row, is gone
    with pytest.raises(LmpipeError, match=r"cut\.parquet: not a readable parquet file"):
        list(read_documents(path))
    good, invalid = read(path)
    assert good == [] and invalid.count == 1


def test_corrupt_row_group_keeps_the_rows_read_before_it(tmp_path):
    # Checksummed pages, so that the damage is found, not read as other text
    options = {"write_page_checksum": True, "compression": "none", "use_dictionary": False}
    path = write_parquet(tmp_path / "c.parquet", many_rows(4500), row_group_size=1500, **options)
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(0)  # `text` of the second group
    data = bytearray(path.read_bytes())
    middle = chunk.data_page_offset + chunk.total_compressed_size // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))
    with pytest.raises(LmpipeError, match=r"c\.parquet: not a readable parquet file \(.*CRC"):
        list(read_documents(path))
    good, invalid = read(path)
    assert [row for row, _ in good] == list(range(1, len(good) + 1)) and 0 < len(good) < 3000
    assert invalid.count == 1
    assert invalid.examples[0].startswith(f"line {len(good) + 1}: unreadable from here on (")


# --- progress -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [True, False])
def test_progress_reports_add_up_to_the_file_size(tmp_path, text):
    table = many_rows(5000)
    if not text:  # every row invalid: the file is still read through
        table = table.rename_columns(["body", "id"])
    path = write_parquet(tmp_path / "p.parquet", table, row_group_size=800)
    seen = []
    invalid = InvalidLines()
    n = sum(1 for _ in read_documents(path, strict=False, invalid=invalid, on_bytes=seen.append))
    assert n + invalid.count == 5000
    assert sum(seen) == path.stat().st_size and all(b >= 0 for b in seen)
    if text:
        assert len([b for b in seen if b > 0]) > 1  # it moved within the file, not only at the end


def test_progress_of_an_empty_parquet_file_is_its_size(tmp_path):
    path = write_parquet(tmp_path / "e.parquet", pa.table({"text": pa.array([], pa.string())}))
    seen = []
    list(read_documents(path, strict=False, invalid=InvalidLines(), on_bytes=seen.append))
    assert sum(seen) == path.stat().st_size


def test_parquet_eval_data_decontaminates(tmp_path):
    records = [{"text": prose(k), "id": f"d{k}"} for k in range(6)]
    write_jsonl(tmp_path / "in" / "a.jsonl", records)
    evals = tmp_path / "evals" / "q.parquet"
    evals.parent.mkdir()
    table = pa.table({"question": [records[2]["text"], None], "n": [1, 2]})
    pq.write_table(table, evals)
    m = dedup([tmp_path / "in"], tmp_path / "out", decontaminate=[evals], decontaminate_field="question", progress=False)  # fmt: skip
    assert [r["id"] for r in kept_docs(tmp_path / "out")] == ["d0", "d1", "d3", "d4", "d5"]
    (info,) = m["decontaminate"]
    assert info["documents"] == 1 and info["invalid"] == 1
    assert info["invalid_examples"] == ["line 2: field 'question' is missing, not a string (--decontaminate-field)"]  # fmt: skip


def test_a_value_python_cannot_hold_is_an_invalid_row(tmp_path):
    days = pa.array([0, 2**31 - 1, 1], pa.date32())  # the second: a date past year 9999
    path = write_parquet(tmp_path / "d.parquet", pa.table({"text": ["a", "b", "c"], "day": days}))
    good, invalid = read(path)
    assert good == [(1, {"text": "a", "day": "1970-01-01"}), (3, {"text": "c", "day": "1970-01-02"})]  # fmt: skip
    assert invalid.count == 1
    assert invalid.examples[0].startswith("line 2: column 'day': unreadable value (")
    with pytest.raises(LmpipeError, match=r"d\.parquet:2: column 'day': unreadable value"):
        list(read_documents(path))


def test_a_corrupt_page_keeps_every_row_group_before_it(tmp_path):
    # Small row groups: one record batch would hold several, and lose them all with the damage
    options = {"write_page_checksum": True, "compression": "none", "use_dictionary": False}
    path = write_parquet(tmp_path / "c.parquet", many_rows(320), row_group_size=50, **options)
    chunk = pq.ParquetFile(path).metadata.row_group(3).column(0)  # `text` of rows 151-200
    data = bytearray(path.read_bytes())
    middle = chunk.data_page_offset + chunk.total_compressed_size // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))
    good, invalid = read(path)
    assert [row for row, _ in good] == list(range(1, 151))
    assert invalid.count == 1 and invalid.examples[0].startswith(
        "line 151: unreadable from here on ("
    )
