"""A sweep's results: one row per point, read from its run folder, and what is written of them.

`point_row` reads a point's run folder (manifest summary, metrics.jsonl, plan.json) and the
sweep's record of it: final training loss, held-out loss (the mean over the sources'
`val_loss` of the last validation, scored at the end of the point), tokens, parameters, training
FLOPs, wall seconds (start-up included) and the training loop's own seconds, and whether the
point diverged (a non-finite loss at any step; its losses are then null). `write_report` writes
`sweep.json` (the plan's settings, every row and the optimum of each group), `sweep.csv` (one line
a point) and `sweep.png` (the objective against each swept value, one curve per group, each
curve's optimum starred, diverged points as crosses above the curves in their group's colour;
with matplotlib, and a failure to draw it is a warning, never a lost sweep).

The objective is the held-out loss when the points have one (the data has a held-out split),
else the final training loss. A group is the points of one parametrisation, width and density.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.figures import LITERAL, draw_picture, literal_legend
from lmpipe.dataprep.folders import is_finished, read_json, read_manifest, write_json_atomic
from lmpipe.train.run_folder import metrics_rows
from lmpipe.train.sweep import POINTS, RUNS, diverged
from lmpipe.train.sweep_plan import Point

JSON, CSV, PNG = "sweep.json", "sweep.csv", "sweep.png"


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
    """Held-out loss where the points were validated (a diverged point's is null, but its
    `val_loss` names the sources scored), else the final training loss."""
    validated = any(r["heldout_loss"] is not None or r["val_loss"] for r in rows)
    return "heldout_loss" if validated else "train_loss"


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
    write_png(work / PNG, report)
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


def check_complete(folder: Path, report: dict[str, Any]) -> None:
    """Refuse, in one line, a published sweep with a point that neither finished nor diverged
    (nor was stopped by the guard, which counts as diverged): today a sweep is published only
    when every point is done, but an lmpipe before 2026-12-07 (4858d50) published one whose
    point a SIGTERM had stopped, as if its other points were the whole sweep."""
    for row in report["points"]:
        if isinstance(row, dict) and row.get("finished") is False and not row.get("diverged"):
            raise LmpipeError(
                f"{folder}: point {row.get('point')} stopped before its end, yet the sweep was "
                "published (an lmpipe before 2026-12-07 did so after a SIGTERM), so its results "
                "are incomplete; rerun the sweep command with --overwrite to train its points again"
            )


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
    """One panel per swept key: the objective of every point against its value (ticks at the
    swept values), a curve per group through the lowest value at each x, its optimum starred;
    diverged points as crosses above the curves, in their group's colour, a row per group (with
    a count where one cross stands for several points). False (and no file) without matplotlib
    or when drawing fails, one line on stderr saying which: the sweep is complete without it."""
    return draw_picture(path, lambda png: _draw_png(png, report))


MAX_VALUE_TICKS = 12  # swept values labelled on the x axis; more: the axis's own ticks


def _draw_png(path: Path, report: dict[str, Any]) -> None:
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    objective, rows = report["objective"], report["points"]
    axes = _axes(report)
    fig = Figure(figsize=(max(6.4, 4.6 * len(axes)), 4.0), dpi=100)
    groups = list(dict.fromkeys(group_of(r) for r in rows))
    cmap = colormaps["viridis"]
    scores = [r[objective] for r in rows if r[objective] is not None]
    top = max(scores) if scores else 1.0
    bottom = min(scores) if scores else 0.0
    pad = 0.05 * max(top - bottom, 1e-3)
    # Diverged points have no objective: each group's on its own row above the curves.
    ceiling = [top + (1.6 + g) * pad for g in range(len(groups))]
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
            bad: dict[float, int] = {}
            for r in members:
                if r[objective] is None:
                    x = position(_x(r, key))
                    bad[x] = bad.get(x, 0) + 1
            if bad:
                y = ceiling[g]
                ax.scatter(list(bad), [y] * len(bad), color=color, marker="x", s=40, zorder=3)
                for x, n in bad.items():
                    if n > 1:
                        ax.annotate(
                            f"{n}", (x, y), xytext=(4, 1), textcoords="offset points",
                            fontsize=7, color=color,
                        )  # fmt: skip
        xs_num = sorted({position(x) for x in xs_all})
        if numeric and xs_num[0] > 0 and xs_num[-1] / xs_num[0] >= 4:
            ax.set_xscale("log", base=2)
        if numeric and len(xs_num) <= MAX_VALUE_TICKS:
            # a grid's values as ticks, not powers of two between them; a random search's values
            # (one a point) keep the axis's own ticks, which would otherwise overlap
            ax.xaxis.set_minor_locator(NullLocator())
            many = len(xs_num) > 6
            ax.set_xticks(
                xs_num, [f"{x:g}" for x in xs_num],
                rotation=45 if many else 0, ha="right" if many else "center",
            )  # fmt: skip
        elif not numeric:
            ax.set_xticks(range(len(labels)), labels, **LITERAL)
        ax.set_ylim(bottom - pad, (ceiling[-1] if ceiling else top) + pad)
        ax.set_xlabel(key, **LITERAL)
        ax.set_ylabel(objective.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        if k == 0:
            literal_legend(ax, fontsize=7)
    n_bad = sum(r[objective] is None for r in rows)
    fig.suptitle(
        f"lmpipe sweep {report['recipe']}: {len(rows)} points"
        + (f", {n_bad} diverged (x, top)" if n_bad else "")
        + "; * optimum per group",
        fontsize=9,
        **LITERAL,
    )
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})


def _x(row: dict[str, Any], key: str) -> Any:
    return row["width"] if key == "width" else row["values"][key]
