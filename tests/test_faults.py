"""Fault injection across the stages: nothing a stage reads is ever touched, nothing read from a
run folder runs code, every bad input is a one-line error (exit 2) naming the file and line, key,
shard or step, or a counted and reported skip, and a killed stage leaves no worker behind.

Each case of issue 8 is here with the classes around it (the other stages with the same guard,
other labels that are not a valid answer, other invalid Unicode)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from unittest.mock import ANY

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lmpipe.cli.app import app
from lmpipe.dataprep.dedup import dedup
from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.folders import partial_path
from tests.train.test_loop import TINY_MODEL

WORDS = "river stone light paper window garden silver market engine winter candle forest".split()


def prose(seed: int, n_words: int = 60) -> str:
    import random

    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def docs(n: int, seed: int = 0) -> list[str]:
    return [json.dumps({"text": prose(seed + i), "id": i}) for i in range(n)]


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` (its relative path) with its sha256: a stage must not change it."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def cli(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *patterns: str) -> str:
    """Exit 2, one `error:` line, no traceback; each regex pattern found in it."""
    import re

    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for pattern in patterns:
        assert re.search(pattern, errors[0]), (pattern, errors[0])
    return errors[0]


@pytest.fixture
def raw(tmp_path) -> Path:
    write_lines(tmp_path / "raw" / "web" / "a.jsonl", docs(6))
    write_lines(tmp_path / "raw" / "books" / "b.jsonl", docs(4, seed=100))
    return tmp_path / "raw"


# --- 1. no stage writes into, or deletes, anything it reads -----------------------------------

OVERLAPS = {
    "is the input folder": lambda raw: raw,
    "contains the input": lambda raw: raw.parent,
    "lies inside the input": lambda raw: raw / "web" / "out",
    "is an input file": lambda raw: raw / "web" / "a.jsonl",
}


@pytest.mark.parametrize("stage", ["dedup", "tokenize"])
@pytest.mark.parametrize("overlap", list(OVERLAPS))
@pytest.mark.parametrize("overwrite", [False, True])
def test_data_stages_refuse_an_output_overlapping_the_input(stage, overlap, overwrite, raw, gpt2):
    before = tree_digest(raw.parent)
    out = OVERLAPS[overlap](raw)
    result = cli(stage, raw, "-o", out, *(["--overwrite"] if overwrite else []))
    assert_one_line_error(result, "which this stage reads")
    assert tree_digest(raw.parent) == before  # not a byte changed, nothing added or deleted


def test_the_partial_work_folder_may_not_be_an_input(raw, gpt2):
    (raw.parent / "tok.partial").mkdir()
    write_lines(raw.parent / "tok.partial" / "c.jsonl", docs(2))
    before = tree_digest(raw.parent)
    result = cli("tokenize", raw.parent / "tok.partial", "-o", raw.parent / "tok")
    assert_one_line_error(result, r"work folder .*tok\.partial")
    assert tree_digest(raw.parent) == before


@pytest.mark.parametrize("stage", ["dedup", "tokenize"])
def test_overwrite_removes_only_its_own_outputs_or_an_empty_folder(stage, raw, tmp_path, gpt2):
    foreign = tmp_path / "mine"
    write_lines(foreign / "notes.txt", ["my own work"])
    result = cli(stage, raw, "-o", foreign, "--overwrite")
    assert_one_line_error(result, r"--overwrite only replaces .* output of `lmpipe " + stage)
    assert (foreign / "notes.txt").read_text() == "my own work\n"

    other = tmp_path / "other"  # an output of the other stage is not this stage's to delete
    other_stage = "tokenize" if stage == "dedup" else "dedup"
    assert cli(other_stage, raw, "-o", other).exit_code == 0
    before = tree_digest(other)
    assert_one_line_error(cli(stage, raw, "-o", other, "--overwrite"), "--overwrite only")
    assert tree_digest(other) == before

    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(stage, raw, "-o", empty, "--overwrite").exit_code == 0
    own = cli(stage, raw, "-o", empty, "--overwrite")  # its own finished output: replaced
    assert own.exit_code == 0 and (empty / "manifest.json").is_file()
    assert not (empty / ".lmpipe-owner").exists()


def test_a_partial_folder_lmpipe_did_not_make_is_left_alone(raw, tmp_path, gpt2):
    out = tmp_path / "tok"
    write_lines(partial_path(out) / "keep.txt", ["someone else's"])
    assert_one_line_error(cli("tokenize", raw, "-o", out), r"tok\.partial: exists and was not made")
    assert (partial_path(out) / "keep.txt").is_file() and not out.exists()


@pytest.mark.parametrize("stage", ["dedup", "tokenize"])
def test_files_an_input_folder_holds_in_another_format_are_named_not_lost(stage, raw, tmp_path, gpt2):  # fmt: skip
    """A `.json.gz` (C4's naming) or `.JSONL` beside the documents is not read as a format it
    may not be, nor dropped without a word: named on stderr and in the manifest."""
    import gzip

    (raw / "web" / "c4-train.00000-of-01024.json.gz").write_bytes(gzip.compress(b"{}\n"))
    (raw / "books" / "upper.JSONL").write_text(docs(1)[0] + "\n")
    result = cli(stage, raw, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "note: 2 file(s) in" in " ".join(result.output.split())
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["skipped_inputs"] == [
        str(raw / "books" / "upper.JSONL"),
        str(raw / "web" / "c4-train.00000-of-01024.json.gz"),
    ]


@pytest.mark.parametrize("stage", ["dedup", "tokenize"])
def test_a_second_run_for_the_same_output_stops_and_leaves_the_first_alone(
    stage, raw, tmp_path, gpt2
):
    """A double launch: the run holding OUT.partial's lock keeps it; the second is one line and
    deletes nothing of the first's (it used to clear the folder under the running one, which
    then published a manifest naming deleted shards)."""
    from lmpipe.dataprep.folders import claim_folder, lock_folder

    out = tmp_path / "out"
    work = partial_path(out)
    with lock_folder(work, stage):  # the first run, mid-way
        claim_folder(work, stage)
        write_lines(work / "part-00000.jsonl", ["the first run's"])
        result = cli(stage, raw, "-o", out)
        assert_one_line_error(result, rf"out\.partial: another `lmpipe {stage}` is writing")
        assert (work / "part-00000.jsonl").read_text() == "the first run's\n"
        assert not out.exists()
    assert cli(stage, raw, "-o", out).exit_code == 0  # the lock ends with its holder
    assert not (out / ".lmpipe-lock").exists() and not work.exists()


def test_overwrite_moves_the_old_output_aside_before_the_new_one_takes_its_name(
    raw, tmp_path, gpt2, monkeypatch
):
    """Killed between the two renames of `--overwrite`: no folder named OUT (never a manifest
    beside missing parts), the old output whole in OUT.replaced; the next run cleans up."""
    from lmpipe.dataprep.folders import replaced_path

    out = tmp_path / "tok"
    assert cli("tokenize", raw, "-o", out).exit_code == 0
    old = tree_digest(out)
    rename = os.replace

    def killed_before_the_new_name(src, dst):
        if Path(dst) == out:
            raise KeyboardInterrupt
        return rename(src, dst)

    monkeypatch.setattr(os, "replace", killed_before_the_new_name)
    assert cli("tokenize", raw, "-o", out, "--overwrite", "--holdout", "0.5").exit_code == 130
    monkeypatch.undo()
    assert not out.exists() and tree_digest(replaced_path(out)) == {**old, ".lmpipe-owner": ANY}
    # its deletion cut short too (the manifest gone first): still the stage's own to delete
    (replaced_path(out) / "manifest.json").unlink()
    assert cli("tokenize", raw, "-o", out, "--holdout", "0.5").exit_code == 0
    assert not replaced_path(out).exists() and not partial_path(out).exists()
    assert json.loads((out / "manifest.json").read_text())["settings"]["holdout"] == 0.5


def test_the_folder_overwrite_uses_is_never_an_input_or_anothers(raw, tmp_path, gpt2):
    aside = tmp_path / "tok.replaced"
    write_lines(aside / "c.jsonl", docs(2))
    before = tree_digest(tmp_path)
    assert_one_line_error(
        cli("tokenize", aside, "-o", tmp_path / "tok"), r"tok\.replaced that --overwrite uses"
    )
    assert_one_line_error(
        cli("tokenize", raw, "-o", tmp_path / "tok"), r"tok\.replaced: exists and was not made"
    )
    assert tree_digest(tmp_path) == before


@pytest.fixture(scope="module")
def model_run(tmp_path_factory) -> Path:
    """A run folder with a saved (untrained) tiny model, as `lmpipe train` leaves one."""
    from lmpipe.train.checkpoint import save_model
    from lmpipe.train.model import GPT
    from lmpipe.train.recipe import load_recipe

    recipe = load_recipe(
        "tiny", ["model.n_layers=1", "model.n_heads=2", "model.d_model=32", "model.d_ff=85"]
    )
    run = tmp_path_factory.mktemp("evalrun") / "run"
    torch.manual_seed(0)
    save_model(GPT(recipe.model), recipe, run / "model")
    (run / "manifest.json").write_text(json.dumps({"stage": "train"}))
    return run


@pytest.fixture
def tasks(tmp_path) -> Path:
    rows = [
        {"goal": f"Goal {i}?", "sol1": "one way", "sol2": "another way", "label": i % 2}
        for i in range(4)
    ]
    write_lines(tmp_path / "tasks" / "piqa" / "validation.jsonl", [json.dumps(r) for r in rows])
    return tmp_path / "tasks"


def test_eval_refuses_an_output_over_the_model_or_its_data(model_run, tasks, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(model_run, run)
    before = tree_digest(run)
    for out in (run, run / "model", run / "model" / "x", tasks / "piqa", tmp_path):
        result = cli("eval", run, "-o", out, "--overwrite", "--tasks", "piqa", "--task-data", tasks)
        assert_one_line_error(result, "which this stage reads")
    assert tree_digest(run) == before
    # the default, beside the model in the run folder, is fine, and so is replacing it
    for _ in range(2):
        result = cli("eval", run, "--tasks", "piqa", "--task-data", tasks, "--overwrite")
        assert result.exit_code == 0, result.output
    assert (run / "eval" / "results.json").is_file()
    assert {k: v for k, v in tree_digest(run).items() if not k.startswith("eval/")} == before


def test_train_refuses_a_run_folder_over_its_data(pattern_tokens, tmp_path):
    data = tmp_path / "tokens"
    shutil.copytree(pattern_tokens, data)
    before = tree_digest(data)
    for run_dir in (data, data / "run", tmp_path):
        result = cli("train", "--recipe", "tiny", "--data", data, "--run-dir", run_dir)
        assert_one_line_error(result, "run folder", "which this stage reads")
    assert tree_digest(data) == before


def test_a_second_train_in_a_running_run_folder_is_one_line(pattern_tokens, tmp_path):
    """A requeued or double-submitted `--resume` while the first attempt still runs: refused
    before it writes anything (it would checkpoint over the first run); the lock ends with the
    run that holds it."""
    from lmpipe.dataprep.folders import lock_folder

    run_dir = tmp_path / "run"
    args = ["train", "--recipe", "tiny", "--data", pattern_tokens, "--run-dir", run_dir]
    args += ["--set", "stages=[{seq_len: 64, tokens: 2048}]", "--set", "tokens_per_step=1024"]
    args += ["--set", "micro_batch_tokens=512", "--set", "schedule.warmup_tokens=1024"]
    with lock_folder(run_dir, "train"):  # the first attempt, running
        before = tree_digest(run_dir)
        assert_one_line_error(cli(*args, "--resume"), r"run: another `lmpipe train` is writing")
        assert tree_digest(run_dir) == before
    assert cli(*args, "--resume").exit_code == 0
    assert (run_dir / "manifest.json").is_file()


def test_inspect_decode_never_writes_into_the_folder_or_over_a_file(pattern_tokens, tmp_path):
    data = tmp_path / "tokens"
    shutil.copytree(pattern_tokens, data)
    before = tree_digest(data)
    assert_one_line_error(
        cli("inspect", data, "--decode", data / "docs.jsonl"), "which this stage reads"
    )
    assert tree_digest(data) == before
    existing = write_lines(tmp_path / "docs.jsonl", ["mine"])
    assert_one_line_error(cli("inspect", data, "--decode", existing), "already exists")
    assert existing.read_text() == "mine\n"


def test_demo_overwrite_never_deletes_a_folder_it_did_not_make(tmp_path):
    home = tmp_path / "home"
    write_lines(home / "thesis.txt", ["years of work"])
    assert_one_line_error(cli("demo", "--workdir", home, "--overwrite"), "choose another --workdir")
    assert (home / "thesis.txt").read_text() == "years of work\n"
    # nor a running demo's (it holds its folder): --overwrite from another shell is one line
    from lmpipe.dataprep.folders import claim_folder, lock_folder

    running = tmp_path / "demo"
    with lock_folder(running, "demo"):
        claim_folder(running, "demo")
        write_lines(running / "raw" / "a.jsonl", ["the running demo's"])
        result = cli("demo", "--workdir", running, "--overwrite")
        assert_one_line_error(result, r"demo: another `lmpipe demo` is writing to it")
        assert (running / "raw" / "a.jsonl").is_file()


# --- 2. nothing read from a run folder runs code ----------------------------------------------


class Payload:
    """Pickles as a call of exec that leaves a file behind: proof that code ran on loading."""

    def __init__(self, proof: Path):
        self.proof = proof

    def __reduce__(self):
        return (exec, (f"open({str(self.proof)!r}, 'w').write('ran')",))


SMALL = [
    *TINY_MODEL,
    "tokens_per_step=512",
    "micro_batch_tokens=256",
    "stages.0.tokens=2048",
    "stages.1.seq_len=128",
    "stages.1.tokens=1024",
    "schedule.warmup_tokens=512",
    "checkpoint_every_tokens=2048",
]


@pytest.fixture(scope="module")
def checkpointed(pattern_tokens, tmp_path_factory) -> Path:
    """A run stopped after 4 steps, with a finished checkpoint at step 4."""
    from lmpipe.train.loop import train
    from lmpipe.train.recipe import load_recipe

    run = tmp_path_factory.mktemp("ckpt") / "run"
    train(load_recipe("tiny", SMALL), pattern_tokens, run, stop_after_steps=4)
    return run


def resume(run: Path, data: Path):
    from lmpipe.train.loop import train
    from lmpipe.train.recipe import load_recipe

    return train(load_recipe("tiny", SMALL), data, run, resume=True, stop_after_steps=1)


def plant(path: Path, proof: Path) -> None:
    """Add a code-running object to a checkpoint file (read here with the full unpickler: the
    test trusts the file it just wrote)."""
    state = torch.load(path, weights_only=False)
    state["planted"] = Payload(proof)
    torch.save(state, path)


def rehash(step_dir: Path) -> None:
    """What a careful attacker does too: make the marker's checksums match the tampered files."""
    from lmpipe.train.checkpoint import MARKER, checkpoint_files

    marker = json.loads((step_dir / MARKER).read_text())
    marker["files"] = {
        name: hashlib.sha256((step_dir / name).read_bytes()).hexdigest()
        for name in checkpoint_files(step_dir)
    }
    (step_dir / MARKER).write_text(json.dumps(marker))


