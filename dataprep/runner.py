"""Run a stage's independent tasks: in this process, on a local process pool, or as Ray tasks.

`Runner(workers, engine)` is a context manager; `runner.map(fn, jobs)` calls `fn(*job)` for each
job and returns the results in job order (`on_done(index, result)` as each one ends), so what a
stage makes never depends on where, or in which order, its tasks ran. `fn` must be a
module-level function and the jobs picklable; tasks talk to each other only through files, so
with Ray every node must see the same file system (the input and output folders on shared
storage).

engine "local": `workers` processes (1: this process, no pool), each ended with the stage's
process if that is killed (`die_with_parent`). engine "ray": plain `ray.remote` tasks, `workers`
of them at a time (so -j means the same on a cluster), on the cluster at `RAY_ADDRESS` if set,
else on a local Ray instance with `workers` CPUs started (and stopped) here. A task must be safe
to run again: Ray reruns one whose worker died (`RETRIES` times), and a stage's rerun redoes the
tasks that had not finished. A task's error is raised as the local engines raise it; a worker
that died each time is `TaskLost`; on any error or interrupt the tasks still running are
cancelled, so none writes after `map` returns. SIGTERM interrupts as Ctrl-C does. Ray is an
optional extra: `pip install 'lmpipe[ray]'`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from lmpipe.dataprep.errors import LmpipeError

ENGINES = ("local", "ray")
# Ray reruns a task whose worker died (killed, out of memory, its node lost) this many times.
# Safe: a dedup unit writes its own files whole (truncating them first) and then its marker, and
# a sweep point resumes its run folder, so a rerun of either is what a rerun of the command does.
RETRIES = 2
CANCEL_WAIT_S = 10  # for the cancelled tasks' workers to be gone


class TaskLost(LmpipeError):
    """A task's Ray worker died each time it ran: the stage stops, and what its finished tasks
    wrote stays for a rerun of the command to resume from."""


def check_reachable(address: str) -> None:
    """Fail in seconds when nothing listens at RAY_ADDRESS's host:port; Ray's own connect
    retries for about 13 minutes. An address without a port ("auto") is left to Ray."""
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise LmpipeError(
            f"cannot reach the Ray cluster at RAY_ADDRESS={address}: nothing answers at "
            f"{host}:{port} ({e.strerror or e})"
        ) from None


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def die_with_parent() -> None:
    """Pool initializer: a worker ends as soon as the stage's process dies (kill -9 included),
    instead of finishing its task beside a rerun that writes the same files. On Linux the kernel
    sends it SIGKILL (PR_SET_PDEATHSIG); everywhere a thread waits on the parent's sentinel, which
    the operating system closes when the parent exits."""
    import multiprocessing.connection
    import threading

    parent = multiprocessing.parent_process()
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if parent is None:
        return
    if not parent.is_alive():  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="lmpipe-parent-watch", daemon=True).start()


class Runner:
    def __init__(self, workers: int = 1, engine: str = "local"):
        if engine not in ENGINES:
            raise LmpipeError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
        if workers < 1:
            raise LmpipeError("workers must be at least 1")
        self.workers, self.engine = workers, engine
        self._pool: Any = None
        self._ray: Any = None
        self._started_ray = False
        self._sigterm: tuple[Any] | None = None  # SIGTERM's handler before ours

    def __enter__(self) -> Runner:
        if self.engine == "ray":
            try:
                import ray
            except ImportError:
                raise LmpipeError(
                    "--engine ray needs Ray: pip install 'lmpipe[ray]' (or ray>=2.9)"
                ) from None
            self._ray = ray
            if not ray.is_initialized():
                options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
                address = os.environ.get("RAY_ADDRESS")
                if address:
                    check_reachable(address)
                else:
                    options["num_cpus"] = self.workers
                try:
                    ray.init(**options)
                except (ConnectionError, RuntimeError) as e:
                    # Ray's ConnectionError is an OSError without a file: it would be reported
                    # as a write failure of the output folder.
                    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    where = (
                        f"cannot reach the Ray cluster at RAY_ADDRESS={address} ({reason}); a "
                        "cluster with token authentication needs RAY_AUTH_MODE=token here too"
                        if address
                        else f"cannot start a local Ray instance ({reason})"
                    )
                    raise LmpipeError(where) from None
                self._started_ray = True
            if threading.current_thread() is threading.main_thread():
                # ray.init installed Ray's fatal-signal handler: SIGTERM would end this process
                # with a stack dump (exit 134 from a sweep). As Ctrl-C instead: the tasks are
                # cancelled, the stage prints one "interrupted" line, its work stays to resume.
                self._sigterm = (signal.signal(signal.SIGTERM, _interrupt),)
            note = self.cluster_note()
            if note:
                print(note, file=sys.stderr)
        elif self.workers > 1:
            import concurrent.futures as cf
            import multiprocessing

            # spawn: not fork, since the parent may hold threads (rich's progress refresher),
            # and not forkserver, whose workers are not children of this process, so their CPU
            # time would be missing from this process's accounting (and from any benchmark).
            self._pool = cf.ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=die_with_parent,
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        if self._started_ray:
            self._ray.shutdown()
            self._started_ray = False
        if self._sigterm is not None:
            # None: a handler set outside Python, before it started
            signal.signal(signal.SIGTERM, self._sigterm[0] or signal.SIG_DFL)
            self._sigterm = None

    def cluster_note(self) -> str | None:
        """A line for a Ray cluster with more CPUs than `workers`: -j tasks run at a time there
        too (before 2026-12-07 Ray scheduled every task at once, so -j 1 is worth a word)."""
        if self._ray is None or (self._started_ray and not os.environ.get("RAY_ADDRESS")):
            return None  # the local engine, or a local instance of `workers` CPUs
        resources = self._ray.cluster_resources()
        cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
        if cpus <= self.workers:
            return None
        has = f"{cpus} CPUs" + (f", {gpus} GPUs" if gpus else "")
        return (
            f"ray: -j {self.workers} runs {self.workers} task(s) at a time on the cluster "
            f"({has}); -j sets how many"
        )

    def cluster_gpus(self) -> int:
        """GPUs of the Ray cluster (0 for the local engine)."""
        return int(self._ray.cluster_resources().get("GPU", 0)) if self._ray is not None else 0

    def map(
        self,
        fn: Callable[..., Any],
        jobs: Sequence[tuple[Any, ...]],
        on_done: Callable[[int, Any], None] | None = None,
        resources: dict[str, float] | None = None,
        names: Sequence[str] | None = None,
    ) -> list[Any]:
        """`fn(*job)` for every job; results in job order. `on_done(index, result)` is called as
        each ends. `resources`: what one Ray task takes (default one CPU; `{"num_gpus": 1}` for
        a task that trains on a GPU); the local engines ignore it. `names`: what each job is,
        for `TaskLost` (default: the function and the job's number)."""
        tick = on_done or (lambda index, result: None)
        if not jobs:
            return []
        if self._ray is not None:
            return self._map_ray(fn, jobs, tick, resources or {"num_cpus": 1}, names)
        if self._pool is None:
            results = []
            for i, job in enumerate(jobs):
                results.append(fn(*job))
                tick(i, results[-1])
            return results
        import concurrent.futures as cf

        futures = {self._pool.submit(fn, *job): i for i, job in enumerate(jobs)}
        for future in cf.as_completed(futures):
            tick(futures[future], future.result())
        return [f.result() for f in futures]

    def _map_ray(
        self,
        fn: Callable[..., Any],
        jobs: Sequence[tuple[Any, ...]],
        tick: Callable[[int, Any], None],
        resources: dict[str, float],
        names: Sequence[str] | None,
    ) -> list[Any]:
        ray = self._ray
        task = ray.remote(max_retries=RETRIES, **resources)(fn)
        results: list[Any] = [None] * len(jobs)
        todo = iter(range(len(jobs)))
        running: dict[Any, int] = {}
        try:
            while True:
                # `workers` tasks in flight, never more: -j is the same on a cluster as on a
                # local instance, and a stop leaves no queue of tasks to cancel.
                while len(running) < self.workers and (i := next(todo, None)) is not None:
                    running[task.remote(*jobs[i])] = i
                if not running:
                    return results
                ready, _ = ray.wait(list(running), num_returns=1)
                i = running.pop(ready[0])
                try:
                    results[i] = ray.get(ready[0])
                except ray.exceptions.RayTaskError as e:
                    # The task's own error, as the local engines raise it: a bad line, or an
                    # OSError with its file and reason, is one line, not the worker's traceback
                    # that Ray's wrapper prints around it.
                    if isinstance(e.cause, LmpipeError | OSError):
                        raise e.cause from None
                    raise
                except ray.exceptions.RayError as e:  # its worker died, each time it ran
                    what = names[i] if names else f"{fn.__name__} (task {i + 1} of {len(jobs)})"
                    lines = str(e).strip().splitlines() or [""]
                    raise TaskLost(
                        f"{what}: its Ray worker died ({type(e).__name__}: {lines[0]}); rerun "
                        "the same command to resume"
                    ) from None
                tick(i, results[i])
        except BaseException:
            self._cancel(list(running))
            raise

    def _cancel(self, refs: list[Any]) -> None:
        """End the tasks still running (force: their workers are killed) and wait for them, so
        none writes after `map`, into a folder its caller removes or a rerun writes."""
        ray = self._ray
        for ref in refs:
            with contextlib.suppress(Exception):  # must not hide the error that stopped `map`
                ray.cancel(ref, force=True)
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=CANCEL_WAIT_S)
