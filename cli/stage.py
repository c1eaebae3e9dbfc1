"""How a command calls its stage, and the options several commands share.

A stage raises `LmpipeError` for a user's mistake; `run_stage` turns it into one line on stderr
and exit status 2, an `OSError` (a full disk, a file-size limit, no permission, stdout on a full
device) into one line naming the path and the reason, also status 2, and Ctrl-C into status 130.
The shared options (`Recipe`, `Sets`, `Overwrite`, ...) and `parse_list` give every command the
same names, help and errors.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from lmpipe.dataprep.errors import WRITE_ERRNOS, LmpipeError

T = TypeVar("T")


def os_error_line(e: OSError) -> str:
    """`PATH: cannot be written (File too large)` for an OSError. One without a file name is a
    write to standard output (on a full device) or to a stage's file through an open handle,
    which the stages name where they can (`writing_into`: the work or run folder, with "(or
    standard output)" when standard output is a file too, as the two cannot be told apart)."""
    reason = e.strerror or str(e)  # no strerror: numpy's "N requested and M written"
    written = e.errno in WRITE_ERRNOS or e.errno is None
    if e.filename is None:
        return f"output cannot be written ({reason})" if written else reason
    where = _name(e.filename)
    if e.filename2 is not None:
        where += f" -> {_name(e.filename2)}"
    return f"{where}: cannot be written ({reason})" if written else f"{where}: {reason}"


def _name(filename: Any) -> str:
    return os.fsdecode(filename) if isinstance(filename, bytes) else str(filename)


def run_stage(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call a stage; a user error or an OSError becomes one line on stderr and exit status 2."""
    try:
        result = fn(*args, **kwargs)
        sys.stdout.flush()  # stdout on a full device fails here, as the line below, not at exit
        return result
    except LmpipeError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except OSError as e:
        typer.echo(f"error: {os_error_line(e)}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: the output folder was not published", err=True)
        raise typer.Exit(130) from None


def parse_list(option: str, text: str | None, kind: Callable[[str], T]) -> tuple[T, ...]:
    """A comma-separated option (`--widths 128,256`) as a tuple of `kind` (int, float or str)."""
    if not text:
        return ()
    try:
        return tuple(kind(v.strip()) for v in text.split(",") if v.strip())
    except ValueError:
        words: dict[Callable[[str], object], str] = {int: "integers", float: "numbers"}
        raise LmpipeError(f"{option} {text!r}: comma-separated {words[kind]}") from None


RECIPE_HELP = "A shipped recipe name (`lmpipe recipes` lists them) or a YAML file."
Recipe = Annotated[str, typer.Option(help=RECIPE_HELP)]
Sets = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe value: --set model.n_layers=4 (repeatable)."),
]
Inputs = Annotated[
    list[Path],
    typer.Argument(
        metavar="INPUT",
        help="Input .jsonl / .jsonl.zst / .jsonl.gz / .parquet files or folders (searched recursively).",
    ),
]
Overwrite = Annotated[
    bool, typer.Option("--overwrite", help="Replace the output folder if it exists.")
]
Strict = Annotated[
    bool,
    typer.Option(
        "--strict/--skip-invalid",
        help="Stop at the first bad line (not JSON, not UTF-8, no string 'text', an empty or "
        "truncated file) with its file and line; by default bad lines are counted per file, "
        "reported and listed, and the rest is processed.",
    ),
]
