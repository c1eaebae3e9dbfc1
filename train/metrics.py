"""What a run shows while it trains: one row per optimizer step in `metrics.jsonl`, the same
scalars as TensorBoard event files in `RUN_DIR/tensorboard/` (when tensorboard is installed), and
the model FLOPs utilisation (MFU) on GPUs.

MFU = model FLOPs per token (`plan.model_flops_per_token`: 6 N plus attention, N without
learned position embeddings) x tokens/s / the world's
peak: the dense bf16 tensor-core peak of one device (the table below, from the vendors' data
sheets, without sparsity; `lmpipe train --peak-tflops X` for any other) times the world size. On
CPUs there is no MFU.

A row's names (`benchmarks/gpu_check.py` and `lmpipe plot` read them): step, tokens, stage,
seq_len, loss, lr, lr_hidden, lr_groups, grad_accum, grad_norm, tokens_per_s, loader_share,
skipped, skipped_steps, and when measured or known: val_loss {source: loss}, mfu, peak_memory_gb,
stop (SIGTERM, SIGINT or guard: the run stopped after this step) and stop_reason (the guard's).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.folders import is_number
from lmpipe.train.checkpoint import MODEL_DIR

TENSORBOARD = "tensorboard"  # the run folder's event-file folder

# Dense bf16 peaks in TFLOP/s by CUDA device name (torch.cuda.get_device_name), first match wins.
PEAK_TFLOPS = (
    (r"H[18]00.*PCIe", 756.0),
    (r"H[12]00 NVL", 835.0),
    (r"H100|H200|H800|GH200", 989.0),  # SXM: 80GB HBM3, H200 141GB
    (r"B200", 2250.0),
    (r"A100|A800", 312.0),
    (r"L40S", 362.0),
    (r"\bL40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
)

# The scalars TensorBoard gets from a row, against the step (val_loss as val_loss/<source>).
SCALARS = (
    "loss",
    "lr",
    "lr_hidden",
    "grad_norm",
    "tokens_per_s",
    "mfu",
    "skipped_steps",
    "loader_share",
    "peak_memory_gb",
    "tokens",
)


def device_peak_tflops(name: str) -> float | None:
    """The dense bf16 peak of a device by its name; None when the table does not know it."""
    for pattern, tflops in PEAK_TFLOPS:
        if re.search(pattern, name):
            return tflops
    return None


def world_peak_flops(world: int, peak_tflops: float | None) -> tuple[float | None, str]:
    """FLOP/s of all ranks together, and the device it is of, for MFU; (None, why) on CPUs
    and on a GPU the table does not know (unless `peak_tflops` is given)."""
    import torch

    if not torch.cuda.is_available():
        return None, "cpu"
    name = torch.cuda.get_device_name()
    per_device = peak_tflops or device_peak_tflops(name)
    if per_device is None:
        return None, f"{name} (peak unknown: pass --peak-tflops)"
    return per_device * 1e12 * world, name


def number(value: Any) -> float | None:
    """A row's value as a float; None for anything but a JSON number a float holds (a bool, a
    string, a list, an integer beyond 1e308: none of them a value the loop writes)."""
    if not is_number(value):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def val_losses(row: dict[str, Any], where: str) -> dict[str, float]:
    """A row's held-out losses ({} where it has none). The loop writes a map of numbers (NaN for a
    diverged source; a split too short to score left out), so anything else is another tool's
    file: a one-line error naming `where`, not a crash in whatever reads the row."""
    value = row.get("val_loss")
    if value is None:
        return {}
    if isinstance(value, dict):
        losses = {source: x for source, v in value.items() if (x := number(v)) is not None}
        if len(losses) == len(value):
            return losses
    raise LmpipeError(
        f"{where}: step {row.get('step')!r} has a 'val_loss' that is not a {{source: loss}} "
        "map of numbers; not lmpipe training metrics"
    )


def device_memory_row(device: Any) -> dict[str, float]:
    """The rank's peak memory in this stage so far, on a GPU (the most allocated at once since
    the stage began: `reset_device_peak`)."""
    import torch

    if device.type != "cuda":
        return {}
    return {"peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 3)}


def reset_device_peak(device: Any) -> None:
    """Start the GPU's peak memory count again at a stage's first step: each stage (2,048 then
    8,192 tokens a sequence) shows its own peak, as `--dry-run` estimates one per stage."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def wait_for_device(device: Any) -> None:
    """Let the GPU finish the queued step, so a step's wall time is its whole time."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MetricsWriter:
    """Rank 0's rows: appended to metrics.jsonl, and written to TensorBoard when it is installed.

    A resumed run (`purge_from`: the first step it runs again) tells TensorBoard to hide the
    events of that step and later that the stopped run wrote after its checkpoint, as
    metrics.jsonl drops those rows (`run_folder.trim_metrics`). Other ranks' writers write nothing."""

    def __init__(self, run_dir: Path, purge_from: int | None, rank: int) -> None:
        self.jsonl, self.board = None, None
        if rank != 0:
            return
        self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the `tensorboard` extra is not installed
            return
        self.board = SummaryWriter(str(run_dir / TENSORBOARD), purge_step=purge_from)

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.board is not None:
            self.board.close()

    def write(self, row: dict[str, Any]) -> None:
        if self.jsonl is None:
            return
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.board is None:
            return
        step = row["step"]
        for name in SCALARS:
            if row.get(name) is not None:
                self.board.add_scalar(name, row[name], step)
        for source, loss in row.get("val_loss", {}).items():
            self.board.add_scalar(f"val_loss/{source}", loss, step)
        self.board.flush()


def print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    """A call's last line (rank 0, stderr): the run's losses, this call's speed, and how it
    ended."""
    from rich.console import Console

    steps, stopped = summary["steps"], summary["stopped"]
    if summary["finished"]:
        done = f"finished; model in {run_dir / MODEL_DIR}"
    elif stopped == "guard":
        done = f"stopped by the guard at step {steps:,}"
    elif stopped:
        done = (
            f"stopped by {stopped} at step {steps:,}; checkpoint {summary['checkpoint']}; "
            "continue with --resume"
        )
    else:
        done = f"stopped at step {steps:,}; continue with --resume"
    first, last = summary["first_loss"], summary["last_loss"]
    losses = f", loss {first:.3f} -> {last:.3f}" if first is not None else ""
    if summary["val_loss"]:
        losses += ", val_loss " + ", ".join(f"{k} {v:.3f}" for k, v in summary["val_loss"].items())
    if summary["lr"] is not None:
        losses += f", last LR {summary['lr']:.3g} (embeddings) {summary['lr_hidden']:.3g} (hidden)"
    if summary["skipped_steps"]:
        losses += f", {summary['skipped_steps']:,} steps skipped (not finite)"
    rate, mfu = summary["tokens_per_s_this_call"], summary["mfu_this_call"]
    speed = f"{rate:,.0f} tokens/s" if rate else "no steps left"
    if mfu is not None:
        speed += f" ({mfu:.1%} MFU)"
    Console(stderr=True).print(
        f"train: {summary['steps_this_call']:,} steps ({summary['tokens']:,} tokens in all){losses}, "
        f"{speed}, {summary['seconds_this_call']:.0f} s; {done}",
        highlight=False,
    )
