"""The training loop on DeepSpeed's CPU accelerator: metrics, the stage switch, loss going down,
checkpoints, and a resumed run equal to an uninterrupted one."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.loader import WindowLoader
from lmpipe.dataprep.shards import TokenShards
from lmpipe.dataprep.tokenizer import VOCAB_SIZE
from lmpipe.train.checkpoint import list_checkpoints, load_model
from lmpipe.train.loop import train
from lmpipe.train.recipe import load_recipe

# 12 steps at 64 tokens, then 4 at 128; 512 tokens per step in 2 micro-steps; a checkpoint every 4
# The tiny recipe's model made smaller still (shared with test_distributed.py).
TINY_MODEL = [
    "model.d_model=32",
    "model.d_ff=85",
    "model.n_heads=2",
    "model.mup.d_model_base=32",
    "model.mup.d_ff_base=85",
]
SMALL = [
    *TINY_MODEL,
    "tokens_per_step=512",
    "micro_batch_tokens=256",
    "stages.0.tokens=6144",
    "stages.1.seq_len=128",
    "stages.1.tokens=2048",
    "schedule.warmup_tokens=1024",
    "checkpoint_every_tokens=2048",
]


@pytest.fixture(scope="module")
def data(pattern_tokens):
    return pattern_tokens


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "full"
    summary = train(load_recipe("tiny", SMALL), data, run_dir)
    return run_dir, summary


def test_metrics_follow_the_stages_and_loss_decreases(full_run):
    run_dir, summary = full_run
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert [r["seq_len"] for r in rows] == [64] * 12 + [128] * 4
    assert [r["tokens"] for r in rows] == [512 * s for s in range(1, 17)]
    assert rows[0]["lr"] == 0.0 and max(r["lr"] for r in rows) == pytest.approx(1.2e-2)
    assert rows[-1]["lr"] < rows[5]["lr"]
    first, last = rows[0]["loss"], np.mean([r["loss"] for r in rows[-3:]])
    assert first == pytest.approx(np.log(VOCAB_SIZE), abs=1.5)
    assert last < first - 2.0, (first, last)
    assert summary["finished"] and summary["steps"] == 16
    # the single-process rendezvous variables do not outlive the run (children would inherit them)
    assert "RANK" not in os.environ and "MASTER_PORT" not in os.environ


def test_run_folder_holds_recipe_plan_checkpoints_model_and_manifest(full_run, data):
    run_dir, _ = full_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stage"] == "train" and manifest["summary"]["tokens"] == 16 * 512
    assert load_recipe(str(run_dir / "recipe.yaml")).stages[1].seq_len == 128
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["grad_accum"] == 2 and [s["steps"] for s in plan["stages"]] == [12, 4]
    epoch = WindowLoader(TokenShards(data, "train"), seed=1).epoch_tokens
    for row, (seq_len, tokens) in zip(plan["data"], [(64, 6144), (128, 2048)], strict=True):
        assert row["seq_len"] == seq_len and row["epoch_tokens"] == epoch // seq_len * seq_len
        assert row["epochs"] == pytest.approx(tokens / row["epoch_tokens"])
    # checkpoints every 4 steps, the 2 newest kept
    assert [p.name for p in list_checkpoints(run_dir)] == ["step00000012", "step00000016"]
    assert (run_dir / "logs" / "rank0.log").read_text().count("loss") == 16


def test_exported_model_reproduces_the_training_loss(full_run, data):
    run_dir, _ = full_run
    model, recipe = load_model(run_dir)
    tokens = torch.from_numpy(TokenShards(data, "train").tokens(0, 129).astype(np.int64))[None]
    with torch.no_grad():
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
    assert loss.item() < metrics(run_dir)[0]["loss"] - 2.0


def test_resumed_run_equals_uninterrupted(full_run, data, tmp_path):
    run_dir, _ = full_run
    recipe = load_recipe("tiny", SMALL)
    resumed = tmp_path / "resumed"
    first = train(recipe, data, resumed, stop_after_steps=6)  # checkpoints at 4 and 6
    assert not first["finished"] and not (resumed / "manifest.json").exists()
    assert not (resumed / "model").exists()
    summary = train(recipe, data, resumed, resume=True)  # steps 7 to 16, past the switch at 12
    got = [(r["step"], r["loss"], r["lr"]) for r in metrics(resumed)]
    want = [(r["step"], r["loss"], r["lr"]) for r in metrics(run_dir)]
    assert got == want
    # the summary's losses are the run's (step 1's first loss), not those of the call's steps
    assert (summary["first_loss"], summary["steps_this_call"]) == (want[0][1], 10)
    assert summary["last_loss"] == pytest.approx(want[-1][1], abs=1e-6)
    a, _ = load_model(run_dir)
    b, _ = load_model(resumed)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_existing_run_folder_needs_resume(full_run, data):
    run_dir, _ = full_run
    with pytest.raises(LmpipeError, match="has finished"):
        train(load_recipe("tiny", SMALL), data, run_dir, resume=True)


def test_unfinished_data_folder_is_refused(tmp_path):
    (tmp_path / "tokens").mkdir()
    with pytest.raises(LmpipeError, match="unfinished"):
        train(load_recipe("tiny", SMALL), tmp_path / "tokens", tmp_path / "run")


def test_a_source_shorter_than_a_later_stages_window_is_refused_before_anything_is_written(
    data, tmp_path
):
    """100 tokens hold a window of stage 0 (64 + 1) but not of stage 1 (128 + 1): refused
    before the run folder exists, so the corrected command starts it (not 'pass --resume')."""
    from lmpipe.dataprep.shards import write_shard_folder
    from lmpipe.train.recipe import DataSource

    short = tmp_path / "short"
    write_shard_folder(short, {"train": [np.arange(100)]})
    recipe = load_recipe("tiny", SMALL)
    run_dir = tmp_path / "run"
    mixture = [DataSource(name="A", path=data), DataSource(name="C", path=short)]
    with pytest.raises(LmpipeError, match=r"source 'C' holds fewer tokens than one window of stage 1 \(128 \+ 1\)"):  # fmt: skip
        train(recipe, mixture, run_dir)
    assert not run_dir.exists()
    assert train(recipe, data, run_dir, stop_after_steps=1)["steps"] == 1


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_bf16_sparse_run_exports_the_fp32_master_weights(data, tmp_path, zero_stage):
    """The module holds bf16-rounded weights in a bf16 run; the export takes the optimizer's fp32
    copy (gathered from the partitions under ZeRO-3). Sparse muP's masked weights stay exactly
    zero through DeepSpeed's optimizer and the kept ones train."""
    recipe = load_recipe(
        "tiny",
        [
            *SMALL,
            "model.density=0.5",
            "precision=bf16",
            f"zero_stage={zero_stage}",
            "stages.0.tokens=1024",
            "stages.1.tokens=512",
        ],
    )
    train(recipe, data, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "model" / "model.pt", weights_only=True)
    weight = state["h.0.attn.c_attn.weight"]
    assert weight.dtype == torch.float32
    assert ((weight.view(torch.int32) & 0xFFFF) != 0).any()  # not merely bf16 values widened
    for name, w in state.items():
        if name.startswith("h.") and name.endswith("weight") and ".ln_" not in name:
            assert (w != 0).float().mean().item() == pytest.approx(0.5, abs=1e-3), name
    model, _ = load_model(tmp_path / "run")
    assert model.h[0].attn.c_attn.weight.shape == (96, 32)


