"""A training run's processes: the launcher's environment, the process group, and how a launched
rank ends. `lmpipe train` runs as one process (this module gives it the rendezvous variables a
launcher would set) or as one rank of many under torchrun / the deepspeed launcher / SLURM
(docs/multinode.md); every rank runs the same training function (`loop.py`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.train.guard import RunStopped


@contextlib.contextmanager
def launch_environment() -> Iterator[None]:
    """The rendezvous variables a launcher would set (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*),
    for a plain single process, for the duration of a run. DeepSpeed reads them while it
    initialises; removed afterwards, so the process does not look launched to a later run and
    child processes do not inherit a port this process already listens on."""
    own: dict[str, str] = {}
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        own = dict(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
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
    """Join the process group (created on first use); returns (rank, world size)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # skips DeepSpeed's accelerator probing
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed()  # picks gloo on the CPU, nccl on GPUs; a no-op the second time
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return dist.get_rank(), dist.get_world_size()


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
