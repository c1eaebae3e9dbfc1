"""DeepSpeed's op build on the CPU (lmpipe.train.launch `build_comm_op`): a `lock` left by a killed
build, a node without a C++ compiler and an extensions folder that cannot be made are one line and
status 2, not a silent endless wait or a traceback; a live build is waited on; a built op needs no
compiler. Each runs in a subprocess with a timeout, as the old failure is a hang."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# On CUDA DeepSpeed builds no such op (its CUDA accelerator has no ShareMemCommBuilder).
pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="DeepSpeed builds this op on the CPU only"
)

OP = "deepspeed_shm_comm"
BIN = os.path.dirname(sys.executable)  # python, lmpipe and ninja, and no C++ compiler
# A plain process joining its process group, as `lmpipe train` does before its first step.
JOIN = (
    "from lmpipe.train.launch import finish_process, init_distributed, launch_environment\n"
    "with launch_environment():\n"
    "    print('joined', init_distributed())\n"
    "    finish_process()\n"  # DeepSpeed's CPU ranks sometimes abort in interpreter teardown
)


def env_for(extensions: Path, path: str | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": str(extensions),
        "DS_ACCELERATOR": "cpu",
    }
    env.pop("CXX", None)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if path is not None:
        env["PATH"] = path
    return env


def train(
    data: Path, run_dir: Path, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "lmpipe.cli", "train", "--recipe", "tiny", "--data", str(data)]
    return subprocess.run(
        [*command, "--run-dir", str(run_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def built_op(tmp_path_factory) -> Path:
    """An extensions folder holding the built op: a copy of this session's (TORCH_EXTENSIONS_DIR,
    built by any earlier training run), built here first where it is not (a minute, once)."""
    from torch.utils.cpp_extension import _get_build_directory

    folder = Path(_get_build_directory(OP, verbose=False))
    if not (folder / f"{OP}.so").exists():
        subprocess.run([sys.executable, "-c", JOIN], check=True, timeout=600, capture_output=True)
    copy = tmp_path_factory.mktemp("built") / "ext"
    shutil.copytree(folder, copy / OP, ignore=shutil.ignore_patterns("lock"))  # mtimes kept
    return copy


def test_a_lock_left_by_a_killed_build_is_one_line_not_an_endless_wait(tmp_path, pattern_tokens):
    lock = tmp_path / "ext" / OP / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()  # what a build killed by a scheduler leaves: torch's lock, no built op
    run = train(
        pattern_tokens, tmp_path / "run", env_for(tmp_path / "ext"), timeout=60
    )  # not a hang
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines() == [
        f"error: {lock}: left by a killed build of DeepSpeed's {OP} op (no lmpipe process is "
        "building it); delete it if no other program is building there, or set "
        "TORCH_EXTENSIONS_DIR to another folder"
    ]
    assert lock.exists()  # the folder may be another program's too: the user deletes it


def test_no_cpp_compiler_is_one_line_naming_the_folder(tmp_path, pattern_tokens):
    run = train(pattern_tokens, tmp_path / "run", env_for(tmp_path / "ext", path=BIN))
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines() == [
        f"error: DeepSpeed's {OP} op could not be built in {tmp_path / 'ext' / OP} (c++ not found); "
        "load a C++ compiler, or set TORCH_EXTENSIONS_DIR to a writable folder (or one holding "
        "the built op)"
    ]


def test_an_extensions_folder_that_cannot_be_made_is_one_line(tmp_path, pattern_tokens):
    (tmp_path / "file").touch()
    run = train(pattern_tokens, tmp_path / "run", env_for(tmp_path / "file" / "ext"))
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines() == [
        f"error: DeepSpeed's {OP} op could not be built: {tmp_path / 'file'}/ext: Not a directory; "
        "set TORCH_EXTENSIONS_DIR to a writable folder"
    ]


def test_a_built_op_needs_no_compiler(built_op):
    run = subprocess.run(
        [sys.executable, "-c", JOIN],
        env=env_for(built_op, path=BIN),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "joined (0, 1)" in run.stdout


def blocked_in_flock(pid: int) -> bool:
    """Whether process pid waits for an flock: a blocked ("->") FLOCK line of /proc/locks."""
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if fields[1:3] == ["->", "FLOCK"] and fields[5] == str(pid):
            return True
    return False


def test_a_live_build_is_waited_on_not_reported(built_op):
    """Another lmpipe process (a job's rank 0) holds lmpipe's flock and torch's lock while it
    builds; this one waits until it is done and then loads the op."""
    folder = built_op / OP
    lock = folder / "lock"
    fd = os.open(folder / "lmpipe.flock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    lock.touch()
    try:
        waiter = subprocess.Popen(
            [sys.executable, "-c", JOIN],
            env=env_for(built_op),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Its imports take seconds (more on a loaded machine); a fixed sleep that ended before
        # them would pass without the wait being tested.
        until = time.monotonic() + 120
        while not blocked_in_flock(waiter.pid) and waiter.poll() is None:
            assert time.monotonic() < until, "the waiter did not reach lmpipe's flock"
            time.sleep(0.05)
        assert waiter.poll() is None
    finally:
        lock.unlink()
        os.close(fd)  # the build is done
    out, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, err
    assert "joined (0, 1)" in out


def test_without_flock_a_long_wait_names_the_lock(built_op, tmp_path):
    """On a file system without flock a killed build's lock cannot be told from a live one: the
    wait goes on, as torch's does, with a line on stderr naming the lock."""
    lock = built_op / OP / "lock"
    lock.touch()
    script = (
        "import errno, os, threading\n"
        "import deepspeed\n"  # its imports before the clock starts
        "import lmpipe.train.launch as launch\n"
        "def no_flock(fd, op):\n"
        "    raise OSError(errno.ENOLCK, 'No locks available')\n"
        "launch.fcntl.flock = no_flock\n"
        "launch.WAIT_WARNING_S = 1.0\n"
        f"threading.Timer(5, os.remove, [{str(lock)!r}]).start()  # the other build ends\n" + JOIN
    )
    run = subprocess.run(
        [sys.executable, "-c", script],
        env=env_for(built_op),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert [line for line in run.stderr.splitlines() if str(lock) in line] == [
        f"warning: waited 1 s on {lock}; if no process is building DeepSpeed's {OP} op there, "
        "a killed build left it: delete it"
    ]


def test_an_op_prebuilt_into_deepspeed_needs_no_extensions_folder(tmp_path):
    """A DeepSpeed installed with the op built in (DS_BUILD_SHM_COMM=1) imports it: the
    extensions folder is never made, so one that cannot be made is no error (simulated: the
    install's record says so and the op's module is importable)."""
    script = (
        "import sys, types, torch\n"
        "import deepspeed.git_version_info as v\n"
        "from deepspeed.accelerator import get_accelerator\n"
        "v.installed_ops['deepspeed_shm_comm'] = True\n"
        "v.accelerator_name = get_accelerator()._name\n"
        "sys.modules['deepspeed.ops.comm.deepspeed_shm_comm_op'] = types.ModuleType('op')\n"
        "from lmpipe.train.launch import build_comm_op\n"
        "build_comm_op()\n"
        "print('loaded')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script],
        env=env_for(Path("/proc/nope/ext")),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (run.returncode, run.stdout) == (0, "loaded\n"), run.stderr
