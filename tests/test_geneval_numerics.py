"""GenEval's numeric conventions, each on a hand-made case (evaluation/geneval_numerics.py).

Expected orders marked "numpy 1.23.5" were produced by ``np.argsort(scores)[::-1]`` under numpy 1.23.5, whose
argsort is the one GenEval's pinned numpy 1.23.1 runs (numpy 2.x orders the same ties differently). The position
cases were checked against GenEval's own ``relative_position`` run under numpy 1.23.5.
"""

import random

import numpy as np
import pytest

from evaluation.geneval import evaluate_detections, filter_detections, relative_position
from evaluation.geneval_numerics import box_iou, geneval_order, numpy123_argsort

F32_03 = float(np.float32(0.3))  # 0.30000001192..., above 0.3 in float64
F32_09 = float(np.float32(0.9))  # 0.89999997615..., below 0.9 in float64


def above(x: float) -> float:
    """The next float32 after x."""
    return float(np.nextafter(np.float32(x), np.float32(1)))


def det(x1, y1, x2, y2, score=0.95, color=None):
    return {"box": [x1, y1, x2, y2], "score": score, "color": color}


def reference_argsort(values: list[float]) -> list[int]:
    """numpy 1.23's argsort written recursively: median-of-3 quicksort down to 16 elements, then insertion sort.

    The order in which partitions are sorted does not change the result, so no explicit stack; the inputs used below
    are far from the depth limit where numpy switches to heapsort.
    """
    idx = list(range(len(values)))

    def sort(lo: int, hi: int) -> None:  # inclusive bounds
        if hi - lo > 15:
            mid = lo + (hi - lo) // 2
            for a, b in ((mid, lo), (hi, mid), (mid, lo)):
                if values[idx[a]] < values[idx[b]]:
                    idx[a], idx[b] = idx[b], idx[a]
            pivot = values[idx[mid]]
            idx[mid], idx[hi - 1] = idx[hi - 1], idx[mid]
            i, j = lo, hi - 1
            while True:
                i += 1
                while values[idx[i]] < pivot:
                    i += 1
                j -= 1
                while pivot < values[idx[j]]:
                    j -= 1
                if i >= j:
                    break
                idx[i], idx[j] = idx[j], idx[i]
            idx[i], idx[hi - 1] = idx[hi - 1], idx[i]
            sort(lo, i - 1)
            sort(i + 1, hi)
            return
        for k in range(lo + 1, hi + 1):  # stable: an equal value never moves past another
            moving, m = idx[k], k
            while m > lo and values[moving] < values[idx[m - 1]]:
                idx[m] = idx[m - 1]
                m -= 1
            idx[m] = moving

    sort(0, len(values) - 1)
    return idx


# --- thresholds on float32 scores ---------------------------------------------------------------------------------
def test_a_score_equal_to_float32_threshold_fails_and_the_next_float32_passes():
    assert F32_03 > 0.3  # float64 would keep it; GenEval compares float32 with float32(0.3)
    assert filter_detections({"cat": [det(0, 0, 5, 5, score=F32_03)]}, "single_object") == {}
    assert len(filter_detections({"cat": [det(0, 0, 5, 5, score=above(0.3))]}, "single_object")["cat"]) == 1
    # A float64 score just above 0.3 rounds to float32(0.3) first, as in mmdet's float32 arrays.
    assert filter_detections({"cat": [det(0, 0, 5, 5, score=0.3 + 1e-12)]}, "two_object") == {}


def test_counting_threshold_is_float32_too():
    assert F32_09 < 0.9
    assert filter_detections({"cat": [det(0, 0, 5, 5, score=F32_09)]}, "counting") == {}
    assert filter_detections({"cat": [det(0, 0, 5, 5, score=0.9)]}, "counting") == {}
    kept = filter_detections({"cat": [det(0, 0, 5, 5, score=above(0.9)), det(9, 9, 14, 14, score=0.5)]}, "counting")
    assert len(kept["cat"]) == 1
    # The other tasks still use 0.3.
    assert len(filter_detections({"cat": [det(0, 0, 5, 5, score=F32_09)]}, "colors")["cat"]) == 1


# --- tie order ------------------------------------------------------------------------------------------------------
def test_ties_up_to_16_put_the_later_detection_first():
    scores = np.array([0.3, 0.5, 0.5, above(0.3)], dtype=np.float32)
    assert geneval_order(scores) == [2, 1, 3, 0]  # numpy 1.23.5
    assert geneval_order(np.full(16, 0.7, dtype=np.float32)) == list(range(15, -1, -1))


