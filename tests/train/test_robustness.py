"""The guard (`lmpipe.train.guard`) through the real loop: a step with a non-finite loss or gradient
leaves weights and optimizer state as they were, under every ZeRO stage and precision, on every
rank alike; too many such steps in a row or a loss spike stop the run with one line naming the
last good checkpoint; SIGTERM / SIGINT stop it after the step with a checkpoint, and the resumed
run equals the uninterrupted one. Faults are injected by wrapping `GPT.forward` (in this process
with monkeypatch; in torchrun's ranks by a test-only sitecustomize.py on their PYTHONPATH)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmpipe.dataprep.errors import LmpipeError
from tests.train.test_loop import SMALL

# 8 steps of 512 tokens (6 at 64, 2 at 128), 2 micro-steps each, a checkpoint after every step
STEPS = [*SMALL, "stages.0.tokens=3072", "stages.1.tokens=1024"]
EVERY_STEP = [*STEPS, "checkpoint_every_tokens=512", "keep_checkpoints=10"]
MICRO_STEPS = 2


class NaNGradient(torch.autograd.Function):
    """The identity forward, a NaN gradient backward: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.nan


def with_faults(forward, faults: dict[int, str], micro_steps: int, first_step: int = 0):
    """`GPT.forward` misbehaving in the first training micro-step of the given steps (1-based,
    counted from `first_step`): nan (the loss), nangrad (the gradients only), spike (loss x 10), or
    a signal: SIGTERM / SIGINT to this process, SIGTERM-parent (to the launcher), SIGINT-twice
    (a second Ctrl-C 1.2 s later). Held-out forwards (eval mode) are left alone."""
    calls = [0]

    def forward_with_faults(self, *args, **kwargs):
        logits, loss = forward(self, *args, **kwargs)
        if not self.training:
            return logits, loss
        calls[0] += 1
        step, micro = divmod(calls[0] - 1, micro_steps)
        fault = faults.get(first_step + step + 1) if micro == 0 else None
        if fault == "nan":
            loss = loss * math.nan
        elif fault == "nangrad":
            loss = NaNGradient.apply(loss)
        elif fault == "spike":
            loss = loss * 10
        elif fault in ("SIGTERM", "SIGINT"):
            os.kill(os.getpid(), getattr(signal, fault))
        elif fault == "SIGTERM-parent":
            os.kill(os.getppid(), signal.SIGTERM)
        elif fault == "SIGINT-twice":
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.2)
            os.kill(os.getpid(), signal.SIGINT)
        return logits, loss

    return forward_with_faults


