"""The converted student: diffusers' FLUX transformer with MoE feed-forwards, narrowed FFNs or removed blocks.

`FluxMoETransformer2DModel` subclasses `FluxTransformer2DModel` and is built from a `StudentStructure`
(src/models/student_structure.py): MoE placement, width pruning, depth pruning and MoB groups, each a small config
object, applied one after the other to the dense blocks diffusers builds. Its registered config keeps them as flat
JSON keys (`moe`, `moe_locations`, `mob`, `ffn_widths`, `kept_double`, `kept_single`), so
`save_pretrained`/`from_pretrained` rebuild it without the teacher and `FluxPipeline(transformer=...)` uses it
unchanged.

FFN locations: "ff" (image stream of a double block), "ff_context" (text stream of a double block), "single" (the
MLP branch of a single-stream block, whose fused `proj_out` is split into `attn_out` + the MoE down-projection).

Legend: B batch, L tokens (text + image), D hidden width, F dense FFN width.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.normalization import AdaLayerNormZeroSingle
from diffusers.models.transformers.transformer_flux import (
    FluxAttention,
    FluxAttnProcessor,
    FluxSingleTransformerBlock,
)
from diffusers.utils import apply_lora_scale
from diffusers.utils.torch_utils import maybe_allow_in_graph
from torch import nn

from src.models.mob import build_mob_groups
from src.models.moe import MoEConfig, MoEFeedForward, moe_layers, set_layers_top_k
from src.models.student_structure import LOCATIONS, STREAMS, MoEPlacement, StudentStructure, WidthPruning


@maybe_allow_in_graph
class FluxMoESingleTransformerBlock(nn.Module):
    """FLUX single-stream block with the fused `proj_out` split into the attention output and an MoE MLP.

    Dense: out = proj_out(cat[attn, gelu(proj_mlp(x))]) = W[:, :D]·attn + b + W[:, D:]·gelu(...). Here
    `attn_out` holds W[:, :D] and the bias b, and `mlp` (no output bias) holds proj_mlp and W[:, D:], so with all
    experts active and constant gates the block equals the dense one.
    """

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, moe: MoEConfig):
        super().__init__()
        self.norm = AdaLayerNormZeroSingle(dim)
        self.attn = FluxAttention(
            query_dim=dim,
            dim_head=attention_head_dim,
            heads=num_attention_heads,
            out_dim=dim,
            bias=True,
            processor=FluxAttnProcessor(),
            eps=1e-6,
            pre_only=True,
        )
        self.attn_out = nn.Linear(dim, dim)
        self.mlp = MoEFeedForward(dim, moe, out_bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text_len = encoder_hidden_states.shape[1]
        x_BLD = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        norm_BLD, gate_BD = self.norm(x_BLD, emb=temb)
        attn_BLD = self.attn(
            hidden_states=norm_BLD, image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {})
        )
        x_BLD = x_BLD + gate_BD.unsqueeze(1) * (self.attn_out(attn_BLD) + self.mlp(norm_BLD))
        if x_BLD.dtype == torch.float16:
            x_BLD = x_BLD.clip(-65504, 65504)
        return x_BLD[:, :text_len], x_BLD[:, text_len:]


def _narrow_single_block(block: FluxSingleTransformerBlock, width: int) -> None:
    """Give a dense single-stream block an MLP of `width` neurons (width pruning)."""
    dim = block.proj_out.out_features
    block.mlp_hidden_dim = width
    block.proj_mlp = nn.Linear(dim, width)
    block.proj_out = nn.Linear(dim + width, dim)


class FluxMoETransformer2DModel(FluxTransformer2DModel):
    """`FluxTransformer2DModel` with the changes of its `structure` (a `StudentStructure`) applied.

    Without `moe`, `mob`, `ffn_widths` and with all blocks it is the dense model, and its forward is
    bit-identical to `FluxTransformer2DModel.forward` for the same weights. `prediction_type`, `sampling_shift` and
    `world` change nothing here: they are metadata that travel with the weights in config.json (read by
    `flow.prediction_type`, `flow.sampling_shift` and the evaluation's world lookup).
    """

    _no_split_modules = ["FluxTransformerBlock", "FluxSingleTransformerBlock", "FluxMoESingleTransformerBlock"]
    _repeated_blocks = ["FluxTransformerBlock", "FluxSingleTransformerBlock", "FluxMoESingleTransformerBlock"]
    # diffusers' tensor-parallel plan shards the fused single-block proj_out, which MoE single blocks don't have.
    _tp_plan = None

    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        out_channels: int | None = None,
        num_layers: int = 19,
        num_single_layers: int = 38,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        moe: dict[str, Any] | None = None,
        moe_locations: list[str] | None = None,
        mob: dict[str, Any] | None = None,
        ffn_widths: dict[str, int] | None = None,
        kept_double: list[int] | None = None,
        kept_single: list[int] | None = None,
        prediction_type: str = "velocity",
        sampling_shift: float | None = None,
        world: str | None = None,
    ):
        super().__init__(
            patch_size=patch_size,
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim,
            pooled_projection_dim=pooled_projection_dim,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=axes_dims_rope,
        )
        dim = self.inner_dim
        # diffusers' own dense FFN width (FLUX: mlp_ratio 4), read off the blocks it built before any narrowing
        dense_width = (
            self.transformer_blocks[0].ff.net[0].proj.out_features
            if num_layers
            else self.single_transformer_blocks[0].proj_mlp.out_features
            if num_single_layers
            else 4 * dim
        )
        self.structure = StudentStructure.from_config(
            moe=moe,
            moe_locations=moe_locations,
            mob=mob,
            ffn_widths=ffn_widths,
            kept_double=kept_double,
            kept_single=kept_single,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            dense_width=dense_width,
        )
        """What this student changes in the dense architecture, parsed from the flat config keys above."""
        if self.structure.width is not None:
            _narrow_ffns(self, self.structure.width)
        if self.structure.moe is not None:
            _place_moe(self, self.structure.moe, num_attention_heads, attention_head_dim)
        self.mob_groups: nn.ModuleList | None = None
        if self.structure.mob is not None:
            self.mob_groups = build_mob_groups(self.structure.mob, num_layers, num_single_layers, dim)

    @apply_lora_scale("joint_attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        pooled_projections: torch.Tensor = None,
        timestep: torch.LongTensor = None,
        img_ids: torch.Tensor = None,
        txt_ids: torch.Tensor = None,
        guidance: torch.Tensor = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        controlnet_block_samples=None,
        controlnet_single_block_samples=None,
        return_dict: bool = True,
        controlnet_blocks_repeat: bool = False,
    ) -> torch.Tensor | Transformer2DModelOutput:
        """`FluxTransformer2DModel.forward`, with MoB groups running in place of the blocks they cover."""
        if self.mob_groups is not None and (controlnet_block_samples or controlnet_single_block_samples):
            raise ValueError("controlnet residuals: not supported on a model with MoB groups (config `mob`)")
        hidden_states = self.x_embedder(hidden_states)
        timestep = timestep.to(hidden_states.dtype) * 1000
        if guidance is not None:
            guidance = guidance.to(hidden_states.dtype) * 1000
        temb = (
            self.time_text_embed(timestep, pooled_projections)
            if guidance is None
            else self.time_text_embed(timestep, guidance, pooled_projections)
        )
        encoder_hidden_states = self.context_embedder(encoder_hidden_states)
        # Batched (3D) ids are deprecated in diffusers; like it, use the first sample's.
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        image_rotary_emb = self.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        if joint_attention_kwargs is not None and "ip_adapter_image_embeds" in joint_attention_kwargs:
            ip_adapter_image_embeds = joint_attention_kwargs.pop("ip_adapter_image_embeds")
            joint_attention_kwargs.update({"ip_hidden_states": self.encoder_hid_proj(ip_adapter_image_embeds)})

        streams = (
            ("double", self.transformer_blocks, controlnet_block_samples, controlnet_blocks_repeat),
            ("single", self.single_transformer_blocks, controlnet_single_block_samples, False),
        )
        for stream, blocks, control_samples, control_repeat in streams:
            groups = {g.start: g for g in self.mob_groups if g.stream == stream} if self.mob_groups else {}
            i = 0
            while i < len(blocks):
                group = groups.get(i)
                step = group.size if group is not None else 1
                run = group if group is not None else blocks[i]
                args = (hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs)
                if group is not None:
                    args = (blocks[i : i + step], *args)
                if torch.is_grad_enabled() and self.gradient_checkpointing:
                    encoder_hidden_states, hidden_states = self._gradient_checkpointing_func(run, *args)
                else:
                    encoder_hidden_states, hidden_states = run(*args)
                if control_samples is not None:
                    hidden_states = hidden_states + _control_residual(control_samples, i, len(blocks), control_repeat)
                i += step

        hidden_states = self.norm_out(hidden_states, temb)
        output = self.proj_out(hidden_states)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)


def _control_residual(samples: list[torch.Tensor], index: int, num_blocks: int, repeat: bool) -> torch.Tensor:
    """The ControlNet residual for block `index`, as diffusers' FluxTransformer2DModel picks it."""
    if repeat:
        return samples[index % len(samples)]
    interval = int(np.ceil(num_blocks / len(samples)))
    return samples[index // interval]


def _narrow_ffns(model: FluxMoETransformer2DModel, pruning: WidthPruning) -> None:
    """Replace the dense FFNs at each pruned location by ones of the kept width (fresh weights, filled later)."""
    dim = model.inner_dim
    for loc, width in pruning.ffn_widths.items():
        for block in getattr(model, STREAMS[loc]):
            if loc == "single":
                _narrow_single_block(block, width)
            else:
                setattr(block, loc, FeedForward(dim, dim_out=dim, inner_dim=width, activation_fn="gelu-approximate"))


def _place_moe(model: FluxMoETransformer2DModel, placement: MoEPlacement, heads: int, head_dim: int) -> None:
    """Replace the FFNs at `placement.locations` by MoE layers (fresh weights, filled by the conversion or a load)."""
    dim = model.inner_dim
    for block in model.transformer_blocks:
        for loc in ("ff", "ff_context"):
            if loc in placement.locations:
                setattr(block, loc, MoEFeedForward(dim, placement.layer))
    if "single" in placement.locations:
        model.single_transformer_blocks = nn.ModuleList(
            FluxMoESingleTransformerBlock(dim, heads, head_dim, placement.layer)
            for _ in range(len(model.single_transformer_blocks))
        )


@dataclass
class DenseFFN:
    """A dense FFN y = down[:, cols]·gelu_tanh(up(x)) (+ down.bias unless it is a single block's fused proj_out)."""

    up: nn.Linear
    """Up-projection (F, D) with bias; row i is neuron i."""
    down: nn.Linear
    """Down-projection; its columns `cols` belong to this FFN."""
    cols: slice
    """Columns of `down` that read the FFN hidden (all, or [D:] of a single block's fused proj_out)."""
    fused: bool
    """True for a single block: `down`'s bias and first D columns belong to the attention output."""

    def down_weight(self) -> torch.Tensor:
        """(D, F) down-projection columns of this FFN."""
        return self.down.weight[:, self.cols]


def dense_ffns(model: nn.Module, locations: tuple[str, ...] | list[str] = LOCATIONS) -> dict[str, DenseFFN]:
    """The model's dense FFNs at `locations`, keyed "transformer_blocks.3.ff", "single_transformer_blocks.5.mlp".

    MoE layers are skipped: only dense (possibly width-pruned) FFNs are returned.
    """
    out: dict[str, DenseFFN] = {}
    for i, block in enumerate(model.transformer_blocks):
        for loc in ("ff", "ff_context"):
            ffn = getattr(block, loc)
            if loc in locations and isinstance(ffn, FeedForward):
                out[f"transformer_blocks.{i}.{loc}"] = DenseFFN(ffn.net[0].proj, ffn.net[2], slice(None), False)
    if "single" in locations:
        for i, block in enumerate(model.single_transformer_blocks):
            if isinstance(block, FluxSingleTransformerBlock):
                dim = block.proj_out.out_features
                out[f"single_transformer_blocks.{i}.mlp"] = DenseFFN(
                    block.proj_mlp, block.proj_out, slice(dim, None), True
                )
    return out


def check_locations(model: FluxTransformer2DModel, locations: list[str] | tuple[str, ...]) -> None:
    """ValueError naming `locations` for an unknown location or one the model has no blocks for."""
    for loc in locations:
        if loc not in LOCATIONS:
            raise ValueError(f"locations: unknown location {loc!r}; allowed {list(LOCATIONS)}")
        if len(getattr(model, STREAMS[loc])) == 0:
            key = "num_single_layers" if loc == "single" else "num_layers"
            raise ValueError(f"locations: {loc!r} is not in this model ({key}=0); allowed: locations it has blocks for")


def location_of(ffn_name: str) -> str:
    """ "transformer_blocks.3.ff_context" → "ff_context"; "single_transformer_blocks.5.mlp" → "single"."""
    return "single" if ffn_name.startswith("single_") else ffn_name.rsplit(".", 1)[1]


def set_top_k(model: nn.Module, k: int) -> None:
    """Route every MoE layer to `k` experts (paper: top-k can change at inference); saved with the config."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError("set_top_k: the model has no MoE layers")
    for layer in layers:
        if not 0 <= k <= layer.cfg.num_experts:
            raise ValueError(f"top_k={k}: allowed 0..{layer.cfg.num_experts} (num_experts)")
    set_layers_top_k(model, k)
    if isinstance(model, FluxMoETransformer2DModel):
        model.register_to_config(moe={**model.config.moe, "top_k": k})
        placement = model.structure.moe
        layer = dataclasses.replace(placement.layer, top_k=k)
        model.structure = dataclasses.replace(model.structure, moe=dataclasses.replace(placement, layer=layer))


def moe_summary(model: nn.Module) -> dict[str, Any]:
    """Structure of a (converted) model: layout, widths, locations, current top-k, MoB and pruning keys."""
    layers = moe_layers(model)
    config = dict(getattr(model, "config", {}))
    summary: dict[str, Any] = {
        "num_moe_layers": len(layers),
        "moe_locations": config.get("moe_locations"),
        "num_double": len(model.transformer_blocks),
        "num_single": len(model.single_transformer_blocks),
        "ffn_widths": config.get("ffn_widths"),
        "kept_double": config.get("kept_double"),
        "kept_single": config.get("kept_single"),
        "mob": config.get("mob"),
    }
    if layers:
        cfg = layers[0].cfg
        summary |= {
            "layout": f"{cfg.num_shared}S{cfg.num_experts}E{layers[0].top_k}A",
            "num_shared": cfg.num_shared,
            "num_experts": cfg.num_experts,
            "top_k": sorted({layer.top_k for layer in layers}),
            "shared_width": cfg.shared_width,
            "expert_width": cfg.expert_width,
        }
    return summary


def init_config(model: FluxTransformer2DModel) -> dict[str, Any]:
    """The model's constructor kwargs (its registered config without diffusers' private keys)."""
    return {k: v for k, v in model.config.items() if not k.startswith("_")}


def build_from_state(
    config: dict[str, Any], state: dict[str, torch.Tensor], device: torch.device | str
) -> FluxMoETransformer2DModel:
    """Build a `FluxMoETransformer2DModel` from `config` and take `state`'s tensors as its parameters.

    Skips the random init (minutes for FLUX.1-dev) and a third copy of the weights. `state` must hold every
    parameter and must not share storage with another live model; persistent buffers it lacks keep their
    initial values (e.g. the MoE layers' zero `expert_bias`).
    """
    # Parameters on the meta device (no memory, no init cost), buffers real: `state` supplies the parameters.
    with init_empty_weights(include_buffers=False):
        model = FluxMoETransformer2DModel(**config)
    persistent = set(model.state_dict())
    state = dict(state)
    for name, buf in model.named_buffers():
        if name in persistent and name not in state:
            state[name] = buf
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device)
    assert torch.device(device).type == "meta" or not any(p.is_meta for p in model.parameters())
    return model


__all__ = [
    "FluxMoESingleTransformerBlock",
    "FluxMoETransformer2DModel",
    "DenseFFN",
    "dense_ffns",
    "check_locations",
    "location_of",
    "set_top_k",
    "moe_summary",
    "init_config",
    "build_from_state",
]
