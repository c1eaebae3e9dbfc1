"""benchmarks/gpu_check.py's whole path on the CPU (`--cpu-smoke`): a token folder made with
`lmpipe tokenize` from the Python standard library, `lmpipe train` in a child process per case,
the table read from each run's metrics, and the kernel checks at tiny shapes."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_cpu_smoke_measures_every_case_through_lmpipe_train(tmp_path, gpt2):
    out, work = tmp_path / "check", tmp_path / "work"
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--cpu-smoke",
            "--out",
            str(out),
            "--work",
            str(work),
            "--corpus-mb",
            "0.2",
        ],
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
    tokens = json.loads((work / "tokens-0.2MB" / "manifest.json").read_text())
    assert tokens["stage"] == "tokenize"
    # one run trains both lengths, a stage each, as the 2k -> 8k recipe switches
    run = work / "runs" / "0-tiny"
    metrics = (run / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in metrics.splitlines()]
    assert [r["seq_len"] for r in rows] == [64] * 4 + [256] * 4
    assert not any("val_loss" in r for r in rows)
    assert [r["tokens"] for r in rows] == [1024 * i for i in range(1, 9)]  # 4 micro-steps of 256
    for row, seq_len in zip(report["training"], (64, 256), strict=True):
        first = [r for r in rows if r["seq_len"] == seq_len][0]  # the one warm-up step
        assert row["warmup_seconds"] == round(1024 / first["tokens_per_s"], 1) > 0
    table = (out / "gpu_check.md").read_text()
    assert "| tiny | 256 | 1 x 256 |" in table and "| tiny | 64 | 4 x 64 |" in table
    assert "| estimate GB |" in table
    assert "lmpipe train on cpu" in done.stdout
    # both tiny shapes measured (an empty list would pass the error check below)
    assert [(r["batch"], r["seq_len"]) for r in report["attention"]] == [(1, 64), (2, 40)]
    assert all(r["forward_rel_error"] < 1e-4 for r in report["attention"])
    assert report["eval_lengths"]["lengths"] == 4 and report["eval_lengths"]["padded_lengths"] == 2
    assert report["eval_lengths"]["compiled_graphs"] <= 2  # Dynamo's own count
    # what a device call returns (at most 8 files, 2 folders down): the report and the metrics
    assert sorted(p.name for p in out.rglob("*")) == ["0-tiny.metrics.jsonl", "gpu_check.json", "gpu_check.md"]  # fmt: skip
    assert (out / "0-tiny.metrics.jsonl").read_text() == metrics
    (alignment,) = report["alignment"]  # a matmul at an odd size and padded: their TFLOP/s
    assert (alignment["odd"]["shape"], alignment["aligned"]["shape"]) == ([64, 32, 97], [64, 32, 128])  # fmt: skip
    assert alignment["odd"]["tflops"] > 0 and alignment["aligned"]["tflops"] > 0
    assert "| unembedding (64, 32, 97) | " in table


def test_cases_by_name_or_length_and_a_budget_that_starts_no_case(tmp_path):
    """`--cases NAME@SEQ_LEN` keeps one length of a case; an unknown name is an error naming the
    known ones; `--budget` too short for any case reports each length as not started."""
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    cases = gpu_check.select(gpu_check.gpu_cases(), "111M, BTLM-3B@8192")
    assert [(c.name, c.seq_lens) for c in cases] == [("111M", (2048, 8192)), ("BTLM-3B", (8192,))]
    with pytest.raises(SystemExit, match=r"no case 'BTLM-3B@4096'; known: \['1.3B'"):
        gpu_check.select(gpu_check.gpu_cases(), "BTLM-3B@4096")
    assert gpu_check.case_overrides(cases[1], 8, 4)[:4] == [
        "stages=[{seq_len: 8192, tokens: 262144}]",
        "micro_batch_tokens=8192",
        "tokens_per_step=32768",
        "schedule.warmup_tokens=32768",
    ]
    out, work = tmp_path / "check", tmp_path / "work"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out), "--work", str(work),
         "--corpus-mb", "0.05", "--skip-kernels", "--budget", "30"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert [r["seq_len"] for r in report["training"]] == [64, 256]
    assert all(re.fullmatch(r"not started: \d+ s of --budget left", r["error"]) for r in report["training"])  # fmt: skip
    assert "| tiny | 256 | 1 x 256 | failed | not started" in (out / "gpu_check.md").read_text()
    assert not (work / "runs").exists()


def test_a_mistyped_set_stops_before_anything_runs(tmp_path):
    """Every case's recipe is loaded with --set first: a typo is one line, not a traceback after
    the kernel checks and the first run (a device call's minutes)."""
    out, work = tmp_path / "check", tmp_path / "work"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out), "--work", str(work),
         "--set", "model.activation_checkpointing=every4"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "gpu_check: tiny.yaml: model.activation_checkpointing: String should match pattern "
        "'^(none|full|every_[1-9][0-9]*)$'"
    ]
    assert not out.exists() and not work.exists()


@pytest.mark.slow
def test_a_stopped_script_kills_its_run_and_reports_what_it_measured(tmp_path):
    """SIGTERM (a device call's time limit) during a run: the run is killed, not left training
    on to a checkpoint on the GPU, and the report holds the rows measured so far."""
    out, work = tmp_path / "check", tmp_path / "work"
    script = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out), "--work", str(work),
         "--corpus-mb", "0.2", "--skip-kernels", "--steps", "500"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    metrics = work / "runs" / "0-tiny" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and script.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.5)
    script.send_signal(signal.SIGTERM)
    _, stderr = script.communicate(timeout=60)
    assert script.returncode == 1 and "interrupted" in stderr
    rows = len(metrics.read_text().splitlines())
    time.sleep(5)  # a run left going would write more rows, then a checkpoint
    assert len(metrics.read_text().splitlines()) == rows < 1000
    assert not (work / "runs" / "0-tiny" / "checkpoints").exists()
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["interrupted"].startswith("stopped after")
    assert [r["seq_len"] for r in report["training"]] == [64, 256]
    assert report["training"][0]["error"].startswith(f"{rows} of 500 steps")