def test_zero0_logs_and_clips_by_the_norm_zero1_does(data, tmp_path):
    """ZeRO-0 clips by lmpipe's own norm (guard.plain_step), ZeRO-1 by DeepSpeed's. With a clip
    acting at every step, the two runs stay equal only if both norms are exact: an fp32 sum on
    the CPU comes out ~1e-4 low for the embedding's 1.6M-element gradient."""
    runs = []
    for stage in (0, 1):
        run_dir = tmp_path / f"zero{stage}"
        recipe = load_recipe("tiny", [*SMALL, f"zero_stage={stage}", "optimizer.grad_clip=0.1"])
        train(recipe, data, run_dir)
        runs.append((metrics(run_dir), torch.load(run_dir / "model" / "model.pt")))
    (rows0, state0), (rows1, state1) = runs
    assert all(r["grad_norm"] > 0.1 for r in rows1)  # clipped at every step
    for r0, r1 in zip(rows0, rows1, strict=True):
        assert r0["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-5, abs=0), r0["step"]
        assert r0["loss"] == pytest.approx(r1["loss"], rel=1e-5, abs=0), r0["step"]
    # fp32 noise between two exact runs is ~5e-6 here; a clip by the fp32 norm gave 2.6e-5.
    assert max((state0[k] - state1[k]).abs().max().item() for k in state0) < 1e-5


def test_plain_step_sums_the_norm_in_float64_and_clips_by_it():
    """A 4M-element gradient, whose fp32 norm on the CPU is off by ~1e-4 relative."""
    from lmpipe.train.guard import plain_step

    class Engine:
        def __init__(self) -> None:
            self.module = torch.nn.Linear(2048, 2048, bias=False)
            self.module.weight.grad = torch.randn(
                2048, 2048, generator=torch.Generator().manual_seed(0)
            )
            self.stepped = 0

        def step(self) -> None:
            self.stepped += 1

    engine = Engine()
    exact = engine.module.weight.grad.double().square().sum().sqrt().item()
    assert plain_step(engine, grad_clip=0.0) == pytest.approx(exact, rel=1e-12, abs=0)
    assert engine.stepped == 1
    assert plain_step(engine, grad_clip=3.0) == pytest.approx(exact, rel=1e-12, abs=0)
    clipped = engine.module.weight.grad.double().square().sum().sqrt().item()
    assert clipped == pytest.approx(3.0 * exact / (exact + 1e-6), rel=1e-6) and engine.stepped == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="FlexAttention trains on a GPU")
