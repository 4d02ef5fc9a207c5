"""The one student builder: teacher → (width or depth pruning) → (MoE conversion) → (MoB groups), on any device.

Used by the training runner (real weights), ``params`` (a teacher on the meta device: structure only, no memory),
``export`` and the tests. Every step goes through ``build_from_state``: the new model is built with its parameters
on the meta device and takes the tensors it was handed, so nothing is randomly initialised and only what is loaded
is materialised. MoB routers, the only new weights, are built for real (they are small: 3·D·m per group).
A FLUX.1-dev student made by ``from_config`` would first allocate ≈ 48 GB of random fp32 weights on the host.

Precision: the builder keeps the dtypes of the tensors it is given (a bf16 teacher gives a bf16 copy); the stage
that trains the student casts it (``src/training/precision.py``: trained parameters fp32, frozen ones in the
compute dtype) one parameter at a time, so the peak stays near the final size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from src.models.convert import ConversionConfig, convert_flux_to_moe
from src.models.flux_moe import FluxMoETransformer2DModel, build_from_state, dense_ffns, init_config
from src.models.mob import MoBConfig, build_mob_groups, mob_groups
from src.models.moe import moe_layers
from src.models.prune import blocks_to_remove, depth_prune, width_prune


class PruneLike(Protocol):
    """What the builder reads of a pruning spec (``src.training.experiment.PruneSpec``)."""

    kind: str
    ffn_fraction: float
    keep_double: int | None
    keep_single: int | None


@dataclass
class StudentRecipe:
    """How a student is made from a dense teacher."""

    conversion: ConversionConfig | None = None
    """Dense → MoE conversion (None: the student stays dense)."""
    prune: Any = None
    """A ``PruneSpec`` (kind "width" or "depth") applied to the teacher copy before conversion, or None."""
    mob: MoBConfig | None = None
    """Mixture-of-Blocks groups to add (None: none; the runner adds them before the first mob_kd stage)."""


def dense_ffn_width(model: nn.Module) -> int:
    """Hidden width F of the model's dense FFNs (FLUX: 4·D = 12288); ValueError if it has none or they differ."""
    widths = {ffn.up.out_features for ffn in dense_ffns(model).values()}
    if len(widths) != 1:
        raise ValueError(f"the model's dense FFN widths are {sorted(widths)}; expected exactly one width")
    return widths.pop()


def build_student(
    teacher: nn.Module,
    recipe: StudentRecipe,
    scores: dict[str, torch.Tensor] | None = None,
    block_importance: dict[str, torch.Tensor] | None = None,
) -> FluxMoETransformer2DModel:
    """The student of ``recipe`` from ``teacher`` (left unchanged), on the teacher's device and in its dtypes.

    ``scores`` (Taylor, per FFN) are needed by width pruning and by Taylor-split conversion; ``block_importance``
    (``block_importance_mse``) ranks blocks for depth pruning (None: the fixed pattern). On a meta teacher the
    result is a meta student (pass structure-only scores, e.g. ``arange``).
    """
    prune, conv = recipe.prune, recipe.conversion
    model = teacher
    if prune is not None and prune.kind == "width":
        width = max(1, round(prune.ffn_fraction * dense_ffn_width(teacher)))
        model = width_prune(teacher, scores, width=width)
    elif prune is not None:
        nd, ns = len(teacher.transformer_blocks), len(teacher.single_transformer_blocks)
        keep_d, keep_s = prune.keep_double or nd, prune.keep_single or ns
        importance = block_importance or {}
        model = depth_prune(
            teacher,
            blocks_to_remove(nd, keep_d, importance.get("double")),
            blocks_to_remove(ns, keep_s, importance.get("single")),
        )
    if conv is not None:
        model = convert_flux_to_moe(model, conv, scores if model is teacher else None)
    elif model is teacher:  # a dense student: a copy of the teacher in the student class
        state = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
        model = build_from_state(init_config(teacher), state, _device(teacher))
    if recipe.mob is not None:
        model = with_mob(model, recipe.mob)
    return model.train()


def with_mob(student: nn.Module, mob: MoBConfig) -> FluxMoETransformer2DModel:
    """The same student with MoB groups (fresh routers) over its blocks; it takes ``student``'s tensors (no copy),
    so ``student`` must not be used afterwards."""
    if mob_groups(student):
        raise ValueError("mob: the student already has MoB groups")
    config = init_config(student) | {"mob": mob.to_dict()}
    device = _device(student)
    dtype = next(student.parameters()).dtype
    with torch.device(device):
        groups = build_mob_groups(
            mob, len(student.transformer_blocks), len(student.single_transformer_blocks), student.inner_dim
        ).to(dtype)
    state = dict(student.state_dict()) | {f"mob_groups.{k}": v for k, v in groups.state_dict().items()}
    grouped = build_from_state(config, state, device)
    for src_layer, dst_layer in zip(moe_layers(student), moe_layers(grouped)):
        dst_layer.top_k = src_layer.top_k
    return grouped.train()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (its own size in memory)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


__all__ = ["StudentRecipe", "build_student", "dense_ffn_width", "tensor_bytes", "with_mob"]
