"""Named DiT configs: the DSMoE / JiTMoE recipe's table (arXiv 2512.01252), its dense and DiffMoE-style
baselines, and CPU-sized "-mini" versions for the embedded class-conditional shapes world.

Recipe dims, experts, top-k, expert widths and route scales are those of the released configs
(docs/design.md §3.3): one shared expert as wide as a routed one, SwiGLU experts, sigmoid gates with
top-k renormalisation, MoE in every other block, 2D RoPE only (DSMoE) or sin-cos + RoPE (JiT). The recipe's
code never updates its balancing bias; these presets use the aux-loss-free update (``balance="aux_free"``).

Units: the recipe's README quotes DSMoE/JiTMoE activated parameters in units of 2^20 ("33M" is 34.9e6) and
its dense/DiffMoE baselines in decimal. ``PUBLISHED_ACTIVATED_MIB`` keeps the former as printed;
``python -m src.cli params --preset all`` prints both units side by side.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from src.models.dit import DiT, DiTConfig, param_counts
from src.models.moe import MoEConfig

MIB = 2**20

_LATENT = {"image_size": 32, "in_channels": 4, "patch_size": 2, "num_classes": 1000, "learn_sigma": True}
_DSMOE = {**_LATENT, "positions": "rope2d", "dense_activation": "silu", "timestep_scale": 1.0}
_DIT = {**_LATENT, "positions": "absolute", "dense_activation": "gelu_tanh"}
_JIT = {
    "image_size": 256,
    "in_channels": 3,
    "patch_size": 16,
    "num_classes": 1000,
    "positions": "absolute+rope2d",
    "norm": "rmsnorm",
    "qk_norm": True,
    "patch_bottleneck": 128,
    "in_context_tokens": 32,
    "dense_activation": "swiglu",
    "prediction": "x",
}
# The embedded world: 32×32 RGB, 4×4-pixel patches (64 tokens), 24 classes (shape × colour).
_MINI = {"image_size": 32, "in_channels": 3, "patch_size": 4, "num_classes": 24, "positions": "rope2d"}


def recipe_moe(
    num_experts: int, top_k: int, width: int, route_scale: float, up_bias: bool = False, bias_rate: float = 1e-3
) -> MoEConfig:
    """The recipe's layer: 1 shared + E routed SwiGLU experts of one width, sigmoid, renormalised, scaled.

    ``bias_rate`` is the aux-loss-free step γ: DeepSeek-V3's 1e-3 suits long runs; the few-thousand-step CPU
    runs use 1e-2, because at 1e-3 the routers collapse onto one expert faster than the bias can follow (a 400-step
    pilot of dsmoe-s-e48-mini sat at max/mean load ≈ 8 of a possible 9.6).
    """
    return MoEConfig(
        num_experts=num_experts,
        top_k=top_k,
        num_shared=1,
        expert_width=width,
        shared_width=width,
        activation="swiglu",
        gate="sigmoid",
        renormalize=True,
        route_scale=route_scale,
        balance="aux_free",
        bias_update_rate=bias_rate,
        router_init="normal",
        up_bias=up_bias,
    )


def _dsmoe(hidden: int, depth: int, heads: int, experts: int, top_k: int, width: int, scale: float) -> dict:
    return {**_DSMOE, "hidden": hidden, "depth": depth, "heads": heads, "moe": recipe_moe(experts, top_k, width, scale)}


def _jitmoe(hidden: int, depth: int, heads: int, width: int, context_start: int) -> dict:
    moe = recipe_moe(16, 2, width, 2.5, up_bias=True)  # JiTMoE's SwiGLU experts keep their biases
    return {**_JIT, "hidden": hidden, "depth": depth, "heads": heads, "moe": moe, "in_context_start": context_start}


# DiffMoE-style baseline: interleaved E16 full-width (4D) tanh-GELU experts with biases, about one expert per
# token. DiffMoE itself routes expert-choice over a batch-level token pool with a capacity predictor; this layer
# is token-choice top-1 with the Switch/GShard aux loss, so only its layout and activated size match (overriding
# moe with routing="expert_choice", balance="none" gives DiffMoE's batch pool, without the capacity predictor).
_DIFFMOE_LAYER = {"num_experts": 16, "top_k": 1, "num_shared": 0, "activation": "gelu_tanh", "balance": "aux"}


def _diffmoe(hidden: int, depth: int, heads: int) -> dict:
    moe = MoEConfig(**_DIFFMOE_LAYER, expert_width=4 * hidden, router_init="normal")
    return {**_DIT, "hidden": hidden, "depth": depth, "heads": heads, "moe": moe}


PRESETS: dict[str, dict[str, Any]] = {
    # DSMoE (latent, ImageNet 256 → 32×32×4 SD-VAE latents, patch 2)
    "dsmoe-s-e16": _dsmoe(384, 10, 6, 16, 2, 768, 2.0),
    "dsmoe-s-e48": _dsmoe(384, 12, 6, 48, 5, 128, 2.5),
    "dsmoe-b-e16": _dsmoe(768, 10, 12, 16, 2, 1536, 2.0),
    "dsmoe-b-e48": _dsmoe(768, 12, 12, 48, 5, 256, 2.5),
    "dsmoe-l-e16": _dsmoe(1024, 20, 16, 16, 2, 2048, 2.0),
    "dsmoe-l-e48": _dsmoe(1024, 24, 16, 48, 5, 448, 2.5),
    "dsmoe-3b-e16": _dsmoe(1152, 30, 16, 16, 2, 2880, 2.0),
    # JiTMoE (pixel space 256×256, patch 16, x-prediction)
    "jitmoe-b16-e16": _jitmoe(768, 10, 12, 1536, 4),
    "jitmoe-l16-e16": _jitmoe(1024, 20, 16, 2048, 8),
    # dense baselines
    "dit-s": {**_DIT, "hidden": 384, "depth": 12, "heads": 6},
    "dit-b": {**_DIT, "hidden": 768, "depth": 12, "heads": 12},
    "dit-l": {**_DIT, "hidden": 1024, "depth": 24, "heads": 16},
    "jit-b16": {**_JIT, "hidden": 768, "depth": 12, "heads": 12, "in_context_start": 4},
    "jit-l16": {**_JIT, "hidden": 1024, "depth": 24, "heads": 16, "in_context_start": 8},
    # DiffMoE-style baselines (see _DIFFMOE_LAYER)
    "diffmoe-s-e16": _diffmoe(384, 12, 6),
    "diffmoe-b-e16": _diffmoe(768, 12, 12),
    "diffmoe-l-e16": _diffmoe(1024, 24, 16),
    # Embedded shapes world, trainable on 2 CPU cores. dit-s-mini's dense FFN width int(96·3.615) = 347 makes
    # its activated parameters equal dsmoe-s-e48-mini's within 0.01 % (tests/test_dit.py checks it).
    "dsmoe-s-e48-mini": {
        **_MINI,
        "hidden": 96,
        "depth": 6,
        "heads": 4,
        "moe": recipe_moe(48, 5, 32, 2.5, bias_rate=1e-2),
    },
    "dsmoe-s-e16-mini": {
        **_MINI,
        "hidden": 96,
        "depth": 5,
        "heads": 4,
        "moe": recipe_moe(16, 2, 192, 2.0, bias_rate=1e-2),
    },
    "dit-s-mini": {**_MINI, "hidden": 96, "depth": 6, "heads": 4, "mlp_ratio": 3.615},
    "jitmoe-mini": {
        **_JIT,
        **_MINI,
        "positions": "absolute+rope2d",
        "hidden": 96,
        "depth": 6,
        "heads": 4,
        "patch_bottleneck": 32,
        "in_context_tokens": 4,
        "in_context_start": 2,
        "moe": recipe_moe(16, 2, 192, 2.5, up_bias=True, bias_rate=1e-2),
    },
}
"""Preset name → DiTConfig keyword arguments."""

PUBLISHED_ACTIVATED_MIB: dict[str, int] = {
    "dsmoe-s-e16": 33,
    "dsmoe-s-e48": 30,
    "dsmoe-b-e16": 132,
    "dsmoe-b-e48": 118,
    "dsmoe-l-e16": 465,
    "dsmoe-l-e48": 436,
    "dsmoe-3b-e16": 965,
    "jitmoe-b16-e16": 133,
    "jitmoe-l16-e16": 465,
}
"""The recipe README's "# Act. Params" in its units of 2^20 parameters."""

