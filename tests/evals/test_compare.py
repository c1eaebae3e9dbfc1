"""`lmpipe eval --compare`: results side by side, a cell per model, "-" where a model has none."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lmpipe.cli.app import app
from lmpipe.dataprep.errors import LmpipeError
from lmpipe.evals.compare import column_names, comparison_rows, print_comparison, read_results
from lmpipe.evals.run import evaluate


def write_results(path, model, tasks):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": model, "model_format": "hf", "tasks": tasks}))
    return path


@pytest.fixture
def two_results(run_dir, task_data, tmp_path):
    """A real `evaluate` of the tiny run, and a hand-made results.json of another model that has
    a task the first lacks, lacks acc_norm, and holds a null value."""
    real = evaluate(run_dir, tmp_path / "a", tasks=["arc_easy"], data=None, task_data=task_data, limit=5)  # fmt: skip
    other = write_results(
        tmp_path / "b" / "results.json",
        "/models/btlm-3b-8k-base",
        {
            "arc_easy": {"acc": {"value": 0.6709, "stderr": 0.0096}, "n": 2376},
            "lambada_openai": {
                "perplexity": {"value": None, "stderr": None},
                "acc": {"value": 0.6623, "stderr": None},
                "n": 5153,
            },
        },
    )
    return real, tmp_path / "a", other


def test_cells_hold_each_models_value_and_stderr(two_results):
    real, folder, other = two_results
    models = [read_results(folder), read_results(other)]
    assert column_names(models) == ["run", "btlm-3b-8k-base"]
    arc = real["tasks"]["arc_easy"]
    ours = {m: f"{arc[m]['value']:.4f} ± {arc[m]['stderr']:.4f}" for m in ("acc", "acc_norm")}
    assert comparison_rows(models) == [
        ("arc_easy", "acc", [ours["acc"], "0.6709 ± 0.0096"]),
        ("arc_easy", "acc_norm", [ours["acc_norm"], "-"]),
        ("lambada_openai", "perplexity", ["-", "-"]),
        ("lambada_openai", "acc", ["-", "0.6623"]),
    ]


def test_the_printed_table_and_its_note_on_item_counts(two_results, capsys):
    _, folder, other = two_results
    print_comparison([folder, other])
    printed = capsys.readouterr().out
    assert "btlm-3b-8k-base" in printed and "0.6709 ± 0.0096" in printed
    assert "arc_easy: scored on different numbers of items (5, 2376)" in printed


def test_models_with_one_folder_name_are_told_apart(tmp_path):
    tasks = {"piqa": {"acc": {"value": 0.5, "stderr": 0.1}, "n": 10}}
    a = write_results(tmp_path / "a" / "results.json", "runs/x/model", tasks)
    b = write_results(tmp_path / "b" / "results.json", "other/x/model", tasks)
    c = write_results(tmp_path / "c" / "results.json", "other/x/model", tasks)
    names = column_names([read_results(p) for p in (a, b, c)])
    assert names == ["runs/x/model", f"other/x/model ({b})", f"other/x/model ({c})"]


def test_cli_compare(two_results):
    _, folder, other = two_results
    result = CliRunner().invoke(
        app, ["eval", "--compare", str(folder), str(other)], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert "0.6709 ± 0.0096" in result.output and "lambada_openai" in result.output


def test_bad_inputs_are_one_line_errors(tmp_path, two_results):
    _, folder, _ = two_results
    with pytest.raises(LmpipeError, match="nope: no such file"):
        read_results(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmpipeError, match="empty/results.json: no such file"):
        read_results(tmp_path / "empty")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(LmpipeError, match="bad.json: not a JSON file"):
        read_results(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"model": "m"}')
    with pytest.raises(LmpipeError, match="other.json: no 'tasks' object"):
        read_results(tmp_path / "other.json")
    result = CliRunner().invoke(app, ["eval", "--compare", str(folder), str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: {tmp_path / 'nope'}: no such file (--compare reads results.json files or folders)"
    ]
    two = CliRunner().invoke(app, ["eval", str(folder), str(folder)])
    assert two.exit_code == 2 and "one model to evaluate, got 2" in two.output


def test_a_metric_that_is_not_a_number_names_file_task_and_metric(tmp_path, two_results):
    """A string (or true, which Python would print as 1.0000) where a number belongs is one line
    naming where it is; null stays a "-" cell."""
    _, folder, _ = two_results
    for field, value in (("value", "0.5"), ("value", True), ("stderr", "0.1"), ("value", [1])):
        metric = {"value": 0.5, "stderr": None, field: value}
        path = write_results(tmp_path / "cmpbad" / "results.json", "m", {"a": {"acc": metric}})
        with pytest.raises(LmpipeError) as error:
            read_results(path)
        message = str(error.value)
        assert message == (
            f"{path}: tasks.a.acc.{field} is {json.dumps(value)}, not a number or null"
        )
        result = CliRunner().invoke(app, ["eval", "--compare", str(path), str(folder)])
        assert result.exit_code == 2 and result.output.strip() == f"error: {message}"
    fine = {"acc": {"value": 1, "stderr": None}, "ppl": {"value": None, "stderr": None}}
    path = write_results(tmp_path / "ok" / "results.json", "m", {"a": fine})
    assert comparison_rows([read_results(path)]) == [("a", "acc", ["1.0000"]), ("a", "ppl", ["-"])]
