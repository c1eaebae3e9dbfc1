"""Shared fixtures. Tests run against the installed package (`import lmpipe...`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def gpt2():
    """tiktoken's real GPT-2 encoding. Without its files the test skips with the reason, unless
    ../shared has the tool that seeds them: then they should be there, and the test fails (a
    broken seed would otherwise skip most of the suite and leave it green)."""
    from lmpipe.dataprep.errors import LmpipeError
    from lmpipe.dataprep.tokenizer import get_encoding

    try:
        return get_encoding()
    except LmpipeError as e:
        error = e  # reported below, outside the except: not as a chain of two errors
    seeder = SHARED / "tools" / "tiktoken-cache"
    if seeder.exists():
        pytest.fail(
            f"GPT-2 BPE files missing although {seeder} exists: run make tokenizer-cache ({error})",
            pytrace=False,
        )
    pytest.skip(f"GPT-2 BPE files unavailable: {error}")


@pytest.fixture(scope="session")
def eval_assets() -> Path:
    """The real zero-shot task data: LMPIPE_EVAL_DATA, else ../shared/assets/evals. Without
    ../shared (and the variable unset) the test skips with the reason; a folder missing where it
    should be (../shared exists, or the variable names it) fails it, as `gpt2` does."""
    named = os.environ.get("LMPIPE_EVAL_DATA")
    path = Path(named) if named else SHARED / "assets" / "evals"
    if path.is_dir():
        return path
    if named or SHARED.is_dir():
        where = f"LMPIPE_EVAL_DATA={named}" if named else f"{path} although {SHARED} exists"
        pytest.fail(f"eval assets not found at {where}", pytrace=False)
    pytest.skip(f"eval assets not found at {path}")


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
