"""`evaluate` end to end on a tiny saved model, a tiny shard folder and a small task file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.evals.run import evaluate


def test_evaluate_end_to_end(run_dir, task_data, make_shards, heldout_texts, tmp_path, capsys):
    data = make_shards(tmp_path / "tokens", heldout_texts)
    out = tmp_path / "eval"
    tasks = ["perplexity", "continuation", "arc_easy", "long_context"]
    report = evaluate(run_dir, out, tasks=tasks, data=data, task_data=task_data, limit=5)

    saved = json.loads((out / "results.json").read_text())
    assert saved == report
    assert list(saved["tasks"]) == tasks
    assert saved["max_length"] == 64  # the recipe's last stage
    ppl = saved["tasks"]["perplexity"]
    assert (
        ppl["n"] == 5 and ppl["token_perplexity"]["value"] > 1 and ppl["bits_per_byte"]["value"] > 0
    )
    cont = saved["tasks"]["continuation"]
    assert (
        cont["n"] == 5 and 0 <= cont["acc"]["value"] <= 1 and cont["acc_norm"]["stderr"] is not None
    )
    arc = saved["tasks"]["arc_easy"]
    assert arc["n"] == 5 and set(arc) >= {"acc", "acc_norm"}
    assert set(saved["tasks"]["long_context"]["curves"]) == {"alibi", "alibi_pi"}

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "eval"
    assert manifest["results"]["arc_easy"]["acc"] == arc["acc"]["value"]
    printed = capsys.readouterr().out
    assert "token_perplexity" in printed and "acc_norm" in printed

    with pytest.raises(LmpipeError, match="already exists"):
        evaluate(run_dir, out, tasks=["arc_easy"], data=None, task_data=task_data, limit=1)
    again = evaluate(
        run_dir, out, tasks=["arc_easy"], data=None, task_data=task_data, limit=5, overwrite=True
    )
    assert again["tasks"]["arc_easy"] == {**arc, "seconds": again["tasks"]["arc_easy"]["seconds"]}


def test_long_context_at_several_lengths(run_dir, make_shards, heldout_texts, tmp_path):
    """`long_context@N` / `@Kx` are the same task at other windows: @2x is the default task's
    numbers exactly, each length its own row, and long_context.png draws them."""
    data = make_shards(tmp_path / "tokens", heldout_texts)
    tasks = ["long_context", "long_context@2x", "long_context@96", "long_context@4x"]
    report = evaluate(run_dir, tmp_path / "eval", tasks=tasks, data=data, task_data=None, limit=2)
    rows = report["tasks"]
    assert [rows[t]["length"] for t in tasks] == [128, 128, 96, 256]
    assert all(rows[t]["train_seq_len"] == 64 for t in tasks)
    same = ("curves", "loss_alibi", "loss_alibi_pi", "loss_beyond_train_alibi", "n")
    assert {k: rows["long_context"][k] for k in same} == {
        k: rows["long_context@2x"][k] for k in same
    }
    assert rows["long_context@4x"]["curves"]["alibi_pi"]["alibi_scale"] == 4
    assert rows["long_context@96"]["curves"]["alibi_pi"]["alibi_scale"] == 1.5
    png = (tmp_path / "eval" / "long_context.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    for bad in (
        "long_context@",
        "long_context@x",
        "long_context@0",
        "long_context@-2x",
        "long_context@infx",
        "long_context@nanx",
        "long_context@1.5",
    ):
        with pytest.raises(LmpipeError, match=f"{bad}: the window is long_context@TOKENS"):
            evaluate(run_dir, tmp_path / "e2", tasks=[bad], data=data, task_data=None, limit=1)
    with pytest.raises(LmpipeError, match="long_context@0.01x: a window of 1 token"):
        evaluate(run_dir, tmp_path / "e3", tasks=["long_context@0.01x"], data=data, task_data=None, limit=1)  # fmt: skip
    half = evaluate(run_dir, tmp_path / "e4", tasks=["long_context@0.5x"], data=data, task_data=None, limit=1)  # fmt: skip
    assert half["tasks"]["long_context@0.5x"]["length"] == 32  # shorter than training: allowed
    with pytest.raises(LmpipeError, match="unknown task perplexity@2x"):
        evaluate(run_dir, tmp_path / "e2", tasks=["perplexity@2x"], data=data, task_data=None, limit=1)  # fmt: skip
    assert not (tmp_path / "e2").exists()


def test_bad_task_name_lists_the_known_tasks(run_dir, tmp_path):
    with pytest.raises(
        LmpipeError, match=r"unknown task arc_hard; known tasks: perplexity, .*arc_easy"
    ):
        evaluate(
            run_dir, tmp_path / "eval", tasks=["arc_hard"], data=None, task_data=None, limit=None
        )
    assert not (tmp_path / "eval").exists()


def test_missing_inputs_name_the_option(run_dir, tmp_path):
    with pytest.raises(LmpipeError, match="perplexity needs --data"):
        evaluate(
            run_dir, tmp_path / "e", tasks=["perplexity"], data=None, task_data=None, limit=None
        )
    with pytest.raises(LmpipeError, match="piqa needs --task-data"):
        evaluate(run_dir, tmp_path / "e", tasks=["piqa"], data=None, task_data=None, limit=None)
    (tmp_path / "tasks").mkdir()
    with pytest.raises(LmpipeError, match="piqa/validation.jsonl: no such file"):
        evaluate(
            run_dir,
            tmp_path / "e",
            tasks=["piqa"],
            data=None,
            task_data=tmp_path / "tasks",
            limit=None,
        )
    assert not (tmp_path / "e").exists() and not (tmp_path / "e.partial").exists()


def test_a_folder_without_a_model(tmp_path, task_data):
    with pytest.raises(LmpipeError, match="no trained model"):
        evaluate(
            tmp_path, tmp_path / "e", tasks=["arc_easy"], data=None, task_data=task_data, limit=1
        )


def test_the_models_own_alibi_scale_is_evals_default(task_data, tmp_path, monkeypatch):
    """A model whose last stage trained at a fixed ALiBi scale is scored with it, unless told."""
    from lmpipe.evals import lm as lm_module
    from lmpipe.train.checkpoint import save_model
    from lmpipe.train.model import GPT
    from lmpipe.train.recipe import load_recipe

    recipe = load_recipe(
        "tiny",
        ["model.n_layers=1", "model.n_heads=2", "model.d_model=32", "model.d_ff=85",
         "stages.1.seq_len=128", "stages.1.alibi_scale=2"],
    )  # fmt: skip
    save_model(GPT(recipe.model), recipe, tmp_path / "run" / "model")
    used = []
    forward = lm_module.GPTLM.__init__

    def spy(self, *args, **kwargs):
        used.append(kwargs["alibi_scale"])
        forward(self, *args, **kwargs)

    monkeypatch.setattr(lm_module.GPTLM, "__init__", spy)
    kw = dict(tasks=["arc_easy"], data=None, task_data=task_data, limit=2)
    report = evaluate(tmp_path / "run", tmp_path / "e1", **kw)
    assert report["settings"]["alibi_scale"] == 2 and used == [2]
    report = evaluate(tmp_path / "run", tmp_path / "e2", alibi_scale=1.0, **kw)
    assert report["settings"]["alibi_scale"] == 1 and used == [2, 1]


def test_learned_positions_have_no_long_context_and_no_alibi_scale(make_shards, heldout_texts, task_data, tmp_path):  # fmt: skip
    from lmpipe.train.checkpoint import save_model
    from lmpipe.train.model import GPT
    from lmpipe.train.recipe import load_recipe

    recipe = load_recipe(
        "tiny",
        ["model.n_layers=1", "model.n_heads=2", "model.d_model=32", "model.d_ff=128",
         "model.position=learned", "model.n_positions=256", "model.mlp=gelu", "model.mup=null"],
    )  # fmt: skip
    save_model(GPT(recipe.model), recipe, tmp_path / "run" / "model")
    data = make_shards(tmp_path / "tokens", heldout_texts)
    with pytest.raises(LmpipeError, match="long_context: this model has learned positions"):
        evaluate(tmp_path / "run", tmp_path / "e", tasks=["long_context"], data=data, task_data=None, limit=1)  # fmt: skip
    with pytest.raises(LmpipeError, match="--alibi-scale: this model has learned positions"):
        evaluate(tmp_path / "run", tmp_path / "e", tasks=["arc_easy"], data=None, task_data=task_data, limit=1, alibi_scale=2.0)  # fmt: skip
    report = evaluate(tmp_path / "run", tmp_path / "e", tasks=["perplexity", "arc_easy"], data=data, task_data=task_data, limit=2)  # fmt: skip
    assert report["tasks"]["perplexity"]["token_perplexity"]["value"] > 1


# --- suites ---------------------------------------------------------------------------------


def test_suites_expand_combine_and_deduplicate(tmp_path):
    from lmpipe.evals.run import SUITES, check_tasks

    assert SUITES["cerebras-gpt"] == (
        "hellaswag", "piqa", "winogrande", "lambada_openai", "arc_easy", "arc_challenge",
        "openbookqa",
    )  # fmt: skip
    assert sorted(SUITES["btlm"]) == sorted(
        ["arc_challenge", "arc_easy", "boolq", "hellaswag", "lambada_openai", "openbookqa",
         "piqa", "social_iqa", "winogrande"]
    )  # fmt: skip
    names = check_tasks(["piqa", "cerebras-gpt", "btlm", "wikitext", "piqa"], None, tmp_path)
    assert names == [
        "piqa", "hellaswag", "winogrande", "lambada_openai", "arc_easy", "arc_challenge",
        "openbookqa", "boolq", "social_iqa", "wikitext",
    ]  # fmt: skip


def test_an_unknown_name_lists_suites_and_tasks(tmp_path):
    from lmpipe.evals.run import check_tasks

    with pytest.raises(LmpipeError) as e:
        check_tasks(["btlm", "mmlu"], None, tmp_path)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("unknown task mmlu; known tasks: perplexity, continuation")
    assert message.endswith("; suites: cerebras-gpt, btlm")


def test_a_suite_is_scored_task_by_task(run_dir, task_data, tmp_path, monkeypatch):
    """A suite's tasks all run (here, a suite of the one task the fixture data has)."""
    from lmpipe.evals import run as run_module

    monkeypatch.setitem(run_module.SUITES, "mini", ("arc_easy",))
    report = evaluate(run_dir, tmp_path / "e", tasks=["mini", "arc_easy"], data=None, task_data=task_data, limit=2)  # fmt: skip
    assert report["settings"]["tasks"] == ["arc_easy"] and report["tasks"]["arc_easy"]["n"] == 2