def test_flex_attention_on_the_cpu_is_refused_before_the_run_folder_is_made(data, tmp_path):
    recipe = load_recipe("tiny", [*SMALL, "model.attn_impl=flex"])
    with pytest.raises(LmpipeError, match=r"model\.attn_impl flex: .* no backward on the CPU"):
        train(recipe, data, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_resume_with_another_recipe_is_refused_and_metrics_are_not_duplicated(data, tmp_path):
    recipe = load_recipe("tiny", [*SMALL, "zero_stage=0"])
    run_dir = tmp_path / "run"
    train(recipe, data, run_dir, stop_after_steps=6)  # checkpoints at 4 and 6
    rows = metrics(run_dir)
    assert all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in rows)  # ZeRO-0 too
    with pytest.raises(LmpipeError, match=r"optimizer\.lr \(0\.012 -> 0\.006\)"):
        train(
            load_recipe("tiny", [*SMALL, "zero_stage=0", "optimizer.lr=6.0e-3"]),
            data,
            run_dir,
            resume=True,
        )
    # a crash after step 6's checkpoint: the newest checkpoint is gone, steps 5-6 run again
    import shutil

    shutil.rmtree(run_dir / "checkpoints" / "step00000006")
    train(
        recipe.model_copy(update={"keep_checkpoints": 3}),
        data,
        run_dir,
        resume=True,
        stop_after_steps=3,
    )
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4, 5, 6, 7]


def test_resume_needs_the_same_tokens_anywhere_and_as_many_ranks(data, tmp_path):
    """The checkpoint knows its sources' tokens (their shards' checksums): a resume on the same
    tokens in a moved folder continues; other tokens, or another world size for ZeRO's
    per-rank optimizer states, are refused in one line before anything is written."""
    import shutil

    from lmpipe.dataprep.shards import write_shard_folder
    from lmpipe.train.data import with_data
    from lmpipe.train.run_folder import check_run_dir

    recipe = load_recipe("tiny", SMALL)
    run_dir = tmp_path / "run"
    train(recipe, data, run_dir, stop_after_steps=4)  # a checkpoint at step 4
    plan = (run_dir / "plan.json").read_text()
    other = tmp_path / "other"
    shards = TokenShards(data, "train")
    write_shard_folder(other, {"train": [shards.tokens(0, shards.n_tokens)[::-1]]})
    with pytest.raises(LmpipeError, match=r"step00000004: --resume on other tokens in source 'data' \(.*other\): its shards differ"):  # fmt: skip
        train(recipe, other, run_dir, resume=True)
    with pytest.raises(LmpipeError, match=r"partitioned over 1 rank\(s\), and this launch has 2; resume with 1"):  # fmt: skip
        check_run_dir(run_dir, [data], with_data(recipe, data), True, world=2)
    assert (run_dir / "plan.json").read_text() == plan  # nothing rewritten by the refusals
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    assert train(recipe, moved, run_dir, resume=True)["finished"]


