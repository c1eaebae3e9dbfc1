"""The CLI stays thin and fast: --help imports no torch; errors are one line with exit status 2."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from lmpipe.cli.app import app
from lmpipe.dataprep.errors import LmpipeError

runner = CliRunner()


def test_help_is_fast_and_imports_no_heavy_module():
    code = (
        "import sys; from lmpipe.cli.app import app; from typer.testing import CliRunner; "
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
        "heavy = [m for m in ('torch', 'deepspeed', 'datasketch', 'tiktoken') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_command_documents_every_option():
    for command in ("dedup", "tokenize", "inspect", "train", "eval", "demo"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0
        assert "--help" in result.output


def test_dry_run_prints_btlm_numbers_without_training():
    result = runner.invoke(
        app, ["train", "--recipe", "btlm3b", "--dry-run"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert "2,646,255,744" in result.output
    assert "3,932,160" in result.output
    assert "119,727" in result.output and "39,909" in result.output


def test_recipe_error_is_one_line_exit_2():
    result = runner.invoke(
        app, ["train", "--recipe", "tiny", "--set", "model.n_heads=3", "--dry-run"]
    )
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: tiny.yaml: model")
    assert len(result.output.strip().splitlines()) == 1


def test_train_needs_data_unless_dry_run():
    result = runner.invoke(app, ["train", "--recipe", "tiny"])
    assert result.exit_code == 2 and "--data" in result.output


def one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_missing_input_and_empty_folder_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    for command in ("dedup", "tokenize"):
        missing = runner.invoke(app, [command, str(tmp_path / "nope"), "-o", str(tmp_path / "out")])
        one_line_error(missing, str(tmp_path / "nope"), "no such file or folder")
        empty = runner.invoke(app, [command, str(tmp_path / "empty"), "-o", str(tmp_path / "out")])
        one_line_error(empty, str(tmp_path / "empty"), "holds no")
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_train_on_a_missing_or_unfinished_data_folder(tmp_path):
    (tmp_path / "tokens").mkdir()
    unfinished = runner.invoke(
        app,
        [
            "train",
            "--recipe",
            "tiny",
            "--data",
            str(tmp_path / "tokens"),
            "--run-dir",
            str(tmp_path / "run"),
        ],
    )
    one_line_error(unfinished, "tokens", "unfinished")


def test_eval_of_a_folder_without_a_model(tmp_path):
    one_line_error(runner.invoke(app, ["eval", str(tmp_path)]), "needs --data")
    result = runner.invoke(
        app, ["eval", str(tmp_path), "--tasks", "arc_easy", "--task-data", str(tmp_path)]
    )
    one_line_error(result, str(tmp_path), "no trained model")


def test_train_flag_surface_stays_small():
    """STYLE.md: few first-class flags; everything else is a recipe value set with --set."""
    import typer.main

    command = typer.main.get_command(app).commands["train"]
    flags = sorted(
        opt
        for p in command.params
        for opt in [*p.opts, *getattr(p, "secondary_opts", [])]
        if opt.startswith("--")
    )
    assert flags == [
        "--data",
        "--dry-run",
        "--gpu-memory",  # --dry-run's memory check
        "--init-from",
        "--no-verify-data",
        "--peak-tflops",  # the GPU's, for MFU: hardware, not recipe
        "--recipe",
        "--resume",
        "--run-dir",
        "--set",
        "--verify-data",
        "--world-size",  # --dry-run's plan for a launcher's world
    ]


def test_train_accepts_the_deepspeed_launchers_local_rank():
    result = runner.invoke(app, ["--local_rank=1", "train", "--recipe", "tiny", "--dry-run"])
    assert result.exit_code == 0, result.output
    # the flag is read and set aside (the rank comes from LOCAL_RANK): the same plan as without it
    plain = runner.invoke(app, ["train", "--recipe", "tiny", "--dry-run"])
    assert "64 steps, 131,072 tokens" in result.output and result.output == plain.output


def commands():
    """Every command, `mup`'s included, as (name, click command)."""
    import typer.main

    for name, command in typer.main.get_command(app).commands.items():
        subcommands = getattr(command, "commands", {})
        yield from ((f"{name} {sub}", c) for sub, c in subcommands.items())
        if not subcommands:
            yield name, command


def test_help_lists_each_command_on_one_line_whose_sentence_ends():
    """A summary wrapped by hand broke the `lmpipe --help` rows in mid-sentence (eval, export,
    import, sweep, scaling, plot, mup coord-check)."""
    listings = {
        "": runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).output,
        "mup": runner.invoke(app, ["mup", "--help"], env={"COLUMNS": "200"}).output,
    }
    for name, command in commands():
        summary = command.help.split("\n\n")[0]
        assert "\n" not in summary and len(summary) <= 100 and summary.endswith("."), name
        group, _, short = name.rpartition(" ")
        rows = [line for line in listings[group].splitlines() if line.startswith(f"│ {short} ")]
        assert len(rows) == 1 and summary in rows[0], (name, rows)


