"""The training loop: one function, `train`, from a recipe and its data (a token-shard folder, or a
weighted mixture of several: `train/data.py`, `dataprep/mixture.py`) to a run folder.

DeepSpeed runs the model (ZeRO stage, bf16, gradient clipping, accumulation, checkpoints, the
process group); lmpipe owns what DeepSpeed's own features get wrong for this recipe:
  - the LR schedule is a client LambdaLR in tokens that multiplies each parameter group's own base
    rate (DeepSpeed's WarmupLR/WarmupDecayLR set one rate for all groups and erase muP's ratios);
  - the 2k -> 8k switch is the loader's and the loop's: each stage reads its own region of each
    source's token stream at its own window length (lmpipe.train.plan); a stage with its own
    tokens per step changes DeepSpeed's accumulation, and the loop marks every micro-step's
    accumulation boundary itself;
  - held-out loss per source, every `validation.every_tokens`, into metrics.jsonl.

Launch: one process (`lmpipe train`), or several with `torchrun --nproc_per_node N -m lmpipe.cli
train ...` / the `deepspeed` launcher; every rank runs this same function.

The run folder is new, empty or an earlier run's (with `resume`), and never overlaps the data.
A resume verifies the newest checkpoint's checksums on every rank before DeepSpeed loads it
weights-only (`checkpoint.py`); nothing in a run folder can run code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.folders import check_output, is_finished, write_json_atomic, write_manifest
from lmpipe.train.checkpoint import (
    CHECKPOINTS,
    MARKER,
    MODEL_DIR,
    list_checkpoints,
    load_checkpoint,
    read_marker,
    save_checkpoint,
    save_model,
    verify_checkpoint,
)
from lmpipe.train.data import (
    coverage,
    heldout_loss,
    open_heldout,
    open_sources,
    print_coverage,
    with_data,
)
from lmpipe.train.plan import Plan, deepspeed_config, lr_multiplier, make_plan, plan_summary
from lmpipe.train.recipe import DataSource, Recipe, load_recipe, recipe_yaml

log = logging.getLogger("lmpipe.train")


@contextlib.contextmanager
def launch_environment() -> Iterator[None]:
    """The rendezvous variables a launcher would set (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*),
    for a plain single process, for the duration of a run. DeepSpeed reads them while it
    initialises; removed afterwards, so the process does not look launched to a later run and
    child processes do not inherit a port this process already listens on."""
    own: dict[str, str] = {}
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        own = dict(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
        os.environ.update(own)
    try:
        yield
    finally:
        for key in own:
            os.environ.pop(key, None)


def init_distributed() -> tuple[int, int]:
    """Join the process group (created on first use); returns (rank, world size)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # skips DeepSpeed's accelerator probing
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed()  # picks gloo on the CPU, nccl on GPUs; a no-op the second time
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return dist.get_rank(), dist.get_world_size()


