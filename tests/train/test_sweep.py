"""`lmpipe sweep`: points are real training runs; results, diverged points, resume, no rework,
the plan check, muP transfer of the best point, and bad input as one-line errors."""

from __future__ import annotations

import json
import math
import os

import pytest
from typer.testing import CliRunner

from lmpipe.cli.app import app
from lmpipe.dataprep.errors import LmpipeError
from lmpipe.train import loop
from lmpipe.train import sweep as sweep_module
from lmpipe.train.recipe import load_recipe, recipe_yaml
from lmpipe.train.sweep import sweep
from lmpipe.train.sweep_plan import (
    SweepSettings,
    heads_for,
    parse_grid,
    parse_space,
    plan_points,
)
from lmpipe.train.transfer import sweep_best

# The tiny recipe (d_model 64, muP base 64) trained 2 steps of 4 x 64 tokens, a checkpoint after
# each; the sweep's points are 32 wide (m_d = 1/2), so the best values transfer to tiny itself.
TWO_STEPS = [
    "tokens_per_step=256",
    "micro_batch_tokens=256",
    "stages=[{seq_len: 64, tokens: 512}]",
    "schedule.warmup_tokens=256",
    "checkpoint_every_tokens=256",
]
LRS = "optimizer.lr=2^-8,2^-4,1e4"  # 1e4 diverges


def settings_for(data, grid=LRS, **changes) -> SweepSettings:
    base = dict(recipe="tiny", data=data, overrides=tuple(TWO_STEPS), grid=(parse_grid(grid),),
                widths=(32,), val_tokens=256)  # fmt: skip
    return SweepSettings(**{**base, **changes})


