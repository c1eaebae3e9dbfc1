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
  - held-out loss per source, every `validation.every_tokens` (without a `validation` section:
    every tenth of the run, when the data has a held-out split), into metrics.jsonl;
  - the guard (`guard.py`): a step with a non-finite loss or gradient norm is skipped on every
    rank, too many in a row or a loss spike stop the run, SIGTERM / SIGINT stop it after the
    current step with a checkpoint;
  - what the user sees (`metrics.py`): metrics.jsonl, TensorBoard, MFU on GPUs.

Launch: one process (`lmpipe train`), or several with `torchrun --nproc_per_node N -m lmpipe.cli
train ...` / the `deepspeed` launcher / SLURM (`launch.py`, docs/multinode.md); every rank runs
this same function.

The run folder is new, empty or an earlier run's (with `resume`), never overlaps the data, and
holds no symbolic link (`run_folder.py`: a resume would write through it).
A resume verifies the newest checkpoint's checksums on every rank before DeepSpeed loads it
weights-only (`checkpoint.py`); nothing in a run folder can run code.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.folders import (
    lock_folder,
    read_json,
    write_json_atomic,
    write_manifest,
    write_text_atomic,
)
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
    data_identity,
    heldout_loss,
    heldout_splits,
    open_sources,
    print_coverage,
    validation_of,
    with_data,
)
from lmpipe.train.guard import Guard, RunStopped, StopSignals, plain_step, skip_unless_finite
from lmpipe.train.launch import (
    init_distributed,
    launch_environment,
    launch_world_size,
    on_all_ranks,
)
from lmpipe.train.metrics import (
    MetricsWriter,
    device_memory_row,
    print_summary,
    reset_device_peak,
    wait_for_device,
    world_peak_flops,
)
from lmpipe.train.plan import (
    Plan,
    deepspeed_config,
    lr_multiplier,
    make_plan,
    model_flops_per_token,
    plan_summary,
)
from lmpipe.train.recipe import DataSource, Recipe, ValidationConfig, recipe_yaml
from lmpipe.train.run_folder import check_run_dir, run_rows, trim_metrics

log = logging.getLogger("lmpipe.train")


