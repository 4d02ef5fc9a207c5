"""What every LightningModule here shares: held-out GenEval scoring of the embedded world during validation.

The teacher and the distillation stages differ only in their training step; they generate through the same
``ShapesPipeline`` and are judged by the same detector and rules, so their numbers are comparable.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.utils import make_grid

from evaluation.detectors import image_scorer, metric_prefix
from evaluation.geneval import result_record, summarize
from src.models.pipeline import ShapesPipeline


class FlowModule(L.LightningModule):
    """Base class: subclasses set ``self.pipeline`` and return the model to sample from in ``sampling_model``."""

    pipeline: ShapesPipeline
    world: str = "shapes"
    """The embedded world whose detector scores validation images (subclasses set it from their teacher)."""

    def __init__(self) -> None:
        super().__init__()
        self._val_records: list[dict] = []
        self._val_images: list[np.ndarray] = []

    def sampling_model(self) -> nn.Module:
        raise NotImplementedError

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        metadata, seeds = batch["metadata"], batch["seed"]
        images = self.pipeline([m["prompt"] for m in metadata], seeds, self.sampling_model())
        scorer = image_scorer(self.world)
        for i, (image, meta) in enumerate(zip(images, metadata)):
            correct, reason, detections = scorer(image, meta)
            self._val_records.append(result_record(f"{batch_idx:05d}/{i:04d}.png", meta, correct, reason, detections))
        if batch_idx == 0:
            self._val_images.extend(images[:32])

    def on_validation_epoch_end(self) -> None:
        records, images = self._val_records, self._val_images
        self._val_records, self._val_images = [], []
        if not records or self.trainer.sanity_checking:
            return
        summary = summarize(records)
        prefix = metric_prefix(self.world)
        metrics = {f"val/{prefix}/{task}": acc for task, acc in summary["tasks"].items()}
        metrics[f"val/{prefix}/overall"] = summary["overall"]
        self.log_dict(metrics, sync_dist=True)
        self.log("val_overall", summary["overall"], prog_bar=True, sync_dist=True)
        if hasattr(self.logger, "log_image") and images:
            self.logger.log_image(image_grid(images), f"samples/step_{self.global_step:07d}.png")


def image_grid(images: list[np.ndarray] | np.ndarray, cols: int = 8, scale: int = 4, pad: int = 2) -> np.ndarray:
    """Tile uint8 (H, W, 3) images into one grid, upscaled (nearest) so 32×32 samples are visible.

    `cols` columns even when there are fewer images, white padding and white cells after the last image.
    """
    tiles_BCHW = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    tiles_BCHW = tiles_BCHW.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    rows = (len(tiles_BCHW) + cols - 1) // cols
    # blank cells up to `cols` columns (make_grid narrows a short single row; a lone image gets no border)
    blank = tiles_BCHW.new_full((rows * cols - len(tiles_BCHW), *tiles_BCHW.shape[1:]), 255)
    grid_CHW = make_grid(torch.cat([tiles_BCHW, blank]), nrow=cols, padding=pad, pad_value=255)
    if rows * cols == 1:
        grid_CHW = F.pad(grid_CHW, (pad, pad, pad, pad), value=255)
    return np.ascontiguousarray(grid_CHW.permute(1, 2, 0).numpy())
