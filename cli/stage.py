"""How a command calls its stage, and the options several commands share.

A stage raises `LmpipeError` for a user's mistake; `run_stage` turns it into one line on stderr
and exit status 2, and Ctrl-C into exit status 130.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from lmpipe.dataprep.errors import LmpipeError

T = TypeVar("T")


def run_stage(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call a stage; a user error becomes one line on stderr and exit status 2."""
    try:
        return fn(*args, **kwargs)
    except LmpipeError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: the output folder was not published", err=True)
        raise typer.Exit(130) from None


Inputs = Annotated[
    list[Path],
    typer.Argument(
        help="Input .jsonl / .jsonl.zst / .jsonl.gz / .parquet files or folders (searched recursively)."
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
