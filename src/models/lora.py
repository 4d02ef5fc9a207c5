"""LoRAs trained on the dense FLUX transformer, fused into a converted student (dense, MoE, pruned or MoB).

A LoRA adds ΔW = scale·B·A to a Linear's weight. The conversion only re-slices the FFN neurons (src/models/convert.py),
so ΔW of an FFN projection splits exactly like W did: rows of the up-projection (``ff.net.0.proj``, ``proj_mlp``)
and columns of the down-projection (``ff.net.2``, the MLP part [:, D:] of a single block's fused ``proj_out``) go to
the shared expert and to each routed expert by the MoE layer's ``dense_neurons`` record; a single block's
``proj_out[:, :D]`` goes to its ``attn_out``. Every other target (attention, norms, embedders, ``proj_out`` of the
model) is the same module in the student. Fusing keeps the student a plain diffusers model: no PEFT, no extra
compute, and ``FluxPipeline(transformer=student)`` runs it unchanged. Converting (teacher + LoRA) and mapping the
LoRA onto the converted teacher give the same model (tests/test_lora.py); on a trained student the mapping applies
the same weight change to the trained weights.

Formats: what ``FluxPipeline.load_lora_weights`` reads, normalised by diffusers' own
``FluxLoraLoaderMixin.lora_state_dict`` — diffusers/PEFT keys (``transformer.<module>.lora_A.weight`` /
``.lora_B.weight``, optional ``<module>.alpha`` or the ``lora_adapter_metadata`` header that
``save_lora_weights`` writes), kohya ``lora_down``/``lora_up``/``alpha`` and the XLabs and fal Kontext layouts
(diffusers folds their scales into the factors). Refused with a ValueError naming the key: DoRA, LoKr/LoHa, LoRA
biases, non-LoRA tensors (Control LoRAs' norm weights, expanded input embedders), text-encoder LoRAs, keys the
student has no module for and factors whose shapes don't fit it.

Legend: R LoRA rank, I input features, O output features, D model width, F dense FFN width (= all the MoE layer's
hidden units S·F_s + E·F_e), E routed experts, F_e expert width.
"""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from src.models.flux_moe import FluxMoESingleTransformerBlock
from src.models.moe import MoEFeedForward

PREFIX = "transformer."
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
_FACTOR_RE = re.compile(r"^(.+)\.lora_([AB])\.weight$")
_BLOCK_RE = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
_FFN_RE = re.compile(r"^(ff|ff_context)\.net\.(0\.proj|2)$")
_KEPT = {"transformer_blocks": "kept_double", "single_transformer_blocks": "kept_single"}


@dataclass
class LoRAFactors:
    """One LoRA'd Linear: ΔW_OI = scale·up_OR·down_RI (PEFT's lora_B, lora_A)."""

    down_RI: Tensor
    """lora_A: (rank, in_features)."""
    up_OR: Tensor
    """lora_B: (out_features, rank)."""
    scale: float
    """alpha / rank (1 when the file gives no alpha; kohya's is already folded into the factors)."""

    def delta(self, device: torch.device | str | None = None) -> Tensor:
        """ΔW_OI in fp32."""
        return self.scale * (self.up_OR.to(device, torch.float32) @ self.down_RI.to(device, torch.float32))


