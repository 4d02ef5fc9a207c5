"""``python -m src.cli prepare-data --config experiments/flux_dev_prepare.yaml``: prompts → litdata shards.

Training on FLUX.1-dev cannot afford T5-XXL, CLIP and the VAE in every step, so they run once here. Per sample the
shards hold the latents (C, h, w) in FluxPipeline's normalised space, (z − shift_factor) × scaling_factor; the T5
embeddings (n, E) with their length n; the pooled CLIP embedding (P,); the prompt and the sample's index in the
prompt file. Tensors are stored in bf16, as int16 views (litdata cannot serialise bf16). The latents come either
from VAE-encoding the images the prompt file names or from sampling them with the teacher pipeline, as FLUX-Mini
trained on teacher-generated images of JourneyDB prompts.

Text goes through ``FluxPipeline.encode_prompt``, so the embeddings are exactly the pipeline's. FluxPipeline feeds
the transformer all ``max_sequence_length`` T5 outputs, padding included; ``t5_padding: unpadded`` keeps only the
prompt's tokens (through EOS), which is ~5× smaller at typical prompt lengths, and the training batches pad them
with zeros; ``full`` keeps the pipeline's exact conditioning at 4 MiB per sample for FLUX.1-dev.

Layout of ``output_dir``: ``manifest.json`` (model identity, resolution, shapes, counts, per-chunk sha256, this
config), ``train/`` and ``heldout/`` (each a litdata dataset: ``index.json`` + ``chunk-*.bin``). The last
``heldout`` prompts are kept out of training for the end-of-fit evaluation. Prompts are processed in parts of
``part_size``; a finished part is listed in the manifest and never redone, so a killed run resumes at the part it
was in and a finished one is a no-op. An existing folder made with other settings is refused, never overwritten.
Every random draw is seeded per sample, so a sample does not depend on its batch, its part or a resume.

Legend: B batch, C latent channels, h/w latent height/width, T text tokens, E T5 width, P pooled CLIP width.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from src.dtypes import DTYPES, resolve_device
from src.errors import UserError, short_reason
from src.hub import is_hub_id

FORMAT = "dense2moe-latents/1"
"""Manifest format tag; LatentDataModule refuses any other."""
MANIFEST = "manifest.json"
SPLITS = ("train", "heldout")
LATENT_SOURCES = ("vae", "teacher")
T5_PADDINGS = ("unpadded", "full")
RUNTIME_FIELDS = ("prompts", "pipeline", "output_dir", "device", "batch_size")
"""PrepareConfig fields that do not change what is written (a resume may change them): the prompt file and the
model are identified by content (file hash, config hashes), not by where they are."""


@dataclass
class PrepareConfig:
    """What ``prepare-data`` reads, how it encodes it and where the shards go."""

    prompts: str
    """Prompt file: .txt (one prompt a line), .jsonl or .parquet (a "prompt" or "text" field, optional "image")."""
    pipeline: str = "black-forest-labs/FLUX.1-dev"
    """diffusers FluxPipeline folder or hub id (text encoders, tokenizers, VAE; the teacher for latents=teacher)."""
    output_dir: str = "data/flux_prepared"
    """Folder for manifest.json, train/ and heldout/."""
    latents: str = "teacher"
    """"vae" (encode the images the prompt file names) or "teacher" (generate them with the pipeline)."""
    image_root: str | None = None
    """Folder that relative image paths start from (default: the prompt file's folder)."""
    resolution: int = 1024
    """Square image side in pixels (images are resized on the short side and centre-cropped)."""
    steps: int = 28
    """latents=teacher: sampling steps."""
    guidance: float = 3.5
    """latents=teacher: value fed to the guidance embedding of a guidance-distilled teacher (FLUX.1-dev)."""
    max_sequence_length: int = 512
    """T5 tokens per prompt (512 for FLUX.1-dev; longer prompts are truncated, as FluxPipeline does)."""
    t5_padding: str = "unpadded"
    """"unpadded" (the prompt's tokens through EOS) or "full" (all max_sequence_length outputs, as FluxPipeline)."""
    heldout: int = 64
    """The last this-many prompts go to heldout/ (the end-of-fit evaluation), not to train/."""
    limit: int | None = None
    """Use only the first this-many prompts of the file (None: all)."""
    batch_size: int = 4
    """Samples encoded (or generated) per batch."""
    part_size: int = 256
    """Prompts per resumable part."""
    chunk_size: int = 64
    """Samples per litdata chunk file."""
    dtype: str = "bfloat16"
    """Precision of the encoders and the teacher: "bfloat16", "float16" or "float32" (storage is always bf16)."""
    device: str = "auto"
    """"auto" (cuda when available), "cuda", "cuda:1", "cpu", …"""
    seed: int = 0
    """Seed of the VAE posterior samples and the teacher's initial noise (each sample seeded on its own)."""

    def __post_init__(self) -> None:
        choices = {"latents": LATENT_SOURCES, "t5_padding": T5_PADDINGS, "dtype": tuple(DTYPES)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; allowed {list(allowed)}")
        for name in ("resolution", "steps", "batch_size", "part_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if not 1 <= self.max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length={self.max_sequence_length}: allowed 1 … 512 (FluxPipeline's limit)")
        if self.heldout < 0:
            raise ValueError(f"heldout={self.heldout}: must be >= 0")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit={self.limit}: must be >= 1 or None")

    def identity(self, prompts_sha256: str) -> dict[str, Any]:
        """Everything the written data depends on (the fingerprint of an output folder)."""
        fields = {k: v for k, v in asdict(self).items() if k not in RUNTIME_FIELDS}
        return fields | {"prompts_sha256": prompts_sha256}


# --- prompt files -------------------------------------------------------------------------------------------------
def read_prompts(path: str | Path) -> list[dict[str, str | None]]:
    """Records ``{"prompt", "image"}`` of a .txt, .jsonl or .parquet prompt file, in file order."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"prompts {path}: no such file")
    suffix = file.suffix.lower()
    if suffix == ".txt":
        rows = [{"prompt": line.strip(), "image": None} for line in file.read_text().splitlines() if line.strip()]
    elif suffix == ".jsonl":
        rows = []
        for n, line in enumerate(file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"prompts {file}, line {n}: not valid JSON ({exc.msg})") from None
            rows.append(_record(obj, f"prompts {file}, line {n}"))
    elif suffix == ".parquet":
        rows = _read_parquet(file)
    else:
        raise UserError(f"prompts {path}: unknown format {suffix!r}; allowed .txt, .jsonl, .parquet")
    if not rows:
        raise UserError(f"prompts {path}: no prompts in it")
    return rows


def _read_parquet(file: Path) -> list[dict[str, str | None]]:
    import pyarrow.parquet as pq  # heavy: only parquet prompt files need it

    try:
        names = pq.read_schema(file).names
        table = pq.read_table(file, columns=[c for c in ("prompt", "text", "image") if c in names])
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for unreadable files
        raise UserError(f"prompts {file}: not a readable parquet file ({short_reason(exc)})") from None
    return [_record(obj, f"prompts {file}, row {i}") for i, obj in enumerate(table.to_pylist())]


def _record(obj: Any, where: str) -> dict[str, str | None]:
    text = obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{where}: needs a non-empty string 'prompt' (or 'text')")
    image = obj.get("image")
    if image is not None and not isinstance(image, str):
        raise UserError(f"{where}: 'image' must be a file path")
    return {"prompt": text, "image": image}


def file_sha256(path: Path, block: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def config_sha256(config: Any) -> str:
    """Hash of a model config without its bookkeeping keys (names, paths, library versions)."""
    items = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    kept = {k: v for k, v in items.items() if not k.startswith("_") and k != "transformers_version"}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


# --- the pipeline -------------------------------------------------------------------------------------------------
def config_class_name(config_file: Path) -> str | None:
    try:
        return json.loads(config_file.read_text()).get("_class_name")
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise UserError(f"{config_file}: not a readable JSON config ({short_reason(exc)})") from None


def is_flux_pipeline_class(name: str | None) -> bool:
    return isinstance(name, str) and name.startswith("Flux") and name.endswith("Pipeline")


def load_pipeline(cfg: PrepareConfig):
    """The FluxPipeline of ``cfg.pipeline`` on ``cfg.device``; without its transformer when only the VAE is needed."""
    from diffusers import FluxPipeline  # heavy: only encoding with a real pipeline needs it

    source = cfg.pipeline
    local = Path(source).expanduser()
    if local.exists() or not is_hub_id(source):
        if not local.is_dir():
            raise UserError(f"pipeline {source}: no such folder (expected a diffusers FluxPipeline folder or hub id)")
        index = local / "model_index.json"
        if not index.is_file():
            raise UserError(f"pipeline {index}: missing; {source} is not a diffusers pipeline folder")
        if not is_flux_pipeline_class(name := config_class_name(index)):
            raise UserError(f"pipeline {index}: a {name!r}, not a FLUX pipeline (e.g. FluxPipeline)")
        transformer_config = local / "transformer" / "config.json"
        if cfg.latents == "teacher" and transformer_config.is_file():
            if (name := config_class_name(transformer_config)) != "FluxTransformer2DModel":
                raise UserError(f"pipeline {transformer_config}: a {name!r}, not a FluxTransformer2DModel")
    else:
        try:
            name = FluxPipeline.load_config(source).get("_class_name")
        except (OSError, ValueError) as exc:
            raise UserError(
                f"pipeline {source}: no local folder of that name and the hub cannot provide it ({short_reason(exc)});"
                f" download it first (hf download {source}) and pass its folder"
            ) from None
        if not is_flux_pipeline_class(name):
            raise UserError(f"pipeline {source}: a {name!r}, not a FLUX pipeline (e.g. FluxPipeline)")
    skip = {} if cfg.latents == "teacher" else {"transformer": None}
    try:
        pipe = FluxPipeline.from_pretrained(source, dtype=DTYPES[cfg.dtype], **skip)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise UserError(f"pipeline {source} cannot be loaded: {short_reason(exc)}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(resolve_device(cfg.device))


def sample_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index


def _stored(t: torch.Tensor) -> torch.Tensor:
    """bf16 as an int16 view: litdata serialises int16 but not bf16."""
    return t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16)


class SampleMaker:
    """Records (prompt, image) → stored samples, with one loaded FluxPipeline."""

    def __init__(self, pipe, cfg: PrepareConfig, image_root: Path) -> None:
        multiple = 2 * pipe.vae_scale_factor  # VAE downsampling, then 2×2 packing
        if cfg.resolution % multiple:
            raise UserError(f"resolution={cfg.resolution}: must be a multiple of {multiple} for this pipeline")
        self.pipe, self.cfg, self.image_root = pipe, cfg, image_root
        self.device = resolve_device(cfg.device)
        side = cfg.resolution // pipe.vae_scale_factor
        self.latent_shape = [pipe.vae.config.latent_channels, side, side]
        self.t5_width = pipe.text_encoder_2.config.d_model
        self.pooled_width = pipe.text_encoder.config.hidden_size  # FluxPipeline pools CLIP's pooler_output

    @torch.no_grad()
    def __call__(self, records: list[dict], indices: list[int]) -> list[dict[str, Any]]:
        pipe, cfg = self.pipe, self.cfg
        prompts = [r["prompt"] for r in records]
        msl = cfg.max_sequence_length
        embeds_BTE, pooled_BP, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=msl
        )
        mask_BT = pipe.tokenizer_2(
            prompts, padding="max_length", max_length=msl, truncation=True, return_tensors="pt"
        ).attention_mask
        lengths_B = mask_BT.sum(1).tolist()
        generators = [torch.Generator("cpu").manual_seed(sample_seed(cfg.seed, i)) for i in indices]
        if cfg.latents == "vae":
            latents_BChw = self._encode_images(records, indices, generators)
        else:
            latents_BChw = self._generate(embeds_BTE, pooled_BP, generators)
        assert list(latents_BChw.shape[1:]) == self.latent_shape, (latents_BChw.shape, self.latent_shape)
        assert embeds_BTE.shape[2] == self.t5_width and pooled_BP.shape[1] == self.pooled_width
        samples = []
        for b, index in enumerate(indices):
            n = int(lengths_B[b])
            t5_TE = embeds_BTE[b] if cfg.t5_padding == "full" else embeds_BTE[b, :n]
            samples.append(
                {
                    "latents": _stored(latents_BChw[b]),
                    "t5": _stored(t5_TE),
                    "t5_length": n,
                    "pooled": _stored(pooled_BP[b]),
                    "prompt": prompts[b],
                    "index": int(index),
                }
            )
        return samples

    def _encode_images(self, records: list[dict], indices: list[int], generators) -> torch.Tensor:
        vae = self.pipe.vae
        pixels = [self._load_image(r, i) for r, i in zip(records, indices)]
        x_B3HW = torch.stack(pixels).to(self.device, vae.dtype)
        z_BChw = vae.encode(x_B3HW).latent_dist.sample(generator=generators)
        # FluxPipeline decodes z / scaling_factor + shift_factor, so training latents are the inverse
        return (z_BChw - vae.config.shift_factor) * vae.config.scaling_factor

    def _load_image(self, record: dict, index: int) -> torch.Tensor:
        if record["image"] is None:
            raise UserError(
                f"prompt {index} ({record['prompt'][:40]!r}): latents=vae needs an 'image' for every prompt"
            )
        path = Path(record["image"]).expanduser()
        path = path if path.is_absolute() else self.image_root / path
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise UserError(f"image {path} (prompt {index}): cannot be read ({short_reason(exc)})") from None
        side = self.cfg.resolution
        scale = side / min(image.size)
        w, h = max(side, round(image.width * scale)), max(side, round(image.height * scale))
        image = image.resize((w, h), Image.BICUBIC)
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)

    def _generate(self, embeds_BTE, pooled_BP, generators) -> torch.Tensor:
        pipe, cfg = self.pipe, self.cfg
        packed_BLD = pipe(
            prompt_embeds=embeds_BTE,
            pooled_prompt_embeds=pooled_BP,
            height=cfg.resolution,
            width=cfg.resolution,
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance,
            generator=generators,
            max_sequence_length=cfg.max_sequence_length,
            output_type="latent",
        ).images
        return pipe._unpack_latents(packed_BLD, cfg.resolution, cfg.resolution, pipe.vae_scale_factor)

    def model_identity(self) -> dict[str, Any]:
        """Config hashes of the components that shaped the data (weights are not hashed: 24 GB for FLUX.1-dev)."""
        pipe = self.pipe
        identity = {
            "vae_config_sha256": config_sha256(pipe.vae.config),
            "text_encoder_config_sha256": config_sha256(pipe.text_encoder.config),
            "text_encoder_2_config_sha256": config_sha256(pipe.text_encoder_2.config),
            "transformer_config_sha256": None,
        }
        if pipe.transformer is not None:
            identity["transformer_config_sha256"] = config_sha256(pipe.transformer.config)
        return identity


# --- shards and manifest --------------------------------------------------------------------------------------------
def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _plan(records: list[dict], cfg: PrepareConfig) -> dict[str, list[list[int]]]:
    """Sample indices of every part of every split."""
    n = len(records)
    first_heldout = n - cfg.heldout
    if first_heldout < 1:
        raise UserError(f"heldout={cfg.heldout}: the prompt file has only {n} prompts; none would be left to train on")
    ranges = {"train": range(0, first_heldout), "heldout": range(first_heldout, n)}
    return {
        split: [list(r[i : i + cfg.part_size]) for i in range(0, len(r), cfg.part_size)] for split, r in ranges.items()
    }


def _write_part(split_dir: Path, part: int, indices: list[int], records, maker: SampleMaker, cfg, bar) -> dict:
    """Encode one part into chunk files in ``split_dir``; returns its manifest entry and litdata config."""
    from litdata.streaming.writer import BinaryWriter  # heavy: only writing shards needs it

    tmp = split_dir / f".part-{part:05d}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed inside this part
    chunks_per_part = -(-cfg.part_size // cfg.chunk_size)
    writer = BinaryWriter(str(tmp), chunk_size=cfg.chunk_size, chunk_index=part * chunks_per_part)
    t5_tokens = 0
    for start in range(0, len(indices), cfg.batch_size):
        batch = indices[start : start + cfg.batch_size]
        for sample in maker([records[i] for i in batch], batch):
            writer.add_item(sample["index"] - indices[0], sample)
            t5_tokens += sample["t5_length"]
        bar.update(len(batch))
    writer.done()
    (index_file,) = tmp.glob("*.index.json")
    written = json.loads(index_file.read_text())
    chunks = []
    for info in written["chunks"]:
        digest = file_sha256(tmp / info["filename"])
        os.replace(tmp / info["filename"], split_dir / info["filename"])
        chunks.append({**info, "sha256": digest})
    shutil.rmtree(tmp)
    entry = {
        "part": part,
        "first": indices[0],
        "samples": len(indices),
        "t5_tokens": t5_tokens,
        "chunks": chunks,
    }
    return {"entry": entry, "config": written["config"]}


def _finish_split(split_dir: Path, split: dict) -> None:
    """The split's litdata ``index.json``: every part's chunks, in sample order."""
    chunks = [
        {k: v for k, v in info.items() if k != "sha256"}
        for part in sorted(split["parts"], key=lambda p: p["part"])
        for info in part["chunks"]
    ]
    index = {"chunks": chunks, "config": split["litdata_config"], "updated_at": str(time.time())}
    _write_json(split_dir / "index.json", index)


def dataset_sha256(manifest: dict) -> str:
    """One hash over every chunk of every split (what a training checkpoint records as its data)."""
    digests = [c["sha256"] for s in SPLITS for p in manifest["splits"][s]["parts"] for c in p["chunks"]]
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def _existing_manifest(out: Path, identity: dict, fingerprint: str) -> dict | None:
    """The manifest of a resumable earlier run into ``out``; refuses folders it must not write into."""
    path = out / MANIFEST
    if not path.exists():
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UserError(f"output_dir {out}: exists and holds no {MANIFEST}; refusing to write into it")
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg}); use a new output_dir") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path}: format {manifest.get('format')!r}, not {FORMAT!r}; use a new output_dir")
    if manifest["fingerprint"] != fingerprint:
        old = manifest.get("identity", {})
        changed = sorted(k for k in identity.keys() | old.keys() if identity.get(k) != old.get(k))
        raise UserError(
            f"output_dir {out}: holds data prepared with other settings (changed: {', '.join(changed)}); it is kept "
            "untouched — use a new output_dir"
        )
    return manifest


def prepare_data(data: PrepareConfig, progress: bool = True) -> dict[str, Any]:
    """Encode prompts (and images) with a FLUX pipeline into resumable litdata shards for latent training.

    Args:
        data: What to read, how to encode it and where to write it.
        progress: Show a progress bar.
    """
    cfg = data
    out = Path(cfg.output_dir)
    records = read_prompts(cfg.prompts)[: cfg.limit]
    identity = cfg.identity(file_sha256(Path(cfg.prompts)))
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    manifest = _existing_manifest(out, identity, fingerprint)
    if manifest is not None and manifest["complete"]:
        print(f"prepare-data: {out} is complete ({_counts(manifest)}); nothing to do")
        return _summary(out, manifest)
    plan = _plan(records, cfg)
    image_root = Path(cfg.image_root) if cfg.image_root else Path(cfg.prompts).resolve().parent
    maker = SampleMaker(load_pipeline(cfg), cfg, image_root)
    model = {"pipeline": cfg.pipeline} | maker.model_identity()
    if manifest is None:
        manifest = {
            "format": FORMAT,
            "fingerprint": fingerprint,
            "identity": identity,
            "config": asdict(cfg),
            "model": model,
            "resolution": [cfg.resolution, cfg.resolution],
            "latent_shape": maker.latent_shape,
            "t5_width": maker.t5_width,
            "pooled_width": maker.pooled_width,
            "max_sequence_length": cfg.max_sequence_length,
            "t5_padding": cfg.t5_padding,
            "latents_from": cfg.latents,
            "storage": "bfloat16 tensors stored as int16 views",
            "splits": {s: {"samples": sum(map(len, plan[s])), "parts": [], "litdata_config": None} for s in SPLITS},
            "complete": False,
        }
        for split in SPLITS:
            (out / split).mkdir(parents=True, exist_ok=True)
        _write_json(out / MANIFEST, manifest)
    elif changed := sorted(k for k in model if k != "pipeline" and model[k] != manifest["model"].get(k)):
        raise UserError(
            f"{out / MANIFEST}: its finished parts were made with another model ({', '.join(changed)} differ); it is "
            "kept untouched — use a new output_dir"
        )
    todo = [(s, k) for s in SPLITS for k in range(len(plan[s])) if k not in _done_parts(manifest, s)]
    with tqdm(
        total=sum(len(plan[s][k]) for s, k in todo), desc="prepare-data", unit="sample", disable=not progress
    ) as bar:
        for split, k in todo:
            written = _write_part(out / split, k, plan[split][k], records, maker, cfg, bar)
            entry = manifest["splits"][split]
            entry["litdata_config"] = entry["litdata_config"] or written["config"]
            entry["parts"].append(written["entry"])
            _write_json(out / MANIFEST, manifest)
    for split in SPLITS:
        if manifest["splits"][split]["samples"]:
            _finish_split(out / split, manifest["splits"][split])
    train = manifest["splits"]["train"]
    manifest["t5_length_mean"] = sum(p["t5_tokens"] for p in train["parts"]) / train["samples"]
    manifest["dataset_sha256"] = dataset_sha256(manifest)
    manifest["complete"] = True
    _write_json(out / MANIFEST, manifest)
    print(f"prepare-data: wrote {out} ({_counts(manifest)})")
    return _summary(out, manifest)


def _done_parts(manifest: dict, split: str) -> set[int]:
    return {p["part"] for p in manifest["splits"][split]["parts"]}


def _counts(manifest: dict) -> str:
    return ", ".join(f"{manifest['splits'][s]['samples']} {s}" for s in SPLITS)


def _summary(out: Path, manifest: dict) -> dict[str, Any]:
    return {"output_dir": str(out), "manifest": str(out / MANIFEST)} | {
        s: manifest["splits"][s]["samples"] for s in SPLITS
    }


__all__ = [
    "PrepareConfig",
    "prepare_data",
    "read_prompts",
    "load_pipeline",
    "config_class_name",
    "is_flux_pipeline_class",
    "dataset_sha256",
    "MANIFEST",
    "FORMAT",
]