@pytest.fixture
def inject(monkeypatch):
    from lmpipe.train.model import GPT

    plain = GPT.forward

    def inject(faults: dict[int, str], first_step: int = 0) -> None:
        monkeypatch.setattr(GPT, "forward", with_faults(plain, faults, MICRO_STEPS, first_step))

    return inject


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor in a DeepSpeed checkpoint folder (weights, fp32 masters, Adam's moments and
    step counts, on every rank), by file and key path."""
    from lmpipe.train.checkpoint import deepspeed_checkpoint_classes

    out: dict[str, torch.Tensor] = {}

    def walk(value, key):
        if isinstance(value, torch.Tensor):
            out[key] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}")
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                walk(v, f"{key}.{i}")

    for path in sorted(folder.glob("*.pt")):
        with torch.serialization.safe_globals(deepspeed_checkpoint_classes()):
            walk(torch.load(path, map_location="cpu", weights_only=True), path.name)
    return out


def same_state(a: Path, b: Path) -> list[str]:
    """The tensors that differ between two checkpoints (they must hold the same ones)."""
    x, y = checkpoint_tensors(a), checkpoint_tensors(b)
    assert x.keys() == y.keys() and len(x) > 10
    return [k for k in x if not torch.equal(x[k], y[k])]


@pytest.fixture(scope="module")
def clean(pattern_tokens, tmp_path_factory):
    """The 8 steps without faults."""
    from lmpipe.train.loop import train
    from lmpipe.train.recipe import load_recipe

    run = tmp_path_factory.mktemp("clean") / "run"
    train(load_recipe("tiny", STEPS), pattern_tokens, run)
    return run


SKIPS = [
    pytest.param(1, "bf16", "nan", id="zero1-bf16-loss"),
    pytest.param(0, "fp32", "nangrad", id="zero0-fp32-grad"),
    pytest.param(1, "bf16", "nangrad", id="zero1-bf16-grad", marks=pytest.mark.slow),
    pytest.param(0, "fp32", "nan", id="zero0-fp32-loss", marks=pytest.mark.slow),
    pytest.param(2, "bf16", "nan", id="zero2-bf16-loss", marks=pytest.mark.slow),
    pytest.param(3, "bf16", "nangrad", id="zero3-bf16-grad", marks=pytest.mark.slow),
    pytest.param(3, "fp32", "nan", id="zero3-fp32-loss", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("zero_stage, precision, fault", SKIPS)
def test_a_non_finite_step_leaves_weights_and_optimizer_state_as_they_were(
    pattern_tokens, tmp_path, inject, zero_stage, precision, fault
):
    from lmpipe.train.loop import train
    from lmpipe.train.recipe import load_recipe

    recipe = load_recipe(
        "tiny", [*EVERY_STEP, f"zero_stage={zero_stage}", f"precision={precision}"]
    )
    inject({3: fault})
    run = tmp_path / "run"
    summary = train(recipe, pattern_tokens, run, stop_after_steps=4)
    rows = metrics(run)
    assert [r["skipped"] for r in rows] == [False, False, True, False]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1] and summary["skipped_steps"] == 1
    assert not math.isfinite(rows[2]["grad_norm"])
    assert math.isfinite(rows[2]["loss"]) == (fault == "nangrad")
    ckpt = run / "checkpoints"
    assert same_state(ckpt / "step00000002", ckpt / "step00000003") == []  # the skipped step
    changed = same_state(ckpt / "step00000003", ckpt / "step00000004")  # a step that ran
    assert any("optim" in k for k in changed)  # fp32 weights (ZeRO-3: all of them), moments
    assert zero_stage == 3 or any("model_states" in k for k in changed)
    assert all(math.isfinite(r["loss"]) for r in rows[3:])


def test_the_schedule_and_a_resume_go_on_past_skipped_steps(pattern_tokens, tmp_path, inject):
    """A skipped batch's tokens count as read: the LR stays a function of the tokens, as in a run
    without faults. Skipped steps apart (3 and 4, then 6: never 5 in a row) do not stop the run,
    and a resume in between continues exactly, DeepSpeed's count of skipped steps included."""
    from lmpipe.train.loop import train
    from lmpipe.train.plan import lr_multiplier, make_plan
    from lmpipe.train.recipe import load_recipe

    recipe = load_recipe("tiny", STEPS)
    faults = {3: "nan", 4: "nangrad", 6: "nan"}
    inject(faults)
    train(recipe, pattern_tokens, tmp_path / "whole")
    whole = metrics(tmp_path / "whole")
    inject(faults)
    train(recipe, pattern_tokens, tmp_path / "split", stop_after_steps=5)
    inject(faults, first_step=5)
    train(recipe, pattern_tokens, tmp_path / "split", resume=True)
    split = metrics(tmp_path / "split")
    plan, eta = make_plan(recipe), recipe.optimizer.lr
    want = [eta * lr_multiplier(plan.tokens_at(s), recipe.schedule, eta, plan.total_tokens) for s in range(8)]  # fmt: skip
    for rows in (whole, split):
        assert [r["lr"] for r in rows] == pytest.approx(want, rel=1e-12)
        assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 2, 2, 3, 3, 3]
    key = ("step", "loss", "lr", "grad_norm", "skipped")
    assert [[r[k] for k in key] for r in split] == [[r[k] for k in key] for r in whole]
    assert (tmp_path / "split" / "model" / "model.pt").is_file()


