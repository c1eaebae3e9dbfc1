"""`lmpipe sweep FOLDER --best`: muP transfer of a sweep's best point to a wider model's recipe.

Under muP the tuned values are the base model's (seeds-spec 1.3): eta_base (`optimizer.lr`),
sigma_base, alpha_in and alpha_out (`model.mup.*`); the width multipliers derive every wider
layer's rate, init and output scale from them. So the transfer moves exactly those four values,
from the best point's recipe (its run folder's recipe.yaml) into the target recipe, and
`schedule.end_lr` with the rate (the target's end_lr / lr ratio kept); every shape, the
schedule's length, the batch and the data stay the target's.

The best point is the lowest objective (held-out loss, else final training loss) among the muP
points that finished without diverging; SP points are left out, their values do not transfer.
A sweep published with a point that neither finished nor diverged (an lmpipe before 2026-12-07
published one after a SIGTERM) is refused: its best point would be the best of the others only.
sweep.json is checked first (`check_report`): a key missing or of another type is one line, and
a point's recipe is read only from `runs/<point>/`, a real folder inside the sweep.
The target must be a muP recipe with the sweep's base width (`mup.d_model_base`): the values are
relative to it. The default target is the recipe the sweep trained, as its plan recorded it (its
text: the file may have been edited since, and a relative path would be read from another
folder). Written: a recipe file (`--write-recipe`) that `lmpipe train --recipe FILE`
takes as it is, or the same values as `--set` options (`--print-set`).
"""

from __future__ import annotations

import math
import re
import reprlib
from pathlib import Path
from typing import Any

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.folders import (
    check_output,
    is_finished,
    is_int,
    partial_path,
    read_json,
    write_text_atomic,
)
from lmpipe.train.metrics import number
from lmpipe.train.recipe import Recipe, load_recipe, parse_recipe, recipe_source, recipe_yaml
from lmpipe.train.sweep import PLAN, RUNS
from lmpipe.train.sweep_plan import yaml_value
from lmpipe.train.sweep_report import JSON, check_complete, read_report

# The base values muP transfers (seeds-spec 1.3); schedule.end_lr follows optimizer.lr.
BASE_VALUES = ("optimizer.lr", "model.mup.sigma_base", "model.mup.alpha_in", "model.mup.alpha_out")
# The second line of a recipe file `--best` writes: how `--overwrite` knows the file is its own.
BEST_MARK = "# (lmpipe sweep --best)"


# What `best_point` and `sweep_best` read of each point of sweep.json, as `sweep_report.point_row`
# writes it (the objective's key too: a finite number, or null for no score).
POINT_KEYS = {
    "point": ("a name", lambda v: isinstance(v, str)),
    "param": ("a name", lambda v: isinstance(v, str)),
    "width": ("an integer", is_int),
    "density": ("a number", lambda v: number(v) is not None),
    "finished": ("true or false", lambda v: isinstance(v, bool)),
    "diverged": ("true or false", lambda v: isinstance(v, bool)),
    "run_dir": ("a path", lambda v: isinstance(v, str)),
}
OBJECTIVES = ("heldout_loss", "train_loss")


def check_report(path: Path, report: dict[str, Any]) -> None:
    """A one-line error naming sweep.json (`path`) and the key, for a report `sweep_best` would
    trip on. A point's `run_dir` must be `runs/<point>`, where the sweep trained it: nothing
    outside the sweep folder is read."""
    objective = report.get("objective")
    if objective not in OBJECTIVES:
        raise LmpipeError(
            f"{path}: 'objective' is {reprlib.repr(objective)}, not {' or '.join(OBJECTIVES)}"
        )
    for i, row in enumerate(report["points"]):
        where = f"{path}: points[{i}]"
        if not isinstance(row, dict):
            raise LmpipeError(f"{where} is not a point (a JSON object)")
        if objective not in row:
            raise LmpipeError(f"{where}: {objective!r} is missing")
        score = row[objective]
        value = number(score)
        if score is not None and (value is None or not math.isfinite(value)):
            raise LmpipeError(
                f"{where}: {objective!r} is {reprlib.repr(score)}, not a finite number or null"
            )
        for key, (what, valid) in POINT_KEYS.items():
            if not valid(row.get(key)):
                raise LmpipeError(f"{where}: {key!r} is {reprlib.repr(row.get(key))}, not {what}")
        point = row["point"]
        if point in (".", "..") or not re.fullmatch(r"[\w.+-]+", point):
            raise LmpipeError(
                f"{where}: 'point' is {reprlib.repr(point)}, not a sweep point's name"
            )
        if row["run_dir"] != f"{RUNS}/{point}":
            raise LmpipeError(
                f"{where}: 'run_dir' is {reprlib.repr(row['run_dir'])}, not {RUNS}/{point}: a "
                "sweep trains each point inside its folder, and --best reads nothing elsewhere"
            )


