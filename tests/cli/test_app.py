"""The CLI stays thin and fast: --help imports no torch; errors are one line with exit status 2."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from lmpipe.cli.app import app

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
