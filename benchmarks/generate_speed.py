"""`lmpipe generate`'s speed with its KV cache against recomputing the whole sequence each step.

    OMP_NUM_THREADS=1 python benchmarks/generate_speed.py [--recipes tiny,cerebras-gpt-111m]
        [--new-tokens 128] [--device cpu]

For each recipe, a model of its shape with random weights (seed 0) is saved as a model folder
and run through `generate` (greedy, the 7-token prompt below, `--new-tokens` new tokens, the end
of text not stopping it: a random model may draw it early); then the same greedy tokens are made
without a cache, the whole sequence through the model at every step (what each step costs when
nothing is kept). Both are timed over the same number of tokens and must give the same tokens,
so a fast path that is wrong cannot win. Learned-position recipes compare exactly; ALiBi recipes
are run with `--alibi-scaling none` (the dynamic scale changes nothing below the training
length, and a full forward has one scale for every position).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

from lmpipe.dataprep.tokenizer import EOT_ID, get_encoding
from lmpipe.train import generate as generate_module
from lmpipe.train.checkpoint import save_model
from lmpipe.train.generate import GenerateSettings, generate
from lmpipe.train.model import GPT
from lmpipe.train.recipe import load_recipe

PROMPT = "The history of the city of Rome"


@torch.inference_mode()
def greedy_recomputing(model: GPT, prompt: list[int], n: int) -> tuple[list[int], float]:
    """Greedy tokens with a full forward of the whole sequence per step; (tokens, seconds)."""
    ids, device = list(prompt), model.wte.weight.device
    start = time.perf_counter()
    for _ in range(n):
        logits_1TV, _ = model(torch.tensor([ids], device=device))
        ids.append(int(logits_1TV[0, -1].argmax()))
    return ids[len(prompt) :], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="tiny,cerebras-gpt-111m")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    prompt = get_encoding().encode_ordinary(PROMPT)
    print(
        f"{torch.get_num_threads()} torch thread(s), {args.device}, greedy, "
        f"a {len(prompt)}-token prompt, {args.new_tokens} new tokens"
    )
    for name in args.recipes.split(","):
        recipe = load_recipe(name)
        torch.manual_seed(0)
        model = GPT(recipe.model).eval()
        alibi = model.wpe is None
        with tempfile.TemporaryDirectory() as tmp:
            save_model(model, recipe, Path(tmp))
            settings = GenerateSettings(
                model=Path(tmp),
                prompt=PROMPT,
                max_new_tokens=args.new_tokens,
                temperature=0.0,
                alibi_scaling="none" if alibi else None,
                device=args.device,
            )
            # A random model may pick the end of text early; the benchmark wants every token.
            with mock.patch.object(generate_module, "EOT_ID", -1):
                result = generate(settings)
        (completion,) = result.completions
        tokens, seconds = greedy_recomputing(model.to(args.device), prompt, args.new_tokens)
        if tokens != completion.tokens:
            raise SystemExit(f"{name}: the cached and recomputed tokens differ")
        ends = sum(t == EOT_ID for t in tokens)
        print(
            f"{name}: {result.tokens_per_second:,.1f} tokens/s with the KV cache, "
            f"{len(tokens) / seconds:,.1f} recomputing the sequence each step "
            f"({result.tokens_per_second * seconds / len(tokens):.1f}x); the same "
            f"{len(tokens)} tokens ({ends} end-of-text among them)"
        )


if __name__ == "__main__":
    main()
