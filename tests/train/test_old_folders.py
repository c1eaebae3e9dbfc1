"""Run and sweep folders of earlier lmpipe versions, built here by editing a fresh folder's JSON
as those versions wrote it: a checkpoint that kept no identity of its tokens (before
2026-12-07) is checked against its plan's token counts; a marker without checksums (before
2026-11-30) and a sweep published with a point SIGTERM stopped (before 2026-12-07) are one line
that says what to do."""

from __future__ import annotations

import json

import pytest

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.shards import TokenShards, write_shard_folder
from lmpipe.train.checkpoint import MARKER, read_marker
from lmpipe.train.data import coverage, with_data
from lmpipe.train.loop import train
from lmpipe.train.plan import make_plan
from lmpipe.train.recipe import load_recipe
from lmpipe.train.run_folder import check_run_dir
from lmpipe.train.sweep import sweep
from lmpipe.train.sweep_plan import SweepSettings, parse_grid
from lmpipe.train.transfer import sweep_best
from tests.train.test_loop import SMALL  # 16 steps, a checkpoint every 4
from tests.train.test_sweep_plan_checks import TWO_STEPS  # two points of 2 steps of 4 x 64 tokens


def drawn_now(recipe, data):
    """`data.coverage`'s rows for `data`, as `lmpipe train` computes them before its checks."""
    from lmpipe.dataprep.mixture import MixtureLoader
    from lmpipe.train.data import open_sources

    recipe = with_data(recipe, data)
    loader = MixtureLoader(open_sources(recipe), recipe.seed)
    return recipe, coverage(recipe, make_plan(recipe, 1), loader)


def test_a_checkpoint_without_data_identity_is_checked_against_its_plans_token_counts(
    pattern_tokens, tmp_path
):
    recipe = load_recipe("tiny", SMALL)
    run_dir = tmp_path / "run"
    train(recipe, pattern_tokens, run_dir, stop_after_steps=4)  # a checkpoint at step 4
    checkpoint = run_dir / "checkpoints" / "step00000004"
    marker = json.loads((checkpoint / MARKER).read_text())
    assert marker["format_version"] == 1 and marker["data"] == {"data": marker["data"]["data"]}
    # as an lmpipe before 2026-12-07 wrote it (no checksum covers the marker itself)
    del marker["data"], marker["format_version"]
    (checkpoint / MARKER).write_text(json.dumps(marker))
    assert read_marker(checkpoint)["data"] is None
    plan = (run_dir / "plan.json").read_text()
    before = json.loads(plan)["data"][0]["epoch_tokens"]

    shards = TokenShards(pattern_tokens, "train")
    fewer = tmp_path / "fewer"
    write_shard_folder(fewer, {"train": [shards.tokens(0, shards.n_tokens // 2)]})
    now = drawn_now(recipe, fewer)[1][0]["epoch_tokens"]
    assert now < before
    with pytest.raises(LmpipeError) as e:
        train(recipe, fewer, run_dir, resume=True)
    assert str(e.value) == (
        f"{checkpoint}: --resume on other tokens in source 'data' ({fewer}): one epoch of it at "
        f"seq_len 64 is {now:,} tokens, and was {before:,} for the run ({run_dir / 'plan.json'}); "
        "resume on the same token folder (it may have moved), or start a new run"
    )
    assert (run_dir / "plan.json").read_text() == plan  # the refusal rewrote nothing

    # the same counts: nothing to say, and the run goes on
    same, drawn = drawn_now(recipe, pattern_tokens)
    assert check_run_dir(run_dir, [pattern_tokens], same, True, drawn=drawn) == []
    # a plan that records no counts (damaged, or another tool's): the one notice
    (run_dir / "plan.json").write_text(json.dumps({**json.loads(plan), "data": None}))
    assert check_run_dir(run_dir, [pattern_tokens], same, True, drawn=drawn) == [
        f"resume: {checkpoint} was written by an lmpipe from before 2026-12-07, which kept no "
        f"identity of its tokens, and {run_dir / 'plan.json'} records no token counts to "
        "compare: the data cannot be checked; resume on the token folder the run read"
    ]
    (run_dir / "plan.json").write_text(plan)
    assert train(recipe, pattern_tokens, run_dir, resume=True, stop_after_steps=1)["steps"] == 5


def test_a_marker_from_before_checksums_says_so_and_what_to_do(tmp_path):
    folder = tmp_path / "step00000004"
    folder.mkdir()
    (folder / MARKER).write_text(json.dumps({"step": 4, "tokens": 2048}))
    with pytest.raises(LmpipeError) as e:
        read_marker(folder)
    assert str(e.value) == (
        f"{folder / MARKER}: written by an lmpipe from before 2026-11-30, whose checkpoints carry "
        "no checksums, so it is not loaded; finish this run with that lmpipe, or start a new run"
    )


@pytest.mark.slow
def test_a_sweep_published_with_a_stopped_point_is_not_complete(pattern_tokens, tmp_path):
    """An lmpipe before 2026-12-07 published a sweep whose point SIGTERM had stopped: the point
    is `finished: false` and did not diverge. `--best` would pick among the others, and a rerun
    would find nothing to do; both refuse, naming the point. A point the guard stopped (diverged)
    stays a legitimate unfinished point that --best skips."""
    settings = SweepSettings(
        recipe="tiny", data=pattern_tokens, overrides=TWO_STEPS,
        grid=(parse_grid("optimizer.lr=2^-8,2^-4"),), widths=(32,), val_tokens=256,
    )  # fmt: skip
    out = tmp_path / "lr"
    sweep(settings, out)
    report = json.loads((out / "sweep.json").read_text())
    good = report["points"][1]
    assert good["point"] == "0001-mup-w32" and good["finished"] and not good["diverged"]

    guarded = {**good, "finished": False, "diverged": True, "heldout_loss": None}
    (out / "sweep.json").write_text(json.dumps({**report, "points": [report["points"][0], guarded]}))  # fmt: skip
    assert sweep_best(out)[0] == "optimizer.lr=0.00390625"  # the diverged point is skipped

    stopped = {**good, "finished": False, "heldout_loss": None, "stopped": None}
    (out / "sweep.json").write_text(json.dumps({**report, "points": [report["points"][0], stopped]}))  # fmt: skip
    message = (
        f"{out}: point 0001-mup-w32 stopped before its end, yet the sweep was published (an "
        "lmpipe before 2026-12-07 did so after a SIGTERM), so its results are incomplete; rerun "
        "the sweep command with --overwrite to train its points again"
    )
    with pytest.raises(LmpipeError) as e:
        sweep_best(out, print_set=True)
    assert str(e.value) == message
    with pytest.raises(LmpipeError) as e:
        sweep(settings, out)
    assert str(e.value) == message
