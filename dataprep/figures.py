"""What every lmpipe picture shares: user text drawn literally, and a picture that never costs the
job that draws it.

Run folders, recipe paths and names, source names and swept values are the user's: matplotlib
would read a `$...$` in them as mathtext (garbled, or an exception), so they go into Text objects
with `parse_math=False` (`literal`, `literal_legend`). The pictures drawn at the end of a long job
(sweep.png, coord.png, fit.png, long_context.png, clusters.png) are by-products of results already
written: `draw_picture` turns a failure to draw one into a warning line on stderr, and no file.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Keyword arguments for a Text holding user text: drawn as typed, never as mathtext.
LITERAL: dict[str, Any] = {"parse_math": False}


def literal_legend(owner: Any, **kwargs: Any) -> Any:
    """`owner.legend(**kwargs)` (an Axes or a Figure) with every entry drawn literally."""
    legend = owner.legend(**kwargs)
    for text in legend.get_texts():
        text.set_parse_math(False)
    return legend


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def no_matplotlib(path: Path) -> str:
    return f"no {path.name}: matplotlib is not installed (pip install 'lmpipe[plot]')"


def draw_picture(path: Path, draw: Callable[[Path], Any]) -> bool:
    """Draw a job's picture into `path` with `draw(path)`; True when it is there. Without
    matplotlib, or when drawing fails, one line on stderr says why and there is no file."""
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    if not have_matplotlib():
        console.print(no_matplotlib(path), markup=False)
        return False
    try:
        with warnings.catch_warnings():  # layout advice would print matplotlib's file paths
            warnings.simplefilter("ignore", UserWarning)
            draw(path)
    except Exception as e:  # any failure: the job's results are written, only the picture is lost
        Path(path).unlink(missing_ok=True)
        reason = (str(e).strip().splitlines() or [""])[-1][:200]
        console.print(
            f"warning: {Path(path).name} not drawn ({type(e).__name__}: {reason}); "
            "the results are complete without it",
            markup=False,
        )
        return False
    return True
