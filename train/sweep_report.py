"""A sweep's results: one row per point, read from its run folder, and what is written of them.

`point_row` reads a point's run folder (manifest summary, metrics.jsonl, plan.json) and the
sweep's record of it: final training loss, held-out loss (the mean over the sources'
`val_loss` of the last validation, scored at the end of the point), tokens, parameters, training
FLOPs, wall seconds (start-up included) and the training loop's own seconds, and whether the
point diverged (a non-finite loss at any step; its losses are then null). `write_report` writes
`sweep.json` (the plan's settings, every row and the optimum of each group), `sweep.csv` (one line
a point) and `sweep.png` (the objective against each swept value, one curve per group, each
curve's optimum starred, diverged points as crosses on the top edge; with matplotlib).

The objective is the held-out loss when the points have one (the data has a held-out split),
else the final training loss. A group is the points of one parametrisation, width and density.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.folders import is_finished, read_json, read_manifest, write_json_atomic
from lmpipe.train.run_folder import metrics_rows
from lmpipe.train.sweep import POINTS, RUNS, diverged
from lmpipe.train.sweep_plan import Point

JSON, CSV, PNG = "sweep.json", "sweep.csv", "sweep.png"
NO_PLOT = f"no {PNG}: matplotlib is not installed (pip install 'lmpipe[plot]')"


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and math.isfinite(x) else None


def point_row(work: Path, point: Point) -> dict[str, Any]:
    """Everything the sweep reports of one point."""
    run_dir = work / RUNS / point.name
    summary = read_manifest(run_dir, "train")["summary"] if is_finished(run_dir) else {}
    rows = metrics_rows(run_dir)
    record_path = work / POINTS / f"{point.name}.json"
    record = read_json(record_path) if record_path.is_file() else {}
    plan = read_json(run_dir / "plan.json")
    validated = [r["val_loss"] for r in rows if r.get("val_loss")]
    val_loss = {k: _finite(v) for k, v in (validated[-1] if validated else {}).items()}
    heldout = None
    if val_loss and all(v is not None for v in val_loss.values()):
        heldout = sum(val_loss.values()) / len(val_loss)  # type: ignore[arg-type]
    bad = diverged(rows) or bool(record.get("stopped"))  # the guard stopped it: a loss spike
    return {
        "point": point.name,
        "param": point.param,
        "width": point.width,
        "density": point.density,
        "values": point.values,
        "set": list(point.overrides),
        "run_dir": f"{RUNS}/{point.name}",
        "finished": bool(summary.get("finished")),
        "diverged": bad,
        "train_loss": None if bad or not rows else _finite(rows[-1].get("loss")),
        "heldout_loss": None if bad else heldout,
        "val_loss": val_loss,
        "tokens": rows[-1]["tokens"] if rows else 0,
        "parameters": plan["parameters"],
        "flops": plan["flops"],
        "seconds": record.get("seconds"),
        "train_seconds": summary.get("seconds_this_call"),
        "stopped": record.get("stopped"),
    }


def objective_of(rows: list[dict[str, Any]]) -> str:
    return "heldout_loss" if any(r["heldout_loss"] is not None for r in rows) else "train_loss"


def group_of(row: dict[str, Any]) -> str:
    density = f" rho {row['density']:g}" if row["density"] != 1 else ""
    return f"{row['param']} w{row['width']}{density}"


def optimum(rows: list[dict[str, Any]], objective: str) -> list[dict[str, Any]]:
    """Per group, in the order of the points: the best point (None when every point diverged)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(group_of(row), []).append(row)
    result = []
    for group, members in groups.items():
        scored = [r for r in members if r[objective] is not None]
        best = min(scored, key=lambda r: r[objective]) if scored else None
        result.append({
            "group": group,
            "param": members[0]["param"],
            "width": members[0]["width"],
            "density": members[0]["density"],
            "points": len(members),
            "diverged": sum(r["diverged"] for r in members),
            "best": best["point"] if best else None,
            "values": best["values"] if best else None,
            objective: best[objective] if best else None,
        })  # fmt: skip
    return result


