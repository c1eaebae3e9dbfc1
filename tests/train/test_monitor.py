"""What a run shows (`lmpipe.train.metrics`): every metrics row's names, the MFU formula, the
peak table, and TensorBoard event files that hold the rows' scalars, once per step after a
resume."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from tests.train.test_robustness import STEPS, metrics


def test_peak_tflops_by_device_name():
    from lmpipe.train.metrics import device_peak_tflops

    assert device_peak_tflops("NVIDIA H100 80GB HBM3") == 989  # SXM
    assert device_peak_tflops("NVIDIA H100 PCIe") == 756
    assert device_peak_tflops("NVIDIA H100 NVL") == 835
    assert device_peak_tflops("NVIDIA H200") == 989
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert device_peak_tflops("NVIDIA A100 80GB PCIe") == 312
    assert device_peak_tflops("NVIDIA A10") == 125  # not the A100
    assert device_peak_tflops("NVIDIA L40S") == 362
    assert device_peak_tflops("NVIDIA L4") == 121  # not the L40
    assert device_peak_tflops("Tesla T4") is None


def test_world_peak_is_the_device_peak_times_the_ranks(monkeypatch):
    import torch

    from lmpipe.train.metrics import world_peak_flops

    if not torch.cuda.is_available():
        assert world_peak_flops(2, None) == (None, "cpu")
        assert world_peak_flops(2, 500.0) == (None, "cpu")  # no MFU on CPUs, whatever the peak
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "NVIDIA H100 80GB HBM3")
    assert world_peak_flops(8, None) == (8 * 989e12, "NVIDIA H100 80GB HBM3")
    assert world_peak_flops(8, 500.0) == (8 * 500e12, "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "Tesla T4")
    peak, why = world_peak_flops(1, None)
    assert peak is None and "--peak-tflops" in why
    assert world_peak_flops(1, 65.0)[0] == 65e12


def test_without_tensorboard_only_metrics_jsonl_is_written(tmp_path, monkeypatch):
    import sys

    from lmpipe.train.metrics import TENSORBOARD, MetricsWriter

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with MetricsWriter(tmp_path, None, rank=0) as writer:
        writer.write({"step": 1, "loss": 2.5})
    with MetricsWriter(tmp_path, None, rank=1) as writer:  # other ranks write nothing
        writer.write({"step": 1, "loss": 9.0})
    assert metrics(tmp_path) == [{"step": 1, "loss": 2.5}]
    assert not (tmp_path / TENSORBOARD).exists()


def test_a_run_folder_with_tensorboard_events_is_a_run(tmp_path, pattern_tokens):
    from lmpipe.dataprep.errors import LmpipeError
    from lmpipe.train.recipe import load_recipe
    from lmpipe.train.run_folder import check_run_dir

    (tmp_path / "run" / "tensorboard").mkdir(parents=True)
    with pytest.raises(LmpipeError, match="files of an earlier run; pass --resume"):
        check_run_dir(tmp_path / "run", [pattern_tokens], load_recipe("tiny"), resume=False)


@pytest.fixture(scope="module")
def resumed(pattern_tokens, tmp_path_factory):
    """8 steps, stopped after 6 with checkpoints at 4 and 6; the checkpoint at 6 lost (a crash
    after step 6), so the resume runs steps 5 and 6 again."""
    from lmpipe.train.loop import train
    from lmpipe.train.recipe import load_recipe

    recipe = load_recipe("tiny", [*STEPS, "checkpoint_every_tokens=1024"])
    run = tmp_path_factory.mktemp("monitor") / "run"
    train(recipe, pattern_tokens, run, stop_after_steps=6)
    shutil.rmtree(run / "checkpoints" / "step00000006")
    summary = train(recipe, pattern_tokens, run, resume=True)
    return run, summary


def test_every_row_has_the_names_a_user_and_gpu_check_read(resumed):
    run, summary = resumed
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 9))
    names = {"step", "tokens", "stage", "seq_len", "loss", "lr", "lr_hidden", "lr_groups"}
    names |= {"grad_accum", "grad_norm", "tokens_per_s", "loader_share", "skipped"}
    names |= {"skipped_steps", "val_loss"}  # on CPUs: no mfu, no peak_memory_gb
    for r in rows:
        assert set(r) == names
        assert 0 <= r["loader_share"] < 1 and r["tokens_per_s"] > 0
        assert r["skipped"] is False and r["skipped_steps"] == 0
    assert summary["val_loss"] == rows[-1]["val_loss"] and summary["mfu_this_call"] is None


def test_tensorboard_holds_the_rows_scalars_once_per_step_after_a_resume(resumed):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = resumed
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one a call
    board = EventAccumulator(str(run / "tensorboard"))
    board.Reload()
    rows = metrics(run)
    tags = board.Tags()["scalars"]
    assert "mfu" not in tags and "peak_memory_gb" not in tags  # CPUs
    for name in ("loss", "lr", "lr_hidden", "grad_norm", "tokens_per_s", "skipped_steps", "loader_share", "tokens"):  # fmt: skip
        events = board.Scalars(name)
        assert [e.step for e in events] == list(range(1, 9)), name  # steps 5, 6 once
        for e, r in zip(events, rows, strict=True):
            assert e.value == pytest.approx(r[name], rel=1e-6, abs=1e-12), (name, r["step"])
    events = board.Scalars("val_loss/data")
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events] == [
        (r["step"], r["val_loss"]["data"]) for r in rows
    ]


def test_mfu_is_model_flops_per_token_times_tokens_per_s_over_the_peak(
    pattern_tokens, tmp_path, monkeypatch, capsys
):
    """On a GPU the world's peak comes from the table; here it is set, the formula checked."""
    from lmpipe.train import loop
    from lmpipe.train.plan import flops_per_token, make_plan
    from lmpipe.train.recipe import load_recipe

    monkeypatch.setattr(loop, "world_peak_flops", lambda world, peak: (2e9, "a test device"))
    recipe = load_recipe("tiny", STEPS)
    summary = loop.train(recipe, pattern_tokens, tmp_path / "run", stop_after_steps=2)
    n_params = make_plan(recipe).n_params
    for r in metrics(tmp_path / "run"):
        want = flops_per_token(recipe, r["seq_len"], n_params) * r["tokens_per_s"] / 2e9
        assert r["mfu"] == pytest.approx(want, rel=1e-3, abs=1e-4) and r["mfu"] > 0
    mfu = summary["mfu_this_call"]
    assert 0 < mfu and math.isfinite(mfu)
    assert f"({mfu:.1%} MFU)" in capsys.readouterr().err.replace("\n", "")
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["parameters"] == n_params


def test_mfu_counts_the_matmuls_weights_not_the_position_table():
    """Learned positions are a lookup: MFU's 6 N leaves them out (ALiBi models have none); the
    compute of a run (`training_flops`, the scaling fits' f) keeps the recipe's whole count."""
    from lmpipe.train.plan import flops_per_token, make_plan, model_flops_per_token
    from lmpipe.train.recipe import load_recipe

    gpt = load_recipe("cerebras-gpt-111m-mup", ["model.n_positions=8192"])
    n = make_plan(gpt).n_params
    attention = 12 * 10 * 8192 * 768
    assert model_flops_per_token(gpt, 8192, n) == 6 * (n - 8192 * 768) + attention
    assert flops_per_token(gpt, 8192, n) - model_flops_per_token(gpt, 8192, n) == 6 * 8192 * 768
    btlm = load_recipe("btlm3b")
    n = make_plan(btlm).n_params
    assert model_flops_per_token(btlm, 2048, n) == flops_per_token(btlm, 2048, n)
    assert model_flops_per_token(btlm, 2048, n) == pytest.approx(
        1.789e10, rel=1e-3
    )  # 6 N + 12 L T d