def best_point(report: dict[str, Any]) -> dict[str, Any]:
    """The row of the best transferable point of a sweep's results (checked by `check_report`)."""
    objective = report["objective"]
    rows = [
        r
        for r in report["points"]
        if r["param"] == "mup" and r["finished"] and not r["diverged"] and r[objective] is not None
    ]
    if not rows:
        n = len(report["points"])
        raise LmpipeError(
            f"sweep of {report.get('recipe')}: none of its {n} points is a finished muP point "
            "without divergence, so there are no base values to transfer"
        )
    return min(rows, key=lambda r: r[objective])


def swept_recipe(folder: Path, report: dict[str, Any]) -> tuple[str, str]:
    """(label, text) of the recipe the sweep in `folder` trained, as its plan recorded it; a
    sweep of an lmpipe from before 2026-12-07 recorded only its name or path (sweep.json's
    `recipe`), read again as that lmpipe read it."""
    try:
        plan = read_json(folder / PLAN)
    except (OSError, LmpipeError):
        plan = None
    if isinstance(plan, dict) and isinstance(plan.get("recipe_text"), str):
        return str(plan.get("recipe_path") or plan.get("recipe")), plan["recipe_text"]
    if isinstance(report.get("recipe"), str):
        return recipe_source(report["recipe"])
    raise LmpipeError(f"{folder}: records no recipe; name the recipe to transfer to with --target")


def transfer_sets(best: Recipe, target: Recipe) -> list[str]:
    """`--set` options that give `target` the base values of `best` (muP transfer)."""
    if best.model.mup is None or target.model.mup is None:
        which = "the best point" if best.model.mup is None else f"target {target.name}"
        raise LmpipeError(f"{which} has no muP base shapes (model.mup is null): nothing transfers")
    if best.model.mup.d_model_base != target.model.mup.d_model_base:
        raise LmpipeError(
            f"target {target.name}: mup.d_model_base {target.model.mup.d_model_base:g} differs from "
            f"the sweep's {best.model.mup.d_model_base:g}; base values belong to their base width"
        )
    lr = best.optimizer.lr
    end_lr = target.schedule.end_lr * lr / target.optimizer.lr
    values = [lr, best.model.mup.sigma_base, best.model.mup.alpha_in, best.model.mup.alpha_out]
    sets = [f"{key}={yaml_value(v)}" for key, v in zip(BASE_VALUES, values, strict=True)]
    return [sets[0], f"schedule.end_lr={yaml_value(float(f'{end_lr:.12g}'))}", *sets[1:]]


