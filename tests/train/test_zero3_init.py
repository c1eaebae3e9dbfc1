"""ZeRO-3 builds the model partitioned (deepspeed.zero.Init, lmpipe.train.build): on 2 CPU ranks
under torchrun, each rank holds a fraction of the weights during and after the build, the initial
weights are bit for bit those of a model built whole, a bf16 run trains to the same losses as
ZeRO-1, and --init-from's weights land in the partitions (a run from them starts at ZeRO-1's loss).

The test runs this file as the ranks' program (`worker`), which writes what each rank measured
to a JSON file; the assertions are here, in the test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.test_loop import TINY_MODEL

# A model whose fp32 size is plain to see in a process's memory: 12 layers of 768, 86.6M
# parameters, 346 MB in fp32. A small vocabulary keeps the largest parameter small: initialising
# one (the truncated normal) briefly takes ~3x its size, in a whole build as in a partitioned one.
BIG_MODEL = [
    "model.n_layers=12",
    "model.n_heads=12",
    "model.d_model=768",
    "model.d_ff=2048",
    "model.vocab_size=2048",
    "model.mup.d_model_base=256",
    "model.mup.d_ff_base=682.6",
    "precision=bf16",
]
# glibc serves large blocks from its heap once a large block was freed (its dynamic mmap
# threshold), and a heap does not shrink: the resident size would then count freed memory. With a
# fixed threshold every tensor's block is mapped alone and given back when freed.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
RUN = [
    *TINY_MODEL,
    "precision=bf16",
    "tokens_per_step=512",
    "micro_batch_tokens=128",
    "stages.0.tokens=2048",
    "stages.1.seq_len=128",
    "stages.1.tokens=1024",
    "schedule.warmup_tokens=512",
    "checkpoint_every_tokens=100000",
]


@pytest.mark.slow
def test_zero3_builds_partitioned_and_trains_like_zero1(tmp_path, pattern_tokens):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun not installed beside this Python")
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("no /proc/self/clear_refs to reset the peak memory with (not Linux)")
    done = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", __file__, str(pattern_tokens), str(tmp_path)],
        env={**os.environ, **WORKER_ENV, "PYTHONPATH": str(Path(__file__).parents[2])},
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    from lmpipe.train.model import count_parameters
    from lmpipe.train.recipe import load_recipe

    fp32_bytes = 4 * count_parameters(load_recipe("tiny", BIG_MODEL).model)
    assert fp32_bytes > 340e6
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # each rank holds half the weights, in bf16: a quarter of the fp32 model
        assert got["zero3_partition_bytes"] == pytest.approx(fp32_bytes / 4, rel=0.01)
        assert got["whole_partition_bytes"] == fp32_bytes
        # the process's peak memory during the build: a model built whole needs all of it (the
        # measurement sees it), the partitioned build well under half
        assert got["whole_peak_growth"] > 0.9 * fp32_bytes, got
        assert got["zero3_peak_growth"] < 0.45 * fp32_bytes, got
        assert got["init_differs"] == [] and got["slopes_fp32"]
        assert got["init_from_differs"] == []
    rows = {
        stage: [json.loads(x) for x in (tmp_path / f"zero{stage}" / "metrics.jsonl").read_text().splitlines()]
        for stage in (1, 3)
    }  # fmt: skip
    assert len(rows[3]) == 6 and rows[3][-1]["seq_len"] == 128
    # the same first loss to the last bit (same weights, same data), then the same run up to the
    # order in which ZeRO-1 and ZeRO-3 reduce gradients
    assert rows[3][0]["loss"] == rows[1][0]["loss"]
    for a, b in zip(rows[1], rows[3], strict=True):
        assert (a["step"], a["tokens"]) == (b["step"], b["tokens"])
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-3)
    assert rows[3][-1]["loss"] < rows[3][0]["loss"] - 1.0
    # --init-from: a run from the trained weights starts where they are, partitioned or not
    first = {
        stage: json.loads((tmp_path / f"from{stage}" / "metrics.jsonl").read_text().splitlines()[0])
        for stage in (1, 3)
    }
    assert first[3]["loss"] == first[1]["loss"] < rows[1][-1]["loss"] + 0.5


def peak_growth(build):
    """Run `build()`; how far the process's peak resident memory rose above what it held before."""

    def status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from now
    before = status("VmRSS")
    result = build()
    return result, status("VmHWM") - before


def worker(data: Path, out: Path) -> None:
    import deepspeed
    import torch

    from lmpipe.train.build import build_model, partition_bytes
    from lmpipe.train.hf import start_from
    from lmpipe.train.launch import finish_process, init_distributed
    from lmpipe.train.loop import train
    from lmpipe.train.model import GPT
    from lmpipe.train.plan import deepspeed_config, make_plan
    from lmpipe.train.recipe import load_recipe

    rank, world = init_distributed()
    got: dict = {}

    def build(overrides: list[str], zero_stage: int) -> GPT:
        recipe = load_recipe("tiny", [*overrides, f"zero_stage={zero_stage}"])
        return build_model(recipe, deepspeed_config(recipe, make_plan(recipe, world)))

    model, got["zero3_peak_growth"] = peak_growth(lambda: build(BIG_MODEL, 3))
    got["zero3_partition_bytes"] = partition_bytes(model)
    del model
    model, got["whole_peak_growth"] = peak_growth(lambda: build(BIG_MODEL, 1))
    got["whole_partition_bytes"] = partition_bytes(model)
    del model

    def differs(zero3: GPT, whole: GPT) -> list[str]:
        names = []
        for (name, p), q in zip(zero3.named_parameters(), whole.parameters(), strict=True):
            with deepspeed.zero.GatheredParameters([p]):
                if not torch.equal(p.data, q.data.bfloat16()):
                    names.append(name)
        return names

    sparse = [*TINY_MODEL, "precision=bf16", "model.density=0.5"]  # sparsify's draws too
    zero3, whole = build(sparse, 3), build(sparse, 1)
    got["init_differs"] = differs(zero3, whole)
    got["slopes_fp32"] = zero3.slopes.dtype == torch.float32 and torch.equal(
        zero3.slopes, whole.slopes
    )
    torch.manual_seed(7)  # --init-from: other weights (and masks), written into the partitions
    source = GPT(load_recipe("tiny", sparse).model)
    start_from(zero3, source)
    got["init_from_differs"] = differs(zero3, source)
    (out / f"rank{rank}.json").write_text(json.dumps(got))

    for stage in (1, 3):
        train(load_recipe("tiny", [*RUN, f"zero_stage={stage}"]), data, out / f"zero{stage}")
    for stage in (1, 3):  # --init-from the trained model, whole and into the partitions
        recipe = load_recipe("tiny", [*RUN, f"zero_stage={stage}"])
        train(recipe, data, out / f"from{stage}", init_from=out / "zero1", stop_after_steps=1)
    finish_process()  # exits: DeepSpeed's CPU ranks may abort in interpreter teardown


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))
