"""Training on a mixture: --data parsing and its errors, the plan's per-source accounting, exact
resume across a change of mixture, held-out loss per source in the metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lmpipe.cli.app import app
from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.shards import write_shard_folder
from lmpipe.train.data import parse_data, with_data
from lmpipe.train.loop import train
from lmpipe.train.plan import make_plan
from lmpipe.train.recipe import DataSource, load_recipe
from tests.train.test_loop import TINY_MODEL

TINY = [
    *TINY_MODEL,
    "tokens_per_step=512",
    "micro_batch_tokens=256",
    "stages.0.tokens=3072",
    "stages.1.seq_len=128",
    "stages.1.tokens=2048",
    "schedule.warmup_tokens=512",
    "checkpoint_every_tokens=1024",
]


def pattern(seed: int, step: int, n_docs: int = 40) -> list[np.ndarray]:
    """Documents where token t is followed by t + step (mod 100): each source its own rule."""
    rng = np.random.default_rng(seed)
    return [(int(rng.integers(100)) + step * np.arange(int(rng.integers(80, 200)))) % 100 for _ in range(n_docs)]  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory, gpt2) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    out = {}
    for name, step, n in (("web", 1, 40), ("code", 3, 20), ("books", 7, 6)):
        docs = pattern(step, step, n)
        out[name] = root / name
        write_shard_folder(out[name], {"train": docs, "heldout": docs[:3]})
    return out


def mixture(folders, **weights) -> list[DataSource]:
    return [DataSource(name=n, path=folders[n], weight=w) for n, w in weights.items()]


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_data_options_parse_to_one_folder_or_named_sources():
    assert parse_data([]) is None
    assert parse_data(["tokens/"]) == Path("tokens/")
    got = parse_data(["web=tokens/cc:0.6", "code=tokens/code:0.3", "books=/data/b"])
    assert [(s.name, str(s.path), s.weight) for s in got] == [
        ("web", "tokens/cc", 0.6), ("code", "tokens/code", 0.3), ("books", "/data/b", 1.0)
    ]  # fmt: skip
    for values, message in (
        (["a/", "b/"], "several folders need names"),
        (["web=a:0.5", "b/"], "every source as NAME=PATH:WEIGHT"),
        (["web=a:0"], "greater than 0"),
        (["web=a:-1"], "greater than 0"),
        (["web=a:x"], "could not convert"),
        (["we b=a:1"], "String should match pattern"),
    ):
        with pytest.raises(LmpipeError, match=message):
            parse_data(values)


def test_bad_mixtures_are_one_line_errors_naming_the_key(folders, tmp_path):
    recipe = load_recipe("tiny", TINY)
    with pytest.raises(LmpipeError, match=r"data\.1\.name: 'web' names two sources"):
        with_data(recipe, mixture(folders, web=1) + mixture(folders, web=2))
    weighted = load_recipe("tiny", [*TINY, "stages.1.weights={web: 1, news: 2}"])
    with pytest.raises(LmpipeError, match=r"stages\.1\.weights\.news: no such source \(data: web, code\)"):  # fmt: skip
        with_data(weighted, mixture(folders, web=1, code=1))
    with pytest.raises(
        LmpipeError, match=r"stages\.0\.weights\.web: weight 0 is not a finite number > 0"
    ):
        load_recipe("tiny", [*TINY, "stages.0.weights={web: 0}"])
    with pytest.raises(LmpipeError, match="--data is required"):
        with_data(recipe, None)
    missing = [*mixture(folders, web=1), DataSource(name="gone", path=tmp_path / "gone")]
    with pytest.raises(LmpipeError, match=r"gone: no such folder"):
        train(recipe, missing, tmp_path / "run")
    other = tmp_path / "other"
    write_shard_folder(other, {"train": pattern(1, 1)}, tokenizer_name="gpt2", tokenizer_sha256="cd" * 32)  # fmt: skip
    with pytest.raises(LmpipeError, match=r"other/manifest\.json: made with another tokenizer"):
        train(recipe, [*mixture(folders, web=1), DataSource(name="x", path=other)], tmp_path / "r")


def test_sources_of_two_different_tokenizers_are_refused(folders, tmp_path, monkeypatch):
    """Each folder's own tokenizer is fine, but they differ: no mixture."""
    from lmpipe.dataprep import tokenizer
    from lmpipe.train.data import open_sources

    gpt2 = tokenizer.ranks_sha256("gpt2")
    monkeypatch.setattr(tokenizer, "ranks_sha256", lambda name="gpt2": {"gpt2": gpt2, "r50k_base": "cd" * 32}[name])  # fmt: skip
    other = tmp_path / "r50k"
    write_shard_folder(other, {"train": pattern(1, 1)}, tokenizer_name="r50k_base", tokenizer_sha256="cd" * 32)  # fmt: skip
    recipe = with_data(load_recipe("tiny", TINY), [*mixture(folders, web=1), DataSource(name="x", path=other)])  # fmt: skip
    with pytest.raises(LmpipeError, match=r"r50k: made with tokenizer 'r50k_base' \(ranks sha256 cdcdcdcdcdcd\.\.\.\), not the one of source 'web'"):  # fmt: skip
        open_sources(recipe)


