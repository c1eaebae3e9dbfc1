"""`lmpipe scaling`: the fit L(f) = (f/a)^b + c recovers known laws, reads real runs (FLOPs from
their recipes, held-out loss), and `--family` writes compute-optimal recipes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from lmpipe.cli.app import app
from lmpipe.dataprep.errors import LmpipeError
from lmpipe.train.model import count_parameters
from lmpipe.train.plan import make_plan, training_flops
from lmpipe.train.recipe import load_recipe, recipe_yaml
from lmpipe.train.scaling import (
    PUBLISHED,
    PowerLaw,
    bootstrap,
    family,
    fit_power_law,
    parse_size,
    scaling,
)
from lmpipe.train.sweep import sweep
from lmpipe.train.sweep_plan import SweepSettings, parse_grid

CEREBRAS = PUBLISHED["cerebras-gpt"].law  # a 5.984e22, b -0.0737, c 0.5066 (seeds-spec 3.4)


@pytest.mark.parametrize(
    "law", [CEREBRAS, PowerLaw(a=3.0e19, b=-0.25, c=1.7), PowerLaw(a=1e25, b=-0.05, c=0.0)]
)
def test_the_fit_recovers_a_law_from_its_points(law):
    flops = np.logspace(18, 22, 9)
    fit = fit_power_law(flops, law(flops))
    assert fit.a == pytest.approx(law.a, rel=1e-4)
    assert fit.b == pytest.approx(law.b, rel=1e-5)
    assert fit.c == pytest.approx(law.c, abs=1e-6)
    assert fit.rmse < 1e-9


def test_with_noise_the_fit_and_its_bootstrap_bracket_the_truth():
    flops = np.logspace(18, 22, 12)
    rng = np.random.default_rng(0)
    loss = CEREBRAS(flops) * (1 + 0.001 * rng.standard_normal(len(flops)))
    fit = fit_power_law(flops, loss)
    assert fit.b == pytest.approx(CEREBRAS.b, abs=0.005)
    assert fit.c == pytest.approx(CEREBRAS.c, abs=0.06)
    assert np.abs(fit(flops) - CEREBRAS(flops)).max() < 0.005  # the curve, well within the noise
    spread = bootstrap(flops, loss, samples=200)
    assert spread["used"] >= 190
    for name in ("b", "c"):  # two or three standard deviations hold the true value
        s, truth = spread[name], getattr(CEREBRAS, name)
        assert s["std"] > 0 and abs(getattr(fit, name) - truth) < 3 * s["std"]
    assert spread["a"]["p16"] < spread["a"]["p84"]


def test_the_irreducible_loss_stays_between_0_and_the_lowest_loss():
    flops = np.array([1e10, 1e11, 1e12, 1e13])
    loss = np.array([11.0, 10.0, 8.0, 3.0])  # concave in ln f: the unbounded fit has c < 0
    fit = fit_power_law(flops, loss)
    assert fit.c == 0.0 and fit.b < 0
    assert fit.rmse == pytest.approx(np.sqrt(np.mean((fit(flops) - loss) ** 2)))
    flat = fit_power_law(flops, np.array([3.0, 2.0, 1.5, 1.49]))  # nearly flat at the end
    assert 0 <= flat.c < 1.49


def test_too_few_compute_budgets_cannot_be_fitted():
    with pytest.raises(LmpipeError, match="at least 3 different compute budgets"):
        fit_power_law([1e18, 1e18, 1e19, 1e19], [3.0, 3.0, 2.5, 2.5])


@pytest.fixture(scope="module")
def runs(pattern_tokens, tmp_path_factory):
    """Three finished runs of the tiny recipe at d_model 32, 48 and 64 (a width sweep)."""
    out = tmp_path_factory.mktemp("scaling") / "widths"
    settings = SweepSettings(
        recipe="tiny", data=pattern_tokens, widths=(32, 48, 64), val_tokens=256,
        grid=(parse_grid("optimizer.lr=2^-4"),),
        overrides=("tokens_per_step=256", "micro_batch_tokens=256", "stages=[{seq_len: 64, tokens: 512}]",
                   "schedule.warmup_tokens=256", "checkpoint_every_tokens=512"),
    )  # fmt: skip
    report = sweep(settings, out)
    return [out / r["run_dir"] for r in report["points"]], report


@pytest.mark.slow
def test_scaling_reads_finished_runs_and_writes_the_fit(runs, tmp_path):
    run_dirs, swept = runs
    report = scaling(run_dirs, tmp_path / "fit", published="cerebras-gpt", samples=50)
    for run, row, run_dir in zip(report["runs"], swept["points"], run_dirs, strict=True):
        recipe = load_recipe(str(run_dir / "recipe.yaml"))
        assert run["parameters"] == count_parameters(recipe.model) == row["parameters"]
        assert run["tokens"] == 512 and run["flops"] == training_flops(recipe, make_plan(recipe))
        assert run["loss"] == pytest.approx(row["heldout_loss"])
    widths = [load_recipe(str(d / "recipe.yaml")).model.d_model for d in run_dirs]
    assert widths == [32, 48, 64]
    flops = [r["flops"] for r in report["runs"]]
    assert flops == sorted(flops) and len(set(flops)) == 3
    fit = fit_power_law(flops, [r["loss"] for r in report["runs"]])
    assert report["fit"] == {"a": fit.a, "b": fit.b, "c": fit.c, "rmse": fit.rmse}
    assert report["published"]["fit"] == {"a": 5.984e22, "b": -0.0737, "c": 0.5066, "rmse": 0.0}
    saved = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert (tmp_path / "fit" / "fit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "fit" / "manifest.json").read_text())["stage"] == "scaling"
    train = scaling(run_dirs, tmp_path / "fit-train", loss="train", samples=10)
    for run, run_dir in zip(train["runs"], run_dirs, strict=True):
        losses = [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
        assert run["loss"] == pytest.approx(losses[-1])  # the last tenth of two steps: the last


@pytest.mark.slow
def test_scaling_input_errors_are_one_line(runs, tmp_path):
    run_dirs, _ = runs
    result = CliRunner().invoke(
        app, ["scaling", *map(str, run_dirs[:2]), "-o", str(tmp_path / "f")]
    )
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "needs at least 3 runs (got 2)" in result.output
    cases = {
        "a run folder is given twice": [run_dirs[0], run_dirs[0], run_dirs[1]],
        "no manifest.json": [*run_dirs[:2], tmp_path],
        "--published 'gpt-3'": run_dirs,
    }
    for message, dirs in cases.items():
        published = "gpt-3" if "published" in message else None
        with pytest.raises(LmpipeError, match=message):
            scaling(dirs, tmp_path / "f", published=published)
    with pytest.raises(LmpipeError, match="lies inside"):
        scaling(run_dirs, run_dirs[0] / "fit")
    assert not (tmp_path / "f").exists()


def test_a_family_trains_20_tokens_a_parameter(tmp_path):
    out = tmp_path / "family"
    rows = family("proxy", ["256", "512", "100M"], out)
    proxy = load_recipe("proxy")
    assert [r["recipe"] for r in rows] == ["proxy-d256", "proxy-d512", "proxy-100m"]
    for row in rows:
        recipe = load_recipe(str(out / row["file"]))
        n = count_parameters(recipe.model)
        assert row["parameters"] == n and recipe.name == row["recipe"]
        # 20 tokens a parameter, to within one step of 8,192 tokens a stage
        assert abs(recipe.total_tokens - 20 * n) <= 2 * recipe.tokens_per_step
        m = recipe.model
        assert m.d_head == 64 and m.mup == proxy.model.mup  # heads and base shapes kept
        assert m.n_layers == max(1, round(m.d_model / 64))  # the proxy's aspect ratio, 256 / 4
        shares = [s.tokens / recipe.total_tokens for s in recipe.stages]
        assert shares == pytest.approx([0.75, 0.25], abs=0.01)
        # the warmup keeps its tokens (Cerebras-GPT: ~375M at every size), within the run
        assert recipe.schedule.warmup_tokens == min(proxy.schedule.warmup_tokens, recipe.total_tokens)  # fmt: skip
    assert rows[2]["parameters"] == pytest.approx(100e6, rel=0.1)
    # from BTLM's recipe, a small member still warms up over BTLM's ~374M tokens (a share of the
    # run would be under one step: no warmup at all); Cerebras-GPT 111M's 2.7B keeps ~375M, not 9.2B
    (small,) = family("btlm3b", ["1024"], tmp_path / "btlm")
    small_recipe = load_recipe(str(tmp_path / "btlm" / small["file"]))
    assert small_recipe.schedule.warmup_tokens == load_recipe("btlm3b").schedule.warmup_tokens
    (big,) = family("cerebras-gpt-111m-mup", ["2.7B"], tmp_path / "cg")
    big_recipe = load_recipe(str(tmp_path / "cg" / big["file"]))
    assert (
        big_recipe.schedule.warmup_tokens
        == load_recipe("cerebras-gpt-111m-mup").schedule.warmup_tokens
    )
    assert rows[0]["d_model"] == 256 and rows[1]["d_model"] == 512
    saved = json.loads((out / "family.json").read_text())
    assert saved["recipes"] == rows and saved["tokens_per_param"] == 20
    result = CliRunner().invoke(app, ["scaling", "--family", "--recipe", "proxy", "--sizes", "256,12X", "-o", str(tmp_path / "f2")])  # fmt: skip
    assert result.exit_code == 2 and "--sizes '12X'" in result.output
    assert parse_size("1.3B") == ("parameters", 1.3e9) and parse_size("768") == ("width", 768)
    with pytest.raises(LmpipeError, match="already exists"):
        family("proxy", ["256"], out)
    assert math.isclose(rows[0]["tokens_per_parameter"], rows[0]["tokens"] / rows[0]["parameters"])


def test_a_family_can_count_parameters_without_embeddings(tmp_path):
    """Kaplan's N: 20 tokens per non-embedding parameter (the tied embedding left out)."""
    rows = family("tiny", ["32", "64", "40K"], tmp_path / "f", count="non-embedding")
    for row in rows:
        recipe = load_recipe(str(tmp_path / "f" / row["file"]))
        m = recipe.model
        non_embedding = count_parameters(m) - m.vocab_size * m.d_model
        assert row["non_embedding_parameters"] == non_embedding == count_parameters(m, embeddings=False)  # fmt: skip
        assert abs(recipe.total_tokens - 20 * non_embedding) <= recipe.tokens_per_step
        assert row["tokens_per_parameter"] == pytest.approx(recipe.total_tokens / non_embedding)
    assert rows[2]["non_embedding_parameters"] == pytest.approx(40e3, rel=0.5)
    assert json.loads((tmp_path / "f" / "family.json").read_text())["count"] == "non-embedding"
    with pytest.raises(LmpipeError, match="--count: 'some' is not one of total, non-embedding"):
        family("tiny", ["32"], tmp_path / "g", count="some")


