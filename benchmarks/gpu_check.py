"""Every GPU check and benchmark of lmpipe in one command, for a lent H100/H200 (DESIGN.md).

Training throughput is measured through `lmpipe train` itself: the real loop, loader, DeepSpeed
and model, in a child process per model, on a token folder this script makes with `lmpipe
tokenize` from a small real corpus (the Python standard library's source files). Cases:
Cerebras-GPT 111M and 1.3B (muP recipes) and BTLM-3B, each trained at seq_len 2,048 and then
8,192 in one run (a stage each, as the recipes switch; the Cerebras-GPT models with 8,192 learned
positions), a few optimizer steps per length of `--accum` micro-steps. A table (model, seq_len,
micro-batch, tokens/s, MFU, peak memory, loader share, the warm-up steps' seconds, compilation
mostly, and beside the measured peak `lmpipe train --dry-run`'s estimate of it) is read from each
run's metrics.jsonl, the first `--warmup` steps of each length left out, and written as
gpu_check.json and gpu_check.md under `--out` after every case: a device call cut short still
returns what was measured. A length a run did not finish (out of memory, say) is a row with its
error (the run log's last lines in the JSON); the other cases still run. Each run is killed
once it has its steps: a benchmark needs no checkpoint (BTLM-3B's would be ~40 GB). `--budget
SECONDS` fits the whole script into a device call: each case gets its share of the time left,
and none starts with under a minute. A stopped script (SIGTERM, Ctrl-C) kills its run, which
shares its session, and writes what it measured. `--out` receives only the report and a copy of
each run's metrics.jsonl (a device call returns at most 8 files); the corpus, the token folder,
the runs and their logs go to `--work` (default /tmp/lmpipe-gpu-check). Every case's recipe and
`--set` are checked before anything runs.
After the runs, in a child process (its GPU memory freed when it ends) and in time `--budget`
keeps back for them (90 s), three kernel checks: FlexAttention (ALiBi score_mod, causal block mask) against SDPA
with an ALiBi bias, forward and backward in bf16 at BTLM's heads (32 x 80), error and
milliseconds (DESIGN.md measured 2.24 / 5.63 ms flex, 3.78 / 13.1 ms SDPA at 4 x 2,048 / 1 x
8,192 on an H100); the compiled FlexAttention path over 20 sequence lengths, with the graphs
Dynamo compiled for them (padding buckets keep it <= 8, Dynamo's recompile limit); and the
TFLOP/s of the models' odd-sized matmuls against the same padded (`ALIGNMENT`). A failure there
is recorded in the report, and the training runs still go.

On the GPU machine (no internet). Here, first: the wheels it lacks and lmpipe's own, built from
this tree (the machine's setuptools may be older than the 77 the project's metadata needs; 65
fails), then carry `.whl` and `.cache/tiktoken` (the GPT-2 BPE files) with the working tree:

    ../shared/tools/device-wheels && python -m pip wheel -q --no-deps --no-build-isolation -w .whl .

and there:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \\
      && export PYTHONPATH=/tmp/site \\
      && PYTHONUNBUFFERED=1 TIKTOKEN_CACHE_DIR=$PWD/.cache/tiktoken python3 benchmarks/gpu_check.py --out $OUT/gpu_check --budget 420

(a lent machine's session has 15 minutes in all, its start included, and 10 a call: one call
with `timeout_s` 560 leaves the install a minute and the script 7). The machine's image has torch,
psutil, py-cpuinfo, einops, msgpack, ninja, tqdm and tensorboard (device README, KINDS.md).

BTLM-3B without activation checkpointing is tight on an 80 GB card (the estimate: ~76.5 GiB, of
the ~78 an H100 leaves): ask the device tool for an H200 (141 GB, the same 989 TFLOP/s bf16 peak,
so the same MFU goal), or on an H100 add `--cases BTLM-3B --set
model.activation_checkpointing=every_4` if it runs out of memory.
`--cases BTLM-3B` (names, or name@seq_len for one length; comma-separated) runs a subset;
`--set KEY=VALUE` adds a recipe override to every case (e.g. model.activation_checkpointing=every_4).
The children get TORCH_CUDA_ARCH_LIST=9.0 unless it is set to something else than 9.0a (with
which DeepSpeed's op build fails on an H100, DESIGN.md).

Reading the table against issue 10's goals (MFU: 111M >= 35%, 1.3B >= 45%, BTLM-3B >= 50% at
both lengths; loader share < 1%): a row short of its goal points at the next lever to measure,
in a second call with `--cases` and `--set`: a larger micro-batch where memory allows
(`micro_batch_tokens`; the peak and estimate columns say how much room is left), `--set
model.compile=none` against the default to see what regional compilation gives, and the
alignment table: if BTLM's d_ff of 6,826 runs well below its padded 6,912, padding the SwiGLU
projections with zero rows (exact: they stay zero) is worth building.

On a CPU, `--cpu-smoke` runs the same path with a tiny model at 64 and 256 tokens
(tests/test_gpu_check.py runs it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmpipe.train.model import alibi_bias, alibi_slopes, flex_alibi_attention
from lmpipe.train.run_folder import metrics_rows

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    """One model, trained by one `lmpipe train` at each of `seq_lens` in turn (one stage each,
    as the 2k -> 8k recipe switches): one process start, model build and DeepSpeed set-up for
    both lengths, and the switch itself on the GPU."""

    name: str  # a label for the table
    recipe: str
    micro_batch_tokens: int  # tokens per micro-step: 8 x 2,048 = 2 x 8,192
    seq_lens: tuple[int, ...]
    overrides: tuple[str, ...] = ()


def gpu_cases() -> list[Case]:
    learned_8k = ("model.n_positions=8192",)  # Cerebras-GPT's learned positions end at 2,048
    return [
        Case("111M", "cerebras-gpt-111m-mup", 8 * 2048, (2048, 8192), learned_8k),
        Case("1.3B", "cerebras-gpt-1.3b-mup", 8 * 2048, (2048, 8192), learned_8k),
        Case("BTLM-3B", "btlm3b", 4 * 2048, (2048, 8192)),
    ]


def smoke_cases() -> list[Case]:
    tiny = ("model.d_model=32", "model.d_ff=85", "model.n_heads=2", "model.mup.d_model_base=32",
            "model.mup.d_ff_base=85")  # fmt: skip
    return [Case("tiny", "tiny", 4 * 64, (64, 256), tiny)]


def select(cases: list[Case], wanted: str) -> list[Case]:
    """The cases (and lengths) `--cases` names: NAME for all its lengths, NAME@SEQ_LEN for one."""
    names = [w.strip() for w in wanted.split(",") if w.strip()]
    chosen = []
    for case in cases:
        lens = tuple(t for t in case.seq_lens if case.name in names or f"{case.name}@{t}" in names)
        if lens:
            chosen.append(replace(case, seq_lens=lens))
    known = {c.name for c in cases} | {f"{c.name}@{t}" for c in cases for t in c.seq_lens}
    unknown = [n for n in names if n not in known]
    if unknown or not chosen:
        raise SystemExit(
            f"--cases: no case {', '.join(unknown) or wanted!r}; known: {sorted(known)}"
        )
    return chosen


def case_overrides(case: Case, steps: int, accum: int) -> list[str]:
    """One stage of `steps` optimizer steps per length; no checkpoint, no validation during the
    measured steps (the held-out split exists, so validation must be set off)."""
    step_tokens = case.micro_batch_tokens * accum
    stages = ", ".join(f"{{seq_len: {t}, tokens: {step_tokens * steps}}}" for t in case.seq_lens)
    return [
        *case.overrides,
        f"stages=[{stages}]",
        f"micro_batch_tokens={case.micro_batch_tokens}",
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


def run_case(
    case: Case, tokens: Path, run_dir: Path, args: argparse.Namespace, timeout: float
) -> list[dict]:
    """Train the case until its metrics hold `steps` rows at every length, then kill it; a row
    of the table per length (an error row for a length it did not finish). The run's
    metrics.jsonl is copied to `--out` (its run folder stays in `--work`)."""
    command = lmpipe(
        "train", "--recipe", case.recipe, "--data", str(tokens), "--run-dir", str(run_dir),
        "--no-verify-data",
    )  # fmt: skip
    for override in [*case_overrides(case, args.steps, args.accum), *args.set]:
        command += ["--set", override]
    shutil.rmtree(run_dir, ignore_errors=True)  # this script's own run, of an earlier call
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{run_dir.name}.log"
    wanted = args.steps * len(case.seq_lens)
    started = time.perf_counter()
    with log.open("w") as out:
        # Its own process group, to kill the whole run (DeepSpeed's workers too), but the same
        # session: a device call that ends or is killed takes it along; a new session would train
        # on, checkpoint (BTLM-3B: ~40 GB) and hold the GPU from a rerun.
        child = subprocess.Popen(
            command, env=child_env(), stdout=out, stderr=subprocess.STDOUT, process_group=0
        )
        stopped = False
        try:
            while child.poll() is None and len(metrics_rows(run_dir)) < wanted:
                if time.perf_counter() - started > timeout:
                    break
                time.sleep(1)
        except KeyboardInterrupt:  # this script is stopped: the rows so far, then stop
            stopped = True
        finally:  # its steps are in, or time is up: no checkpoint, no export
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
    seconds = round(time.perf_counter() - started, 1)
    rows = metrics_rows(run_dir)
    with contextlib.suppress(OSError):
        shutil.copyfile(run_dir / "metrics.jsonl", args.out / f"{run_dir.name}.metrics.jsonl")
    micro_batch = {t: case.micro_batch_tokens // t for t in case.seq_lens}
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # as the run planned it
        plan = json.loads((run_dir / "plan.json").read_text())  # (a --set may change it)
        micro_batch.update({s["seq_len"]: s["micro_batch"] for s in plan["stages"]})
    results = []
    for seq_len in case.seq_lens:
        at = [r for r in rows if r["seq_len"] == seq_len]
        result = {
            **case_row(case, seq_len, micro_batch[seq_len]),
            "seconds": seconds, "estimate_gb": args.estimates[case.name, seq_len],
        }  # fmt: skip
        if len(at) < args.steps:
            tail = log_tail(log, 40)
            error = f"{len(at)} of {args.steps} steps in {seconds:g} s; " + " | ".join(tail[-3:])
            results.append({**result, "error": error, "log_tail": tail})
        else:
            step_tokens = case.micro_batch_tokens * args.accum
            results.append(
                {**result, **summarise(at[: args.warmup], at[args.warmup :], step_tokens)}
            )
    if stopped:
        raise Interrupted(results)
    return results


class Interrupted(KeyboardInterrupt):
    """The script was stopped during a case: the rows of what that case measured."""

    def __init__(self, rows: list[dict]):
        super().__init__()
        self.rows = rows


def log_tail(log: Path, lines: int) -> list[str]:
    """A failed run's last lines, kept in the report: the run folder does not come back from a
    device call (only a few files under $OUT do)."""
    with contextlib.suppress(OSError):
        return log.read_text(errors="replace").strip().splitlines()[-lines:]
    return []


def estimated_gb(case: Case, seq_len: int, args: argparse.Namespace) -> float:
    """`lmpipe train --dry-run`'s estimate of the peak memory at one length, in GB as
    peak_memory_gb. Computed for every case before anything runs: it loads each case's recipe
    with `--set`, so a mistyped override stops the script before the device time goes."""
    from lmpipe.train.memory import estimate_memory
    from lmpipe.train.plan import make_plan
    from lmpipe.train.recipe import load_recipe

    one = replace(case, seq_lens=(seq_len,))
    recipe = load_recipe(case.recipe, [*case_overrides(one, args.steps, args.accum), *args.set])
    return round(estimate_memory(recipe, make_plan(recipe)).peak / 1e9, 1)


def summarise(warmup: list[dict], rows: list[dict], step_tokens: int) -> dict:
    """The measured steps' means (the peak memory's maximum); None where no row has the field
    (MFU and memory on a CPU). `warmup_seconds`: the left-out first steps' time, compilation
    mostly (at a second length: its recompilation)."""

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
        "warmup_seconds": round(sum(step_tokens / r["tokens_per_s"] for r in warmup), 1),
        "loss": rows[-1]["loss"],
    }


COLUMNS = ("model", "seq_len", "micro-batch", "tokens/s", "MFU", "peak memory GB", "estimate GB", "loader share", "warm-up s")  # fmt: skip


def table_rows(results: list[dict]) -> list[tuple[str, ...]]:
    def fmt(value: float | None, pattern: str) -> str:
        return "-" if value is None else format(value, pattern)

    rows = []
    for r in results:
        head = (r["name"], f"{r['seq_len']:,}", f"{r['micro_batch']} x {r['seq_len']:,}")
        if "error" in r:
            rows.append(
                (*head, "failed", r["error"][:80], "", fmt(r["estimate_gb"], ".1f"), "", "")
            )
            continue
        rows.append((
            *head, fmt(r["tokens_per_s"], ",.0f"), fmt(r["mfu"], ".1%"),
            fmt(r["peak_memory_gb"], ".1f"), fmt(r["estimate_gb"], ".1f"), fmt(r["loader_share"], ".2%"),
            fmt(r["warmup_seconds"], ".1f"),
        ))  # fmt: skip
    return rows


def markdown(report: dict) -> str:
    lines = [f"lmpipe train on {report['device']}", "", "| " + " | ".join(COLUMNS) + " |"]
    lines.append("|" + "---|" * len(COLUMNS))
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report.get("training", []))]
    if report.get("interrupted"):
        lines += ["", f"Interrupted: {report['interrupted']}."]
    if report.get("attention"):
        lines += ["", "| attention (batch x seq_len) | rel. error | flex fwd+bwd ms | SDPA+bias fwd+bwd ms |"]  # fmt: skip
        lines.append("|---|---|---|---|")
        for r in report["attention"]:
            ms = [f"{r[k]:.2f}" if k in r else "-" for k in ("flex_fwd_bwd_ms", "sdpa_fwd_bwd_ms")]
            lines.append(f"| {r['batch']} x {r['seq_len']:,} | {r['forward_rel_error']:.1e} | {' | '.join(ms)} |")  # fmt: skip
    if report.get("eval_lengths"):
        e = report["eval_lengths"]
        lines += ["", f"Evaluation lengths: {e['lengths']} lengths, {e['padded_lengths']} padded, "
                  f"{e['compiled_graphs']} graphs compiled (Dynamo's limit: 8)."]  # fmt: skip
    if report.get("alignment"):
        lines += [
            "",
            "| matmul (M, K, N) | odd: TFLOP/s | padded to 128: TFLOP/s |",
            "|---|---|---|",
        ]
        for r in report["alignment"]:
            odd, aligned = r["odd"], r["aligned"]
            lines.append(
                f"| {r['what']} {tuple(odd['shape'])} | {odd['tflops']:.1f} | "
                f"{aligned['tflops']:.1f} ({tuple(aligned['shape'])}) |"
            )
    if report.get("kernel_error"):
        error = report["kernel_error"]
        lines += ["", "Kernel checks failed: " + (error if isinstance(error, str) else error[-1])]
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
    """Evaluation's many lengths through FlexAttention: the graphs Dynamo compiled for them
    (its own count; padding buckets keep it within its recompile limit of 8, above which it falls
    back to an unfused kernel). On a CPU nothing is compiled (the unfused kernel is the path)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    slopes = alibi_slopes(heads).to(device)
    with torch.no_grad():
        for T in lengths:
            q = torch.randn(1, heads, T, d_head, device=device, dtype=dtype)
            out = flex_alibi_attention(q, q, q, slopes, 1 / d_head)
            assert out.shape[2] == T
    padded = {max(128, 1 << (T - 1).bit_length()) for T in lengths}
    return {
        "lengths": len(lengths),
        "padded_lengths": len(padded),
        "compiled_graphs": counters["stats"]["unique_graphs"],
    }