def write_report(work: Path, plan: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """sweep.json, sweep.csv and (with matplotlib) sweep.png into `work`; sweep.json's content."""
    objective = objective_of(rows)
    report = {
        "recipe": plan["recipe"],
        "set": plan["set"],
        "data": plan["data"],
        "keys": plan["keys"],
        "objective": objective,
        "points": rows,
        "optimum": optimum(rows, objective),
    }
    write_json_atomic(work / JSON, report)
    write_csv(work / CSV, report)
    from rich.console import Console

    if objective == "train_loss":
        Console(stderr=True).print(
            "sweep: no point has a held-out loss (the data has no held-out split of a window's "
            "length); the points are compared on their final training loss",
            highlight=False,
        )
    if not write_png(work / PNG, report):
        Console(stderr=True).print(NO_PLOT, markup=False)
    return report


def read_report(folder: Path) -> dict[str, Any]:
    """sweep.json of a finished sweep folder; a one-line error for anything else."""
    read_manifest(folder, "sweep")
    try:
        report = read_json(Path(folder) / JSON)
    except OSError as e:
        raise LmpipeError(f"{Path(folder) / JSON}: unreadable ({e.strerror or e})") from None
    if not isinstance(report, dict) or not isinstance(report.get("points"), list):
        raise LmpipeError(f"{Path(folder) / JSON}: not a sweep's results")
    return report


CSV_TAIL = (
    "train_loss",
    "heldout_loss",
    "tokens",
    "parameters",
    "flops",
    "seconds",
    "train_seconds",
    "diverged",
    "finished",
)


def write_csv(path: Path, report: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["point", "param", "width", "density", *report["keys"], *CSV_TAIL])
        for r in report["points"]:
            values = [r["values"].get(k) for k in report["keys"]]
            tail = ["" if r[c] is None else r[c] for c in CSV_TAIL]
            writer.writerow([r["point"], r["param"], r["width"], r["density"], *values, *tail])


def print_optimum(report: dict[str, Any]) -> None:
    """The best point of each group, as a table on stdout."""
    from rich.console import Console
    from rich.table import Table

    from lmpipe.dataprep.report import print_table

    objective = report["objective"]
    table = Table(title=f"sweep optimum per group ({objective.replace('_', ' ')})")
    for col in ("group", "best point", "values", objective.replace("_", " "), "diverged"):
        table.add_column(col, justify="right" if col in ("diverged",) else "left", no_wrap=True)
    for g in report["optimum"]:
        values = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in (g["values"] or {}).items()
        )
        loss = "-" if g[objective] is None else f"{g[objective]:.4f}"
        table.add_row(
            g["group"], g["best"] or "-", values or "-", loss, f"{g['diverged']} of {g['points']}"
        )
    print_table(Console(), table)


def _axes(report: dict[str, Any]) -> list[str]:
    """What the panels plot against: every swept key, or the width when only shapes vary."""
    return list(report["keys"]) or ["width"]


def write_png(path: Path, report: dict[str, Any]) -> bool:
    """One panel per swept key: the objective of every point against its value, a curve per
    group through the lowest value at each x, its optimum starred; diverged points as crosses
    on the top edge. False (and no file) without matplotlib."""
    try:
        from matplotlib import colormaps
        from matplotlib.figure import Figure
    except ImportError:
        return False
    objective, rows = report["objective"], report["points"]
    axes = _axes(report)
    fig = Figure(figsize=(max(6.4, 4.6 * len(axes)), 4.0), dpi=100)
    groups = list(dict.fromkeys(group_of(r) for r in rows))
    cmap = colormaps["viridis"]
    scores = [r[objective] for r in rows if r[objective] is not None]
    top = max(scores) if scores else 1.0
    bottom = min(scores) if scores else 0.0
    ceiling = top + 0.08 * max(top - bottom, 1e-3)  # where diverged points are drawn
    for k, key in enumerate(axes):
        ax = fig.add_subplot(1, len(axes), k + 1)
        xs_all = [_x(r, key) for r in rows]
        numeric = all(isinstance(x, int | float) for x in xs_all)
        labels = sorted({str(x) for x in xs_all}) if not numeric else []

        def position(x: Any, numeric: bool = numeric, labels: list[str] = labels) -> float:
            return float(x) if numeric else float(labels.index(str(x)))

        for g, group in enumerate(groups):
            color = cmap(g / max(len(groups) - 1, 1))
            members = [r for r in rows if group_of(r) == group]
            good = [r for r in members if r[objective] is not None]
            lowest: dict[float, float] = {}
            for r in good:
                x = position(_x(r, key))
                lowest[x] = min(lowest.get(x, math.inf), r[objective])
            xs = sorted(lowest)
            ax.plot(xs, [lowest[x] for x in xs], color=color, lw=1.2, marker=".", label=group)
            ax.scatter(
                [position(_x(r, key)) for r in good], [r[objective] for r in good], color=color, s=8
            )
            if good:
                best = min(good, key=lambda r: r[objective])
                ax.scatter(
                    [position(_x(best, key))],
                    [best[objective]],
                    color=color,
                    marker="*",
                    s=140,
                    edgecolors="black",
                    zorder=3,
                )
            bad = [position(_x(r, key)) for r in members if r[objective] is None]
            if bad:
                ax.scatter(bad, [ceiling] * len(bad), color="crimson", marker="x", s=40, zorder=3)
        xs_num = [position(x) for x in xs_all]
        if numeric and min(xs_num) > 0 and max(xs_num) / min(xs_num) >= 4:
            ax.set_xscale("log", base=2)
        if not numeric:
            ax.set_xticks(range(len(labels)), labels)
        ax.set_ylim(bottom - 0.05 * max(top - bottom, 1e-3), ceiling + 0.05 * max(top - bottom, 1e-3))  # fmt: skip
        ax.set_xlabel(key)
        ax.set_ylabel(objective.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        if k == 0:
            ax.legend(fontsize=7)
    n_bad = sum(r[objective] is None for r in rows)
    fig.suptitle(
        f"lmpipe sweep {report['recipe']}: {len(rows)} points"
        + (f", {n_bad} diverged (x, top)" if n_bad else "")
        + "; * optimum per group",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    return True


def _x(row: dict[str, Any], key: str) -> Any:
    return row["width"] if key == "width" else row["values"][key]
