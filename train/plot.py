"""`lmpipe plot`: loss.png, the training curves of one or more run folders (optional matplotlib).

Each run in its own colour, against tokens trained: the training loss (a line), the held-out loss
(markers, one shape per source), the stage switches (vertical lines labelled with the new seq_len)
and, on a second y axis, the embedding group's learning rate `lr` (eta_base x the schedule; the
hidden rates are fixed ratios of it under muP). Steps whose update was skipped (a non-finite loss
or grad norm: `skipped` in the row) are crosses on the bottom edge.

Only reads: a run may still be training (a torn last line of metrics.jsonl is left out), and the
picture goes outside every folder it reads, as every stage's output does (`check_output`). The
picture's metadata names `lmpipe plot` (MARK): an existing file is replaced only when it is such a
picture, anything else (a symbolic link too) only with `--overwrite`.
"""

from __future__ import annotations

import math
import os
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.folders import check_output, removed_on_error
from lmpipe.train.metrics import number, val_losses
from lmpipe.train.run_folder import metrics_rows

PNG = "loss.png"
FORMATS = ("png", "svg", "pdf")  # what matplotlib writes without extra libraries
DPI = 100
# The software named in the picture (png: Software; svg, pdf: Creator): it marks a file `plot` may
# replace, and leaves out matplotlib's version, as the manifests leave out times.
MARK = "lmpipe plot"
METADATA = {"png": {"Software": MARK}, "svg": {"Creator": MARK}, "pdf": {"Creator": MARK}}
# How each format writes MARK: png and svg near the start, pdf in its Info near the end.
WRITTEN_MARKS = (
    b"tEXtSoftware\x00" + MARK.encode(),
    f"<dc:title>{MARK}</dc:title>".encode(),
    f"/Creator ({MARK})".encode(),
)
NO_MATPLOTLIB = "lmpipe plot draws with matplotlib, which is not installed: pip install 'lmpipe[plot]'"  # fmt: skip


@dataclass(frozen=True)
class RunCurves:
    """What the plot draws of one run, in metrics order; a pure function of its rows."""

    name: str
    tokens: tuple[int, ...]  # after each step
    loss: tuple[float, ...]  # training loss of the step (NaN where it was not finite)
    lr: tuple[float, ...]  # the embedding group's rate the step ran at
    val: dict[str, tuple[tuple[int, float], ...]]  # source -> (tokens, held-out loss)
    switches: tuple[tuple[int, int], ...]  # (tokens where a stage begins, its seq_len)
    skipped: tuple[int, ...]  # tokens at steps whose update was skipped


def curves_from_rows(name: str, rows: list[dict[str, Any]], where: str = "") -> RunCurves:
    """The series of one run's metrics rows; an error naming `where` for a row that is not one."""
    tokens, loss, lr, skipped = [], [], [], []
    val: dict[str, list[tuple[int, float]]] = {}
    switches = []
    previous: dict[str, Any] | None = None
    for row in rows:
        t, step_loss = row.get("tokens"), number(row.get("loss"))
        rate = number(row.get("lr") or 0.0)
        if not isinstance(t, int) or step_loss is None:
            raise LmpipeError(
                f"{where or name}: a row without integer 'tokens' and numeric 'loss' "
                f"(step {row.get('step')!r}); not lmpipe training metrics"
            )
        seq_len = row.get("seq_len") or 0
        if rate is None or not isinstance(seq_len, int):
            key, what = ("lr", "a number") if rate is None else ("seq_len", "an integer")
            raise LmpipeError(
                f"{where or name}: step {row.get('step')!r}: {key!r} is {reprlib.repr(row[key])}, "
                f"not {what}; not lmpipe training metrics"
            )
        tokens.append(t)
        loss.append(step_loss if math.isfinite(step_loss) else math.nan)
        lr.append(rate)
        if row.get("skipped") or not math.isfinite(step_loss):
            skipped.append(t)
        for source, value in val_losses(row, where or name).items():
            if math.isfinite(value):  # a diverged source's NaN: no marker
                val.setdefault(source, []).append((t, float(value)))
        if previous is not None and row.get("stage") != previous.get("stage"):
            switches.append((previous["tokens"], seq_len))
        previous = row
    return RunCurves(
        name, tuple(tokens), tuple(loss), tuple(lr),
        {source: tuple(points) for source, points in val.items()}, tuple(switches), tuple(skipped),
    )  # fmt: skip


def read_curves(run_dir: Path, name: str) -> RunCurves:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LmpipeError(f"{run_dir}: no such run folder")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise LmpipeError(
            f"{run_dir}: no metrics.jsonl, so nothing to plot (not a run folder, or a run that "
            "has not finished a step)"
        )
    rows = metrics_rows(run_dir)
    if not rows:
        raise LmpipeError(f"{path}: no complete row yet, so nothing to plot")
    return curves_from_rows(name, rows, where=str(path))


def run_names(run_dirs: list[Path]) -> list[str]:
    """The legend's names: each folder's own name, or the paths as given where two names clash."""
    names = [Path(d).resolve().name or str(d) for d in run_dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in run_dirs]


