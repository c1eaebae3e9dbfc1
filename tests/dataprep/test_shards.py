"""Shard format: exact round trip, readable by plain numpy, corruption and tokenizer checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.shards import ShardWriter, TokenShards, write_shard_folder

FAKE_SHA = "ab" * 32  # stands in for the GPT-2 fingerprint so no tokenizer files are needed
EOT = 50256


def make_docs(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    docs = [rng.integers(0, EOT, size=int(rng.integers(0, 300))) for _ in range(n)]
    docs[3] = np.zeros(0, dtype=np.int64)  # an empty document is a lone end-of-text
    return docs


def write(folder: Path, train: list, heldout: list | None = None, shard_tokens: int = 500) -> dict:
    return write_shard_folder(
        folder,
        {"train": train, "heldout": heldout or []},
        tokenizer_name="gpt2",
        tokenizer_sha256=FAKE_SHA,
        vocab_size=50257,
        eot_id=EOT,
        shard_tokens=shard_tokens,
    )


def open_shards(folder: Path, split: str = "train", verify: bool = True) -> TokenShards:
    return TokenShards(folder, split, verify, tokenizer_sha256=FAKE_SHA)


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    train, heldout = make_docs(rng, 60), make_docs(rng, 7)
    write(tmp_path / "tok", train, heldout)
    return tmp_path / "tok", train, heldout


def test_documents_round_trip_across_shards(folder) -> None:
    path, train, heldout = folder
    for split, docs in (("train", train), ("heldout", heldout)):
        data = open_shards(path, split)
        got = list(data.documents())
        assert len(got) == len(docs) == data.n_documents
        for g, d in zip(got, docs, strict=True):
            np.testing.assert_array_equal(g, d)
        assert data.n_tokens == sum(len(d) + 1 for d in docs)
    assert len(open_shards(path).shards) > 3  # the round trip really crossed shard files
    np.testing.assert_array_equal(open_shards(path).document_lengths(), [len(d) for d in train])


def test_tokens_is_the_stream_with_eot_after_each_document(folder) -> None:
    path, train, _ = folder
    data = open_shards(path)
    stream = np.concatenate([np.append(d, EOT) for d in train]).astype(np.uint16)
    np.testing.assert_array_equal(data.tokens(0, data.n_tokens), stream)
    rng = np.random.default_rng(1)
    for _ in range(200):
        a, b = sorted(rng.integers(0, data.n_tokens + 1, size=2).tolist())
        np.testing.assert_array_equal(data.tokens(a, b), stream[a:b])
    with pytest.raises(IndexError):
        data.tokens(0, data.n_tokens + 1)


def test_plain_numpy_reads_the_documented_format(folder) -> None:
    path, train, _ = folder
    manifest = json.loads((path / "manifest.json").read_text())
    docs = []
    for shard in manifest["splits"]["train"]["shards"]:
        tokens = np.fromfile(path / shard["bin"], dtype="<u2")
        idx = np.fromfile(path / shard["idx"], dtype="<u8")
        assert idx[0] == 0 and idx[-1] == len(tokens) == shard["n_tokens"]
        assert (tokens[idx[1:] - 1] == EOT).all()
        docs += [tokens[a : b - 1] for a, b in zip(idx[:-1], idx[1:], strict=True)]
    assert [d.tolist() for d in docs] == [d.tolist() for d in train]


def test_manifest_counts_add_up(folder) -> None:
    path, train, heldout = folder
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["tokenizer"] == {
        "name": "gpt2",
        "ranks_sha256": FAKE_SHA,
        "vocab_size": 50257,
        "eot_id": EOT,
    }
    for split, docs in (("train", train), ("heldout", heldout)):
        entry = manifest["splits"][split]
        assert entry["n_documents"] == len(docs) == sum(s["n_documents"] for s in entry["shards"])
        assert entry["n_tokens"] == sum(s["n_tokens"] for s in entry["shards"])
        for s in entry["shards"]:
            assert (path / s["bin"]).stat().st_size == 2 * s["n_tokens"]
            # a shard closes after the document that reaches shard_tokens, never inside one
            assert s["n_tokens"] < 500 + 301


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_corrupted_shard_is_detected_naming_the_file(folder) -> None:
    path, _, _ = folder
    victim = path / "train-00002.bin"
    flip_byte(victim, 10)
    with pytest.raises(LmpipeError, match="train-00002.bin.*sha256"):
        open_shards(path)
    open_shards(path, "heldout")  # other splits stay readable


def test_corrupted_index_is_detected(folder) -> None:
    path, _, _ = folder
    flip_byte(path / "train-00001.idx", 9)
    with pytest.raises(LmpipeError, match="train-00001.idx"):
        open_shards(path)
    with pytest.raises(LmpipeError, match="train-00001.idx"):  # even without sha256
        list(open_shards(path, verify=False).documents())


def test_corrupted_eot_is_detected_without_verify(folder) -> None:
    path, train, _ = folder
    last_eot = 2 * (len(train[0]))  # byte offset of the first document's end-of-text
    flip_byte(path / "train-00000.bin", last_eot)
    with pytest.raises(LmpipeError, match="train-00000.bin.*end-of-text"):
        list(open_shards(path, verify=False).documents())


def test_truncated_shard_is_detected_even_without_verify(folder) -> None:
    path, _, _ = folder
    victim = path / "train-00001.bin"
    victim.write_bytes(victim.read_bytes()[:-2])
    for verify in (True, False):
        with pytest.raises(LmpipeError, match="train-00001.bin.*truncated"):
            open_shards(path, verify=verify)
    (path / "train-00001.bin").unlink()
    with pytest.raises(LmpipeError, match="train-00001.bin.*missing"):
        open_shards(path)


def test_other_tokenizer_is_refused(folder) -> None:
    path, _, _ = folder
    with pytest.raises(LmpipeError, match="another tokenizer"):
        TokenShards(path, tokenizer_sha256="cd" * 32)


def test_unfinished_folder_and_unknown_split_are_refused(folder, tmp_path: Path) -> None:
    path, _, _ = folder
    with pytest.raises(LmpipeError, match="no split 'valid'"):
        open_shards(path, "valid")
    (path / "manifest.json").unlink()
    with pytest.raises(LmpipeError, match="unfinished"):
        open_shards(path)


def test_writer_rejects_ids_outside_the_vocabulary(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, "train", eot_id=EOT, vocab_size=50257) as writer:
        with pytest.raises(ValueError, match="outside"):
            writer.add([[1, 2, 50257]])
        with pytest.raises(ValueError, match="outside"):
            writer.add([[-1]])


def test_a_folder_of_split_folders_suggests_what_the_command_takes(tmp_path: Path) -> None:
    folder = tmp_path / "mtok"  # as `lmpipe tokenize --split-by-field` writes it
    folder.mkdir()
    manifest = {"stage": "tokenize", "split_by_field": "meta.set", "sources": {"C4": {}, "Book": {}}}  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(manifest))
    start = f"{folder}: holds one token folder per value of meta.set (C4, Book); use those, e.g. "
    with pytest.raises(LmpipeError) as path_only:  # eval, inspect, coord-check: a path
        TokenShards(folder, "heldout", tokenizer_sha256=FAKE_SHA)
    assert str(path_only.value) == start + f"{folder}/NAME"
    with pytest.raises(LmpipeError) as mixture:  # train, sweep: named, weighted sources
        TokenShards(folder, tokenizer_sha256=FAKE_SHA, mixture=True)
    assert str(mixture.value) == start + f"--data NAME={folder}/NAME:WEIGHT"
