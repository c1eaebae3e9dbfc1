"""Every GPU check and benchmark of lmpipe in one command, for a lent H100/H200 (DESIGN.md).

Training throughput is measured through `lmpipe train` itself: the real loop, loader, DeepSpeed
and model, in a child process per case, on a token folder this script makes with `lmpipe
tokenize` from a small real corpus (the Python standard library's source files). Cases:
Cerebras-GPT 111M and 1.3B (muP recipes) and BTLM-3B, each at seq_len 2,048 and 8,192 (the
Cerebras-GPT models with 8,192 learned positions for the longer case), a few optimizer steps each
of `--accum` micro-steps. A table (model, seq_len, micro-batch, tokens/s, MFU, peak memory,
loader share, and beside the measured peak `lmpipe train --dry-run`'s estimate of it) is read from
each run's metrics.jsonl, the first `--warmup` steps (compilation) left out, and written as
gpu_check.json and gpu_check.md under `--out`. A case that fails (out of memory, say) is a row
with its error; the others still run. Each run is killed once it has its steps: a benchmark needs
no checkpoint (BTLM-3B's would be ~40 GB). Before the runs, two kernel checks: FlexAttention (ALiBi score_mod, causal block mask) against SDPA with an ALiBi bias,
forward and backward in bf16 at BTLM's heads (32 x 80), error and milliseconds (DESIGN.md
measured 2.24 / 5.63 ms flex, 3.78 / 13.1 ms SDPA at 4 x 2,048 / 1 x 8,192 on an H100); and the
compiled FlexAttention path over 20 sequence lengths, counting distinct compiled lengths
(padding buckets keep it <= 8, Dynamo's recompile limit).

On the GPU machine (no internet; prepare the wheels here with ../shared/tools/device-wheels,
carry `.whl` and `.cache/tiktoken`, the GPT-2 BPE files, with the working tree):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \\
      && export PYTHONPATH=/tmp/site \\
      && python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . \\
      && TIKTOKEN_CACHE_DIR=$PWD/.cache/tiktoken python3 benchmarks/gpu_check.py --out $OUT/gpu_check

BTLM-3B without activation checkpointing is tight on an 80 GB card (the estimate: ~76 GiB); if
it runs out of memory, add `--cases BTLM-3B --set model.activation_checkpointing=every_4`.
`--cases BTLM-3B` (names or name@seq_len, comma-separated) runs a subset; `--set KEY=VALUE` adds a
recipe override to every case (e.g. model.activation_checkpointing=every_4). The children get
TORCH_CUDA_ARCH_LIST=9.0 unless it is set to something else than 9.0a (with which DeepSpeed's op
build fails on an H100, DESIGN.md).

On a CPU, `--cpu-smoke` runs the same path with a tiny model at 64 and 256 tokens
(tests/test_gpu_check.py runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmpipe.train.model import alibi_bias, alibi_slopes, flex_alibi_attention
from lmpipe.train.run_folder import metrics_rows

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    name: str  # a label for the table
    recipe: str
    seq_len: int
    micro_batch: int  # sequences per micro-step
    overrides: tuple[str, ...] = ()


def gpu_cases() -> list[Case]:
    learned_8k = ("model.n_positions=8192",)  # Cerebras-GPT's learned positions end at 2,048
    return [
        Case("111M", "cerebras-gpt-111m-mup", 2048, 8),
        Case("111M", "cerebras-gpt-111m-mup", 8192, 2, learned_8k),
        Case("1.3B", "cerebras-gpt-1.3b-mup", 2048, 8),
        Case("1.3B", "cerebras-gpt-1.3b-mup", 8192, 2, learned_8k),
        Case("BTLM-3B", "btlm3b", 2048, 4),
        Case("BTLM-3B", "btlm3b", 8192, 1),
    ]


def smoke_cases() -> list[Case]:
    tiny = ("model.d_model=32", "model.d_ff=85", "model.n_heads=2", "model.mup.d_model_base=32",
            "model.mup.d_ff_base=85")  # fmt: skip
    return [Case("tiny", "tiny", 64, 4, tiny), Case("tiny", "tiny", 256, 1, tiny)]


def case_overrides(case: Case, steps: int, accum: int) -> list[str]:
    """One stage of `steps` optimizer steps at the case's shape; no checkpoint, no validation
    during the measured steps (the held-out split exists, so validation must be set off)."""
    micro_tokens = case.micro_batch * case.seq_len
    step_tokens = micro_tokens * accum
    return [
        *case.overrides,
        f"stages=[{{seq_len: {case.seq_len}, tokens: {step_tokens * steps}}}]",
        f"micro_batch_tokens={micro_tokens}",
        f"tokens_per_step={step_tokens}",
        f"schedule.warmup_tokens={step_tokens}",
        "checkpoint_every_tokens=1000000000000000",
        "validation={every_tokens: 1000000000000000, tokens: 64}",
    ]


def make_corpus(folder: Path, megabytes: float) -> Path:
    """A JSONL of the Python standard library's source files, up to `megabytes` of text."""
    folder.mkdir(parents=True, exist_ok=True)
    path, budget = folder / "stdlib.jsonl", int(megabytes * 1e6)
    with path.open("w", encoding="utf-8") as out:
        for source in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
            if budget <= 0:
                break
            try:
                text = source.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            out.write(json.dumps({"text": text}) + "\n")
            budget -= len(text)
    return path


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    if env.get("TORCH_CUDA_ARCH_LIST", "9.0a") == "9.0a":
        env["TORCH_CUDA_ARCH_LIST"] = "9.0"
    cache = ROOT / ".cache" / "tiktoken"
    if "TIKTOKEN_CACHE_DIR" not in env and cache.is_dir():
        env["TIKTOKEN_CACHE_DIR"] = str(cache)
    return env


