"""Streaming LightningDataModule over the latent shards ``prepare-data`` writes (FLUX.1-dev scale training).

``path`` is the prepared folder or any URL litdata streams from (``s3://``, ``gs://``, ``azure://``, ``hf://``,
``local:``). The manifest is read and checked before anything trains: it must be complete, of this format, and
its shapes must fit the teacher (``in_channels`` = 4 × latent channels after 2×2 packing, ``joint_attention_dim``
= T5 width, ``pooled_projection_dim`` = CLIP width). Local chunk files are checked against the manifest (size, or
sha256 with ``verify="hash"``), so a truncated or damaged shard is named before it can stall or corrupt a step.

litdata gives each DDP rank and each loader worker its own share of the chunks (``drop_last`` keeps ranks in step)
and reshuffles every epoch. The ``StreamingDataLoader`` is stateful: Lightning stores its position in every
checkpoint and restores it on resume, so a stage continues mid-epoch with the next unseen batch. The datamodule's
own state records the dataset's hash and refuses a checkpoint trained on other data.

Batches: ``latents`` (B, C, h, w) bf16, ``t5`` (B, T, E) bf16 zero-padded to the batch's longest prompt,
``t5_length`` (B,), ``pooled`` (B, P) bf16, ``prompt`` [B], ``index`` (B,). Legend as in src/data/prepare.py.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch

from src.data.prepare import FORMAT, MANIFEST, file_sha256
from src.errors import UserError

VERIFY = ("none", "size", "hash")
SPLITS = ("train", "heldout")


def is_remote(path: str) -> bool:
    return "://" in path or path.startswith("local:")


def _join(path: str, name: str) -> str:
    return f"{path.rstrip('/')}/{name}" if is_remote(path) else str(Path(path) / name)


def load_manifest(path: str, cache_dir: str | None = None) -> dict[str, Any]:
    """The manifest of a prepared folder or URL; one-line errors naming the file."""
    where = _join(path, MANIFEST)
    if is_remote(path):
        from litdata.streaming.downloader import get_downloader  # heavy: only remote shards need it

        if cache_dir:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
        local = Path(tempfile.mkdtemp(dir=cache_dir)) / MANIFEST
        try:
            get_downloader(path, str(local.parent), []).download_file(where, str(local))
        except Exception as exc:  # noqa: BLE001 - each object store raises its own types
            raise UserError(f"data {where}: cannot be fetched ({str(exc).strip().splitlines()[0][:160]})") from None
    else:
        local = Path(where)
        if not local.is_file():
            raise UserError(f"data {where}: no such file (run prepare-data, or point data.path at its output_dir)")
    try:
        manifest = json.loads(local.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"data {where}: not valid JSON ({exc.msg})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"data {where}: not a prepare-data manifest (format {FORMAT!r})")
    if not manifest.get("complete"):
        raise UserError(
            f"data {where}: prepare-data did not finish; rerun the same prepare-data command to complete it"
        )
    return manifest


def check_manifest(manifest: dict, teacher_config: Any, where: str) -> None:
    """The prepared data must fit the teacher it trains against (its latents, T5 and CLIP widths)."""
    channels = manifest["latent_shape"][0]
    wanted = {
        "in_channels": (4 * channels, f"{channels} latent channels × 2×2 packing"),
        "joint_attention_dim": (manifest["t5_width"], "the T5 width"),
        "pooled_projection_dim": (manifest["pooled_width"], "the pooled CLIP width"),
    }
    wrong = [
        f"teacher {key}={teacher_config[key]} but the data gives {value} ({what})"
        for key, (value, what) in wanted.items()
        if teacher_config[key] != value
    ]
    if wrong:
        raise UserError(
            f"data {where}: does not fit the teacher: {'; '.join(wrong)}; prepare the data with this teacher's pipeline"
        )


def verify_shards(path: str, manifest: dict, split: str, verify: str) -> None:
    """Every chunk of a local split exists with the manifest's size (and sha256 for ``verify="hash"``)."""
    if verify == "none" or is_remote(path):
        return
    for part in manifest["splits"][split]["parts"]:
        for chunk in part["chunks"]:
            file = Path(path) / split / chunk["filename"]
            if not file.is_file():
                raise UserError(f"shard {file}: missing (listed in {Path(path) / MANIFEST})")
            size = file.stat().st_size
            if size != chunk["chunk_bytes"]:
                raise UserError(f"shard {file}: {size} bytes, the manifest says {chunk['chunk_bytes']} (truncated?)")
            if verify == "hash" and file_sha256(file) != chunk["sha256"]:
                raise UserError(f"shard {file}: sha256 differs from the manifest's (the file is corrupted)")


