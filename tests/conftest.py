"""Shared fixtures. Tests run against the installed package (`import lmpipe...`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def gpt2():
    """tiktoken's real GPT-2 encoding; the test skips with the reason when its files are missing."""
    from lmpipe.dataprep.errors import LmpipeError
    from lmpipe.dataprep.tokenizer import get_encoding

    try:
        return get_encoding()
    except LmpipeError as e:
        pytest.skip(f"GPT-2 BPE files unavailable: {e}")


@pytest.fixture(scope="session")
def eval_assets() -> Path:
    """The real zero-shot task data in ../shared/assets/evals, when this checkout has it."""
    path = Path(os.environ.get("LMPIPE_EVAL_DATA", SHARED / "assets" / "evals"))
    if not path.is_dir():
        pytest.skip(f"eval assets not found at {path}")
    return path


@pytest.fixture(scope="session")
def pattern_tokens(tmp_path_factory, gpt2) -> Path:
    """A token folder with one rule a tiny model learns in a few steps: token t is followed by
    t + 1 (mod 100). Stamped with the real GPT-2 fingerprint, as `lmpipe tokenize` would."""
    import numpy as np

    from lmpipe.dataprep.shards import write_shard_folder

    rng = np.random.default_rng(0)
    docs = [
        (int(rng.integers(100)) + np.arange(int(rng.integers(100, 300)))) % 100 for _ in range(60)
    ]
    folder = tmp_path_factory.mktemp("pattern") / "tokens"
    write_shard_folder(folder, {"train": docs, "heldout": docs[:2]})
    return folder
