"""Image generation in GenEval's folder layout, resumable.

Layout (what GenEval's own ``evaluate_images.py`` reads): ``<out>/<%05d>/metadata.jsonl`` (the prompt's metadata
as one JSON line) and ``<out>/<%05d>/samples/<%04d>.png``. Images are written atomically (temp file + rename), so
a killed run leaves only whole images; a rerun generates only the missing ones. ``<out>/generation.json`` is
written last, and only when every image exists: a partial run is never marked complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from src.errors import UserError

GENEVAL_METADATA = Path(__file__).parent / "data" / "geneval" / "evaluation_metadata.jsonl"
PROMPT_SETS = ("shapes-heldout", "geneval")

Generator = Callable[[list[str], list[int]], np.ndarray]


def load_prompt_set(name_or_path: str, image_size: int = 32) -> list[dict]:
    """GenEval-style metadata dicts: "shapes-heldout", "geneval", or a .txt (one prompt a line) / .jsonl file."""
    if name_or_path == "shapes-heldout":
        from src.data.shapes import ShapesWorld

        return ShapesWorld(size=image_size).heldout_metadata()
    path = Path(GENEVAL_METADATA if name_or_path == "geneval" else name_or_path)
    if not path.is_file():
        raise UserError(
            f"prompt set {name_or_path!r}: no such file; allowed: {', '.join(PROMPT_SETS)} or a .txt/.jsonl path"
        )
    lines = [line for line in path.read_text().splitlines() if line.strip()]
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


def generate_images(
    generate: Generator,
    metadata: list[dict],
    out: str | Path,
    images_per_prompt: int = 4,
    batch_size: int = 64,
    seed: int = 0,
    info: dict | None = None,
) -> int:
    """Generate every missing image; returns how many were generated now. ``generate(prompts, seeds)`` → uint8."""
    out = Path(out)
    done_marker = out / "generation.json"
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
    if todo and done_marker.exists():
        done_marker.unlink()
    columns = (TextColumn("generate"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not todo) as progress:
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
    record = {"complete": True, "prompts": len(metadata), "images_per_prompt": images_per_prompt, "seed": seed}
    done_marker.write_text(json.dumps({**record, **(info or {})}, indent=1) + "\n")
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