def collate_latents(samples: list[dict], latent_shape: list[int], t5_width: int, pooled_width: int) -> dict:
    """Stack samples; T5 embeddings zero-padded to the longest in the batch. bf16 comes back from its int16 view."""
    for s in samples:
        shapes = (list(s["latents"].shape), s["t5"].shape[1:], s["pooled"].shape)
        if shapes != (latent_shape, (t5_width,), (pooled_width,)) or s["t5"].dtype != torch.int16:
            raise UserError(
                f"sample {s.get('index')}: shapes {shapes} differ from the manifest's; a shard is corrupted — "
                "train with data.verify=hash to find it"
            )
    lengths = [s["t5"].shape[0] for s in samples]
    t5_BTE = torch.zeros(len(samples), max(lengths), t5_width, dtype=torch.int16)
    for i, s in enumerate(samples):
        t5_BTE[i, : lengths[i]] = s["t5"]
    return {
        "latents": torch.stack([s["latents"] for s in samples]).view(torch.bfloat16),
        "t5": t5_BTE.view(torch.bfloat16),  # int16 zeros are bf16 zeros
        "t5_length": torch.tensor([int(s["t5_length"]) for s in samples]),
        "pooled": torch.stack([s["pooled"] for s in samples]).view(torch.bfloat16),
        "prompt": [s["prompt"] for s in samples],
        "index": torch.tensor([int(s["index"]) for s in samples]),
    }


class LatentDataModule(L.LightningDataModule):
    def __init__(
        self,
        path: str,
        batch_size: int = 8,
        seed: int = 0,
        split: str = "train",
        shuffle: bool = True,
        drop_last: bool = True,
        num_workers: int = 0,
        teacher_config: Any = None,
        verify: str = "size",
        cache_dir: str | None = None,
    ) -> None:
        """
        Args:
            path: prepare-data output folder or URL (s3://, gs://, …).
            batch_size: Samples per batch (per device under DDP).
            seed: Shuffle seed (litdata reshuffles every epoch from it).
            split: "train" or "heldout".
            shuffle: Shuffle chunks and samples.
            drop_last: Drop the last incomplete batch (keeps DDP ranks in step).
            num_workers: DataLoader worker processes.
            teacher_config: The teacher's config; the data must fit it (None: not checked).
            verify: Local shard check before loading: "none", "size" or "hash" (reads every chunk).
            cache_dir: Local cache for chunks streamed from an object store (default: litdata's).
        """
        super().__init__()
        if split not in SPLITS:
            raise ValueError(f"split={split!r}; allowed {list(SPLITS)}")
        if verify not in VERIFY:
            raise ValueError(f"verify={verify!r}; allowed {list(VERIFY)}")
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size={batch_size}, num_workers={num_workers}: need batch_size >= 1, workers >= 0")
        self.path, self.split, self.batch_size, self.seed = path, split, batch_size, seed
        self.shuffle, self.drop_last, self.num_workers, self.cache_dir = (
            shuffle,
            drop_last,
            num_workers,
            cache_dir,
        )
        self.manifest = load_manifest(path, cache_dir)
        where = _join(path, MANIFEST)
        if teacher_config is not None:
            check_manifest(self.manifest, teacher_config, where)
        self.samples = self.manifest["splits"][split]["samples"]
        if self.samples < (batch_size if drop_last else 1):
            raise UserError(f"data {where}: {self.samples} {split} samples, fewer than batch_size={batch_size}")
        verify_shards(path, self.manifest, split, verify)
        self.collate = functools.partial(
            collate_latents,
            latent_shape=list(self.manifest["latent_shape"]),
            t5_width=self.manifest["t5_width"],
            pooled_width=self.manifest["pooled_width"],
        )

    def dataloader(self):
        from litdata import StreamingDataLoader, StreamingDataset  # heavy: only the latent path needs litdata

        source = _join(self.path, self.split)
        dataset = StreamingDataset(
            source if is_remote(source) else str(Path(source).resolve()),
            cache_dir=self.cache_dir,
            shuffle=self.shuffle,
            drop_last=self.drop_last,
            seed=self.seed,
        )
        return StreamingDataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=self.collate,
            drop_last=self.drop_last,
        )

    def train_dataloader(self):
        return self.dataloader()

    def state_dict(self) -> dict[str, Any]:
        return {"dataset_sha256": self.manifest["dataset_sha256"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("dataset_sha256") != self.manifest["dataset_sha256"]:
            raise UserError(
                f"data {self.path}: the checkpoint being resumed was trained on other prepared data; resume it with "
                "that data or start a new output_dir"
            )


__all__ = [
    "LatentDataModule",
    "load_manifest",
    "check_manifest",
    "verify_shards",
    "collate_latents",
    "is_remote",
]
