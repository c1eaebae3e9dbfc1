"""Cross-check `lmpipe.evals` against EleutherAI's lm-evaluation-harness, offline, on the real data.

    TIKTOKEN_CACHE_DIR=/tmp/tk /tmp/lmeval/bin/python benchmarks/lmeval_crosscheck.py \
        [--task-data ../shared/assets/evals] [--tokenizer ../shared/assets/tokenizer] \
        [--tasks all] [--score-tasks arc_easy,winogrande,boolq,lambada_openai] \
        [--score-limit 300] [--max-length 128] [--exported] [--json report.json]

Run it with a Python that has `lm_eval[hf]==0.4.13` (the `hf` extra brings transformers and
accelerate, which the harness's `hf` model imports) and lmpipe (installed --no-deps); never
the project's own venv, which stays free of the harness. No network: every dataset is read from
the lm-eval-ready files of `--task-data` (MANIFEST.md there), the GPT-2 tokenizer from local files.

1. Requests. For each task lmpipe implements, the harness's own task is built from its stock YAML
   (found through `TaskManager`, `!function`s and `include`s resolved by the harness's loader) with
   only the dataset source replaced (`dataset_path: json` + `data_files`); its 0-shot
   loglikelihood requests come from `build_all_requests`, as `simple_evaluate` makes them. Every
   document's (context, continuation) pairs, gold index and acc_norm choice strings are compared,
   exactly, with lmpipe's `load_items`; then every request's (context, continuation) token lists
   from the harness's own `TemplateLM.loglikelihood` encoding (HF tokenizer) against lmpipe's
   `GPTLM.encode_pair` (tiktoken). hellaswag's file is lossy (ctx_a and ctx_b joined): its rows
   go through the stock `process_docs` with ctx_b = the trailing lower-case sentence start where
   there is one (else ""), which checks the capitalisation, tag cleanup, requests and gold; a
   ctx_b that starts in upper case, and tags the uploader removed, cannot be checked.

2. Scores. One seeded random lmpipe GPT is saved with `save_model`; the harness scores it through
   its own `HFLM` (our GPT wrapped as a transformers causal LM, HF's GPT-2 tokenizer built from
   encoder.json + vocab.bpe) with `simple_evaluate`, lmpipe through `lmpipe.evals.run.evaluate`
   on the saved folder. Compared: every request's log-likelihood and greedy flag, and every
   metric. A short `--max-length` makes the harness's left truncation matter on long prompts.

3. `--exported`: the same model is exported with `lmpipe.train.hf.export_model`, and the harness
   reads the folder as a user would, `--model hf --model_args pretrained=OUT,trust_remote_code=True`
   (`HFLM` loads the folder's own modeling code, weights and tokenizer; nothing of lmpipe). Part 1
   then also checks the folder's tokenizer against tiktoken on every request, and part 2 compares
   the harness with `lmpipe eval` of the run and with `lmpipe eval hf:OUT` (the folder read back
   by `load_hf_model`).

Exit status 1 if anything differs beyond float noise (the perplexity stderr is a bootstrap with
another RNG in each tool, so it is shown, not compared).
"""

from __future__ import annotations

import argparse
import bz2
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# No hub: a task whose data is not local must fail here, not hang on a download.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # the harness's per-task bars would bury the report

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "assets"

# task -> (the split the stock task scores, its lm-eval-ready file under --task-data)
SOURCES: dict[str, tuple[str, str]] = {
    "arc_easy": ("test", "arc_easy/test.jsonl"),
    "arc_challenge": ("test", "arc_challenge/test.jsonl"),
    "piqa": ("validation", "piqa/validation.jsonl"),
    "openbookqa": ("test", "openbookqa/test.jsonl"),
    "boolq": ("validation", "boolq/validation.jsonl"),
    "winogrande": ("validation", "winogrande/validation.jsonl"),
    "social_iqa": ("validation", "social_iqa/validation.jsonl"),
    "hellaswag": ("validation", "hellaswag/hellaswag.jsonl"),  # written by hellaswag_rows
    "lambada_openai": ("test", "lambada_openai/lambada_test.jsonl"),
}
# Per request, two float32 forward passes with different padding and batching agree to about
# 1e-4 plus a few float32 ulps of the sum: a random model's log-likelihoods reach -500, where
# either tool differs from a float64 forward pass by up to 1e-4 (measured).
LL_TOLERANCE = 1e-4
LL_RELATIVE = 1e-6