@pytest.fixture(scope="module")
def swept(pattern_tokens, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "lr"
    return out, sweep(settings_for(pattern_tokens), out)


def mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


@pytest.mark.slow
def test_every_point_is_a_run_and_a_diverged_point_is_recorded(swept):
    out, report = swept
    rows = report["points"]
    assert [r["point"] for r in rows] == ["0000-mup-w32", "0001-mup-w32", "0002-mup-w32"]
    assert [r["values"]["optimizer.lr"] for r in rows] == [2**-8, 2**-4, 1e4]
    good, bad = rows[:2], rows[2]
    assert bad["diverged"] and bad["finished"] and bad["train_loss"] is None
    assert bad["heldout_loss"] is None and bad["val_loss"] == {"data": None}
    for row in good:
        run = out / row["run_dir"]
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert not row["diverged"] and [m["step"] for m in metrics] == [1, 2]
        assert row["train_loss"] == metrics[-1]["loss"]
        assert row["heldout_loss"] == metrics[-1]["val_loss"]["data"]  # scored at the end only
        assert "val_loss" not in metrics[0] and row["tokens"] == 512
        assert not (run / "checkpoints").exists() and (run / "model" / "model.pt").is_file()
        # dropped with the checkpoints: no path into lr.partial, which is gone once published
        assert json.loads((run / "manifest.json").read_text())["summary"]["checkpoint"] is None
        # the point is `lmpipe train --recipe tiny --set ...` with the sweep's --set list
        trained = load_recipe(str(run / "recipe.yaml"))
        assert trained.model_copy(update={"data": None}) == load_recipe("tiny", row["set"])
        m = trained.model
        assert (m.d_model, m.n_heads, m.d_ff, m.mup.d_model_base) == (32, 2, 85, 64)
        lr = row["values"]["optimizer.lr"]
        assert trained.optimizer.lr == lr and trained.schedule.end_lr == pytest.approx(lr / 10)
    assert good[1]["heldout_loss"] < good[0]["heldout_loss"]  # 2^-4 beats 2^-8 in two steps
    assert report["optimum"] == [{
        "group": "mup w32", "param": "mup", "width": 32, "density": 1.0, "points": 3,
        "diverged": 1, "best": "0001-mup-w32", "values": {"optimizer.lr": 0.0625},
        "heldout_loss": good[1]["heldout_loss"],
    }]  # fmt: skip
    assert json.loads((out / "sweep.json").read_text()) == report
    lines = (out / "sweep.csv").read_text().splitlines()
    assert lines[0].startswith("point,param,width,density,optimizer.lr,train_loss,heldout_loss")
    assert len(lines) == 4 and lines[3].split(",")[5:7] == ["", ""]  # diverged: no losses
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "sweep" and manifest["points"] == 3 and manifest["diverged"] == 1
    assert not [p for p in out.rglob("*") if p.is_file() and b"lr.partial" in p.read_bytes()]


@pytest.mark.slow
def test_the_same_command_twice_does_no_work(swept, pattern_tokens, monkeypatch):
    out, report = swept
    before = mtimes(out)
    calls = []
    monkeypatch.setattr(sweep_module, "run_point", lambda job: calls.append(job))
    assert sweep(settings_for(pattern_tokens), out) == report
    assert calls == [] and mtimes(out) == before


@pytest.mark.slow
def test_a_point_the_guard_stops_is_recorded_by_its_published_path(pattern_tokens, tmp_path):
    out = tmp_path / "g"
    # lr 1e4: the third step's loss is not finite, and the guard stops at the first
    guarded = (*TWO_STEPS, "stages=[{seq_len: 64, tokens: 768}]", "guard.max_bad_steps=1")
    report = sweep(settings_for(pattern_tokens, grid="optimizer.lr=1e4", overrides=guarded), out)
    run = out.resolve() / "runs" / "0000-mup-w32"
    # no checkpoint or `lmpipe train --resume` to offer: the sweep drops the point's checkpoints
    assert report["points"][0]["stopped"] == (
        f"{run}: stopped at step 3: the loss or gradient norm was not finite in 1 steps in a row "
        "(3-3; guard.max_bad_steps = 1)"
    )
    assert run.is_dir() and not (run / "checkpoints").exists()
    assert not [p for p in out.rglob("*") if p.is_file() and b"g.partial" in p.read_bytes()]


@pytest.mark.slow
def test_another_plan_is_refused_unless_overwrite(swept, pattern_tokens):
    out, _ = swept
    with pytest.raises(LmpipeError, match=r"another plan \(3 points there, 2 here\).*--overwrite"):
        sweep(settings_for(pattern_tokens, grid="optimizer.lr=2^-8,2^-4"), out)


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_to_the_uninterrupted_results(
    swept, pattern_tokens, tmp_path, monkeypatch
):
    _, uninterrupted = swept
    out = tmp_path / "lr"
    real_train = loop.train
    trained, preempt = [], {"call": 2}

    def train(recipe, data, run_dir, **kw):  # the second call is killed after one step
        trained.append((run_dir.name, kw["resume"]))
        if len(trained) == preempt["call"]:
            real_train(recipe, data, run_dir, stop_after_steps=1, **kw)
            raise KeyboardInterrupt
        return real_train(recipe, data, run_dir, **kw)

    monkeypatch.setattr(loop, "train", train)
    with pytest.raises(KeyboardInterrupt):
        sweep(settings_for(pattern_tokens), out)
    work = tmp_path / "lr.partial"
    assert not out.exists() and (work / "runs" / "0001-mup-w32" / "checkpoints").is_dir()
    assert not (work / "runs" / "0002-mup-w32").exists()
    with pytest.raises(LmpipeError, match="interrupted sweep of another plan"):
        sweep(settings_for(pattern_tokens, grid="optimizer.lr=2^-8"), out)
    first = mtimes(work / "runs" / "0000-mup-w32")
    trained.clear()
    preempt["call"] = None
    report = sweep(settings_for(pattern_tokens), out)
    # the finished point kept, the preempted one resumed from its checkpoint, the last one run
    assert trained == [("0001-mup-w32", True), ("0002-mup-w32", False)]
    assert mtimes(out / "runs" / "0000-mup-w32") == {
        out / p.relative_to(work): t for p, t in first.items()
    }
    for a, b in zip(report["points"], uninterrupted["points"], strict=True):
        for key in ("point", "values", "set", "finished", "diverged", "tokens", "flops"):
            assert a[key] == b[key], key
        for key in ("train_loss", "heldout_loss"):
            assert (a[key] is None and b[key] is None) or a[key] == pytest.approx(b[key], abs=1e-5)
    assert report["optimum"][0]["best"] == uninterrupted["optimum"][0]["best"]


@pytest.mark.slow
def test_parallel_points_run_in_worker_processes(swept, pattern_tokens, tmp_path):
    _, serial = swept
    out = tmp_path / "par"
    report = sweep(settings_for(pattern_tokens, grid="optimizer.lr=2^-8,2^-4", jobs=2), out)
    assert len(report["points"]) == 2
    for a, b in zip(report["points"], serial["points"][:2], strict=True):
        assert a["point"] == b["point"] and a["set"] == b["set"]
        # one thread a worker instead of two: the same run up to float summation order
        assert a["heldout_loss"] == pytest.approx(b["heldout_loss"], abs=1e-4)
        log = (out / "logs" / f"{a['point']}.log").read_text()
        assert "train: 2 steps" in log  # each worker's output went to its point's log
        # the model where it is once the sweep is published (the line is wrapped to 80 columns)
        model = out.resolve() / "runs" / a["point"] / "model"
        assert f"finished;modelin{model}" in "".join(log.split()) and model.is_dir()
    assert not [p for p in out.rglob("*") if p.is_file() and b"par.partial" in p.read_bytes()]


@pytest.mark.slow
def test_points_run_as_ray_tasks_give_the_same_results(swept, pattern_tokens, tmp_path):
    pytest.importorskip("ray")
    _, serial = swept
    out = tmp_path / "ray"
    settings = settings_for(pattern_tokens, grid="optimizer.lr=2^-8,2^-4", jobs=2, engine="ray")
    report = sweep(settings, out)
    assert len(report["points"]) == 2
    for a, b in zip(report["points"], serial["points"][:2], strict=True):
        assert a["point"] == b["point"] and a["set"] == b["set"]
        assert a["heldout_loss"] == pytest.approx(b["heldout_loss"], abs=1e-4)
        assert "train: 2 steps" in (out / "logs" / f"{a['point']}.log").read_text()
    # the same plan: a local rerun finds it finished
    assert sweep(settings_for(pattern_tokens, grid="optimizer.lr=2^-8,2^-4"), out) == report


@pytest.mark.slow
def test_best_writes_the_target_recipe_with_the_best_base_values(swept, tmp_path, capsys):
    out, _ = swept
    best_lr = 2**-4
    path = tmp_path / "best.yaml"
    sets = sweep_best(out, write_recipe=path)
    tuned, tiny = load_recipe(str(path)), load_recipe("tiny")
    assert tuned.model == tiny.model  # the target's widths (d_model 64), base shapes and values
    assert tuned.optimizer.lr == best_lr
    assert tuned.schedule.end_lr == pytest.approx(tiny.schedule.end_lr * best_lr / tiny.optimizer.lr)  # fmt: skip
    assert tuned.stages == tiny.stages and tuned.tokens_per_step == tiny.tokens_per_step
    assert sets[0] == "optimizer.lr=0.0625"
    # --print-set: the same recipe through `lmpipe train --recipe tiny --set ...`
    result = CliRunner().invoke(app, ["sweep", str(out), "--best", "--print-set"])
    assert result.exit_code == 0, result.output
    printed = result.stdout.strip().split()
    assert printed[0::2] == ["--set"] * 5
    assert load_recipe("tiny", printed[1::2]) == tuned
    # a wider target keeps its widths; one of another base width is refused
    wide = tmp_path / "wide.yaml"
    wide.write_text(recipe_yaml(load_recipe("tiny", ["model.d_model=256", "model.n_heads=16", "model.d_ff=680"])))  # fmt: skip
    sweep_best(out, target=str(wide), write_recipe=tmp_path / "wide-best.yaml")
    tuned_wide = load_recipe(str(tmp_path / "wide-best.yaml"))
    assert (tuned_wide.model.d_model, tuned_wide.model.d_ff, tuned_wide.optimizer.lr) == (256, 680, best_lr)  # fmt: skip
    with pytest.raises(LmpipeError, match="d_model_base 256 differs from the sweep's 64"):
        sweep_best(out, target="btlm3b", write_recipe=tmp_path / "b.yaml")
    # another attention scale: said, as another architecture is
    qk = tmp_path / "qk.yaml"
    qk.write_text(recipe_yaml(load_recipe("tiny", ["model.mup.qk_scale=sqrt_d_head"])))
    sweep_best(out, target=str(qk), print_set=True)
    assert (
        capsys.readouterr().err.split("warning: ")[1].split()
        == (
            "target tiny scales attention by mup.qk_scale sqrt_d_head, the sweep's model by d_head: "
            "base values transfer across widths, not across attention scales"
        ).split()
    )
    with pytest.raises(LmpipeError, match="already exists"):
        sweep_best(out, write_recipe=path)
    with pytest.raises(LmpipeError, match="lies inside"):
        sweep_best(out, write_recipe=out / "best.yaml", overwrite=True)


def test_a_sweep_whose_points_all_diverged_is_still_compared_on_held_out_loss():
    """Their held-out loss is null, but they were validated: not "no held-out split"."""
    from lmpipe.train.sweep_report import objective_of

    diverged = {"heldout_loss": None, "val_loss": {"data": None}}
    assert objective_of([diverged, diverged]) == "heldout_loss"
    assert objective_of([{"heldout_loss": None, "val_loss": {}}]) == "train_loss"


def test_one_step_points_under_a_warmup_are_refused(pattern_tokens):
    """The warmup's first rate is 0: one step trains nothing, every point ties."""
    one_step = settings_for(pattern_tokens, tokens=256)
    with pytest.raises(LmpipeError) as refused:
        plan_points(one_step)
    assert str(refused.value) == (
        "sweep point 0000-mup-w32: one step of 256 tokens, at a learning rate of 0 (the warmup "
        "starts at 0), trains nothing; give --tokens at least two steps (512)"
    )
    assert len(plan_points(settings_for(pattern_tokens, tokens=512))[1]) == 3


def test_best_of_a_folder_that_is_no_finished_sweep_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["sweep", str(tmp_path / "empty"), "--best", "--print-set"])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {tmp_path / 'empty'}: no manifest.json, so it is unfinished or not an lmpipe output"  # fmt: skip
    (tmp_path / "s.partial").mkdir()
    with pytest.raises(LmpipeError, match="the sweep is unfinished"):
        sweep_best(tmp_path / "s")


