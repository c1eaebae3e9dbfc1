"""How `lmpipe train` runs as a process (lmpipe.train.launch): a launched rank's end and status,
and the launcher's world size, which the dry run plans for."""

from __future__ import annotations

import pytest

import lmpipe.train.launch as launch
from lmpipe.train.guard import RunStopped
from lmpipe.train.launch import launch_world_size, run_rank
from lmpipe.train.plan import dry_run
from lmpipe.train.recipe import load_recipe


class Finished(Exception):  # finish_process ends the process; here it is recorded instead
    pass


@pytest.fixture
def ends(monkeypatch):
    """The statuses `finish_process` was called with; the call ends `run_rank` as os._exit would."""
    statuses: list[int] = []

    def finish(status: int = 0) -> None:
        statuses.append(status)
        raise Finished

    monkeypatch.setattr(launch, "finish_process", finish)
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    return statuses


def stopped() -> None:
    raise RunStopped("runs/x: stopped at step 7: loss spike")


def test_a_plain_process_returns_and_a_guard_stop_reaches_the_caller(ends):
    calls = []
    run_rank(lambda: calls.append("trained"))
    assert calls == ["trained"] and ends == []
    with pytest.raises(RunStopped, match="stopped at step 7: loss spike"):
        run_rank(stopped)
    assert ends == []  # the CLI's error path prints it, with status 2


def test_a_launched_rank_ends_with_status_0_after_training(ends, monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    calls = []
    with pytest.raises(Finished):
        run_rank(lambda: calls.append("trained"))
    assert calls == ["trained"] and ends == [0]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "rank, printed", [("0", "error: runs/x: stopped at step 7: loss spike\n"), ("1", "")]
)
def test_a_guard_stop_ends_every_launched_rank_with_status_2_and_one_line(
    ends, monkeypatch, capsys, rank, printed
):
    monkeypatch.setenv("LOCAL_RANK", rank)
    monkeypatch.setenv("RANK", rank)
    with pytest.raises(Finished):
        run_rank(stopped)
    assert ends == [2]
    assert capsys.readouterr().err == printed  # rank 0 alone: every rank stops at the same step


def test_the_dry_run_plans_for_the_launchers_world_unless_told(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launch_world_size() == 1
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launch_world_size() == 4
    recipe = load_recipe("btlm3b")
    assert dry_run(recipe, gpu_memory=80.0).world_size == 4
    assert "world size 4" in capsys.readouterr().out
    assert dry_run(recipe, world_size=8, gpu_memory=80.0).world_size == 8  # --world-size
    assert "world size 8" in capsys.readouterr().out