def ll_close(theirs: float, ours: float) -> bool:
    return abs(theirs - ours) <= LL_TOLERANCE + LL_RELATIVE * abs(theirs)


EXAMPLES = 3  # mismatches shown per kind


# --- 1. requests -----------------------------------------------------------------------------


def hellaswag_rows(task_data: Path, out: Path) -> Path:
    """The lossy hellaswag text file as rows of the stock dataset's fields (module docstring)."""
    with bz2.open(
        task_data / "hellaswag" / "hellaswag_val_full.txt.bz2", "rt", encoding="utf-8"
    ) as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for start in range(0, len(lines), 6):
            head, label, *endings = lines[start : start + 6]
            activity, _, ctx = head.partition(": ")
            # ctx = ctx_a + " " + ctx_b; where ctx_b shows (a lower-case sentence start after
            # ctx_a's last ". ") it is split off, so the stock process_docs capitalises it.
            ctx_a, sep, ctx_b = ctx.rpartition(". ")
            if not (sep and ctx_b[:1].islower()):
                ctx_a, ctx_b = ctx, ""
            else:
                ctx_a += "."
            row = {"activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b, "endings": endings}
            f.write(json.dumps({**row, "label": label}) + "\n")
    return out


def harness_task(name: str, data_file: Path, split: str):
    """The stock task `name`, reading `data_file` as its scored split and nothing else."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    manager = TaskManager()
    cfg = load_yaml(manager.task_index[name].yaml_path, resolve_func=True)
    for key in ("tag", "group"):
        cfg.pop(key, None)
    cfg.update(
        dataset_path="json",
        dataset_name=None,
        dataset_kwargs={"data_files": {split: str(data_file)}},
        # Only the scored split exists locally; 0-shot never reads the others.
        training_split=None,
        validation_split=split if split == "validation" else None,
        test_split=split if split == "test" else None,
        fewshot_split=None,
        num_fewshot=0,
    )
    # An inline config with a `task` key builds a ConfigurableTask, as the registry would.
    return manager.load([cfg])["tasks"][name]


def harness_requests(task, limit: int | None = None) -> list[dict[str, Any]]:
    """Per document: its (context, continuation) requests, gold and choices, as the harness has them."""
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    by_doc: dict[int, list] = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    docs = []
    for doc_id in sorted(by_doc):
        insts = sorted(by_doc[doc_id], key=lambda i: i.idx)
        doc = insts[0].doc
        entry: dict[str, Any] = {
            "doc_id": doc_id,
            "requests": [tuple(i.arguments[:2]) for i in insts],
        }
        if task.OUTPUT_TYPE == "multiple_choice":
            entry["choices"] = list(task.doc_to_choice(doc))
            gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
            entry["gold"] = entry["choices"].index(gold) if isinstance(gold, str) else int(gold)
        docs.append(entry)
    return docs


def lmpipe_requests(name: str, task_data: Path, limit: int | None = None) -> list[dict[str, Any]]:
    from lmpipe.evals.tasks import EXTERNAL_TASKS, Cloze, load_items

    out = []
    for item in load_items(EXTERNAL_TASKS[name], task_data, limit):
        if isinstance(item, Cloze):
            out.append({"requests": [(item.context, item.continuation)]})
        else:
            out.append(
                {"requests": list(item.requests), "choices": list(item.choices), "gold": item.gold}
            )
    return out


def harness_tokens(hflm, instances) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) token lists as the harness's TemplateLM.loglikelihood makes them
    (empty-context rule, trailing-space move, whole-string encoding), captured before scoring."""
    captured: list[tuple[list[int], list[int]]] = []

    def capture(requests, **kwargs):
        captured.extend((list(c), list(x)) for _, c, x in requests)
        return [(0.0, False)] * len(requests)

    hflm._loglikelihood_tokens = capture  # this instance only; scoring uses a fresh HFLM
    hflm.loglikelihood(instances, disable_tqdm=True)
    return captured


def compare_requests(name: str, task_data: Path, work: Path, hflm, lm) -> dict[str, Any]:
    """Requests, gold and choices per document; then the token boundary of every request."""
    split, rel = SOURCES[name]
    data_file = hellaswag_rows(task_data, work / rel) if name == "hellaswag" else task_data / rel
    task = harness_task(name, data_file, split)
    theirs = harness_requests(task)
    ours = lmpipe_requests(name, task_data)
    report: dict[str, Any] = {
        "docs_harness": len(theirs),
        "docs_lmpipe": len(ours),
        "requests": sum(len(d["requests"]) for d in theirs),
        "mismatched_docs": 0,
        "by_kind": {},
        "examples": [],
    }
    # Token level: the harness's encoding (HF GPT-2 tokenizer) of its own requests against
    # lmpipe's GPTLM.encode_pair (tiktoken) of the same strings.
    their_tokens = harness_tokens(hflm, task.instances)
    token_mismatches = [
        (inst.arguments[:2], t)
        for inst, t in zip(task.instances, their_tokens, strict=True)
        if lm.encode_pair(*inst.arguments[:2]) != t
    ]
    report["token_mismatches"] = len(token_mismatches)
    for (ctx, cont), t in token_mismatches[:EXAMPLES]:
        report["examples"].append(
            {
                "doc": None,
                "kind": "tokens",
                "harness": (ctx[-60:], cont, t[0][-8:], t[1]),
                "lmpipe": tuple(x[-8:] for x in lm.encode_pair(ctx, cont)),
            }
        )
    for i, (h, o) in enumerate(zip(theirs, ours, strict=False)):
        kinds = [k for k in ("requests", "gold", "choices") if k in h and h[k] != o.get(k)]
        if not kinds:
            continue
        report["mismatched_docs"] += 1
        for k in kinds:
            report["by_kind"][k] = report["by_kind"].get(k, 0) + 1
            if sum(e["kind"] == k for e in report["examples"]) < EXAMPLES:
                report["examples"].append(
                    {"doc": i, "kind": k, "harness": h[k], "lmpipe": o.get(k)}
                )
    if name == "hellaswag":
        n_split = sum(1 for line in data_file.open(encoding="utf-8") if json.loads(line)["ctx_b"])
        report["not_comparable"] = (
            "stock query = preprocess(activity_label + ': ' + ctx_a + ' ' + ctx_b.capitalize()); "
            f"the file joins ctx_a and ctx_b: {n_split} of {len(theirs)} rows have a visible "
            "ctx_b (lower-case sentence start) and were split; an upper-case ctx_b (whose rest "
            "capitalize() lower-cases) and the uploader's own tag removal are unverifiable"
        )
    return report


# Requests the real data never makes, for rules it never exercises: an empty context (with and
# without a continuation that starts with end-of-text), trailing whitespace moved across the
# boundary, BPE merges across it, non-ASCII text, special-token text inside a string.
EDGE_REQUESTS: list[tuple[str, str]] = [
    ("", "Hello world"),
    ("", "<|endoftext|>Hello world"),
    ("", " leading space"),
    ("Question: Which city?\nAnswer: ", "Paris"),
    ("A list:\n\n", "- item"),
    ("two spaces  ", " then text"),
    ("don", "'t split"),
    ("The number is 12", "345"),
    ("The end.<|endoftext|>", "Next document"),
    ("Café au lait, naïve ", "résumé 😀 and 日本語"),
    ("tab\t", "separated"),
]


def compare_edge_tokens(hflm, lm) -> dict[str, Any]:
    from lm_eval.api.instance import Instance

    instances = [
        Instance(request_type="loglikelihood", doc={}, arguments=r, idx=0) for r in EDGE_REQUESTS
    ]
    theirs = harness_tokens(hflm, instances)
    mismatches = [
        {"request": r, "harness": t, "lmpipe": lm.encode_pair(*r)}
        for r, t in zip(EDGE_REQUESTS, theirs, strict=True)
        if lm.encode_pair(*r) != t
    ]
    return {"requests": len(EDGE_REQUESTS), "mismatches": mismatches}


# --- 2. scores -------------------------------------------------------------------------------


def make_model(seed: int, max_length: int, folder: Path):
    """A seeded random lmpipe GPT, saved as `lmpipe eval` reads it; (model, recipe)."""
    import torch
    import yaml

    from lmpipe.train.checkpoint import save_model
    from lmpipe.train.model import GPT
    from lmpipe.train.recipe import ModelConfig, validate_recipe

    base = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text(encoding="utf-8"))
    base["model"] = {"n_layers": 2, "n_heads": 2, "d_model": 64, "d_ff": 170}
    base["stages"][-1]["seq_len"] = max_length  # what evaluate() reads as the model's max_length
    recipe = validate_recipe(base, "crosscheck")
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**base["model"])).eval()
    save_model(model, recipe, folder)
    return model, recipe


