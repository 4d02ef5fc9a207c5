"""Class-conditional image quality: FID (torchmetrics) and class accuracy (the shapes detector, no weights).

FID uses torchmetrics' ``FrechetInceptionDistance`` with the standard FID Inception-v3 (the TF 2015-12-05 graph
ported by torch-fidelity, which torchmetrics builds its feature extractor from). Nothing is downloaded: the
weights come from a local file (``weights_path``) and a missing file or package is one clear error. FID of
32×32 shapes renders upsampled to 299 px is only comparable between runs of this project, not with ImageNet
figures.

Class accuracy: an image of class (shape, colour) is correct when the detector, after GenEval's score
threshold, finds exactly one object and it has that shape and colour.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from evaluation.geneval import filter_detections
from evaluation.shapes_detector import detect_shapes
from src.data.classes import CLASSES
from src.errors import UserError

FID_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)


def check_fid_available(weights_path: str | Path) -> None:
    """Raise a one-line UserError unless the Inception weights file and torch-fidelity are both there."""
    path = Path(weights_path)
    if not path.is_file():
        raise UserError(
            f"FID Inception weights {path}: no such file; download {FID_WEIGHTS_URL} on a machine with internet "
            "access, copy it there (or pass its path as fid_weights), or set fid_weights to null to skip FID"
        )
    if importlib.util.find_spec("torch_fidelity") is None:
        raise UserError(
            "FID needs the torch-fidelity package (torchmetrics' Inception feature extractor): "
            "pip install torch-fidelity, or set fid_weights to null to skip FID"
        )


def fid_metric(weights_path: str | Path, feature: int = 2048):
    """A ``FrechetInceptionDistance`` that keeps its real statistics across ``reset()`` (add them once)."""
    check_fid_available(weights_path)
    from torchmetrics.image.fid import FrechetInceptionDistance  # heavy (torch-fidelity): only the FID path

    return FrechetInceptionDistance(
        feature=feature, reset_real_features=False, feature_extractor_weights_path=str(weights_path)
    )


def fid_input(images_BHW3: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) images → the uint8 (B, 3, H, W) tensor FrechetInceptionDistance.update expects."""
    images = torch.as_tensor(np.asarray(images_BHW3))
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images {tuple(images.shape)} {images.dtype}: must be uint8 (B, H, W, 3)")
    return images.permute(0, 3, 1, 2).contiguous()


def class_correct(image: np.ndarray, label: int) -> bool:
    """Exactly one detected object, with the class's shape and colour."""
    shape, color = CLASSES[label]
    detections = filter_detections(detect_shapes(image), "colors")
    found = [(cls, d["color"]) for cls, kept in detections.items() for d in kept]
    return found == [(shape, color)]


def class_accuracy(images: list[np.ndarray] | np.ndarray, labels: list[int]) -> dict[str, float]:
    """{"accuracy": overall, "accuracy/<colour> <shape>": per class} over uint8 (H, W, 3) images."""
    if len(images) != len(labels) or not labels:
        raise ValueError(f"{len(images)} images and {len(labels)} labels: need the same, non-zero number")
    hits: dict[int, list[bool]] = {}
    for image, label in zip(images, labels):
        hits.setdefault(int(label), []).append(class_correct(image, int(label)))
    every = [h for per_class in hits.values() for h in per_class]
    out = {"accuracy": float(np.mean(every))}
    for label in sorted(hits):
        shape, color = CLASSES[label]
        out[f"accuracy/{color} {shape}"] = float(np.mean(hits[label]))
    return out
