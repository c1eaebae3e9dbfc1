"""Every GPU check and benchmark of lmpipe in one run, for a lent H100/H200 (DESIGN.md).

    python benchmarks/gpu_check.py --out $OUT/gpu.json   # on the GPU machine: a JSON report
    python benchmarks/gpu_check.py --smoke        # on a CPU, tiny shapes: checks the script runs

Checks, each reported with its figures:
  1. attention: FlexAttention (ALiBi score_mod, causal block mask, compiled) against SDPA with an
     ALiBi bias, forward and backward in bf16 at BTLM's heads (32 x 80), at 4 x 2,048 and
     1 x 8,192: max relative error and milliseconds each (DESIGN.md measured 2.24 / 5.63 ms flex,
     3.78 / 13.1 ms SDPA on an H100);
  2. eval lengths: the compiled FlexAttention path over 20 different sequence lengths, counting
     distinct compiled lengths (padding buckets keep it <= 8, Dynamo's recompile limit);
  3. training throughput: `lmpipe.train.loop.train` on synthetic shards for a few steps of a
     muP GPT at 2,048 and at 8,192 (one run, two stages), tokens/s and MFU against the card's
     bf16 peak (989 TFLOP/s dense on H100 SXM), with 6 * params + attention FLOPs per token.

Prepare the device with ../shared/tools/device-wheels (it prints the install line) and
TORCH_CUDA_ARCH_LIST=9.0; the tokenizer's files must be in TIKTOKEN_CACHE_DIR there too.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmpipe.dataprep.shards import write_shard_folder
from lmpipe.train.model import alibi_bias, alibi_slopes, flex_alibi_attention
from lmpipe.train.recipe import load_recipe

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}


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


def check_training(work: Path, overrides: list[str], n_tokens: int) -> dict:
    from lmpipe.train.loop import train

    rng = np.random.default_rng(0)
    docs = [
        rng.integers(0, 50000, size=int(rng.integers(500, 5000))) for _ in range(n_tokens // 2750)
    ]
    data = work / "tokens"
    write_shard_folder(data, {"train": docs, "heldout": docs[:2]})
    recipe = load_recipe("btlm3b", overrides)
    summary = train(recipe, data, work / "run")
    rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    from lmpipe.train.model import count_parameters

    n_params = count_parameters(recipe.model)
    m = recipe.model
    result = {"parameters": n_params, "summary": summary, "stages": []}
    for stage in sorted({r["stage"] for r in rows}):
        steady = [r for r in rows if r["stage"] == stage][1:]  # the first step compiles
        if not steady:
            continue
        seq_len = steady[0]["seq_len"]
        tps = float(np.median([r["tokens_per_s"] for r in steady]))
        # per token: 6N for the matmuls of forward and backward, plus attention's 12 * L * d * T/2
        flops_per_token = 6 * n_params + 6 * m.n_layers * m.d_model * seq_len
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
        result["stages"].append(
            {
                "seq_len": seq_len,
                "tokens_per_s": tps,
                "mfu": tps * flops_per_token / (peak * 1e12) if peak else None,
            }
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on any device")
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    report: dict = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
    }
    if cuda:
        report["attention"] = check_attention(device, dtype, [(4, 2048), (1, 8192)], 32, 80)
        report["eval_lengths"] = check_eval_lengths(
            device, dtype, 32, 80, list(range(100, 2100, 100))
        )
        # a 1.3B-class muP model (Cerebras-GPT 1.3B shapes), 4 steps at 2,048 then 4 at 8,192
        overrides = [
            "model.n_layers=24",
            "model.n_heads=16",
            "model.d_model=2048",
            "model.d_ff=5461",
            "tokens_per_step=131072",
            "micro_batch_tokens=16384",
            "stages.0.tokens=524288",
            "stages.1.tokens=524288",
            "schedule.warmup_tokens=131072",
            "checkpoint_every_tokens=100000000",
            "zero_stage=1",
        ]
        n_tokens = 2_000_000
    else:
        with torch.no_grad():
            report["attention"] = check_attention(device, dtype, [(1, 64), (2, 40)], 4, 8)
        report["eval_lengths"] = check_eval_lengths(device, dtype, 4, 8, [20, 37, 64, 130])
        overrides = [
            "model.n_layers=1",
            "model.n_heads=2",
            "model.d_model=32",
            "model.d_ff=85",
            "model.mup.d_model_base=32",
            "model.mup.d_ff_base=85",
            "precision=fp32",
            "tokens_per_step=512",
            "micro_batch_tokens=512",
            "stages.0.seq_len=64",
            "stages.0.tokens=1024",
            "stages.1.seq_len=256",
            "stages.1.tokens=1024",
            "schedule.warmup_tokens=512",
            "checkpoint_every_tokens=100000",
        ]
        n_tokens = 20_000
    with tempfile.TemporaryDirectory() as tmp:
        report["training"] = check_training(Path(tmp), overrides, n_tokens)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
