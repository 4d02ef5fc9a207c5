"""A classical (weight-free) detector for the GenEval-glyphs world, feeding GenEval's rules.

It knows the world's geometry and its codebook, nothing learned: every cell of the board is read on its own.

1. **Presence and colour**: pixels of the cell's 6×6 glyph box further than ``min_offset`` RGB units from the
   background are ink. A cell with fewer than ``min_ink`` ink pixels is empty. The object's colour is the palette
   colour nearest (RGB) to the median ink pixel.
2. **Pattern**: each pixel of the box is lit when it is nearer the object's colour than the background; the
   glyph is the codebook entry at the smallest Hamming distance h from that pattern (ties: the earlier class in
   GenEval's vocabulary order).
3. **Score**: ``max(0, 1 − h / d)`` with d the codebook's minimum distance. A clean render scores 1.0; one wrong
   pixel 1 − 1/d (≥ 0.9 for d ≥ 10, so counting's 0.9 threshold allows a single error); a random pattern (h ≈ d)
   scores ≈ 0 and is dropped by GenEval's 0.3 threshold. ``color_purity`` (share of ink pixels whose nearest
   palette colour is the object's) is reported for diagnosis and does not enter the score: pixel noise moves
   single pixels between neighbouring colours (brown/black, pink/white) without changing the object's colour.

Boxes are the glyph boxes [x1, y1, x2, y2] (x2, y2 exclusive), like the renderer's. Legend: P pixels of a glyph
box, K palette colours, N glyphs.
"""

from __future__ import annotations

import numpy as np

from evaluation.geneval import Detection, evaluate_detections, filter_detections
from src.data.glyphs import CELL, CLASSES, GLYPH, GLYPH_BACKGROUND, GLYPH_PALETTE, GlyphWorld

_PALETTE_K3 = np.asarray(list(GLYPH_PALETTE.values()), dtype=np.float32)
_NAMES = list(GLYPH_PALETTE)


def detect_glyphs(
    image: np.ndarray, world: GlyphWorld, min_offset: float = 50.0, min_ink: int = 6
) -> dict[str, list[Detection]]:
    """Detections per class: {"box", "score", "color", "distance", "color_purity"}, best score first."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image shape={image.shape} dtype={image.dtype}: must be (H, W, 3) uint8 RGB")
    if image.shape[:2] != (world.size, world.size):
        raise ValueError(f"image {image.shape[1]}x{image.shape[0]}: the glyph world draws {world.size}x{world.size}")
    background_3 = np.asarray(GLYPH_BACKGROUND, dtype=np.float32)
    codes_NP = world.glyphs.reshape(len(world.glyphs), -1)
    detections: dict[str, list[Detection]] = {}
    for row in range(world.cells_per_side):
        for col in range(world.cells_per_side):
            x1, y1 = col * CELL + 1, row * CELL + 1
            pixels_P3 = image[y1 : y1 + GLYPH, x1 : x1 + GLYPH].reshape(-1, 3).astype(np.float32)
            ink_P = np.linalg.norm(pixels_P3 - background_3, axis=1) > min_offset
            if ink_P.sum() < min_ink:
                continue
            nearest_P = np.linalg.norm(pixels_P3[:, None] - _PALETTE_K3[None], axis=-1).argmin(1)
            median_3 = np.median(pixels_P3[ink_P], axis=0)
            color = int(np.linalg.norm(_PALETTE_K3 - median_3, axis=1).argmin())
            lit_P = np.linalg.norm(pixels_P3 - _PALETTE_K3[color], axis=1) < np.linalg.norm(
                pixels_P3 - background_3, axis=1
            )
            distances_N = (codes_NP != lit_P).sum(1)
            glyph = int(distances_N.argmin())
            purity = float((nearest_P[ink_P] == color).mean())
            score = max(0.0, 1.0 - distances_N[glyph] / world.min_distance)
            detections.setdefault(CLASSES[glyph], []).append(
                {
                    "box": [float(x1), float(y1), float(x1 + GLYPH), float(y1 + GLYPH)],
                    "score": score,
                    "color": _NAMES[color],
                    "distance": int(distances_N[glyph]),
                    "color_purity": purity,
                }
            )
    for found in detections.values():
        found.sort(key=lambda d: d["score"], reverse=True)
    return detections


def evaluate_glyph_image(
    image: np.ndarray, metadata: dict, world: GlyphWorld | None = None
) -> tuple[bool, str, dict[str, list[Detection]]]:
    """Detect → GenEval filtering for the metadata's task → GenEval verdict: (correct, reason, kept detections)."""
    world = world or default_world(image.shape[0])
    detections = filter_detections(detect_glyphs(image, world), metadata["tag"])
    correct, reason = evaluate_detections(metadata, detections)
    return correct, reason, detections


_WORLDS: dict[int, GlyphWorld] = {}


def default_world(size: int) -> GlyphWorld:
    """The default glyph world of that image size (cached: the codebook is built once)."""
    if size not in _WORLDS:
        _WORLDS[size] = GlyphWorld(size=size)
    return _WORLDS[size]
