"""Lightning strategies for the distillation stages, named in a stage's ``strategy`` field (docs/scale.md).

A stage's ``strategy`` is either a Lightning name ("auto", "ddp", "fsdp", …) or a mapping

    {class_path: lightning.pytorch.strategies.FSDPStrategy,
     init_args: {auto_wrap_policy: blocks, activation_checkpointing_policy: blocks, …}}

``class_path`` is the dotted path of a Lightning ``Strategy`` class (in YAML it must be dotted: the config parser
treats a mapping with a bare class name as a class to import); ``init_args`` are its keyword arguments, with three
conveniences for FSDP written in YAML:

- ``auto_wrap_policy: blocks`` — one FSDP unit per FLUX block (double, single, MoE single) of teacher *and*
  student, plus one per whole transformer, so that each model's embedders and final norm form their own unit:
  FSDP flattens a unit's parameters into one tensor of one dtype, and the frozen teacher (bf16) and the trained
  student (fp32 master weights) must never share one. The teacher is therefore sharded like the student and
  gathered block by block under ``no_grad``: no replicated 24 GB copy per GPU.
- ``activation_checkpointing_policy: blocks`` — recompute exactly the block classes in the backward. Teacher blocks
  run under ``no_grad``, where the checkpoint wrapper stores nothing and costs nothing.
- ``mixed_precision: {param_dtype: bfloat16, reduce_dtype: float32, buffer_dtype: float32}`` — dtype names become a
  ``torch.distributed.fsdp.MixedPrecision``. Keep buffers in fp32: the MoE selection bias takes γ = 1e-3 steps
  that bf16 would round away (Lightning's plain "bf16-mixed" FSDP default casts buffers to bf16).

A list of class names (the three block names, "FluxTransformer2DModel", or dotted paths) may replace ``blocks``.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import strategies as lightning_strategies
from lightning.pytorch.strategies import FSDPStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torch.distributed.fsdp import FullStateDictConfig, MixedPrecision, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from src.dtypes import DTYPES
from src.models.flux_moe import FluxMoESingleTransformerBlock, FluxMoETransformer2DModel, build_from_state, init_config
from src.models.moe import moe_layers

POLICY_KEYS = ("auto_wrap_policy", "activation_checkpointing_policy")
BLOCK_CLASS_NAMES = ("FluxTransformerBlock", "FluxSingleTransformerBlock", "FluxMoESingleTransformerBlock")
MODEL_CLASS_NAMES = ("FluxTransformer2DModel",)


def _flux_class(name: str) -> type[nn.Module] | None:
    known = {
        "FluxTransformerBlock": FluxTransformerBlock,
        "FluxSingleTransformerBlock": FluxSingleTransformerBlock,
        "FluxMoESingleTransformerBlock": FluxMoESingleTransformerBlock,
        "FluxTransformer2DModel": FluxTransformer2DModel,
    }
    return known.get(name)


def _import(path: str, field: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"{field}={path!r}: cannot be imported; allowed: a known name or a dotted path") from None


def block_classes() -> set[type[nn.Module]]:
    """The FLUX transformer block classes: FSDP units and activation-checkpointing targets."""
    return {_flux_class(name) for name in BLOCK_CLASS_NAMES}


def policy_classes(value: str | list[str], field: str) -> set[type[nn.Module]]:
    """``"blocks"`` or a list of class names → module classes (FSDP wrap or activation-checkpointing policy)."""
    if value == "blocks":
        names = BLOCK_CLASS_NAMES + (MODEL_CLASS_NAMES if field.endswith("auto_wrap_policy") else ())
    elif isinstance(value, list | tuple) and value and all(isinstance(v, str) for v in value):
        names = tuple(value)
    else:
        raise ValueError(f"{field}={value!r}: allowed 'blocks' or a non-empty list of module class names")
    classes = set()
    for name in names:
        cls = _flux_class(name) or _import(name, field)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(f"{field}: {name!r} is not a torch.nn.Module class")
        classes.add(cls)
    return classes


def _strategy_class(path: str) -> type:
    cls = getattr(lightning_strategies, path, None) if "." not in path else _import(path, "strategy.class_path")
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ValueError(
            f"strategy.class_path={path!r}: not a Lightning strategy; allowed e.g. FSDPStrategy, DDPStrategy or a "
            "dotted path to a lightning.pytorch.strategies.Strategy subclass"
        )
    return cls


def _init_args(strategy: dict[str, Any]) -> dict[str, Any]:
    unknown = set(strategy) - {"class_path", "init_args"}
    if unknown or not isinstance(strategy.get("class_path"), str):
        raise ValueError(
            f"strategy={strategy!r}: a mapping needs 'class_path' (a string) and optionally 'init_args'; "
            f"unknown keys {sorted(unknown)}"
        )
    args = strategy.get("init_args") or {}
    if not isinstance(args, dict):
        raise ValueError(f"strategy.init_args={args!r}: must be a mapping of keyword arguments")
    return dict(args)


def _mixed_precision(value: dict[str, str]) -> Any:
    if not isinstance(value, dict):
        raise ValueError(f"strategy.init_args.mixed_precision={value!r}: must map param/reduce/buffer_dtype to names")
    dtypes = {}
    for key, name in value.items():
        if key not in ("param_dtype", "reduce_dtype", "buffer_dtype") or name not in DTYPES:
            raise ValueError(
                f"strategy.init_args.mixed_precision.{key}={name!r}: allowed keys param_dtype, reduce_dtype, "
                f"buffer_dtype with values {', '.join(DTYPES)}"
            )
        dtypes[key] = DTYPES[name]
    return MixedPrecision(**dtypes)


def resolve_init_args(strategy: dict[str, Any]) -> tuple[type, dict[str, Any]]:
    """(strategy class, keyword arguments with policies and mixed precision turned into objects)."""
    args = _init_args(strategy)
    cls = _strategy_class(strategy["class_path"])
    for key in POLICY_KEYS:
        if key in args and args[key] is not None:
            args[key] = policy_classes(args[key], f"strategy.init_args.{key}")
    if args.get("mixed_precision") is not None:
        args["mixed_precision"] = _mixed_precision(args["mixed_precision"])
    return cls, args


def check_strategy(strategy: Any, stage_kind: str | None = None) -> None:
    """Raise ``ValueError`` for a ``strategy`` value that cannot become a Lightning strategy (nothing is built).

    FSDP is refused for ``mob_kd``: MoB routes per sample, so ranks skip different blocks, and FSDP gathers each
    block's shards with a collective only the ranks running that block would join (a deadlock).
    """
    if fsdp_spec(strategy) and stage_kind == "mob_kd":
        raise ValueError(
            "strategy: FSDP cannot run a mob_kd stage (ranks skip different blocks, so FSDP's per-block gathers "
            "would deadlock); allowed: ddp (find_unused_parameters is set for you) or a single device"
        )


def fsdp_spec(strategy: Any) -> bool:
    """Whether a stage's ``strategy`` value (a name or {class_path, init_args}) describes FSDP."""
    if isinstance(strategy, str):
        return strategy.startswith("fsdp")  # Lightning validates names when the Trainer is built
    if isinstance(strategy, dict):
        return issubclass(resolve_init_args(strategy)[0], FSDPStrategy)
    raise ValueError(f"strategy={strategy!r}: allowed a Lightning strategy name or {{class_path, init_args}}")


