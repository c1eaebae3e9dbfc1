"""Run and sweep folders someone else made, or that a crash or another tool damaged: a resume
never writes through a symbolic link inside its run folder, a damaged metrics.jsonl or manifest
is skipped or one line naming it, and `sweep --best` / `scaling` check what they read."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.folders import read_manifest, write_json_atomic, write_manifest
from lmpipe.train.loop import train
from lmpipe.train.recipe import load_recipe, recipe_yaml
from lmpipe.train.run_folder import metrics_rows, trim_metrics
from lmpipe.train.scaling import scaling
from lmpipe.train.sweep_plan import yaml_value
from lmpipe.train.transfer import sweep_best
from tests.train.test_loop import SMALL, metrics
from tests.train.test_scaling import BUDGETS, synthetic_run

# Three steps of 512 tokens, a checkpoint after each (SMALL's model, stage switch after step 2).
THREE_STEPS = [
    *SMALL,
    "stages.0.tokens=1024",
    "stages.1.tokens=512",
    "checkpoint_every_tokens=512",
]
HUGE = '{"step": 1, "loss": 1' + "1" * 5000 + "}"  # past Python's 4,300 digits: a ValueError
DEEP = "[" * 100_000  # a RecursionError


def hostile_run(folder, link, target):
    """A run folder to resume (its plan, no checkpoint yet) with `link` inside it pointing to
    `target`."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "plan.json").write_text("{}\n")
    (folder / link).symlink_to(target)


@pytest.mark.parametrize(
    "link", ["recipe.yaml", "plan.json.tmp", "logs", "checkpoints/latest", "metrics.jsonl"]
)
def test_a_resume_refuses_a_run_folder_with_a_link_inside_before_writing(
    pattern_tokens, tmp_path, link
):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "file.txt").write_text("PRECIOUS\n")
    target = victim if link == "logs" else victim / "file.txt"
    run_dir = tmp_path / "run"
    hostile_run(run_dir, link, target)
    with pytest.raises(LmpipeError) as e:
        train(load_recipe("tiny", THREE_STEPS), pattern_tokens, run_dir, resume=True)
    assert str(e.value) == (
        f"{run_dir / link}: a symbolic link (to {target}) inside the run folder, which a run "
        "would write through; remove it (a run folder kept elsewhere is linked whole: --run-dir "
        "may be a link)"
    )
    assert [p.name for p in victim.iterdir()] == ["file.txt"]
    assert (victim / "file.txt").read_text() == "PRECIOUS\n"
    assert {p.name for p in run_dir.iterdir()} == {"checkpoints", "plan.json", link.split("/")[0]}
    assert (run_dir / "plan.json").read_text() == "{}\n"  # nothing written


def test_a_run_folder_that_is_itself_a_link_trains_and_resumes(pattern_tokens, tmp_path):
    """A run folder kept on other storage (RUN_DIR -> /scratch/...) is a link; only links inside
    the folder are refused."""
    (tmp_path / "scratch").mkdir()
    run_dir = tmp_path / "run"
    run_dir.symlink_to(tmp_path / "scratch")
    recipe = load_recipe("tiny", THREE_STEPS)
    train(recipe, pattern_tokens, run_dir, stop_after_steps=1)
    assert train(recipe, pattern_tokens, run_dir, resume=True)["finished"]
    assert [r["step"] for r in metrics(tmp_path / "scratch")] == [1, 2, 3]
    assert (tmp_path / "scratch" / "model" / "model.pt").is_file() and run_dir.is_symlink()


def test_atomic_writes_never_write_through_a_link_at_the_temporary_name(tmp_path):
    """A leftover file or a planted link at `NAME.tmp` is replaced, never written through; a link
    at NAME itself is replaced by the file, its target left alone."""
    victim = tmp_path / "victim.txt"
    victim.write_text("PRECIOUS\n")
    (tmp_path / "plan.json.tmp").symlink_to(victim)
    write_json_atomic(tmp_path / "plan.json", {"a": 1})
    (tmp_path / "manifest.json").symlink_to(victim)
    write_json_atomic(tmp_path / "manifest.json", {"b": 2})
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n')
    (tmp_path / "metrics.jsonl.tmp").symlink_to(victim)
    trim_metrics(tmp_path, 1)
    assert victim.read_text() == "PRECIOUS\n"
    assert json.loads((tmp_path / "plan.json").read_text()) == {"a": 1}
    assert json.loads((tmp_path / "manifest.json").read_text()) == {"b": 2}
    assert not (tmp_path / "manifest.json").is_symlink()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "manifest.json", "metrics.jsonl", "plan.json", "victim.txt",
    ]  # fmt: skip


