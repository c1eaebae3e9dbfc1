"""benchmarks/gpu_check.py's whole path on the CPU (`--cpu-smoke`): a token folder made with
`lmpipe tokenize` from the Python standard library, `lmpipe train` in a child process per case,
the table read from each run's metrics, and the kernel checks at tiny shapes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_cpu_smoke_measures_every_case_through_lmpipe_train(tmp_path, gpt2):
    out = tmp_path / "check"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out), "--corpus-mb", "0.2"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["device"] == "cpu" and (report["steps"], report["warmup"]) == (4, 1)
    assert [(r["seq_len"], r["micro_batch"]) for r in report["training"]] == [(64, 4), (256, 1)]
    for row in report["training"]:
        assert "error" not in row, row
        assert row["steps_measured"] == 3 and row["tokens_per_s"] > 0
        assert row["mfu"] is None and row["peak_memory_gb"] is None  # no GPU: none measured
        assert 0 <= row["loader_share"] < 1 and math.isfinite(row["loss"])
        assert row["estimate_gb"] > 0  # the dry run's estimate, beside the measured peak
    # the runs trained the case's shape on the tokenized corpus, validation out of the way
    tokens = json.loads((out / "tokens" / "manifest.json").read_text())
    assert tokens["stage"] == "tokenize"
    run = out / "runs" / "1-tiny-256"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["seq_len"] for r in rows] == [256] * 4 and not any("val_loss" in r for r in rows)
    assert [r["tokens"] for r in rows] == [1024, 2048, 3072, 4096]  # 4 micro-steps of 256
    table = (out / "gpu_check.md").read_text()
    assert "| tiny | 256 | 1 x 256 |" in table and "| tiny | 64 | 4 x 64 |" in table
    assert "| estimate GB |" in table
    assert "lmpipe train on cpu" in done.stdout
    assert all(r["forward_rel_error"] < 1e-4 for r in report["attention"])
    assert report["eval_lengths"] == {"lengths": 4, "compiled_lengths": 2}