def test_family_overwrite_never_deletes_the_base_recipe_file(tmp_path):
    out = tmp_path / "fam"
    family("tiny", ["32"], out)  # an earlier family, which --overwrite may replace
    base = out / "base.yaml"  # but not with the base recipe the command reads inside it
    text = recipe_yaml(load_recipe("tiny"))
    base.write_text(text, encoding="utf-8")
    args = ["scaling", "--family", "--recipe", str(base), "--sizes", "32,64", "-o", str(out), "--overwrite"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"error: {out}: the output folder contains {base}, which this stage reads; "
        "choose an output outside everything it reads"
    )
    assert base.read_text(encoding="utf-8") == text and (out / "family.json").is_file()
    # the same base recipe outside the output folder: replaced as asked
    outside = tmp_path / "base.yaml"
    outside.write_text(text, encoding="utf-8")
    args[args.index(str(base))] = str(outside)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(json.loads((out / "family.json").read_text())["recipes"]) == 2


def synthetic_run(folder, tokens, val_loss, loss=3.0):
    """A finished run folder as `lmpipe train` leaves it, trained on `tokens` (its compute), with
    `val_loss` in its last row; no training."""
    from lmpipe.dataprep.folders import write_manifest

    recipe = load_recipe("tiny", [*FAST, f"stages=[{{seq_len: 64, tokens: {tokens}}}]"])
    folder.mkdir(parents=True)
    (folder / "recipe.yaml").write_text(recipe_yaml(recipe), encoding="utf-8")
    row = {"step": 1, "tokens": tokens, "loss": loss, "val_loss": val_loss}
    (folder / "metrics.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    write_manifest(folder, "train", summary={"tokens": tokens})
    return folder


FAST = ["tokens_per_step=256", "micro_batch_tokens=256", "schedule.warmup_tokens=256"]
BUDGETS = (512, 1024, 2048, 4096)


def test_a_val_loss_that_is_not_a_map_of_numbers_is_one_line(tmp_path):
    """lmpipe writes {source: loss} (NaN for a diverged source): anything else is another tool's."""
    good = [synthetic_run(tmp_path / f"r{t}", t, {"data": 3.0 - t / 4096}) for t in BUDGETS[:3]]
    for name, value in {"number": 2.5, "list": [1], "null": {"data": None}}.items():
        bad = synthetic_run(tmp_path / name, 4096, value)
        with pytest.raises(LmpipeError) as e:
            scaling([*good, bad], tmp_path / "fit")
        assert str(e.value) == (
            f"{bad}/metrics.jsonl: step 1 has a 'val_loss' that is not a {{source: loss}} map of "
            "numbers; not lmpipe training metrics"
        )
    diverged = synthetic_run(tmp_path / "nan", 4096, {"data": math.nan})
    with pytest.raises(LmpipeError, match=r"nan: its heldout loss is nan \(the run diverged\)"):
        scaling([*good, diverged], tmp_path / "fit")
    assert not (tmp_path / "fit").exists()


def test_a_flat_fit_is_refused_and_fit_json_is_strict_json(tmp_path):
    """Equal losses fit b ~ 0 and a = inf or 0 (ln a = ln f - k / b): refused, no fit.json (it
    held `"a": Infinity`, not JSON); a real fit's fit.json parses without NaN or Infinity."""
    flat = [synthetic_run(tmp_path / f"flat{t}", t, {"data": 3.0}) for t in BUDGETS]
    with pytest.raises(LmpipeError, match=r"^scaling: the loss does not change with compute across these runs \(fit: a = (inf|0), b = \S+\), so there is no power law to fit"):  # fmt: skip
        scaling(flat, tmp_path / "fit-flat")
    assert not (tmp_path / "fit-flat").exists()
    law = PowerLaw(a=1e7, b=-0.3, c=1.5)
    runs = []
    for t in BUDGETS:
        folder = synthetic_run(tmp_path / f"law{t}", t, {"data": 0.0})
        recipe = load_recipe(str(folder / "recipe.yaml"))
        flops = training_flops(recipe, make_plan(recipe))
        row = {"step": 1, "tokens": t, "loss": 3.0, "val_loss": {"data": float(law(flops))}}
        (folder / "metrics.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
        runs.append(folder)
    report = scaling(runs, tmp_path / "fit", samples=20)
    assert report["fit"]["a"] == pytest.approx(1e7, rel=1e-4)
    assert report["fit"]["b"] == pytest.approx(-0.3, rel=1e-4)

    def refuse(constant):
        raise ValueError(constant)

    saved = json.loads((tmp_path / "fit" / "fit.json").read_text(), parse_constant=refuse)
    assert saved == json.loads(json.dumps(report))


def test_bad_bootstrap_and_tokens_per_param_are_one_line(tmp_path):
    runs = [synthetic_run(tmp_path / f"r{t}", t, {"data": 3.0 - t / 4096}) for t in BUDGETS]
    with pytest.raises(LmpipeError, match=r"^--bootstrap -5: the number of draws is 0 \(none\) or more$"):  # fmt: skip
        scaling(runs, tmp_path / "fit", samples=-5)
    for value, shown in ((math.inf, "inf"), (math.nan, "nan"), (0.0, "0"), (-20.0, "-20")):
        with pytest.raises(LmpipeError, match=rf"^--tokens-per-param: {shown} is not a finite number > 0$"):  # fmt: skip
            family("tiny", ["64"], tmp_path / "fam", tokens_per_param=value)
    args = ["scaling", "--family", "--recipe", "tiny", "--sizes", "64", "--tokens-per-param", "inf", "-o", str(tmp_path / "fz")]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        "error: --tokens-per-param: inf is not a finite number > 0"
    ]
    result = CliRunner().invoke(app, ["scaling", *map(str, runs), "--bootstrap", "-1", "-o", str(tmp_path / "fb")])  # fmt: skip
    assert result.exit_code == 2 and "--bootstrap -1: the number of draws" in result.output
    assert not any((tmp_path / name).exists() for name in ("fit", "fam", "fz", "fb"))