def finish_process() -> None:
    """End a launched rank cleanly. DeepSpeed's CPU ranks sometimes abort in interpreter teardown
    after finishing ('terminate called without an active exception', 2 of 20 runs measured); a
    barrier, a flush and an immediate exit avoid it. Only for launcher processes, never in tests."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


# What a run folder holds (`checkpoint.py`). A folder is an earlier run's when it has the plan
# (written at the start) or checkpoints, or holds nothing but these.
RUN_FILES = ("recipe.yaml", "plan.json", "deepspeed.json", "metrics.jsonl", "logs", CHECKPOINTS)


def check_run_dir(run_dir: Path, data: list[Path], recipe: Recipe, resume: bool) -> None:
    """Check the run folder on every rank, before any rank writes to it, so all ranks fail alike."""
    check_output(run_dir, data, what="run folder")
    if run_dir.exists() and not run_dir.is_dir():
        raise LmpipeError(f"{run_dir}: is a file, not a run folder; choose another --run-dir")
    if is_finished(run_dir):
        raise LmpipeError(
            f"{run_dir}: this run has finished (manifest.json); choose another --run-dir"
        )
    entries = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    is_run = "plan.json" in entries or CHECKPOINTS in entries or set(entries) <= set(RUN_FILES)
    if entries and not is_run:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise LmpipeError(
            f"{run_dir}: not empty and holds no lmpipe run ({shown}); choose an empty or new --run-dir"
        )
    if entries and not resume:
        what = "checkpoints" if list_checkpoints(run_dir) else "files"
        raise LmpipeError(
            f"{run_dir}: holds {what} of an earlier run; pass --resume to continue it, or choose another --run-dir"
        )
    checkpoints = list_checkpoints(run_dir)
    if resume and checkpoints:
        check_same_recipe(recipe, checkpoints[-1])


# Settings a resumed run may change; anything else would make it a different run from the one
# its checkpoint, metrics and data order belong to. (A source's folder may move: `data.N.path`.)
RESUMABLE_CHANGES = {
    "checkpoint_every_tokens",
    "keep_checkpoints",
    "model.attn_impl",
    "warn_epochs",
}


def check_same_recipe(recipe: Recipe, checkpoint: Path) -> None:
    saved = load_recipe(str(checkpoint / "recipe.yaml"))
    if saved.data is None:  # saved before mixtures: its one folder was the source "data"
        saved = saved.model_copy(update={"data": [DataSource(name="data", path=Path("."))]})

    def flat(value: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(value, dict | list):
            items = value.items() if isinstance(value, dict) else enumerate(value)
            return {k: v for key, sub in items for k, v in flat(sub, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): value}

    old, new = flat(saved.model_dump(mode="json")), flat(recipe.model_dump(mode="json"))
    changed = [
        f"{key} ({old.get(key)!r} -> {new.get(key)!r})"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
        and key not in RESUMABLE_CHANGES
        and not re.fullmatch(r"data\.\d+\.path", key)
    ]
    if changed:
        raise LmpipeError(
            f"{checkpoint}: --resume with a recipe that differs from the checkpoint's at "
            + ", ".join(changed)
            + "; resume with the same recipe, or start a new run"
        )


def trim_metrics(run_dir: Path, step: int) -> None:
    """Drop metric rows after `step`: steps that ran after the last checkpoint run again on resume.
    A row that does not parse (the torn last line of a killed run) goes too."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(path)


def on_all_ranks(check: Callable[[], object], world: int) -> None:
    """Run a check on every rank (each its share of the work) and fail on every rank if it failed
    on any: a rank that failed alone would leave the others waiting past the process-group timeout."""
    import torch.distributed as dist

    try:
        check()
        error = ""
    except LmpipeError as e:
        error = str(e)
    errors: list[str] = [""] * world
    dist.all_gather_object(errors, error)
    if any(errors):
        raise LmpipeError(next(e for e in errors if e))