def test_widths_densities_and_sp_points_are_proper_models(pattern_tokens):
    data = pattern_tokens  # planning reads its manifest (the plan records its identity)
    settings = SweepSettings(
        recipe="proxy", data=data, grid=(parse_grid("optimizer.lr=2^-10:2^-3:x2"),
        parse_grid("model.mup.sigma_base=0.05,0.1")), widths=(128, 512), densities=(1.0, 0.25),
        params=("mup", "sp"), tokens=100_000,
    )  # fmt: skip
    plan, points, recipes = plan_points(settings)
    assert len(points) == 2 * 2 * 2 * 8 * 2 and plan["keys"] == ["optimizer.lr", "model.mup.sigma_base"]  # fmt: skip
    for point, recipe in zip(points, recipes, strict=True):
        m = recipe.model
        assert (m.d_model, m.n_heads, m.d_head) == (point.width, point.width // 64, 64)
        assert m.d_ff == round(point.width * 682 / 256) and m.density == point.density
        lr = point.values["optimizer.lr"]
        assert recipe.optimizer.lr == lr and recipe.schedule.end_lr == pytest.approx(lr / 10)
        if point.param == "mup":  # the proxy's base shapes: m_d = width / 256
            assert m.mup.d_model_base == 256 and m.mup.d_ff_base == 682.6
            assert m.mup.sigma_base == point.values["model.mup.sigma_base"] and m.init_std is None
        else:
            assert m.mup is None and m.init_std == point.values["model.mup.sigma_base"]
        # --tokens: every stage scaled alike, in whole steps of 8,192 tokens
        assert [s.tokens for s in recipe.stages] == [73728, 24576]
        assert recipe.schedule.warmup_tokens == round(32768 * 98304 / 262144)
        assert recipe.validation.every_tokens == 98304 and recipe.validation.tokens == 65536
        assert recipe.data[0].path == data.resolve()
        # the point is the recipe file with its --set list, data aside
        assert load_recipe("proxy", point.overrides).model_copy(update={"data": recipe.data}) == recipe  # fmt: skip
    assert points[0].values == {"optimizer.lr": 2**-10, "model.mup.sigma_base": 0.05}
    assert heads_for(96, 64) == 2 and heads_for(512, 64) == 8  # heads of 48 when 64 cannot be


def test_uncorrected_mup_points_use_dense_mup_rules_on_the_sparse_model(pattern_tokens):
    """SμPar divides the hidden init variance and Adam rate by m_d x m_rho; `mup-uncorrected`
    by m_d alone (the comparison of the SμPar paper), and a --set of the muP base values holds."""
    from lmpipe.train.model import GPT

    settings = SweepSettings(
        recipe="tiny", data=pattern_tokens, widths=(128,), densities=(0.25,),
        params=("mup", "mup-uncorrected"), overrides=("model.mup.d_model_base=32", "model.mup.d_ff_base=85"),
    )  # fmt: skip
    _, points, recipes = plan_points(settings)
    assert [p.param for p in points] == ["mup", "mup-uncorrected"]
    rates = {}
    for point, recipe in zip(points, recipes, strict=True):
        assert recipe.model.mup.d_model_base == 32 and recipe.model.density == 0.25
        assert recipe.model.mup.sparse_correction == (point.param == "mup")
        model = GPT(recipe.model)
        name = "h.0.attn.c_attn.weight"
        rates[point.param] = (model.lr_scale(name), model.init_std(name))
    m_d, m_rho = 128 / 32, 0.25
    assert rates["mup"] == pytest.approx((1 / (m_d * m_rho), 0.073 / math.sqrt(m_d * m_rho)))
    assert rates["mup-uncorrected"] == pytest.approx((1 / m_d, 0.073 / math.sqrt(m_d)))

    # The same model as docs/studies.md's study 2 built from recipe values alone: base width
    # 64 rho (m_d x m_rho = 1) and alpha_out / rho (the logit multiplier kept): equal weights,
    # rates and logits.
    import torch

    rho = 0.25
    switch = load_recipe("tiny", [f"model.density={rho}", "model.mup.sparse_correction=false"])
    values = load_recipe("tiny", [f"model.density={rho}", f"model.mup.d_model_base={64 * rho}", f"model.mup.d_ff_base={170 * rho}", f"model.mup.alpha_out={2.22 / rho}"])  # fmt: skip
    torch.manual_seed(1)
    a = GPT(switch.model)
    torch.manual_seed(1)
    b = GPT(values.model)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q) and a.lr_scale(name) == pytest.approx(b.lr_scale(name))
    idx = torch.randint(0, 50257, (2, 16))
    assert torch.allclose(a(idx)[0], b(idx)[0], atol=1e-5)


