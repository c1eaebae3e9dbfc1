"""`Runner`'s Ray engine: a cluster it cannot reach, a task's OSError, a worker that dies, -j
tasks in flight, and no task left running (or writing) after an error, an interrupt or SIGTERM.

The tests that need Ray share one local instance of 4 CPUs (a start costs seconds), which the
runner joins with -j 2 as it joins a cluster."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lmpipe.cli.stage import os_error_line
from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.runner import Runner, TaskLost
from tests.ports import free_port

ray = pytest.importorskip("ray", reason="ray is not installed (optional extra: lmpipe[ray])")
# By value: Ray's workers cannot import this test module by its name.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


# These two first: they need Ray not started in this process (the fixture below starts it).
def test_an_unreachable_ray_address_is_one_line_in_seconds(monkeypatch):
    assert not ray.is_initialized()
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("RAY_ADDRESS", address)
    started = time.monotonic()
    message = (
        f"^cannot reach the Ray cluster at RAY_ADDRESS={address}: nothing answers at {address} "
        r"\(Connection refused\)$"
    )
    with pytest.raises(LmpipeError, match=message), Runner(1, "ray"):
        pass
    assert time.monotonic() - started < 10  # Ray's own connect tried for 13 minutes
    assert not ray.is_initialized()


def test_a_cluster_that_refuses_the_driver_is_one_line_naming_ray_address(monkeypatch):
    """Ray's ConnectionError is an OSError without a file: not "cannot be written"."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        monkeypatch.setenv("RAY_ADDRESS", address)

        def refuse(**options):
            raise ConnectionError(f"Failed to connect to Ray cluster at {address}\n  details")

        monkeypatch.setattr(ray, "init", refuse)
        message = (
            f"^cannot reach the Ray cluster at RAY_ADDRESS={address} \\(Failed to connect to Ray "
            f"cluster at {address}\\); a cluster with token authentication needs "
            "RAY_AUTH_MODE=token here too$"
        )
        with pytest.raises(LmpipeError, match=message), Runner(1, "ray"):
            pass


