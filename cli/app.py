"""`lmpipe`: the command line. Each command parses, then calls one stage function.

The commands live by concept (cli/data.py, training.py, models.py, studies.py); this module lists
them in the order `lmpipe --help` shows. Heavy modules (torch, deepspeed, datasketch, tiktoken) are
imported inside the command bodies, so `lmpipe --help` stays fast; tests/cli/test_app.py checks
that torch is not imported by it.
"""

from __future__ import annotations

import io
import os
import sys
from typing import Annotated

import typer

from lmpipe.cli.data import dedup, inspect, tokenize
from lmpipe.cli.models import eval_, export, generate, import_
from lmpipe.cli.stage import os_error_line
from lmpipe.cli.studies import coord_check, scaling, sweep
from lmpipe.cli.training import demo, plot, recipes, train

app = typer.Typer(
    name="lmpipe",
    help="Pretrain language models the BTLM / Cerebras-GPT way: dedup -> tokenize -> train -> eval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def launcher_options(
    local_rank: Annotated[
        int | None, typer.Option("--local_rank", "--local-rank", hidden=True)
    ] = None,
) -> None:
    """Pretrain language models the BTLM / Cerebras-GPT way: dedup -> tokenize -> train -> eval."""
    # The deepspeed launcher puts --local_rank=N before the command; the rank is taken from the
    # environment (LOCAL_RANK), which that launcher sets as well.


app.command()(dedup)
app.command()(tokenize)
app.command()(inspect)
app.command()(train)
app.command(name="eval")(eval_)
app.command()(generate)
app.command(name="export")(export)
app.command(name="import")(import_)
app.command()(sweep)
app.command()(scaling)
app.command()(plot)
app.command()(recipes)
app.command()(demo)
# A group is listed after the commands, whatever the order it is added in.
mup_app = typer.Typer(name="mup", help="muP's tools: the coordinate check.", no_args_is_help=True)
mup_app.command("coord-check")(coord_check)
app.add_typer(mup_app)


def fill_closed_streams() -> None:
    """/dev/null in place of a standard stream the process was started without (`>&-`, some
    daemons): Python makes such a stream None, so a stage's report would fail after its output
    was published, and the next file opened would take the free descriptor, where a child's
    writes to its stdout (DeepSpeed's op build) would land in it."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
            continue
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
        if null != fd:
            os.dup2(null, fd)  # inheritable, as a standard stream is
            os.close(null)
        else:
            os.set_inheritable(fd, True)  # os.open's are not: children would start without it
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False))


def main() -> None:
    fill_closed_streams()
    # A path that is not UTF-8 (a surrogate escape, as Python decodes it) is printed escaped, as
    # stderr does, where a strict UTF-8 locale would stop the stage at its report.
    if isinstance(sys.stdout, io.TextIOWrapper) and sys.stdout.errors == "strict":
        sys.stdout.reconfigure(errors="backslashreplace")
    # A command's own printing (generate's completions) and the flush at exit meet a full device
    # or a closed pipe under stdout here: one line, as run_stage gives a stage's.
    try:
        try:
            app(prog_name="lmpipe")
        finally:
            sys.stdout.flush()
    except OSError as e:
        typer.echo(f"error: {os_error_line(e)}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
