"""The shapes world: determinism, GenEval's metadata schema, held-out compositions, and valid layouts."""

import json

import numpy as np
import pytest

from evaluation.geneval import relative_position
from src.data.shapes import (
    BACKGROUND,
    COLORS,
    GENEVAL_TASK_COUNTS,
    HELDOUT_TASKS,
    RELATIONS,
    SHAPES,
    TASKS,
    ShapesWorld,
    shape_mask,
    task_compositions,
)

# Key layout of GenEval's evaluation_metadata.jsonl, per task (top-level keys, then each include clause's keys).
GENEVAL_SCHEMA = {
    "single_object": (["tag", "include", "prompt"], [["class", "count"]]),
    "two_object": (["tag", "include", "prompt"], [["class", "count"], ["class", "count"]]),
    "counting": (["tag", "include", "exclude", "prompt"], [["class", "count"]]),
    "colors": (["tag", "include", "prompt"], [["class", "count", "color"]]),
    "position": (["tag", "include", "prompt"], [["class", "count"], ["class", "count", "position"]]),
    "color_attr": (["tag", "include", "prompt"], [["class", "count", "color"], ["class", "count", "color"]]),
}


def rng(seed):
    return np.random.Generator(np.random.PCG64(seed))


@pytest.fixture(scope="module")
def world():
    return ShapesWorld()


def test_same_seed_same_image_and_metadata(world):
    image_a, md_a = world.train_sample(123)
    image_b, md_b = world.train_sample(123)
    assert image_a.dtype == np.uint8 and image_a.shape == (32, 32, 3)
    assert np.array_equal(image_a, image_b) and md_a == md_b
    others = [world.train_sample(s)[0] for s in range(124, 130)]
    assert not all(np.array_equal(image_a, o) for o in others)


@pytest.mark.parametrize("task", TASKS)
def test_metadata_schema_matches_geneval(task):
    top_keys, clause_keys = GENEVAL_SCHEMA[task]
    for md in task_compositions(task):
        assert list(md) == top_keys
        assert [list(c) for c in md["include"]] == clause_keys
        assert json.loads(json.dumps(md)) == md
        assert md["prompt"].startswith("a photo of ")
    examples = {m["prompt"]: m for m in task_compositions(task)}
    expected = {
        "single_object": "a photo of a circle",
        "two_object": "a photo of a circle and a square",
        "counting": "a photo of three squares",
        "colors": "a photo of a red circle",
        "position": "a photo of a triangle left of a circle",
        "color_attr": "a photo of a red circle and a blue square",
    }[task]
    assert expected in examples


def test_counting_and_position_metadata_details():
    md = {m["prompt"]: m for m in task_compositions("counting")}["a photo of four crosses"]
    assert md["include"] == [{"class": "cross", "count": 4}]
    assert md["exclude"] == [{"class": "cross", "count": 5}]
    md = {m["prompt"]: m for m in task_compositions("position")}["a photo of a triangle left of a circle"]
    assert md["include"] == [
        {"class": "circle", "count": 1},
        {"class": "triangle", "count": 1, "position": ["left of", 0]},
    ]


def test_heldout_compositions_never_sampled_for_training(world):
    generator = rng(7)
    seen = set()
    for _ in range(5000):
        md = world.sample_metadata(generator, "train")
        assert not world.is_heldout(md), md["prompt"]
        seen.add(md["prompt"])
    words = " ".join(seen)
    assert all(s in words for s in SHAPES) and all(c in words for c in COLORS) and all(r in words for r in RELATIONS)
    for task in TASKS:
        assert any(p in seen for p in (m["prompt"] for m in world.compositions(task, "train")))


def test_heldout_selection_is_about_a_fifth_and_keeps_vocabulary_in_training(world):
    for task in HELDOUT_TASKS:
        held, train = world.compositions(task, "heldout"), world.compositions(task, "train")
        total = len(held) + len(train)
        assert len(held) == round(0.2 * total) and len(held) >= 1
        train_words = " ".join(m["prompt"] for m in train)
        vocabulary = {c["class"] for m in held for c in m["include"]} | {
            c.get("color") for m in held for c in m["include"] if "color" in c
        }
        assert all(word in train_words for word in vocabulary)
    assert ShapesWorld(heldout_fraction=0.0).compositions("color_attr", "heldout") == []


