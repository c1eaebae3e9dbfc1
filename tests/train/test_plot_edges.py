"""The pictures at their edges: many runs and sources, user text with `$`, lone points, small
sizes, and a picture that cannot be drawn at the end of a long job (a warning, never a lost job).
"""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from lmpipe.cli.app import app
from lmpipe.dataprep.errors import LmpipeError
from lmpipe.train.plot import curves_from_rows, figure, plot
from tests.train.test_plot import png_size, synthetic_rows, write_run

pytest.importorskip("matplotlib")


@pytest.fixture
def drawn(monkeypatch):
    """Every Figure saved while the test runs, in order (saved as usual)."""
    from matplotlib.figure import Figure

    figures, save = [], Figure.savefig

    def keep(self, *args, **kwargs):
        figures.append(self)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def rows_of(losses, val=None):
    """One row per loss (step 1, 2, ...), 256 tokens a step; `val`: {step: {source: loss}}."""
    val = val or {}
    rows = []
    for i, loss in enumerate(losses, start=1):
        row = {"step": i, "tokens": 256 * i, "stage": 0, "seq_len": 64, "loss": loss, "lr": 1e-3}
        if not math.isfinite(loss):
            row["skipped"] = True
        if i in val:
            row["val_loss"] = val[i]
        rows.append(row)
    return rows


def test_eleven_held_out_sources_each_get_their_own_marker(tmp_path, drawn):
    sources = {f"src{k:02d}": 9.0 - k / 10 for k in range(11)}
    run = write_run(tmp_path / "mix", rows_of([10.0, 9.5, 9.0], val={3: sources}))
    plot([run], tmp_path / "mix.png")  # the 11th source had no shape: KeyError
    lines = {line.get_gid(): line for ax in drawn[0].axes for line in ax.lines}
    looks = {(lines[f"val:mix:{s}"].get_marker(), lines[f"val:mix:{s}"].get_fillstyle()) for s in sources}  # fmt: skip
    assert len(looks) == 11


@pytest.mark.parametrize("name", ["bad$\\q$", "lr$2^-8$"])
def test_a_folder_name_with_dollars_is_drawn_as_typed(tmp_path, drawn, name):
    run = write_run(tmp_path / name, synthetic_rows())
    plot([run], tmp_path / "loss.png")  # mathtext: "\q" raised, "$2^-8$" was a superscript
    (fig,) = drawn
    legend = fig.legends[0].get_texts()
    assert legend[0].get_text() == f"{name} (1 skipped)"
    assert fig.get_suptitle() == f"lmpipe plot: {name}, 12 steps"
    assert not any(t.get_parse_math() for t in [*legend, fig._suptitle])  # drawn as typed


def test_twelve_runs_have_twelve_colours():
    runs = [curves_from_rows(f"r{k}", synthetic_rows()) for k in range(12)]
    fig = figure(runs, (900, 500))
    colours = {line.get_gid(): line.get_color() for line in fig.axes[0].lines}
    assert len({colours[f"loss:r{k}"] for k in range(12)}) == 12  # tab10 gave r0 and r10 one


def test_the_legend_is_beside_the_axes_so_it_hides_no_data_or_switch_label():
    a = curves_from_rows("a", synthetic_rows())
    fig = figure([a], (640, 480))
    fig.draw_without_rendering()
    legend = fig.legends[0].get_window_extent()
    for ax in fig.axes:
        assert legend.x0 >= ax.get_window_extent().x1  # right of both axes
    (label,) = fig.axes[0].texts
    assert label.get_text() == "seq_len 128" and not label.get_window_extent().overlaps(legend)


def test_a_lone_finite_step_has_a_marker():
    one = curves_from_rows("one", rows_of([10.29]))
    gap = curves_from_rows("gap", rows_of([10.0, 9.0, math.nan, 8.5, math.nan, 8.0, 7.5]))
    fig = figure([one, gap], (640, 480))
    lines = {line.get_gid(): line for ax in fig.axes for line in ax.lines}
    assert lines["loss:one"].get_marker() == "o" and lines["loss:one"].get_markevery() == [0]
    assert lines["lr:one"].get_markevery() == [0]  # a one-step run's LR is a lone point too
    assert lines["loss:gap"].get_markevery() == [3]  # step 4, between two skipped steps
    assert lines["lr:gap"].get_markevery() == []


def test_a_run_with_nothing_finite_is_named_in_the_printed_line(tmp_path, capsys):
    good = write_run(tmp_path / "good", synthetic_rows())
    bad = write_run(tmp_path / "nan", rows_of([math.nan, math.nan]))
    plot([good, bad], tmp_path / "loss.png")
    assert capsys.readouterr().out.split() == (
        f"plot: 2 run(s) drawn into {tmp_path / 'loss.png'} (nan: no finite loss to draw)".split()
    )


