"""Which classical detector judges which embedded world: ``(image, metadata) -> (correct, reason, detections)``."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from evaluation.glyph_detector import evaluate_glyph_image
from evaluation.shapes_detector import evaluate_shapes_image
from src.data.worlds import check_world

ImageScorer = Callable[[np.ndarray, dict], tuple[bool, str, dict]]


def image_scorer(world: str) -> ImageScorer:
    """The GenEval verdict function of `world` ("shapes" or "glyphs")."""
    return evaluate_glyph_image if check_world(world) == "glyphs" else evaluate_shapes_image


def metric_prefix(world: str) -> str:
    """Metric namespace of a world's GenEval score: geneval_shapes/…, geneval_glyphs/…"""
    return f"geneval_{check_world(world)}"
