"""Class-conditional shapes: 24 classes (4 shapes × 6 colours), one object per image, for the DiT recipe.

Class c is ``CLASSES[c]`` = (shape, colour), in the order of ``task_compositions("colors")``. Training batches
are rendered from seeds (``seed``, batch index, position) like ``src.data.datamodule``: an infinite stream that
is identical on every machine and resumes where a checkpoint stopped. Validation is a fixed list of
(label, seed) pairs, ``val_images_per_class`` per class, so every model is judged on the same noise.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from src.data.datamodule import ResumableStreamDataModule, ShapesStream, images_to_tensor
from src.data.shapes import ShapesWorld, task_compositions

CLASS_METADATA: list[dict] = task_compositions("colors")
CLASSES: list[tuple[str, str]] = [(m["include"][0]["class"], m["include"][0]["color"]) for m in CLASS_METADATA]
"""(shape, colour) of each class index."""


def class_name(label: int) -> str:
    shape, color = CLASSES[label]
    return f"{color} {shape}"


class ClassShapesStream(ShapesStream):
    """Infinite stream of batches {"image": (B, 3, H, W) in [-1, 1], "label": (B,) long, "index": int}."""

    def sample(self, seed: int) -> tuple[np.ndarray, int]:
        rng = np.random.Generator(np.random.PCG64(seed))
        label = int(rng.integers(len(CLASSES)))
        image, _ = self.world.render(CLASS_METADATA[label], rng)
        return image, label

    def batch(self, index: int) -> dict:
        samples = [self.sample(seed) for seed in self.sample_seeds(index)]
        label = torch.tensor([lab for _, lab in samples], dtype=torch.long)
        return {"image": images_to_tensor([im for im, _ in samples]), "label": label, "index": index}


class ClassSeeds(Dataset):
    """(label, seed) pairs: ``per_class`` per class, class-major."""

    def __init__(self, per_class: int, seed: int) -> None:
        self.items = [(c, seed * 1_000_003 + c * per_class + k) for c in range(len(CLASSES)) for k in range(per_class)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, int]:
        return self.items[i]


def collate_seeds(items: list[tuple[int, int]]) -> dict:
    return {"label": torch.tensor([c for c, _ in items], dtype=torch.long), "seed": [s for _, s in items]}


class ClassShapesDataModule(ResumableStreamDataModule):
    def __init__(
        self,
        image_size: int = 32,
        batch_size: int = 64,
        seed: int = 0,
        snap: int = 1,
        val_images_per_class: int = 4,
        val_batch_size: int = 96,
        val_seed: int = 1234,
    ) -> None:
        """
        Args:
            image_size: Rendered image side in pixels.
            batch_size: Training batch size.
            seed: Seed of the training stream.
            snap: Object boxes on a grid of this many pixels (1 = free placement).
            val_images_per_class: Generated images per class at each validation (class accuracy, FID, grid).
            val_batch_size: Images generated per validation batch.
            val_seed: Seed of the validation noise and of the FID reference images.
        """
        super().__init__()
        self.save_hyperparameters()
        if batch_size < 1 or val_batch_size < 1 or val_images_per_class < 1:
            raise ValueError(
                f"batch_size={batch_size}, val_batch_size={val_batch_size}, val_images_per_class="
                f"{val_images_per_class}: must all be >= 1"
            )
        # heldout_fraction only concerns GenEval prompts; every class is trained here.
        self.world = ShapesWorld(size=image_size, heldout_fraction=0.0, snap=snap)
        self.train_stream = ClassShapesStream(self.world, batch_size, seed)

    @property
    def num_classes(self) -> int:
        return len(CLASSES)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_stream, batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        hp = self.hparams
        data = ClassSeeds(hp.val_images_per_class, hp.val_seed)
        return DataLoader(data, batch_size=hp.val_batch_size, shuffle=False, collate_fn=collate_seeds)

    def reference_images(self, per_class: int) -> np.ndarray:
        """Real uint8 (24·per_class, H, W, 3) renders, class-major, from seed sequences training never uses."""
        images = []
        for c in range(len(CLASSES)):
            for k in range(per_class):
                rng = np.random.Generator(np.random.PCG64([self.hparams.val_seed, c, k]))
                images.append(self.world.render(CLASS_METADATA[c], rng)[0])
        return np.stack(images)