PUBLISHED_ACTIVATED_DECIMAL: dict[str, float] = {
    "dit-s": 33e6,
    "dit-l": 458e6,
    "jit-b16": 131e6,
    "jit-l16": 459e6,
    "diffmoe-s-e16": 32e6,
    "diffmoe-b-e16": 130e6,
    "diffmoe-l-e16": 458e6,
}
"""Baselines as the recipe's README quotes them (decimal units)."""


def dit_config(preset: str, **overrides: Any) -> DiTConfig:
    """The named preset with fields replaced; ``moe`` may be a dict of MoEConfig fields merged into the preset's
    layout, a MoEConfig, or None (dense)."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: allowed presets are {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(DiTConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(
            f"model overrides {sorted(unknown)}: not DiTConfig fields; allowed: {', '.join(sorted(fields))}"
        )
    kwargs = dict(PRESETS[preset])
    moe = overrides.pop("moe", kwargs.get("moe"))
    if isinstance(moe, dict):
        base = kwargs.get("moe")
        moe = dataclasses.replace(base, **moe) if base is not None else MoEConfig(**moe)
    return DiTConfig(**{**kwargs, **overrides, "moe": moe})


def preset_params(preset: str, **overrides: Any) -> dict[str, int]:
    """Total and activated trainable parameters of a preset, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = DiT(dit_config(preset, **overrides))
    return param_counts(model)


def params_table(presets: list[str]) -> str:
    """Markdown table: decimal counts, the same in 2^20 units, and the recipe's published figure."""
    lines = [
        "| preset | total | activated | total / 2^20 | activated / 2^20 | published activated |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in presets:
        counts = preset_params(name)
        if name in PUBLISHED_ACTIVATED_MIB:
            published = f"{PUBLISHED_ACTIVATED_MIB[name]}M (2^20 units)"
        elif name in PUBLISHED_ACTIVATED_DECIMAL:
            published = f"{PUBLISHED_ACTIVATED_DECIMAL[name] / 1e6:.0f}M (decimal)"
        else:
            published = "—"
        lines.append(
            f"| {name} | {counts['total']:,} | {counts['activated']:,} | "
            f"{counts['total'] / MIB:.1f} | {counts['activated'] / MIB:.1f} | {published} |"
        )
    return "\n".join(lines)
