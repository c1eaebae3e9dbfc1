"""An exported model scored by lm-evaluation-harness itself equals `lmpipe eval`, request by request.

The harness reads the folder as a user would (`--model hf --model_args
pretrained=OUT,trust_remote_code=True`: the folder's own modeling code, weights and tokenizer) and
scores the stock tasks, built from their own YAML with only the data files replaced; lmpipe scores
the run the folder was exported from and the folder itself (`hf:OUT`). Every request's
log-likelihood and greedy flag, and every metric, must agree.

lm_eval is not a dependency of lmpipe: `make test` installs it (the `lmeval` extra, the version
README's figures come from); a venv without it skips this file. benchmarks/lmeval_crosscheck.py
--exported does the same on the real task data.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed here")
pytest.importorskip("transformers", reason="transformers is not installed here")
pytest.importorskip("accelerate", reason="lm_eval's HF model needs accelerate")

ROOT = Path(__file__).resolve().parents[2]
MAX_LENGTH = 64
# Per request: two float32 forward passes agree to 1e-4 plus a few ulps of the sum (a random
# model's log-likelihoods reach hundreds of nats), as in benchmarks/lmeval_crosscheck.py.
LL_TOLERANCE = 1e-4
LL_RELATIVE = 1e-6


def crosscheck_module():
    """benchmarks/lmeval_crosscheck.py: the stock task builder and the `--model_args` it uses."""
    spec = importlib.util.spec_from_file_location(
        "lmeval_crosscheck", ROOT / "benchmarks" / "lmeval_crosscheck.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def task_files(folder: Path, random_text) -> Path:
    """Small arc_easy, winogrande and lambada_openai files in the lm-eval-ready layout; some
    lambada texts are longer than the model's window, so left truncation is exercised."""
    rng = random.Random(3)
    write_jsonl(
        folder / "arc_easy" / "test.jsonl",
        [
            {
                "question": random_text(rng, rng.randint(5, 30)) + "?",
                "choices": {
                    "text": [random_text(rng, rng.randint(1, 6)) for _ in range(4)],
                    "label": list("ABCD"),
                },
                "answerKey": "ABCD"[i % 4],
            }
            for i in range(8)
        ],
    )
    write_jsonl(
        folder / "winogrande" / "validation.jsonl",
        [
            {
                "sentence": f"{random_text(rng, 8)} _ {random_text(rng, 6)}",
                "option1": random_text(rng, 1),
                "option2": random_text(rng, 2),
                "answer": str(1 + i % 2),
            }
            for i in range(6)
        ],
    )
    write_jsonl(
        folder / "lambada_openai" / "lambada_test.jsonl",
        [{"text": random_text(rng, rng.choice([12, 30, 90]))} for _ in range(6)],
    )
    return folder


@pytest.mark.slow
def test_the_harness_on_an_exported_model_equals_lmpipe_eval(tmp_path, random_text, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    # `datasets` caches each task file it reads, under new names each run (the tmp paths differ):
    # here, not in ~/.cache/huggingface. Its config reads the folder when it is first imported,
    # which may have been earlier in this session.
    hf_home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    import datasets.config
    import lm_eval

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hf_home / "datasets")

    from lmpipe.dataprep.tokenizer import get_encoding
    from lmpipe.evals.lm import GPTLM
    from lmpipe.evals.run import evaluate
    from lmpipe.evals.tasks import EXTERNAL_TASKS
    from lmpipe.train.checkpoint import load_model
    from lmpipe.train.hf import export_model, load_hf_model

    cc = crosscheck_module()
    cc.make_model(0, MAX_LENGTH, tmp_path / "run" / "model")
    exported = export_model(tmp_path / "run", tmp_path / "hf")
    task_data = task_files(tmp_path / "tasks", random_text)
    names = ["arc_easy", "winogrande", "lambada_openai"]
    tasks = [
        cc.harness_task(n, task_data / EXTERNAL_TASKS[n].path, cc.SOURCES[n][0]) for n in names
    ]
    theirs = lm_eval.simple_evaluate(
        model="hf",
        model_args=cc.exported_model_args(exported, MAX_LENGTH),
        batch_size=4,
        tasks=tasks,
        log_samples=True,
        bootstrap_iters=100,  # acc: the closed-form mean_stderr; perplexity: a bootstrap
    )
    assert (hf_home / "datasets" / "json").is_dir()  # the task files' cache
    sources = {"run": (tmp_path / "run", load_model(tmp_path / "run")[0])}
    sources["hf"] = (f"hf:{exported}", load_hf_model(exported)[0])
    for label, (path, model) in sources.items():
        ours = evaluate(
            path, tmp_path / f"eval-{label}", tasks=names, data=None, task_data=task_data,
            limit=None, batch_size=3, device="cpu",
        )["tasks"]  # fmt: skip
        lm = GPTLM(model, get_encoding(), MAX_LENGTH, batch_size=3)
        for name in names:
            samples = sorted(theirs["samples"][name], key=lambda s: s["doc_id"])
            requests = [tuple(a[:2]) for s in samples for a in s["arguments"]]
            their_scores = [(float(r[0][0]), bool(r[0][1])) for s in samples for r in s["resps"]]
            assert len(requests) == {"arc_easy": 32, "winogrande": 12, "lambada_openai": 6}[name]
            for request, (ll, greedy), (want_ll, want_greedy) in zip(
                requests, lm.loglikelihood(requests), their_scores, strict=True
            ):
                close = abs(ll - want_ll) <= LL_TOLERANCE + LL_RELATIVE * abs(want_ll)
                assert close, (label, name, request, ll, want_ll)
                assert greedy == want_greedy, (label, name, request)
            results = theirs["results"][name]
            for metric in EXTERNAL_TASKS[name].metrics:
                got, want = ours[name][metric]["value"], results[f"{metric},none"]
                if metric == "perplexity":
                    # exp(-mean log-likelihood): its log is as close as the log-likelihoods are
                    # (a random model's perplexity is ~1e11, where float32 noise shows in 1e-6).
                    # Its stderr is a bootstrap with the harness's own RNG: not compared.
                    log_want = math.log(want)
                    close = abs(math.log(got) - log_want) <= LL_TOLERANCE + LL_RELATIVE * log_want
                    assert close, (label, got, want)
                    continue
                assert math.isclose(got, want, rel_tol=1e-6), (label, name, metric)
                want_stderr = results[f"{metric}_stderr,none"]
                assert math.isclose(ours[name][metric]["stderr"], want_stderr, rel_tol=1e-6)
            assert ours[name]["n"] == len(samples)