# --- what MODEL names ---------------------------------------------------------------------


def test_model_sources(run_dir, tmp_path):
    from lmpipe.evals.run import model_source

    assert model_source(run_dir).kind == "lmpipe"
    assert model_source(run_dir / "model").kind == "lmpipe"
    assert model_source(run_dir).default_output() == run_dir / "eval"
    hf = tmp_path / "published" / "btlm-3b-8k-base"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text("{}")
    for spec in (hf, f"hf:{hf}"):
        source = model_source(spec)
        assert (source.kind, source.path, source.folder()) == ("hf", hf, hf)
        assert source.default_output() == Path("btlm-3b-8k-base-eval")  # beside, never inside
    with pytest.raises(LmpipeError, match=r"run: no config.json, so not a Hugging Face model"):
        model_source(f"hf:{run_dir}")
    with pytest.raises(LmpipeError, match="no trained model .* and no config.json"):
        model_source(tmp_path / "published")


def test_the_output_may_not_lie_inside_a_hugging_face_folder(task_data, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    with pytest.raises(LmpipeError, match="inside"):
        evaluate(f"hf:{hf}", hf / "eval", tasks=["arc_easy"], data=None, task_data=task_data, limit=1)  # fmt: skip
    assert not (hf / "eval").exists() and not (hf / "eval.partial").exists()


def test_a_hugging_face_folder_scores_as_the_run_it_came_from(run_dir, task_data, tmp_path, monkeypatch):  # fmt: skip
    """`lmpipe eval hf:OUT` (and OUT, a folder with a config.json) of an exported run: the same
    numbers as the run, in a results.json naming the folder; the default output sits in the
    working folder, never inside the model's."""
    pytest.importorskip("safetensors")
    from lmpipe.train.hf import export_model

    exported = export_model(run_dir, tmp_path / "published" / "tiny-hf")
    kw = dict(tasks=["arc_easy"], data=None, task_data=task_data, limit=6)
    want = evaluate(run_dir, tmp_path / "e-run", **kw)["tasks"]["arc_easy"]
    monkeypatch.chdir(tmp_path)
    for spec in (f"hf:{exported}", exported):
        report = evaluate(spec, None, overwrite=True, **kw)
        got = report["tasks"]["arc_easy"]
        assert {k: v for k, v in got.items() if k != "seconds"} == {
            k: v for k, v in want.items() if k != "seconds"
        }
        assert (report["model"], report["model_format"]) == (str(exported), "hf")
        assert report["max_length"] == 64  # the exported n_positions: the run's last stage
        saved = json.loads((tmp_path / "tiny-hf-eval" / "results.json").read_text())
        assert saved == report
        manifest = json.loads((tmp_path / "tiny-hf-eval" / "manifest.json").read_text())
        assert manifest["inputs"]["model"] == str(exported)
    assert not any("eval" in p.name for p in exported.iterdir())  # nothing written inside


# --- every input checked before any task runs ------------------------------------------------


def test_every_input_is_checked_before_the_first_task_runs(run_dir, task_data, make_shards, heldout_texts, tmp_path, monkeypatch):  # fmt: skip
    """A missing task file, a bad row in a later task's file, a continuation longer than the
    model, a long_context window longer than the held-out split: each is an error before the
    first task (perplexity) runs, not after it; and each task file is read once."""
    from lmpipe.evals import run as run_module
    from lmpipe.evals import tasks as tasks_module

    data = make_shards(tmp_path / "tokens", heldout_texts)
    ran: list[str] = []
    run_task = run_module.run_task

    def spy(name, **kw):
        ran.append(name)
        return run_task(name, **kw)

    monkeypatch.setattr(run_module, "run_task", spy)
    kw = dict(data=data, task_data=task_data, limit=2)
    with pytest.raises(LmpipeError, match="wikitext-2-raw-v1_test_pages.jsonl: no such file"):
        evaluate(run_dir, tmp_path / "e", tasks=["perplexity", "arc_easy", "wikitext"], **kw)
    assert ran == []  # not even perplexity, the first task
    (task_data / "piqa").mkdir()
    rows = [{"goal": "g", "sol1": "a", "sol2": "b", "label": label} for label in (0, 2)]
    (task_data / "piqa" / "validation.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows)
    )
    with pytest.raises(LmpipeError, match=r"piqa/validation.jsonl:2: label is 2, outside"):
        evaluate(run_dir, tmp_path / "e", tasks=["perplexity", "arc_easy", "piqa"], **kw)
    assert ran == []  # not even perplexity, the first task
    # a piqa answer longer than the model's 64 positions: refused before perplexity runs too
    long_answer = {"goal": "g", "sol1": "a", "sol2": " word" * 70, "label": 0}
    (task_data / "piqa" / "validation.jsonl").write_text(json.dumps(long_answer) + "\n")
    with pytest.raises(LmpipeError, match=r"^piqa \(.*piqa/validation.jsonl, item 1\): a continuation of 71 tokens is longer than the model's max_length \(64, its last stage's seq_len\); leave the task out of --tasks, or evaluate a model trained longer$"):  # fmt: skip
        evaluate(run_dir, tmp_path / "e", tasks=["perplexity", "piqa"], **kw)
    assert ran == []
    too_long = r"long_context@100000: the held-out split of .* fewer than one window of 100001"
    with pytest.raises(LmpipeError, match=too_long):
        evaluate(run_dir, tmp_path / "e", tasks=["perplexity", "long_context@100000"], **kw)
    assert ran == [] and not (tmp_path / "e").exists() and not (tmp_path / "e.partial").exists()

    loads = []
    load_items = tasks_module.load_items

    def count(spec, *args):
        loads.append(spec.name)
        return load_items(spec, *args)

    monkeypatch.setattr(tasks_module, "load_items", count)
    report = evaluate(run_dir, tmp_path / "e", tasks=["continuation", "arc_easy"], **kw)
    assert loads == ["arc_easy"] and ran == ["continuation", "arc_easy"]
    assert report["tasks"]["arc_easy"]["n"] == 2 and report["tasks"]["continuation"]["n"] == 2


def test_a_non_string_choice_and_a_blank_context_are_refused_before_the_first_task(run_dir, task_data, tmp_path, monkeypatch):  # fmt: skip
    """An ARC choice that is a number (scoring would fail on it, after the tasks before it) and a
    lambada context of only whitespace (its continuation's first token would be read at
    position -1: the harness refuses it) are one-line errors before the first task runs."""
    from lmpipe.evals import run as run_module

    ran: list[str] = []

    def spy(name, **kw):
        ran.append(name)
        return {}

    monkeypatch.setattr(run_module, "run_task", spy)
    arc = task_data / "arc_easy" / "test.jsonl"
    rows = arc.read_text().splitlines()
    rows[2] = json.dumps({**json.loads(rows[2]), "choices": {"text": [1, 2, 3, 4], "label": list("ABCD")}})  # fmt: skip
    arc.write_text("\n".join(rows) + "\n")
    (task_data / "lambada_openai").mkdir()
    lambada = task_data / "lambada_openai" / "lambada_test.jsonl"
    lambada.write_text('{"text": "a b"}\n{"text": "  Paris"}\n')
    kw = dict(data=None, task_data=task_data, limit=None)
    with pytest.raises(LmpipeError, match=r"^.*arc_easy/test\.jsonl:3: choices\.text\[0\] is 1, not a string$"):  # fmt: skip
        evaluate(run_dir, tmp_path / "e", tasks=["lambada_openai", "arc_easy"], **kw)
    blank = rf'^lambada_openai \({lambada}, item 2\): the context " " is only whitespace, which leaves no token to predict the continuation from \(the harness refuses it too\); fix or remove the row$'  # fmt: skip
    with pytest.raises(LmpipeError, match=blank):
        evaluate(run_dir, tmp_path / "e", tasks=["lambada_openai"], **kw)
    assert ran == [] and not (tmp_path / "e").exists()


def test_continuation_with_a_limit_is_the_first_items_of_the_whole_task(make_shards, gpt2, random_text, tmp_path):  # fmt: skip
    """The distractors are drawn from a window of held-out documents that does not depend on
    --limit, so --limit N scores the first N items of the task without it (as the harness's
    --limit does), and a limit past the task's size scores the whole task."""
    import random

    from lmpipe.evals.run import read_inputs

    rng = random.Random(11)
    data = make_shards(tmp_path / "tokens", [random_text(rng, rng.randint(40, 160)) for _ in range(40)])  # fmt: skip

    def items(limit):
        _, by_task = read_inputs(["continuation"], data=data, task_data=None, limit=limit, seed=0, encoding=gpt2)  # fmt: skip
        return by_task["continuation"]

    whole = items(None)
    assert len(whole) == 40
    for limit in (1, 3, 7):
        assert items(limit) == whole[:limit]
    assert items(5000) == whole


def test_a_folder_no_task_reads_is_not_recorded(run_dir, task_data, make_shards, heldout_texts, tmp_path):  # fmt: skip
    """--data with only external tasks (even a folder that does not exist) and --task-data with
    only held-out tasks are neither read nor named as inputs in results.json or the manifest."""
    report = evaluate(run_dir, tmp_path / "e", tasks=["arc_easy"], data=tmp_path / "nowhere", task_data=task_data, limit=1)  # fmt: skip
    assert report["settings"]["data"] is None and report["settings"]["task_data"] == str(task_data)
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["inputs"]["data"] is None
    data = make_shards(tmp_path / "tokens", heldout_texts)
    report = evaluate(run_dir, tmp_path / "f", tasks=["perplexity"], data=data, task_data=task_data, limit=1)  # fmt: skip
    assert report["settings"]["data"] == str(data) and report["settings"]["task_data"] is None
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert manifest["inputs"]["task_data"] is None


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 0.0, -1.0])
def test_alibi_scale_must_be_finite_and_positive(run_dir, task_data, tmp_path, scale):
    with pytest.raises(LmpipeError, match=f"--alibi-scale must be finite and > 0, got {scale:g}"):
        evaluate(run_dir, tmp_path / "e", tasks=["arc_easy"], data=None, task_data=task_data, limit=1, alibi_scale=scale)  # fmt: skip
    assert not (tmp_path / "e").exists()


