"""A classical (weight-free) detector for the shapes world, feeding GenEval's rules.

Pipeline: each pixel is explained as a blend of the background and one palette colour (the blend weight alpha
is the projection of pixel − background on palette colour − background; the colour is the one with the smallest
residual), so soft edges of a generated image keep their object's colour instead of snapping to whichever
palette entry is nearest in RGB. Pixels with alpha >= 0.5 that a palette colour explains well are foreground;
8-connected foreground components are objects (a component made of two large single-colour parts is split by
colour). Each object's shape is the prototype (``src.data.shapes.shape_mask`` stretched to the object's box)
with the highest IoU against its mask. Clean renders match their prototype exactly (score 1.0, so counting's
0.9 threshold passes); blur, noise, wrong colours and elongated boxes lower the score.

Boxes follow ``ShapeObject.box``: [x1, y1, x2, y2] with x2, y2 exclusive. Legend: H, W image height and width,
K palette colours.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import ndimage

from evaluation.geneval import Detection, evaluate_detections, filter_detections
from src.data.shapes import BACKGROUND, PALETTE, SHAPES, shape_mask

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@lru_cache(maxsize=4096)
def _prototype(shape: str, height: int, width: int) -> np.ndarray:
    mask = shape_mask(shape, height, width)
    mask.flags.writeable = False
    return mask


def classify_pixels(
    image: np.ndarray,
    palette: dict[str, tuple[int, int, int]] = PALETTE,
    background: tuple[int, int, int] = BACKGROUND,
    min_alpha: float = 0.5,
    max_residual: float = 0.45,
) -> np.ndarray:
    """Per-pixel palette index (H, W), -1 for background or pixels no palette colour explains."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image shape={image.shape} dtype={image.dtype}: must be (H, W, 3) uint8 RGB")
    offset_HW3 = image.astype(np.float32) - np.asarray(background, dtype=np.float32)
    dirs_K3 = np.asarray(list(palette.values()), dtype=np.float32) - np.asarray(background, dtype=np.float32)
    # Overshoot (alpha > 1) is allowed a little: generated colours are often more saturated than the palette.
    alpha_HWK = np.clip(offset_HW3 @ dirs_K3.T / (dirs_K3**2).sum(1), 0.0, 1.5)
    residual_HWK = np.linalg.norm(offset_HW3[:, :, None, :] - alpha_HWK[..., None] * dirs_K3, axis=-1)
    best_HW = residual_HWK.argmin(-1)
    alpha_HW = np.take_along_axis(alpha_HWK, best_HW[..., None], -1)[..., 0]
    residual_HW = np.take_along_axis(residual_HWK, best_HW[..., None], -1)[..., 0]
    # Residual relative to the pixel's distance from the background: brightness-independent colour purity.
    explained_HW = residual_HW <= max_residual * np.linalg.norm(offset_HW3, axis=-1)
    return np.where((alpha_HW >= min_alpha) & explained_HW, best_HW, -1)


def _objects(labels_HW: np.ndarray, n_colors: int, min_pixels: int) -> list[tuple[np.ndarray, int, float]]:
    """(mask, palette index, colour purity) per object: foreground components, split when two colours dominate."""
    components, n = ndimage.label(labels_HW >= 0, structure=_EIGHT_CONNECTED)
    objects = []
    for index, region in enumerate(ndimage.find_objects(components), start=1):
        mask = np.zeros_like(labels_HW, dtype=bool)
        mask[region] = components[region] == index
        size = int(mask.sum())
        if size < min_pixels:
            continue
        counts = np.bincount(labels_HW[mask], minlength=n_colors)
        major = np.flatnonzero(counts >= max(min_pixels, 0.25 * size))
        if len(major) <= 1:
            objects.append((mask, int(counts.argmax()), float(counts.max() / size)))
            continue
        for color in major:
            parts, n_parts = ndimage.label(mask & (labels_HW == color), structure=_EIGHT_CONNECTED)
            for part in range(1, n_parts + 1):
                part_mask = parts == part
                if part_mask.sum() >= min_pixels:
                    objects.append((part_mask, int(color), 1.0))
    return objects


def detect_shapes(
    image: np.ndarray,
    palette: dict[str, tuple[int, int, int]] = PALETTE,
    background: tuple[int, int, int] = BACKGROUND,
    min_pixels: int = 6,
    min_side: int = 3,
    min_aspect: float = 0.75,
) -> dict[str, list[Detection]]:
    """Detections per shape class: {"box": [x1, y1, x2, y2], "score", "color", "shape_ious"}, best score first.

    score = prototype IoU x colour purity x aspect factor (1 for boxes up to 4:3, falling linearly beyond), so a
    clean render scores 1.0. Components smaller than `min_pixels` or thinner than `min_side` are noise.
    """
    labels_HW = classify_pixels(image, palette, background)
    names = list(palette)
    detections: dict[str, list[Detection]] = {}
    for mask, color, purity in _objects(labels_HW, len(names), min_pixels):
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        y1, y2, x1, x2 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        height, width = y2 - y1, x2 - x1
        if min(height, width) < min_side:
            continue
        crop = mask[y1:y2, x1:x2]
        ious = {}
        for shape in SHAPES:
            prototype = _prototype(shape, int(height), int(width))
            ious[shape] = float((crop & prototype).sum() / (crop | prototype).sum())
        shape = max(ious, key=ious.get)
        aspect = min(1.0, min(height, width) / max(height, width) / min_aspect)
        detections.setdefault(shape, []).append(
            {
                "box": [float(x1), float(y1), float(x2), float(y2)],
                "score": ious[shape] * purity * aspect,
                "color": names[color],
                "shape_ious": ious,
            }
        )
    for found in detections.values():
        found.sort(key=lambda d: d["score"], reverse=True)
    return detections


def evaluate_shapes_image(image: np.ndarray, metadata: dict) -> tuple[bool, str, dict[str, list[Detection]]]:
    """Detect → GenEval filtering for the metadata's task → GenEval verdict: (correct, reason, kept detections)."""
    detections = filter_detections(detect_shapes(image), metadata["tag"])
    correct, reason = evaluate_detections(metadata, detections)
    return correct, reason, detections
