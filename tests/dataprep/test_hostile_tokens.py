"""Token folders whose manifest.json is damaged or hostile: one line naming the manifest and the
key, before any shard is read; nothing outside the folder or of another split is read."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.folders import sha256_file
from tests.dataprep.test_shards import make_docs, open_shards, write


@pytest.fixture
def tok(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    write(tmp_path / "tok", make_docs(rng, 60), make_docs(rng, 7))
    return tmp_path / "tok"


def edit(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))  # NaN written as `NaN`, which Python's json reads back


def shard(m: dict[str, Any], i: int = 0, split: str = "train") -> dict[str, Any]:
    return m["splits"][split]["shards"][i]


def outside(m: dict[str, Any]) -> None:
    shard(m)["bin"] = "../outside/train-00000.bin"


def listed_twice(m: dict[str, Any]) -> None:
    shard(m, 1).update({k: shard(m, 0)[k] for k in ("bin", "idx", "bin_sha256", "idx_sha256")})


BAD: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "no tokenizer": (lambda m: m.pop("tokenizer"), "tokenizer is missing"),
    "tokenizer a string": (
        lambda m: m.update(tokenizer="gpt2"),
        "tokenizer is 'gpt2', not a JSON object",
    ),
    "vocab NaN": (
        lambda m: m["tokenizer"].update(vocab_size=float("nan")),
        "tokenizer.vocab_size is nan, not an integer >= 0",
    ),
    "vocab huge": (
        lambda m: m["tokenizer"].update(vocab_size=10**12),
        "tokenizer.vocab_size is 1000000000000, outside [1, 65536]",
    ),
    "eot past vocab": (
        lambda m: m["tokenizer"].update(eot_id=50257),
        "tokenizer.eot_id is 50257, outside the vocabulary",
    ),
    "fingerprint a number": (
        lambda m: m["tokenizer"].update(ranks_sha256=5),
        "tokenizer.ranks_sha256 is 5, not a string",
    ),
    "splits a list": (lambda m: m.update(splits=[]), "splits is [], not a JSON object"),
    "shards a string": (
        lambda m: m["splits"]["train"].update(shards="abc"),
        "splits.train.shards is 'abc', not a list",
    ),
    "no n_tokens": (
        lambda m: shard(m).pop("n_tokens"),
        "splits.train.shards[0].n_tokens is missing",
    ),
    "n_tokens a string": (
        lambda m: shard(m).update(n_tokens="5"),
        "splits.train.shards[0].n_tokens is '5', not an integer >= 0",
    ),
    "n_tokens a bool": (
        lambda m: shard(m).update(n_documents=True),
        "splits.train.shards[0].n_documents is True, not an integer >= 0",
    ),
    "n_tokens negative": (
        lambda m: m["splits"]["heldout"].update(n_tokens=-1),
        "splits.heldout.n_tokens is -1, not an integer >= 0",
    ),
    "bin a number": (
        lambda m: shard(m).update(bin=5),
        "splits.train.shards[0].bin is 5, not a string",
    ),
    "digest null": (
        lambda m: shard(m).update(idx_sha256=None),
        "splits.train.shards[0].idx_sha256 is None, not a string",
    ),
    "outside the folder": (
        outside,
        "splits.train.shards[0].bin is '../outside/train-00000.bin', not 'train-00000.bin'",
    ),
    "absolute path": (
        lambda m: shard(m).update(idx="/etc/passwd"),
        "splits.train.shards[0].idx is '/etc/passwd', not 'train-00000.idx'",
    ),
    "listed twice": (
        listed_twice,
        "splits.train.shards[1].bin is 'train-00000.bin', not 'train-00001.bin'",
    ),
    "heldout is train": (
        lambda m: m["splits"].update(heldout=m["splits"]["train"]),
        "splits.heldout.shards[0].bin is 'train-00000.bin', not 'heldout-00000.bin'",
    ),
    "a split with a path": (
        lambda m: m["splits"].update({"a/b": m["splits"]["heldout"]}),
        "splits.a/b is not a plain name",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_damaged_or_hostile_manifest_is_one_line_naming_the_key(tok, case):
    change, message = BAD[case]
    edit(tok, change)
    for split in ("train", "heldout"):  # whichever split is opened, the manifest is refused
        with pytest.raises(LmpipeError) as error:
            open_shards(tok, split, verify=False)
        text = str(error.value)
        assert text.startswith(f"{tok / 'manifest.json'}: {message}"), text
        assert "\n" not in text


def test_a_shard_outside_the_folder_is_not_read_even_when_its_checksum_matches(tok, tmp_path):
    # the copy outside is the very shard, so sizes and sha256 agree: only its name gives it away
    (tmp_path / "outside").mkdir()
    shutil.copy(tok / "train-00000.bin", tmp_path / "outside" / "train-00000.bin")
    (tok / "train-00000.bin").unlink()
    edit(tok, outside)
    with pytest.raises(LmpipeError, match=r"shards\[0\]\.bin is '\.\./outside/train-00000\.bin'"):
        open_shards(tok, verify=True)


def test_an_empty_shard_listed_in_the_manifest_is_one_line_not_a_numpy_error(tok):
    # ShardWriter never writes one; numpy cannot map an empty file, so reading it was a traceback
    (tok / "heldout-00001.bin").write_bytes(b"")
    (tok / "heldout-00001.idx").write_bytes(np.zeros(1, dtype="<u8").tobytes())

    def add_empty(m: dict[str, Any]) -> None:
        m["splits"]["heldout"]["shards"].append(
            {
                "bin": "heldout-00001.bin",
                "idx": "heldout-00001.idx",
                "n_tokens": 0,
                "n_documents": 0,
                "bin_sha256": hashlib.sha256(b"").hexdigest(),
                "idx_sha256": sha256_file(tok / "heldout-00001.idx"),
            }
        )

    edit(tok, add_empty)
    with pytest.raises(LmpipeError) as error:
        list(open_shards(tok, "heldout").documents())
    assert str(error.value) == (
        f"{tok / 'manifest.json'}: splits.heldout.shards[1] holds 0 documents in 0 tokens; lmpipe "
        "writes at least one document to a shard, each ending with end-of-text"
    )