@pytest.mark.parametrize("target", ["mp_rank_00_model_states.pt", "optim_states.pt"])
@pytest.mark.parametrize("rehashed", [False, True])
def test_a_planted_pickle_in_a_checkpoint_never_runs(
    target, rehashed, checkpointed, pattern_tokens, tmp_path
):
    run = tmp_path / "run"
    shutil.copytree(checkpointed, run)
    step_dir = run / "checkpoints" / "step00000004"
    (path,) = [p for p in step_dir.iterdir() if p.name.endswith(target)]
    proof = tmp_path / "pwned"
    plant(path, proof)
    if rehashed:
        rehash(step_dir)
    with pytest.raises(LmpipeError) as err:
        resume(run, pattern_tokens)
    message = str(err.value)
    assert "\n" not in message and "step00000004" in message
    if rehashed:  # checksums agree, so the weights-only unpickler is what refuses it
        assert "would unpickle exec, which lmpipe does not allow" in message
    else:
        assert "sha256 differs" in message
    assert not proof.exists()


def test_corrupt_incomplete_or_unlisted_checkpoint_files_are_refused(
    checkpointed, pattern_tokens, tmp_path
):
    cases = {
        "flipped byte": lambda d: flip_byte(d / "mp_rank_00_model_states.pt"),
        "truncated": lambda d: truncate(d / "mp_rank_00_model_states.pt"),
        "extra file": lambda d: (d / "extra.pt").write_bytes(b"x"),
        "missing file": lambda d: (d / "mp_rank_00_model_states.pt").unlink(),
        "marker without checksums": lambda d: (d / "lmpipe.json").write_text(
            '{"step": 4, "tokens": 2048}'
        ),
        "marker not JSON": lambda d: (d / "lmpipe.json").write_text("{"),
    }
    expected = {
        "flipped byte": "sha256 differs",
        "truncated": "sha256 differs",
        "extra file": "extra.pt: is not listed in lmpipe.json",
        "missing file": "is missing but listed",
        "marker without checksums": "written by an lmpipe from before 2026-11-30",
        "marker not JSON": "not a checkpoint marker",
    }
    for name, damage in cases.items():
        run = tmp_path / name.replace(" ", "_")
        shutil.copytree(checkpointed, run)
        damage(run / "checkpoints" / "step00000004")
        with pytest.raises(LmpipeError, match=expected[name]) as err:
            resume(run, pattern_tokens)
        assert "\n" not in str(err.value), name


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def test_a_checkpoint_recipe_with_python_tags_is_refused(checkpointed, pattern_tokens, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(checkpointed, run)
    proof = tmp_path / "pwned"
    evil = f"!!python/object/apply:os.system ['touch {proof}']\n"
    (run / "checkpoints" / "step00000004" / "recipe.yaml").write_text(evil)
    with pytest.raises(LmpipeError, match="not valid YAML"):
        resume(run, pattern_tokens)
    assert not proof.exists()


def test_a_planted_model_pt_is_refused_by_eval(model_run, tasks, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(model_run, run)
    proof = tmp_path / "pwned"
    plant(run / "model" / "model.pt", proof)
    result = cli("eval", run, "--tasks", "piqa", "--task-data", tasks)
    assert_one_line_error(
        result, r"model\.pt: unreadable", "would unpickle exec, which lmpipe does not allow"
    )
    assert not proof.exists() and not (run / "eval").exists()


def test_a_resume_from_a_verified_checkpoint_still_works(checkpointed, pattern_tokens, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(checkpointed, run)
    marker = json.loads((run / "checkpoints" / "step00000004" / "lmpipe.json").read_text())
    assert marker["step"] == 4 and "mp_rank_00_model_states.pt" in marker["files"]
    assert "recipe.yaml" in marker["files"]
    summary = resume(run, pattern_tokens)
    assert summary["steps"] == 5 and summary["steps_this_call"] == 1


# --- 3. invalid Unicode: counted, or an error naming the file and line ------------------------

SURROGATES = {
    "lone high": r'{"text": "PROSE \ud800 end"}',
    "lone low": r'{"text": "PROSE \udc00 end"}',
    "reversed pair": r'{"text": "PROSE \udc00\ud800 end"}',
    "in another field": r'{"text": "PROSE", "meta": {"title": "\udbff"}}',
    "in a key": r'{"text": "PROSE", "\ud800": 1}',
}


@pytest.mark.parametrize("case", list(SURROGATES))
@pytest.mark.parametrize("stage", ["dedup", "tokenize"])
def test_lone_surrogates_are_counted_or_fatal_with_strict(case, stage, tmp_path, gpt2):
    bad = SURROGATES[case].replace("PROSE", prose(7))
    src = write_lines(tmp_path / "in" / "a.jsonl", [docs(1)[0], bad, docs(1, seed=50)[0]])
    result = cli(stage, src, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    (entry,) = manifest["inputs"]
    assert entry["invalid"] == 1 and "surrogate" in entry["invalid_examples"][0]
    assert entry["invalid_examples"][0].startswith("line 2:")
    assert "warning:" in result.output and "surrogate" in result.output
    strict = cli(stage, src, "-o", tmp_path / "strict", "--strict")
    assert_one_line_error(strict, r"a\.jsonl:2: .*lone surrogate")
    assert not (tmp_path / "strict").exists() and not partial_path(tmp_path / "strict").exists()


def test_lone_surrogate_in_eval_data_is_counted(tmp_path):
    src = write_lines(tmp_path / "in" / "a.jsonl", docs(3))
    evals = write_lines(
        tmp_path / "evals.jsonl", [r'{"text": "q \ud800"}', json.dumps({"text": "ok"})]
    )
    m = dedup([src], tmp_path / "out", decontaminate=[evals], progress=False)
    assert m["decontaminate"][0]["invalid"] == 1
    assert "surrogate" in m["decontaminate"][0]["invalid_examples"][0]


# --- 4. eval labels that are no answer --------------------------------------------------------

BAD_LABELS = [
    ("piqa", {"goal": "g", "sol1": "a", "sol2": "b"}, "label", [True, False, 1.7, 1.0, 5, -1, 2, "x", "1.0", None, [0]]),
    ("boolq", {"passage": "p", "question": "q"}, "label", [True, 0.0, 2, -1, "yes"]),
    ("social_iqa", {"context": "c", "question": "q", "answerA": "a", "answerB": "b", "answerC": "c"}, "label", ["0", "4", 0, 4, "1.5", True]),
    ("winogrande", {"sentence": "A _ b.", "option1": "x", "option2": "y"}, "answer", ["0", "3", 3, "", True]),
    ("arc_easy", {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}}, "answerKey", ["C", "", 1, None]),
    ("openbookqa", {"question_stem": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}}, "answerKey", ["E", 0]),
]  # fmt: skip
TASK_FILES = {
    "piqa": "piqa/validation.jsonl",
    "boolq": "boolq/validation.jsonl",
    "social_iqa": "social_iqa/validation.jsonl",
    "winogrande": "winogrande/validation.jsonl",
    "arc_easy": "arc_easy/test.jsonl",
    "openbookqa": "openbookqa/test.jsonl",
}


@pytest.mark.parametrize(
    "task, row, field, value",
    [(t, r, f, v) for t, r, f, values in BAD_LABELS for v in values],
    ids=lambda x: json.dumps(x) if not isinstance(x, dict) else "row",
)
def test_a_gold_label_that_is_not_a_choice_names_file_and_line(task, row, field, value, tmp_path):
    from lmpipe.evals.tasks import EXTERNAL_TASKS, load_items

    good = {**row, field: {"label": 0, "answer": "1", "answerKey": "A"}[field]}
    if task == "social_iqa":
        good[field] = "1"
    path = write_lines(
        tmp_path / TASK_FILES[task], [json.dumps(good), json.dumps({**row, field: value})]
    )
    assert len(load_items(EXTERNAL_TASKS[task], tmp_path, limit=1)) == 1  # the good row scores
    with pytest.raises(LmpipeError, match=rf"{TASK_FILES[task]}:2: {field} is ") as err:
        load_items(EXTERNAL_TASKS[task], tmp_path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_hellaswag_gold_line_out_of_range_names_the_line(tmp_path):
    import bz2

    from lmpipe.evals.tasks import EXTERNAL_TASKS, load_items

    item = ["ctx: a man", "1", "e1", "e2", "e3", "e4"]
    bad = ["ctx: a woman", "4", "e1", "e2", "e3", "e4"]
    path = tmp_path / "hellaswag" / "hellaswag_val_full.txt.bz2"
    path.parent.mkdir()
    path.write_bytes(bz2.compress(("\n".join(item + bad) + "\n").encode()))
    with pytest.raises(
        LmpipeError, match=r"hellaswag_val_full\.txt\.bz2:8: the gold line is \"4\""
    ):
        load_items(EXTERNAL_TASKS["hellaswag"], tmp_path)


def test_a_bad_label_through_the_cli_is_one_line_and_no_output(model_run, tasks, tmp_path):
    rows = (tasks / "piqa" / "validation.jsonl").read_text().splitlines()
    rows[2] = json.dumps({**json.loads(rows[2]), "label": True})
    write_lines(tasks / "piqa" / "validation.jsonl", rows)
    out = tmp_path / "e"
    result = cli("eval", model_run, "-o", out, "--tasks", "piqa", "--task-data", tasks)
    assert_one_line_error(result, r"validation\.jsonl:3: label is true, not an integer label")
    assert not out.exists() and not partial_path(out).exists()


# --- 5. killing a multi-process stage kills its workers ---------------------------------------


def children_of(pid: int) -> set[int]:
    """Every descendant of `pid` (Linux /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# In every process of the killed dedup (the CLI and its spawned workers, which import no test
# code): a file's scan marks its worker as started, then waits a minute, so a worker that only
# noticed its parent's death at the end of its task would outlive the test's one-second deadline.
SLOW_SCAN = """
import functools, os, time
from pathlib import Path
import lmpipe.dataprep.dedup_steps as steps
scan_file = steps.scan_file
@functools.wraps(scan_file)  # pickled by its name: the workers look up this wrapper
def slow(*args):
    (Path(os.environ["LMPIPE_TEST_STARTED"]) / str(os.getpid())).touch()
    time.sleep(60)
    return scan_file(*args)
steps.scan_file = slow
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_kill_9_of_dedup_leaves_no_worker_running(tmp_path):
    for f in range(2):
        write_lines(tmp_path / "raw" / f"{f}.jsonl", docs(5, seed=10 * f))
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SLOW_SCAN)
    started = tmp_path / "started"
    started.mkdir()
    slowed = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]),
        "LMPIPE_TEST_STARTED": str(started),
    }
    cmd = [sys.executable, "-m", "lmpipe.cli", "dedup", str(tmp_path / "raw"), "-o", str(tmp_path / "out"), "-j", "2"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=slowed, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    every: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while len(list(started.iterdir())) < 2:  # both workers inside a file's scan
            assert proc.poll() is None, "dedup ended before it could be killed"
            assert time.monotonic() < deadline, "the workers did not start scanning in 120 s"
            time.sleep(0.05)
        every = children_of(proc.pid)
        assert {int(p.name) for p in started.iterdir()} <= every
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and any(alive(p) for p in every):
            time.sleep(0.05)
        assert not [p for p in every if alive(p)], "processes outlived the killed dedup"
    finally:
        # the workers too: once the CLI is dead they are no longer its children
        for p in {proc.pid} | {p for p in every if alive(p)}:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    # the rerun (not slowed) resumes what the killed one left and finishes
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert (tmp_path / "out" / "manifest.json").is_file()


# --- 6. the smaller cases ---------------------------------------------------------------------


def test_a_source_named_total_keeps_its_own_counts(tmp_path):
    write_lines(tmp_path / "raw" / "total" / "a.jsonl", docs(3))
    write_lines(tmp_path / "raw" / "web" / "b.jsonl", docs(2, seed=10))
    m = dedup([tmp_path / "raw"], tmp_path / "out", progress=False)
    assert m["counts"]["sources"]["total"]["input"]["documents"] == 3
    assert m["counts"]["sources"]["web"]["input"]["documents"] == 2
    assert m["counts"]["total"]["input"]["documents"] == 5


@pytest.mark.parametrize("stage", ["dedup", "tokenize"])
def test_blank_lines_are_counted_and_reported(stage, tmp_path, gpt2):
    src = write_lines(tmp_path / "a.jsonl", [docs(1)[0], "", "   ", docs(1, seed=3)[0], "\t"])
    result = cli(stage, src, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["inputs"][0]["blank_lines"] == 3 and m["inputs"][0]["invalid"] == 0
    assert "3 blank line(s)" in result.output


def test_a_utf8_byte_order_mark_on_the_first_line_is_not_a_bad_line(tmp_path):
    from lmpipe.dataprep.documents import InvalidLines, read_documents

    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(docs(2)).encode() + b"\n")
    invalid = InvalidLines()
    assert len(list(read_documents(path, strict=False, invalid=invalid))) == 2
    assert invalid.count == 0


@pytest.mark.parametrize("stage", ["dedup", "tokenize"])
def test_the_same_file_given_twice_is_an_error(stage, raw, tmp_path, gpt2):
    file = raw / "web" / "a.jsonl"
    assert_one_line_error(cli(stage, file, file, "-o", tmp_path / "o1"), r"a\.jsonl: given twice")
    assert_one_line_error(
        cli(stage, raw, file, "-o", tmp_path / "o2"), r"a\.jsonl: given as .*raw and as .*a\.jsonl"
    )
    link = tmp_path / "link.jsonl"
    link.symlink_to(file)
    assert_one_line_error(cli(stage, file, link, "-o", tmp_path / "o3"), "name each input once")


def test_a_recipe_key_given_twice_is_refused(tmp_path):
    from lmpipe.train.recipe import recipe_source

    _, text = recipe_source("tiny")
    path = tmp_path / "r.yaml"
    path.write_text(text.replace("  lr: 1.2e-2\n", "  lr: 1.2e-2\n  lr: 6.0e-3\n"))
    result = cli("train", "--recipe", path, "--dry-run")
    assert_one_line_error(result, r"r\.yaml: .*key 'lr' appears twice .* lines \d+ and \d+")
    assert_one_line_error(
        cli("train", "--recipe", "tiny", "--dry-run", "--set", "seed=[1"),
        "--set seed: not a YAML value",
    )


def test_resume_without_a_checkpoint_says_so(tmp_path, capsys):
    from lmpipe.train.loop import resume_from

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "lo')
    assert resume_from(None, tmp_path / "run", rank=0, world=1) == 0
    assert "no finished checkpoint" in capsys.readouterr().err
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == ""  # steps from 1 again


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path):
    from lmpipe.train.run_folder import trim_metrics

    rows = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 4, "lo')
    trim_metrics(tmp_path, 2)
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(rows[:2]) + "\n"


