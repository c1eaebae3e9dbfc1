"""`lmpipe sweep`'s plan checks: the plan records what the runs are made of (the recipe's text,
each source's tokens), so a rerun on an edited recipe or rebuilt data is refused while a moved
folder resumes, and `--best` transfers into the recipe the sweep trained; swept values an SP
point would drop, and bad `--grid` / `--seed` / `--random` values, are one-line errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from lmpipe.cli.app import app
from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.shards import write_shard_folder
from lmpipe.train import sweep as sweep_module
from lmpipe.train.data import data_identity, open_sources
from lmpipe.train.recipe import load_recipe, recipe_source
from lmpipe.train.sweep import sweep
from lmpipe.train.sweep_plan import SweepSettings, parse_grid, plan_points
from lmpipe.train.transfer import sweep_best

TWO_STEPS = (
    "tokens_per_step=256",
    "micro_batch_tokens=256",
    "stages=[{seq_len: 64, tokens: 512}]",
    "schedule.warmup_tokens=256",
    "checkpoint_every_tokens=256",
)


def other_tokens(folder):
    """A token folder like the pattern one, with other documents."""
    rng = np.random.default_rng(1)
    docs = [(int(rng.integers(100)) + np.arange(int(rng.integers(100, 300)))) % 100 for _ in range(60)]  # fmt: skip
    write_shard_folder(folder, {"train": docs, "heldout": docs[:2]})
    return folder


def owned_work(tmp_path):
    work = tmp_path / "out.partial"  # a sweep's work folder, as staged_output makes it
    work.mkdir()
    (work / ".lmpipe-owner").write_text("sweep\n")
    return work


def test_the_plan_records_the_recipe_text_and_the_data_identity(pattern_tokens, tmp_path, monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    text = recipe_source("tiny")[1]
    (tmp_path / "my.yaml").write_text(text, encoding="utf-8")
    plan = plan_points(SweepSettings(recipe="my.yaml", data=pattern_tokens))[0]
    assert plan["recipe"] == "my.yaml" and plan["recipe_path"] == str(tmp_path / "my.yaml")
    assert plan["recipe_text"] == text
    tiny = load_recipe("tiny", [f"data=[{{name: data, path: {pattern_tokens}}}]"])
    assert plan["data_identity"] == data_identity(open_sources(tiny))
    shipped = plan_points(SweepSettings(recipe="tiny", data=pattern_tokens))[0]
    assert shipped["recipe_path"] is None and "d_model: 64" in shipped["recipe_text"]


def test_a_rerun_refuses_a_changed_recipe_or_data_and_resumes_a_moved_folder(pattern_tokens, tmp_path):  # fmt: skip
    recipe, data = tmp_path / "my.yaml", tmp_path / "tokens"
    text = recipe_source("tiny")[1]
    recipe.write_text(text, encoding="utf-8")
    shutil.copytree(pattern_tokens, data)

    def plan_of(folder):
        return plan_points(SweepSettings(recipe=str(recipe), data=folder, overrides=TWO_STEPS))[0]

    work = owned_work(tmp_path)
    plan = plan_of(data)
    sweep_module.prepare_work(work, plan, overwrite=False)
    (work / "runs" / "0000-mup-w64").mkdir()  # a point's work, kept by every resume below
    recipe.write_text(text.replace("weight_decay: 0.1", "weight_decay: 0.0"), encoding="utf-8")
    with pytest.raises(LmpipeError) as refused:
        sweep_module.prepare_work(work, plan_of(data), overwrite=False)
    assert str(refused.value) == (
        f"{work}: holds an interrupted sweep of another plan (recipe {recipe}: "
        "optimizer.weight_decay: 0.1 there, 0.0 here); rerun that command to finish it, or pass "
        "--overwrite to start this one"
    )
    # a comment changes no setting: the same plan; the text --best reads stays the first one
    recipe.write_text("# tuned on 2026-12-07\n" + text, encoding="utf-8")
    sweep_module.prepare_work(work, plan_of(data), overwrite=False)
    assert json.loads((work / "sweep-plan.json").read_text(encoding="utf-8")) == plan
    recipe.write_text(text, encoding="utf-8")
    # the same tokens in another folder resume, as `lmpipe train --resume` allows
    moved = tmp_path / "moved"
    data.rename(moved)
    sweep_module.prepare_work(work, plan_of(moved), overwrite=False)
    saved = json.loads((work / "sweep-plan.json").read_text(encoding="utf-8"))
    assert saved == plan_of(moved) and saved["data"][0]["path"] == str(moved)
    other_tokens(data)  # other tokens where the first folder was
    with pytest.raises(LmpipeError, match=rf"another plan \(data: source 'data' \({data}\) holds other tokens than the sweep was planned on \(its shards' checksums differ\)\)"):  # fmt: skip
        sweep_module.prepare_work(work, plan_of(data), overwrite=False)
    # the plan file of an lmpipe before 2026-12-07 (names and paths only): the same command is
    # the same plan, as that lmpipe took it; the file stays as it was (rewritten with what the
    # recipe holds now, a reverted edit would be refused)
    new_fields = ("recipe_path", "recipe_text", "recipe_settings", "data_identity")
    old = {k: v for k, v in plan.items() if k not in new_fields}
    (work / "sweep-plan.json").write_text(json.dumps(old), encoding="utf-8")
    with pytest.raises(LmpipeError, match=r"another plan \(data: .*'path': '.*moved'.* here\)"):
        sweep_module.prepare_work(work, plan_of(moved), overwrite=False)
    sweep_module.prepare_work(work, plan, overwrite=False)
    assert json.loads((work / "sweep-plan.json").read_text(encoding="utf-8")) == old
    assert (work / "runs" / "0000-mup-w64").is_dir()


def test_a_mixture_recipe_whose_folders_moved_resumes(pattern_tokens, tmp_path):
    """The sources named in the recipe's `data` section: moving them (and the recipe's paths with
    them) is the same plan; other tokens there are not."""
    first, moved = tmp_path / "web", tmp_path / "web2"
    shutil.copytree(pattern_tokens, first)
    text = recipe_source("tiny")[1] + "data:\n  - name: web\n    path: {}\n    weight: 1.0\n"
    recipe = tmp_path / "mix.yaml"

    def plan_at(folder):
        recipe.write_text(text.format(folder), encoding="utf-8")
        return plan_points(SweepSettings(recipe=str(recipe), overrides=TWO_STEPS))[0]

    work = owned_work(tmp_path)
    sweep_module.prepare_work(work, plan_at(first), overwrite=False)
    first.rename(moved)
    sweep_module.prepare_work(work, plan_at(moved), overwrite=False)
    other_tokens(first)
    with pytest.raises(LmpipeError, match=r"source 'web' \(.*web\) holds other tokens"):
        sweep_module.prepare_work(work, plan_at(first), overwrite=False)


@pytest.mark.slow
def test_a_finished_sweep_is_checked_and_best_reads_the_recipe_it_trained(pattern_tokens, tmp_path, monkeypatch):  # fmt: skip
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    recipe = tmp_path / "a" / "my.yaml"
    text = recipe_source("tiny")[1]
    recipe.write_text(text, encoding="utf-8")
    monkeypatch.chdir(tmp_path / "a")
    settings = SweepSettings(recipe="my.yaml", data=pattern_tokens, overrides=TWO_STEPS,
                             grid=(parse_grid("optimizer.lr=2^-4"),), widths=(32,), val_tokens=256)  # fmt: skip
    out = tmp_path / "a" / "sw"
    sweep(settings, out)
    recipe.write_text(text.replace("n_layers: 2", "n_layers: 3"), encoding="utf-8")
    with pytest.raises(LmpipeError, match=r"a finished sweep of another plan \(recipe my.yaml: model.n_layers: 2 there, 3 here\)"):  # fmt: skip
        sweep(settings, out)
    # --best from another folder, which has a my.yaml of its own: the sweep's recipe, as trained
    (tmp_path / "b" / "my.yaml").write_text(text.replace("n_layers: 2", "n_layers: 8"), encoding="utf-8")  # fmt: skip
    monkeypatch.chdir(tmp_path / "b")
    sweep_best(out, write_recipe=tmp_path / "best.yaml")
    best = load_recipe(str(tmp_path / "best.yaml"))
    assert best.model == load_recipe("tiny").model and best.optimizer.lr == 2**-4
    # the sweep of an lmpipe before 2026-12-07: its plan names the recipe, with no text; the
    # same command is still nothing to do, and --best reads the recipe by its name again
    plan = json.loads((out / "sweep-plan.json").read_text(encoding="utf-8"))
    for key in ("recipe_path", "recipe_text", "recipe_settings", "data_identity"):
        del plan[key]
    (out / "sweep-plan.json").write_text(json.dumps(plan), encoding="utf-8")
    recipe.write_text(text, encoding="utf-8")
    before = sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*"))
    sweep(settings, out)
    assert sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*")) == before
    monkeypatch.chdir(tmp_path / "a")
    assert sweep_best(out, print_set=True)[0] == "optimizer.lr=0.0625"


def test_sp_points_refuse_a_swept_value_that_sp_drops(pattern_tokens):
    def plan(recipe, grid, params):
        settings = SweepSettings(recipe=recipe, data=pattern_tokens, grid=(parse_grid(grid),), params=params)  # fmt: skip
        return plan_points(settings)

    for key in ("model.init_std", "model.mup.alpha_in"):
        with pytest.raises(LmpipeError) as refused:
            plan("tiny", f"{key}=0.01,0.1", ("sp",))
        assert str(refused.value) == (
            f"--grid {key}: has no effect on the --param sp points (SP drops model.mup and takes "
            "its init std from model.mup.sigma_base); sweep sigma_base, or leave out sp"
        )
    # sigma_base is SP's init std (the documented mapping); muP points and an SP recipe keep theirs
    _, points, recipes = plan("tiny", "model.mup.sigma_base=0.01,0.1", ("sp",))
    assert [r.model.init_std for r in recipes] == [0.01, 0.1]
    _, points, recipes = plan("tiny", "model.mup.alpha_in=1,10", ("mup",))
    assert [r.model.mup.alpha_in for r in recipes] == [1, 10]
    _, points, recipes = plan("cerebras-gpt-111m", "model.init_std=0.01,0.1", ())
    assert [p.param for p in points] == ["sp", "sp"]
    assert [r.model.init_std for r in recipes] == [0.01, 0.1]


def test_bad_values_seeds_and_counts_are_one_line_errors_before_anything_is_written(tmp_path):
    base = ["sweep", "--recipe", "tiny", "--data", str(tmp_path), "-o", str(tmp_path / "o")]
    space = ["--space", "optimizer.lr=loguniform:1e-4:1e-1"]
    number = "is not a number (or is past float's range); the recipe's"
    cases = {
        f"--grid optimizer.lr: 'abc' {number} optimizer.lr is 0.012": ["--grid", "optimizer.lr=abc,1"],
        f"--grid optimizer.lr: '2^2000' {number} optimizer.lr is 0.012": ["--grid", "optimizer.lr=2^2000,1"],
        f"--grid schedule.warmup_tokens: True {number} schedule.warmup_tokens is 8192": ["--grid", "schedule.warmup_tokens=true"],
        "--seed: -1 is not a seed (0 or more)": ["--random", "2", *space, "--seed", "-1"],
        "--random: -3 is not a number of points": ["--random", "-3", *space],
        # 0 was read as "not given" (65,536 tokens); -5 reached the recipe's check
        "--val-tokens 0: at least 1": ["--val-tokens", "0"],
        "--val-tokens -5: at least 1": ["--val-tokens", "-5"],
        "--param: mup, mup-uncorrected, sp (got xp)": ["--param", "both,xp"],
        "--widths '64,x': comma-separated integers": ["--widths", "64,x"],
        "--densities '1,x': comma-separated numbers": ["--densities", "1,x"],
    }  # fmt: skip
    for message, args in cases.items():
        result = CliRunner().invoke(app, [*base, *args])
        assert (result.exit_code, result.output) == (2, f"error: {message}\n"), args
        assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
