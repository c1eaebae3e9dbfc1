"""`lmpipe plot`: the series drawn are the metrics rows', the picture is a real image of the
requested size outside every run folder it reads, and bad input is one line naming it."""

from __future__ import annotations

import json
import math
import struct
import sys

import pytest
from typer.testing import CliRunner

from lmpipe.cli.app import app
from lmpipe.dataprep.errors import LmpipeError
from lmpipe.train.plot import curves_from_rows, figure, plot, read_curves, run_names
from tests.train.test_loop import SMALL


def synthetic_rows(steps: int = 12, switch: int = 8) -> list[dict]:
    """Rows as the loop writes them: a switch 64 -> 128 after `switch` steps, held-out loss of
    two sources every 4th step, one skipped step with a non-finite loss."""
    rows = []
    for step in range(1, steps + 1):
        stage = 0 if step <= switch else 1
        row = {
            "step": step,
            "tokens": 512 * step,
            "stage": stage,
            "seq_len": 64 if stage == 0 else 128,
            "loss": 10.0 / step,
            "lr": 1e-3 * step,
            "lr_hidden": 1e-4 * step,
            "grad_norm": 1.0,
            "tokens_per_s": 900.0,
            "skipped_steps": 0 if step < 5 else 1,
            "mfu": 0.3,
        }
        if step % 4 == 0:
            row["val_loss"] = {"web": 9.0 / step, "code": 8.0 / step}
        if step == 5:
            row["loss"], row["skipped"] = math.nan, True
        rows.append(row)
    return rows


def write_run(folder, rows, torn: str = ""):
    folder.mkdir(parents=True)
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    (folder / "metrics.jsonl").write_text(lines + torn, encoding="utf-8")
    return folder


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_series_are_the_rows():
    rows = synthetic_rows()
    curves = curves_from_rows("a", rows)
    assert curves.tokens == tuple(512 * s for s in range(1, 13))
    assert math.isnan(curves.loss[4])
    assert [x for i, x in enumerate(curves.loss) if i != 4] == [10.0 / s for s in range(1, 13) if s != 5]  # fmt: skip
    assert curves.lr == tuple(1e-3 * s for s in range(1, 13))
    assert curves.val == {
        "web": ((2048, 9.0 / 4), (4096, 9.0 / 8), (6144, 9.0 / 12)),
        "code": ((2048, 8.0 / 4), (4096, 8.0 / 8), (6144, 8.0 / 12)),
    }
    assert curves.switches == ((512 * 8, 128),)  # stage 1 begins where step 8 ended
    assert curves.skipped == (512 * 5,)


def test_torn_last_line_is_left_out(tmp_path):
    run = write_run(tmp_path / "run", synthetic_rows(), torn='{"step": 13, "tokens": 66')
    curves = read_curves(run, "run")
    assert len(curves.tokens) == 12 and curves.tokens[-1] == 512 * 12


def test_lines_python_cannot_parse_are_left_out_as_a_torn_line_is(tmp_path):
    """A damaged line: an integer past Python's 4,300 digits (ValueError), deep nesting
    (RecursionError); neither is a JSONDecodeError."""
    huge, deep = '{"step": 13, "tokens": 1' + "0" * 5000 + "}", "[" * 100_000
    run = write_run(tmp_path / "run", synthetic_rows(), torn=f"{huge}\n{deep}\n")
    assert read_curves(run, "run").tokens == tuple(512 * s for s in range(1, 13))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lr": "abc"}, "step 3: 'lr' is 'abc', not a number"),
        ({"lr": [1]}, "step 3: 'lr' is [1], not a number"),
        ({"seq_len": "x", "stage": 9}, "step 3: 'seq_len' is 'x', not an integer"),
        ({"loss": 10**400}, "a row without integer 'tokens' and numeric 'loss' (step 3)"),
    ],
)
def test_a_row_with_a_foreign_value_is_one_line(tmp_path, change, message):
    rows = synthetic_rows()
    rows[2] = {**rows[2], **change}
    run = write_run(tmp_path / "run", rows)
    with pytest.raises(LmpipeError) as e:
        plot([run], tmp_path / "loss.png")
    assert str(e.value) == f"{run / 'metrics.jsonl'}: {message}; not lmpipe training metrics"


def test_figure_draws_each_runs_rows():
    pytest.importorskip("matplotlib")
    a = curves_from_rows("a", synthetic_rows())
    b = curves_from_rows("b", synthetic_rows(steps=16, switch=10))
    fig = figure([a, b], (900, 500))
    loss_ax, lr_ax = fig.axes
    lines = {line.get_gid(): line for ax in fig.axes for line in ax.lines}
    for run in (a, b):
        x, y = lines[f"loss:{run.name}"].get_data()
        assert list(x) == list(run.tokens)
        assert [v for v in y if not math.isnan(v)] == [v for v in run.loss if not math.isnan(v)]
        assert lines[f"lr:{run.name}"] in lr_ax.lines
        assert list(lines[f"lr:{run.name}"].get_ydata()) == list(run.lr)
        for source, points in run.val.items():
            marks = lines[f"val:{run.name}:{source}"]
            assert list(zip(marks.get_xdata(), marks.get_ydata(), strict=True)) == list(points)
        assert lines[f"loss:{run.name}"].get_color() == lines[f"lr:{run.name}"].get_color()
    assert lines["loss:a"].get_color() != lines["loss:b"].get_color()
    # one vertical line per switch position, labelled with the stage's seq_len
    switches = {gid: line for gid, line in lines.items() if gid.startswith("switch:")}
    assert set(switches) == {"switch:4096", "switch:5120"}
    assert all(list(line.get_xdata()) == [int(g.split(":")[1])] * 2 for g, line in switches.items())
    labels = [t.get_text() for t in loss_ax.texts]
    assert labels.count("seq_len 128") == 2
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:2] == ["a (1 skipped)", "b (1 skipped)"]
    assert "held-out: web" in legend and "held-out: code" in legend


