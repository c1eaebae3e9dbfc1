"""Benchmark `lmpipe eval` against lm-evaluation-harness's `hf` model on the same exported model.

    TIKTOKEN_CACHE_DIR=/tmp/tk /tmp/lmeval/bin/python benchmarks/eval_speed.py \
        [--tasks cerebras-gpt] [--limit 100] [--batch-size 16] [--device cpu] \
        [--json benchmarks/results/eval_speed.json]

Run it with a Python that has `lm_eval[hf]==0.4.13` and lmpipe (as for lmeval_crosscheck.py).
The model is Cerebras-GPT-111M's shape (recipes/cerebras-gpt-111m.yaml: 10 layers, d_model 768,
learned positions, GELU), randomly initialised with a fixed seed, saved as a run and exported
with `export_model`, fp32. Each tool scores the exported folder once, from loading it to the
last metric, on the same tasks, items (`--limit`, the first items of each task) and batch size:

  lm-eval: `simple_evaluate(model="hf", model_args="pretrained=OUT,trust_remote_code=True,...")`,
           the stock tasks (their YAML, the local data files of ../shared/assets/evals);
  lmpipe:  `evaluate("hf:OUT", ...)`, what `lmpipe eval hf:OUT --tasks ... --limit N` runs.

Reported per tool: wall seconds, CPU seconds of this process (steadier than wall time on a
shared machine), items/s and requests/s (the harness's loglikelihood requests), and the ratio
lmpipe / lm-eval in throughput. The scores must agree (same items, same numbers; perplexity to
float32 noise), else the speed is not comparable and the script exits 1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import lmeval_crosscheck as crosscheck  # noqa: E402  (the stock task builder, the data sources)


def make_exported_model(work: Path, seed: int) -> tuple[Path, int]:
    """Cerebras-GPT-111M's shape, random weights, saved as a run and exported; (folder, window)."""
    import torch

    from lmpipe.train.checkpoint import save_model
    from lmpipe.train.hf import export_model
    from lmpipe.train.model import GPT
    from lmpipe.train.recipe import load_recipe

    recipe = load_recipe("cerebras-gpt-111m")
    torch.manual_seed(seed)
    save_model(GPT(recipe.model), recipe, work / "run" / "model")
    return export_model(work / "run", work / "hf"), recipe.stages[-1].seq_len