def setup_logging(run_dir: Path, rank: int) -> None:
    handler = logging.FileHandler(run_dir / "logs" / f"rank{rank}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def write_final_model(engine: Any, recipe: Recipe, folder: Path, rank: int) -> None:
    """Write the final weights as a plain fp32 state dict: the optimizer's fp32 master copy where
    DeepSpeed keeps one (bf16 runs; the module itself holds bf16-rounded weights), gathered from
    every rank's partition (ZeRO-3). Every rank takes part in each gathering; only rank 0 keeps
    a host copy (13B in fp32 is 52 GB: a copy on each of a node's 8 ranks would not fit) and
    writes it."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        if full is None:  # no separate master copy: the parameter is the fp32 weight
            with deepspeed.zero.GatheredParameters([param], enabled=recipe.zero_stage == 3):
                full = param.detach().float().clone()
        if rank == 0:
            state[name] = full.cpu()
        del full  # the gathered copy, on the device
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
    peak_tflops: float | None = None,
    published_as: Path | None = None,
) -> dict[str, Any]:
    """Train `recipe` on `data` (one shard folder, named sources with weights, or None for the
    recipe's own `data` section), writing everything into `run_dir`.

    Returns the summary written to the run's manifest. `stop_after_steps` ends the call early with
    a checkpoint (as a preempted job would), for tests and bounded jobs; `resume=True` continues
    from the newest finished checkpoint exactly where the data and the schedule left off.
    `verify_data=False` skips the sha256 check of the shards (sizes are still checked).
    `init_from` starts from the weights of a run, model or Hugging Face folder instead of a fresh
    initialisation (the recipe's model must be theirs: `lmpipe.train.hf.initial_model`).
    `peak_tflops`: one GPU's dense bf16 peak for MFU, where `metrics.PEAK_TFLOPS` lacks it.
    `published_as`: the path the caller publishes `run_dir` as, without its checkpoints (a sweep
    point, trained in OUT.partial): the last line and the guard's stop name the run there, and
    the manifest names no checkpoint.
    A SIGTERM or SIGINT stops the run after the current step with a checkpoint (the summary's
    `stopped`); the guard's stop raises `RunStopped`.
    """
    recipe = with_data(recipe, data)
    with launch_environment(), contextlib.ExitStack() as held:
        return train_run(
            recipe,
            Path(run_dir),
            resume=resume,
            stop_after_steps=stop_after_steps,
            verify_data=verify_data,
            init_from=init_from,
            peak_tflops=peak_tflops,
            published_as=published_as,
            held=held,
        )


def train_run(
    recipe: Recipe,
    run_dir: Path,
    *,
    resume: bool,
    stop_after_steps: int | None,
    verify_data: bool,
    init_from: Path | None,
    peak_tflops: float | None,
    published_as: Path | None,
    held: contextlib.ExitStack,
) -> dict[str, Any]:
    """`train` inside its launch environment; `held` keeps the run folder's lock until the
    caller's block ends."""
    import torch

    from lmpipe.dataprep.mixture import MixtureLoader
    from lmpipe.train.build import build_model

    # Input errors surface before the process group starts and DeepSpeed builds its op (a minute
    # cold); the launcher's environment already says how many ranks there are.
    launch_world = launch_world_size()
    if recipe.model.attn_impl == "flex" and not torch.cuda.is_available():
        # Caught here, not at the first backward: by then the run folder exists.
        raise LmpipeError(
            "model.attn_impl flex: FlexAttention has no backward on the CPU; use sdpa, or auto "
            "(flex on a GPU, sdpa elsewhere)"
        )
    sources = open_sources(recipe)  # sizes now, checksums once ranks can share them
    heldout = heldout_splits(recipe, sources)
    plan = make_plan(recipe, launch_world)
    loader = MixtureLoader(sources, recipe.seed)
    drawn = coverage(recipe, plan, loader)  # a source shorter than one window: refused here
    validation = validation_of(recipe, plan) if heldout else None
    init_from, started_from = init_source(run_dir, init_from, resume)
    reads = [s.path for s in recipe.data or []] + ([Path(init_from)] if init_from else [])
    identity = data_identity(sources)
    notices = check_run_dir(
        run_dir, reads, recipe, resume, world=launch_world, identity=identity, drawn=drawn
    )
    initial = None
    if init_from is not None:
        from lmpipe.train.hf import initial_model, start_from

        initial = initial_model(Path(init_from), recipe)
    rank, world = init_distributed()
    if rank == 0:
        for notice in notices:
            _notice(notice)
    import deepspeed
    import torch.distributed as dist

    if verify_data:

        def verify() -> None:
            for s in sources.values():
                s.verify_checksums(rank, world)

        on_all_ranks(verify, world)
    dist.barrier()  # every rank has checked the run folder; now rank 0 may create it

    def create_run_dir() -> None:
        if rank != 0:
            return
        # One run at a time in a run folder: a second `--resume` of a job whose first attempt
        # still runs (a requeue, a double submit) would write checkpoints over it.
        held.enter_context(lock_folder(run_dir, "train"))
        try:
            (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LmpipeError(f"{run_dir}: cannot be created ({e.strerror})") from None

    on_all_ranks(create_run_dir, world)  # a refused rank 0 stops every rank, each in one line
    setup_logging(run_dir, rank)
    ds_config = deepspeed_config(recipe, plan)
    for row in drawn:
        log.info(
            "stage %(stage)d, source %(source)s: %(tokens)d tokens, "
            "%(epochs).3f epochs of %(epoch_tokens)d at seq_len %(seq_len)d",
            row,
        )
    if rank == 0:
        write_text_atomic(run_dir / "recipe.yaml", recipe_yaml(recipe))
        write_json_atomic(
            run_dir / "plan.json",
            {
                **plan_summary(recipe, plan),
                "init_from": started_from,
                "data": drawn,
                "validation": validation.model_dump() if validation else None,
            },
        )
        write_json_atomic(run_dir / "deepspeed.json", ds_config)
        print_coverage(recipe, drawn)

    model = build_model(recipe, ds_config)  # under ZeRO-3 already partitioned
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

    step = resume_from(engine, run_dir, rank, world) if resume else 0

    peak_flops, device_name = world_peak_flops(world, peak_tflops)
    if rank == 0 and peak_flops is None and device_name != "cpu":
        _notice(f"train: no MFU: {device_name}")
    run = Run(
        recipe=recipe,
        plan=plan,
        run_dir=run_dir,
        rank=rank,
        world=world,
        heldout=heldout,
        validation=validation,
        peak_flops=peak_flops,
        data=identity,
    )
    summary = run_steps(engine, loader, run, step, stop_after_steps, resumed=resume)
    if summary["finished"]:
        write_final_model(engine, recipe, run_dir / MODEL_DIR, rank)
        if rank == 0:
            write_manifest(
                run_dir,
                "train",
                recipe=recipe.name,
                data={source.name: str(source.path) for source in recipe.data or []},
                world_size=world,
                init_from=started_from,
                # published without its checkpoints: a path to one would name nothing
                summary=summary if published_as is None else {**summary, "checkpoint": None},
            )
    if rank == 0:
        print_summary(summary, published_as or run_dir)
    dist.barrier()
    if summary["stopped"] == "guard":
        stop = f"stopped at step {summary['steps']:,}: {summary['stop_reason']}"
        if published_as is not None:  # its checkpoints are dropped: there is no resume to offer
            raise RunStopped(f"{published_as}: {stop}")
        checkpoint = summary["checkpoint"]
        raise RunStopped(
            f"{run_dir}: {stop}; "
            + (
                f"last good checkpoint {checkpoint} (lmpipe train --resume continues from it)"
                if checkpoint
                else "no checkpoint yet (lmpipe train --resume starts it again from step 0)"
            )
        )
    return summary


def init_source(
    run_dir: Path, init_from: Path | None, resume: bool
) -> tuple[Path | None, str | None]:
    """The weights to start from (None: a fresh initialisation, or a resume's checkpoint) and
    what the run's weights started from, for plan.json and the manifest. A resume keeps what its
    first call was given (plan.json): it need not repeat --init-from, and before the first
    checkpoint it starts again from those weights; with a checkpoint the weights are the
    checkpoint's, and another --init-from is refused."""
    previous = None
    plan = run_dir / "plan.json"
    if resume and plan.is_file():
        with contextlib.suppress(LmpipeError, OSError, AttributeError):
            previous = read_json(plan).get("init_from")
    if not isinstance(previous, str):  # a plan.json damaged or from another tool: none recorded
        previous = None
    if resume and list_checkpoints(run_dir):
        if init_from is not None and str(init_from) != previous:
            raise LmpipeError(
                f"{run_dir}: --init-from {init_from} with --resume: the run continues from its "
                f"checkpoint (its weights started from {previous or 'a fresh initialisation'}); "
                "leave --init-from out"
            )
        return None, previous
    if init_from is None and previous:
        init_from = Path(previous)
    return init_from, str(init_from) if init_from is not None else None


@dataclass(frozen=True)
class Run:
    """What the steps need to know of a run, besides DeepSpeed's engine and the loader."""

    recipe: Recipe
    plan: Plan
    run_dir: Path
    rank: int
    world: int
    heldout: dict[str, Any]  # source name -> held-out TokenShards
    validation: ValidationConfig | None
    peak_flops: float | None  # the world's, for MFU; None: no MFU (CPUs)
    data: dict[str, str]  # source name -> the identity of its tokens (`data.data_identity`)


def run_steps(
    engine: Any,
    loader: Any,
    run: Run,
    step: int,
    stop_after_steps: int | None,
    resumed: bool,
) -> dict[str, Any]:
    """The optimizer steps from `step` to the end of the run, or `stop_after_steps` more, or
    the step a stop signal or the guard ends it at (`guard.py`)."""
    import torch
    import torch.distributed as dist
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    recipe, plan, rank, world, device = run.recipe, run.plan, run.rank, run.world, engine.device
    end_step = (
        plan.total_steps
        if stop_after_steps is None
        else min(plan.total_steps, step + stop_after_steps)
    )
    every, validation = recipe.checkpoint_every_tokens, run.validation
    guard = Guard(recipe.guard)
    losses: list[float] = []
    rates: dict[str, float] = {}
    val_loss: dict[str, float] | None = None
    stopped, stop_reason, flops = None, None, 0.0
    start_step, started = step, time.perf_counter()
    progress = Progress(
        TextColumn("[bold]train[/] {task.fields[info]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=rank != 0,
    )
    # a resume runs the steps after its checkpoint again: TensorBoard hides their old events
    writer = MetricsWriter(run.run_dir, step + 1 if resumed else None, rank)
    with progress, writer, StopSignals(announce=rank == 0) as signals:
        task = progress.add_task("train", total=plan.total_steps, completed=step, info="")
        while step < end_step and stopped is None:
            stage = plan.stage_at(step)
            if engine.gradient_accumulation_steps() != stage.grad_accum:
                # A stage with its own batch (Cerebras-GPT 13B): DeepSpeed scales each micro-step's
                # loss by 1 / its accumulation, so it must know the new one.
                engine.set_train_batch_size(plan.stages[0].micro_batch * stage.grad_accum * world)
            reset_device_peak(device)
            batches = loader.batches(
                seq_len=stage.seq_len,
                global_batch=stage.global_batch,
                sources=stage.sources,
                n_batches=stage.steps,
                start_batch=step - stage.first_step,
                rank=rank,
                world_size=world,
            )
            loading = time.perf_counter()  # a step's time runs from asking the loader for its batch
            for batch in batches:
                t0 = time.perf_counter()
                tokens_BT1 = torch.from_numpy(batch).to(device)
                # The rates this step runs at, as the optimizer inside DeepSpeed holds them.
                rates = group_rates(engine)
                # Summed over the ranks in one all-reduce before the step's last backward: its
                # loss, and the ranks a SIGTERM / SIGINT has reached by then.
                agreed = torch.zeros(3, device=device)
                # One optimizer step = grad_accum micro-steps; DeepSpeed scales each loss by
                # 1/grad_accum and steps the optimizer (and the LR schedule) on the last one,
                # marked here rather than counted by DeepSpeed (its count would drift at a switch
                # of accumulation).
                grad_norm = None
                micros = tokens_BT1.split(stage.micro_batch)
                for i, micro_BT1 in enumerate(micros):
                    last = i == len(micros) - 1
                    engine.set_gradient_accumulation_boundary(last)
                    _, loss = engine(
                        micro_BT1[:, :-1], micro_BT1[:, 1:], alibi_scale=stage.alibi_scale
                    )
                    agreed[0] += loss.detach().float()
                    if last:
                        signals.mark(agreed[1:])
                        dist.all_reduce(agreed)
                        loss = skip_unless_finite(loss, agreed[0])  # a step of any bad loss: none
                    engine.backward(loss)
                    if recipe.zero_stage == 0 and last:
                        grad_norm = plain_step(engine, recipe.optimizer.grad_clip)
                    else:
                        engine.step()
                wait_for_device(device)
                step_loss, *votes = agreed.tolist()
                loss_value = step_loss / (stage.grad_accum * world)
                skipped = not engine.was_step_applied() or not math.isfinite(grad_norm or 0.0)
                step += 1
                if skipped and engine.lr_scheduler.last_epoch < step:
                    engine.lr_scheduler.step()  # the schedule follows the tokens read (guard.py)
                losses.append(loss_value)
                before, tokens = plan.tokens_at(step - 1), plan.tokens_at(step)
                seconds = time.perf_counter() - loading
                tokens_per_s = stage.tokens_per_step / seconds
                step_flops = model_flops_per_token(recipe, stage.seq_len, plan.n_params)
                flops += step_flops * stage.tokens_per_step
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
                    "tokens_per_s": round(tokens_per_s, 1),
                    "loader_share": round((t0 - loading) / seconds, 4),
                    "skipped": skipped,
                    "skipped_steps": engine.skipped_steps,
                    **device_memory_row(device),
                }
                if run.peak_flops:
                    row["mfu"] = round(step_flops * tokens_per_s / run.peak_flops, 4)
                if validation and tokens // validation.every_tokens > before // validation.every_tokens:  # fmt: skip
                    val_loss = row["val_loss"] = heldout_loss(
                        engine, run.heldout, seq_len=stage.seq_len, tokens=validation.tokens,
                        micro_batch=stage.micro_batch, alibi_scale=stage.alibi_scale, rank=rank, world=world,
                    )  # fmt: skip
                stop_reason = guard.check(step, loss_value, row["grad_norm"], skipped)
                if stop_reason:
                    stopped, row["stop"], row["stop_reason"] = "guard", "guard", stop_reason
                elif signals.agreed(votes):  # every rank stops here, whichever the signal reached
                    stopped = row["stop"] = signals.agreed(votes)
                writer.write(row)
                log.info(
                    "step %d loss %.4f lr %.3g seq_len %d%s",
                    step,
                    loss_value,
                    row["lr"],
                    stage.seq_len,
                    " (skipped: not finite)" if skipped else "",
                )
                if stopped:
                    log.info("stop at step %d: %s", step, stop_reason or stopped)
                progress.update(
                    task,
                    completed=step,
                    info=f"stage {stage.index} seq {stage.seq_len} loss {loss_value:.3f}",
                )
                due = tokens // every > before // every or step == end_step
                if stopped != "guard" and (due or stopped):  # the guard's state may be bad
                    save_checkpoint(engine, run, step, tokens)
                loading = time.perf_counter()
                if stopped or step >= end_step or step == stage.first_step + stage.steps:
                    break
    elapsed = time.perf_counter() - started
    trained = plan.tokens_at(step) - plan.tokens_at(start_step)
    checkpoints = list_checkpoints(run.run_dir)
    first_loss = losses[0] if losses else None
    if resumed:  # the run's first loss is an earlier call's: its rows, trimmed to the checkpoint
        rows = run_rows(run.run_dir, step)
        first_loss = rows[0]["loss"] if rows else first_loss
        if not losses:  # resumed at its last checkpoint (killed before the end): no steps ran
            losses = [r["loss"] for r in rows]
            val_loss = next((r["val_loss"] for r in reversed(rows) if r["val_loss"]), None)
            rates = rows[-1]["lr_groups"] if rows else {}
    # The losses are the run's; the speed is this call's (a resume's start-up and another
    # machine would blur a whole-run figure), named so.
    peak_flops = run.peak_flops
    return {
        "finished": step >= plan.total_steps and stopped != "guard",
        "steps": step,
        "tokens": plan.tokens_at(step),
        "steps_this_call": step - start_step,
        "first_loss": first_loss,
        "last_loss": losses[-1] if losses else None,
        "val_loss": val_loss,  # the last measured
        "lr": rates.get("embedding"),
        "lr_hidden": rates.get("hidden"),
        "skipped_steps": engine.skipped_steps,
        "tokens_per_s_this_call": round(trained / elapsed, 1) if elapsed and trained else None,
        "mfu_this_call": round(flops / elapsed / peak_flops, 4) if peak_flops and elapsed else None,
        "seconds_this_call": round(elapsed, 2),
        "stopped": stopped,  # None, "SIGTERM", "SIGINT" or "guard"
        "stop_reason": stop_reason,
        "checkpoint": str(checkpoints[-1]) if checkpoints else None,
    }


def group_rates(engine: Any) -> dict[str, float]:
    """Each named parameter group's learning rate in the optimizer DeepSpeed steps."""
    return {g["name"]: g["lr"] for g in engine.optimizer.param_groups if "name" in g}


def _float(value: Any) -> float | None:
    if value is None:
        return None
    return round(float(value), 6)