def test_the_run_folder_message_tells_a_run_from_an_unrelated_folder(pattern_tokens, tmp_path):
    from lmpipe.train.recipe import load_recipe
    from lmpipe.train.run_folder import check_run_dir

    recipe = load_recipe("tiny", SMALL)
    unrelated = tmp_path / "photos"
    write_lines(unrelated / "cat.jpg", ["x"])
    for resume_flag in (False, True):
        with pytest.raises(
            LmpipeError, match=r"photos: not empty and holds no lmpipe run \(cat\.jpg\)"
        ):
            check_run_dir(unrelated, [pattern_tokens], recipe, resume_flag)
    earlier = tmp_path / "earlier"
    write_lines(earlier / "metrics.jsonl", ['{"step": 1}'])
    with pytest.raises(LmpipeError, match="holds files of an earlier run; pass --resume"):
        check_run_dir(earlier, [pattern_tokens], recipe, False)
    check_run_dir(earlier, [pattern_tokens], recipe, True)  # resuming it is fine


def corrupt_token(folder: Path, split: str, offset: int, value: int) -> Path:
    """Overwrite one token of a shard in place (same size; the sha256 no longer matches)."""
    path = folder / f"{split}-00000.bin"
    tokens = np.fromfile(path, dtype="<u2")
    tokens[offset] = value
    tokens.tofile(path)
    return path