def test_a_lost_task_keeps_dedup_s_work_for_the_rerun(monkeypatch, tmp_path):
    """Unlike bad input (whose rerun would fail the same way), a worker that died leaves the
    finished units for `rerun the same command to resume`. The local engine, with the loss
    raised where Ray raises it."""
    import json

    from lmpipe.dataprep.dedup import dedup

    data = tmp_path / "in"
    data.mkdir()
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    docs = [" ".join(words[i:] + words[:i]) * 3 for i in range(6)] * 2  # 6 distinct, twice
    (data / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    real = Runner.map

    def lose_exact(self, fn, jobs, *args, **kwargs):
        if fn.__name__ == "exact_partition":  # named as the step the user sees
            raise TaskLost(f"{kwargs['names'][0]}: its Ray worker died (...)")
        return real(self, fn, jobs, *args, **kwargs)

    monkeypatch.setattr(Runner, "map", lose_exact)
    with pytest.raises(TaskLost, match=r"^dedup: exact duplicates \(unit 1 of 1 to do\): its"):
        dedup([data], tmp_path / "out", progress=False)
    assert (tmp_path / "out.partial" / "_work" / "scan" / "00000.done").is_file()
    monkeypatch.setattr(Runner, "map", real)
    resumed = dedup([data], tmp_path / "out", progress=False)
    assert resumed["counts"] == dedup([data], tmp_path / "whole", progress=False)["counts"]


@pytest.fixture(scope="module")
def runner():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        with Runner(2, "ray") as r:
            yield r
    finally:
        ray.shutdown()


def full(path: str) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def test_a_task_s_os_error_is_one_line_naming_its_file(runner):
    path = "clean.partial/_work/scan/00000.text.npy"
    with pytest.raises(OSError) as caught:
        runner.map(full, [(path,)])
    assert type(caught.value) is OSError  # the task's own, not Ray's wrapper around it
    assert os_error_line(caught.value) == f"{path}: cannot be written (No space left on device)"


def wait_for_starts(folder: str, n: int, seconds: float) -> None:
    until = time.monotonic() + seconds
    while len(list(Path(folder).iterdir())) < n and time.monotonic() < until:
        time.sleep(0.05)


def interval(folder: str, i: int) -> tuple[float, float]:
    """When task i ran. Tasks 0 and 1 wait until both have started, however long the cluster
    takes to start a second worker (seconds on a loaded machine), then 2 s more for a third task
    to start beside them, as it would if more than -j tasks were in flight."""
    started = time.time()
    (Path(folder) / f"{i}.start").touch()
    if i < 2:
        wait_for_starts(folder, 2, 120)
        wait_for_starts(folder, 3, 2)
    return started, time.time()


def test_j_tasks_in_flight_at_most_on_a_cluster_too(runner, tmp_path):
    """The cluster has 4 CPUs; -j 2 runs 2 tasks at a time."""
    ran = runner.map(interval, [(str(tmp_path), i) for i in range(3)])
    most = max(sum(s <= start < e for s, e in ran) for start, _ in ran)
    assert most == 2


def test_a_cluster_with_more_cpus_than_j_says_what_j_does(runner):
    assert (
        runner.cluster_note()
        == "ray: -j 2 runs 2 task(s) at a time on the cluster (4 CPUs); -j sets how many"
    )
    with Runner(4, "ray") as every_cpu:  # the cluster the fixture started, not shut down here
        assert every_cpu.cluster_note() is None


def crash_once(flag: str) -> str:
    if not os.path.exists(flag):
        Path(flag).touch()
        os._exit(1)  # as kill -9 or the OOM killer end a worker
    return "ran again"


def test_a_task_whose_worker_died_runs_again(runner, tmp_path):
    assert runner.map(crash_once, [(str(tmp_path / "crashed"),)]) == ["ran again"]


def crash() -> None:
    os._exit(1)


def test_a_worker_that_dies_each_time_is_one_line_naming_the_task(runner):
    message = (
        r"^crash \(task 1 of 1\): its Ray worker died \(WorkerCrashedError: The worker died "
        r"unexpectedly while executing this task\..*\); rerun the same command to resume$"
    )
    with pytest.raises(TaskLost, match=message):
        runner.map(crash, [()])
    with pytest.raises(TaskLost, match=r"^sweep: point p0: its Ray worker died \("):
        runner.map(crash, [()], names=["sweep: point p0"])


def fail_or_write(kind: str, folder: str) -> None:
    started = Path(folder) / "started"
    if kind == "fail":
        # Only once the writing task runs: else the error would cancel a task not yet started,
        # which tests nothing (a loaded machine can take seconds to start a worker).
        until = time.monotonic() + 120
        while not started.exists() and time.monotonic() < until:
            time.sleep(0.05)
        raise LmpipeError("bad line")
    started.touch()
    time.sleep(3)
    (Path(folder) / "late").write_text("written after the stage stopped")


def test_an_error_cancels_the_tasks_still_running(runner, tmp_path):
    with pytest.raises(LmpipeError, match="^bad line$"):
        runner.map(fail_or_write, [("write", str(tmp_path)), ("fail", str(tmp_path))])
    assert (tmp_path / "started").exists()  # it was running when the error came
    time.sleep(4)  # past the time the writing task would have written
    assert not (tmp_path / "late").exists()


STAGE = """
import sys, time
from pathlib import Path

import typer

from lmpipe.cli.stage import run_stage
from lmpipe.dataprep.runner import Runner


def task(folder):
    (Path(folder) / "started").touch()
    time.sleep(4)
    (Path(folder) / "late").touch()


def stage(folder):
    with Runner(1, "ray") as runner:
        runner.map(task, [(folder,)])


try:
    run_stage(stage, sys.argv[1])
except typer.Exit as e:
    sys.exit(e.exit_code)
"""


@pytest.mark.slow
def test_sigterm_under_ray_is_one_interrupted_line_and_ends_the_tasks(tmp_path):
    """Not Ray's fatal-signal stack dump (exit 134 from a sweep); the task ends at once."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local instance
    stage = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(STAGE), str(tmp_path)],
        env={**env, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    until = time.monotonic() + 120  # a Ray start: half a minute on a loaded machine
    while not (tmp_path / "started").exists() and stage.poll() is None:
        assert time.monotonic() < until, "the Ray task did not start"
        time.sleep(0.1)
    stage.send_signal(signal.SIGTERM)
    _, err = stage.communicate(timeout=60)
    assert stage.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted: the output folder was not published"
    assert "SIGTERM received" not in err
    time.sleep(5)  # past the time the task would have written
    assert not (tmp_path / "late").exists()
