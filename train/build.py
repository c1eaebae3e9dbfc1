"""Building the model a run trains, on every rank: the same initial weights under every ZeRO stage,
and under ZeRO-3 never the whole model on any rank.

ZeRO-0/1/2 build the model whole in fp32 on the CPU (DeepSpeed moves it to the device and rounds
it to bf16). ZeRO-3 builds it inside `deepspeed.zero.Init`: each submodule's parameters are rounded
to the training dtype, moved to the device and partitioned across the ranks as soon as that
submodule is built, so a rank holds 1/world of the weights plus one submodule at a time (13B on 8
ranks: ~3.3 GB of bf16 each, instead of 52 GB of fp32 on every rank). `GPT.reset_parameters` then
gathers one parameter at a time (`lmpipe.train.model.fp32_copy`) and draws it from the same CPU
generator in fp32, in the same order: the initial weights are bit for bit those of ZeRO-1, and so
are the losses (tests/train/test_zero3_init.py).

`--init-from` works under every stage: `lmpipe.train.hf.start_from` writes the weights into the
built model one gathered parameter at a time. (The source model is read whole on every rank, so
a run that starts from one needs its fp32 size in host memory per rank.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmpipe.train.recipe import Recipe

if TYPE_CHECKING:
    import torch

    from lmpipe.train.model import GPT


def build_model(recipe: Recipe, ds_config: dict[str, Any]) -> GPT:
    """The run's model, initialised from `recipe.seed`, as DeepSpeed will take it: whole, or
    under ZeRO-3 already partitioned with `ds_config` (the run's DeepSpeed config)."""
    import torch

    from lmpipe.train.model import GPT

    torch.manual_seed(recipe.seed)
    if recipe.zero_stage < 3:
        return GPT(recipe.model)
    return _build_partitioned(recipe, ds_config)


def _build_partitioned(recipe: Recipe, ds_config: dict[str, Any]) -> GPT:
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import DeepSpeedTensorOverride

    from lmpipe.train.model import GPT, alibi_slopes

    # DeepSpeed would otherwise replace torch.nn.functional.linear for the rest of the process
    # ("memory-efficient linear"), in every later model too; lmpipe's saves no memory here.
    config = {
        **ds_config,
        "zero_optimization": {**ds_config["zero_optimization"], "memory_efficient_linear": False},
    }
    # Tensors are created on the CPU (only their dtype is overridden), as a whole model's are:
    # submodules' own initialisation then draws from the CPU generator in both cases, so it leaves
    # that generator where reset_parameters expects it.
    with deepspeed.zero.Init(
        config_dict_or_path=config, tensor_overrides=[DeepSpeedTensorOverride.dtype]
    ):
        model = GPT(recipe.model)
    device = _device()
    # zero.Init rounds every floating tensor made in __init__ to the training dtype, buffers too,
    # and leaves buffers where they were made; the other stages keep buffers as built (DeepSpeed
    # casts only parameters) and move them. ALiBi's slopes (2^(-h/4) at 32 heads) are no bf16
    # numbers: made again in fp32.
    model.slopes = alibi_slopes(recipe.model.n_heads)
    for owner in model.modules():
        for name, buffer in owner.named_buffers(recurse=False):
            setattr(owner, name, buffer.to(device))
    return model


def _device() -> torch.device:
    import torch
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def partition_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameter storage this rank holds: every parameter of a model built whole; under
    ZeRO-3 its partitions (`ds_tensor`) and whatever is gathered at the moment (`data`)."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()  # a partitioned parameter's data is empty
        shard = getattr(p, "ds_tensor", None)  # DeepSpeed's ZeRO-3 attribute
        if shard is not None:
            total += shard.numel() * shard.element_size()
    return total
