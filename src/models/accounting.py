"""Parameter and FLOP accounting for dense, MoE and MoB FLUX transformers and the class-conditional DiT (dense or
MoE, src/models/dit.py); runs on the meta device.

"Activated" means used by one sample at one denoising step: a MoE layer counts its shared expert(s), router and
top-k of its E routed experts; a MoB group counts κ of its m blocks. A block's size within a group is taken as the
group average (exact when the group's blocks have the same shape, as they do after conversion).

Components: attention (q/k/v/out projections and q/k norms), ffn (dense FFNs, MoE experts and MoE routers),
adaln_modulation (the per-block AdaLN linears plus ``norm_out``), embedders (``x_embedder``, ``context_embedder``,
``time_text_embed``, the final ``proj_out``), mob_routers, other. The single-stream block's fused ``proj_out``
is split: its first ``dim`` input columns and its bias are the attention output projection, the rest the MLP
down-projection (docs/design.md §4.2). The DiT's parts map onto the same components: ``attn`` (qkv, proj, q/k
norms) attention; ``ffn`` (dense or MoE) ffn; the blocks' ``adaLN_modulation`` and ``final_modulation``
adaln_modulation; ``x_embedder``, ``t_embedder``, ``y_embedder`` (class table), ``in_context_pos`` and
``final_linear`` embedders; its pre-modulation norms (weights only with RMSNorm) other.

Dense2MoE's activated counts for MoE models (MoE-L 5.15B) only fit when the per-block AdaLN modulation is not
counted (docs/design.md §2.9): ``activated_without_modulation`` reports that figure next to ``activated``.

With a compute schedule (top-k / κ as functions of σ, src/models/compute_schedule.py) activated counts change from
step to step; ``trajectory_cost`` averages them over the sampler's steps.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from diffusers.models.transformers.transformer_flux import FluxAttention
from torch import nn

from src.models.compute_schedule import Schedule, scheduled
from src.models.dit import Attention as DiTAttention
from src.models.dit import DiT
from src.models.flow import sampling_schedule
from src.models.mob import MoBGroup, mob_groups
from src.models.moe import MoEFeedForward

COMPONENTS = ("attention", "ffn", "adaln_modulation", "embedders", "mob_routers", "other")
FLOP_COMPONENTS = ("attention", "attention_scores", *COMPONENTS[1:])

_BLOCK_LISTS = {"transformer_blocks": "double", "single_transformer_blocks": "single"}
_BLOCK_PARTS = {
    "attn": "attention",
    "attn_out": "attention",
    "ff": "ffn",
    "ff_context": "ffn",
    "proj_mlp": "ffn",
    "mlp": "ffn",
    "norm1": "adaln_modulation",
    "norm1_context": "adaln_modulation",
    "norm": "adaln_modulation",
}
_TOP_PARTS = {
    "x_embedder": "embedders",
    "context_embedder": "embedders",
    "time_text_embed": "embedders",
    "proj_out": "embedders",
    "norm_out": "adaln_modulation",
}
_ROUTED_EXPERT_PARAMS = ("w_up", "b_up", "w_down")
_DIT_BLOCK_PARTS = {"attn": "attention", "ffn": "ffn", "adaLN_modulation": "adaln_modulation"}
_DIT_TOP_PARTS = {
    "x_embedder": "embedders",
    "t_embedder": "embedders",
    "y_embedder": "embedders",
    "in_context_pos": "embedders",
    "final_linear": "embedders",
    "final_modulation": "adaln_modulation",
}


def _is_routed_moe(module: nn.Module) -> bool:
    # routed experts are stacked (E, ...) tensors, not nn.Linear; shared experts and the router are nn.Linear
    return isinstance(module, MoEFeedForward) and module.w_up is not None


def _component(parts: list[str]) -> str:
    """Component of a parameter or module by its qualified name; "fused_proj_out" for the single-block proj_out."""
    if parts[0] in _BLOCK_LISTS and len(parts) > 2:
        if _BLOCK_LISTS[parts[0]] == "single" and parts[2] == "proj_out":
            return "fused_proj_out"
        return _BLOCK_PARTS.get(parts[2], "other")
    return _TOP_PARTS.get(parts[0], "other")


def _dit_component(parts: list[str]) -> str:
    """Component of a DiT parameter or module by its qualified name (blocks.<i>.<part>… or a top-level part)."""
    if parts[0] == "blocks" and len(parts) > 2:
        return _DIT_BLOCK_PARTS.get(parts[2], "other")
    return _DIT_TOP_PARTS.get(parts[0], "other")


def _component_of(model: nn.Module) -> Callable[[list[str]], str]:
    """The name → component map of the model's architecture (DiT or FLUX)."""
    return _dit_component if isinstance(model, DiT) else _component