def test_a_model_folders_default_output_lies_beside_it(run_dir, task_data, tmp_path, monkeypatch):
    """MODEL_FOLDER (model.pt + recipe.yaml) is read whole: its results go to MODEL_FOLDER-eval
    beside it, also when it is given as "."; a run's stay in RUN_DIR/eval."""
    from lmpipe.evals.run import model_source

    model = run_dir / "model"
    beside = model.resolve().parent / "model-eval"
    assert model_source(model).default_output() == beside
    report = evaluate(model, None, tasks=["arc_easy"], data=None, task_data=task_data, limit=2)
    assert json.loads((beside / "results.json").read_text()) == report
    assert not (model / "eval").exists()
    monkeypatch.chdir(model)
    assert model_source(".").default_output() == beside
    assert model_source(run_dir).default_output() == run_dir / "eval"


def test_the_held_out_split_is_read_whole_and_an_empty_one_is_refused(
    make_shards, heldout_texts, tmp_path
):
    from lmpipe.evals.run import heldout_split

    split = heldout_split(make_shards(tmp_path / "tokens", heldout_texts))
    assert split.split == "heldout" and split.n_documents == len(heldout_texts) == 12
    empty = make_shards(tmp_path / "none", [])
    message = r"none: the held-out split is empty; tokenize with a larger --holdout$"
    with pytest.raises(LmpipeError, match=message):
        heldout_split(empty)