def lmpipe(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmpipe.cli", *args]


def tokenize(corpus: Path, tokens: Path) -> None:
    done = subprocess.run(
        lmpipe("tokenize", str(corpus), "--out", str(tokens), "--holdout", "0.01", "-j", "4"),
        env=child_env(), capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"lmpipe tokenize failed:\n{done.stderr[-3000:]}")


def run_case(case: Case, tokens: Path, run_dir: Path, args: argparse.Namespace) -> dict:
    """Train the case until its metrics hold `steps` rows, then kill it; the row of the table."""
    command = lmpipe(
        "train", "--recipe", case.recipe, "--data", str(tokens), "--run-dir", str(run_dir),
        "--no-verify-data",
    )  # fmt: skip
    for override in [*case_overrides(case, args.steps, args.accum), *args.set]:
        command += ["--set", override]
    shutil.rmtree(run_dir, ignore_errors=True)  # this script's own run, of an earlier call
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.with_suffix(".log")
    started = time.perf_counter()
    with log.open("w") as out:
        child = subprocess.Popen(
            command, env=child_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        while child.poll() is None and len(metrics_rows(run_dir)) < args.steps:
            if time.perf_counter() - started > args.case_timeout:
                break
            time.sleep(1)
        if child.poll() is None:  # its steps are in (or time is up): no checkpoint, no export
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    rows = metrics_rows(run_dir)
    result = {
        **asdict(case),
        "overrides": list(case.overrides),
        "seconds": round(time.perf_counter() - started, 1),
        "estimate_gb": estimated_gb(case, args),
    }
    if len(rows) < args.steps:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        return {**result, "error": f"{len(rows)} of {args.steps} steps; " + " | ".join(tail)}
    return {**result, **summarise(rows[args.warmup :])}


def estimated_gb(case: Case, args: argparse.Namespace) -> float:
    """`lmpipe train --dry-run`'s estimate of the case's peak memory, in GB as peak_memory_gb."""
    from lmpipe.train.memory import estimate_memory
    from lmpipe.train.plan import make_plan
    from lmpipe.train.recipe import load_recipe

    recipe = load_recipe(case.recipe, [*case_overrides(case, args.steps, args.accum), *args.set])
    return round(estimate_memory(recipe, make_plan(recipe)).peak / 1e9, 1)


def summarise(rows: list[dict]) -> dict:
    """The measured steps' means (the peak memory's maximum); None where no row has the field
    (MFU and memory on a CPU)."""

    def mean(key: str) -> float | None:
        values = [r[key] for r in rows if r.get(key) is not None]
        return float(np.mean(values)) if values else None

    memory = [r["peak_memory_gb"] for r in rows if r.get("peak_memory_gb") is not None]
    return {
        "steps_measured": len(rows),
        "tokens_per_s": mean("tokens_per_s"),
        "mfu": mean("mfu"),
        "peak_memory_gb": max(memory) if memory else None,
        "loader_share": mean("loader_share"),
        "loss": rows[-1]["loss"],
    }


COLUMNS = ("model", "seq_len", "micro-batch", "tokens/s", "MFU", "peak memory GB", "estimate GB", "loader share")  # fmt: skip


def table_rows(results: list[dict]) -> list[tuple[str, ...]]:
    def fmt(value: float | None, pattern: str) -> str:
        return "-" if value is None else format(value, pattern)

    rows = []
    for r in results:
        head = (r["name"], f"{r['seq_len']:,}", f"{r['micro_batch']} x {r['seq_len']:,}")
        if "error" in r:
            rows.append((*head, "failed", r["error"][:80], "", fmt(r["estimate_gb"], ".1f"), ""))
            continue
        rows.append((
            *head, fmt(r["tokens_per_s"], ",.0f"), fmt(r["mfu"], ".1%"),
            fmt(r["peak_memory_gb"], ".1f"), fmt(r["estimate_gb"], ".1f"), fmt(r["loader_share"], ".2%"),
        ))  # fmt: skip
    return rows


def markdown(results: list[dict], device: str) -> str:
    lines = [f"lmpipe train on {device}", "", "| " + " | ".join(COLUMNS) + " |"]
    lines.append("|" + "---|" * len(COLUMNS))
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    return "\n".join(lines) + "\n"


def print_table(results: list[dict], device: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from lmpipe.dataprep.report import print_table as show

    table = Table(title=f"lmpipe train on {device}")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col == "model" else "right", no_wrap=True)
    for row in table_rows(results):
        table.add_row(*row)
    show(Console(), table)


# --- kernel checks ---------------------------------------------------------------------------


def timed(fn, repeats: int) -> float:
    """Median milliseconds of `fn()` (synchronised on CUDA)."""
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def check_attention(
    device: str, dtype: torch.dtype, shapes: list[tuple[int, int]], heads: int, d_head: int
) -> list[dict]:
    slopes = alibi_slopes(heads).to(device)
    return [attention_case(device, dtype, slopes, batch, T, d_head) for batch, T in shapes]


def attention_case(
    device: str, dtype: torch.dtype, slopes: torch.Tensor, batch: int, T: int, d_head: int
) -> dict:
    heads = len(slopes)
    q, k, v = (
        torch.randn(batch, heads, T, d_head, device=device, dtype=dtype, requires_grad=True)
        for _ in range(3)
    )
    grad = torch.randn(batch, heads, T, d_head, device=device, dtype=dtype)

    def sdpa():
        bias = alibi_bias(slopes, T, T, dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1 / d_head)

    def flex():
        return flex_alibi_attention(q, k, v, slopes, 1 / d_head)

    ref, out = sdpa(), flex()
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    row = {"batch": batch, "seq_len": T, "forward_rel_error": rel}
    if device == "cuda":
        row["sdpa_fwd_bwd_ms"] = timed(lambda: sdpa().backward(grad), repeats=10)
        row["flex_fwd_bwd_ms"] = timed(lambda: flex().backward(grad), repeats=10)
    return row


def check_eval_lengths(
    device: str, dtype: torch.dtype, heads: int, d_head: int, lengths: list[int]
) -> dict:
    import torch._dynamo

    torch._dynamo.reset()
    slopes = alibi_slopes(heads).to(device)
    padded = set()
    with torch.no_grad():
        for T in lengths:
            q = torch.randn(1, heads, T, d_head, device=device, dtype=dtype)
            out = flex_alibi_attention(q, q, q, slopes, 1 / d_head)
            assert out.shape[2] == T
            padded.add(max(128, 1 << (T - 1).bit_length()))
    return {"lengths": len(lengths), "compiled_lengths": len(padded)}


def kernel_checks(cuda: bool) -> dict:
    if cuda:
        return {
            "attention": check_attention("cuda", torch.bfloat16, [(4, 2048), (1, 8192)], 32, 80),
            "eval_lengths": check_eval_lengths(
                "cuda", torch.bfloat16, 32, 80, list(range(100, 2100, 100))
            ),
        }
    with torch.no_grad():  # FlexAttention has no backward pass on the CPU
        attention = check_attention("cpu", torch.float32, [(1, 64), (2, 40)], 4, 8)
    return {
        "attention": attention,
        "eval_lengths": check_eval_lengths("cpu", torch.float32, 4, 8, [20, 37, 64, 130]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the report and runs")
    parser.add_argument("--cpu-smoke", action="store_true", help="a tiny model, on the CPU")
    parser.add_argument("--cases", default="", help="e.g. 111M,BTLM-3B@8192 (default: all)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps a case runs")
    parser.add_argument("--warmup", type=int, default=None, help="first steps left out")
    parser.add_argument("--accum", type=int, default=4, help="micro-steps per optimizer step")
    parser.add_argument("--set", action="append", default=[], help="override for every case")
    parser.add_argument("--corpus-mb", type=float, default=None, help="text to tokenize")
    parser.add_argument("--case-timeout", type=float, default=600.0, help="seconds per case")
    parser.add_argument("--skip-kernels", action="store_true", help="only the training runs")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --cpu-smoke")
    args.steps = args.steps or (4 if args.cpu_smoke else 8)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.cpu_smoke else 3)
    if args.warmup >= args.steps:
        raise SystemExit(f"--warmup ({args.warmup}) must be below --steps ({args.steps})")
    cases = smoke_cases() if args.cpu_smoke else gpu_cases()
    if args.cases:
        wanted = args.cases.split(",")
        cases = [c for c in cases if c.name in wanted or f"{c.name}@{c.seq_len}" in wanted]
    device = torch.cuda.get_device_name() if cuda else "cpu"
    report: dict = {"device": device, "torch": torch.__version__, "steps": args.steps,
                    "warmup": args.warmup, "accum": args.accum}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.skip_kernels:
        report.update(kernel_checks(cuda))
    corpus = make_corpus(args.out / "corpus", args.corpus_mb or (0.3 if args.cpu_smoke else 16))
    tokens = args.out / "tokens"
    if not tokens.is_dir():
        tokenize(corpus, tokens)
    report["training"] = []
    for i, case in enumerate(cases):
        run_dir = args.out / "runs" / f"{i}-{case.recipe}-{case.seq_len}"
        report["training"].append(run_case(case, tokens, run_dir, args))
        # written after every case: a device call cut short still returns what was measured
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "gpu_check.md").write_text(markdown(report["training"], device))
    print_table(report["training"], device)
    print(f"gpu_check: {args.out / 'gpu_check.json'}, {args.out / 'gpu_check.md'}")


if __name__ == "__main__":
    main()