def test_random_search_draws_are_seeded_and_in_range(pattern_tokens):
    def draw(seed):
        settings = SweepSettings(
            recipe="proxy", data=pattern_tokens, random=64, seed=seed,
            space=(parse_space("optimizer.lr=loguniform:1e-4:1e-1"),
                   parse_space("model.mup.alpha_out=uniform:0.5:4")),
        )  # fmt: skip
        return [p.values for p in plan_points(settings)[1]]

    values = draw(0)
    assert len(values) == 64 and values == draw(0) and values != draw(1)
    lrs = [v["optimizer.lr"] for v in values]
    assert all(1e-4 <= x <= 1e-1 for x in lrs)
    logs = sorted(math.log10(x) for x in lrs)  # log-uniform: a quarter in each decade and a bit
    assert 8 <= sum(-4 <= x < -3 for x in logs) <= 32 and 8 <= sum(-2 <= x for x in logs) <= 32
    assert all(0.5 <= v["model.mup.alpha_out"] <= 4 for v in values)


def test_bad_input_is_a_one_line_error(tmp_path):
    grids = {
        "optimizer.lr": "expected KEY=START:STOP:xFACTOR",
        "optimizer.lr=": "expected",
        "optimizer.lr=1e-3:1e-1": "expected",
        "optimizer.lr=1e-3:1e-1:*2": "expected",
        "optimizer.lr=1e-1:1e-3:x2": "START <= STOP",
        "optimizer.lr=1e-3:1e-1:x1": "factor > 1",
        "optimizer.lr=1,,2": "'' is not a value",
        "optimizer.lr=1e-9:1:x1.0001": "at most 10,000",
    }
    for text, message in grids.items():
        with pytest.raises(LmpipeError, match=message):
            parse_grid(text)
    assert parse_grid("schedule.warmup_tokens=0:3:+1").values == (0, 1, 2, 3)
    assert parse_grid("optimizer.lr=2^-3:1:x2").values == (0.125, 0.25, 0.5, 1.0)
    with pytest.raises(LmpipeError, match="loguniform"):
        parse_space("optimizer.lr=normal:1:2")
    plans = {
        "--grid optimizer.lrr: unknown key": dict(grid=(parse_grid("optimizer.lrr=1,2"),)),
        "--grid model: a section": dict(grid=(parse_grid("model=1,2"),)),
        "set by the sweep itself": dict(grid=(parse_grid("model.d_model=64,128"),)),
        "--random: name what to draw": dict(random=4),
        "--space: give the number": dict(space=(parse_space("optimizer.lr=uniform:0:1"),)),
        "--param: mup, mup-uncorrected, sp": dict(params=("mu",)),
        "--engine: 'spark' is not one of local, ray": dict(engine="spark"),
        r"--densities: 1.5 is not in \(0, 1\]": dict(densities=(1.5,)),
        "no such recipe file": dict(recipe="nope.yaml"),
        "--data is required": dict(data=None),
        r"sweep point 0001-mup-w256.*schedule.end_lr \(0.002\) exceeds optimizer.lr \(0.001\)": dict(
            grid=(parse_grid("optimizer.lr=2e-3,1e-3"), parse_grid("schedule.end_lr=2e-3"))
        ),
    }  # fmt: skip
    for message, changes in plans.items():
        settings = SweepSettings(**{"recipe": "proxy", "data": tmp_path, **changes})
        with pytest.raises(LmpipeError, match=message):
            plan_points(settings)
    with pytest.raises(LmpipeError, match="--param mup: recipe cerebras-gpt-111m has no muP"):
        plan_points(SweepSettings(recipe="cerebras-gpt-111m", data=tmp_path, params=("mup",)))
    with pytest.raises(LmpipeError, match="--param mup-uncorrected: recipe cerebras-gpt-111m"):
        plan_points(SweepSettings(recipe="cerebras-gpt-111m", data=tmp_path, params=("sp", "mup-uncorrected")))  # fmt: skip
    result = CliRunner().invoke(app, ["sweep", "--recipe", "proxy", "--data", str(tmp_path), "-o", str(tmp_path / "o"), "--grid", "optimizer.lr=1:2"])  # fmt: skip
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert result.output.startswith("error: --grid 'optimizer.lr=1:2': expected")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    result = CliRunner().invoke(app, ["sweep", "--help"])
    assert result.exit_code == 0 and "--write-recipe" in result.output


