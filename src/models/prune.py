"""Pruning baselines in the same model class: width pruning (Diff-Pruning-style) and depth pruning (block removal).

Paper comparisons (Dense2MoE, via notes): Diff-Pruning at activated FFN ratio 1.5 (GenEval 0.4113 vs MoE 0.5728);
at 9 double + 26 single active blocks, FLUX.1-Lite-style removal 0.0926, BK-SDM 0.3450, MoB 0.4956.
Both return a `FluxMoETransformer2DModel`: width-pruned FFNs are dense FFNs of the kept width (config
`ffn_widths`), depth-pruned models record which teacher blocks they kept (`kept_double`, `kept_single`) so block
features can be matched to the teacher's.

Legend: B batch, L tokens, D model width, F FFN width, W kept FFN width, N blocks in a stream.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from diffusers import FluxTransformer2DModel

from src.models.flux_moe import (
    FluxMoETransformer2DModel,
    build_from_state,
    check_locations,
    dense_ffns,
    init_config,
    location_of,
)
from src.models.student_structure import LOCATIONS

STREAM_PREFIXES = {"double": "transformer_blocks", "single": "single_transformer_blocks"}


def width_prune(
    model: FluxTransformer2DModel,
    scores: dict[str, torch.Tensor],
    width: int,
    locations: Sequence[str] = LOCATIONS,
) -> FluxMoETransformer2DModel:
    """Keep the `width` highest-Taylor-score neurons of every dense FFN at `locations` (Diff-Pruning-style).

    Paper baseline at the MoE's activated FFN ratio: width = 1.5·D for FLUX (1S12E2A activates 1.5 of 4).
    """
    check_locations(model, locations)
    ffns = dense_ffns(model, locations)
    for loc in locations:
        if not any(location_of(name) == loc for name in ffns):
            raise ValueError(f"locations: {loc!r} has no dense FFNs to prune (already MoE)")
    for name, ffn in ffns.items():
        if not 1 <= width <= ffn.up.out_features:
            raise ValueError(f"width={width}: allowed 1..{ffn.up.out_features} (the FFN width of {name})")
        if name not in scores:
            raise ValueError(f"scores: no entry for {name!r}")

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, ffn in ffns.items():
        keep_W = torch.topk(scores[name].float().cpu(), width, sorted=False).indices.sort().values
        keep_W = keep_W.to(ffn.up.weight.device)
        up, down = _param_prefix(model, ffn.up), _param_prefix(model, ffn.down)
        state[up + "weight"] = ffn.up.weight.detach()[keep_W].contiguous()
        state[up + "bias"] = ffn.up.bias.detach()[keep_W].contiguous()
        w_down = ffn.down.weight.detach()
        if ffn.fused:
            # proj_out reads cat[attn (D), mlp hidden (F)]: keep the attention columns and the kept MLP columns.
            dim = ffn.down.out_features
            state[down + "weight"] = torch.cat([w_down[:, :dim], w_down[:, dim + keep_W]], dim=1)
        else:
            state[down + "weight"] = w_down[:, keep_W].contiguous()

    config = init_config(model)
    config["ffn_widths"] = {**(config.get("ffn_widths") or {}), **{loc: width for loc in locations}}
    return build_from_state(config, state, model.device).train(model.training)


def _param_prefix(model: torch.nn.Module, module: torch.nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name + "."
    raise AssertionError("module not in model")


@torch.no_grad()
def block_importance_mse(model: FluxTransformer2DModel, batches: Iterable[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Per-block MSE between its input and output hidden states (text + image tokens), averaged over `batches`.

    FLUX.1-Lite's criterion: a block whose output barely differs from its input can be removed. `batches` are
    keyword arguments of the model's forward (hidden_states, encoder_hidden_states, pooled_projections, timestep,
    img_ids, txt_ids[, guidance]); spread them over timesteps. Returns {"double": (N_d,), "single": (N_s,)}.
    """
    if getattr(model.config, "mob", None) is not None:
        raise ValueError("block_importance_mse: model has MoB groups (config `mob`); score the dense model")
    streams = {"double": model.transformer_blocks, "single": model.single_transformer_blocks}
    totals = {s: torch.zeros(len(blocks), dtype=torch.float64) for s, blocks in streams.items()}
    inputs: dict[int, torch.Tensor] = {}
    handles = []

    def pre_hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        context = args[1] if len(args) > 1 else kwargs["encoder_hidden_states"]
        inputs[id(module)] = torch.cat([context, hidden], dim=1)

    def make_post_hook(stream: str, index: int):
        def post_hook(module, args, kwargs, output):
            x_in_BLD = inputs.pop(id(module))
            x_out_BLD = torch.cat([output[0], output[1]], dim=1)
            totals[stream][index] += (x_out_BLD - x_in_BLD).float().square().mean().item()

        return post_hook

    for stream, blocks in streams.items():
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(block.register_forward_hook(make_post_hook(stream, i), with_kwargs=True))
    num_batches = 0
    try:
        for batch in batches:
            model(**batch)
            num_batches += 1
    finally:
        for handle in handles:
            handle.remove()
    if num_batches == 0:
        raise ValueError("block_importance_mse: `batches` was empty; give at least one calibration batch")
    return {s: (t / num_batches).float() for s, t in totals.items()}


