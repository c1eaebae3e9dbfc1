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