def build_strategy(strategy: str | dict[str, Any], stage_kind: str | None = None) -> Any:
    """The ``strategy`` argument for ``lightning.Trainer``: a name, or the strategy object a mapping describes.

    Plain "ddp" for a ``mob_kd`` stage becomes "ddp_find_unused_parameters_true": a MoB block that no sample of a
    rank's batch chose gets no gradient there (src/models/mob.py).
    """
    if isinstance(strategy, str):
        return "ddp_find_unused_parameters_true" if strategy == "ddp" and stage_kind == "mob_kd" else strategy
    cls, args = resolve_init_args(strategy)
    return cls(**args)


def is_fsdp(strategy: Any) -> bool:
    """Whether a Trainer's strategy is Lightning's FSDP (parameters sharded across ranks after ``fit``)."""
    return isinstance(strategy, FSDPStrategy)


def has_fsdp_units(module: nn.Module) -> bool:
    """Whether FSDP wrapped parts of ``module`` in place (their parameters are then shards, not weights)."""
    return any(isinstance(m, FSDP) for m in module.modules())


def launched_num_nodes() -> int:
    """Nodes of a torchrun or SLURM launch (``Trainer(num_nodes=...)`` must match it), 1 otherwise."""
    if "LOCAL_WORLD_SIZE" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        return max(1, int(os.environ["WORLD_SIZE"]) // int(os.environ["LOCAL_WORLD_SIZE"]))
    if SLURMEnvironment.detect():  # srun tasks (not an interactive allocation's shell)
        return int(os.environ.get("SLURM_NNODES", 1))
    return 1


def is_main_rank() -> bool:
    """Whether this process is global rank 0 (also before the process group exists: torchrun's RANK, SLURM's
    SLURM_PROCID or Lightning's LOCAL_RANK for the processes it launches)."""
    return getattr(rank_zero_only, "rank", 0) == 0


def rank_barrier() -> None:
    """Wait for every rank (a no-op without an initialised process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def full_student(trainer: Any, student: nn.Module) -> nn.Module:
    """A whole copy of the student FSDP trained, built on rank 0 from the gathered weights; other ranks get
    ``student`` back (its parameters are their shards). A collective: every rank calls it.
    """
    root = trainer.strategy.model
    # offloading to the CPU when the shards already are there crashes torch 2.13's FSDP
    offload = trainer.strategy.root_device.type != "cpu"
    config = FullStateDictConfig(offload_to_cpu=offload, rank0_only=True)
    with FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT, config):
        state = root.state_dict()
    if trainer.global_rank != 0:
        return student
    state = {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}
    if isinstance(student, FluxMoETransformer2DModel):
        whole = build_from_state(init_config(student), state, "cpu")
    else:
        with torch.device("meta"):
            whole = type(student).from_config(student.config)
        whole.load_state_dict(state, strict=True, assign=True)
    for old, new in zip(moe_layers(student), moe_layers(whole)):
        new.top_k = old.top_k
    return whole.train()