def test_bad_steps_in_a_row_stop_the_run_naming_the_last_good_checkpoint(
    pattern_tokens, tmp_path, inject
):
    from lmpipe.train.checkpoint import list_checkpoints
    from lmpipe.train.guard import RunStopped
    from lmpipe.train.loop import train
    from lmpipe.train.recipe import load_recipe

    recipe = load_recipe("tiny", [*STEPS, "checkpoint_every_tokens=1024", "guard.max_bad_steps=3"])
    inject({3: "nan", 4: "nan", 5: "nangrad", 6: "nan"})
    run = tmp_path / "run"
    with pytest.raises(RunStopped) as stop:
        train(recipe, pattern_tokens, run)
    message = str(stop.value)
    assert "\n" not in message and "step 5:" in message and "(3-5;" in message
    assert f"last good checkpoint {run / 'checkpoints' / 'step00000004'}" in message
    assert "--resume" in message
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[-1]["stop"] == "guard"
    assert rows[-1]["stop_reason"] in message
    assert rows[-1]["skipped_steps"] == 3
    assert [p.name for p in list_checkpoints(run)] == ["step00000002", "step00000004"]
    assert not (run / "model").exists() and not (run / "manifest.json").exists()


@pytest.mark.parametrize("spike_margin", ["1.0", "null"])
def test_a_loss_spike_stops_the_run_unless_switched_off(
    pattern_tokens, tmp_path, inject, spike_margin
):
    from lmpipe.train.guard import RunStopped
    from lmpipe.train.loop import train
    from lmpipe.train.recipe import load_recipe

    recipe = load_recipe(
        "tiny", [*STEPS, "guard.spike_window=3", f"guard.spike_margin={spike_margin}"]
    )
    inject({7: "spike"})
    run = tmp_path / "run"
    if spike_margin == "null":
        assert train(recipe, pattern_tokens, run)["finished"]
        assert metrics(run)[6]["loss"] > 5 * metrics(run)[5]["loss"]  # the spike happened
        return
    with pytest.raises(RunStopped, match=r"step 7: loss spike: [\d.]+, [\d.]+ above the mean of the last 3 steps"):  # fmt: skip
        train(recipe, pattern_tokens, run)
    rows = metrics(run)
    assert len(rows) == 7 and rows[-1]["stop"] == "guard" and not rows[-1]["skipped"]


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resume_is_exact(
    pattern_tokens, tmp_path, inject, clean, capsys, name
):
    from lmpipe.train.loop import train
    from lmpipe.train.recipe import load_recipe

    recipe = load_recipe("tiny", STEPS)
    run = tmp_path / "run"
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    inject({3: name})
    summary = train(recipe, pattern_tokens, run)
    assert summary["stopped"] == name and summary["steps"] == 3 and not summary["finished"]
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the process's own again
    checkpoint = run / "checkpoints" / "step00000003"
    assert summary["checkpoint"] == str(checkpoint) and (checkpoint / "lmpipe.json").is_file()
    err = capsys.readouterr().err.replace("\n", "")  # rich wraps lines at 80 columns here
    assert f"stopped by {name} at step 3; checkpoint {checkpoint}; continue with --resume" in err
    assert metrics(run)[-1]["stop"] == name
    inject({})
    assert train(recipe, pattern_tokens, run, resume=True)["finished"]
    key = ("step", "loss", "lr", "val_loss")
    assert [[r.get(k) for k in key] for r in metrics(run)] == [
        [r.get(k) for k in key] for r in metrics(clean)
    ]


def test_a_second_ctrl_c_a_moment_later_interrupts_at_once(pattern_tokens, tmp_path, inject):
    from lmpipe.train.loop import train
    from lmpipe.train.recipe import load_recipe

    handler = signal.getsignal(signal.SIGINT)
    inject({2: "SIGINT-twice"})
    with pytest.raises(KeyboardInterrupt):
        train(load_recipe("tiny", STEPS), pattern_tokens, tmp_path / "run")
    assert len(metrics(tmp_path / "run")) == 1  # step 2 never finished
    assert signal.getsignal(signal.SIGINT) is handler