def blocks_to_remove(num_blocks: int, keep: int, importance: torch.Tensor | None = None) -> list[int]:
    """Indices to remove so that `keep` of `num_blocks` blocks remain.

    With `importance` (from `block_importance_mse`): keep the blocks with the largest input→output change
    (FLUX.1-Lite). Without: a fixed, data-free pattern in the spirit of BK-SDM: keep evenly spaced blocks, always
    the first and the last of the stream.
    """
    if not 0 <= keep <= num_blocks:
        raise ValueError(f"keep={keep}: allowed 0..{num_blocks} (blocks in the stream)")
    if importance is not None:
        if importance.shape != (num_blocks,):
            raise ValueError(f"importance: shape {tuple(importance.shape)}, expected ({num_blocks},)")
        kept = torch.topk(importance.float(), keep).indices.tolist()
    elif keep == 1:
        kept = [0]
    else:
        kept = torch.linspace(0, num_blocks - 1, keep).round().long().tolist() if keep else []
    return sorted(set(range(num_blocks)) - set(kept))


def depth_prune(
    model: FluxTransformer2DModel,
    remove_double: Sequence[int] = (),
    remove_single: Sequence[int] = (),
) -> FluxMoETransformer2DModel:
    """A copy of `model` without the given double/single blocks; `kept_double`/`kept_single` record teacher indices.

    Pick the indices with `blocks_to_remove` (MSE-ranked or the fixed pattern) or by hand.
    """
    config = init_config(model)
    if config.get("mob") is not None:
        raise ValueError("depth_prune: model has MoB groups (config `mob`); prune before adding MoB")
    kept: dict[str, list[int]] = {}
    for stream, remove, field in (
        ("double", remove_double, "remove_double"),
        ("single", remove_single, "remove_single"),
    ):
        num = len(getattr(model, STREAM_PREFIXES[stream]))
        remove = [int(i) for i in remove]
        if len(remove) > num:
            raise ValueError(f"{field}: removes {len(remove)} blocks, the model has {num} {stream} blocks")
        if len(set(remove)) != len(remove) or any(not 0 <= i < num for i in remove):
            raise ValueError(f"{field}={remove}: indices must be distinct and in 0..{num - 1}")
        kept[stream] = [i for i in range(num) if i not in set(remove)]

    pattern = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.*)$")
    new_index = {s: {old: new for new, old in enumerate(kept[s])} for s in kept}
    stream_of = {prefix: stream for stream, prefix in STREAM_PREFIXES.items()}
    state = {}
    for key, value in model.state_dict().items():
        match = pattern.match(key)
        if match is None:
            state[key] = value.detach().clone()
            continue
        stream = stream_of[match[1]]
        index = new_index[stream].get(int(match[2]))
        if index is not None:
            state[f"{match[1]}.{index}.{match[3]}"] = value.detach().clone()

    teacher_double = config.get("kept_double") or list(range(len(model.transformer_blocks)))
    teacher_single = config.get("kept_single") or list(range(len(model.single_transformer_blocks)))
    config |= {
        "num_layers": len(kept["double"]),
        "num_single_layers": len(kept["single"]),
        "kept_double": [teacher_double[i] for i in kept["double"]],
        "kept_single": [teacher_single[i] for i in kept["single"]],
    }
    return build_from_state(config, state, model.device).train(model.training)


__all__ = ["width_prune", "block_importance_mse", "blocks_to_remove", "depth_prune"]