def test_out_of_vocabulary_ids_name_the_shard_and_offset(pattern_tokens, tmp_path):
    from lmpipe.dataprep.loader import WindowLoader
    from lmpipe.dataprep.shards import TokenShards

    data = tmp_path / "tokens"
    shutil.copytree(pattern_tokens, data)
    path = corrupt_token(data, "train", 1000, 60000)
    shards = TokenShards(data, "train", verify=False)
    with pytest.raises(LmpipeError, match=rf"{path.name}: token id 60000 at token offset 1000 is outside the vocabulary"):  # fmt: skip
        shards.tokens(900, 1100)
    with pytest.raises(LmpipeError, match="token offset 1000"):
        for _ in WindowLoader(shards, seed=1).batches(seq_len=64, global_batch=512, region_start=0, n_batches=1):  # fmt: skip
            pass
    with pytest.raises(LmpipeError, match="outside the vocabulary"):
        list(shards.documents())
    with pytest.raises(LmpipeError, match="sha256 differs"):  # what --verify-data catches first
        TokenShards(data, "train", verify=True)


@pytest.mark.slow
def test_training_with_no_verify_data_stops_at_a_bad_id_with_the_shard(pattern_tokens, tmp_path):
    data = tmp_path / "tokens"
    shutil.copytree(pattern_tokens, data)
    path = data / "train-00000.bin"
    np.full(path.stat().st_size // 2, 65535, dtype="<u2").tofile(path)  # every id out of range
    result = cli(
        "train", "--recipe", "tiny", "--data", data, "--run-dir", tmp_path / "run",
        "--no-verify-data", *[f"--set={s}" for s in SMALL],
    )  # fmt: skip
    assert_one_line_error(
        result, r"train-00000\.bin: token id 65535 at token offset \d+ is outside"
    )


# --- one huge document ------------------------------------------------------------------------

MEASURE = textwrap.dedent(
    """
    import resource, sys
    from pathlib import Path
    from lmpipe.dataprep.dedup import dedup
    dedup([Path(sys.argv[1])], Path(sys.argv[2]), progress=False)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """
)


def peak_rss_kb(src: Path, out: Path) -> int:
    done = subprocess.run([sys.executable, "-c", MEASURE, str(src), str(out)], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


@pytest.mark.slow
def test_dedup_memory_on_one_huge_document_is_a_small_multiple_of_it(tmp_path):
    import random

    rng = random.Random(0)
    vocab = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(5000)]  # fmt: skip
    text = " ".join(rng.choices(vocab, k=3_300_000))  # ~20 MB, one line
    big = write_lines(tmp_path / "big.jsonl", [json.dumps({"text": text})])
    small = write_lines(tmp_path / "small.jsonl", [json.dumps({"text": text[:5000]})])
    grown = peak_rss_kb(big, tmp_path / "o1") - peak_rss_kb(small, tmp_path / "o2")
    # measured: ~4x; before long texts were read, normalised and hashed a piece at a time, ~35x
    assert grown * 1024 < 6 * len(text), (grown, len(text))


# --- paths and files a careless user gives (found by a review of the guards) ------------------


@pytest.mark.parametrize("name", ["new/..", ".", "/"])
def test_an_output_not_named_by_its_last_part_is_refused(
    name, raw, model_run, pattern_tokens, tmp_path, monkeypatch
):
    victim = tmp_path / "victim"
    write_lines(victim / "precious.txt", ["mine"])
    before = tree_digest(victim)
    monkeypatch.chdir(victim)  # "." is the victim
    out = name if name in ("/", ".") else str(victim / name)
    for args in (
        ("dedup", raw, "-o", out),
        ("tokenize", raw, "-o", out),
        ("eval", model_run, "-o", out, "--tasks", "piqa", "--task-data", tmp_path),
        ("train", "--recipe", "tiny", "--data", pattern_tokens, "--run-dir", out),
        ("demo", "--workdir", out, "--overwrite"),
    ):
        assert_one_line_error(cli(*args), "name the .* itself")
    assert tree_digest(victim) == before and sorted(p.name for p in victim.iterdir()) == ["precious.txt"]  # fmt: skip


def test_an_output_under_a_file_is_one_line(raw, pattern_tokens, tmp_path, gpt2):
    afile = write_lines(tmp_path / "afile", ["x"])
    for args in (
        ("tokenize", raw, "-o", afile / "sub"),
        ("dedup", raw, "-o", afile / "sub"),
        ("train", "--recipe", "tiny", "--data", pattern_tokens, "--run-dir", afile / "sub"),
        ("inspect", pattern_tokens, "--decode", afile / "x.jsonl"),
    ):
        assert_one_line_error(cli(*args), r"afile is a file")
    assert_one_line_error(cli("inspect", pattern_tokens, "--decode", tmp_path / "no" / "x.jsonl"), "no folder")  # fmt: skip


def test_a_link_inside_an_input_folder_into_the_output_is_refused(raw, tmp_path):
    out = tmp_path / "clean"
    assert cli("dedup", raw / "web", "-o", out).exit_code == 0
    inputs = tmp_path / "in2"
    write_lines(inputs / "new.jsonl", docs(3, seed=70))
    (inputs / "old.jsonl.zst").symlink_to(out / "part-00000.jsonl.zst")
    before = tree_digest(out)
    assert_one_line_error(cli("dedup", inputs, "-o", out, "--overwrite"), "which this stage reads")
    assert tree_digest(out) == before


def test_a_partial_folder_with_a_manifest_but_no_owner_is_left_alone(raw, tmp_path, gpt2):
    work = tmp_path / "tok.partial"
    write_lines(work / "notes.txt", ["mine"])
    (work / "manifest.json").write_text('{"stage": "tokenize"}')
    assert_one_line_error(cli("tokenize", raw, "-o", tmp_path / "tok"), "was not made by")
    assert (work / "notes.txt").is_file()


def test_decode_never_writes_over_a_partial_file_or_through_a_link(pattern_tokens, tmp_path):
    mine = write_lines(tmp_path / "out.jsonl.partial", ["mine"])
    assert_one_line_error(cli("inspect", pattern_tokens, "--decode", tmp_path / "out.jsonl"), r"out\.jsonl\.partial: exists")  # fmt: skip
    target = write_lines(tmp_path / "target.txt", ["also mine"])
    (tmp_path / "o2.jsonl.partial").symlink_to(target)
    assert_one_line_error(cli("inspect", pattern_tokens, "--decode", tmp_path / "o2.jsonl"), "exists")  # fmt: skip
    assert mine.read_text() == "mine\n" and target.read_text() == "also mine\n"
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "o2.jsonl").exists()


