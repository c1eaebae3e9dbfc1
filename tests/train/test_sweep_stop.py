"""Stopping a parallel sweep (`-j K`): SIGTERM to `lmpipe sweep` stops the points in training
with a checkpoint and starts no other; its workers never outlive it (kill -9 included); the
first error starts no further point either."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import pytest

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.train import sweep as sweep_module

# Points far longer than the test waits (128 steps of 256 tokens, a checkpoint every 4 steps):
# each is stopped in training.
LONG_POINTS = [
    "tokens_per_step=256",
    "micro_batch_tokens=256",
    "stages=[{seq_len: 64, tokens: 32768}]",
    "schedule.warmup_tokens=512",
    "checkpoint_every_tokens=1024",
]
TRAINING = ("0000-mup-w32", "0001-mup-w32")  # the two points the two workers take first


def start_sweep(data, out, log):
    command = [sys.executable, "-m", "lmpipe.cli", "sweep", "--recipe", "tiny", "--data",
               str(data), "-o", str(out), "--grid", "optimizer.lr=2^-8,2^-6,2^-4",
               "--widths", "32", "--val-tokens", "256", "-j", "2"]  # fmt: skip
    for s in LONG_POINTS:
        command += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "1000"}
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def workers_of(pid):
    """The sweep's worker processes (not its resource tracker), from the kernel's child list."""
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            children += [int(c) for c in f.read().split()]
    return [c for c in children if b"spawn_main" in open(f"/proc/{c}/cmdline", "rb").read()]


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def both_points_training(sweep, work, log):
    """Wait until each worker has logged a step of its point; returns the workers' pids."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert sweep.poll() is None, log.read_text()
        metrics = [work / "runs" / name / "metrics.jsonl" for name in TRAINING]
        if all(m.is_file() and m.read_text().count("\n") >= 1 for m in metrics):
            pids = workers_of(sweep.pid)
            assert len(pids) == 2
            return pids
        time.sleep(0.2)
    raise AssertionError("the points did not start training")


def stop(sweep, pids):
    """After a failed check: no sweep process left training beside later tests."""
    sweep.kill()
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


needs_proc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@needs_proc
def test_sigterm_stops_the_points_in_training_with_a_checkpoint_and_the_workers(
    pattern_tokens, tmp_path
):
    out, work, log = tmp_path / "sw", tmp_path / "sw.partial", tmp_path / "sweep.log"
    with open(log, "wb") as f:
        sweep = start_sweep(pattern_tokens, out, f)
    pids = []
    try:
        pids += both_points_training(sweep, work, log)
        sweep.send_signal(signal.SIGTERM)
        assert sweep.wait(timeout=120) == 2
        assert not any(alive(pid) for pid in pids)
    finally:
        stop(sweep, pids)
    text = log.read_text()
    # the message and status of `-j 1`: one line naming a stopped point
    assert re.search(
        r"\nerror: sweep: point 000[01]-mup-w32 stopped by SIGTERM at step \d+ with a "
        r"checkpoint; rerun the same command to resume\n$",
        text,
    ), text
    assert not out.exists()
    # the two points in training stopped with a checkpoint; the third never started
    assert sorted(p.name for p in (work / "runs").iterdir()) == list(TRAINING)
    assert not any((work / "points").iterdir())
    for name in TRAINING:
        assert any((work / "runs" / name / "checkpoints").glob("step*"))
        assert "stopped by SIGTERM at step" in (work / "logs" / f"{name}.log").read_text()


@needs_proc
def test_the_workers_of_a_killed_sweep_checkpoint_and_exit(pattern_tokens, tmp_path):
    """kill -9 of `lmpipe sweep`: each worker gets SIGTERM from the kernel (the parent-death
    signal), so its point stops with a checkpoint, and exits within seconds."""
    work, log = tmp_path / "sw.partial", tmp_path / "sweep.log"
    with open(log, "wb") as f:
        sweep = start_sweep(pattern_tokens, tmp_path / "sw", f)
    pids = []
    try:
        pids += both_points_training(sweep, work, log)
        sweep.kill()
        sweep.wait()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(pid) for pid in pids)
    finally:
        stop(sweep, pids)
    assert sorted(p.name for p in (work / "runs").iterdir()) == list(TRAINING)
    for name in TRAINING:
        assert any((work / "runs" / name / "checkpoints").glob("step*"))
        assert "stopped by SIGTERM at step" in (work / "logs" / f"{name}.log").read_text()


class ThreadPool(ThreadPoolExecutor):
    """The process pool's stand-in: the workers are threads, and it counts the calls submitted
    and not yet finished (a call beyond the workers would wait in the pool's queue)."""

    most = 0

    def __init__(self, workers, context, initializer, initargs):
        super().__init__(workers)
        self._futures = []

    def submit(self, fn, *args):
        future = super().submit(fn, *args)
        self._futures.append(future)
        ThreadPool.most = max(ThreadPool.most, sum(not f.done() for f in self._futures))
        return future