def test_usage_lines_name_arguments_as_the_help_texts_do():
    names = {
        name: [p.metavar for p in command.params if p.param_type_name == "argument"]
        for name, command in commands()
    }
    assert {name: metavars for name, metavars in names.items() if metavars} == {
        "dedup": ["INPUT"],
        "tokenize": ["INPUT"],
        "inspect": ["FOLDER"],
        "eval": ["MODEL"],
        "generate": ["MODEL"],
        "export": ["RUN_DIR"],
        "import": ["HF_DIR"],
        "sweep": ["FOLDER"],
        "scaling": ["RUN_DIR"],
        "plot": ["RUN_DIR"],
    }


def option(command_name: str, flag: str):
    """A command's option by a flag, or its argument by name."""
    command = dict(commands())[command_name]
    return next(p for p in command.params if flag in (p.name, *p.opts, *p.secondary_opts))


def test_shared_options_are_described_once():
    from lmpipe.cli.stage import RECIPE_HELP
    from lmpipe.evals.run import HELDOUT_TASKS

    for name in ("train", "mup coord-check", "sweep", "scaling"):
        assert option(name, "--recipe").help.endswith(RECIPE_HELP), name
        assert option(name, "--set").help == option("train", "--set").help, name
    assert option("generate", "model").help in option("eval", "model").help
    assert all(task in option("eval", "--data").help for task in HELDOUT_TASKS)


@pytest.fixture
def stage_calls(monkeypatch):
    """Replace a stage function with one that records its arguments and stops the command."""

    def replace(module: str, name: str) -> list:
        calls = []

        def record(*args, **kwargs):
            calls.append((args, kwargs))
            raise LmpipeError("recorded")

        monkeypatch.setattr(importlib.import_module(module), name, record)
        return calls

    return replace


def invoke_recorded(args: list[str], calls: list):
    result = runner.invoke(app, args)
    assert (result.exit_code, result.output) == (2, "error: recorded\n"), (args, result.output)
    return calls.pop()


def test_renamed_flags_keep_their_first_spelling(stage_calls, tmp_path):
    """One name per concept across commands; the old spelling stays an alias for scripts."""
    tokenize = stage_calls("lmpipe.dataprep.tokenize", "tokenize")
    for flag in ("--holdout-seed", "--seed"):  # as dedup's --holdout-seed
        _, kwargs = invoke_recorded(["tokenize", "in.jsonl", "-o", "out", flag, "7"], tokenize)
        assert kwargs["seed"] == 7
    inspect = stage_calls("lmpipe.dataprep.inspection", "inspect_shards")
    assert invoke_recorded(["inspect", "tokens"], inspect)[1]["verify"] is True
    for flag in ("--no-verify-data", "--no-verify"):  # as train's --verify-data
        assert invoke_recorded(["inspect", "tokens", flag], inspect)[1]["verify"] is False
    sweep = stage_calls("lmpipe.train.sweep", "sweep")
    base = ["sweep", "--recipe", "tiny", "--data", str(tmp_path), "-o", str(tmp_path / "o")]
    for flag in ("-j", "--jobs", "--workers"):  # as dedup's and tokenize's -j/--workers
        (settings, *_), _ = invoke_recorded([*base, flag, "3"], sweep)
        assert settings.jobs == 3
    generate = stage_calls("lmpipe.train.generate", "generate")
    for flag in ("--alibi-scale", "--alibi-scaling"):  # as eval's --alibi-scale
        (settings,), _ = invoke_recorded(["generate", "run", "--prompt", "x", flag, "4"], generate)
        assert settings.alibi_scaling == "4"


def test_param_has_one_grammar_in_coord_check_and_sweep(stage_calls, tmp_path):
    check = stage_calls("lmpipe.train.coord_check", "coord_check")
    sweep = stage_calls("lmpipe.train.sweep", "sweep")
    cc = ["mup", "coord-check", "--recipe", "tiny", "-o", str(tmp_path / "cc")]
    sw = ["sweep", "--recipe", "tiny", "--data", str(tmp_path), "-o", str(tmp_path / "sw")]
    expected = {
        "both": ("mup", "sp"),
        "mup,sp": ("mup", "sp"),
        "sp": ("sp",),
        "mup-uncorrected,sp": ("mup-uncorrected", "sp"),
        "mup,both": ("mup", "sp"),  # each once: a repeat would train the same points twice
        "sp,mup,sp": ("sp", "mup"),
    }
    for text, params in expected.items():
        assert invoke_recorded([*cc, "--param", text], check)[0][0].params == params, text
        assert invoke_recorded([*sw, "--param", text], sweep)[0][0].params == params, text
    assert invoke_recorded(cc, check)[0][0].params == ("mup", "sp")  # coord-check's default: both


