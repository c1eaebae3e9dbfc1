"""A training run's processes: the launcher's environment, the process group, and how a launched
rank ends. `lmpipe train` runs as one process (this module gives it the rendezvous variables a
launcher would set) or as one rank of many under torchrun / the deepspeed launcher / SLURM
(docs/multinode.md); every rank runs the same training function (`loop.py`).

On the CPU DeepSpeed compiles its shared-memory op, `deepspeed_shm_comm`, with torch's
cpp_extension at a process's first start (about a minute cold), in
`$TORCH_EXTENSIONS_DIR/deepspeed_shm_comm/` (by default
~/.cache/torch_extensions/py311_cpu/deepspeed_shm_comm/). torch guards that build with a `lock`
file that names no process: one killed while building leaves it behind, and every later start
would wait on it, silently, forever. `build_comm_op` runs the build first, under an flock of
lmpipe's own that the kernel releases when its holder dies, so a leftover `lock` is told from a
live build; a build that fails is one line naming the folder and what to do. On CUDA DeepSpeed
builds nothing: its CUDA accelerator has no ShareMemCommBuilder, so its `build_shm_op` returns
None, and `build_comm_op` returns at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterator

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.train.guard import RunStopped

OP = "deepspeed_shm_comm"
WAIT_WARNING_S = 60.0  # a cold build takes about a minute; a wait much longer than that is suspect
TO_DO = "load a C++ compiler, or set TORCH_EXTENSIONS_DIR to a writable folder (or one holding the built op)"


@contextlib.contextmanager
def launch_environment() -> Iterator[None]:
    """The rendezvous variables a launcher would set (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*),
    for a plain single process, for the duration of a run. DeepSpeed reads them while it
    initialises; removed afterwards, so the process does not look launched to a later run and
    child processes do not inherit a port this process already listens on."""
    own: dict[str, str] = {}
    if "RANK" not in os.environ:
        # Port 0: the one rank's store binds a free port itself. A port picked here and bound
        # later could be taken in between (sweep workers starting side by side).
        own = dict(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="0"
        )
        os.environ.update(own)
    try:
        yield
    finally:
        for key in own:
            os.environ.pop(key, None)


def launch_world_size() -> int:
    """The ranks the launcher started (its WORLD_SIZE); 1 for a plain process."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> tuple[int, int]:
    """Join the process group (created on first use); returns (rank, world size). DeepSpeed's op
    build on the CPU, which precedes it, fails as an `LmpipeError` (`build_comm_op`)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # skips DeepSpeed's accelerator probing
    import deepspeed
    import torch.distributed as dist

    build_comm_op()  # the op DeepSpeed compiles on the CPU, before the rendezvous and its errors
    deepspeed.init_distributed()  # picks gloo on the CPU, nccl on GPUs; a no-op the second time
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return dist.get_rank(), dist.get_world_size()


def build_comm_op() -> None:
    """Build or load the op as `deepspeed.init_distributed` would (deepspeed.comm.torch's
    `build_shm_op`), which then finds it loaded. Raises `LmpipeError` when the build cannot run
    or fails, or when a killed build's `lock` is in the way."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import accelerator_name, installed_ops

    # torch's own choice of folder (TORCH_EXTENSIONS_DIR, or the per-Python, per-accelerator
    # default), which it creates; private, but the folder must be the one torch builds in.
    from torch.utils.cpp_extension import _get_build_directory, get_cxx_compiler

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return  # DeepSpeed will not build it either (CUDA, or a CPU without the op's support)
    if installed_ops.get(builder.NAME, False) and accelerator_name == get_accelerator()._name:
        return  # prebuilt into DeepSpeed's install (DS_BUILD_OPS=1): imported, no folder needed
    try:
        folder = _get_build_directory(builder.NAME, verbose=False)
    except OSError as e:
        raise LmpipeError(
            f"DeepSpeed's {OP} op could not be built: {_reason(e)}; set TORCH_EXTENSIONS_DIR to a "
            "writable folder"
        ) from None
    lock = os.path.join(folder, "lock")
    try:
        with _building(folder, lock):
            compiler = get_cxx_compiler()
            # Without a compiler torch prints a page of warnings and ninja output before it fails;
            # a folder holding the built op needs none (ninja finds nothing to do).
            if not os.path.exists(os.path.join(folder, f"{OP}.so")) and not shutil.which(compiler):
                raise LmpipeError(
                    f"DeepSpeed's {OP} op could not be built in {folder} ({compiler} not found); {TO_DO}"
                )
            builder.load()
    except OSError as e:
        raise LmpipeError(
            f"DeepSpeed's {OP} op could not be built in {folder} ({_reason(e)}); {TO_DO}"
        ) from None
    except (RuntimeError, ImportError) as e:
        raise LmpipeError(
            f"DeepSpeed's {OP} op could not be built in {folder} ({_build_error(e)}); {TO_DO}"
        ) from None