def test_validation_runs_by_default_on_a_held_out_split(clean, pattern_tokens, tmp_path, capsys):
    """No `validation` section: every tenth of the run (4,096 tokens: every 409), 16 windows of
    the longest stage; a folder without a held-out split trains without validation."""
    from lmpipe.dataprep.shards import TokenShards, write_shard_folder
    from lmpipe.train.loop import train
    from lmpipe.train.recipe import load_recipe

    plan = json.loads((clean / "plan.json").read_text())
    assert plan["validation"] == {"every_tokens": 409, "tokens": 16 * 128}
    rows = metrics(clean)
    assert all(set(r["val_loss"]) == {"data"} for r in rows)  # 512 tokens a step > 409
    assert rows[-1]["val_loss"]["data"] < rows[0]["val_loss"]["data"] - 1.0
    manifest = json.loads((clean / "manifest.json").read_text())
    assert manifest["summary"]["val_loss"] == rows[-1]["val_loss"]

    train_only = tmp_path / "tokens"
    shards = TokenShards(pattern_tokens, "train")
    write_shard_folder(train_only, {"train": [shards.tokens(0, 4000)]})
    run = tmp_path / "run"
    summary = train(load_recipe("tiny", STEPS), train_only, run, stop_after_steps=2)
    assert summary["val_loss"] is None and all("val_loss" not in r for r in metrics(run))
    assert json.loads((run / "plan.json").read_text())["validation"] is None

    # `lmpipe tokenize` without --holdout writes an empty held-out split: a recipe that asks for
    # validation is refused, in one line naming the folder, before anything is written
    empty = tmp_path / "empty-heldout"
    write_shard_folder(empty, {"train": [shards.tokens(0, 4000)], "heldout": []})
    asking = load_recipe("tiny", [*STEPS, "validation={every_tokens: 512, tokens: 256}"])
    with pytest.raises(LmpipeError, match=r"empty-heldout: its held-out split has 0 tokens, and the recipe's validation"):  # fmt: skip
        train(asking, empty, tmp_path / "asking")
    assert not (tmp_path / "asking").exists()

    # a held-out split shorter than one window has no loss: said at the start (its val_loss
    # was `{}` without a word), with a validation section or without
    short = tmp_path / "short-heldout"
    write_shard_folder(short, {"train": [shards.tokens(0, 4000)], "heldout": [shards.tokens(0, 20)]})  # fmt: skip
    capsys.readouterr()
    summary = train(asking, short, tmp_path / "warned", stop_after_steps=2)
    warned = " ".join(capsys.readouterr().err.split())
    assert "warning: source data (" in warned and "its held-out split has 21 tokens, fewer than one window of stage 0, 1 (seq_len + 1 = 65): no held-out loss there" in warned  # fmt: skip
    assert summary["val_loss"] == {}


# --- several ranks under torchrun -------------------------------------------------------------

SITE = """
import json, os, sys
faults = json.loads(os.environ.get("LMPIPE_TEST_FAULTS", "{}")).get(os.environ.get("RANK", ""))
if faults:
    sys.path.insert(0, os.environ["LMPIPE_TEST_ROOT"])
    from lmpipe.train.model import GPT
    from tests.train.test_robustness import MICRO_STEPS, with_faults
    GPT.forward = with_faults(GPT.forward, {int(k): v for k, v in faults.items()}, MICRO_STEPS)
"""


