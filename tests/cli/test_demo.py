"""The whole chain on the embedded corpus: dedup -> tokenize -> train (DeepSpeed) -> eval."""

from __future__ import annotations

import json

import pytest

from lmpipe.cli.demo import run_demo
from lmpipe.dataprep.errors import LmpipeError

SHORT = ["stages.0.tokens=24576", "stages.1.tokens=8192"]  # 12 + 4 steps of 2,048 tokens


@pytest.mark.slow
def test_demo_chains_the_four_stages(tmp_path, gpt2):
    work = tmp_path / "demo"
    out = run_demo(work, recipe_overrides=SHORT)

    total = out["dedup"]["counts"]["total"]
    removed = {
        b: total[b]["documents"] for b in ("short", "exact_duplicate", "near_duplicate", "invalid")
    }
    assert total["kept"]["documents"] + sum(removed.values()) == total["input"]["documents"]
    # at least what the corpus injected (the real docstrings hold a few duplicates of their own)
    assert removed["short"] >= 30 and removed["exact_duplicate"] + removed["near_duplicate"] >= 60

    tokens = out["tokenize"]["totals"]
    assert tokens["documents"] == total["kept"]["documents"]
    assert tokens["train_tokens"] + tokens["heldout_tokens"] == tokens["tokens"] > 0
    assert tokens["heldout_documents"] > 0

    rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["seq_len"] for r in rows] == [64] * 12 + [256] * 4
    assert rows[-1]["loss"] < rows[0]["loss"] - 3.0

    results = json.loads((work / "eval" / "results.json").read_text())["tasks"]
    perplexity, continuation = results["perplexity"], results["continuation"]
    assert 1 < perplexity["token_perplexity"]["value"] < 50257  # learned something, not uniform
    assert perplexity["n"] == tokens["heldout_documents"]
    assert 0 <= continuation["acc"]["value"] <= 1 and continuation["n"] > 10
    for folder in ("clean", "tokens", "run", "eval"):
        assert (work / folder / "manifest.json").is_file(), folder
    assert not list(work.glob("*.partial"))
    assert (work / "loss.png").read_bytes().startswith(b"\x89PNG")  # the run's losses, drawn

    with pytest.raises(LmpipeError, match="already exists"):
        run_demo(work)