def test_the_first_error_starts_no_further_point(monkeypatch, tmp_path):
    started, lock = [], threading.Lock()

    def run(job, threads):
        with lock:
            started.append(job.name)
        time.sleep(0.1 if job.name == "p0" else 0.5)
        if job.name == "p0":
            raise LmpipeError("p0: bad point")
        return {"point": job.name, "seconds": 0.5}

    monkeypatch.setattr(sweep_module, "ProcessPoolExecutor", ThreadPool)
    monkeypatch.setattr(ThreadPool, "most", 0)
    monkeypatch.setattr(sweep_module, "_run_in_worker", run)
    jobs = [
        sweep_module.PointJob(f"p{i}", None, tmp_path, tmp_path, tmp_path, tmp_path)
        for i in range(4)
    ]
    announced = []
    with pytest.raises(LmpipeError, match=r"^p0: bad point$"):
        sweep_module.run_points(jobs, 2, 0, lambda job, record: announced.append(job.name))
    # p1 was training and finished; p2 and p3 never started (nothing waited in a queue)
    assert sorted(started) == ["p0", "p1"] and announced == ["p1"]
    assert ThreadPool.most == 2


def test_a_worker_that_dies_is_one_line_naming_a_point(monkeypatch, tmp_path):
    """A worker killed (the OOM killer, kill -9) breaks the pool: one line, not its traceback."""

    def run(job, threads):
        raise BrokenProcessPool("A process in the process pool was terminated abruptly")

    monkeypatch.setattr(sweep_module, "ProcessPoolExecutor", ThreadPool)
    monkeypatch.setattr(sweep_module, "_run_in_worker", run)
    jobs = [
        sweep_module.PointJob(f"p{i}", None, tmp_path, tmp_path, tmp_path, tmp_path)
        for i in range(2)
    ]
    with pytest.raises(LmpipeError, match=r"^sweep: a worker process died \(killed\? out of memory\?\) while point p\d was in training; rerun the same command to resume$"):  # fmt: skip
        sweep_module.run_points(jobs, 2, 0, lambda job, record: None)


def test_one_process_a_signal_after_the_last_stop_vote_stops_the_sweep(monkeypatch, tmp_path):
    """-j 1: a SIGTERM that reaches the training loop's handler after its last stop vote (its
    final validation or save) finishes that point, and the sweep stops before the next one."""
    from lmpipe.train.guard import StopSignals

    def run_point(job):
        with StopSignals(announce=False) as loop_signals:  # as train() installs it
            os.kill(os.getpid(), signal.SIGTERM)
            while loop_signals.received is None:
                time.sleep(0.01)
        return {"point": job.name, "seconds": 0.1}

    monkeypatch.setattr(sweep_module, "run_point", run_point)
    jobs = [
        sweep_module.PointJob(f"p{i}", None, tmp_path, tmp_path, tmp_path, tmp_path)
        for i in range(3)
    ]
    announced, before = [], signal.getsignal(signal.SIGTERM)
    with pytest.raises(sweep_module.SweepInterrupted, match=r"^sweep: stopped by SIGTERM after point p0 finished; rerun the same command to go on$"):  # fmt: skip
        sweep_module.run_points(jobs, 1, 0, lambda job, record: announced.append(job.name))
    assert announced == ["p0"]
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored


def test_a_signal_before_the_loop_starts_reaches_it(monkeypatch):
    """A signal the sweep's handler took (in a point's set-up) is the loop's from its start."""
    from lmpipe.train.guard import StopSignals

    with StopSignals(announce=False) as outer:
        os.kill(os.getpid(), signal.SIGTERM)
        while outer.received is None:
            time.sleep(0.01)
        with StopSignals(announce=False) as inner:
            assert inner.received == "SIGTERM"


def test_ray_points_get_absolute_folders_from_a_relative_out(monkeypatch, pattern_tokens, tmp_path):
    """A Ray task on a cluster runs in its node's working folder: a point's run, record and log
    folders relative to this one would not be found there."""
    from pathlib import Path

    from lmpipe.train.sweep_plan import SweepSettings, parse_grid

    given = []

    def run_on_ray(jobs, cpus, announce):
        given.extend(jobs)
        raise LmpipeError("stopped before training")

    monkeypatch.setattr(sweep_module, "run_on_ray", run_on_ray)
    monkeypatch.chdir(tmp_path)
    settings = SweepSettings(
        recipe="tiny", data=pattern_tokens, overrides=tuple(LONG_POINTS),
        grid=(parse_grid("optimizer.lr=2^-8,2^-4"),), widths=(32,), val_tokens=256,
        engine="ray", jobs=2,
    )  # fmt: skip
    with pytest.raises(LmpipeError, match="^stopped before training$"):
        sweep_module.sweep(settings, Path("sw"))
    work = tmp_path / "sw.partial"
    assert [(j.run_dir, j.record, j.log) for j in given] == [
        (work / "runs" / name, work / "points" / f"{name}.json", work / "logs" / f"{name}.log")
        for name in TRAINING
    ]