def setup_logging(run_dir: Path, rank: int) -> None:
    handler = logging.FileHandler(run_dir / "logs" / f"rank{rank}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def export_model(engine: Any, recipe: Recipe, folder: Path, rank: int) -> None:
    """Write the final weights as a plain fp32 state dict: the optimizer's fp32 master copy where
    DeepSpeed keeps one (bf16 runs; the module itself holds bf16-rounded weights), gathered from
    every rank's partition (ZeRO-3). Every rank takes part; rank 0 writes."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        if full is None:  # no separate master copy: the parameter is the fp32 weight
            with deepspeed.zero.GatheredParameters([param], enabled=recipe.zero_stage == 3):
                full = param.detach().float().clone()
        state[name] = full.cpu()
    if rank == 0:
        save_model(engine.module, recipe, folder, state)


def resume_from(engine: Any, run_dir: Path, rank: int, world: int) -> int:
    """Load the newest finished checkpoint, after every rank has checked its share of the
    checksums; the step it ends. Without a checkpoint: step 0, and the user is told."""
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        if rank == 0:
            _notice(
                f"resume: no finished checkpoint in {run_dir / CHECKPOINTS}; starting from step 0"
            )
            trim_metrics(run_dir, 0)
        log.info("no checkpoint in %s: starting from step 0", run_dir)
        return 0
    latest = checkpoints[-1]
    on_all_ranks(lambda: verify_checkpoint(latest, rank, world), world)
    client = load_checkpoint(engine, latest)
    step = int(client["step"])
    if step != read_marker(latest)["step"]:
        raise LmpipeError(f"{latest}: DeepSpeed's state is of step {step}, {MARKER} says otherwise")
    log.info("resumed from %s at step %d", latest, step)
    if rank == 0:
        _notice(f"resume: from {latest} (step {step:,}, checksums verified)")
        trim_metrics(run_dir, step)
    return step


def _notice(text: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(text, highlight=False, markup=False)


def train(
    recipe: Recipe,
    data: Path | list[DataSource] | None,
    run_dir: Path,
    *,
    resume: bool = False,
    stop_after_steps: int | None = None,
    verify_data: bool = True,
    init_from: Path | None = None,
) -> dict[str, Any]:
    """Train `recipe` on `data` (one shard folder, named sources with weights, or None for the
    recipe's own `data` section), writing everything into `run_dir`.

    Returns the summary written to the run's manifest. `stop_after_steps` ends the call early with
    a checkpoint (as a preempted job would), for tests and bounded jobs; `resume=True` continues
    from the newest finished checkpoint exactly where the data and the schedule left off.
    `verify_data=False` skips the sha256 check of the shards (sizes are still checked).
    `init_from` starts from the weights of a run, model or Hugging Face folder instead of a fresh
    initialisation (the recipe's model must be theirs: `lmpipe.train.hf.initial_model`).
    """
    recipe = with_data(recipe, data)
    with launch_environment():
        return train_run(recipe, Path(run_dir), resume, stop_after_steps, verify_data, init_from)


def train_run(
    recipe: Recipe,
    run_dir: Path,
    resume: bool,
    stop_after_steps: int | None,
    verify_data: bool,
    init_from: Path | None = None,
) -> dict[str, Any]:
    import torch

    from lmpipe.dataprep.mixture import MixtureLoader
    from lmpipe.train.model import GPT

    # Input errors surface before the process group starts and DeepSpeed builds its op (a minute
    # cold); the launcher's environment already says how many ranks there are.
    launch_world = int(os.environ.get("WORLD_SIZE", "1"))
    sources = open_sources(recipe)  # sizes now, checksums once ranks can share them
    heldout = open_heldout(recipe) if recipe.validation else {}
    plan = make_plan(recipe, launch_world)
    reads = [s.path for s in recipe.data or []] + ([Path(init_from)] if init_from else [])
    check_run_dir(run_dir, reads, recipe, resume)
    initial = None
    if init_from is not None:
        from lmpipe.train.hf import initial_model, start_from

        initial = initial_model(Path(init_from), recipe)
    rank, world = init_distributed()
    import deepspeed
    import torch.distributed as dist

    if verify_data:
        on_all_ranks(lambda: [s.verify_checksums(rank, world) for s in sources.values()], world)
    dist.barrier()  # every rank has checked the run folder; now rank 0 may create it
    if rank == 0:
        try:
            (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LmpipeError(f"{run_dir}: cannot be created ({e.strerror})") from None
    dist.barrier()
    setup_logging(run_dir, rank)
    loader = MixtureLoader(sources, recipe.seed)
    ds_config = deepspeed_config(recipe, plan)
    drawn = coverage(recipe, plan, loader)
    for row in drawn:
        log.info(
            "stage %(stage)d, source %(source)s: %(tokens)d tokens, %(epochs).3f epochs of %(epoch_tokens)d at seq_len %(seq_len)d",
            row,
        )
    if rank == 0:
        (run_dir / "recipe.yaml").write_text(recipe_yaml(recipe), encoding="utf-8")
        write_json_atomic(run_dir / "plan.json", {**plan_summary(recipe, plan), "data": drawn})
        write_json_atomic(run_dir / "deepspeed.json", ds_config)
        print_coverage(recipe, drawn)

    torch.manual_seed(recipe.seed)
    model = GPT(recipe.model)
    if initial is not None:  # before DeepSpeed copies the weights into its own
        start_from(model, initial)
        del initial
    opt = recipe.optimizer
    optimizer = torch.optim.AdamW(
        model.param_groups(opt.lr, opt.weight_decay),
        lr=opt.lr,
        betas=opt.betas,
        eps=opt.eps,
        fused=torch.cuda.is_available(),
    )

    def multiplier(step: int) -> float:  # one schedule in tokens, whatever each step holds
        return lr_multiplier(plan.tokens_at(step), recipe.schedule, opt.lr, plan.total_tokens)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    device = engine.device

    step = resume_from(engine, run_dir, rank, world) if resume else 0

    summary = run_steps(
        engine,
        loader,
        heldout,
        recipe,
        plan,
        run_dir,
        rank,
        world,
        device,
        step,
        stop_after_steps,
    )
    if summary["finished"]:
        export_model(engine, recipe, run_dir / MODEL_DIR, rank)
        if rank == 0:
            write_manifest(
                run_dir,
                "train",
                recipe=recipe.name,
                data={source.name: str(source.path) for source in recipe.data or []},
                world_size=world,
                init_from=str(init_from) if init_from is not None else None,
                summary=summary,
            )
    if rank == 0:
        print_summary(summary, run_dir)
    dist.barrier()
    return summary


def print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    from rich.console import Console

    done = (
        f"finished; model in {run_dir / MODEL_DIR}"
        if summary["finished"]
        else f"stopped at step {summary['steps']:,}; continue with --resume"
    )
    first, last = summary["first_loss"], summary["last_loss"]
    losses = f", loss {first:.3f} -> {last:.3f}" if first is not None else ""
    if summary["lr"] is not None:
        losses += f", last LR {summary['lr']:.3g} (embeddings) {summary['lr_hidden']:.3g} (hidden)"
    Console(stderr=True).print(
        f"train: {summary['steps_this_call']:,} steps ({summary['tokens']:,} tokens in all){losses}, "
        f"{summary['tokens_per_s'] or 0:,.0f} tokens/s, {summary['seconds']:.0f} s; {done}",
        highlight=False,
    )


def run_steps(
    engine: Any,
    loader: Any,
    heldout: dict[str, Any],
    recipe: Recipe,
    plan: Plan,
    run_dir: Path,
    rank: int,
    world: int,
    device: Any,
    step: int,
    stop_after_steps: int | None,
) -> dict[str, Any]:
    """The optimizer steps from `step` to the end of the run (or `stop_after_steps` more)."""
    import torch
    import torch.distributed as dist
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8") if rank == 0 else None
    end_step = (
        plan.total_steps
        if stop_after_steps is None
        else min(plan.total_steps, step + stop_after_steps)
    )
    every = recipe.checkpoint_every_tokens
    losses: list[float] = []
    rates: dict[str, float] = {}
    start_step, started = step, time.perf_counter()
    progress = Progress(
        TextColumn("[bold]train[/] {task.fields[info]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=rank != 0,
    )
    with progress:
        task = progress.add_task("train", total=plan.total_steps, completed=step, info="")
        while step < end_step:
            stage = plan.stage_at(step)
            if engine.gradient_accumulation_steps() != stage.grad_accum:
                # A stage with its own batch (Cerebras-GPT 13B): DeepSpeed scales each micro-step's
                # loss by 1 / its accumulation, so it must know the new one.
                engine.set_train_batch_size(plan.stages[0].micro_batch * stage.grad_accum * world)
            batches = loader.batches(
                seq_len=stage.seq_len,
                global_batch=stage.global_batch,
                sources=stage.sources,
                n_batches=stage.steps,
                start_batch=step - stage.first_step,
                rank=rank,
                world_size=world,
            )
            for batch in batches:
                t0 = time.perf_counter()
                tokens_BT1 = torch.from_numpy(batch).to(device)
                step_loss = torch.zeros((), device=device)
                # The rates this step runs at, as the optimizer inside DeepSpeed holds them.
                rates = group_rates(engine)
                # One optimizer step = grad_accum micro-steps; DeepSpeed scales each loss by
                # 1/grad_accum and steps the optimizer (and the LR schedule) on the last one,
                # marked here rather than counted by DeepSpeed (its count would drift at a switch
                # of accumulation).
                grad_norm = None
                micros = tokens_BT1.split(stage.micro_batch)
                for i, micro_BT1 in enumerate(micros):
                    engine.set_gradient_accumulation_boundary(i == len(micros) - 1)
                    _, loss = engine(
                        micro_BT1[:, :-1], micro_BT1[:, 1:], alibi_scale=stage.alibi_scale
                    )
                    engine.backward(loss)
                    if recipe.zero_stage == 0 and engine.is_gradient_accumulation_boundary():
                        # without ZeRO, DeepSpeed clips fp32 gradients without recording the norm
                        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
                        grad_norm = torch.nn.utils.get_total_norm(grads).item()
                    engine.step()
                    step_loss += loss.detach().float()
                dist.all_reduce(step_loss)
                loss_value = step_loss.item() / (stage.grad_accum * world)
                step += 1
                losses.append(loss_value)
                before, tokens = plan.tokens_at(step - 1), plan.tokens_at(step)
                row = {
                    "step": step,
                    "tokens": tokens,
                    "stage": stage.index,
                    "seq_len": stage.seq_len,
                    "loss": round(loss_value, 6),
                    "lr": rates["embedding"],  # eta_base x the schedule
                    "lr_hidden": rates["hidden"],  # muP: eta_base / m_d (/ m_rho) x the schedule
                    "lr_groups": rates,  # every group, as the optimizer inside DeepSpeed has it
                    "grad_accum": engine.gradient_accumulation_steps(),
                    "grad_norm": _float(
                        engine.get_global_grad_norm() if grad_norm is None else grad_norm
                    ),
                    "tokens_per_s": round(stage.tokens_per_step / (time.perf_counter() - t0), 1),
                }
                validation = recipe.validation
                if validation and heldout and tokens // validation.every_tokens > before // validation.every_tokens:  # fmt: skip
                    row["val_loss"] = heldout_loss(
                        engine, heldout, seq_len=stage.seq_len, tokens=validation.tokens,
                        micro_batch=stage.micro_batch, alibi_scale=stage.alibi_scale, rank=rank, world=world,
                    )  # fmt: skip
                if metrics is not None:
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                log.info(
                    "step %d loss %.4f lr %.3g seq_len %d",
                    step,
                    loss_value,
                    row["lr"],
                    stage.seq_len,
                )
                progress.update(
                    task,
                    completed=step,
                    info=f"stage {stage.index} seq {stage.seq_len} loss {loss_value:.3f}",
                )
                if tokens // every > before // every or step == end_step:
                    save_checkpoint(engine, run_dir, recipe, step, tokens, rank, world)
                if step >= end_step or step == stage.first_step + stage.steps:
                    break
    if metrics is not None:
        metrics.close()
    elapsed = time.perf_counter() - started
    trained = plan.tokens_at(step) - plan.tokens_at(start_step)
    return {
        "finished": step >= plan.total_steps,
        "steps": step,
        "tokens": plan.tokens_at(step),
        "steps_this_call": step - start_step,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "lr": rates.get("embedding"),
        "lr_hidden": rates.get("hidden"),
        "tokens_per_s": round(trained / elapsed, 1) if elapsed else None,
        "seconds": round(elapsed, 2),
    }


def group_rates(engine: Any) -> dict[str, float]:
    """Each named parameter group's learning rate in the optimizer DeepSpeed steps."""
    return {g["name"]: g["lr"] for g in engine.optimizer.param_groups if "name" in g}


def _float(value: Any) -> float | None:
    if value is None:
        return None
    return round(float(value), 6)