class Clock:
    """Wall and process CPU seconds of a block."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def run_harness(args, exported: Path, max_length: int, names: list[str], work: Path):
    import lm_eval

    tasks = []
    for name in names:
        split, rel = crosscheck.SOURCES[name]
        data = args.task_data / rel
        if name == "hellaswag":  # the lossy file as the stock dataset's rows (crosscheck part 1)
            data = crosscheck.hellaswag_rows(args.task_data, work / rel)
        tasks.append(crosscheck.harness_task(name, data, split))
    model_args = (
        f"pretrained={exported},trust_remote_code=True,max_length={max_length},device={args.device}"
    )
    with Clock() as clock:
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args=model_args,
            batch_size=args.batch_size,
            tasks=tasks,
            limit=args.limit,
            log_samples=True,
            bootstrap_iters=1000,  # as lmpipe's perplexity stderr; acc's stderr is closed-form
        )
    requests = sum(len(s["arguments"]) for name in names for s in results["samples"][name])
    items = sum(len(results["samples"][name]) for name in names)
    scores = {
        name: {
            key.partition(",")[0]: value
            for key, value in results["results"][name].items()
            if key.endswith(",none") and "_stderr" not in key
        }
        for name in names
    }
    return clock, items, requests, scores, model_args


def run_lmpipe(args, exported: Path, names: list[str], work: Path):
    from lmpipe.evals.run import evaluate

    with Clock() as clock:
        report = evaluate(
            f"hf:{exported}",
            work / "lmpipe-eval",
            tasks=names,
            data=None,
            task_data=args.task_data,
            limit=args.limit,
            batch_size=args.batch_size,
            device=args.device,
        )
    items = sum(report["tasks"][name]["n"] for name in names)
    seconds = {name: report["tasks"][name]["seconds"] for name in names}
    scores = {
        name: {k: v["value"] for k, v in result.items() if isinstance(v, dict) and "value" in v}
        for name, result in report["tasks"].items()
    }
    return clock, items, scores, seconds


def same_scores(theirs: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """The metrics that differ (perplexity through its log: float32 noise in a huge number)."""
    problems = []
    for task, metrics in ours.items():
        for metric, value in metrics.items():
            want = theirs[task].get(metric)
            if want is None or value is None:
                problems.append(f"{task} {metric}: harness {want}, lmpipe {value}")
            elif metric == "perplexity":
                if not crosscheck.ll_close(math.log(want), math.log(value)):
                    problems.append(f"{task} {metric}: harness {want}, lmpipe {value}")
            elif not math.isclose(want, value, rel_tol=1e-6, abs_tol=1e-9):
                problems.append(f"{task} {metric}: harness {want}, lmpipe {value}")
    return problems


def figures(clock: Clock, items: int, requests: int) -> dict[str, float]:
    return {
        "wall_seconds": round(clock.wall, 2),
        "cpu_seconds": round(clock.cpu, 2),
        "items_per_s": round(items / clock.wall, 3),
        "requests_per_s": round(requests / clock.wall, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task-data", type=Path, default=crosscheck.SHARED / "evals")
    parser.add_argument("--tasks", default="cerebras-gpt", help="task names and suites")
    parser.add_argument("--limit", type=int, default=100, help="items per task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/eval_speed.json")
    args = parser.parse_args()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    import datasets
    import lm_eval
    import torch
    import transformers

    from lmpipe.evals.run import expand_tasks

    datasets.disable_progress_bars()
    names = expand_tasks(args.tasks.split(","))
    with tempfile.TemporaryDirectory(prefix="lmpipe-eval-speed-") as tmp:
        work = Path(tmp)
        exported, max_length = make_exported_model(work, args.seed)
        h_clock, items, requests, theirs, model_args = run_harness(
            args, exported, max_length, names, work
        )
        l_clock, l_items, ours, task_seconds = run_lmpipe(args, exported, names, work)
    problems = same_scores(theirs, ours)
    if l_items != items:
        problems.append(f"items: harness {items}, lmpipe {l_items}")
    report = {
        "what": "lmpipe eval hf:OUT vs lm_eval --model hf on one exported model",
        "model": "cerebras-gpt-111m shape (111,050,496 parameters), random init, fp32",
        "tasks": names,
        "limit": args.limit,
        "batch_size": args.batch_size,
        "device": args.device,
        "items": items,
        "requests": requests,
        "lm_eval": {"model_args": model_args, **figures(h_clock, items, requests)},
        "lmpipe": {**figures(l_clock, items, requests), "task_seconds": task_seconds},
        "throughput_ratio": round(h_clock.wall / l_clock.wall, 2),
        "cpu_ratio": round(h_clock.cpu / l_clock.cpu, 2),
        "scores_equal": not problems,
        "versions": {
            "lm_eval": lm_eval.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()}",
        "date": datetime.date.today().isoformat(),
    }
    print(f"{items} items, {requests} requests of {', '.join(names)} (--limit {args.limit})")
    for tool in ("lm_eval", "lmpipe"):
        r = report[tool]
        print(
            f"{tool:8s} {r['wall_seconds']:8.1f} s wall  {r['cpu_seconds']:8.1f} s CPU  "
            f"{r['items_per_s']:7.2f} items/s  {r['requests_per_s']:7.2f} requests/s"
        )
    print(
        f"lmpipe / lm-eval throughput: {report['throughput_ratio']}x wall, "
        f"{report['cpu_ratio']}x CPU time"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    if problems:
        print("SCORES DIFFER:\n  " + "\n  ".join(problems))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