def test_a_mixture_run_draws_what_the_plan_says_and_resumes_exactly(folders, tmp_path):
    """web/code/books at 0.6/0.3/0.1, then 0.2/0.2/0.6 in the 128-token stage: the plan's tokens
    per source are what the loader drew, books is upsampled and warned about, and runs resumed
    mid-stage and across the change of mixture equal the uninterrupted run."""
    recipe = load_recipe(
        "tiny", [*TINY, "stages.1.weights={web: 0.2, code: 0.2, books: 0.6}", "warn_epochs=1.2"]
    )
    data = mixture(folders, web=0.6, code=0.3, books=0.1)
    whole = tmp_path / "whole"
    train(recipe, data, whole)
    plan = json.loads((whole / "plan.json").read_text())
    drawn = {(r["stage"], r["source"]): r for r in plan["data"]}
    for stage, seq_len, weights in ((0, 64, (0.6, 0.3, 0.1)), (1, 128, (0.2, 0.2, 0.6))):
        windows = (3072 if stage == 0 else 2048) // seq_len  # the stage's slots
        for name, w in zip(("web", "code", "books"), weights, strict=True):
            assert abs(drawn[stage, name]["tokens"] / seq_len - w * windows) <= 3  # one a source
    for r in plan["data"]:  # epochs = tokens drawn / one epoch of the source at that length
        assert r["epochs"] == pytest.approx(r["tokens"] / r["epoch_tokens"])
    assert drawn[1, "books"]["repeats"] and drawn[1, "books"]["epochs"] > 1.2
    assert not any(r["repeats"] for r in plan["data"] if r["source"] != "books")
    stages = make_plan(with_data(recipe, data)).stages
    assert [s.windows * stages[1].seq_len for s in stages[1].sources] == [
        drawn[1, n]["tokens"] for n in ("web", "code", "books")
    ]
    want = [(r["step"], r["loss"], r["lr"]) for r in rows(whole)]
    # one run stopped and resumed twice: mid stage 0, and in stage 1 after the mixture changed
    # (that checkpoint written by a resumed run); each time it equals the whole run so far
    run = tmp_path / "stopped"
    for resume, stop_after, steps in ((False, 3, 3), (True, 4, 7), (True, None, len(want))):
        train(recipe, data, run, resume=resume, stop_after_steps=stop_after)
        assert [(r["step"], r["loss"], r["lr"]) for r in rows(run)] == want[:steps]


def test_held_out_loss_per_source_lands_in_the_metrics(folders, tmp_path):
    recipe = load_recipe("tiny", [*TINY, "validation={every_tokens: 2048, tokens: 256}"])
    run = tmp_path / "run"
    train(recipe, mixture(folders, web=0.5, code=0.5, books=1.0), run)
    checked = [r for r in rows(run) if "val_loss" in r]
    assert [r["tokens"] for r in checked] == [2048, 4096]  # every 2,048 tokens (10 steps of 512)
    for r in checked:
        assert set(r["val_loss"]) == {"web", "code", "books"}
        assert all(0 < v < 12 for v in r["val_loss"].values())
    assert checked[-1]["val_loss"]["web"] < checked[0]["val_loss"]["web"]  # it learns web's rule


