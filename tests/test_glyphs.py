"""The GenEval-glyphs world: GenEval's vocabulary and prompts, a codebook the detector can separate, and a
detector that scores ground-truth renders of GenEval's own 553 prompts as correct."""

import numpy as np
import pytest

from evaluation.geneval import result_record, summarize
from evaluation.glyph_detector import detect_glyphs, evaluate_glyph_image
from src.data.glyphs import (
    CLASSES,
    GLYPH_BACKGROUND,
    GLYPH_COLORS,
    GLYPH_PALETTE,
    TRAIN_TASKS,
    GlyphWorld,
    check_vocabulary,
    codebook,
    geneval_metadata,
    min_pairwise_distance,
    prompt_of,
)
from src.data.worlds import make_world


@pytest.fixture(scope="module")
def world() -> GlyphWorld:
    return GlyphWorld()


def test_vocabulary_is_genevals_and_colours_stand_out():
    assert len(CLASSES) == 80 and CLASSES[0] == "person" and CLASSES[-1] == "toothbrush"
    assert set(GLYPH_COLORS) == {
        "red",
        "orange",
        "yellow",
        "green",
        "blue",
        "purple",
        "pink",
        "brown",
        "black",
        "white",
    }
    rgb = {k: np.array(v, dtype=float) for k, v in GLYPH_PALETTE.items()}
    background = np.array(GLYPH_BACKGROUND, dtype=float)
    assert min(np.linalg.norm(c - background) for c in rgb.values()) >= 120
    pairs = [np.linalg.norm(rgb[a] - rgb[b]) for a in rgb for b in rgb if a < b]
    assert min(pairs) >= 100


def test_codebook_is_deterministic_and_far_apart(world):
    assert world.glyphs.shape == (80, 6, 6)
    assert min_pairwise_distance(world.glyphs) >= 12
    np.testing.assert_array_equal(codebook(80, 12, 0), world.glyphs)
    assert not np.array_equal(codebook(80, 12, 1), world.glyphs)
    lit = world.glyphs.reshape(80, -1).sum(1)
    assert lit.min() >= 14 and lit.max() <= 22
    # every glyph touches all four sides of its box, so every class has the same box
    assert world.glyphs[:, 0].any(1).all() and world.glyphs[:, -1].any(1).all()
    assert world.glyphs[:, :, 0].any(1).all() and world.glyphs[:, :, -1].any(1).all()


def test_templates_reproduce_all_553_geneval_prompts():
    metadata = geneval_metadata()
    assert len(metadata) == 553
    assert [prompt_of(m) for m in metadata] == [m["prompt"] for m in metadata]


def test_evaluation_prompts_are_genevals_own_and_never_trained(world):
    assert world.heldout_metadata() == geneval_metadata()
    evaluation = {m["prompt"] for m in geneval_metadata()}
    tasks, counts = set(), set()
    for seed in range(6000):
        image, md = world.train_sample(seed)
        assert md["prompt"] not in evaluation
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        tasks.add(md["tag"])
        counts.add(sum(c["count"] for c in md["include"]))
    assert tasks == set(TRAIN_TASKS)
    assert counts == {1, 2, 3, 4}


def test_rendering_is_deterministic_by_seed(world):
    a, md_a = world.train_sample(123)
    b, md_b = world.train_sample(123)
    np.testing.assert_array_equal(a, b)
    assert md_a == md_b
    assert not np.array_equal(a, world.train_sample(124)[0])


def test_subsets_per_task_keep_file_order_and_cap_at_genevals_counts(world):
    subset = world.heldout_metadata({t: 5 for t in ("single_object", "counting")}, seed=3)
    assert [m["tag"] for m in subset] == ["single_object"] * 5 + ["counting"] * 5
    assert subset == world.heldout_metadata({t: 5 for t in ("single_object", "counting")}, seed=3)
    assert len(world.heldout_metadata({"position": 1000})) == 100


def _validity(world, noise: float) -> dict:
    records = []
    for i, md in enumerate(world.heldout_metadata()):
        for k in range(4):
            rng = np.random.Generator(np.random.PCG64(i * 4 + k))
            image, _ = world.render(md, rng)
            if noise:
                image = np.clip(image + rng.normal(0, noise, image.shape), 0, 255).astype(np.uint8)
            correct, reason, detections = evaluate_glyph_image(image, md, world)
            records.append(result_record(f"{i:05d}/{k:04d}.png", md, correct, reason, detections))
    return summarize(records)


@pytest.mark.parametrize("noise", [0.0, 20.0])
def test_detector_validity_on_2212_ground_truth_renders(world, noise):
    summary = _validity(world, noise)
    assert summary["overall"] >= 0.98, summary
    assert min(summary["tasks"].values()) >= 0.95, summary


def test_one_wrong_pixel_still_counts_a_random_pattern_does_not(world):
    md = {"tag": "counting", "include": [{"class": "clock", "count": 1}], "prompt": "x"}
    image, objects = world.render(md, np.random.Generator(np.random.PCG64(0)))
    x1, y1, _, _ = objects[0].box
    flipped = image.copy()
    glyph = world.glyphs[CLASSES.index("clock")]
    y, x = np.argwhere(~glyph)[0]
    flipped[y1 + y, x1 + x] = GLYPH_PALETTE[objects[0].color]
    found = detect_glyphs(flipped, world)["clock"][0]
    assert found["distance"] == 1 and found["score"] >= 0.9
    noise = image.copy()
    rng = np.random.Generator(np.random.PCG64(1))
    pattern = rng.random((6, 6)) < 0.5
    noise[y1 : y1 + 6, x1 : x1 + 6] = np.where(pattern[..., None], np.array(GLYPH_PALETTE["red"]), GLYPH_BACKGROUND)
    best = max(d["score"] for found in detect_glyphs(noise, world).values() for d in found)
    assert best < 0.3


def test_bad_world_and_glyph_settings_say_what_is_allowed():
    with pytest.raises(ValueError, match="unknown world; allowed shapes, glyphs"):
        make_world("glpyhs")
    with pytest.raises(ValueError, match=r"min_distance=3: .*allowed 5\.\.14"):
        GlyphWorld(min_distance=3)
    with pytest.raises(ValueError, match="size=36"):
        GlyphWorld(size=36)
    with pytest.raises(ValueError, match="single_object prompts are all evaluation prompts"):
        GlyphWorld(task_weights={"single_object": 1.0})


def test_prompt_outside_the_vocabulary_is_named():
    md = [{"tag": "colors", "include": [{"class": "unicorn", "count": 1, "color": "red"}], "prompt": "a red unicorn"}]
    with pytest.raises(ValueError, match="class 'unicorn' is not in the glyph world's vocabulary"):
        check_vocabulary(md, "prompts.jsonl")
    md = [{"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "teal"}], "prompt": "a teal cat"}]
    with pytest.raises(ValueError, match="color 'teal' is not one of red"):
        check_vocabulary(md, "prompts.jsonl")
