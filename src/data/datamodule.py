"""Streaming LightningDataModule over the procedural shapes world.

Training batches are rendered on the fly from seeds (``seed``, batch index, position), so the stream is infinite,
identical on every machine, and resumable: the datamodule's state is the index after the last batch a training
step consumed (the loader may have prefetched further), saved in Lightning checkpoints and restored on resume. Validation draws GenEval-style held-out compositions with fixed per-image seeds, so every model sees
the same prompts and the same noise.
"""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from src.data.shapes import TASKS
from src.data.worlds import World, make_world


def images_to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) renders → float (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


class ShapesStream(IterableDataset):
    """Infinite stream of ready-made batches: {"image": (B, 3, H, W) in [-1, 1], "prompt": [...], "metadata": [...]}."""

    def __init__(self, world: World, batch_size: int, seed: int) -> None:
        self.world, self.batch_size, self.seed = world, batch_size, seed
        self.next_batch = 0
        # Data-parallel slice: batch ``index`` is rank ``rank``'s part of the global batch of batch_size × ranks,
        # so R ranks × batch b see exactly the samples one process with batch R·b sees.
        self.rank, self.ranks = 0, 1

    def sample_seeds(self, index: int) -> range:
        """The per-sample seeds of batch ``index`` (this rank's slice of the global batch)."""
        base = (self.seed * 1_000_003 + index) * self.batch_size * self.ranks + self.rank * self.batch_size
        return range(base, base + self.batch_size)

    def batch(self, index: int) -> dict:
        samples = [self.world.train_sample(seed) for seed in self.sample_seeds(index)]
        metadata = [m for _, m in samples]
        image = images_to_tensor([im for im, _ in samples])
        return {"image": image, "prompt": [m["prompt"] for m in metadata], "metadata": metadata, "index": index}

    def __iter__(self) -> Iterator[dict]:
        while True:
            index = self.next_batch
            self.next_batch += 1
            yield self.batch(index)


class HeldoutPrompts(Dataset):
    """(metadata, seed) pairs: each held-out prompt repeated ``images_per_prompt`` times with its own seed."""

    def __init__(self, metadata: list[dict], images_per_prompt: int, seed: int) -> None:
        self.items = [
            (meta, seed * 1_000_003 + i * images_per_prompt + k)
            for i, meta in enumerate(metadata)
            for k in range(images_per_prompt)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[dict, int]:
        return self.items[i]


def collate_heldout(items: list[tuple[dict, int]]) -> dict:
    return {"metadata": [m for m, _ in items], "seed": [s for _, s in items]}


class ResumableStreamDataModule(L.LightningDataModule):
    """A data module whose training data is a seeded stream of numbered batches (``self.train_stream``, whose
    ``next_batch`` it sets): the checkpoint records the next batch to draw, so a resumed run continues the stream
    where it stopped instead of replaying it."""

    def __init__(self) -> None:
        super().__init__()
        self._consumed = -1

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer is not None and self.trainer.training and "index" in batch:
            self._consumed = int(batch["index"])
        return batch

    def state_dict(self) -> dict:
        return {"next_batch": self._consumed + 1}

    def load_state_dict(self, state: dict) -> None:
        self._consumed = int(state["next_batch"]) - 1
        self.train_stream.next_batch = int(state["next_batch"])


class ShapesDataModule(ResumableStreamDataModule):
    def __init__(
        self,
        image_size: int = 32,
        batch_size: int = 64,
        seed: int = 0,
        heldout_fraction: float = 0.2,
        val_prompts_per_task: int = 16,
        val_images_per_prompt: int = 1,
        val_batch_size: int = 128,
        val_seed: int = 1234,
        snap: int = 1,
        cells: bool = False,
        world: str = "shapes",
    ) -> None:
        """
        Args:
            image_size: Rendered image side in pixels.
            batch_size: Training batch size.
            seed: Seed of the training stream.
            heldout_fraction: Fraction of compositions reserved for evaluation (never trained on).
            val_prompts_per_task: Held-out prompts per GenEval task scored at each validation.
            val_images_per_prompt: Images per held-out prompt at validation.
            val_batch_size: Images generated per validation batch.
            val_seed: Seed of the held-out prompt draw and of the validation noise.
            snap: Object boxes lie on a grid of this many pixels (1 = free placement; see ``ShapesWorld.snap``).
            cells: One object per ``snap``-pixel cell (see ``ShapesWorld.cells``).
            world: "shapes" or "glyphs" (GenEval's 80 objects as glyphs; its held-out prompts are GenEval's own
                553, and heldout_fraction, snap and cells do not apply).
        """
        super().__init__()
        self.save_hyperparameters()
        if batch_size < 1 or val_batch_size < 1:
            raise ValueError(f"batch_size={batch_size}, val_batch_size={val_batch_size}: must be >= 1")
        self.world = make_world(world, image_size, heldout_fraction, snap, cells)
        self.world_name = world
        self.train_stream = ShapesStream(self.world, batch_size, seed)

    def train_dataloader(self) -> DataLoader:
        if self.trainer is not None:
            self.train_stream.rank, self.train_stream.ranks = self.trainer.global_rank, self.trainer.world_size
        return DataLoader(self.train_stream, batch_size=None, num_workers=0)

    def heldout_metadata(self, per_task: int | None = None) -> list[dict]:
        n = per_task or self.hparams.val_prompts_per_task
        return self.world.heldout_metadata({task: n for task in TASKS}, seed=self.hparams.val_seed)

    def val_dataloader(self) -> DataLoader:
        hp = self.hparams
        data = HeldoutPrompts(self.heldout_metadata(), hp.val_images_per_prompt, hp.val_seed)
        return DataLoader(data, batch_size=hp.val_batch_size, shuffle=False, collate_fn=collate_heldout)