def _block_key(parts: list[str]) -> tuple[str, int] | None:
    if parts[0] in _BLOCK_LISTS and len(parts) > 1 and parts[1].isdigit():
        return _BLOCK_LISTS[parts[0]], int(parts[1])
    return None


def _block_fractions(model: nn.Module) -> dict[tuple[str, int], Fraction]:
    """(stream, block index) → fraction of samples that run it, for blocks inside MoB groups."""
    fractions = {}
    for group in mob_groups(model):
        for index in range(group.start, group.start + group.size):
            fractions[(group.stream, index)] = Fraction(group.active, group.size)
    return fractions


def _mob_prefixes(model: nn.Module) -> tuple[str, ...]:
    return tuple(name + "." for name, module in model.named_modules() if isinstance(module, MoBGroup))


def _expert_fractions(model: nn.Module) -> dict[str, Fraction]:
    """Routed-expert parameter name → top_k / E of its MoE layer."""
    fractions = {}
    for name, module in model.named_modules():
        if not _is_routed_moe(module):
            continue
        num_experts = module.w_up.shape[0]
        fraction = Fraction(module.top_k, num_experts) if num_experts else Fraction(0)
        for param in _ROUTED_EXPERT_PARAMS:
            if getattr(module, param, None) is not None:
                fractions[f"{name}.{param}" if name else param] = fraction
    return fractions


def count_params(model: nn.Module) -> dict[str, Any]:
    """Total and activated parameters, overall and per component (see the module docstring)."""
    block_fractions = _block_fractions(model)
    expert_fractions = _expert_fractions(model)
    mob_prefixes = _mob_prefixes(model)
    component_of = _component_of(model)
    total: dict[str, int] = defaultdict(int)
    activated: dict[str, Fraction] = defaultdict(Fraction)
    for name, param in model.named_parameters():
        parts = name.split(".")
        fraction = expert_fractions.get(name, Fraction(1)) * block_fractions.get(_block_key(parts), Fraction(1))
        component = "mob_routers" if name.startswith(mob_prefixes) else component_of(parts)
        if component == "fused_proj_out":
            out_features = param.shape[0]
            attention = param.numel() if param.ndim == 1 else out_features * out_features
            shares = {"attention": attention, "ffn": param.numel() - attention}
        else:
            shares = {component: param.numel()}
        for key, count in shares.items():
            total[key] += count
            activated[key] += count * fraction
    by_component = {key: {"total": total[key], "activated": round(activated[key])} for key in COMPONENTS}
    activated_all = sum(entry["activated"] for entry in by_component.values())
    return {
        "total": sum(entry["total"] for entry in by_component.values()),
        "activated": activated_all,
        "activated_without_modulation": activated_all - by_component["adaln_modulation"]["activated"],
        "by_component": by_component,
    }