def read_lora(path: str | Path) -> dict[str, LoRAFactors]:
    """A FLUX transformer LoRA file → its factors keyed by the dense module ("transformer_blocks.0.ff.net.2").

    ValueError naming the file and the offending key for anything this module refuses (see the module docstring).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"lora {path}: no such file")
    if path.suffix != ".safetensors":
        raise ValueError(f"lora {path}: not a .safetensors file (pickled LoRAs are not read)")
    try:
        raw = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"lora {path}: not a readable safetensors file ({err})") from None
    try:
        metadata = json.loads(header[METADATA_KEY]) if METADATA_KEY in header else None
    except json.JSONDecodeError as err:
        raise ValueError(f"lora {path}: its {METADATA_KEY!r} header is not valid JSON ({err.msg})") from None
    return lora_factors(raw, metadata, source=str(path))


def lora_factors(
    state: dict[str, Tensor], metadata: dict | None = None, source: str = "lora"
) -> dict[str, LoRAFactors]:
    """`read_lora` on an in-memory state dict (and the file's diffusers LoRA metadata, if any)."""
    if not state:
        raise ValueError(f"{source}: holds no tensors")
    for marker, kind in (
        ("dora_scale", "DoRA"),
        ("lora_magnitude_vector", "DoRA"),
        (".lokr_", "LoKr"),
        ("hada_", "LoHa"),
    ):
        key = next((k for k in state if marker in k), None)
        if key is not None:
            raise ValueError(f"{source}: key {key!r} is {kind}; only plain LoRA (lora_A/lora_B) can be mapped")
    try:
        converted, alphas = FluxLoraLoaderMixin.lora_state_dict(dict(state), return_alphas=True)
    except Exception as err:  # noqa: BLE001 - diffusers' format converters raise assorted errors on foreign files
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{source}: not a FLUX LoRA diffusers can read ({first})") from None
    text = [k for k in converted if not k.startswith(PREFIX) and "text_encoder" in k.split(".")[0]]
    if text:
        raise ValueError(
            f"{source}: has {len(text)} text-encoder LoRA tensors (e.g. {text[0]!r}); only the transformer's LoRA "
            "is mapped onto the student — use a transformer-only LoRA file"
        )
    foreign = [k for k in converted if not k.startswith(PREFIX)]
    if foreign or not converted:
        example = f"e.g. {foreign[0]!r}" if foreign else "none"
        raise ValueError(
            f"{source}: not a FLUX transformer LoRA (keys outside '{PREFIX}': {example}); expected keys like "
            f"'{PREFIX}transformer_blocks.0.ff.net.0.proj.lora_A.weight'"
        )

    pairs: dict[str, dict[str, Tensor]] = collections.defaultdict(dict)
    for key, value in converted.items():
        match = _FACTOR_RE.match(key[len(PREFIX) :])
        if match is None:
            raise ValueError(
                f"{source}: key {key!r} is not a LoRA factor (<module>.lora_A.weight / .lora_B.weight); LoRA biases "
                "and full weights (Control LoRAs) are not mapped"
            )
        pairs[match[1]][match[2]] = value
    meta = _transformer_metadata(metadata, source)
    alphas = {k[len(PREFIX) :].removesuffix(".alpha"): float(v) for k, v in (alphas or {}).items()}
    default_alpha = collections.Counter(alphas.values()).most_common(1)[0][0] if alphas else None

    factors: dict[str, LoRAFactors] = {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise ValueError(f"{source}: module {module!r} has no {missing} factor")
        down, up = pair["A"], pair["B"]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise ValueError(
                f"{source}: module {module!r} has lora_A {tuple(down.shape)} and lora_B {tuple(up.shape)}; "
                "expected (rank, in) and (out, rank) of one rank (Linear LoRAs only)"
            )
        rank = down.shape[0]
        if meta is not None:
            scale = _metadata_scale(meta, module, rank, source)
        elif alphas:
            scale = alphas.get(module, default_alpha) / rank
        else:
            scale = 1.0
        factors[module] = LoRAFactors(down, up, scale)
    return factors


def _transformer_metadata(metadata: dict | None, source: str) -> dict | None:
    """The transformer's LoraConfig kwargs from diffusers' metadata header (keys "transformer.r", ...)."""
    if not metadata:
        return None
    meta = {k[len(PREFIX) :]: v for k, v in metadata.items() if k.startswith(PREFIX)}
    if not meta:
        return None
    for flag, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA biases")):
        if meta.get(flag):
            raise ValueError(f"{source}: its metadata sets {flag}=true ({what}); only plain LoRA can be mapped")
    if "r" not in meta or "lora_alpha" not in meta:
        raise ValueError(f"{source}: its {METADATA_KEY!r} header lacks 'r' or 'lora_alpha' for the transformer")
    return meta


def _metadata_scale(meta: dict, module: str, rank: int, source: str) -> float:
    """PEFT's scaling for ``module``: lora_alpha / r (or / sqrt(r) with rsLoRA), rank/alpha patterns applied."""
    r = _pattern_value(meta.get("rank_pattern") or {}, module, meta["r"])
    alpha = _pattern_value(meta.get("alpha_pattern") or {}, module, meta["lora_alpha"])
    if r != rank:
        raise ValueError(f"{source}: module {module!r} has rank {rank} but the metadata says r={r}")
    return alpha / (r**0.5 if meta.get("use_rslora") else r)


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's rank/alpha pattern lookup: a key matches the module name or a dotted suffix of it ("^" anchors it)."""
    for pattern, value in patterns.items():
        regex = pattern + "$" if pattern.startswith("^") else rf"(.*\.)?{pattern}$"
        if re.match(regex, module):
            return value
    return default


@torch.no_grad()
def fuse_lora(model: nn.Module, lora: dict[str, LoRAFactors], strength: float = 1.0) -> dict[str, int]:
    """Add strength·ΔW of every LoRA module onto ``model``'s weights in place.

    Returns counts: "modules" fused, "moe_layers" (those of them cut over MoE experts), "skipped_removed_blocks".

    ``model``: a dense ``FluxTransformer2DModel`` or a ``FluxMoETransformer2DModel`` (converted, depth-pruned — LoRA
    modules of removed blocks are skipped — or with MoB groups). Every key is checked before any weight changes,
    so a ValueError leaves ``model`` untouched.
    """
    plan = [(name, _targets(model, name, factors)) for name, factors in lora.items()]
    counts = {"modules": 0, "moe_layers": 0, "skipped_removed_blocks": 0}
    for name, targets in plan:
        if targets is None:
            counts["skipped_removed_blocks"] += 1
            continue
        delta_OI = strength * lora[name].delta(targets[0][0].device)
        for param, piece in targets:
            param.copy_((param.float() + piece(delta_OI)).to(param.dtype))
        counts["modules"] += 1
        counts["moe_layers"] += int(any(t[0].ndim == 3 for t in targets))
    return counts


_Target = tuple[nn.Parameter, Callable[[Tensor], Tensor]]
"""A parameter and the function cutting its part out of the dense module's ΔW."""


def _targets(model: nn.Module, name: str, factors: LoRAFactors) -> list[_Target] | None:
    """(parameter, ΔW → its slice) pairs for the dense module ``name``; None if its block was pruned away."""
    out_features, in_features = factors.up_OR.shape[0], factors.down_RI.shape[1]
    student_name = name
    match = _BLOCK_RE.match(name)
    if match is not None:
        stream, index, rest = match[1], int(match[2]), match[3]
        kept = getattr(model, "config", {}).get(_KEPT[stream])
        if kept is not None:
            if index not in kept:
                return None
            index = kept.index(index)
        student_name = f"{stream}.{index}.{rest}"
        if index >= len(getattr(model, stream)):
            raise ValueError(f"lora: key {name!r}: the model has {len(getattr(model, stream))} {stream}")
        block = getattr(model, stream)[index]
        ffn = _FFN_RE.match(rest)
        if ffn is not None and isinstance(getattr(block, ffn[1], None), MoEFeedForward):
            layer = getattr(block, ffn[1])
            if ffn[2] == "2":
                return _moe_down(layer, name, (out_features, in_features), 0)
            return _moe_up(layer, name, (out_features, in_features))
        if isinstance(block, FluxMoESingleTransformerBlock) and rest == "proj_mlp":
            return _moe_up(block.mlp, name, (out_features, in_features))
        if isinstance(block, FluxMoESingleTransformerBlock) and rest == "proj_out":
            dim = block.attn_out.out_features
            targets = _moe_down(block.mlp, name, (out_features, in_features), dim)
            return [(block.attn_out.weight, lambda d_OI: d_OI[:, :dim]), *targets]
    try:
        module = model.get_submodule(student_name)
    except AttributeError:
        raise ValueError(f"lora: key {name!r}: the model has no module {student_name!r}") from None
    if not isinstance(module, nn.Linear):
        raise ValueError(f"lora: key {name!r}: {student_name!r} is a {type(module).__name__}, not a Linear")
    want = tuple(module.weight.shape)
    if (out_features, in_features) != want:
        hint = " (a width-pruned FFN: its kept neurons are not recorded)" if _is_pruned_ffn(model, name) else ""
        raise ValueError(
            f"lora: key {name!r}: ΔW is {(out_features, in_features)}, the model's weight is {want}{hint}; "
            "the LoRA was trained for another model size"
        )
    return [(module.weight, lambda d_OI: d_OI)]


def _neurons(layer: MoEFeedForward, name: str) -> tuple[Tensor, Tensor]:
    """(shared units' dense neurons (S·F_s,), routed experts' (E, F_e)) of a converted layer."""
    neurons_F = getattr(layer, "dense_neurons", None)
    if neurons_F is None:
        raise ValueError(
            f"lora: key {name!r} targets an FFN that became MoE experts, but this student records no neuron split "
            "(converted before the record existed); re-convert the teacher to map FFN LoRAs"
        )
    if layer.cfg.activation == "swiglu":  # the conversion only makes gelu_tanh layers
        raise ValueError(f"lora: key {name!r}: SwiGLU MoE layers are not a conversion of a FLUX FFN")
    shared = layer.num_shared * layer.shared_width
    return neurons_F[:shared], neurons_F[shared:].view(layer.num_experts, layer.expert_width)


def _check_shape(name: str, got: tuple[int, int], want: tuple[int, int]) -> None:
    if got != want:
        raise ValueError(
            f"lora: key {name!r}: ΔW is {got}, the dense layer this FFN came from was {want}; the LoRA was trained "
            "for another model size (or the FFN was width-pruned before conversion)"
        )


def _moe_up(layer: MoEFeedForward, name: str, shape: tuple[int, int]) -> list[_Target]:
    """Up-projection ΔW (F, D): rows → shared_up and each expert's w_up (E, D, F_e)."""
    _check_shape(name, shape, (layer.total_width, layer.dim))
    shared_S, experts_EF = _neurons(layer, name)
    targets: list[_Target] = []
    if layer.shared_up is not None:
        targets.append((layer.shared_up.weight, lambda d_FD: d_FD[shared_S.to(d_FD.device)]))
    if layer.w_up is not None:
        targets.append((layer.w_up, lambda d_FD: d_FD[experts_EF.to(d_FD.device)].transpose(1, 2)))
    return targets


def _moe_down(layer: MoEFeedForward, name: str, shape: tuple[int, int], offset: int) -> list[_Target]:
    """Down-projection ΔW (D, offset + F): columns offset + neuron → shared_down and each expert's w_down (E, F_e, D)."""
    _check_shape(name, shape, (layer.dim, offset + layer.total_width))
    shared_S, experts_EF = _neurons(layer, name)
    targets: list[_Target] = []
    if layer.shared_down is not None:
        targets.append((layer.shared_down.weight, lambda d_DF: d_DF[:, offset + shared_S.to(d_DF.device)]))
    if layer.w_down is not None:
        targets.append(
            (layer.w_down, lambda d_DF: d_DF[:, offset + experts_EF.to(d_DF.device)].permute(1, 2, 0))
        )  # (D, E, F_e) → (E, F_e, D)
    return targets


def _is_pruned_ffn(model: nn.Module, name: str) -> bool:
    widths = getattr(model, "config", {}).get("ffn_widths") or {}
    ffn = re.search(r"\.(ff|ff_context)\.net\.|single_transformer_blocks\.\d+\.(proj_mlp|proj_out)$", name)
    return ffn is not None and (ffn[1] or "single") in widths


__all__ = ["LoRAFactors", "read_lora", "lora_factors", "fuse_lora"]
