"""Memory of one training sequence on the CPU, by loss and activation checkpointing: README's
"Speed and memory" table.

For the `cerebras-gpt-111m` model and one 2,048-token sequence, forward and backward:
  - peak RSS growth (GiB) in a fresh process per case, fp32 and bf16 weights, the plain loss
    against the chunked loss at 4,096 and 1,024 rows a chunk (`peak_growth`);
  - what autograd keeps for the backward pass (GiB, fp32, each storage once, weights and inputs
    not counted), by `activation_checkpointing` and loss (`saved_bytes`).

    python benchmarks/loss_memory.py            # about 5 minutes on 2 cores

tests/train/test_model_speed.py uses both measures on smaller models.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

from lmpipe.train.recipe import ModelConfig

PEAK = textwrap.dedent(
    """
    import sys
    import torch
    from lmpipe.train.model import GPT
    from lmpipe.train.recipe import ModelConfig

    def status(key):  # KiB, from the kernel's account of this process
        lines = open("/proc/self/status").read().splitlines()
        return int(next(line for line in lines if line.startswith(key + ":")).split()[1])

    cfg = ModelConfig.model_validate_json(sys.argv[1])
    torch.manual_seed(0)
    model = GPT(cfg).to(getattr(torch, sys.argv[2]))
    idx = torch.randint(0, cfg.vocab_size, (1, int(sys.argv[3]) + 1))
    # The peak starts again from here (Linux: "5" resets VmHWM), so memory the imports and the
    # build used and gave back cannot hide what the forward and backward take.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    print(status("VmHWM") - before, loss.item())  # KiB that forward + backward added to the peak
    """
)


def peak_growth(cfg: ModelConfig, dtype: str, seq_len: int) -> tuple[float, float]:
    """GiB by which one sequence's forward and backward raised the process's peak RSS, and the
    loss, measured in a fresh process (tracemalloc does not see torch's allocations)."""
    out = subprocess.run(
        [sys.executable, "-c", PEAK, cfg.model_dump_json(), dtype, str(seq_len)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    kib, loss = out.stdout.split()
    return int(kib) / 2**20, float(loss)


def saved_bytes(run, kept_anyway) -> int:
    """Bytes of the tensors autograd keeps for the backward pass while `run()` builds its graph,
    each storage once, those of `kept_anyway` (parameters, inputs) not counted."""
    skip = {t.untyped_storage().data_ptr() for t in kept_anyway}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(kept.values())


def main() -> None:
    from lmpipe.train.model import GPT
    from lmpipe.train.recipe import load_recipe

    cfg = load_recipe("cerebras-gpt-111m").model
    seq_len = 2048
    losses = (("plain", 4096), ("chunked", 4096), ("chunked", 1024))
    print(f"cerebras-gpt-111m, one {seq_len:,}-token sequence, forward + backward, peak RSS growth")
    for dtype in ("float32", "bfloat16"):
        cells = []
        for impl, chunk in losses:
            case = cfg.model_copy(update={"loss_impl": impl, "loss_chunk_tokens": chunk})
            gib, _ = peak_growth(case, dtype, seq_len)
            cells.append(f"{impl}{f' ({chunk:,})' if impl == 'chunked' else ''} +{gib:.2f} GiB")
        print(f"  {dtype:9}", " | ".join(cells), flush=True)
    print("kept for the backward pass, float32")
    torch.manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (1, seq_len + 1))
    for setting in ("none", "every_2", "full"):
        cells = []
        for impl in ("plain", "chunked"):
            update = {"loss_impl": impl, "activation_checkpointing": setting}
            model = GPT(cfg.model_copy(update=update))
            run = lambda m=model: m(idx[:, :-1], idx[:, 1:])  # noqa: E731
            cells.append(f"{impl} {saved_bytes(run, [*model.parameters(), idx]) / 2**30:.3f} GiB")
        print(f"  {setting:9}", " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