# Matmuls (M, K, N) whose odd size the models cannot choose, beside the same matmul padded to a
# multiple of 128: GPT-2's vocabulary (the chunked loss pads it: loss.py, VOCAB_ALIGN) and
# BTLM's d_ff of 6,826 (floor(8/3 x 2,560), fixed by its checkpoints; not padded). Their TFLOP/s
# say whether padding d_ff, exactly (zero rows stay zero under SwiGLU), would be worth its cost.
ALIGNMENT = (
    ("unembedding 111M", (8192, 768, 50257), (8192, 768, 50304)),
    ("unembedding BTLM-3B", (8192, 2560, 50257), (8192, 2560, 50304)),
    ("SwiGLU in BTLM-3B", (8192, 2560, 6826), (8192, 2560, 6912)),
    ("SwiGLU out BTLM-3B", (8192, 6826, 2560), (8192, 6912, 2560)),
)


def check_alignment(device: str, dtype: torch.dtype, cases=ALIGNMENT, repeats: int = 20) -> list:
    """Each matmul's TFLOP/s at its odd size and padded (y = x W^T, as nn.Linear)."""
    rows = []
    for what, *shapes in cases:
        row: dict = {"what": what}
        for label, (M, K, N) in zip(("odd", "aligned"), shapes, strict=True):
            x = torch.randn(M, K, device=device, dtype=dtype)
            w = torch.randn(N, K, device=device, dtype=dtype)
            ms = timed(lambda x=x, w=w: F.linear(x, w), repeats)
            row[label] = {"shape": [M, K, N], "ms": ms, "tflops": 2 * M * K * N / ms / 1e9}
        rows.append(row)
    return rows