def test_a_point_the_loop_stops_on_a_non_finite_loss_is_recorded_not_rerun(tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "runs").mkdir(parents=True)
    (work / "points").mkdir()
    recipe = load_recipe("tiny")
    job = sweep_module.PointJob("0000-mup-w64", recipe, work / "runs" / "0000-mup-w64",
                                work / "points" / "0000-mup-w64.json", work / "logs" / "x.log", work / "runs" / "0000-mup-w64")  # fmt: skip

    def stops(recipe, data, run_dir, **kw):  # a loop that gives up after a NaN step
        run_dir.mkdir()
        (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 11.2}\n{"step": 2, "loss": NaN}\n')  # fmt: skip
        raise FloatingPointError("loss is nan at step 2")

    monkeypatch.setattr(loop, "train", stops)
    record = sweep_module.run_point(job)
    assert record["stopped"] == "FloatingPointError: loss is nan at step 2"
    assert sweep_module.point_done(work, job.name)

    from lmpipe.train.guard import RunStopped

    def spikes(recipe, data, run_dir, **kw):  # the guard stops a run whose losses stay finite
        run_dir.mkdir()
        (run_dir / "metrics.jsonl").write_text('{"step": 1, "tokens": 64, "loss": 11.2}\n{"step": 2, "tokens": 128, "loss": 14.0}\n')  # fmt: skip
        (run_dir / "plan.json").write_text('{"parameters": 1, "flops": 1.0}')
        raise RunStopped("step 2: loss spike")

    monkeypatch.setattr(loop, "train", spikes)
    spiked = sweep_module.PointJob("0002-mup-w64", recipe, work / "runs" / "0002-mup-w64",
                                   work / "points" / "0002-mup-w64.json", work / "logs" / "z.log", work / "runs" / "0002-mup-w64")  # fmt: skip
    assert sweep_module.run_point(spiked)["stopped"] == "step 2: loss spike"
    assert sweep_module.point_done(work, spiked.name)
    from lmpipe.train import sweep_report
    from lmpipe.train.sweep_plan import Point

    row = sweep_report.point_row(work, Point(spiked.name, "mup", 64, 1.0))
    assert row["diverged"] and row["train_loss"] is None and row["stopped"] == "step 2: loss spike"

    def preempted(recipe, data, run_dir, **kw):  # SIGTERM: the loop checkpoints and returns
        (run_dir / "checkpoints" / "step00000003").mkdir(parents=True)
        return {"stopped": "SIGTERM", "steps": 3, "finished": False}

    monkeypatch.setattr(loop, "train", preempted)
    cut = sweep_module.PointJob("0003-mup-w64", recipe, work / "runs" / "0003-mup-w64",
                                work / "points" / "0003-mup-w64.json", work / "logs" / "w.log", work / "runs" / "0003-mup-w64")  # fmt: skip
    with pytest.raises(sweep_module.SweepInterrupted, match="0003-mup-w64 stopped by SIGTERM at step 3"):  # fmt: skip
        sweep_module.run_point(cut)
    assert (cut.run_dir / "checkpoints" / "step00000003").is_dir()  # kept for the resume
    assert not sweep_module.point_done(work, cut.name) and not cut.record.exists()

    def last_step(recipe, data, run_dir, **kw):  # the stop came in the last step: run finished
        (run_dir / "checkpoints" / "step00000004").mkdir(parents=True)
        return {"stopped": "SIGTERM", "steps": 4, "finished": True}

    monkeypatch.setattr(loop, "train", last_step)
    ended = sweep_module.PointJob("0004-mup-w64", recipe, work / "runs" / "0004-mup-w64",
                                  work / "points" / "0004-mup-w64.json", work / "logs" / "v.log", work / "runs" / "0004-mup-w64")  # fmt: skip
    with pytest.raises(sweep_module.SweepInterrupted, match=r"^sweep: point 0004-mup-w64 finished as SIGTERM came; rerun the same command to go on$"):  # fmt: skip
        sweep_module.run_point(ended)
    # done as any finished point: recorded, its checkpoints dropped; the sweep still stops
    assert json.loads(ended.record.read_text()) == {"point": ended.name, "seconds": pytest.approx(0, abs=5)}  # fmt: skip
    assert not (ended.run_dir / "checkpoints").exists()

    def fails(recipe, data, run_dir, **kw):  # any other error is a bug: raised, point not done
        raise RuntimeError("boom")

    monkeypatch.setattr(loop, "train", fails)
    other = sweep_module.PointJob("0001-mup-w64", recipe, work / "runs" / "0001-mup-w64",
                                  work / "points" / "0001-mup-w64.json", work / "logs" / "y.log", work / "runs" / "0001-mup-w64")  # fmt: skip
    with pytest.raises(RuntimeError, match="boom"):
        sweep_module.run_point(other)
    assert not sweep_module.point_done(work, other.name)


