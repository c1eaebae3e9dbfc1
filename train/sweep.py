"""`lmpipe sweep`: a hyperparameter sweep of real training runs, one run folder per point.

The points (`sweep_plan.py`: grid or random values, times widths, densities and SP / muP) are
each the recipe with a list of `--set` options, trained by the training loop itself
(`lmpipe.train.loop.train`) into `runs/<point>/`. Every point starts from the recipe's seed (same
initialisation draw, same batches), so points differ only in what the sweep changes.

The sweep folder is built in `OUT.partial` and published as `OUT` when every point is done
(`dataprep/folders.py`). It is resumable: the plan file `sweep-plan.json` records the points; a
rerun of the same command keeps every finished point (its run folder has a manifest), resumes an
unfinished one from its last checkpoint and runs the rest; a rerun on a finished sweep does
nothing; another plan is refused unless `--overwrite`. A point whose loss turns non-finite is
recorded as diverged, never dropped. A finished point's checkpoints are deleted (only a resume
needs them); its final weights stay in `model/`. `sweep_report.py` writes the results
(sweep.json, sweep.csv, sweep.png, the optimum per group); `transfer.py` turns the best point
into a recipe for a wider model.

Points run one after the other in this process (`jobs` 1), or in `jobs` spawned worker
processes: on a GPU machine one point per GPU (CUDA_VISIBLE_DEVICES, at most one worker a GPU),
on CPUs with the cores shared among them; each worker's output goes to `logs/<point>.log`.
With engine "ray" the points are Ray tasks (`dataprep/runner.py`: the cluster at RAY_ADDRESS, else
a local instance of `jobs` CPUs), one GPU each where the cluster has GPUs, else one CPU each;
every node must see the sweep folder and the data at the same paths (shared storage).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.folders import (
    check_output,
    clear_folder,
    is_finished,
    read_manifest,
    staged_output,
    write_json_atomic,
    write_manifest,
)
from lmpipe.dataprep.runner import Runner
from lmpipe.train.data import open_sources
from lmpipe.train.recipe import Recipe, recipe_file
from lmpipe.train.run_folder import metrics_rows
from lmpipe.train.sweep_plan import SweepSettings, plan_points

PLAN, RUNS, POINTS, LOGS = "sweep-plan.json", "runs", "points", "logs"


# --- running ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PointJob:
    """What a worker needs to train one point."""

    name: str
    recipe: Recipe
    run_dir: Path
    record: Path  # points/<name>.json, written when the point is done
    log: Path  # a worker's output goes here (points in parallel)


def point_done(work: Path, name: str) -> bool:
    """A point is done when its run has finished (manifest) or stopped on a non-finite loss."""
    if is_finished(work / RUNS / name):
        return True
    record = work / POINTS / f"{name}.json"
    return record.is_file() and bool(json.loads(record.read_text(encoding="utf-8")).get("stopped"))


def diverged(rows: list[dict[str, Any]]) -> bool:
    """A non-finite training or held-out loss at any step."""
    losses = [r.get("loss") for r in rows] + [
        v for r in rows for v in (r.get("val_loss") or {}).values()
    ]
    return any(isinstance(x, int | float) and not math.isfinite(x) for x in losses)


class SweepInterrupted(LmpipeError):
    """A point stopped by SIGTERM / SIGINT: the sweep stops, resumable."""


def run_point(job: PointJob) -> dict[str, Any]:
    """Train one point (resuming its run folder if an earlier sweep left one), then drop its
    checkpoints (only a resume needs them; the final weights stay in model/). The guard stopping
    the run (non-finite steps in a row, a loss spike), or an exception after a non-finite loss,
    is a diverged point: recorded, not raised. A SIGTERM / SIGINT stop leaves the point
    unfinished with its checkpoint and stops the sweep (`SweepInterrupted`)."""
    # Imported here: they import torch, which only a process that trains needs.
    from lmpipe.train.checkpoint import CHECKPOINTS
    from lmpipe.train.guard import RunStopped
    from lmpipe.train.loop import train

    started = time.perf_counter()
    stopped = None
    try:
        summary = train(
            job.recipe, None, job.run_dir, resume=job.run_dir.exists(), verify_data=False
        )
        if summary.get("stopped") in ("SIGTERM", "SIGINT"):
            # The user's or the scheduler's stop: the point is not done and keeps its checkpoint,
            # and the sweep stops here (the same command resumes it).
            raise SweepInterrupted(
                f"sweep: point {job.name} stopped by {summary['stopped']} at step "
                f"{summary['steps']:,} with a checkpoint; rerun the same command to resume"
            )
    except RunStopped as e:
        stopped = str(e)
    except LmpipeError:
        raise
    except Exception as e:
        if not diverged(metrics_rows(job.run_dir)):
            raise
        stopped = f"{type(e).__name__}: {e}".splitlines()[0]
    shutil.rmtree(job.run_dir / CHECKPOINTS, ignore_errors=True)
    record = {"point": job.name, "seconds": round(time.perf_counter() - started, 2)}
    if stopped:
        record["stopped"] = stopped
    write_json_atomic(job.record, record)
    return record


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2: rich, DeepSpeed's logger,
    C++ warnings) to `path` for the block; parallel points would otherwise interleave."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _start_worker(gpus: Any, threads: int) -> None:
    """A worker process's set-up, before it imports torch: its GPU, or its share of the cores."""
    if gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpus.get())
    else:
        os.environ["OMP_NUM_THREADS"] = str(threads)


