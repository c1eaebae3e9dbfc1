"""`lmpipe sweep`: a hyperparameter sweep of real training runs, one run folder per point.

The points (`sweep_plan.py`: grid or random values, times widths, densities and SP / muP) are
each the recipe with a list of `--set` options, trained by the training loop itself
(`lmpipe.train.loop.train`) into `runs/<point>/`. Every point starts from the recipe's seed (same
initialisation draw, same batches), so points differ only in what the sweep changes.

The sweep folder is built in `OUT.partial` and published as `OUT` when every point is done
(`dataprep/folders.py`). It is resumable: the plan file `sweep-plan.json` records the points; a
rerun of the same command keeps every finished point (its run folder has a manifest), resumes an
unfinished one from its last checkpoint and runs the rest; a rerun on a finished sweep does
nothing (one whose point stopped before its end, as an lmpipe before 2026-12-07 published after
a SIGTERM, is refused: `sweep_report.check_complete`); another plan (the recipe's settings,
the data's checksums, the points: not where the recipe file and token folders lie) is refused
unless `--overwrite`. A point whose loss turns non-finite is recorded as diverged, never
dropped. A finished point's checkpoints are deleted (only a resume needs them); its final weights
stay in `model/`. `sweep_report.py` writes the results (sweep.json, sweep.csv, sweep.png, the
optimum per group); `transfer.py` turns the best point into a recipe for a wider model.

Points run one after the other in this process (`jobs` 1), or in `jobs` spawned worker
processes: on a GPU machine one point per GPU (CUDA_VISIBLE_DEVICES, at most one worker a GPU),
on CPUs with the cores shared among them; each worker's output goes to `logs/<point>.log`.
SIGTERM / SIGINT stop the points in training with a checkpoint and start no other; a worker
never outlives the sweep's process.
With engine "ray" the points are Ray tasks, `jobs` at a time (`dataprep/runner.py`: the cluster
at RAY_ADDRESS, else a local instance of `jobs` CPUs), one GPU each where the cluster has GPUs,
else one CPU each; every node must see the sweep folder and the data at the same paths (shared
storage), which the tasks get as absolute paths.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
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
from lmpipe.train.guard import StopSignals
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
    published: Path  # run_dir once the sweep is published: OUT/runs/<name>


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
    unfinished with its checkpoint and stops the sweep (`SweepInterrupted`); one that came in
    the last step stops the sweep after the point is recorded as finished."""
    # Imported here: they import torch, which only a process that trains needs.
    from lmpipe.train.checkpoint import CHECKPOINTS
    from lmpipe.train.guard import RunStopped
    from lmpipe.train.loop import train

    started = time.perf_counter()
    stopped = signal_stop = None
    try:
        # Its manifest names no checkpoint (they are dropped below), and its last line and a
        # guard stop name the run where it will be once published, not in OUT.partial.
        summary = train(
            job.recipe,
            None,
            job.run_dir,
            resume=job.run_dir.exists(),
            verify_data=False,
            published_as=job.published,
        )
        if summary.get("stopped") in ("SIGTERM", "SIGINT"):
            signal_stop = summary["stopped"]
            if not summary["finished"]:
                # The user's or the scheduler's stop: the point is not done and keeps its
                # checkpoint, and the sweep stops here (the same command resumes it).
                raise SweepInterrupted(
                    f"sweep: point {job.name} stopped by {signal_stop} at step "
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
    if signal_stop:  # the stop came in the point's last step: it is done, the sweep stops
        raise SweepInterrupted(
            f"sweep: point {job.name} finished as {signal_stop} came; rerun the same command "
            "to go on"
        )
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
    """A worker process's set-up, before it imports torch: its GPU, or its share of the cores;
    in a spawned worker, also how it stops (`_stop_with_sweep`)."""
    if gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpus.get())
    else:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    if multiprocessing.parent_process() is not None:
        _stop_with_sweep()


