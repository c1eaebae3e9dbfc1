"""What may be a run folder, and what a resume may change: checked on every rank before any rank
writes (`loop.py`). A run folder is new, empty, or an earlier run's (with `--resume`, and then
the recipe must be the checkpoint's but for `RESUMABLE_CHANGES`); it never overlaps the data,
and nothing under it is a symbolic link (the folder itself may be one).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.folders import (
    LOCK,
    check_output,
    is_finished,
    is_int,
    read_json,
    write_text_atomic,
)
from lmpipe.train.checkpoint import CHECKPOINTS, list_checkpoints, read_marker
from lmpipe.train.metrics import TENSORBOARD, number, val_losses
from lmpipe.train.recipe import DataSource, Recipe, load_recipe

# What a run folder holds (`checkpoint.py`). A folder is an earlier run's when it has the plan
# (written at the start) or checkpoints, or holds nothing but these.
RUN_FILES = (
    LOCK,  # held by the running rank 0 (`loop.py`)
    "recipe.yaml",
    "plan.json",
    "deepspeed.json",
    "metrics.jsonl",
    "logs",
    TENSORBOARD,
    CHECKPOINTS,
)


def check_run_dir(
    run_dir: Path,
    data: list[Path],
    recipe: Recipe,
    resume: bool,
    *,
    world: int = 1,
    identity: dict[str, str] | None = None,
    drawn: list[dict[str, Any]] | None = None,
) -> list[str]:
    """Check the run folder on every rank, before any rank writes to it, so all ranks fail alike.
    A resume continues the newest checkpoint's run: the same recipe (but `RESUMABLE_CHANGES`),
    the same tokens in each source (`identity`, `data.data_identity`; its folder may move; for a
    checkpoint that kept none, the token counts of `drawn`, `data.coverage`, against plan.json's),
    and as many ranks as hold its optimizer's partitions. Returns the notices for rank 0 to print
    (a check that could not be made)."""
    check_output(run_dir, data, what="run folder")
    if run_dir.exists() and not run_dir.is_dir():
        raise LmpipeError(f"{run_dir}: is a file, not a run folder; choose another --run-dir")
    if is_finished(run_dir):
        raise LmpipeError(
            f"{run_dir}: this run has finished (manifest.json); choose another --run-dir"
        )
    entries = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    is_run = "plan.json" in entries or CHECKPOINTS in entries or set(entries) <= set(RUN_FILES)
    if entries and not is_run:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise LmpipeError(
            f"{run_dir}: not empty and holds no lmpipe run ({shown}); choose an empty or new --run-dir"
        )
    if entries and not resume:
        what = "checkpoints" if list_checkpoints(run_dir) else "files"
        raise LmpipeError(
            f"{run_dir}: holds {what} of an earlier run; pass --resume to continue it, or choose another --run-dir"
        )
    if entries:
        check_no_links(run_dir)
    checkpoints = list_checkpoints(run_dir)
    if not (resume and checkpoints):
        return []
    check_same_recipe(recipe, checkpoints[-1])
    notice = check_same_data(recipe, checkpoints[-1], identity, drawn)
    check_same_world(checkpoints[-1], world)
    return [notice] if notice else []


def check_no_links(run_dir: Path) -> None:
    """Refuse a run folder with a symbolic link anywhere under it. A run writes into its folder
    (recipe.yaml, metrics.jsonl, logs/, checkpoints/, DeepSpeed's `latest`, model/), and a write
    through a link lands wherever it points: resuming a run folder someone else made would
    overwrite files anywhere the user may write. The folder itself may be a link (a run folder
    kept on scratch storage). A walk with its own stack: any depth, and no link followed."""
    folders = [str(run_dir)]
    while folders:
        with os.scandir(folders.pop()) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
        for entry in entries:
            if entry.is_symlink():
                raise LmpipeError(
                    f"{entry.path}: a symbolic link (to {os.readlink(entry.path)}) inside the run "
                    "folder, which a run would write through; remove it (a run folder kept "
                    "elsewhere is linked whole: --run-dir may be a link)"
                )
            if entry.is_dir(follow_symlinks=False):
                folders.append(entry.path)


def check_same_data(
    recipe: Recipe,
    checkpoint: Path,
    identity: dict[str, str] | None,
    drawn: list[dict[str, Any]] | None,
) -> str | None:
    """Refuse a resume on other tokens than the checkpoint's run read; the notice to print when
    that cannot be checked."""
    saved = read_marker(checkpoint)["data"]
    if saved is None:  # a checkpoint from before 2026-12-07 (8af47bf): no identity was kept
        return check_same_counts(recipe, checkpoint, drawn)
    if identity is None:
        return None
    for source in recipe.data or []:
        if saved.get(source.name) not in (None, identity.get(source.name)):
            raise LmpipeError(
                f"{checkpoint}: --resume on other tokens in source {source.name!r} "
                f"({source.path}): its shards differ from those the run read; resume on the same "
                "token folder (it may have moved), or start a new run"
            )
    return None


def check_same_counts(
    recipe: Recipe, checkpoint: Path, drawn: list[dict[str, Any]] | None
) -> str | None:
    """For a checkpoint that kept no identity of its tokens: each source's tokens in one epoch at
    each window length, as the run's plan.json recorded them (`data.coverage`'s rows; a row
    without `source` is of the one source of an lmpipe before mixtures, "data"), against `drawn`,
    the same for the folders given now. Other tokens of the same count pass unseen, so this
    catches another folder, not every change. The notice when nothing could be compared."""
    plan = checkpoint.parent.parent / "plan.json"
    try:
        rows = read_json(plan).get("data")
    except (LmpipeError, OSError, AttributeError):  # missing, damaged or another tool's
        rows = None
    recorded = {
        (row.get("source", "data"), row["seq_len"]): row["epoch_tokens"]
        for row in (rows if isinstance(rows, list) else [])
        if isinstance(row, dict)
        and isinstance(row.get("source", "data"), str)
        and is_int(row.get("seq_len"))
        and is_int(row.get("epoch_tokens"))
    }
    paths = {s.name: s.path for s in recipe.data or []}
    compared = False
    for row in drawn or []:
        before = recorded.get((row["source"], row["seq_len"]))
        if before is None:
            continue
        compared = True
        if before != row["epoch_tokens"]:
            raise LmpipeError(
                f"{checkpoint}: --resume on other tokens in source {row['source']!r} "
                f"({paths.get(row['source'])}): one epoch of it at seq_len {row['seq_len']:,} "
                f"is {row['epoch_tokens']:,} tokens, and was {before:,} for the run ({plan}); "
                "resume on the same token folder (it may have moved), or start a new run"
            )
    if compared:
        return None
    return (
        f"resume: {checkpoint} was written by an lmpipe from before 2026-12-07, which kept no "
        f"identity of its tokens, and {plan} records no token counts to compare: the data "
        "cannot be checked; resume on the token folder the run read"
    )


def check_same_world(checkpoint: Path, world: int) -> None:
    """ZeRO's optimizer states (and ZeRO-3's weights) are saved in one file per rank, and
    DeepSpeed loads them only into as many ranks."""
    ranks = {
        int(m.group(1))
        for f in checkpoint.iterdir()
        if (m := re.match(r"(?:bf16_)?zero_pp_rank_(\d+)_", f.name))
    }
    if ranks and len(ranks) != world:
        raise LmpipeError(
            f"{checkpoint}: its optimizer states are partitioned over {len(ranks)} rank(s), and "
            f"this launch has {world}; resume with {len(ranks)} (the global batches are the same "
            "at any world size, the partitions are not)"
        )


# Settings a resumed run may change; anything else would make it a different run from the one
# its checkpoint, metrics and data order belong to. (A source's folder may move: `data.N.path`.)
RESUMABLE_CHANGES = {
    "checkpoint_every_tokens",
    "keep_checkpoints",
    "model.attn_impl",
    "model.loss_impl",  # the same loss, summed in another order
    "model.loss_chunk_tokens",
    "model.activation_checkpointing",
    "model.compile",
    "warn_epochs",
    "guard.max_bad_steps",  # when to stop, not how to train: loosened to continue a stopped run
    "guard.spike_margin",
    "guard.spike_window",
    "guard.spike_sigmas",
}


def check_same_recipe(recipe: Recipe, checkpoint: Path) -> None:
    saved = load_recipe(str(checkpoint / "recipe.yaml"))
    if saved.data is None:  # saved before mixtures: its one folder was the source "data"
        saved = saved.model_copy(update={"data": [DataSource(name="data", path=Path("."))]})

    def flat(value: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(value, dict | list):
            items = value.items() if isinstance(value, dict) else enumerate(value)
            return {k: v for key, sub in items for k, v in flat(sub, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): value}

    old, new = flat(saved.model_dump(mode="json")), flat(recipe.model_dump(mode="json"))
    changed = [
        f"{key} ({old.get(key)!r} -> {new.get(key)!r})"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
        and key not in RESUMABLE_CHANGES
        and not re.fullmatch(r"data\.\d+\.path", key)
    ]
    if changed:
        raise LmpipeError(
            f"{checkpoint}: --resume with a recipe that differs from the checkpoint's at "
            + ", ".join(changed)
            + "; resume with the same recipe, or start a new run"
        )


def parse_row(line: str) -> Any:
    """A metrics.jsonl line as JSON (NaN and Infinity read as floats); None for a line that does
    not parse: a torn last line, or a damaged one (an integer past Python's 4,300 digits is a
    ValueError, deep nesting a RecursionError, neither a JSONDecodeError)."""
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        return None


def metrics_rows(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows; a line that does not parse (a torn last line) is skipped."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [row for row in map(parse_row, lines) if isinstance(row, dict)]


def trim_metrics(run_dir: Path, step: int) -> None:
    """Drop metric rows after `step`: steps that ran after the last checkpoint run again on resume.
    A row that does not parse (the torn last line of a killed run) goes too."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        row = parse_row(line)
        if isinstance(row, dict) and is_int(row.get("step")) and row["step"] <= step:
            kept.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def run_rows(run_dir: Path, step: int) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl up to `step` as the loop wrote them, for a resumed run's summary:
    a row without a numeric loss (damaged, or another tool's) is left out, and a `val_loss` or
    `lr_groups` that is not a map of numbers (with both groups the summary names) is read as
    none, so that the run still finishes and writes its model and manifest instead of failing on
    every retry."""
    rows = []
    for row in metrics_rows(run_dir):
        loss = number(row.get("loss"))
        if not is_int(row.get("step")) or row["step"] > step or loss is None:
            continue
        groups = row.get("lr_groups")
        # the summary's lr and lr_hidden are the rates of these two groups
        if not (
            isinstance(groups, dict)
            and {"embedding", "hidden"} <= groups.keys()
            and all(number(v) is not None for v in groups.values())
        ):
            groups = {}
        try:
            val_loss = val_losses(row, str(run_dir))
        except LmpipeError:
            val_loss = {}
        rows.append({**row, "loss": loss, "lr_groups": groups, "val_loss": val_loss})
    return rows