def kernel_checks(cuda: bool) -> dict:
    if cuda:
        return {
            "attention": check_attention("cuda", torch.bfloat16, [(4, 2048), (1, 8192)], 32, 80),
            "eval_lengths": check_eval_lengths(
                "cuda", torch.bfloat16, 32, 80, list(range(100, 2100, 100))
            ),
            "alignment": check_alignment("cuda", torch.bfloat16),
        }
    with torch.no_grad():  # FlexAttention has no backward pass on the CPU
        attention = check_attention("cpu", torch.float32, [(1, 64), (2, 40)], 4, 8)
    tiny = (("unembedding", (64, 32, 97), (64, 32, 128)),)
    return {
        "attention": attention,
        "eval_lengths": check_eval_lengths("cpu", torch.float32, 4, 8, [20, 37, 64, 130]),
        "alignment": check_alignment("cpu", torch.float32, tiny, repeats=3),
    }


KERNEL_SECONDS = 90.0  # of --budget, kept for the kernel checks (compiling FlexAttention mostly)


def run_kernel_checks(cuda: bool, work: Path, timeout: float) -> dict:
    """`kernel_checks` in a child process, whose GPU memory is freed when it ends: the caching
    allocator keeps what a process freed (the 8,192-token SDPA check's ALiBi bias alone peaks
    near 17.5 GB), and nothing of it may stay while a training run needs the card. A failure or
    a timeout is recorded in the report."""
    result = work / "kernels.json"
    result.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--kernels-only", str(result)]
    if not cuda:
        command.append("--cpu-smoke")
    try:
        done = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"kernel_error": f"kernel checks timed out after {timeout:g} s"}
    if done.returncode != 0 or not result.is_file():
        return {"kernel_error": (done.stderr or done.stdout).strip().splitlines()[-20:]}
    return json.loads(result.read_text())