def test_plot_writes_an_image_of_the_requested_size(tmp_path):
    pytest.importorskip("matplotlib")
    runs = [write_run(tmp_path / n, synthetic_rows()) for n in ("a", "b")]
    out = plot(runs, tmp_path / "pictures" / "loss.png", size=(801, 457))
    assert out == tmp_path / "pictures" / "loss.png"
    assert png_size(out) == (801, 457)
    assert not list(out.parent.glob(".*tmp"))
    assert sorted(p.name for p in runs[0].iterdir()) == ["metrics.jsonl"]  # nothing written there


def test_a_real_run_is_drawn_and_the_cli_says_where(pattern_tokens, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from lmpipe.train.loop import train
    from lmpipe.train.recipe import load_recipe

    run = tmp_path / "runs" / "tiny"
    train(load_recipe("tiny", [*SMALL, "validation={every_tokens: 2048, tokens: 448}"]), pattern_tokens, run)  # fmt: skip
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    curves = read_curves(run, "tiny")
    assert list(curves.tokens) == [r["tokens"] for r in rows]
    assert list(curves.loss) == [r["loss"] for r in rows]
    assert curves.switches == ((512 * 12, 128),)
    assert [t for t, _ in curves.val["data"]] == [r["tokens"] for r in rows if "val_loss" in r]

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["plot", str(run), "--size", "640x480"])
    assert result.exit_code == 0, result.output
    assert "loss.png" in result.output
    assert png_size(tmp_path / "loss.png") == (640, 480)


# Another tool's val_loss in one row (lmpipe writes {source: number}), and the error it gets.
FOREIGN_VAL = {"number": 2.5, "list": [1], "null": {"web": None}}
NOT_A_MAP = (
    r"has a 'val_loss' that is not a \{source: loss\} map of numbers; not lmpipe training metrics"
)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "nope: no such run folder"),
        ("no_metrics", "empty: no metrics.jsonl"),
        ("only_torn", "metrics.jsonl: no complete row yet"),
        ("foreign", "not lmpipe training metrics"),
        *[
            (f"val_{kind}", rf"val_{kind}/metrics.jsonl: step 4 {NOT_A_MAP}")
            for kind in FOREIGN_VAL
        ],
        ("inside", "the plot lies inside"),
        ("twice", "named twice"),
        ("suffix", "name a .png, .svg or .pdf file"),
    ],
)
def test_bad_input_is_one_line_naming_it(tmp_path, case, message):
    good = write_run(tmp_path / "good", synthetic_rows())
    (tmp_path / "empty").mkdir()
    write_run(tmp_path / "torn", [], torn='{"step": 1, "tok')
    write_run(tmp_path / "foreign", [{"step": 1, "loss": "low"}])
    for kind, value in FOREIGN_VAL.items():
        rows = [{**r, "val_loss": value} if r["step"] == 4 else r for r in synthetic_rows()]
        write_run(tmp_path / f"val_{kind}", rows)
    runs, out = {
        "missing": ([tmp_path / "nope"], tmp_path / "loss.png"),
        "no_metrics": ([tmp_path / "empty"], tmp_path / "loss.png"),
        "only_torn": ([tmp_path / "torn"], tmp_path / "loss.png"),
        "foreign": ([tmp_path / "foreign"], tmp_path / "loss.png"),
        **{
            f"val_{kind}": ([tmp_path / f"val_{kind}"], tmp_path / "loss.png")
            for kind in FOREIGN_VAL
        },
        "inside": ([good], good / "loss.png"),
        "twice": ([good, tmp_path / "good"], tmp_path / "loss.png"),
        "suffix": ([good], tmp_path / "loss.txt"),
    }[case]
    with pytest.raises(LmpipeError, match=message) as e:
        plot(runs, out)
    assert "\n" not in str(e.value)
    assert not out.exists()


def test_without_matplotlib_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run", synthetic_rows())
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    result = CliRunner().invoke(app, ["plot", str(run), "-o", str(tmp_path / "loss.png")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: lmpipe plot draws with matplotlib, which is not installed: pip install 'lmpipe[plot]'"
    ]
    assert not (tmp_path / "loss.png").exists()


def test_runs_with_the_same_folder_name_are_told_apart_by_path(tmp_path):
    assert run_names([tmp_path / "x" / "a", tmp_path / "y" / "b"]) == ["a", "b"]
    same = [tmp_path / "x" / "run", tmp_path / "y" / "run"]
    assert run_names(same) == [str(p) for p in same]