def test_heldout_metadata_matches_geneval_counts(world):
    entries = world.heldout_metadata()
    assert len(entries) == 553
    tags = [m["tag"] for m in entries]
    assert tags == [t for t in TASKS for _ in range(GENEVAL_TASK_COUNTS[t])]
    for md in entries:
        assert list(md) == GENEVAL_SCHEMA[md["tag"]][0]
        if md["tag"] in HELDOUT_TASKS:
            assert world.is_heldout(md)
    assert entries == world.heldout_metadata()
    assert entries != world.heldout_metadata(seed=1)
    # color_attr has 72 held-out prompts for 100 slots: each appears once or twice.
    counts = {}
    for md in entries:
        if md["tag"] == "color_attr":
            counts[md["prompt"]] = counts.get(md["prompt"], 0) + 1
    assert len(counts) == 72 and set(counts.values()) == {1, 2}


def test_renders_hold_exactly_the_named_objects_with_gaps(world):
    generator = rng(3)
    for _ in range(300):
        md = world.sample_metadata(generator, "train")
        image, objects = world.render(md, generator)
        expected = sorted(c["class"] for c in md["include"] for _ in range(c["count"]))
        assert sorted(o.shape for o in objects) == expected
        for clause in md["include"]:
            if "color" in clause:
                assert [o.color for o in objects if o.shape == clause["class"]] == [clause["color"]]
        for i, a in enumerate(objects):
            assert 0 <= a.box[0] < a.box[2] <= 32 and 0 <= a.box[1] < a.box[3] <= 32
            for b in objects[i + 1 :]:
                separated_x = a.box[2] < b.box[0] or b.box[2] < a.box[0]
                separated_y = a.box[3] < b.box[1] or b.box[3] < a.box[1]
                assert separated_x or separated_y, (a, b)
        covered = np.zeros((32, 32), dtype=bool)
        for o in objects:
            covered[o.box[1] : o.box[3], o.box[0] : o.box[2]] |= shape_mask(
                o.shape, o.box[3] - o.box[1], o.box[2] - o.box[0]
            )
        assert (np.any(image != BACKGROUND, axis=-1) == covered).all()


def test_position_renders_give_exactly_the_relation(world):
    generator = rng(11)
    for md in world.compositions("position", "train") * 10:
        _, objects = world.render(md, generator)
        reference, subject = objects
        assert relative_position(list(subject.box), list(reference.box)) == {md["include"][1]["position"][0]}


def test_shape_masks_touch_every_side_of_their_box():
    for shape in SHAPES:
        for side in range(4, 15):
            mask = shape_mask(shape, side, side)
            assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any(), (shape, side)
    assert shape_mask("triangle", 9, 9)[-1].all() and shape_mask("triangle", 9, 9)[0].sum() == 1


def test_bad_configuration_is_rejected():
    with pytest.raises(ValueError, match="size"):
        ShapesWorld(size=8)
    with pytest.raises(ValueError, match="heldout_fraction"):
        ShapesWorld(heldout_fraction=0.9)
    with pytest.raises(ValueError, match="task_weights"):
        ShapesWorld(task_weights={"drawing": 1.0})
    with pytest.raises(ValueError, match="class"):
        ShapesWorld().render({"tag": "single_object", "include": [{"class": "cat", "count": 1}]}, rng(0))


def test_task_weights_restrict_sampling():
    world = ShapesWorld(task_weights={"counting": 1.0})
    generator = rng(0)
    assert {world.sample_metadata(generator)["tag"] for _ in range(50)} == {"counting"}


def test_larger_images_scale_objects():
    world = ShapesWorld(size=64)
    image, md = world.train_sample(5)
    assert image.shape == (64, 64, 3)
    _, objects = world.render(md, rng(5))
    assert min(o.box[2] - o.box[0] for o in objects) >= 14