def gpt2_tokenizer(folder: Path):
    """Hugging Face's GPT-2 tokenizer from OpenAI's encoder.json + vocab.bpe, offline.

    transformers 5 takes the vocabulary and merges themselves (`vocab`, `merges`); 4.x took file
    paths (`vocab_file`, `merges_file`), which 5 ignores, silently giving an empty tokenizer."""
    import transformers

    vocab = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
    lines = (folder / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]  # 1: "#version"
    merges = [tuple(line.split(" ")) for line in lines if line]
    if int(transformers.__version__.split(".")[0]) >= 5:
        tokenizer = transformers.GPT2TokenizerFast(vocab=vocab, merges=merges)
    else:
        tokenizer = transformers.GPT2TokenizerFast(
            vocab_file=str(folder / "encoder.json"), merges_file=str(folder / "vocab.bpe")
        )
    if len(tokenizer) != 50257 or tokenizer.eos_token_id != 50256:
        raise SystemExit(f"{folder}: not GPT-2's tokenizer ({len(tokenizer)} ids)")
    return tokenizer


def harness_lm(model, tokenizer_dir: Path, max_length: int, batch_size: int):
    """The harness's own HFLM over our GPT: all of its encoding, truncation and scoring rules."""
    import transformers
    from lm_eval.models.huggingface import HFLM
    from transformers.modeling_outputs import CausalLMOutput

    class LmpipeForCausalLM(transformers.PreTrainedModel):
        config_class = transformers.GPT2Config
        base_model_prefix = "gpt"

        def __init__(self, config, gpt):
            super().__init__(config)
            self.gpt = gpt

        def forward(self, input_ids, **kwargs):
            logits_BTV, _ = self.gpt(input_ids)
            return CausalLMOutput(logits=logits_BTV)

    config = transformers.GPT2Config(
        vocab_size=model.cfg.vocab_size, n_positions=max_length, n_embd=model.cfg.d_model
    )
    tokenizer = gpt2_tokenizer(tokenizer_dir)
    wrapped = LmpipeForCausalLM(config, model).eval()
    return HFLM(
        pretrained=wrapped,
        tokenizer=tokenizer,
        backend="causal",
        max_length=max_length,
        batch_size=batch_size,
    )


