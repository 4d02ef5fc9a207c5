"""Named FluxTransformer2DModel configs: the real FLUX.1-dev and the tiny embedded-world teacher.

Build any of them on the meta device for accounting without allocating memory:
``with torch.device("meta"): FluxTransformer2DModel(**PRESETS["flux-dev"])``.
"""

from __future__ import annotations

from typing import Any

FLUX_DEV_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
"""FLUX.1-dev transformer (11,901,408,320 parameters; docs/design.md §4.3)."""

TINY_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 48,
    "num_layers": 2,
    "num_single_layers": 4,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 64,
    "guidance_embeds": False,
    "axes_dims_rope": (4, 6, 6),
}
"""Tiny FLUX for the shapes world (docs/design.md §5.3): hidden 64, 2 double + 4 single blocks, 4×4×3 RGB patches."""

TEACHER_TINY_CONFIG: dict[str, Any] = {
    **TINY_CONFIG,
    "in_channels": 192,
    "num_layers": 4,
    "num_single_layers": 8,
    "attention_head_dim": 32,
    "axes_dims_rope": (8, 12, 12),
}
"""The committed shapes-world teacher (experiments/teacher_tiny.yaml): hidden 128, 4 double + 8 single blocks,
8×8×3 RGB patches (one token per cell of the cell-layout world)."""

PRESETS: dict[str, dict[str, Any]] = {
    "flux-dev": FLUX_DEV_CONFIG,
    "tiny": TINY_CONFIG,
    "teacher-tiny": TEACHER_TINY_CONFIG,
}


def flux_config(name: str) -> dict[str, Any]:
    """A copy of the named preset's FluxTransformer2DModel kwargs."""
    if name not in PRESETS:
        raise ValueError(f"preset {name!r}: unknown; allowed: {sorted(PRESETS)}")
    return dict(PRESETS[name])
