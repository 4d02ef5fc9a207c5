"""How a student's structure differs from its dense teacher, as small config objects.

A converted or pruned FLUX transformer is the dense architecture plus up to four independent changes, each with
its own object here: MoE feed-forwards at some FFN locations (`MoEPlacement`), FFNs narrowed by width pruning
(`WidthPruning`), blocks removed by depth pruning (`DepthPruning`, the teacher indices kept) and Mixture-of-Blocks
groups (`MoBConfig`). `StudentStructure` holds the four and is what `FluxMoETransformer2DModel` is built from.

diffusers saves a model's constructor kwargs as its config.json, and those must be JSON values, so the model keeps
the flat keys (`moe`, `moe_locations`, `mob`, `ffn_widths`, `kept_double`, `kept_single`) as its registered config
and `StudentStructure.from_config` parses and validates them (one `ValueError` naming the key).

FFN locations: "ff" (image stream of a double block), "ff_context" (text stream of a double block), "single" (the
MLP branch of a single-stream block).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from src.models.mob import MoBConfig
from src.models.moe import MoEConfig, layout_widths

LOCATIONS = ("ff", "ff_context", "single")
"""FFN locations that can be converted or width-pruned."""

STREAMS = {"ff": "transformer_blocks", "ff_context": "transformer_blocks", "single": "single_transformer_blocks"}
"""The block list of the model that holds each FFN location."""


@dataclass(frozen=True)
class MoEPlacement:
    """Which FFNs are MoE layers, and the one layer config they share."""

    layer: MoEConfig
    """The MoE layer config, with the expert widths resolved from the dense FFN width where the config left them
    unset."""
    locations: tuple[str, ...]
    """FFN locations converted to MoE (a subset of `LOCATIONS`)."""


@dataclass(frozen=True)
class WidthPruning:
    """FFNs kept at a fraction of their width (every block of a location keeps the same number of neurons)."""

    ffn_widths: dict[str, int]
    """Kept FFN width per location, e.g. {"ff": 4608, "ff_context": 4608, "single": 4608}."""


@dataclass(frozen=True)
class DepthPruning:
    """Blocks kept from the teacher: the student's block i of a stream is the teacher's block kept[i]."""

    kept_double: tuple[int, ...] | None
    """Teacher indices of the double-stream blocks kept (None: all of them)."""
    kept_single: tuple[int, ...] | None
    """Teacher indices of the single-stream blocks kept (None: all of them)."""


@dataclass(frozen=True)
class StudentStructure:
    """Everything that makes a student differ from the dense FLUX transformer of the same block counts."""

    moe: MoEPlacement | None = None
    """MoE feed-forwards (None: every FFN is dense)."""
    width: WidthPruning | None = None
    """Width-pruned FFNs (None: dense FFNs keep diffusers' width)."""
    depth: DepthPruning | None = None
    """Teacher blocks kept by depth pruning (None: the model was not depth-pruned)."""
    mob: MoBConfig | None = None
    """Mixture-of-Blocks groups (None: every block runs)."""

    @classmethod
    def from_config(
        cls,
        *,
        moe: dict[str, Any] | None,
        moe_locations: list[str] | None,
        mob: dict[str, Any] | None,
        ffn_widths: dict[str, int] | None,
        kept_double: list[int] | None,
        kept_single: list[int] | None,
        num_layers: int,
        num_single_layers: int,
        dense_width: int,
    ) -> StudentStructure:
        """Parse and validate the model's flat config keys; `dense_width` resolves unset expert widths."""
        if moe is None:
            if moe_locations:
                raise ValueError(f"moe_locations={moe_locations!r}: needs `moe` (the MoE layer config) to be set")
            locations: list[str] = []
        else:
            locations = list(LOCATIONS) if moe_locations is None else list(moe_locations)
        for loc in locations:
            if loc not in LOCATIONS:
                raise ValueError(f"moe_locations: unknown location {loc!r}; allowed {list(LOCATIONS)}")
        for loc, width in (ffn_widths or {}).items():
            if loc not in LOCATIONS:
                raise ValueError(f"ffn_widths: unknown location {loc!r}; allowed {list(LOCATIONS)}")
            if loc in locations:
                raise ValueError(f"ffn_widths: location {loc!r} is also in moe_locations; a location is MoE or dense")
            if int(width) != width or width < 1:
                raise ValueError(f"ffn_widths[{loc!r}]={width!r}: must be a positive integer")
        for name, kept, num in (
            ("kept_double", kept_double, num_layers),
            ("kept_single", kept_single, num_single_layers),
        ):
            if kept is not None and len(kept) != num:
                raise ValueError(f"{name}: has {len(kept)} entries, the model has {num} blocks in that stream")
        return cls(
            moe=MoEPlacement(_resolve_widths(MoEConfig(**moe), dense_width), tuple(locations)) if locations else None,
            width=WidthPruning({loc: int(w) for loc, w in ffn_widths.items()}) if ffn_widths else None,
            depth=(
                DepthPruning(_as_tuple(kept_double), _as_tuple(kept_single))
                if kept_double is not None or kept_single is not None
                else None
            ),
            mob=MoBConfig(**mob) if mob is not None else None,
        )


def _as_tuple(kept: list[int] | None) -> tuple[int, ...] | None:
    return None if kept is None else tuple(int(i) for i in kept)


def _resolve_widths(cfg: MoEConfig, ffn_width: int) -> MoEConfig:
    """`cfg` with the unset widths of the experts it has derived from the dense FFN width (`layout_widths`)."""
    need_shared = cfg.num_shared > 0 and cfg.shared_width is None
    need_expert = cfg.num_experts > 0 and cfg.expert_width is None
    if not (need_shared or need_expert):
        return cfg
    shared_width, expert_width = layout_widths(ffn_width, cfg.num_shared, cfg.num_experts)
    return dataclasses.replace(
        cfg,
        shared_width=shared_width if need_shared else cfg.shared_width,
        expert_width=expert_width if need_expert else cfg.expert_width,
    )


__all__ = ["LOCATIONS", "STREAMS", "MoEPlacement", "WidthPruning", "DepthPruning", "StudentStructure"]