def test_param_and_list_errors_read_alike_in_both_commands(tmp_path):
    cc = ["mup", "coord-check", "--recipe", "tiny", "-o", str(tmp_path / "cc")]
    sw = ["sweep", "--recipe", "tiny", "--data", str(tmp_path), "-o", str(tmp_path / "sw")]
    for base in (cc, sw):
        result = runner.invoke(app, [*base, "--param", "mup,xp"])
        assert (result.exit_code, result.output) == (2, "error: --param: mup, mup-uncorrected, sp (got xp)\n")  # fmt: skip
        result = runner.invoke(app, [*base, "--widths", "64,x"])
        assert (result.exit_code, result.output) == (2, "error: --widths '64,x': comma-separated integers\n")  # fmt: skip
    assert not (tmp_path / "cc").exists() and not (tmp_path / "sw").exists()


def test_tokenize_names_its_flags_in_errors(tmp_path):
    base = ["tokenize", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out")]
    cases = {
        "--shard-tokens 0: at least 1": ["--shard-tokens", "0"],
        "-j 0: at least 1": ["-j", "0"],
        "--holdout 1.5: between 0 and 1": ["--holdout", "1.5"],
        "--holdout-seed -1: 0 or more": ["--holdout-seed", "-1"],
    }
    for message, args in cases.items():
        result = runner.invoke(app, [*base, *args])
        assert (result.exit_code, result.output) == (2, f"error: {message}\n"), args


def test_scaling_out_is_required_by_the_parser():
    assert option("scaling", "-o").required
    result = runner.invoke(app, ["scaling", "--family", "--recipe", "tiny", "--sizes", "64"])
    assert result.exit_code == 2 and "Missing option '-o'" in result.output


def test_cli_defaults_are_the_stages_defaults():
    """The CLI writes its defaults as literals (importing the stages' modules would load numpy,
    pydantic or torch for `lmpipe --help`); this keeps the two from drifting apart."""
    import dataclasses
    import inspect

    missing = (dataclasses.MISSING, inspect.Parameter.empty)

    from lmpipe.dataprep.tokenize import tokenize
    from lmpipe.train.coord_check import CoordCheck
    from lmpipe.train.generate import GenerateSettings
    from lmpipe.train.sweep_plan import SweepSettings

    def fields(cls):
        return {f.name: f.default for f in dataclasses.fields(cls) if f.default not in missing}

    stages = {
        "tokenize": {
            n: p.default
            for n, p in inspect.signature(tokenize).parameters.items()
            if p.default not in missing
        },
        "generate": {**fields(GenerateSettings), "alibi_scale": None, "prompts": None},
        "mup coord-check": fields(CoordCheck),
        "sweep": fields(SweepSettings),
    }
    for name, defaults in stages.items():
        compared = 0
        for param in dict(commands())[name].params:
            if param.name in defaults:
                # a list option's None is the stage's empty tuple
                expected = defaults[param.name]
                assert param.default == expected or (param.default is None and expected == ()), (
                    name,
                    param.name,
                )
                compared += 1
        assert compared >= 4, name


def test_a_stage_started_with_stdout_closed_succeeds_and_says_nothing(tmp_path):
    """`>&-` (Python's stdout None): the stage published its output, then the report's flush
    failed with a traceback and exit 1. Now the report goes to /dev/null."""
    import json
    import os

    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(5))
    )
    out = subprocess.run(
        [sys.executable, "-m", "lmpipe.cli", "tokenize", "in.jsonl", "-o", "tok"],
        cwd=tmp_path, stdout=None, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: os.close(1),
    )  # fmt: skip
    assert (out.returncode, out.stderr) == (0, "")
    manifest = json.loads((tmp_path / "tok" / "manifest.json").read_text())
    assert manifest["stage"] == "tokenize" and manifest["totals"]["documents"] == 5


def test_a_closed_stdout_is_filled_for_child_processes_too(tmp_path):
    """A sweep's workers are children: they too must start with a stdout (their own flush failed
    under `lmpipe sweep -j 2 >&-`), so the /dev/null in its place is inheritable."""
    import os

    code = (
        "import subprocess, sys\n"
        "from lmpipe.cli.app import fill_closed_streams\n"
        "fill_closed_streams()\n"
        "child = 'import sys; sys.stderr.write(str(sys.stdout is None))'\n"
        "subprocess.run([sys.executable, '-c', child], check=True)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], stdout=None, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: os.close(1),
    )  # fmt: skip
    assert (out.returncode, out.stderr) == (0, "False")