def figure(runs: list[RunCurves], size: tuple[int, int]) -> Any:
    """The matplotlib Figure of `runs`, `size` pixels. Every drawn series carries a gid
    (`loss:NAME`, `val:NAME:SOURCE`, `lr:NAME`, `switch:TOKENS`, `skipped:NAME`) for tests."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.lines import Line2D
    from matplotlib.ticker import EngFormatter

    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI)
    ax = fig.add_subplot()
    ax_lr = ax.twinx()
    colors = colormaps["tab10"]
    sources = list(dict.fromkeys(s for run in runs for s in run.val))
    shapes = dict(zip(sources, "os^Dvp*<>h", strict=False))
    handles = []
    where_switch: dict[tuple[int, int], list[int]] = {}
    for i, run in enumerate(runs):
        color = colors(i % 10)
        label = run.name + (f" ({len(run.skipped)} skipped)" if run.skipped else "")
        (line,) = ax.plot(run.tokens, run.loss, color=color, lw=1.2, label=label)
        line.set_gid(f"loss:{run.name}")
        handles.append(line)
        for source, points in run.val.items():
            xs, ys = zip(*points, strict=True)
            (marks,) = ax.plot(xs, ys, ls="", marker=shapes[source], color=color, mec="black")
            marks.set_gid(f"val:{run.name}:{source}")
        (rate,) = ax_lr.plot(run.tokens, run.lr, color=color, lw=0.9, ls=":", alpha=0.8)
        rate.set_gid(f"lr:{run.name}")
        if run.skipped:
            # x in tokens, y on the axes' bottom edge, whatever the loss range
            ax.scatter(
                run.skipped, [0.0] * len(run.skipped), marker="x", color=color,
                transform=ax.get_xaxis_transform(), clip_on=False, gid=f"skipped:{run.name}",
            )  # fmt: skip
        for switch in run.switches:
            where_switch.setdefault(switch, []).append(i)
    for (tokens, seq_len), owners in sorted(where_switch.items()):
        # a switch several runs share is drawn once, in grey
        switch_color = colors(owners[0] % 10) if len(owners) == 1 else "0.4"
        ax.axvline(tokens, color=switch_color, ls="--", lw=0.9, alpha=0.8, gid=f"switch:{tokens}")
        ax.annotate(
            f"seq_len {seq_len:,}", (tokens, 0.98), xycoords=ax.get_xaxis_transform(),
            xytext=(3, 0), textcoords="offset points", rotation=90, va="top", fontsize=7,
            color=switch_color,
        )  # fmt: skip
    for source in sources:
        label = f"held-out: {source}"
        handles.append(
            Line2D([], [], ls="", marker=shapes[source], c="0.6", mec="black", label=label)
        )
    handles.append(Line2D([], [], color="0.4", ls=":", label="learning rate (right axis)"))
    ax.legend(handles=handles, fontsize=7, loc="upper right")
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_xlabel("tokens trained")
    ax.set_ylabel("loss (nats per token)")
    ax_lr.set_ylabel("learning rate (embeddings, eta_base x schedule)", fontsize=8)
    ax_lr.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    steps = sum(len(run.tokens) for run in runs)
    title = runs[0].name if len(runs) == 1 else f"{len(runs)} runs"
    switches = "; dashed: stage switches" if where_switch else ""
    ax.set_title(f"lmpipe plot: {title}, {steps:,} steps{switches}", fontsize=9)
    fig.tight_layout()
    return fig


def drawn_by_plot(path: Path, window: int = 1 << 16) -> bool:
    """Whether the file `path` is a picture an earlier `lmpipe plot` drew (its MARK, looked for
    in its first and last `window` bytes)."""
    try:
        with path.open("rb") as f:
            head = f.read(window)
            f.seek(max(0, f.seek(0, os.SEEK_END) - window))
            tail = f.read()
    except OSError:
        return False
    return any(mark in head or mark in tail for mark in WRITTEN_MARKS)


def plot(
    run_dirs: list[Path],
    out: Path = Path(PNG),
    size: tuple[int, int] = (1200, 700),
    overwrite: bool = False,
) -> Path:
    """Draw the runs into `out` (written whole, then renamed into place) and say where. An
    existing `out` is replaced when an earlier `plot` drew it, anything else only with
    `overwrite`."""
    from rich.console import Console

    run_dirs, out = [Path(d) for d in run_dirs], Path(out)
    if not run_dirs:
        raise LmpipeError("lmpipe plot: name at least one run folder")
    seen: set[Path] = set()
    for d in run_dirs:
        if d.resolve() in seen:
            raise LmpipeError(f"{d}: named twice")
        seen.add(d.resolve())
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise LmpipeError(f"-o {out}: name a .png, .svg or .pdf file")
    if out.is_dir():
        raise LmpipeError(f"-o {out}: is a folder; name the picture file")
    if out.is_symlink() and not overwrite:
        raise LmpipeError(f"-o {out}: is a symbolic link; pass --overwrite to replace the link")
    if out.exists() and not overwrite and not drawn_by_plot(out):
        raise LmpipeError(
            f"-o {out}: exists and is not a picture `lmpipe plot` drew; pass --overwrite to "
            "replace it"
        )
    if min(size) < 100 or max(size) > 10000:
        raise LmpipeError(f"--size {size[0]}x{size[1]}: each side between 100 and 10,000 pixels")
    check_output(out, run_dirs, what="plot")
    runs = [read_curves(d, name) for d, name in zip(run_dirs, run_names(run_dirs), strict=True)]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise LmpipeError(NO_MATPLOTLIB) from None
    fig = figure(runs, size)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with removed_on_error(out.with_name(f".{out.name}.tmp")) as tmp:
            fig.savefig(tmp, format=fmt, metadata=METADATA[fmt])
            os.replace(tmp, out)
    except OSError as e:
        raise LmpipeError(f"-o {out}: cannot be written ({e.strerror})") from None
    Console().print(f"plot: {len(runs)} run(s) drawn into {out}", highlight=False, markup=False)
    return out
