"""Run a stage's independent tasks: in this process, on a local process pool, or as Ray tasks.

`Runner(workers, engine)` is a context manager; `runner.map(fn, jobs)` calls `fn(*job)` for each
job and returns the results in job order (`on_done(index, result)` as each one ends), so what a
stage makes never depends on where, or in which order, its tasks ran. `fn` must be a
module-level function and the jobs picklable; tasks talk to each other only through files, so
with Ray every node must see the same file system (the input and output folders on shared
storage).

engine "local": `workers` processes (1: this process, no pool), each ended with the stage's
process if that is killed (`die_with_parent`). engine "ray": plain `ray.remote`
tasks on the cluster at `RAY_ADDRESS` if set, else on a local Ray instance with `workers` CPUs
started (and stopped) here. Ray is an optional extra: `pip install 'lmpipe[ray]'`.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from lmpipe.dataprep.errors import LmpipeError

ENGINES = ("local", "ray")


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
                if not os.environ.get("RAY_ADDRESS"):
                    options["num_cpus"] = self.workers
                ray.init(**options)
                self._started_ray = True
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

    def cluster_gpus(self) -> int:
        """GPUs of the Ray cluster (0 for the local engine)."""
        return int(self._ray.cluster_resources().get("GPU", 0)) if self._ray is not None else 0

    def map(
        self,
        fn: Callable[..., Any],
        jobs: Sequence[tuple[Any, ...]],
        on_done: Callable[[int, Any], None] | None = None,
        resources: dict[str, float] | None = None,
    ) -> list[Any]:
        """`fn(*job)` for every job; results in job order. `on_done(index, result)` is called as
        each ends. `resources`: what one Ray task takes (default one CPU; `{"num_gpus": 1}` for
        a task that trains on a GPU); the local engines ignore it."""
        tick = on_done or (lambda index, result: None)
        if not jobs:
            return []
        if self._ray is not None:
            ray = self._ray
            task = ray.remote(max_retries=0, **(resources or {"num_cpus": 1}))(fn)
            refs = [task.remote(*job) for job in jobs]
            index = {ref: i for i, ref in enumerate(refs)}
            waiting = list(refs)
            while waiting:
                ready, waiting = ray.wait(waiting, num_returns=1)
                try:
                    result = ray.get(ready[0])
                except ray.exceptions.RayTaskError as e:
                    # The task's own error, as the local engines raise it: a bad line is one
                    # line, not the worker's traceback that Ray's wrapper prints around it.
                    if isinstance(e.cause, LmpipeError):
                        raise e.cause from None
                    raise
                tick(index[ready[0]], result)
            return ray.get(refs)
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