def torchrun(tmp_path: Path, data: Path, run_dir: Path, faults: dict, *args: str):
    """`lmpipe train` on 2 ranks (test_distributed's run: 2 micro-steps a step on each rank),
    the ranks' GPT.forward wrapped by `with_faults` as `faults` ({rank: {step: fault}}) says."""
    from tests.train.test_distributed import train_command

    launcher = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if launcher is None:
        pytest.skip("torchrun not installed beside this Python")
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITE)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "COLUMNS": "1000",  # rich's lines unwrapped
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
        "LMPIPE_TEST_FAULTS": json.dumps(faults),
        "LMPIPE_TEST_ROOT": str(Path(__file__).resolve().parents[2]),
    }
    command = [launcher, "--standalone", "--nproc_per_node", "2", "-m", "lmpipe.cli"]
    return subprocess.run(
        [*command, *train_command(data, run_dir), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_sigterm_on_one_rank_stops_both_at_one_step_and_the_resume_matches(
    pattern_tokens, tmp_path
):
    """The signal reaches rank 1 only; both ranks stop after the same step with a checkpoint and
    exit 0 (torchrun's own status is 0 only when every rank's is); the resumed run has the
    losses of one process training the whole run."""
    from lmpipe.train.loop import train
    from lmpipe.train.recipe import load_recipe
    from tests.train.test_distributed import SETTINGS

    run = tmp_path / "two"
    stopped = torchrun(tmp_path, pattern_tokens, run, {"1": {"3": "SIGTERM"}})
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "stopped by SIGTERM at step 3; checkpoint" in stopped.stderr
    assert [r["step"] for r in metrics(run)] == [1, 2, 3] and metrics(run)[-1]["stop"] == "SIGTERM"
    assert (run / "checkpoints" / "step00000003" / "lmpipe.json").is_file()
    for rank in (0, 1):
        assert "stop at step 3: SIGTERM" in (run / "logs" / f"rank{rank}.log").read_text()
    resumed = torchrun(tmp_path, pattern_tokens, run, {}, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    train(load_recipe("tiny", SETTINGS), pattern_tokens, tmp_path / "one")
    two, one = metrics(run), metrics(tmp_path / "one")
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 9))
    for a, b in zip(one, two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)


@pytest.mark.slow
def test_under_torchrun_a_nan_on_one_rank_is_skipped_by_both_and_sigterm_to_torchrun_stops(
    pattern_tokens, tmp_path
):
    """Rank 1's loss is NaN at step 2 (rank 0's is finite): both ranks skip the update, their
    weights and optimizer shards stay as they were. Then rank 0 sends SIGTERM to torchrun, which
    forwards it to both ranks: they finish the step and checkpoint; torchrun itself exits 1 (its
    SignalException) after its ranks have finished."""
    run = tmp_path / "two"
    faults = {"0": {"4": "SIGTERM-parent"}, "1": {"2": "nan"}}
    result = torchrun(
        tmp_path,
        pattern_tokens,
        run,
        faults,
        *("--set", "checkpoint_every_tokens=512", "--set", "keep_checkpoints=10"),
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "SignalException" in result.stderr
    rows = metrics(run)
    last = rows[-1]["step"]
    assert last in (4, 5) and rows[-1]["stop"] == "SIGTERM"
    assert [r["skipped"] for r in rows[:3]] == [False, True, False]
    assert rows[-1]["skipped_steps"] == 1
    ckpt = run / "checkpoints"
    assert (ckpt / f"step{last:08d}" / "lmpipe.json").is_file()
    assert len(list((ckpt / "step00000002").glob("*optim_states.pt"))) == 2  # one shard a rank
    assert same_state(ckpt / "step00000001", ckpt / "step00000002") == []
    assert same_state(ckpt / "step00000002", ckpt / "step00000003") != []
    for rank in (0, 1):
        log = (run / "logs" / f"rank{rank}.log").read_text()
        assert "step 2 loss nan" in log and "(skipped: not finite)" in log
        assert f"stop at step {last}: SIGTERM" in log


@pytest.mark.slow
def test_under_torchrun_the_guard_stops_both_ranks_with_one_line_and_status_2(
    pattern_tokens, tmp_path
):
    """Rank 1's loss is NaN at steps 2 and 3 (guard.max_bad_steps 2): both ranks stop after step
    3, each with exit status 2 (torchrun then reports the failure), the reason said once."""
    run = tmp_path / "two"
    faults = {"1": {"2": "nan", "3": "nan"}}
    result = torchrun(tmp_path, pattern_tokens, run, faults, "--set", "guard.max_bad_steps=2")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "stopped at step 3" in errors[0], result.stderr[-3000:]
    assert "exitcode  : 2" in result.stderr  # torchrun's report of its ranks
    assert "terminate called" not in result.stderr
    assert metrics(run)[-1]["stop"] == "guard" and metrics(run)[-1]["step"] == 3


def test_a_non_finite_step_that_was_applied_stops_the_run_at_once():
    """Should DeepSpeed ever apply a non-finite update (an older release, another config), the
    weights are lost: the guard stops at that step instead of training on NaN to the end."""
    from lmpipe.train.guard import Guard
    from lmpipe.train.recipe import GuardConfig

    guard = Guard(GuardConfig())
    assert guard.check(1, 10.5, 1.8, skipped=False) is None
    assert guard.check(2, 10.4, None, skipped=False) is None  # no norm recorded: not a reason
    assert guard.check(3, 10.6, math.inf, skipped=True) is None  # skipped: counted, not stopped
    for loss, norm in ((10.5, math.inf), (math.nan, 1.0), (10.5, math.nan)):
        reason = Guard(GuardConfig()).check(4, loss, norm, skipped=False)
        assert reason and "was not finite and the update was applied" in reason


# A healthy run's losses, the window the margin alone stopped it after: the tiny model (d_model 16)
# at 128 tokens a step (8 x 16) on the stdlib corpus, steps 65-114, rounded; a standard deviation
# of 0.70 nats, a step-to-step noise of 0.68. Its step 115 had a loss of 5.005, 1.37 above the
# window's mean (2 noise widths).
NOISY = [3.33, 4.0, 3.77, 4.74, 3.91, 4.08, 4.17, 3.98, 3.31, 4.94, 4.24, 4.11, 3.27, 5.04, 4.07,
         4.45, 3.83, 4.32, 4.31, 2.32, 3.53, 2.31, 2.72, 4.78, 3.5, 4.39, 3.17, 3.56, 3.88, 4.05,
         3.19, 2.97, 2.75, 2.94, 4.03, 2.58, 2.8, 4.75, 3.15, 3.53, 2.89, 3.24, 3.6, 3.39, 3.7,
         3.73, 3.43, 2.86, 2.05, 4.2]  # fmt: skip


@pytest.mark.parametrize(
    ("sigmas", "loss", "stops"),
    [(6.0, 5.005, False), (6.0, 8.5, True), (None, 5.005, True), (3.0, 5.9, True)],
)
def test_a_small_batch_s_noise_is_not_a_spike(sigmas, loss, stops):
    """A spike must clear both the margin and `spike_sigmas` times the window's step noise: the
    noisy run goes on at 1.37 nats above its mean (2 noise widths), stops at 7 (or at 3.4 with
    `spike_sigmas: 3`); with the margin alone (`spike_sigmas: null`) the noise stops it, as it
    did before the rule."""
    from lmpipe.train.guard import Guard
    from lmpipe.train.recipe import GuardConfig

    guard = Guard(GuardConfig(spike_window=len(NOISY), spike_sigmas=sigmas))
    for step, value in enumerate(NOISY, 1):
        assert guard.check(step, value, 1.0, skipped=False) is None
    reason = guard.check(len(NOISY) + 1, loss, 1.0, skipped=False)
    assert (reason is not None) == stops, reason
    if stops:
        assert reason.startswith("loss spike: ") and "guard.spike_margin = 1" in reason
        assert ("x noise 0.678" in reason) == (sigmas is not None), reason


def test_step_noise_is_blind_to_a_falling_trend():
    """A window of steadily falling losses has a large standard deviation but no step noise: a
    spike right after it is judged by the margin, not hidden by the trend."""
    from collections import deque

    from lmpipe.train.guard import Guard, step_noise
    from lmpipe.train.recipe import GuardConfig

    falling = [10.0 - 0.1 * i + 0.05 * (-1) ** i for i in range(50)]  # 10 -> 5, +-0.05 noise
    assert step_noise(deque(falling)) == pytest.approx(0.1 / 2**0.5, rel=0.02)  # steps -0.1 +- 0.1
    assert step_noise(deque([3.0, 5.0])) == step_noise(deque([3.0])) == step_noise(deque()) == 0.0
    guard = Guard(GuardConfig(spike_window=50))
    for step, loss in enumerate(falling):
        assert guard.check(step, loss, 1.0, skipped=False) is None
    # the window's mean is 7.55: a loss of 8.8 is 1.25 above it (3.9 above the last loss)
    assert "loss spike: 8.8, 1.25 above" in guard.check(50, 8.8, 1.0, skipped=False)


def test_a_steady_large_batch_run_still_stops_at_the_margin():
    """With hundredths of a nat of noise, the margin decides: 1.1 nats above the mean stops."""
    from lmpipe.train.guard import Guard
    from lmpipe.train.recipe import GuardConfig

    guard = Guard(GuardConfig(spike_window=50))
    for step in range(50):
        assert guard.check(step, 2.5 + 0.02 * (-1) ** step, 0.3, skipped=False) is None
    assert guard.check(50, 3.45, 0.3, skipped=False) is None  # 0.95 above: under the margin
    assert "1.08 above the mean" in guard.check(51, 3.6, 0.3, skipped=False)  # 3.45 in the window