def test_overwrite_clears_the_work_of_another_plan(tmp_path):
    work = tmp_path / "out.partial"
    work.mkdir()
    (work / ".lmpipe-owner").write_text("sweep\n")
    plan = {"recipe": "tiny", "recipe_path": None, "recipe_text": "seed: 1\n",
            "recipe_settings": {"seed": 1}, "set": [], "data": [], "data_identity": {},
            "keys": [], "points": []}  # fmt: skip
    old = {**plan, "recipe": "proxy", "recipe_text": "seed: 2\n", "recipe_settings": {"seed": 2}}
    (work / "sweep-plan.json").write_text(json.dumps(old))
    (work / "runs" / "0000-mup-w256").mkdir(parents=True)
    with pytest.raises(LmpipeError, match=r"another plan \(recipe tiny: seed: 2 there, 1 here\)"):  # fmt: skip
        sweep_module.prepare_work(work, plan, overwrite=False)
    assert (work / "runs" / "0000-mup-w256").is_dir()
    sweep_module.prepare_work(work, plan, overwrite=True)
    assert sorted(p.name for p in work.iterdir()) == [".lmpipe-owner", "points", "runs", "sweep-plan.json"]  # fmt: skip
    assert not any((work / "runs").iterdir())
    assert json.loads((work / "sweep-plan.json").read_text()) == plan