def test_the_manifest_of_a_resumed_run_describes_the_whole_run(full_run, data, tmp_path):
    """A run started --init-from and resumed without it says where its weights came from; one
    killed after its last checkpoint, before the model was written, ends on resume with the
    run's losses in the summary (there are no steps left to train)."""
    import shutil

    full, _ = full_run
    recipe = load_recipe("tiny", SMALL)
    run_dir = tmp_path / "started"
    train(recipe, data, run_dir, init_from=full, stop_after_steps=2)
    first = metrics(run_dir)[0]["loss"]
    with pytest.raises(LmpipeError, match=r"--init-from .* with --resume: the run continues from its checkpoint"):  # fmt: skip
        train(recipe, data, run_dir, resume=True, init_from=data.parent / "elsewhere")
    train(recipe, data, run_dir, resume=True)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["init_from"] == str(full)

    # killed before its first checkpoint: the resume starts again from the same weights
    early = tmp_path / "early"
    train(recipe, data, early, init_from=full, stop_after_steps=1)
    shutil.rmtree(early / "checkpoints")
    train(recipe, data, early, resume=True, stop_after_steps=1)
    assert metrics(early)[0]["loss"] == pytest.approx(first, abs=1e-6)  # not a fresh model's
    assert json.loads((early / "plan.json").read_text())["init_from"] == str(full)

    killed = tmp_path / "killed"
    shutil.copytree(full, killed, ignore=shutil.ignore_patterns("manifest.json", "model"))
    summary = train(recipe, data, killed, resume=True)
    rows = metrics(killed)
    assert summary["finished"] and summary["steps_this_call"] == 0 and len(rows) == 16
    assert (summary["first_loss"], summary["last_loss"]) == (rows[0]["loss"], rows[-1]["loss"])
    assert summary["val_loss"] == next(r["val_loss"] for r in reversed(rows) if "val_loss" in r)
    assert summary["lr"] == rows[-1]["lr"] and summary["tokens_per_s_this_call"] is None
    assert (killed / "model" / "model.pt").is_file()


def test_a_checkpoint_a_crash_left_unfinished_is_removed_once_a_later_one_is_finished(
    data, tmp_path
):
    recipe = load_recipe("tiny", SMALL)
    run_dir = tmp_path / "run"
    train(recipe, data, run_dir, stop_after_steps=4)
    for torn in ("step00000003", "step00000099"):  # no lmpipe.json: torn by a crash
        (run_dir / "checkpoints" / torn).mkdir()
        (run_dir / "checkpoints" / torn / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
    train(recipe, data, run_dir, resume=True, stop_after_steps=4)
    left = sorted(p.name for p in (run_dir / "checkpoints").glob("step*"))
    assert left == ["step00000004", "step00000008", "step00000099"]  # a later one stays


@pytest.mark.parametrize("zero_stage, precision", [(2, "bf16"), (3, "bf16"), (3, "fp32")])
def test_resume_loads_every_zero_stage_weights_only(data, tmp_path, zero_stage, precision):
    """DeepSpeed's checkpoint files of each ZeRO stage load through lmpipe's weights-only path
    (only the DeepSpeed classes they hold allowed), and the resumed run equals the whole one."""
    overrides = [
        *SMALL,
        f"zero_stage={zero_stage}",
        f"precision={precision}",
        "stages.0.tokens=1024",
        "stages.1.tokens=512",
        "checkpoint_every_tokens=512",
    ]
    recipe = load_recipe("tiny", overrides)
    train(recipe, data, tmp_path / "whole")
    train(recipe, data, tmp_path / "split", stop_after_steps=1)
    train(recipe, data, tmp_path / "split", resume=True)
    want = [(r["step"], r["loss"], r["lr"]) for r in metrics(tmp_path / "whole")]
    assert [(r["step"], r["loss"], r["lr"]) for r in metrics(tmp_path / "split")] == want


# --- muP's rates, a stage's own batch and a fixed ALiBi scale, through the real loop ----------

WIDE = [  # m_d = m_ffn = 2: muP's hidden rates differ from the embedding's
    "model.d_model=64",
    "model.d_ff=170",
    "model.n_heads=2",
    "model.mup.d_model_base=32",
    "model.mup.d_ff_base=85",
    *SMALL[5:],
]


@pytest.mark.parametrize("density", [1.0, 0.5])
def test_mup_rates_hold_inside_deepspeed_after_warmup_switch_and_resume(data, tmp_path, density):
    from lmpipe.train.plan import lr_multiplier, make_plan

    recipe = load_recipe("tiny", [*WIDE, f"model.density={density}"])
    run = tmp_path / "run"
    train(recipe, data, run, stop_after_steps=14)  # past the switch at step 12, checkpoint at 14
    train(recipe, data, run, resume=True)
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 17))
    plan, eta, m = make_plan(recipe), recipe.optimizer.lr, 2.0 * density
    for r in rows:
        mult = lr_multiplier(plan.tokens_at(r["step"] - 1), recipe.schedule, eta, plan.total_tokens)
        got = r["lr_groups"]
        assert got["embedding"] == pytest.approx(eta * mult, rel=1e-9) == r["lr"]
        assert got["no_decay"] == pytest.approx(eta * mult, rel=1e-9)
        assert got["hidden"] == pytest.approx(eta / m * mult, rel=1e-9) == r["lr_hidden"]
        assert got["ffn_down"] == pytest.approx(eta / m * mult, rel=1e-9)
    after_warmup, after_switch, after_resume = rows[2], rows[12], rows[15]
    for r in (after_warmup, after_switch, after_resume):
        assert r["lr"] > 0 and r["lr_hidden"] == pytest.approx(r["lr"] / m, rel=1e-9)
    assert after_switch["seq_len"] == 128 and after_resume["step"] == 16