@contextlib.contextmanager
def _building(folder: str, lock: str) -> Iterator[None]:
    """Hold lmpipe's flock on the build folder for the build. Every lmpipe process building or
    loading the op holds it while torch's `lock` can exist, so one that gets it and still finds
    `lock` knows no live lmpipe process made it: a killed build left it. Ranks of one job take
    turns: the first builds, the others then load the built op (a second each)."""
    fd = os.open(os.path.join(folder, "lmpipe.flock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without flock (some network ones): torch's own wait
            with _warn_if_waiting(lock):
                yield
            return
        if os.path.exists(lock):
            # Not removed here: the folder may be shared with programs other than lmpipe, which
            # take no flock, and one of them may be building.
            raise LmpipeError(
                f"{lock}: left by a killed build of DeepSpeed's {OP} op (no lmpipe process is "
                "building it); delete it if no other program is building there, or set "
                "TORCH_EXTENSIONS_DIR to another folder"
            )
        yield
    finally:
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def _warn_if_waiting(lock: str) -> Iterator[None]:
    """Without flock a leftover `lock` cannot be told from a live build; torch waits on it, and a
    line on stderr after a minute names it rather than a silent wait."""

    def warn() -> None:
        if os.path.exists(lock):
            print(
                f"warning: waited {WAIT_WARNING_S:.0f} s on {lock}; if no process is building "
                f"DeepSpeed's {OP} op there, a killed build left it: delete it",
                file=sys.stderr,
                flush=True,
            )

    # Only a lock already there is waited on; a build of this process's own holds it as well.
    timer = threading.Timer(WAIT_WARNING_S, warn) if os.path.exists(lock) else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()


def _reason(e: OSError) -> str:
    return f"{e.filename}: {e.strerror}" if e.filename is not None else (e.strerror or str(e))


def _build_error(e: Exception) -> str:
    """The line of a failed build's output that says why (the compiler's `error:`), else its first."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return next(
        (line for line in lines if "error:" in line or "not found" in line),
        lines[0] if lines else repr(e),
    )


def finish_process(status: int = 0) -> None:
    """End a launched rank cleanly, with exit `status`. DeepSpeed's CPU ranks sometimes abort in interpreter teardown
    after finishing ('terminate called without an active exception', 2 of 20 runs measured); a
    barrier, a flush and an immediate exit avoid it. Only for launcher processes, never in tests."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(status)


def run_rank(train: Callable[[], object]) -> None:
    """Run `train` as this process's work. A rank that a launcher started (torchrun, the
    deepspeed launcher: LOCAL_RANK is set) ends here through `finish_process`, with status 0, or
    2 when the guard stopped the run: every rank stops at the same step (the guard decides on
    all-reduced numbers), so rank 0 alone prints the one line. In a plain process the stop
    reaches the caller as the `LmpipeError` it is."""
    launched = "LOCAL_RANK" in os.environ
    try:
        train()
    except RunStopped as e:
        if not launched:
            raise
        if os.environ.get("RANK") == "0":
            print(f"error: {e}", file=sys.stderr)
        finish_process(2)
    if launched:
        finish_process()


def on_all_ranks(check: Callable[[], object], world: int) -> None:
    """Run a check on every rank (each its share of the work) and fail on every rank if it failed
    on any: a rank that failed alone would leave the others waiting past the process-group timeout."""
    import torch.distributed as dist

    try:
        check()
        error = ""
    except LmpipeError as e:
        error = str(e)
    errors: list[str] = [""] * world
    dist.all_gather_object(errors, error)
    if any(errors):
        raise LmpipeError(next(e for e in errors if e))
