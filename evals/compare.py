"""`lmpipe eval --compare`: several `results.json` side by side, one column per model.

    print_comparison([Path("runs/a/eval"), Path("btlm-3b-8k-base-eval/results.json")])

Each input is a results.json written by `lmpipe eval`, or a folder holding one. Rows are
(task, metric) in the order they first appear; a cell is "value ± stderr", or "-" where that model
has no such task or metric (or its value is null: NaN or infinite when scored). A column is named
after the model's folder; models whose folders share a name are told apart by their paths. When
the models were scored on different item counts of a task, the table says so below it: such
numbers are not comparable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.folders import check_not_newer, is_number
from lmpipe.evals.run import RESULTS

if TYPE_CHECKING:  # for annotations only: imported where the table is built
    from rich.table import Table

MISSING = "-"


@dataclass(frozen=True)
class ScoredModel:
    """One results.json: the model it scored and its per-task results."""

    path: Path  # the results.json
    model: str  # the model's path as eval was given it
    tasks: dict[str, dict[str, Any]]


def read_results(path: Path) -> ScoredModel:
    """A results.json (or the folder holding one), checked to be `lmpipe eval`'s."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS
    if not path.is_file():
        raise LmpipeError(f"{path}: no such file (--compare reads results.json files or folders)")
    check_not_newer(path.parent)  # the eval folder's manifest, beside results.json
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LmpipeError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(report, dict) or not isinstance(report.get("tasks"), dict):
        raise LmpipeError(f"{path}: no 'tasks' object, so not the results.json of `lmpipe eval`")
    # results.json before Hugging Face models could be scored named the model `run_dir`.
    model = report.get("model", report.get("run_dir"))
    if not isinstance(model, str):
        raise LmpipeError(f"{path}: no 'model' path, so not the results.json of `lmpipe eval`")
    for task, result in report["tasks"].items():
        if not isinstance(result, dict):
            raise LmpipeError(f"{path}: tasks.{task} is not an object")
        for name, metric in result.items():
            if not is_metric(metric):
                continue
            for field in ("value", "stderr"):
                number = metric.get(field)
                # A cell would print true as 1.0000 (`is_number`).
                if number is not None and not is_number(number):
                    raise LmpipeError(
                        f"{path}: tasks.{task}.{name}.{field} is {json.dumps(number)}, "
                        "not a number or null"
                    )
    return ScoredModel(path, model, report["tasks"])


def column_names(models: list[ScoredModel]) -> list[str]:
    """The model folders' names; where two coincide, the model paths, then the results paths."""
    names = [Path(m.model).name or m.model for m in models]
    clash = {n for n in names if names.count(n) > 1}
    names = [m.model if n in clash else n for n, m in zip(names, models, strict=True)]
    clash = {n for n in names if names.count(n) > 1}
    return [f"{n} ({m.path})" if n in clash else n for n, m in zip(names, models, strict=True)]


def is_metric(value: Any) -> bool:
    return isinstance(value, dict) and "value" in value


def cell(metric: dict[str, Any] | None) -> str:
    if metric is None or metric.get("value") is None:
        return MISSING
    text = f"{metric['value']:.4f}"
    if metric.get("stderr") is not None:
        text += f" ± {metric['stderr']:.4f}"
    return text


def comparison_rows(models: list[ScoredModel]) -> list[tuple[str, str, list[str]]]:
    """(task, metric, one cell per model) for every metric any model has, in first-seen order."""
    keys: dict[tuple[str, str], None] = {}
    for m in models:
        for task, result in m.tasks.items():
            for metric, value in result.items():
                if is_metric(value):
                    keys[(task, metric)] = None
    return [
        (task, metric, [cell(m.tasks.get(task, {}).get(metric)) for m in models])
        for task, metric in keys
    ]


def count_mismatches(models: list[ScoredModel]) -> list[str]:
    """One note per task whose item counts differ between the models that have it."""
    tasks = dict.fromkeys(t for m in models for t in m.tasks)
    notes = []
    for task in tasks:
        counts = [m.tasks[task].get("n") for m in models if task in m.tasks]
        if len(set(counts)) > 1:
            shown = ", ".join(MISSING if n is None else str(n) for n in counts)
            notes.append(f"{task}: scored on different numbers of items ({shown})")
    return notes


def comparison_table(models: list[ScoredModel]) -> Table:
    from rich.table import Table

    notes = count_mismatches(models)
    table = Table(title="lmpipe eval --compare", caption="\n".join(notes) or None)
    table.add_column("task")
    table.add_column("metric")
    for name in column_names(models):
        table.add_column(name, justify="right")
    for task, metric, cells in comparison_rows(models):
        table.add_row(task, metric, *cells)
    return table


def print_comparison(paths: list[Path]) -> list[ScoredModel]:
    """Read every results file (all errors before any output), print the table; the models read."""
    if not paths:
        raise LmpipeError("--compare needs results.json files (or folders holding one)")
    from rich.console import Console

    models = [read_results(p) for p in paths]
    Console().print(comparison_table(models))
    return models
