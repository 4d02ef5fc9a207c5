"""Provenance of a GenEval number: the protocol that produced it and the environment it ran in.

A GenEval score is only comparable with another one (ours, the paper's FLUX.1-dev 0.6595 / MoE-L 0.5702, other
papers') made under the same *protocol*: the same prompts, detector and colour model weights, rule thresholds and
numerics, images per prompt and sampler settings. `geneval_provenance` records it as a flat dict of named fields
(hashes, not paths, so a copy of the same weights elsewhere is the same protocol) plus a short ``protocol_id``;
``compare`` refuses to put numbers of different protocols side by side. Names, paths, the seed value and the
*environment* (package versions, device) are recorded next to it but not compared: they explain small differences,
they do not make two numbers incomparable.

``evaluate`` writes the record into ``summary.json`` (key ``provenance``), into its MLflow run (tags
`PROTOCOL_TAG` and `PROTOCOL_ID_TAG`, artifact ``provenance.json``) and the model card shows it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
from pathlib import Path
from typing import Any

import torch

from evaluation import geneval
from evaluation.generate import GENEVAL_METADATA

PROTOCOL_TAG = "dense2moe.geneval_protocol"
"""MLflow tag: the protocol as canonical JSON (what ``compare`` reads)."""
PROTOCOL_ID_TAG = "dense2moe.geneval_protocol_id"
"""MLflow tag: `protocol_id` of that protocol."""
NUMERICS = "geneval-float32/numpy-1.23-argsort"
"""Which scoring numerics made the verdicts (evaluation/geneval_numerics.py); bump it when they change."""
SEED_RULE = "seed(prompt i, image k) = (seed * 1000003 + i) * 1009 + k; one CPU torch.Generator per image"
"""`evaluation.generate.image_seed`, in words (a test keeps the two in step)."""
PACKAGES = ("torch", "transformers", "open_clip_torch", "diffusers", "numpy", "pillow")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(path: str | Path) -> str:
    """sha256 of a checkpoint file; for a folder, of its one weights file, or of the ``sha256sum`` listing of them."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if not files:
        raise ValueError(f"weights_sha256: no weights file ({', '.join(_WEIGHT_SUFFIXES)}) under {path}")
    if len(files) == 1:
        return sha256_file(files[0])
    listing = "".join(f"{sha256_file(p)}  {p.relative_to(path)}\n" for p in files)
    return hashlib.sha256(listing.encode()).hexdigest()


FULL_HASH_BYTES = 2 << 30
"""Model folders up to this size are hashed byte for byte; larger ones (FLUX.1-dev: 24 GB) by their safetensors
headers (every tensor's name, dtype, shape and offsets) and file sizes, so a run does not read the whole model
again just to name it."""


def model_fingerprint(folder: str | Path) -> str:
    """sha256 of a model folder's ``*.safetensors``: full bytes up to ``FULL_HASH_BYTES``, else ``headers:`` + the
    hash of each file's safetensors header and size (same layout and sizes ⇒ same fingerprint)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return "none (no safetensors files)"
    if sum(p.stat().st_size for p in files) <= FULL_HASH_BYTES:
        return weights_sha256(files[0]) if len(files) == 1 else weights_sha256(folder)
    digest = hashlib.sha256()
    for path in files:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")  # safetensors: 8-byte header length, then the JSON header
            digest.update(f"{path.name}:{path.stat().st_size};".encode() + f.read(size))
    return "headers:" + digest.hexdigest()


def state_dict_sha256(module: torch.nn.Module) -> str:
    """sha256 over a module's parameters and buffers (names, dtypes, shapes, bytes): weights without a file."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "state_dict:" + digest.hexdigest()


def source_sha256(module: Any) -> str:
    """sha256 of a Python module's source: the "weights" of a classical detector."""
    return "source:" + hashlib.sha256(inspect.getsource(module).encode()).hexdigest()


def prompts_record(prompt_set: str, metadata: list[dict]) -> dict[str, Any]:
    """{"prompts_sha256", "prompts_count"}: the prompt file's bytes, or the generated metadata (shapes-heldout)."""
    path = GENEVAL_METADATA if prompt_set == "geneval" else Path(prompt_set)
    if path.is_file():
        digest = sha256_file(path)
    else:
        lines = "".join(json.dumps(m, sort_keys=True) + "\n" for m in metadata)
        digest = "metadata:" + hashlib.sha256(lines.encode()).hexdigest()
    return {"prompts_sha256": digest, "prompts_count": len(metadata)}


def rules_record(
    threshold: float = geneval.THRESHOLD,
    counting_threshold: float = geneval.COUNTING_THRESHOLD,
    max_objects: int = geneval.MAX_OBJECTS,
    nms_iou: float = geneval.NMS_THRESHOLD,
    position_threshold: float = geneval.POSITION_THRESHOLD,
) -> dict[str, Any]:
    """GenEval's options (``--options threshold=...`` etc.) and the numerics that applied them."""
    return {
        "threshold": threshold,
        "counting_threshold": counting_threshold,
        "max_objects": max_objects,
        "nms_iou": nms_iou,
        "position_threshold": position_threshold,
        "numerics": NUMERICS,
    }