def test_on_a_gpu_machine_each_worker_takes_its_own_gpu(monkeypatch):
    """-j on a GPU machine: at most one worker a GPU, each worker pinned to a GPU of its own
    before it imports torch (CUDA_VISIBLE_DEVICES); without GPUs the cores are shared."""
    import queue

    monkeypatch.setattr(sweep_module, "gpu_count", lambda: 2)
    assert sweep_module.workers(4, 3) == (2, 2)  # capped at the GPUs
    assert sweep_module.workers(4, 1) == (1, 0)  # one point: trained here
    monkeypatch.setattr(sweep_module, "gpu_count", lambda: 0)
    assert sweep_module.workers(4, 3) == (3, 0)
    gpus = queue.Queue()
    for gpu in range(2):
        gpus.put(gpu)
    # Set through monkeypatch, so that teardown restores it: _start_worker writes os.environ
    # itself, and every later test's subprocess would inherit the last GPU it chose.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    seen = []
    for _ in range(2):
        sweep_module._start_worker(gpus, 8)
        seen.append(os.environ["CUDA_VISIBLE_DEVICES"])
    assert seen == ["0", "1"]
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    sweep_module._start_worker(None, 3)
    assert os.environ["OMP_NUM_THREADS"] == "3"


def test_overwrite_never_deletes_the_recipe_file_the_sweep_reads(pattern_tokens, tmp_path):
    out = tmp_path / "sw"
    out.mkdir()
    mine = out / "my.yaml"  # e.g. a recipe copied into an earlier sweep's folder
    mine.write_text(recipe_yaml(load_recipe("tiny")), encoding="utf-8")
    with pytest.raises(LmpipeError) as refused:
        sweep(settings_for(pattern_tokens, recipe=str(mine)), out, overwrite=True)
    assert str(refused.value) == (
        f"{out}: the output folder contains {mine}, which this stage reads; "
        "choose an output outside everything it reads"
    )
    assert mine.read_text(encoding="utf-8") == recipe_yaml(load_recipe("tiny"))
    # a shipped recipe's name is no file, so no output is refused for it
    assert sweep_module.recipe_file("tiny") is None
    assert sweep_module.recipe_file("tiny.yml") == sweep_module.recipe_file("./tiny.yml")


