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
