"""Image generation in GenEval's folder layout, resumable.

Layout (what GenEval's own ``evaluate_images.py`` reads): ``<out>/<%05d>/metadata.jsonl`` (the prompt's metadata
as one JSON line) and ``<out>/<%05d>/samples/<%04d>.png``. Images are written atomically (temp file + rename), so
a killed run leaves only whole images; a rerun generates only the missing ones. ``<out>/generation.json`` records the
model and sampling settings (a rerun with other settings is refused) and says ``"complete": true`` only once
every image exists.

Generators are callables ``(prompts, seeds) -> uint8 (B, H, W, 3)``: the shapes world's ``ShapesPipeline`` or
``FluxGenerator`` around a diffusers ``FluxPipeline`` (FLUX.1-dev, or any pipeline folder whose transformer is
replaced by an exported student).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from src.data.shapes import ShapesWorld
from src.dtypes import DTYPES, resolve_device
from src.errors import UserError, short_reason
from src.hub import is_hub_id
from src.models.loading import load_transformer
from src.progress import progress_bar

GENEVAL_METADATA = Path(__file__).parent / "data" / "geneval" / "evaluation_metadata.jsonl"
PROMPT_SETS = ("shapes-heldout", "geneval")

Generator = Callable[[list[str], list[int]], np.ndarray]


def load_prompt_set(name_or_path: str, image_size: int = 32) -> list[dict]:
    """GenEval-style metadata dicts: "shapes-heldout", "geneval", or a .txt (one prompt a line) / .jsonl file."""
    if name_or_path == "shapes-heldout":
        return ShapesWorld(size=image_size).heldout_metadata()
    path = Path(GENEVAL_METADATA if name_or_path == "geneval" else name_or_path)
    if not path.is_file():
        raise UserError(
            f"prompt set {name_or_path!r}: no such file; allowed: {', '.join(PROMPT_SETS)} or a .txt/.jsonl path"
        )
    if path.suffix not in (".txt", ".jsonl"):
        raise UserError(f"prompt file {path}: suffix {path.suffix!r}; allowed .txt (one prompt a line) or .jsonl")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"prompt file {path}: not UTF-8 text (byte {err.start}); expected one prompt a line") from None
    if "\x00" in text:
        raise UserError(f"prompt file {path}: holds NUL bytes (a binary file?); expected one prompt a line")
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise UserError(f"prompt file {path}: no prompts in it")
    if path.suffix == ".txt":
        return [{"tag": "custom", "include": [], "prompt": line.strip()} for line in lines]
    metadata = []
    for n, line in enumerate(lines, 1):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"prompt file {path}, line {n}: not valid JSON ({exc.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise UserError(f"prompt file {path}, line {n}: each line must be an object with a string 'prompt'")
        metadata.append(item)
    return metadata


def across_tasks(metadata: list[dict], limit: int | None, name: str) -> list[dict]:
    """``limit`` prompts of a prompt set spread evenly over its tasks (``tag``): round-robin quotas in the order the
    tasks first appear, each task's first prompts, kept in file order. Fewer prompts than tasks are refused: a
    quick look must still cover every task."""
    if limit is None or limit >= len(metadata):
        return metadata
    tags = [m.get("tag") for m in metadata]
    tasks = list(dict.fromkeys(tags))
    if limit < len(tasks):
        named = ", ".join(str(t) for t in tasks)
        raise UserError(
            f"limit={limit}: prompt set {name} has {len(tasks)} tasks ({named}); use --limit {len(tasks)} or more "
            "so that every task gets a prompt"
        )
    available = {t: tags.count(t) for t in tasks}
    quota, left = dict.fromkeys(tasks, 0), limit
    while left:  # ends: limit < len(metadata) prompts are available
        for task in tasks:
            if left and quota[task] < available[task]:
                quota[task], left = quota[task] + 1, left - 1
    kept = []
    for meta, tag in zip(metadata, tags):
        if quota[tag]:
            kept.append(meta)
            quota[tag] -= 1
    return kept


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """Noise seed of image k of prompt i: fixed, so every model is sampled from the same noise."""
    return (seed * 1_000_003 + prompt_index) * 1_009 + image_index


def _prepare_folders(out: Path, metadata: list[dict]) -> None:
    for i, meta in enumerate(metadata):
        folder = out / f"{i:05d}"
        meta_file = folder / "metadata.jsonl"
        line = json.dumps(meta)
        if meta_file.exists():
            if json.loads(meta_file.read_text()) != meta:
                raise UserError(f"{out} already holds images for a different prompt set ({meta_file}); use a new --out")
            continue
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        meta_file.write_text(line + "\n")


def _check_settings(marker: Path, settings: dict) -> None:
    """A folder resumes only under the settings that made its images (model, sampling, seed)."""
    if not marker.is_file():
        return
    old = json.loads(marker.read_text())
    changed = {k: (old[k], v) for k, v in settings.items() if k in old and old[k] != v}
    if changed:
        parts = ", ".join(f"{k} {a!r} → {b!r}" for k, (a, b) in changed.items())
        raise UserError(f"{marker.parent} holds images made with other settings ({parts}); use a new --out")


def generate_images(
    generate: Generator,
    metadata: list[dict],
    out: str | Path,
    images_per_prompt: int = 4,
    batch_size: int = 64,
    seed: int = 0,
    info: dict | None = None,
) -> int:
    """Generate every missing image; returns how many were generated now. ``generate(prompts, seeds)`` → uint8.

    ``info`` (model and sampling settings, JSON-serialisable) is stored in generation.json with the seed; a rerun
    with different values is refused, so a folder never mixes images of two models.
    """
    out = Path(out)
    marker = out / "generation.json"
    settings = {"seed": seed, **json.loads(json.dumps(info or {}))}
    _check_settings(marker, settings)
    try:
        out.mkdir(parents=True, exist_ok=True)
        _prepare_folders(out, metadata)
    except PermissionError as exc:
        raise UserError(f"output folder {out} is not writable ({exc.strerror})") from None
    todo = [
        (i, k)
        for i in range(len(metadata))
        for k in range(images_per_prompt)
        if not (out / f"{i:05d}" / "samples" / f"{k:04d}.png").exists()
    ]
    record = {"prompts": len(metadata), "images_per_prompt": images_per_prompt, **settings}
    if todo:
        marker.write_text(json.dumps({"complete": False, **record}, indent=1) + "\n")
    with progress_bar("generate", len(todo)) as progress:
        task = progress.add_task("generate", total=len(todo))
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            images = generate([metadata[i]["prompt"] for i, _ in chunk], [image_seed(seed, i, k) for i, k in chunk])
            for (i, k), image in zip(chunk, images):
                path = out / f"{i:05d}" / "samples" / f"{k:04d}.png"
                tmp = path.with_suffix(".tmp.png")
                Image.fromarray(image).save(tmp)
                os.replace(tmp, path)
            progress.advance(task, len(chunk))
    marker.write_text(json.dumps({"complete": True, **record}, indent=1) + "\n")
    return len(todo)


def iter_samples(out: str | Path) -> list[tuple[str, dict, Path]]:
    """(relative filename, metadata, path) of every image in a GenEval-layout folder, in prompt order."""
    out = Path(out)
    items = []
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and p.name.isdigit()):
        meta = json.loads((folder / "metadata.jsonl").read_text())
        for png in sorted((folder / "samples").glob("[0-9]*.png")):
            if png.stem.isdigit():
                items.append((str(png.relative_to(out)), meta, png))
    return items


def is_flux_pipeline(model: str) -> bool:
    """A diffusers pipeline folder (model_index.json) or a hub id."""
    path = Path(model).expanduser()
    return (path / "model_index.json").is_file() if path.is_dir() else is_hub_id(model)


def load_flux_pipeline(model: str, transformer: str | None = None, dtype: str = "auto", device: str = "auto"):
    """A ``FluxPipeline`` from a folder or hub id; ``transformer`` (a save_pretrained folder) replaces its own."""
    from diffusers import FluxPipeline  # heavy: only the FLUX-pipeline path needs it

    target = resolve_device(device)
    if dtype != "auto" and dtype not in DTYPES:
        raise UserError(f"dtype={dtype!r}: allowed auto, {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype] if dtype != "auto" else torch.bfloat16 if target.type == "cuda" else torch.float32
    components = {}
    if transformer is not None:
        components["transformer"] = load_transformer(transformer, dtype=torch_dtype)
    try:
        pipe = FluxPipeline.from_pretrained(model, dtype=torch_dtype, **components)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"FLUX pipeline {model!r} cannot be loaded ({short_reason(exc)}); pass --model a diffusers FluxPipeline folder "
            "(model_index.json, e.g. a local FLUX.1-dev) or a hub id whose files are cached"
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(target)


class FluxGenerator:
    """(prompts, seeds) → uint8 images with a ``FluxPipeline``.

    Each image's initial noise comes from its own CPU ``torch.Generator`` seeded with its seed, so an image depends
    on its (prompt, seed) only, not on the batch it was drawn in or the device.
    """

    def __init__(
        self,
        pipeline,
        height: int = 1024,
        width: int = 1024,
        steps: int = 28,
        guidance: float = 3.5,
        max_sequence_length: int = 512,
    ) -> None:
        multiple = 2 * pipeline.vae_scale_factor  # VAE downsampling, then 2×2 latent packing
        if height % multiple or width % multiple:
            raise UserError(f"height={height}, width={width}: must be multiples of {multiple} for this pipeline")
        self.pipeline = pipeline
        self.height, self.width, self.steps, self.guidance = height, width, steps, guidance
        # The T5 tokenizer's own limit caps the default (512 for FLUX.1-dev).
        self.max_sequence_length = min(max_sequence_length, pipeline.tokenizer_2.model_max_length)

    @property
    def image_tokens(self) -> int:
        multiple = 2 * self.pipeline.vae_scale_factor
        return (self.height // multiple) * (self.width // multiple)

    @torch.no_grad()
    def __call__(self, prompts: list[str], seeds: list[int]) -> np.ndarray:
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        images = self.pipeline(
            prompt=list(prompts),
            height=self.height,
            width=self.width,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            generator=generators,
            max_sequence_length=self.max_sequence_length,
            output_type="np",
        ).images
        # diffusers' own float → uint8 conversion (numpy_to_pil).
        return (images * 255).round().clip(0, 255).astype(np.uint8)