def image_tokens_for(height: int, width: int, latent_downsample: int = 16) -> int:
    """Image tokens at a resolution: FLUX latents are H/8 × W/8, packed 2×2, hence (H/16)·(W/16)."""
    if height % latent_downsample or width % latent_downsample:
        raise ValueError(f"height={height}, width={width}: must be multiples of latent_downsample={latent_downsample}")
    return (height // latent_downsample) * (width // latent_downsample)


def _dit_tokens(model: DiT, block: int) -> int:
    """Tokens block ``block`` of a DiT sees per image: the L patches, plus the in-context class tokens from
    ``in_context_start`` on (JiT)."""
    cfg = model.cfg
    in_context = model.in_context_pos is not None and block >= cfg.in_context_start
    return cfg.grid**2 + (cfg.in_context_tokens if in_context else 0)


def _dit_rows(model: DiT, parts: list[str]) -> int:
    """Rows a DiT linear layer at this name multiplies per image: its block's tokens, the L patches (patch embedding
    and output layer), or 1 (AdaLN modulations and the timestep MLP, per sample)."""
    if parts[0] == "blocks" and len(parts) > 2:
        return 1 if parts[2] == "adaLN_modulation" else _dit_tokens(model, int(parts[1]))
    if parts[0] in ("x_embedder", "final_linear"):
        return model.cfg.grid**2
    return 1


def _rows(parts: list[str], image_tokens: int, text_tokens: int) -> int:
    """Rows a linear layer at this name multiplies per image: image tokens, text tokens, both, or 1 (per sample)."""
    if parts[0] in _BLOCK_LISTS:
        if len(parts) > 2 and parts[2] in ("norm1", "norm1_context", "norm"):
            return 1
        if _BLOCK_LISTS[parts[0]] == "single":
            return image_tokens + text_tokens
        inner = ".".join(parts[2:])
        # text-stream weights of a double block: ff_context, attn.add_{q,k,v}_proj, attn.to_add_out
        return text_tokens if "context" in inner or "add_" in inner else image_tokens
    if parts[0] in ("x_embedder", "proj_out"):
        return image_tokens
    if parts[0] == "context_embedder":
        return text_tokens
    return 1


def flops_per_image(
    model: nn.Module,
    height: int | None = None,
    width: int | None = None,
    text_len: int = 512,
    image_tokens: int | None = None,
    latent_downsample: int = 16,
) -> dict[str, Any]:
    """Forward FLOPs of one image at one denoising step (activated path), overall and per component.

    FLUX: give ``height`` and ``width`` in pixels (FLUX packing, see ``image_tokens_for``) or ``image_tokens``
    directly, and ``text_len``. A DiT runs at its config's ``image_size`` only: its L = (image_size / patch)²
    patches (and JiT's in-context class tokens) come from the config; ``image_tokens``, if given, must be L, height,
    width and ``text_len`` do not apply (a DiT has no text tokens; ``text_tokens`` is 0).
    Counted: every matmul as 2·m·n·k (linear layers including attention projections, activated MoE experts and
    routers, AdaLN and MoB routers once per sample, the DiT's timestep MLP once per sample) and attention as
    2·2·L²·D per layer (scores and values over the L joint tokens). Ignored: biases, norms, activations, softmax,
    RoPE, gathers, embedding lookups, MoB pooling. MoE layers count top-k experts per token (token choice).
    """
    if isinstance(model, DiT):
        if height is not None or width is not None:
            raise ValueError("flops_per_image: a DiT runs at its config's image_size; give no height and width")
        tokens = model.cfg.grid**2
        if image_tokens is not None and image_tokens != tokens:
            raise ValueError(f"flops_per_image: image_tokens={image_tokens}, but this DiT always has {tokens}")
        image_tokens, text_len = tokens, 0
    elif (image_tokens is None) == (height is None or width is None):
        raise ValueError("flops_per_image: give either height and width or image_tokens")
    elif image_tokens is None:
        image_tokens = image_tokens_for(height, width, latent_downsample)
    block_fractions = _block_fractions(model)
    mob_prefixes = _mob_prefixes(model)
    component_of = _component_of(model)
    flops: dict[str, Fraction] = defaultdict(Fraction)
    for name, module in model.named_modules():
        if not name:
            continue
        parts = name.split(".")
        fraction = block_fractions.get(_block_key(parts), Fraction(1))
        component = "mob_routers" if (name + ".").startswith(mob_prefixes) else component_of(parts)
        rows = _dit_rows(model, parts) if isinstance(model, DiT) else _rows(parts, image_tokens, text_len)
        if isinstance(module, nn.Linear):
            if component == "fused_proj_out":
                attention = 2 * rows * module.out_features * module.out_features
                flops["attention"] += attention * fraction
                flops["ffn"] += (2 * rows * module.in_features * module.out_features - attention) * fraction
            else:
                flops[component] += 2 * rows * module.in_features * module.out_features * fraction
        elif _is_routed_moe(module) and module.w_up.shape[0]:
            per_expert = module.w_up[0].numel() + module.w_down[0].numel()
            flops["ffn"] += 2 * rows * module.top_k * per_expert * fraction
        elif isinstance(module, FluxAttention) and _block_key(parts) is not None:
            joint = image_tokens + text_len
            flops["attention_scores"] += 2 * 2 * joint * joint * module.inner_dim * fraction
        elif isinstance(module, DiTAttention) and isinstance(model, DiT):
            tokens = _dit_tokens(model, int(parts[1]))
            flops["attention_scores"] += 2 * 2 * tokens * tokens * module.proj.in_features
    by_component = {key: round(flops[key]) for key in FLOP_COMPONENTS}
    return {
        "total": sum(by_component.values()),
        "by_component": by_component,
        "image_tokens": image_tokens,
        "text_tokens": text_len,
    }


def trajectory_cost(
    model: nn.Module,
    steps: int,
    shift: float = 1.0,
    top_k_schedule: Schedule | None = None,
    mob_active_schedule: Schedule | None = None,
    **flop_args: Any,
) -> dict[str, Any]:
    """Activated parameters and forward FLOPs per image per step, averaged over the ``steps`` Euler steps of the
    sampler (σ grid ``sampling_schedule(steps, shift)``) with top-k and κ following the schedules.

    Each step counts as the model at that step's (top-k, κ); with classifier-free guidance both branches run at the
    same σ, so the average per forward is the same. ``flop_args`` go to ``flops_per_image``. Also returns ``total``
    and ``per_step`` (σ, top-k, κ, activated, flops) rows.
    """
    sigmas = sampling_schedule(steps, shift).tolist()[:steps]
    per_setting: dict[tuple[tuple[int, ...], tuple[int, ...]], dict[str, Any]] = {}
    rows = []
    with scheduled(model, top_k_schedule, mob_active_schedule) as apply:
        for sigma in sigmas:
            apply(sigma)
            setting = tuple(m.top_k for m in _routed(model)), tuple(g.active for g in mob_groups(model))
            if setting not in per_setting:
                per_setting[setting] = {"params": count_params(model), "flops": flops_per_image(model, **flop_args)}
            counts = per_setting[setting]
            rows.append(
                {
                    "sigma": sigma,
                    "top_k": sorted(set(setting[0])),
                    "mob_active": sorted(set(setting[1])),
                    "activated": counts["params"]["activated"],
                    "activated_without_modulation": counts["params"]["activated_without_modulation"],
                    "flops": counts["flops"]["total"],
                }
            )
    first = next(iter(per_setting.values()))
    return {
        "total": first["params"]["total"],
        "activated": sum(r["activated"] for r in rows) / steps,
        "activated_without_modulation": sum(r["activated_without_modulation"] for r in rows) / steps,
        "flops": sum(r["flops"] for r in rows) / steps,
        "steps": steps,
        "shift": shift,
        "per_step": rows,
    }


def _routed(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]
