"""`lmpipe plot`: loss.png, the training curves of one or more run folders (optional matplotlib).

Each run in its own colour (tab10, tab20, then a sampled colormap: never two runs alike), against
tokens trained: the training loss (a line; a lone finite step, a one-step run's or one between
skipped steps, as a dot), the held-out loss (markers, one shape per source; past ten sources the
shapes come again hollow), the stage switches (vertical lines labelled with the new seq_len) and,
on a second y axis, the embedding group's learning rate `lr` (eta_base x the schedule; the hidden
rates are fixed ratios of it under muP). Steps whose update was skipped (a non-finite loss or grad
norm: `skipped` in the row) are crosses on the bottom edge. The legend stands right of the axes,
so it hides no data; run names are drawn as typed (a `$` in a folder name is not mathtext).

Only reads: a run may still be training (a torn last line of metrics.jsonl is left out), and the
picture goes outside every folder it reads, as every stage's output does (`check_output`). The
picture's metadata names `lmpipe plot` (MARK): an existing file is replaced only when it is such a
picture, anything else (a symbolic link too) only with `--overwrite`.
"""

from __future__ import annotations

import math
import os
import reprlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.figures import LITERAL, have_matplotlib, literal_legend
from lmpipe.dataprep.folders import check_not_newer, check_output, removed_on_error
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
    check_not_newer(run_dir)  # a finished run's manifest
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


# Held-out marker shapes, one per source; past ten sources the shapes come again, hollow.
SHAPES = "os^Dvp*<>h"
MIN_SIZE = (480, 360)  # below it the title, the axis labels and the legend no longer fit


def marker_of(index: int) -> dict[str, Any]:
    shape = SHAPES[index % len(SHAPES)]
    return {"marker": shape, "fillstyle": "full" if index // len(SHAPES) % 2 == 0 else "none"}


def run_colors(n: int) -> list[Any]:
    """A colour for each of `n` runs, all distinct: tab10, tab20, then a sampled colormap."""
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["turbo"](i / (n - 1)) for i in range(n)]


def isolated(values: tuple[float, ...]) -> list[int]:
    """Indices of finite values with no finite neighbour: a line through them draws nothing."""
    finite = [math.isfinite(v) for v in values]
    return [
        i
        for i, ok in enumerate(finite)
        if ok and not (i > 0 and finite[i - 1]) and not (i + 1 < len(finite) and finite[i + 1])
    ]


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def figure(runs: list[RunCurves], size: tuple[int, int]) -> Any:
    """The matplotlib Figure of `runs`, `size` pixels. Every drawn series carries a gid
    (`loss:NAME`, `val:NAME:SOURCE`, `lr:NAME`, `switch:TOKENS`, `skipped:NAME`) for tests.
    The legend is outside the axes, right of the LR axis: it hides no data and no switch label."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.lines import Line2D
    from matplotlib.ticker import EngFormatter

    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax_lr = ax.twinx()
    colors = run_colors(len(runs))
    sources = list(dict.fromkeys(s for run in runs for s in run.val))
    shapes = {source: marker_of(i) for i, source in enumerate(sources)}
    handles = []
    where_switch: dict[tuple[int, int], list[int]] = {}
    for i, run in enumerate(runs):
        color = colors[i]
        label = run.name + (f" ({len(run.skipped)} skipped)" if run.skipped else "")
        # A finite loss between skipped steps (or a run's only step) is a lone point: a line
        # through it draws nothing, so it gets a marker.
        (line,) = ax.plot(
            run.tokens, run.loss, color=color, lw=1.2, label=label,
            marker="o", ms=3.5, markevery=isolated(run.loss),
        )  # fmt: skip
        line.set_gid(f"loss:{run.name}")
        handles.append(Line2D([], [], color=color, lw=1.2, label=label))  # no lone-point marker
        for source, points in run.val.items():
            xs, ys = zip(*points, strict=True)
            (marks,) = ax.plot(xs, ys, ls="", color=color, mec="black", **shapes[source])
            marks.set_gid(f"val:{run.name}:{source}")
        (rate,) = ax_lr.plot(
            run.tokens, run.lr, color=color, lw=0.9, ls=":", alpha=0.8,
            marker=".", ms=4, markevery=isolated(run.lr),
        )  # fmt: skip
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
        switch_color = colors[owners[0]] if len(owners) == 1 else "0.4"
        ax.axvline(tokens, color=switch_color, ls="--", lw=0.9, alpha=0.8, gid=f"switch:{tokens}")
        ax.annotate(
            f"seq_len {seq_len:,}", (tokens, 0.98), xycoords=ax.get_xaxis_transform(),
            xytext=(3, 0), textcoords="offset points", rotation=90, va="top", fontsize=7,
            color=switch_color,
        )  # fmt: skip
    for source in sources:
        label = f"held-out: {source}"
        handles.append(Line2D([], [], ls="", c="0.6", mec="black", label=label, **shapes[source]))
    handles.append(Line2D([], [], color="0.4", ls=":", label="learning rate (right axis)"))
    if where_switch:
        handles.append(Line2D([], [], color="0.4", ls="--", lw=0.9, label="stage switch"))
    literal_legend(fig, handles=handles, fontsize=7, loc="outside right center")
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_xlabel("tokens trained")
    ax.set_ylabel("loss (nats per token)")
    ax_lr.set_ylabel("learning rate (embeddings, eta_base x schedule)", fontsize=8)
    ax_lr.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if len(runs) == 1:
        title = f"{runs[0].name}, {plural(len(runs[0].tokens), 'step')}"
    else:
        title = f"{len(runs)} runs, {plural(sum(len(run.tokens) for run in runs), 'step')} in all"
    # the figure's title, not the axes': as wide as the picture, above the legend too
    fig.suptitle(f"lmpipe plot: {title}", fontsize=9, **LITERAL)
    return fig


def empty(run: RunCurves) -> bool:
    """Whether the run has no finite loss to draw (every step skipped, no held-out point)."""
    return not run.val and not any(math.isfinite(v) for v in run.loss)


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
    if size[0] < MIN_SIZE[0] or size[1] < MIN_SIZE[1] or max(size) > 10000:
        raise LmpipeError(
            f"--size {size[0]}x{size[1]}: at least {MIN_SIZE[0]}x{MIN_SIZE[1]} (smaller, the "
            "labels and the legend no longer fit) and at most 10,000 pixels a side"
        )
    check_output(out, run_dirs, what="plot")
    runs = [read_curves(d, name) for d, name in zip(run_dirs, run_names(run_dirs), strict=True)]
    if not have_matplotlib():
        raise LmpipeError(NO_MATPLOTLIB)
    fig = figure(runs, size)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with removed_on_error(out.with_name(f".{out.name}.tmp")) as tmp:
            with warnings.catch_warnings():  # layout advice would print matplotlib's file paths
                warnings.simplefilter("ignore", UserWarning)
                fig.savefig(tmp, format=fmt, metadata=METADATA[fmt])
            os.replace(tmp, out)
    except OSError as e:
        raise LmpipeError(f"-o {out}: cannot be written ({e.strerror})") from None
    except Exception as e:  # matplotlib's own failures (text it cannot lay out, ...): one line
        reason = (str(e).strip().splitlines() or [""])[-1][:200]
        raise LmpipeError(f"-o {out}: cannot be drawn ({type(e).__name__}: {reason})") from None
    nothing = [run.name for run in runs if empty(run)]
    note = f" ({', '.join(nothing)}: no finite loss to draw)" if nothing else ""
    Console().print(
        f"plot: {len(runs)} run(s) drawn into {out}{note}", highlight=False, markup=False
    )
    return out
