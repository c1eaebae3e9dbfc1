"""Fixtures of the eval tests: a tiny random GPT, a shard folder built from given texts, a run
folder holding a tiny saved model, a task-data folder of six ARC rows."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

WORDS = (
    "the of and to in is was for on that with as by at from his her an were are which this be "
    "river model city water light stone music garden winter paper engine window market island "
    "quickly slowly never often always under over between after before because while although "
    "runs builds carries writes reads falls grows opens closes finds keeps leaves brings shows"
).split()


def random_text(rng: random.Random, n_words: int) -> str:
    """Plain English-looking text with sentences and paragraphs (real whitespace to keep)."""
    out = []
    for i in range(n_words):
        word = rng.choice(WORDS)
        out.append(word.capitalize() if i == 0 or out[-1].endswith(".") else word)
        if rng.random() < 0.1:
            out[-1] += "."
    text = ""
    for i, word in enumerate(out):
        text += word if i == 0 else ("\n\n" if rng.random() < 0.03 else " ") + word
    return text


@pytest.fixture(name="random_text")
def random_text_fixture() -> Callable[[random.Random, int], str]:
    return random_text


@pytest.fixture
def tiny_gpt():
    from lmpipe.train.model import GPT
    from lmpipe.train.recipe import ModelConfig

    torch.manual_seed(0)
    return GPT(ModelConfig(n_layers=1, n_heads=2, d_model=32, d_ff=85)).eval()


@pytest.fixture
def make_shards(gpt2) -> Callable[..., Path]:
    """make_shards(folder, heldout_texts, train_texts=()) -> a finished `lmpipe tokenize` folder."""
    from lmpipe.dataprep.folders import write_manifest
    from lmpipe.dataprep.shards import ShardWriter, format_fields
    from lmpipe.dataprep.tokenizer import ranks_sha256

    def make(
        folder: Path, heldout: list[str], train: list[str] = (), shard_tokens: int = 1 << 20
    ) -> Path:
        folder.mkdir(parents=True)
        splits = {}
        for split, texts in (
            ("train", list(train) or ["some training text"]),
            ("heldout", heldout),
        ):
            writer = ShardWriter(
                folder,
                split,
                eot_id=gpt2.eot_token,
                vocab_size=gpt2.n_vocab,
                shard_tokens=shard_tokens,
            )
            writer.add([gpt2.encode_ordinary(t) for t in texts])
            splits[split] = writer.close()
        fields = format_fields(
            splits,
            tokenizer_name="gpt2",
            tokenizer_sha256=ranks_sha256(),
            vocab_size=gpt2.n_vocab,
            eot_id=gpt2.eot_token,
        )
        write_manifest(folder, "tokenize", **fields)
        return folder

    return make


@pytest.fixture
def heldout_texts() -> list[str]:
    rng = random.Random(7)
    return [random_text(rng, rng.randint(40, 160)) for _ in range(12)]


@pytest.fixture
def run_dir(tmp_path):
    from lmpipe.train.checkpoint import save_model
    from lmpipe.train.model import GPT
    from lmpipe.train.recipe import load_recipe

    recipe = load_recipe(
        "tiny",
        [
            "model.n_layers=1",
            "model.n_heads=2",
            "model.d_model=32",
            "model.d_ff=85",
            "stages.1.seq_len=64",
        ],
    )
    torch.manual_seed(0)
    run = tmp_path / "run"
    save_model(GPT(recipe.model), recipe, run / "model")
    return run


@pytest.fixture
def task_data(tmp_path):
    """Six ARC-shaped rows in the lm-eval-ready layout."""
    folder = tmp_path / "task_data"
    (folder / "arc_easy").mkdir(parents=True)
    rows = [
        {
            "question": f"Which of these is number {i}?",
            "choices": {"text": [f"option {j}" for j in range(4)], "label": list("ABCD")},
            "answerKey": "ABCD"[i % 4],
        }
        for i in range(6)
    ]
    (folder / "arc_easy" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder
