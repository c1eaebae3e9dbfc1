"""How long building and initialising a model takes on the CPU (every training start and resume
does it; ZeRO-0/1/2 build the whole model on each rank): lmpipe's truncated normal
(`lmpipe.train.model.truncated_normal_`) against torch.nn.init.trunc_normal_ at +-2 std, the
same recipe and seed, in one run.

    python benchmarks/init_speed.py [--recipe cerebras-gpt-1.3b-mup]
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import torch

from lmpipe.train import model as model_module
from lmpipe.train.recipe import load_recipe


def build_seconds(recipe: str) -> float:
    torch.manual_seed(0)
    started = time.perf_counter()
    model_module.GPT(load_recipe(recipe).model)
    return time.perf_counter() - started


def torchs(w: torch.Tensor, std: float) -> None:
    if not w.is_meta:
        torch.nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="cerebras-gpt-1.3b-mup")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    ours = build_seconds(args.recipe)
    with mock.patch.object(model_module, "truncated_normal_", torchs):
        theirs = build_seconds(args.recipe)
    print(f"{args.recipe}, torch {torch.__version__}, {threads} threads: build + initialise "
          f"{ours:.1f} s with lmpipe's truncated normal, {theirs:.1f} s with torch's trunc_normal_ "
          f"({theirs / ours:.1f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