def sweep_best(
    folder: Path,
    *,
    target: str | None = None,
    write_recipe: Path | None = None,
    print_set: bool = False,
    overwrite: bool = False,
) -> list[str]:
    """Find the best point of the finished sweep `folder`, print it, and write its base values
    into `target` (default: the recipe the sweep trained): as a recipe file and/or `--set` options
    on stdout. Returns the `--set` options (without the `--set`)."""
    from rich.console import Console

    folder = Path(folder)
    if not is_finished(folder) and partial_path(folder).is_dir():
        raise LmpipeError(
            f"{folder}: the sweep is unfinished ({partial_path(folder).name} holds its work); "
            "rerun the sweep command to finish it"
        )
    report = read_report(folder)
    check_report(folder / JSON, report)
    check_complete(folder, report)
    best = best_point(report)
    run_dir = folder / best["run_dir"]
    for path in (folder / RUNS, run_dir, run_dir / "recipe.yaml"):
        if path.is_symlink():
            raise LmpipeError(
                f"{path}: a symbolic link; a sweep trains its points in real folders inside it, "
                "and --best reads nothing elsewhere"
            )
    best_recipe = load_recipe(str(run_dir / "recipe.yaml"))
    label, text = recipe_source(target) if target else swept_recipe(folder, report)
    target_recipe = parse_recipe(label, text)[1]
    sets = transfer_sets(best_recipe, target_recipe)
    tuned = parse_recipe(label, text, sets)[1]  # as `lmpipe train --recipe T --set ...`
    err = Console(stderr=True)
    objective = report["objective"]
    err.print(
        f"best point of {folder}: {best['point']} ({best['param']}, d_model {best['width']}, "
        f"density {best['density']:g}), {objective.replace('_', ' ')} {best[objective]:.4f}",
        highlight=False,
    )
    for assignment in sets:
        key, _, value = assignment.partition("=")
        err.print(f"  {key}: {_value_at(target_recipe, key)} -> {value}", highlight=False)
    model, source = tuned.model, best_recipe.model
    if (model.position, model.mlp) != (source.position, source.mlp):
        err.print(
            f"warning: target {target_recipe.name} is {model.position}/{model.mlp}, the sweep's "
            f"model {source.position}/{source.mlp}: base values transfer across widths, not "
            "across architectures",
            highlight=False,
        )
    # The attention logits' scale: 1/d_head against 1/sqrt(d_head) differs by sqrt(d_head), so
    # the values tuned under one are not the other's (both recipes are muP here).
    qk = (model.mup.qk_scale if model.mup else None, source.mup.qk_scale if source.mup else None)
    if qk[0] != qk[1]:
        err.print(
            f"warning: target {target_recipe.name} scales attention by mup.qk_scale {qk[0]}, the "
            f"sweep's model by {qk[1]}: base values transfer across widths, not across attention "
            "scales",
            highlight=False,
        )
    if write_recipe is not None:
        write_recipe_file(Path(write_recipe), tuned, folder, best, target or label, overwrite)
        err.print(f"wrote {write_recipe} (lmpipe train --recipe {write_recipe})", highlight=False)
    if print_set:
        print(" ".join(f"--set {s}" for s in sets))
    return sets


def _value_at(recipe: Recipe, key: str) -> Any:
    node: Any = recipe
    for part in key.split("."):
        node = getattr(node, part)
    return node


def written_by_best(path: Path) -> bool:
    """Whether `path` starts with the header `write_recipe_file` writes (its second line)."""
    try:
        with path.open("rb") as f:
            head = [f.readline(4096) for _ in range(2)]
    except OSError:
        return False
    return head[0].startswith(b"# ") and head[1].startswith(BEST_MARK.encode())


def write_recipe_file(
    path: Path, recipe: Recipe, folder: Path, best: dict[str, Any], target: str, overwrite: bool
) -> None:
    """The tuned recipe as YAML, written atomically; never into the sweep it comes from."""
    check_output(path, [folder], what="recipe file")
    if path.is_dir():  # first: --overwrite would not help
        raise LmpipeError(f"{path}: is a folder; --write-recipe names a .yaml file")
    if path.exists() and not overwrite:
        raise LmpipeError(f"{path}: already exists; pass --overwrite to replace it")
    if path.exists() and not written_by_best(path):  # --overwrite replaces only our own output
        raise LmpipeError(
            f"{path}: exists and was not written by `lmpipe sweep --best`; --overwrite replaces "
            "only such a file: remove it or choose another --write-recipe"
        )
    header = (
        f"# {target} with the muP base values of point {best['point']} of the sweep {folder}\n"
        f"{BEST_MARK}: optimizer.lr, schedule.end_lr, model.mup.sigma_base, "
        "alpha_in, alpha_out.\n"
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, header + recipe_yaml(recipe))
    except OSError as e:
        raise LmpipeError(f"{path}: cannot be written ({e.strerror})") from None