def compare_scores(
    args, task_data: Path, work: Path, harness: Any, lmpipe_models: dict[str, tuple[str, Any]]
) -> dict[str, Any]:
    """The harness's scores (`harness`: an HFLM, or a model_args string for `--model hf`) against
    `lmpipe eval` of each of `lmpipe_models` (label -> (model path, the loaded GPT))."""
    import lm_eval

    from lmpipe.dataprep.tokenizer import get_encoding
    from lmpipe.evals.lm import GPTLM
    from lmpipe.evals.run import evaluate

    names = [t for t in args.score_tasks.split(",") if t]
    tasks = []
    for n in names:
        split, rel = SOURCES[n]
        # hellaswag: the harness reads the rows rebuilt from the lossy file (see part 1)
        data_file = hellaswag_rows(task_data, work / rel) if n == "hellaswag" else task_data / rel
        tasks.append(harness_task(n, data_file, split))
    started = time.perf_counter()
    hres = lm_eval.simple_evaluate(
        model="hf" if isinstance(harness, str) else harness,
        model_args=harness if isinstance(harness, str) else None,
        batch_size=args.batch_size,
        tasks=tasks,
        limit=args.score_limit,
        log_samples=True,
        bootstrap_iters=1000,
    )
    seconds = {"harness": round(time.perf_counter() - started, 1)}
    ours, lms = {}, {}
    for label, (path, model) in lmpipe_models.items():
        started = time.perf_counter()
        ours[label] = evaluate(
            path,
            work / f"lmpipe_eval_{label}",
            tasks=names,
            data=None,
            task_data=task_data,
            limit=args.score_limit,
            batch_size=args.batch_size,
            device="cpu",
        )["tasks"]
        seconds[f"lmpipe {label}"] = round(time.perf_counter() - started, 1)
        lms[label] = GPTLM(model, get_encoding(), args.max_length, batch_size=args.batch_size)
    report: dict[str, Any] = {"seconds": seconds}
    for name in names:
        samples = sorted(hres["samples"][name], key=lambda s: s["doc_id"])
        h_reqs = [tuple(a[:2]) for s in samples for a in s["arguments"]]
        h_resps = [tuple(r[0]) for s in samples for r in s["resps"]]
        o_reqs = [
            r for d in lmpipe_requests(name, task_data, args.score_limit) for r in d["requests"]
        ]
        task_report: dict[str, Any] = {"docs": len(samples), "requests": len(h_reqs)}
        if h_reqs != o_reqs:
            task_report["request_mismatch"] = sum(
                a != b for a, b in zip(h_reqs, o_reqs, strict=False)
            )
        task_report["lmpipe"] = {
            label: score_report(
                h_reqs, h_resps, lms[label], hres["results"][name], ours[label][name]
            )  # fmt: skip
            for label in lmpipe_models
        }
        report[name] = task_report
    probe_lm = harness if not isinstance(harness, str) else model_from_args(harness, args)
    report["greedy_probe"] = {
        label: greedy_probe(probe_lm, lm, lm.model, task_data) for label, lm in lms.items()
    }
    return report