class _WorkerStop(StopSignals):
    """A worker's SIGTERM / SIGINT outside the training loop, for the worker's life: recorded as
    the loop records them, so the loop of a point in its set-up starts with the signal and stops
    after a step with a checkpoint (`StopSignals` nest), and no point starts after it. Only the
    first counts: the sweep's process decides the rest. When that process is gone (the
    parent-death signal), an idle worker exits."""

    def _handle(self, signum: int, frame: object) -> None:
        parent = multiprocessing.parent_process()
        if parent is not None and not parent.is_alive():
            os._exit(1)
        if self.received is None:
            super()._handle(signum, frame)


_worker_stop = _WorkerStop(announce=False)


def _stop_with_sweep() -> None:
    """A worker stops with the sweep's process. SIGTERM / SIGINT (the parent forwards its own,
    a terminal's Ctrl-C or a scheduler reaches the worker directly) are the training loop's
    while a point trains (a checkpoint, then the point raises `SweepInterrupted`); otherwise
    `_WorkerStop`'s. When the parent dies, even by kill -9, the worker gets SIGTERM: on Linux
    from the kernel (PR_SET_PDEATHSIG, at once, with no thread of ours), elsewhere from a thread
    that waits on the parent's sentinel. SIGTERM, not the SIGKILL of dataprep's workers
    (`runner.die_with_parent`), so that a point in training keeps its steps in a checkpoint;
    `_run_in_worker` then exits instead of waiting for calls that will never come."""
    parent = multiprocessing.parent_process()
    assert parent is not None
    _worker_stop.__enter__()  # never left: the worker ends with it
    # held back by the parent while it spawned this worker (`_stop_signals_held`): a signal
    # that came during the start-up is handled now
    signal.pthread_sigmask(signal.SIG_UNBLOCK, StopSignals.SIGNALS)
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    else:

        def watch() -> None:
            multiprocessing.connection.wait([parent.sentinel])
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, name="lmpipe-sweep-watch", daemon=True).start()
    if not parent.is_alive():  # the parent died before the signal was armed
        os._exit(1)