def test_lines_python_cannot_parse_are_skipped_like_a_torn_line(tmp_path):
    good = ['{"step": 1, "loss": 2.0}', '{"step": 2, "loss": 1.5}']
    (tmp_path / "metrics.jsonl").write_text("\n".join([good[0], HUGE, DEEP, good[1]]) + "\n")
    assert metrics_rows(tmp_path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    trim_metrics(tmp_path, 2)
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(good) + "\n"


@pytest.mark.parametrize(
    "text, reason",
    [
        ("[" * 100_000, "nested too deeply to read"),
        ('{"stage": 1' + "0" * 5000 + "}", "a number too long to read"),
    ],
)
def test_a_manifest_python_cannot_parse_is_one_line(tmp_path, text, reason):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(LmpipeError) as e:
        read_manifest(tmp_path)
    assert str(e.value) == f"{tmp_path / 'manifest.json'}: not valid JSON ({reason})"


def test_a_resume_at_the_last_checkpoint_finishes_past_damaged_metric_rows(
    pattern_tokens, tmp_path
):
    """Killed after its last checkpoint, before its model was written; metrics.jsonl damaged
    since: a row without a loss, a bad val_loss and lr_groups, lines Python cannot parse. The
    resume finishes, its summary from the rows that hold a loss; the bad lines are dropped."""
    recipe = load_recipe("tiny", THREE_STEPS)
    whole = tmp_path / "whole"
    train(recipe, pattern_tokens, whole)
    run_dir = tmp_path / "killed"
    shutil.copytree(whole, run_dir, ignore=shutil.ignore_patterns("manifest.json", "model"))
    rows = metrics(whole)
    damaged = [
        {"step": 1, "tokens": 512},
        {**rows[1], "val_loss": {"data": "low"}, "lr_groups": [1]},
        rows[2],
    ]
    text = "".join(json.dumps(r) + "\n" for r in damaged)
    (run_dir / "metrics.jsonl").write_text(text + HUGE + "\n" + DEEP + "\n")
    summary = train(recipe, pattern_tokens, run_dir, resume=True)
    assert summary["finished"] and summary["steps_this_call"] == 0
    assert (summary["first_loss"], summary["last_loss"]) == (rows[1]["loss"], rows[2]["loss"])
    assert summary["lr"] == rows[2]["lr"] and summary["lr_hidden"] == rows[2]["lr_hidden"]
    assert summary["val_loss"] == rows[2].get("val_loss")
    assert (run_dir / "metrics.jsonl").read_text() == text
    assert (run_dir / "model" / "model.pt").is_file()
    assert read_manifest(run_dir, "train")["summary"]["first_loss"] == rows[1]["loss"]


# --- sweep --best and scaling ------------------------------------------------------------------

POINT = {
    "point": "0000-mup-w32",
    "param": "mup",
    "width": 32,
    "density": 1,
    "finished": True,
    "diverged": False,
    "train_loss": 3.5,
    "run_dir": "runs/0000-mup-w32",
}


def sweep_folder(folder, point):
    """A finished sweep folder as `lmpipe sweep` leaves it, of one point trained on tiny."""
    (folder / "runs" / "0000-mup-w32").mkdir(parents=True)
    recipe = recipe_yaml(load_recipe("tiny"))
    (folder / "runs" / "0000-mup-w32" / "recipe.yaml").write_text(recipe)
    report = {"recipe": "tiny", "objective": "train_loss", "points": [point]}
    (folder / "sweep.json").write_text(json.dumps(report))
    write_manifest(folder, "sweep")
    return folder


@pytest.mark.parametrize(
    "change, message",
    [
        ({"objective": None}, "'objective' is None, not heldout_loss or train_loss"),
        ({"points": [7]}, "points[0] is not a point (a JSON object)"),
        ({"train_loss": "3.5"}, "points[0]: 'train_loss' is '3.5', not a finite number or null"),
        ({"run_dir": None}, "points[0]: 'run_dir' is None, not a path"),
        ({"finished": 1}, "points[0]: 'finished' is 1, not true or false"),
        ({"width": "32"}, "points[0]: 'width' is '32', not an integer"),
        ({"point": ".."}, "points[0]: 'point' is '..', not a sweep point's name"),
        *[
            (
                {"run_dir": bad},
                f"points[0]: 'run_dir' is {bad!r}, not runs/0000-mup-w32: a sweep trains each point inside its folder, and --best reads nothing elsewhere",
            )  # fmt: skip
            for bad in ("/etc", "runs/0000-mup-w32/..", "runs/../../0000-mup-w32")
        ],
    ],
)
def test_best_refuses_a_sweep_json_it_would_trip_on_in_one_line(tmp_path, change, message):
    top = {k: change.pop(k) for k in ("objective", "points") if k in change}
    folder = sweep_folder(tmp_path / "sweep", {**POINT, **change})
    report = json.loads((folder / "sweep.json").read_text())
    (folder / "sweep.json").write_text(json.dumps({**report, **top}))
    with pytest.raises(LmpipeError) as e:
        sweep_best(folder, print_set=True)
    assert str(e.value) == f"{folder / 'sweep.json'}: {message}"


def test_best_reads_a_well_formed_point_and_refuses_a_linked_one(tmp_path, capsys):
    folder = sweep_folder(tmp_path / "sweep", POINT)
    assert sweep_best(folder)[0] == f"optimizer.lr={yaml_value(load_recipe('tiny').optimizer.lr)}"
    elsewhere = tmp_path / "elsewhere"
    os.replace(folder / "runs" / "0000-mup-w32", elsewhere)
    (folder / "runs" / "0000-mup-w32").symlink_to(elsewhere)
    with pytest.raises(LmpipeError) as e:
        sweep_best(folder)
    assert str(e.value) == (
        f"{folder / 'runs' / '0000-mup-w32'}: a symbolic link; a sweep trains its points in real "
        "folders inside it, and --best reads nothing elsewhere"
    )


def test_best_refuses_a_linked_recipe_and_a_point_without_its_objective(tmp_path):
    folder = sweep_folder(tmp_path / "sweep", POINT)
    recipe = folder / "runs" / "0000-mup-w32" / "recipe.yaml"
    elsewhere = tmp_path / "elsewhere.yaml"
    os.replace(recipe, elsewhere)
    recipe.symlink_to(elsewhere)
    with pytest.raises(LmpipeError, match=r"recipe\.yaml: a symbolic link; a sweep trains"):
        sweep_best(folder)
    missing = sweep_folder(
        tmp_path / "missing", {k: v for k, v in POINT.items() if k != "train_loss"}
    )
    with pytest.raises(LmpipeError) as e:
        sweep_best(missing)
    assert str(e.value) == f"{missing / 'sweep.json'}: points[0]: 'train_loss' is missing"


def test_best_takes_a_loss_of_zero(tmp_path):
    folder = sweep_folder(tmp_path / "sweep", {**POINT, "train_loss": 0.0})
    assert sweep_best(folder)[0] == f"optimizer.lr={yaml_value(load_recipe('tiny').optimizer.lr)}"


@pytest.mark.parametrize(
    "summary, message",
    [
        ([], "'summary' is not a JSON object"),
        (None, "'summary' is not a JSON object"),
        ({"tokens": "12abc"}, "'summary.tokens' is '12abc', not a whole number of tokens"),
        ({"tokens": -5}, "'summary.tokens' is -5, not a whole number of tokens"),
    ],
)
def test_scaling_refuses_a_damaged_summary_in_one_line(tmp_path, summary, message):
    runs = [synthetic_run(tmp_path / f"r{t}", t, {"data": 3.0 - t / 4096}) for t in BUDGETS[:3]]
    write_manifest(runs[1], "train", summary=summary)
    with pytest.raises(LmpipeError) as e:
        scaling(runs, tmp_path / "fit")
    assert str(e.value) == f"{runs[1] / 'manifest.json'}: {message}"
    assert not (tmp_path / "fit").exists()


@pytest.mark.parametrize(
    "text, reason",
    [
        ('{"points": [' + "1" * 5000 + "]}", "a number too long to read"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply to read"),
    ],
)
def test_best_refuses_a_sweep_json_python_cannot_parse_in_one_line(tmp_path, text, reason):
    folder = sweep_folder(tmp_path / "sweep", POINT)
    (folder / "sweep.json").write_text(text)
    with pytest.raises(LmpipeError) as e:
        sweep_best(folder, print_set=True)
    assert str(e.value) == f"{folder / 'sweep.json'}: not valid JSON ({reason})"