def device_name(cuda: bool) -> str:
    """The GPU's name, asked in a child process: this one never opens a CUDA context, which
    would hold GPU memory the training runs need."""
    if not cuda:
        return "cpu"
    command = [sys.executable, "-c", "import torch; print(torch.cuda.get_device_name())"]
    return subprocess.run(command, capture_output=True, text=True).stdout.strip() or "cuda"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for the report (and each run's metrics)")
    parser.add_argument(
        "--work", type=Path, default=Path("/tmp/lmpipe-gpu-check"),
        help="folder for the corpus, the token folder, the runs and their logs",
    )  # fmt: skip
    parser.add_argument("--cpu-smoke", action="store_true", help="a tiny model, on the CPU")
    parser.add_argument("--cases", default="", help="e.g. 111M,BTLM-3B@8192 (default: all)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per length")
    parser.add_argument("--warmup", type=int, default=None, help="first steps left out")
    parser.add_argument("--accum", type=int, default=4, help="micro-steps per optimizer step")
    parser.add_argument("--set", action="append", default=[], help="override for every case")
    parser.add_argument("--corpus-mb", type=float, default=None, help="text to tokenize")
    parser.add_argument("--case-timeout", type=float, default=540.0, help="seconds per case")
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds for the whole script: a case gets "
        "what is left (its share, when cases remain), and none starts with under a minute"
    )  # fmt: skip
    parser.add_argument("--skip-kernels", action="store_true", help="only the training runs")
    parser.add_argument("--kernels-only", type=Path, help=argparse.SUPPRESS)  # the child's JSON
    args = parser.parse_args()
    if args.out is None and args.kernels_only is None:
        parser.error("--out is required")
    return args


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --cpu-smoke")
    if args.kernels_only:  # the child of run_kernel_checks
        report = kernel_checks(cuda)
        args.kernels_only.write_text(json.dumps(report, indent=2) + "\n")
        return
    args.steps = args.steps or (4 if args.cpu_smoke else 8)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.cpu_smoke else 3)
    if args.warmup >= args.steps:
        raise SystemExit(f"--warmup ({args.warmup}) must be below --steps ({args.steps})")
    cases = smoke_cases() if args.cpu_smoke else gpu_cases()
    if args.cases:
        cases = select(cases, args.cases)
    from lmpipe.dataprep.errors import LmpipeError

    try:
        args.estimates = {(c.name, t): estimated_gb(c, t, args) for c in cases for t in c.seq_lens}
    except LmpipeError as e:
        raise SystemExit(f"gpu_check: {e}") from None
    # A stopped script (the device call's time limit sends SIGTERM) kills its run and still
    # writes the report of what it measured.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": None, "torch": torch.__version__, "steps": args.steps,
                    "warmup": args.warmup, "accum": args.accum, "set": args.set}  # fmt: skip
    # The training table is what the device time is for: the kernel checks run after it, in
    # time kept back for them from --budget.
    kept_back = 0.0 if args.skip_kernels or args.budget is None else KERNEL_SECONDS
    try:
        report["device"] = device_name(cuda)
        write_report(report, args.out)
        megabytes = args.corpus_mb or (0.3 if args.cpu_smoke else 16)
        # Named by its size: --work is shared by calls, and tokens of another corpus must not
        # serve this one (a warm machine's second call reuses the same corpus's tokens).
        tokens = args.work / f"tokens-{megabytes:g}MB"
        if not (tokens / "manifest.json").is_file():
            tokenize(make_corpus(args.work / f"corpus-{megabytes:g}MB", megabytes), tokens)
        report["training"] = []
        for i, case in enumerate(cases):
            timeout = args.case_timeout
            if args.budget is not None:  # a device call's time is short: every case gets a share
                left = args.budget - kept_back - (time.perf_counter() - started)
                if left < 60:
                    report["training"] += skipped(
                        case, f"not started: {left:.0f} s of --budget left"
                    )
                    continue
                timeout = min(timeout, left / (len(cases) - i) if i < len(cases) - 1 else left)
            run_dir = args.work / "runs" / f"{i}-{case.recipe}"
            report["training"] += run_case(case, tokens, run_dir, args, timeout)
            # written after every case: a device call cut short still returns what was measured
            write_report(report, args.out)
        if not args.skip_kernels:
            timeout = 240.0
            if args.budget is not None:
                timeout = max(30.0, args.budget - (time.perf_counter() - started))
            report.update(run_kernel_checks(cuda, args.work, timeout))
    except KeyboardInterrupt as e:
        report.setdefault("training", []).extend(getattr(e, "rows", []))
        report["interrupted"] = f"stopped after {time.perf_counter() - started:.0f} s"
        write_report(report, args.out)
        raise SystemExit(f"gpu_check: interrupted; what was measured is in {args.out}") from None
    write_report(report, args.out)
    print_table(report["training"], report["device"])
    print(f"gpu_check: {args.out / 'gpu_check.json'}, {args.out / 'gpu_check.md'}")


def case_row(case: Case, seq_len: int, micro_batch: int) -> dict:
    """What a table row says of its case, measured or not."""
    return {"name": case.name, "recipe": case.recipe, "seq_len": seq_len,
            "micro_batch": micro_batch, "overrides": list(case.overrides)}  # fmt: skip


def skipped(case: Case, why: str) -> list[dict]:
    return [
        {**case_row(case, t, case.micro_batch_tokens // t), "estimate_gb": None, "error": why}
        for t in case.seq_lens
    ]


def write_report(report: dict, out: Path) -> None:
    """gpu_check.json and gpu_check.md, each replaced whole (never left half-written)."""
    for name, text in (("gpu_check.json", json.dumps(report, indent=2) + "\n"),
                       ("gpu_check.md", markdown(report))):  # fmt: skip
        part = out / f"{name}.partial"
        part.write_text(text)
        part.replace(out / name)


if __name__ == "__main__":
    main()
