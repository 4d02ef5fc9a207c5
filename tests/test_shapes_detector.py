"""The classical shapes detector: exact on clean renders, tolerant of noise, and GenEval-valid on ground truth."""

import numpy as np
import pytest

from evaluation.geneval import result_record, summarize
from evaluation.shapes_detector import detect_shapes, evaluate_shapes_image
from src.data.shapes import BACKGROUND, COLORS, SHAPES, TASKS, ShapeObject, ShapesWorld, render_scene


def rng(seed):
    return np.random.Generator(np.random.PCG64(seed))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("side", [7, 10, 14])
def test_every_shape_and_colour_is_found_exactly(shape, side):
    for i, color in enumerate(COLORS):
        box = (2 + i, 3, 2 + i + side, 3 + side)
        detections = detect_shapes(render_scene([ShapeObject(shape, color, box)], 32))
        assert list(detections) == [shape]
        (found,) = detections[shape]
        assert found["box"] == [float(v) for v in box]
        assert found["color"] == color and found["score"] == pytest.approx(1.0)


def test_background_and_off_palette_pixels_give_nothing():
    image = render_scene([], 32)
    assert detect_shapes(image) == {}
    image[5:15, 5:15] = (0, 255, 255)  # cyan: not a blend of the background with any palette colour
    image[20:22, 20:22] = (228, 36, 36)  # a red speck below min_pixels
    assert detect_shapes(image) == {}
    with pytest.raises(ValueError, match="uint8"):
        detect_shapes(image.astype(np.float32) / 255)


def test_touching_objects_of_different_colours_are_split():
    objects = [ShapeObject("square", "red", (4, 4, 14, 14)), ShapeObject("square", "blue", (14, 4, 24, 14))]
    detections = detect_shapes(render_scene(objects, 32))
    assert sorted(d["color"] for d in detections["square"]) == ["blue", "red"]


def test_elongated_boxes_lose_confidence():
    image = np.empty((32, 32, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    image[10:14, 2:30] = (228, 36, 36)
    (found,) = detect_shapes(image)["square"]
    assert found["score"] < 0.3


LAYOUTS = {"free": {}, "cells": {"snap": 8, "cells": True}}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_noisy_renders_are_still_judged_correct(layout):
    world = ShapesWorld(**LAYOUTS[layout])
    noise = np.random.default_rng(0)
    correct = []
    for i, md in enumerate(world.heldout_metadata(seed=3)[::3]):
        image, _ = world.render(md, rng(i))
        noisy = np.clip(image + noise.normal(0.0, 12.0, image.shape), 0, 255).astype(np.uint8)
        correct.append(evaluate_shapes_image(noisy, md)[0])
    assert np.mean(correct) >= 0.95


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_ground_truth_renders_score_near_perfect_geneval(layout):
    """Evaluator validity: the detector + GenEval's rules accept the renderer's own images (free placement and the
    committed teacher's cell layout)."""
    world = ShapesWorld(**LAYOUTS[layout])
    generator = rng(1)
    metadata = world.heldout_metadata(seed=0) + [world.sample_metadata(generator) for _ in range(553)]
    records = []
    for i, md in enumerate(metadata):
        image, _ = world.render(md, rng(10_000 + i))
        correct, reason, detections = evaluate_shapes_image(image, md)
        records.append(result_record(f"{i:05d}.png", md, correct, reason, detections))
    summary = summarize(records)
    print({tag: round(acc, 4) for tag, acc in summary["tasks"].items()}, "overall", summary["overall"])
    assert len(records) >= 1000 and list(summary["tasks"]) == list(TASKS)
    assert summary["overall"] >= 0.98
    assert min(summary["tasks"].values()) >= 0.95