def hub_or_folder_sha256(name_or_path: str, model: torch.nn.Module | None = None) -> str:
    """Weights hash of a local folder/file, or of a hub id's cached snapshot; the loaded state dict otherwise."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return weights_sha256(path)
    try:
        from huggingface_hub import snapshot_download  # inside the try: any failure falls back to the state dict

        return weights_sha256(snapshot_download(name_or_path, local_files_only=True))
    except Exception:  # not cached as a snapshot (or not a hub id): hash what was loaded
        if model is None:
            raise
        return state_dict_sha256(model)


def clip_weights_sha256(clip_model: str, clip_pretrained: str, model: torch.nn.Module | None = None) -> str:
    """Hash of the open_clip checkpoint: a file, a tag's cached download, or the loaded state dict."""
    if Path(clip_pretrained).expanduser().is_file():
        return sha256_file(Path(clip_pretrained).expanduser())
    try:
        from open_clip import pretrained as registry  # heavy, optional: only CLIP-score runs have weights to hash

        architecture = Path(clip_model).stem if clip_model.endswith(".json") else clip_model
        cfg = registry.get_pretrained_cfg(architecture, clip_pretrained)
        if cfg:
            return sha256_file(registry.download_pretrained(cfg))  # a cache hit: loading fetched it already
    except Exception:
        if model is None:
            raise
    if model is None:
        raise ValueError(f"clip_weights_sha256: cannot locate weights {clip_model}/{clip_pretrained}")
    return state_dict_sha256(model)


def environment_record(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Package versions and the device (with the GPU's name), recorded but not compared."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    device = torch.device(device)
    name = str(device)
    if device.type == "cuda" and torch.cuda.is_available():
        name += f" ({torch.cuda.get_device_name(device)})"
    return {**versions, "device": name}


def protocol_id(protocol: dict[str, Any]) -> str:
    """First 12 hex digits of the sha256 of the protocol's canonical JSON."""
    return hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:12]


def geneval_provenance(
    prompts: dict[str, Any],
    detector: str,
    detector_weights_sha256: str,
    colour_model: str | None,
    colour_weights_sha256: str | None,
    rules: dict[str, Any],
    images_per_prompt: int,
    sampler: dict[str, Any],
    sources: dict[str, Any],
    device: str | torch.device,
) -> dict[str, Any]:
    """{"protocol", "protocol_id", "sources", "environment"} for one GenEval number.

    ``prompts`` comes from `prompts_record`, ``rules`` from `rules_record`; ``sampler`` holds the generation settings
    that change images (steps, CFG or guidance, shift, resolution); ``sources`` the names and paths behind the hashes
    (prompt set, detector and colour model ids, seed).
    """
    protocol = {
        **prompts,
        "images_per_prompt": images_per_prompt,
        "detector_weights_sha256": detector_weights_sha256,
        "colour_weights_sha256": colour_weights_sha256,
        **rules,
        **{f"sampler.{k}": v for k, v in sorted(sampler.items())},
        "seed_rule": SEED_RULE,
    }
    protocol = json.loads(json.dumps(protocol))  # plain JSON types, as they come back from summary.json or MLflow
    return {
        "protocol": protocol,
        "protocol_id": protocol_id(protocol),
        "sources": {"detector": detector, "colour_model": colour_model, **sources},
        "environment": environment_record(device),
    }


def protocol_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """One "field: value vs value" per protocol field where a and b differ (a missing field counts as None)."""

    def short(value: Any) -> str:
        text = json.dumps(value) if not isinstance(value, str) else value
        return text[:19] + "…" if len(text) > 20 else text

    keys = sorted(set(a) | set(b))
    return [f"{k}: {short(a.get(k))} vs {short(b.get(k))}" for k in keys if a.get(k) != b.get(k)]


def mlflow_tags(provenance: dict[str, Any]) -> dict[str, str]:
    """Tags that let ``compare`` check protocols without downloading artifacts."""
    return {
        PROTOCOL_TAG: json.dumps(provenance["protocol"], sort_keys=True),
        PROTOCOL_ID_TAG: provenance["protocol_id"],
    }


def format_provenance(provenance: dict[str, Any]) -> list[str]:
    """Markdown table rows (field | value) for a model card."""
    rows = ["| field | value |", "|---|---|", f"| protocol id | `{provenance['protocol_id']}` |"]
    for section in ("protocol", "sources", "environment"):
        for key, value in provenance.get(section, {}).items():
            rows.append(f"| {key} | {'' if value is None else value} |")
    return rows