@contextlib.contextmanager
def _stop_signals_held() -> Iterator[None]:
    """Hold SIGTERM / SIGINT back for the block (the pool spawns its workers in `submit`): a
    spawned worker inherits the mask, so a signal during its start-up waits for its own handlers
    instead of killing it, which would break the pool and lose the other workers' results."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, StopSignals.SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _run_in_worker(job: PointJob, threads: int) -> dict[str, Any]:
    try:
        if _worker_stop.received:
            raise KeyboardInterrupt  # not started: the parent reports the stop
        import torch

        if not torch.cuda.is_available():
            torch.set_num_threads(threads)
        job.log.parent.mkdir(exist_ok=True)
        with output_to(job.log):
            return run_point(job)
    finally:
        # The parent died while the point ran (its SIGTERM stopped the point with a
        # checkpoint): nobody will read the result or send another point.
        parent = multiprocessing.parent_process()
        if parent is not None and not parent.is_alive():
            os._exit(1)


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
    """Train every job as a Ray task, `cpus` at a time: one GPU each on a cluster with GPUs,
    else one CPU each."""
    with Runner(cpus, "ray") as runner:
        resources: dict[str, float] = {"num_gpus": 1} if runner.cluster_gpus() else {"num_cpus": 1}
        runner.map(
            _run_in_worker,
            [(job, 1) for job in jobs],
            on_done=lambda index, record: announce(jobs[index], record),
            resources=resources,
            names=[f"sweep: point {job.name}" for job in jobs],
        )


class _ForwardedStop(StopSignals):
    """The sweep's SIGTERM / SIGINT with points in worker processes: recorded as the training
    loop records it (a second Ctrl-C a second or more later interrupts at once) and passed on
    to every worker, so each point in training stops after its step with a checkpoint."""

    def _handle(self, signum: int, frame: object) -> None:
        for child in multiprocessing.active_children():
            with contextlib.suppress(ProcessLookupError):
                if child.pid is not None:  # None only before start(); active children started
                    os.kill(child.pid, signum)
        super()._handle(signum, frame)

    def outcome(self, errors: list[BaseException]) -> BaseException:
        """What the stopped sweep raises: the first point's error, normally its stop (the
        message of `-j 1`); else, when no point was in its training loop, the signal's own
        (KeyboardInterrupt, as `-j 1` raises it there)."""
        first = next((e for e in errors if isinstance(e, Exception)), None)
        if first is not None:
            return first
        if self.received == "SIGINT":
            return KeyboardInterrupt()
        return SweepInterrupted(
            f"sweep: stopped by {self.received} (no point was in its training loop); "
            "rerun the same command to resume"
        )


def run_points(jobs: list[PointJob], processes: int, gpus: int, announce: Any) -> None:
    """Train every job: here, one after the other, or in `processes` spawned workers (one GPU
    each when `gpus`). The first error stops the sweep: no point starts after it, the points in
    training finish, and points already finished stay. SIGTERM / SIGINT stop it as they stop
    one point (`_ForwardedStop`)."""
    if processes <= 1:
        # The loop's own handler nests in this one (`StopSignals`): a signal it got after its
        # last stop vote, with the point finished, stops the sweep before the next point.
        with StopSignals(announce=False) as stop:
            for i, job in enumerate(jobs):
                if stop.received:
                    raise SweepInterrupted(
                        f"sweep: stopped by {stop.received} after point {jobs[i - 1].name} "
                        "finished; rerun the same command to go on"
                    )
                announce(job, run_point(job))
        return
    threads = max(1, (os.cpu_count() or 1) // processes)
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch
    queue = None
    if gpus:
        queue = context.Queue()
        for gpu in range(gpus):
            queue.put(gpu)
    todo = iter(jobs)
    running: dict[Future[dict[str, Any]], PointJob] = {}
    errors: list[BaseException] = []
    told = False
    with (
        _ForwardedStop(announce=False) as stop,
        ProcessPoolExecutor(processes, context, _start_worker, (queue, threads)) as pool,
    ):
        while True:
            # One job a worker, never more: the executor would queue another, and it would
            # start after a stop or an error.
            while len(running) < processes and not (stop.received or errors):
                queued = next(todo, None)
                if queued is None:
                    break
                with _stop_signals_held():
                    running[pool.submit(_run_in_worker, queued, threads)] = queued
            if not running:
                break
            done, _ = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
            if stop.received and not told:  # said here: a signal handler must not write
                told = True
                sys.stderr.write(
                    f"\nsweep: {stop.received}: the points in training stop after their step, "
                    "with a checkpoint; no other point starts\n"
                )
            for future in done:
                job = running.pop(future)
                error = future.exception()
                if isinstance(error, BrokenProcessPool):  # killed (the OOM killer, kill -9)
                    error = LmpipeError(
                        f"sweep: a worker process died (killed? out of memory?) while point "
                        f"{job.name} was in training; rerun the same command to resume"
                    )
                if error is None:
                    announce(job, future.result())
                else:
                    errors.append(error)
    if stop.received:
        raise stop.outcome(errors)
    if errors:
        raise errors[0]  # a worker's error, with its traceback


# --- the stage -------------------------------------------------------------------------------


def prepare_work(work: Path, plan: dict[str, Any], overwrite: bool) -> None:
    """Keep the work of an interrupted run of this plan (its recipe file or token folders may
    have moved: the plan file then says where they are now); refuse (or with `overwrite`, clear)
    that of another plan."""
    path = work / PLAN
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = None
        difference = plan_difference(old, plan)
        if difference is None:
            if has_content(old) and old != plan:
                # Where the recipe file and the token folders are now. The recipe's text stays
                # the one the sweep started with: `--best` transfers into it (a comment or a
                # value the sweep's --set overrides may have been edited since).
                write_json_atomic(path, {**plan, "recipe_text": old["recipe_text"]})
            return
        if not overwrite:
            raise LmpipeError(
                f"{work}: holds an interrupted sweep of another plan ({difference}); "
                "rerun that command to finish it, or pass --overwrite to start this one"
            )
    clear_folder(work)
    for sub in (RUNS, POINTS):
        (work / sub).mkdir()
    write_json_atomic(path, plan)


def plan_difference(old: Any, new: dict[str, Any]) -> str | None:
    """What differs between two plans, in a few words; None when they train the same runs.

    A plan records what the runs are made of: the recipe's settings (with the sweep's --set;
    its `data` section aside) and each source's shards' checksums. Where the recipe file and the
    token folders lie may change (a mixture recipe's `data` paths with them), as a resumed
    `lmpipe train` allows (`run_folder.check_same_data`); a comment in the recipe changes nothing.
    A plan of an lmpipe from before 2026-12-07 records only names and paths: the same command
    is taken as the same plan, as that lmpipe took it."""
    if not isinstance(old, dict):
        return "its plan file is unreadable"
    content = has_content(old)
    if content:
        difference = setting_difference(old["recipe_settings"], new["recipe_settings"])
        if difference is not None:
            return f"recipe {new['recipe']}: {difference}"
        identities = old["data_identity"] if isinstance(old["data_identity"], dict) else {}
        for name, identity in new["data_identity"].items():
            if identities.get(name) != identity:
                path = next(s["path"] for s in new["data"] if s["name"] == name)
                return (
                    f"data: source {name!r} ({path}) holds other tokens than the sweep was "
                    "planned on (its shards' checksums differ)"
                )

    def placeless(sources: Any) -> Any:
        return [{k: v for k, v in s.items() if k != "path"} if isinstance(s, dict) else s
                for s in sources or []]  # fmt: skip

    old_data, new_data = old.get("data"), new["data"]
    if content:
        old_data, new_data = placeless(old_data), placeless(new_data)
    checks = [
        ("set", old.get("set"), new["set"]),
        ("data", old_data, new_data),
        ("keys", old.get("keys"), new["keys"]),
    ]
    if not content:
        checks.insert(0, ("recipe", old.get("recipe"), new["recipe"]))
    for key, there, here in checks:
        if there != here:
            return f"{key}: {there!r} there, {here!r} here"
    old_points, new_points = old.get("points") or [], new["points"]
    if len(old_points) != len(new_points):
        return f"{len(old_points)} points there, {len(new_points)} here"
    for a, b in zip(old_points, new_points, strict=True):
        if a != b:
            return f"point {b['name']} differs"
    return None


def has_content(plan: Any) -> bool:
    """Whether a plan records what its runs are made of (since 2026-12-07), not only where."""
    return isinstance(plan, dict) and {"recipe_settings", "data_identity", "recipe_text"} <= plan.keys()  # fmt: skip


def setting_difference(old: Any, new: Any, key: str = "") -> str | None:
    """The first setting that differs between two recipes' settings, `key: old there, new here`."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(old.keys() | new.keys()):
            found = setting_difference(old.get(k), new.get(k), f"{key}.{k}" if key else k)
            if found is not None:
                return found
        return None
    return None if old == new else f"{key}: {old!r} there, {new!r} here"


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
        difference = plan_difference(done_plan, plan)
        if difference is not None:
            raise LmpipeError(
                f"{out}: a finished sweep of another plan ({difference}); "
                "pass --overwrite to replace it, or choose another -o"
            )
        report = sweep_report.read_report(out)
        sweep_report.check_complete(out, report)
        err.print(f"sweep: {out} is finished ({len(points)} points); nothing to do", highlight=False)  # fmt: skip
        sweep_report.print_optimum(report)
        return report
    for shards in open_sources(recipes[0]).values():  # once here, not once per point
        shards.verify_checksums()
    with staged_output(out, stage="sweep", reads=reads, overwrite=overwrite, resume=True) as work:
        prepare_work(work, plan, overwrite)
        # Absolute: a Ray task on a cluster runs in its node's working folder, not in this one.
        folder = work.resolve()
        todo = [
            PointJob(p.name, r, folder / RUNS / p.name, folder / POINTS / f"{p.name}.json",
                     folder / LOGS / f"{p.name}.log", out.resolve() / RUNS / p.name)
            for p, r in zip(points, recipes, strict=True) if not point_done(work, p.name)
        ]  # fmt: skip
        processes, gpus = workers(settings.jobs, len(todo))
        where = (
            f"as Ray tasks, {settings.jobs} at a time"
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
