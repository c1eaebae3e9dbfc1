"""The whole chain on the embedded corpus: dedup -> tokenize -> train (DeepSpeed) -> eval."""

from __future__ import annotations

import json

import pytest
import typer

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


@pytest.mark.parametrize(("signal", "status"), [("SIGINT", 130), ("SIGTERM", 0)])
def test_a_signal_during_training_ends_the_demo_with_how_to_go_on(
    signal, status, tmp_path, monkeypatch, capsys
):
    """Ctrl-C (or a SIGTERM) stops the training with a checkpoint and no model: the demo says
    so and how to continue, instead of evaluating a run that has not finished."""
    corpus = {"documents": 1280, "bytes": 2_000_000, "sources": {"a": 600, "b": 680},
              "near_duplicates": 40, "exact_duplicates": 20, "short": 30, "cross_source": 16}  # fmt: skip
    stopped = {"stopped": signal, "steps": 3, "finished": False}

    def not_after_a_stop(*args, **kwargs):
        raise AssertionError("the demo went on after the training stopped")

    monkeypatch.setenv("COLUMNS", "1000")  # one line each, however long
    monkeypatch.setattr("lmpipe.dataprep.corpus.write_demo_corpus", lambda folder: corpus)
    monkeypatch.setattr("lmpipe.dataprep.dedup.dedup", lambda inputs, out: {"stage": "dedup"})
    monkeypatch.setattr("lmpipe.dataprep.tokenize.tokenize", lambda inputs, out, holdout: {})
    monkeypatch.setattr("lmpipe.train.loop.train", lambda recipe, data, run_dir: stopped)
    monkeypatch.setattr("lmpipe.train.plot.plot", not_after_a_stop)
    monkeypatch.setattr("lmpipe.evals.run.evaluate", not_after_a_stop)
    work = tmp_path / "demo"
    if status:
        with pytest.raises(typer.Exit) as ended:
            run_demo(work, recipe_overrides=SHORT)
        assert ended.value.exit_code == status
    else:
        assert run_demo(work, recipe_overrides=SHORT)["train"] == stopped
    out, err = capsys.readouterr()
    assert "injected 40 near duplicates and 20 case/punctuation/whitespace copies (16 of them in the other source), and 30 short documents" in out  # fmt: skip
    assert err.strip().splitlines() == [
        f"demo: training stopped by {signal} at step 3, so the demo stops here; continue the run "
        f"with `lmpipe train --recipe tiny --data {work}/tokens --run-dir {work}/run --set "
        f"stages.0.tokens=24576 --set stages.1.tokens=8192 --resume` or start over with "
        f"`lmpipe demo --workdir {work} --overwrite`"
    ]