def test_the_cli_trains_a_mixture_and_dry_run_prints_it(folders, tmp_path):
    args = ["train", "--recipe", "tiny", *[f"--set={s}" for s in TINY]]
    data = [f"--data={n}={folders[n]}:{w}" for n, w in (("web", 2), ("code", 1))]
    dry = CliRunner().invoke(app, [*args, *data, "--dry-run"])
    assert dry.exit_code == 0 and "data drawn per stage and source" in dry.output
    assert "web" in dry.output and "0.667" in dry.output
    result = CliRunner().invoke(app, [*args, *data, "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["data"] == {"web": str(folders["web"]), "code": str(folders["code"])}
    bad = CliRunner().invoke(
        app, [*args, "--data=web=/nowhere:1", "--run-dir", str(tmp_path / "r2")]
    )
    assert bad.exit_code == 2 and "nowhere: no such folder" in bad.output


# --- found by a review --------------------------------------------------------------------------


def test_tiny_and_huge_weights_keep_their_share():
    from lmpipe.dataprep.mixture import counts, quotas

    assert counts(10**9, quotas([1, 1e-7])) == [999_999_900, 100]
    assert counts(10**9, quotas([1e-7, 1])) == [100, 999_999_900]
    assert counts(10**9, quotas([1e308, 1e308])) == [500_000_000, 500_000_000]
    n = 229_875_840  # BTLM's windows at 2,048 with the README's 0.6 / 0.3 / 0.1
    assert counts(n, quotas([0.6, 0.3, 0.1])) == [137_925_504, 68_962_752, 22_987_584]
    for bad in ("web=a:inf", "web=a:nan"):
        with pytest.raises(LmpipeError, match="finite number"):
            parse_data([bad])
    with pytest.raises(LmpipeError, match=r"stages\.0\.weights\.web: Input should be a finite number"):  # fmt: skip
        load_recipe("tiny", [*TINY, "stages.0.weights={web: .inf}"])
    with pytest.raises(LmpipeError, match=r"stages\.0\.weights\.web: weight 0 is not a finite number > 0"):  # fmt: skip
        load_recipe("tiny", [*TINY, "stages.0.weights={web: 0}"])


def test_a_source_smaller_than_a_window_or_empty_is_one_line(folders, tmp_path, gpt2):
    small, empty = tmp_path / "small", tmp_path / "empty"
    write_shard_folder(small, {"train": [np.arange(40)]})
    write_shard_folder(empty, {"train": []})
    recipe = load_recipe("tiny", TINY)
    for folder, message in ((small, "holds fewer tokens than one window of stage 0"), (empty, "holds 0 token")):  # fmt: skip
        data = [*mixture(folders, web=1), DataSource(name="s", path=folder)]
        with pytest.raises(LmpipeError, match=message):
            train(recipe, data, tmp_path / f"run_{folder.name}")
        args = ["train", "--recipe", "tiny", *[f"--set={s}" for s in TINY], f"--data=web={folders['web']}", f"--data=s={folder}", "--dry-run"]  # fmt: skip
        dry = CliRunner().invoke(app, args)
        assert (
            dry.exit_code == 0 and "epochs unknown" in dry.output and "Traceback" not in dry.output
        )


def test_resume_with_a_moved_folder_and_a_checkpoint_from_before_mixtures(folders, tmp_path):
    import hashlib
    import shutil

    import yaml

    recipe = load_recipe("tiny", TINY)
    moved = tmp_path / "moved"
    shutil.copytree(folders["web"], moved)
    run = tmp_path / "run"
    train(recipe, folders["web"], run, stop_after_steps=4)
    train(recipe, moved, run, resume=True, stop_after_steps=2)  # the same data, elsewhere
    with pytest.raises(LmpipeError, match=r"data\.0\.weight \(1\.0 -> 2\.0\)"):
        train(recipe, [DataSource(name="data", path=moved, weight=2.0)], run, resume=True)
    step = run / "checkpoints" / "step00000006"
    saved = yaml.safe_load((step / "recipe.yaml").read_text())
    saved.pop("data")  # a checkpoint written before the data section existed
    (step / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    marker = json.loads((step / "lmpipe.json").read_text())
    marker["files"]["recipe.yaml"] = hashlib.sha256((step / "recipe.yaml").read_bytes()).hexdigest()
    (step / "lmpipe.json").write_text(json.dumps(marker))
    summary = train(recipe, moved, run, resume=True)
    assert summary["finished"] and summary["steps"] == 10