def score_report(
    h_reqs: list, h_resps: list, lm, h_results: dict[str, Any], mine: dict[str, Any]
) -> dict[str, Any]:
    """One lmpipe model against the harness on one task: every request's log-likelihood and
    greedy flag (the harness's own requests through lmpipe's LM), and every metric."""
    o_resps = lm.loglikelihood(h_reqs)
    diffs = [abs(float(h[0]) - o[0]) for h, o in zip(h_resps, o_resps, strict=True)]
    greedy = [
        i for i, (h, o) in enumerate(zip(h_resps, o_resps, strict=True)) if bool(h[1]) != o[1]
    ]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    out: dict[str, Any] = {
        "loglikelihood": {
            "max_abs_diff": diffs[worst],
            "over_tolerance": sum(
                not ll_close(float(h[0]), o[0]) for h, o in zip(h_resps, o_resps, strict=True)
            ),
            "greedy_mismatch": len(greedy),
            "worst": {
                "request": h_reqs[worst],
                "harness": float(h_resps[worst][0]),
                "lmpipe": o_resps[worst][0],
            },
        }
    }
    metrics = {}
    for key, value in h_results.items():
        metric, _, filt = key.partition(",")
        if filt != "none" or metric.endswith("_stderr") or metric not in mine:
            continue
        stderr = h_results.get(f"{metric}_stderr,none")
        equal = math.isclose(value, mine[metric]["value"], rel_tol=1e-6, abs_tol=1e-9)
        if metric == "perplexity":
            # exp(-mean log-likelihood): its log agrees as well as the log-likelihoods do; a
            # random model's ~1e13 perplexity shows their float32 noise in the 6th digit.
            equal = ll_close(math.log(value), math.log(mine[metric]["value"]))
        metrics[metric] = {
            "harness": value,
            "lmpipe": mine[metric]["value"],
            "harness_stderr": stderr,
            "lmpipe_stderr": mine[metric]["stderr"],
            "equal": equal,
        }
        if metric != "perplexity":
            metrics[metric]["stderr_equal"] = math.isclose(
                float(stderr), mine[metric]["stderr"], rel_tol=1e-6, abs_tol=1e-9
            )
    out["metrics"] = metrics
    # The stock task's metric list against the one lmpipe reports (TaskSpec.metrics).
    harness_metrics = {
        k.partition(",")[0]
        for k in h_results
        if k.endswith(",none") and not k.partition(",")[0].endswith("_stderr")
    }
    lmpipe_metrics = {k for k, v in mine.items() if isinstance(v, dict)}
    if harness_metrics != lmpipe_metrics:
        out["metric_names"] = {"harness": sorted(harness_metrics), "lmpipe": sorted(lmpipe_metrics)}
    return out


