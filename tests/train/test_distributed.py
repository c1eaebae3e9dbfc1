"""Two ranks under torchrun (gloo on the CPU) train the same run as one process: DeepSpeed averages
gradients across ranks, the loader gives each rank its slice of every global batch, and the
accumulation halves, so the losses agree to float rounding."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.train.test_loop import TINY_MODEL

SETTINGS = [
    *TINY_MODEL,
    "tokens_per_step=512",
    "micro_batch_tokens=128",
    "stages.0.tokens=3072",
    "stages.1.seq_len=128",
    "stages.1.tokens=1024",
    "schedule.warmup_tokens=1024",
    "checkpoint_every_tokens=2048",
    # an odd number of held-out windows (7 of 64): one rank pads, both score them all
    "validation={every_tokens: 2048, tokens: 448}",
]


def train_command(data, run_dir):
    args = ["train", "--recipe", "tiny", "--data", str(data), "--run-dir", str(run_dir)]
    for s in SETTINGS:
        args += ["--set", s]
    return args


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path, pattern_tokens):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun not installed beside this Python")
    data = pattern_tokens
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [
            torchrun,
            "--standalone",  # a free rendezvous port, not the fixed 29500
            "--nproc_per_node",
            "2",
            "-m",
            "lmpipe.cli",
            *train_command(data, tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, "-m", "lmpipe.cli", *train_command(data, tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    rows = {
        n: [json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
        for n in ("one", "two")
    }
    assert [r["seq_len"] for r in rows["two"]] == [64] * 6 + [128] * 2
    for a, b in zip(rows["one"], rows["two"], strict=True):
        assert (a["step"], a["tokens"], a["seq_len"]) == (b["step"], b["tokens"], b["seq_len"])
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert ("val_loss" in a) == ("val_loss" in b)
        for source, loss in a.get("val_loss", {}).items():
            assert loss == pytest.approx(b["val_loss"][source], abs=1e-4)
    assert [r["step"] for r in rows["two"] if "val_loss" in r] == [4, 8]
    assert json.loads((tmp_path / "two" / "plan.json").read_text())["grad_accum"] == 2
    assert json.loads((tmp_path / "one" / "plan.json").read_text())["grad_accum"] == 4
    assert (tmp_path / "two" / "logs" / "rank1.log").read_text().count("loss") == 8
    assert (tmp_path / "two" / "manifest.json").is_file()
