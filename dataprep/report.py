"""Tables on the console that never cut a number short.

rich fits a table to the console (80 columns when output is not a terminal) by truncating cells
("18,2…"); a count or a token total cut short is worse than a wide line, so a table wider than
the console is printed at its own width.
"""

from __future__ import annotations

from typing import Any


def print_table(console: Any, table: Any) -> None:
    from rich.console import Console

    width = console.measure(table, options=console.options.update(max_width=1000)).maximum
    if width > console.width:
        console = Console(width=width, file=console.file)
    console.print(table)