def exported_model_args(folder: Path, max_length: int) -> str:
    """`--model_args` for `lm_eval --model hf` on an exported folder, as a user would write them."""
    return f"pretrained={folder},trust_remote_code=True,max_length={max_length},device=cpu"


def model_from_args(model_args: str, args):
    """The HFLM that `lm_eval --model hf --model_args ...` builds."""
    from lm_eval.models.huggingface import HFLM

    return HFLM.create_from_arg_string(model_args, {"batch_size": args.batch_size})


def greedy_probe(hflm, lm, model, task_data: Path, n: int = 64) -> dict[str, Any]:
    """A random model is never greedy on lambada, so its `acc` cannot tell two greedy rules
    apart: score continuations that are the model's own argmax (1 and 2 tokens) through both."""
    import torch
    from lm_eval.api.instance import Instance

    from lmpipe.evals.tasks import EXTERNAL_TASKS, load_items

    requests = []
    for item in load_items(EXTERNAL_TASKS["lambada_openai"], task_data, n):
        tokens = lm.tok_encode(item.context)[-(lm.max_length - 2) :]
        context = lm.encoding.decode(tokens)
        for n_new in (1, 2):
            ids = list(tokens)
            with torch.no_grad():
                for _ in range(n_new):
                    logits, _ = model(torch.tensor([ids]))
                    ids.append(int(logits[0, -1].argmax()))
            request = (context, lm.encoding.decode(ids[len(tokens) :]))
            # Re-encoding can merge a whitespace token into the context's last one, leaving
            # nothing to score (the harness would fail on it too): skip those.
            if lm.encode_pair(*request)[1]:
                requests.append(request)
    instances = [
        Instance(request_type="loglikelihood", doc={}, arguments=r, idx=0) for r in requests
    ]
    theirs = hflm.loglikelihood(instances, disable_tqdm=True)
    ours = lm.loglikelihood(requests)
    return {
        "requests": len(requests),
        "greedy_true": sum(bool(g) for _, g in theirs),
        "greedy_mismatch": sum(bool(h[1]) != o[1] for h, o in zip(theirs, ours, strict=True)),
        "max_abs_diff": max(abs(h[0] - o[0]) for h, o in zip(theirs, ours, strict=True)),
    }


# --- driver ----------------------------------------------------------------------------------