def test_best_overwrites_only_a_recipe_file_it_wrote(tmp_path):
    from lmpipe.train.transfer import write_recipe_file

    tiny, sweep_folder, best = load_recipe("tiny"), tmp_path / "sw", {"point": "0001-mup-w32"}
    path = tmp_path / "best.yaml"
    write_recipe_file(path, tiny, sweep_folder, best, "tiny", overwrite=False)
    write_recipe_file(path, tiny, sweep_folder, best, "tiny", overwrite=True)  # its own: replaced
    assert load_recipe(str(path)) == tiny
    for name, text in [("notes.txt", "my notes\n"), ("mine.yaml", "# my recipe\n" + recipe_yaml(tiny))]:  # fmt: skip
        other = tmp_path / name
        other.write_text(text, encoding="utf-8")
        with pytest.raises(LmpipeError) as refused:
            write_recipe_file(other, tiny, sweep_folder, best, "tiny", overwrite=True)
        assert str(refused.value) == (
            f"{other}: exists and was not written by `lmpipe sweep --best`; --overwrite replaces "
            "only such a file: remove it or choose another --write-recipe"
        )
        assert other.read_text(encoding="utf-8") == text
    folder = tmp_path / "recipes"
    folder.mkdir()
    for overwrite in (False, True):  # a folder: --overwrite would not help, so not advised
        with pytest.raises(LmpipeError) as refused:
            write_recipe_file(folder, tiny, sweep_folder, best, "tiny", overwrite=overwrite)
        assert str(refused.value) == f"{folder}: is a folder; --write-recipe names a .yaml file"