def test_the_title_counts_steps_in_words():
    one = curves_from_rows("one", rows_of([10.0]))
    assert figure([one], (640, 480)).get_suptitle() == "lmpipe plot: one, 1 step"
    two = [one, curves_from_rows("two", rows_of([10.0, 9.0]))]
    assert figure(two, (640, 480)).get_suptitle() == "lmpipe plot: 2 runs, 3 steps in all"


@pytest.mark.parametrize("size", ["100x100", "479x600", "600x359"])
def test_a_size_too_small_to_read_is_one_line_naming_the_minimum(tmp_path, size):
    run = write_run(tmp_path / "run", synthetic_rows())
    result = CliRunner().invoke(app, ["plot", str(run), "--size", size, "-o", str(tmp_path / "x.png")])  # fmt: skip
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: --size {size}: at least 480x360 (smaller, the labels and the legend no longer "
        "fit) and at most 10,000 pixels a side"
    ]
    assert not (tmp_path / "x.png").exists()


def test_the_smallest_size_draws_without_warnings(tmp_path, recwarn):
    runs = [write_run(tmp_path / f"run{k}", synthetic_rows()) for k in range(12)]
    out = plot(runs, tmp_path / "loss.png", size=(480, 360))
    assert png_size(out) == (480, 360)
    assert [str(w.message) for w in recwarn] == []


def test_a_drawing_failure_in_plot_is_one_line(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def fail(*args, **kwargs):
        raise ValueError("cannot lay out\nthis text")

    monkeypatch.setattr(Figure, "savefig", fail)
    run = write_run(tmp_path / "run", synthetic_rows())
    with pytest.raises(LmpipeError) as e:
        plot([run], tmp_path / "loss.png")
    assert str(e.value) == f"-o {tmp_path / 'loss.png'}: cannot be drawn (ValueError: this text)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# sweep.png


def sweep_rows():
    """Two groups, lr 2^-8, 0.02, 2^-5 and 1e4; every point at 1e4 diverged, twice in `sp w32`."""
    rows = []
    for g, param in enumerate(("mup", "sp")):
        for k, lr in enumerate((2.0**-8, 0.02, 2.0**-5, 1e4, 1e4)):
            if param == "mup" and k == 4:
                continue
            loss = None if lr == 1e4 else 10.0 - k - g / 2
            rows.append({
                "point": f"{len(rows):04d}-{param}-w32", "param": param, "width": 32,
                "density": 1.0, "values": {"optimizer.lr": lr}, "set": [], "run_dir": "runs/x",
                "finished": True, "diverged": loss is None, "train_loss": loss,
                "heldout_loss": loss, "val_loss": {}, "tokens": 512, "parameters": 1,
                "flops": 1, "seconds": 1.0, "train_seconds": 1.0, "stopped": None,
            })  # fmt: skip
    return rows


PLAN = {"recipe": "rec/t$\\q$.yaml", "set": [], "data": [], "keys": ["optimizer.lr"]}


def test_a_sweep_recipe_path_with_dollars_is_drawn_as_typed(tmp_path, drawn):
    from lmpipe.train.sweep_report import write_report

    write_report(tmp_path, PLAN, sweep_rows())  # "\q" raised in mathtext: no sweep.png, no sweep
    assert png_size(tmp_path / "sweep.png")
    (fig,) = drawn
    assert fig.get_suptitle().startswith("lmpipe sweep rec/t$\\q$.yaml: 9 points, 3 diverged")
    assert not fig._suptitle.get_parse_math()


def test_a_sweep_whose_picture_fails_is_still_written_with_one_warning(tmp_path, monkeypatch, capsys):  # fmt: skip
    from matplotlib.figure import Figure

    from lmpipe.train.sweep_report import write_report

    def fail(*args, **kwargs):
        raise ValueError("ParseFatalException: Unknown symbol: \\q")

    monkeypatch.setattr(Figure, "savefig", fail)
    report = write_report(tmp_path, {**PLAN, "recipe": "tiny"}, sweep_rows())
    assert report["optimum"][0]["best"] == "0002-mup-w32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.csv", "sweep.json"]
    assert (
        capsys.readouterr().err.split()
        == (
            "warning: sweep.png not drawn (ValueError: ParseFatalException: Unknown symbol: \\q); "
            "the results are complete without it"
        ).split()
    )