def test_tie_order_decides_the_found_detection_for_colour_and_position():
    # Two equally confident cups: GenEval looks at the later one only.
    cups = [det(0, 0, 5, 5, score=0.8, color="blue"), det(20, 0, 25, 5, score=0.8, color="red")]
    kept = filter_detections({"cup": cups}, "colors")
    assert kept["cup"] == [cups[1], cups[0]]
    red_cup = {"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "red"}], "prompt": "a red cup"}
    assert evaluate_detections(red_cup, kept) == (True, "")
    blue_cup = {**red_cup, "include": [{"class": "cup", "count": 1, "color": "blue"}]}
    assert evaluate_detections(blue_cup, kept) == (False, "expected blue cup>=1, found 0 blue; and 1 red")

    # Position: the dog is left of the later cup (x 20..25) but right of the earlier one (x 0..5).
    dog = det(10, 0, 15, 5)
    md = {
        "tag": "position",
        "include": [{"class": "cup", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}],
        "prompt": "a dog left of a cup",
    }
    assert evaluate_detections(md, filter_detections({"cup": cups, "dog": [dog]}, "position")) == (True, "")


def test_ties_above_16_follow_numpy_123_quicksort():
    scores = np.array([0.8, 0.5] * 10, dtype=np.float32)
    expected = [0, 6, 16, 2, 14, 12, 4, 10, 18, 8, 1, 3, 5, 19, 7, 11, 13, 15, 17, 9]  # numpy 1.23.5
    assert geneval_order(scores) == expected
    assert geneval_order(np.full(17, 0.7, dtype=np.float32)) == [
        16,
        7,
        1,
        2,
        3,
        4,
        5,
        6,
        8,
        15,
        9,
        10,
        11,
        12,
        13,
        14,
        0,
    ]
    # Neither a stable descending sort nor its reverse gives this order.
    stable = sorted(range(20), key=lambda i: -scores[i])
    assert expected not in (stable, stable[::-1])


def test_numpy123_argsort_equals_the_recursive_reference_on_tie_heavy_arrays():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.choice([0, 1, 2, 15, 16, 17, 18, 31, 33, 64, 100])
        values = [float(np.float32(rng.randrange(rng.choice([1, 2, 3, 7, 1000])) / 7)) for _ in range(n)]
        assert numpy123_argsort(values) == reference_argsort(values)
    # Distinct values: any correct sort (numpy's included) agrees.
    distinct = [rng.random() for _ in range(200)]
    assert numpy123_argsort(distinct) == np.argsort(distinct).tolist()


def test_more_than_16_detections_are_capped_after_the_threshold():
    scores = [0.6, 0.8, 0.2, *[0.8, 0.6] * 3, 0.8, 0.2, *[0.8, 0.6] * 5, 0.8]
    assert len(scores) == 22 and scores[2] == scores[10] == 0.2
    cats = [det(i, 0, i + 1, 1, score=s) for i, s in enumerate(scores)]
    kept = filter_detections({"cat": cats}, "two_object")["cat"]
    # 20 detections pass 0.3; the 16 kept are the first 16 of GenEval's order (numpy 1.23.5).
    assert [cats.index(d) for d in kept] == [21, 7, 19, 1, 17, 3, 15, 13, 5, 11, 9, 4, 6, 0, 8, 20]
    assert len(filter_detections({"cat": cats}, "two_object", max_objects=3)["cat"]) == 3


# --- positions in float32 ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "a_box, float32_relations, float64_relations",
    [
        # dx = 0.5 exactly in float32 (not > 0.5), 0.50000002 in float64
        ([292.0, 432.5537414550781, 292.0, 432.5537414550781], {"below"}, {"below", "right of"}),
        # dx = 0.50000006 in float32, 0.499999995 in float64
        ([115.0, 125.98076248168945, 115.0, 125.98076248168945], {"below", "right of"}, {"below"}),
    ],
)
def test_position_near_the_half_boundary_is_decided_in_float32(a_box, float32_relations, float64_relations):
    b_box = [100.0, 100.0, 100.0, 100.0]
    assert relative_position(a_box, b_box) == float32_relations
    offset = np.subtract(a_box[:2], b_box[:2])
    dx, dy = offset / np.linalg.norm(offset)  # float64, margin 0 for points
    assert {"right of"} & float64_relations == ({"right of"} if dx > 0.5 else set())
    md = {
        "tag": "position",
        "include": [{"class": "cup", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}],
        "prompt": "a dog right of a cup",
    }
    verdict, _ = evaluate_detections(md, {"cup": [det(*b_box)], "dog": [det(*a_box)]})
    assert verdict == ("right of" in float32_relations)


def test_nms_iou_is_float64_after_float32_widths():
    a = np.array([0, 0, 9, 9, 0.9], dtype=np.float32)
    b = np.array([5, 0, 14, 9, 0.9], dtype=np.float32)
    assert box_iou(a, b) == pytest.approx(50 / 150)
    assert box_iou(a, a) == 1.0


# --- NaN ------------------------------------------------------------------------------------------------------------
def test_nan_score_or_box_raises_naming_class_and_detection():
    with pytest.raises(ValueError, match=r"class 'cat': detection 1 has a NaN score"):
        filter_detections({"cat": [det(0, 0, 5, 5), det(9, 9, 12, 12, score=float("nan"))]}, "single_object")
    with pytest.raises(ValueError, match=r"class 'dog': detection 0 has a NaN box"):
        filter_detections({"dog": [det(0, float("nan"), 5, 5)]}, "single_object")
    with pytest.raises(ValueError, match="NaN"):
        relative_position([0, 0, 5, float("nan")], [1, 1, 2, 2])


def test_nan_score_in_a_folder_names_the_image(tmp_path):
    from evaluation.evaluate import score_folder
    from evaluation.generate import generate_images

    cat = {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a cat"}
    broken = {**cat, "prompt": "a cat the detector chokes on"}
    generate_images(lambda prompts, seeds: np.zeros((len(prompts), 8, 8, 3), np.uint8), [cat, broken], tmp_path, 2, 4)

    def scorer(images, metadata):
        verdicts = []
        for meta in metadata:
            raw = {"cat": [det(0, 0, 5, 5, score=float("nan") if meta == broken else 0.9)]}
            kept = filter_detections(raw, meta["tag"])
            verdicts.append((*evaluate_detections(meta, kept), kept))
        return verdicts

    # The whole batch of four fails; the message names the first broken image, found by rescoring one by one.
    with pytest.raises(ValueError, match=r"image 00001/samples/0000\.png: class 'cat': detection 0 has a NaN score"):
        score_folder(tmp_path, "geneval", scorer)