def test_a_stage_with_its_own_batch_switches_accumulation_and_resumes_exactly(data, tmp_path):
    """Cerebras-GPT 13B's switch (720 -> 1,080 sequences a step) on a tiny analogue: 512 tokens
    a step (2 micro-steps), then 1,024 (4); one LR schedule in tokens across the switch."""
    overrides = [*SMALL, "stages.1.tokens_per_step=1024", "checkpoint_every_tokens=1024"]
    recipe = load_recipe("tiny", overrides)
    train(recipe, data, tmp_path / "whole")
    whole = metrics(tmp_path / "whole")
    assert [r["grad_accum"] for r in whole] == [2] * 12 + [4] * 2
    assert [r["tokens"] for r in whole] == [512 * s for s in range(1, 13)] + [7168, 8192]
    want = [(r["step"], r["loss"], r["lr"], r["grad_accum"]) for r in whole]
    # one run stopped and resumed twice: before the switch, and inside the bigger batch (that
    # checkpoint written by a resumed run); each time it equals the whole run so far
    run = tmp_path / "stopped"
    for resume, stop_after, steps in ((False, 11, 11), (True, 2, 13), (True, None, 14)):
        train(recipe, data, run, resume=resume, stop_after_steps=stop_after)
        got = [(r["step"], r["loss"], r["lr"], r["grad_accum"]) for r in metrics(run)]
        assert got == want[:steps]


def test_a_stage_with_a_fixed_alibi_scale_divides_the_slopes(data, tmp_path, monkeypatch):
    """A model trained at length L with a stage at 4L and alibi_scale 4 (seeds-spec 2: L_ft /
    L_train): every attention call of that stage gets the slopes / 4, so its bias is
    -(m_h / 4) (i - j); the saved model keeps the scale (eval's default: tests/evals)."""
    from lmpipe.train import model as model_module
    from lmpipe.train.model import alibi_bias, alibi_slopes

    seen: dict[int, set] = {}
    forward = model_module.Attention.forward

    def spy(self, x_BTD, slopes_H, impl):
        seen.setdefault(x_BTD.shape[1], set()).add(tuple(slopes_H.tolist()))
        return forward(self, x_BTD, slopes_H, impl)

    monkeypatch.setattr(model_module.Attention, "forward", spy)
    recipe = load_recipe("tiny", [*SMALL, "stages.1.seq_len=256", "stages.1.alibi_scale=4"])
    train(recipe, data, tmp_path / "run")
    base = alibi_slopes(2)
    assert seen[64] == {tuple(base.tolist())}
    ((slopes,),) = [seen[256]]
    assert slopes == tuple((base / 4).tolist())
    bias = alibi_bias(torch.tensor(slopes), 256, 256, torch.float32)
    i, j = torch.arange(256)[:, None], torch.arange(256)[None, :]
    want = torch.where(j <= i, -(base[:, None, None] / 4) * (i - j), float("-inf"))
    assert torch.equal(bias, want)
    _, saved = load_model(tmp_path / "run")
    assert saved.stages[-1].alibi_scale == 4