def test_sweep_ticks_are_the_swept_values_and_diverged_points_keep_their_group(tmp_path, drawn):
    from lmpipe.train.sweep_report import write_png

    rows = sweep_rows()
    report = {**PLAN, "recipe": "tiny", "objective": "heldout_loss", "points": rows}
    assert write_png(tmp_path / "sweep.png", report)
    (ax,) = drawn[0].axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.00390625", "0.02", "0.03125", "10000"]  # fmt: skip
    lines = {line.get_label(): line.get_color() for line in ax.lines}
    crosses = [c for c in ax.collections if len(c.get_offsets()) and c.get_offsets()[0][0] == 1e4]
    assert len(crosses) == 2  # one per group, each in its group's colour, on its own row
    assert [tuple(c.get_facecolor()[0]) for c in crosses] == [lines["mup w32"], lines["sp w32"]]
    assert crosses[0].get_offsets()[0][1] != crosses[1].get_offsets()[0][1]
    assert [t.get_text() for t in ax.texts] == ["2"]  # sp w32's cross stands for two points


def test_a_random_search_keeps_the_axis_own_ticks(tmp_path, drawn):
    """40 values, one a point: labelled each, they would overlap."""
    from lmpipe.train.sweep_report import write_png

    point = sweep_rows()[0]
    rows = [{**point, "values": {"optimizer.lr": 2.0 ** (-12 + i / 4)}} for i in range(40)]
    assert write_png(tmp_path / "sweep.png", {**PLAN, "objective": "heldout_loss", "points": rows})
    (ax,) = drawn[0].axes
    shown = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert 2 <= len(shown) <= 8


# coord.png, clusters.png, fit.png, long_context.png


def test_coord_panels_have_labelled_y_ticks_inside_their_range(tmp_path, drawn):
    from lmpipe.train.coord_check import write_coord_png

    coords = {"attn.0": {"32": [0.033, 0.034], "64": [0.036, 0.035], "128": [0.038, 0.037]}}
    report = {"recipe": "r$x$", "widths": [32, 64, 128], "steps": 2,
              "params": {"mup": {"coords": coords, "slopes": {"attn.0": 0.1}}}}  # fmt: skip
    assert write_coord_png(report, tmp_path / "coord.png")
    (ax,) = drawn[0].axes
    low, high = ax.get_ylim()
    inside = [t for t in ax.get_yticks() if low <= t <= high]
    assert [f"{t:g}" for t in inside] == ["0.02", "0.05", "0.1"]  # was one label: 10^-1
    labels = [t.get_text() for t in ax.get_yticklabels() if low <= t.get_position()[1] <= high]
    assert labels == ["0.02", "0.05", "0.1"]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("d_model", "mean |x|")
    assert "r$x$" in drawn[0].get_suptitle()


def test_cluster_sizes_are_whole_numbers_and_one_cluster_is_singular(tmp_path, drawn):
    from lmpipe.dataprep.cluster_plot import write_cluster_png

    assert write_cluster_png({"2": 1}, tmp_path / "clusters.png")
    fig = drawn[0]
    fig.draw_without_rendering()
    (ax,) = fig.axes
    low, high = ax.get_xlim()
    assert [t for t in ax.get_xticks() if low <= t <= high] == [2]
    assert ax.get_title() == "lmpipe dedup: 1 duplicate cluster, largest 2"


def test_fit_loss_ticks_are_plain_numbers(tmp_path, drawn):
    from lmpipe.train.scaling import write_fit_png

    report = {"runs": [{"flops": f, "loss": v} for f, v in [(1e10, 8.0), (1e11, 7.0), (1e12, 6.2)]],
              "fit": {"a": 1e5, "b": -0.1, "c": 1.0}, "published": None, "loss": "heldout"}  # fmt: skip
    assert write_fit_png(tmp_path / "fit.png", report)
    fig = drawn[0]
    fig.draw_without_rendering()
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_yticklabels(which="both") if t.get_text()]
    assert labels and all(text.replace(".", "").isdigit() for text in labels), labels


def test_a_long_context_picture_that_fails_is_a_warning(tmp_path, monkeypatch, capsys):
    from matplotlib.figure import Figure

    from lmpipe.evals.perplexity import write_long_context_png

    monkeypatch.setattr(Figure, "savefig", lambda *a, **k: 1 / 0)
    buckets = [{"start": 0, "stop": 64, "loss": 5.0}, {"start": 64, "stop": 128, "loss": 4.5}]
    task = {"length": 128, "train_seq_len": 64,
            "curves": {"alibi": {"alibi_scale": 1.0, "buckets": buckets}}}  # fmt: skip
    report = {"recipe": "tiny", "tasks": {"long_context@2x": task}}
    assert write_long_context_png(tmp_path / "long_context.png", report) is False
    assert not (tmp_path / "long_context.png").exists()
    assert "warning: long_context.png not drawn (ZeroDivisionError" in capsys.readouterr().err