def _run_in_worker(job: PointJob, threads: int) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(threads)
    job.log.parent.mkdir(exist_ok=True)
    with output_to(job.log):
        return run_point(job)


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def workers(jobs: int, points: int) -> tuple[int, int]:
    """(processes, GPUs): `jobs` processes at most, one per point to train and, on a GPU
    machine, one per GPU; GPUs 0 when the points share the CPU cores (or run here)."""
    processes = max(1, min(jobs, points))
    gpus = gpu_count() if processes > 1 else 0
    return (min(processes, gpus), gpus) if gpus else (processes, 0)


def run_on_ray(jobs: list[PointJob], cpus: int, announce: Any) -> None:
    """Train every job as a Ray task: one GPU each on a cluster with GPUs, else one CPU each."""
    with Runner(cpus, "ray") as runner:
        resources = {"num_gpus": 1} if runner.cluster_gpus() else {"num_cpus": 1}
        runner.map(
            _run_in_worker,
            [(job, 1) for job in jobs],
            on_done=lambda index, record: announce(jobs[index], record),
            resources=resources,
        )


def run_points(jobs: list[PointJob], processes: int, gpus: int, announce: Any) -> None:
    """Train every job: here, one after the other, or in `processes` spawned workers (one GPU
    each when `gpus`). The first error stops the sweep; points already finished stay."""
    if processes <= 1:
        for job in jobs:
            announce(job, run_point(job))
        return
    threads = max(1, (os.cpu_count() or 1) // processes)
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch
    queue = None
    if gpus:
        queue = context.Queue()
        for gpu in range(gpus):
            queue.put(gpu)
    pool = ProcessPoolExecutor(processes, context, _start_worker, (queue, threads))
    try:
        pending = {pool.submit(_run_in_worker, job, threads): job for job in jobs}
        while pending:
            done, _ = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                job = pending.pop(future)
                announce(job, future.result())  # a worker's error is raised here
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --- the stage -------------------------------------------------------------------------------


def prepare_work(work: Path, plan: dict[str, Any], overwrite: bool) -> None:
    """Keep the work of an interrupted run of this plan; refuse (or with `overwrite`, clear) that
    of another plan."""
    path = work / PLAN
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = None
        if old == plan:
            return
        if not overwrite:
            raise LmpipeError(
                f"{work}: holds an interrupted sweep of another plan ({plan_difference(old, plan)}); "
                "rerun that command to finish it, or pass --overwrite to start this one"
            )
    clear_folder(work)
    for sub in (RUNS, POINTS):
        (work / sub).mkdir()
    write_json_atomic(path, plan)


def plan_difference(old: Any, new: dict[str, Any]) -> str:
    """What differs between two plans, in a few words."""
    if not isinstance(old, dict):
        return "its plan file is unreadable"
    for key in ("recipe", "set", "data", "keys"):
        if old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} there, {new.get(key)!r} here"
    old_points, new_points = old.get("points") or [], new["points"]
    if len(old_points) != len(new_points):
        return f"{len(old_points)} points there, {len(new_points)} here"
    for a, b in zip(old_points, new_points, strict=True):
        if a != b:
            return f"point {b['name']} differs"
    return "the plans differ"


def sweep(settings: SweepSettings, out: Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume, or find finished) the sweep into `out`; returns sweep.json's content."""
    from rich.console import Console

    from lmpipe.train import sweep_report

    plan, points, recipes = plan_points(settings)
    out = Path(out)
    reads = [*(Path(s["path"]) for s in plan["data"]), recipe_file(settings.recipe)]
    err = Console(stderr=True)
    if is_finished(out) and not overwrite:
        check_output(out, reads)
        read_manifest(out, "sweep")
        try:
            done_plan = json.loads((out / PLAN).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            done_plan = None
        if done_plan != plan:
            raise LmpipeError(
                f"{out}: a finished sweep of another plan ({plan_difference(done_plan, plan)}); "
                "pass --overwrite to replace it, or choose another -o"
            )
        err.print(f"sweep: {out} is finished ({len(points)} points); nothing to do", highlight=False)  # fmt: skip
        report = sweep_report.read_report(out)
        sweep_report.print_optimum(report)
        return report
    for shards in open_sources(recipes[0]).values():  # once here, not once per point
        shards.verify_checksums()
    with staged_output(out, stage="sweep", reads=reads, overwrite=overwrite, resume=True) as work:
        prepare_work(work, plan, overwrite)
        todo = [
            PointJob(p.name, r, work / RUNS / p.name, work / POINTS / f"{p.name}.json",
                     work / LOGS / f"{p.name}.log")
            for p, r in zip(points, recipes, strict=True) if not point_done(work, p.name)
        ]  # fmt: skip
        processes, gpus = workers(settings.jobs, len(todo))
        where = (
            "as Ray tasks"
            if settings.engine == "ray"
            else f"{processes} at a time" + (f" on {gpus} GPUs" if gpus else "")
        )
        err.print(
            f"sweep: {len(points)} points, {len(points) - len(todo)} done before, "
            f"{len(todo)} to train, {where}",
            highlight=False,
        )
        count = itertools.count(len(points) - len(todo) + 1)

        def announce(job: PointJob, record: dict[str, Any]) -> None:
            state = "diverged, stopped" if record.get("stopped") else "done"
            err.print(
                f"sweep: [{next(count)}/{len(points)}] {job.name} {state} in {record['seconds']:.1f} s",
                highlight=False,
            )

        if settings.engine == "ray":
            run_on_ray(todo, settings.jobs, announce)
        else:
            run_points(todo, processes, gpus, announce)
        rows = [sweep_report.point_row(work, p) for p in points]
        report = sweep_report.write_report(work, plan, rows)
        write_manifest(
            work, "sweep", recipe=settings.recipe, data=plan["data"], keys=plan["keys"],
            points=len(points), diverged=sum(r["diverged"] for r in rows),
            optimum=report["optimum"],
        )  # fmt: skip
    sweep_report.print_optimum(report)
    return report