@pytest.mark.parametrize("state", ["no step", "step not an int", "a list", "module a list"])
def test_a_rehashed_checkpoint_of_the_wrong_shape_is_one_line(
    state, checkpointed, pattern_tokens, tmp_path
):
    run = tmp_path / "run"
    shutil.copytree(checkpointed, run)
    step_dir = run / "checkpoints" / "step00000004"
    path = step_dir / "mp_rank_00_model_states.pt"
    sd = torch.load(path, weights_only=False)
    if state == "no step":
        del sd["step"]
    elif state == "step not an int":
        sd["step"] = "abc"
    elif state == "a list":
        sd = [1, 2, 3]
    else:
        sd["module"] = [1]
    torch.save(sd, path)
    rehash(step_dir)
    with pytest.raises(LmpipeError) as err:
        resume(run, pattern_tokens)
    assert "step00000004" in str(err.value) and "\n" not in str(err.value)


def test_a_model_pt_of_the_wrong_shape_is_one_line(model_run, tasks, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(model_run, run)
    torch.save([1, 2], run / "model" / "model.pt")
    result = cli("eval", run, "--tasks", "piqa", "--task-data", tasks)
    assert_one_line_error(result, r"model\.pt: unreadable or does not match")


def test_files_that_are_not_utf8_are_one_line(raw, model_run, tasks, checkpointed, pattern_tokens, tmp_path):  # fmt: skip
    recipe = tmp_path / "bad.yaml"
    recipe.write_bytes(b"name: tiny\n\xff\xfe\n")
    assert_one_line_error(cli("train", "--recipe", recipe, "--dry-run"), r"bad\.yaml: not UTF-8")
    out = tmp_path / "old"
    out.mkdir()
    (out / "manifest.json").write_bytes(b'{"stage": "dedup"}\xff')
    assert_one_line_error(cli("dedup", raw, "-o", out, "--overwrite"), "--overwrite only")
    rows = (tasks / "piqa" / "validation.jsonl").read_bytes().splitlines()
    rows[1] = rows[1].replace(b"Goal 1?", b"Goal \xff?")
    (tasks / "piqa" / "validation.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    result = cli("eval", model_run, "-o", tmp_path / "e", "--tasks", "piqa", "--task-data", tasks)
    assert_one_line_error(result, r"validation\.jsonl:2: not a JSON line")
    run = tmp_path / "run"
    shutil.copytree(checkpointed, run)
    (run / "checkpoints" / "step00000004" / "recipe.yaml").write_bytes(b"name: tiny\n\xff\n")
    with pytest.raises(LmpipeError, match="not UTF-8"):
        resume(run, pattern_tokens)


def test_task_rows_of_the_wrong_type_and_a_bad_bz2_are_one_line(tmp_path):
    from lmpipe.evals.tasks import EXTERNAL_TASKS, load_items

    cases = {
        "winogrande": {"sentence": 123, "option1": "a", "option2": "b", "answer": "1"},
        "lambada_openai": {"text": 5},
        "arc_easy": {
            "question": "q",
            "choices": {"text": ["a", "b"], "label": ["A", "B", "C"]},
            "answerKey": "C",
        },  # fmt: skip
    }
    for task, row in cases.items():
        spec = EXTERNAL_TASKS[task]
        write_lines(tmp_path / spec.path, [json.dumps(row)])
        with pytest.raises(LmpipeError, match=rf"{spec.path}:1: ") as err:
            load_items(spec, tmp_path)
        assert "\n" not in str(err.value)
    spec = EXTERNAL_TASKS["hellaswag"]
    (tmp_path / spec.path).parent.mkdir(parents=True)
    (tmp_path / spec.path).write_bytes(b"not bz2 at all")
    with pytest.raises(LmpipeError, match="not bz2-compressed"):
        load_items(spec, tmp_path)


def test_a_folder_with_foreign_files_is_no_run_even_with_some_run_names(pattern_tokens, tmp_path):
    from lmpipe.train.recipe import load_recipe
    from lmpipe.train.run_folder import check_run_dir

    folder = tmp_path / "mine"
    write_lines(folder / "recipe.yaml", ["# my own notes"])
    write_lines(folder / "notes.txt", ["x"])
    (folder / "logs").mkdir()
    with pytest.raises(LmpipeError, match="holds no lmpipe run"):
        check_run_dir(folder, [pattern_tokens], load_recipe("tiny", SMALL), True)


def test_a_hard_link_to_an_input_is_the_same_file(raw, tmp_path, gpt2):
    file = raw / "web" / "a.jsonl"
    link = tmp_path / "hard.jsonl"
    os.link(file, link)
    assert_one_line_error(cli("tokenize", file, link, "-o", tmp_path / "o"), "name each input once")