def failed(
    requests: dict[str, Any], edge: dict[str, Any], scores: dict[str, Any] | None
) -> list[str]:
    problems = [
        f"{t}: {r['mismatched_docs']} documents differ {r['by_kind']}, "
        f"{r['token_mismatches']} requests tokenised differently"
        for t, r in requests.items()
        if r["mismatched_docs"] or r["token_mismatches"] or r["docs_harness"] != r["docs_lmpipe"]
    ]
    if edge["mismatches"]:
        problems.append(f"edge requests tokenised differently: {edge['mismatches']}")
    for label, probe in (scores or {}).get("greedy_probe", {}).items():
        if probe["greedy_mismatch"] or probe["max_abs_diff"] > LL_TOLERANCE:
            problems.append(f"greedy probe differs ({label}): {probe}")
    for t, r in (scores or {}).items():
        if t in ("seconds", "greedy_probe"):
            continue
        if r.get("request_mismatch"):
            problems.append(f"{t}: {r['request_mismatch']} requests differ")
        for label, mine in r["lmpipe"].items():
            ll = mine["loglikelihood"]
            if ll["over_tolerance"] or ll["greedy_mismatch"]:
                problems.append(f"{t} ({label}): scoring differs {ll}")
            if "metric_names" in mine:
                problems.append(f"{t} ({label}): different metrics {mine['metric_names']}")
            for m, v in mine["metrics"].items():
                if not v["equal"] or not v.get("stderr_equal", True):
                    problems.append(f"{t} ({label}): {m} {v}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task-data", type=Path, default=SHARED / "evals")
    parser.add_argument("--tokenizer", type=Path, default=SHARED / "tokenizer")
    parser.add_argument("--tasks", default="all", help="tasks whose requests to compare, or all")
    parser.add_argument("--score-tasks", default="arc_easy,winogrande,boolq,lambada_openai")
    parser.add_argument("--score-limit", type=int, default=300)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--exported",
        action="store_true",
        help="score the model as a Hugging Face folder from export_model, read by `--model hf`",
    )
    parser.add_argument("--json", type=Path, help="also write the full report here")
    args = parser.parse_args()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    import datasets
    import lm_eval

    from lmpipe.dataprep.tokenizer import get_encoding
    from lmpipe.evals.lm import GPTLM

    datasets.disable_progress_bars()

    names = list(SOURCES) if args.tasks == "all" else [t for t in args.tasks.split(",") if t]
    report: dict[str, Any] = {
        "lm_eval": lm_eval.__version__,
        "mode": "exported" if args.exported else "wrapped",
        "requests": {},
    }
    with tempfile.TemporaryDirectory(prefix="lmeval-crosscheck-") as tmp:
        work = Path(tmp)
        model, _ = make_model(args.seed, args.max_length, work / "model")
        lmpipe_models: dict[str, tuple[str, Any]] = {"run": (str(work / "model"), model)}
        if args.exported:
            from lmpipe.train.hf import export_model, load_hf_model

            exported = export_model(work / "model", work / "hf")
            harness: Any = exported_model_args(exported, args.max_length)
            print(f"harness: lm_eval --model hf --model_args {harness}")
            hflm = model_from_args(harness, args)
            lmpipe_models["hf"] = (f"hf:{exported}", load_hf_model(exported)[0])
        else:
            hflm = harness_lm(model, args.tokenizer, args.max_length, args.batch_size)
            # Part 1 stubs the scoring of `hflm` to capture its tokens: score with a fresh one.
            harness = harness_lm(model, args.tokenizer, args.max_length, args.batch_size)
        lm = GPTLM(model, get_encoding(), args.max_length)
        for name in names:
            r = compare_requests(name, args.task_data, work, hflm, lm)
            report["requests"][name] = r
            print(
                f"{name:15s} docs {r['docs_harness']:6d}/{r['docs_lmpipe']:<6d} "
                f"requests {r['requests']:6d}  mismatched docs {r['mismatched_docs']} {r['by_kind']}  "
                f"tokenised differently {r['token_mismatches']}"
            )
            for e in r["examples"]:
                print(
                    f"    doc {e['doc']} {e['kind']}:\n      harness {e['harness']!r}\n      lmpipe  {e['lmpipe']!r}"
                )
            if "not_comparable" in r:
                print(f"    not comparable: {r['not_comparable']}")
        report["edge_tokens"] = compare_edge_tokens(hflm, lm)
        print(
            f"edge requests   {report['edge_tokens']['requests']} tokenised differently "
            f"{len(report['edge_tokens']['mismatches'])}"
        )
        for m in report["edge_tokens"]["mismatches"]:
            print(f"    {m}")
        report["scores"] = (
            compare_scores(args, args.task_data, work, harness, lmpipe_models)
            if args.score_tasks
            else None
        )
    for name, r in (report["scores"] or {}).items():
        if name in ("seconds", "greedy_probe"):
            print(f"{name}: {r}")
            continue
        for label, mine in r["lmpipe"].items():
            ll = mine["loglikelihood"]
            print(
                f"{name:15s} lmpipe {label}: docs {r['docs']} requests {r['requests']}  "
                f"max |dll| {ll['max_abs_diff']:.2e}  greedy mismatches {ll['greedy_mismatch']}"
            )
            for m, v in mine["metrics"].items():
                print(
                    f"    {m:10s} harness {v['harness']:.6f} ±{v['harness_stderr']}  "
                    f"lmpipe {v['lmpipe']:.6f} ±{v['lmpipe_stderr']}  {'equal' if v['equal'] else 'DIFFERENT'}"
                )
    problems = failed(report["requests"], report["edge_tokens"], report["scores"])
    report["problems"] = problems
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    print("OK: no difference" if not problems else "DIFFERENCES:\n  " + "\n  ".join(problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
