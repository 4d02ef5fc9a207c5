"""GenEval's rules on handmade detections: every clause type, thresholds, NMS, and the summary arithmetic."""

import json

import pytest

from evaluation.geneval import (
    evaluate_detections,
    filter_detections,
    format_summary,
    read_results_jsonl,
    relative_position,
    result_record,
    summarize,
    write_results_jsonl,
)


def det(x1, y1, x2, y2, score=0.99, color=None):
    return {"box": [float(x1), float(y1), float(x2), float(y2)], "score": score, "color": color}


def counting(cls, n):
    return {
        "tag": "counting",
        "include": [{"class": cls, "count": n}],
        "exclude": [{"class": cls, "count": n + 1}],
        "prompt": f"a photo of {n} {cls}s",
    }


def position(subject, relation, reference):
    return {
        "tag": "position",
        "include": [
            {"class": reference, "count": 1},
            {"class": subject, "count": 1, "position": [relation, 0]},
        ],
        "prompt": f"a photo of a {subject} {relation} a {reference}",
    }


def test_include_count_short_fails_with_geneval_reason():
    md = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]}
    ok, reason = evaluate_detections(md, {"cat": [det(0, 0, 5, 5)]})
    assert not ok
    assert reason == "expected dog>=1, found 0"
    assert evaluate_detections(md, {"cat": [det(0, 0, 5, 5)], "dog": [det(9, 9, 12, 12)]}) == (True, "")


def test_counting_is_exact_through_the_exclude_clause():
    md = counting("clock", 3)
    three = [det(10 * i, 0, 10 * i + 5, 5) for i in range(3)]
    assert evaluate_detections(md, {"clock": three}) == (True, "")
    ok, reason = evaluate_detections(md, {"clock": three + [det(40, 0, 45, 5)]})
    assert not ok and reason == "expected clock<4, found 4"
    ok, reason = evaluate_detections(md, {"clock": three[:2]})
    assert not ok and reason == "expected clock>=3, found 2"


def test_colour_match_and_mismatch():
    md = {
        "tag": "colors",
        "include": [{"class": "car", "count": 1, "color": "red"}],
        "prompt": "a photo of a red car",
    }
    assert evaluate_detections(md, {"car": [det(0, 0, 5, 5, color="red")]}) == (True, "")
    ok, reason = evaluate_detections(md, {"car": [det(0, 0, 5, 5, color="blue"), det(9, 9, 14, 14, color="red")]})
    # Only the top-scoring `count` detections are checked: the second, red car does not rescue the first.
    assert not ok
    assert reason == "expected red car>=1, found 0 red; and 1 blue"


@pytest.mark.parametrize(
    ("relation", "subject_box"),
    [
        ("left of", (0, 10, 6, 16)),
        ("right of", (24, 10, 30, 16)),
        ("above", (10, 0, 16, 6)),
        ("below", (10, 24, 16, 30)),
    ],
)
def test_each_relation(relation, subject_box):
    reference = det(10, 10, 16, 16)
    assert relative_position(list(subject_box), reference["box"]) == {relation}
    md = position("dog", relation, "cat")
    assert evaluate_detections(md, {"cat": [reference], "dog": [det(*subject_box)]}) == (True, "")
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[relation]
    ok, reason = evaluate_detections(position("dog", opposite, "cat"), {"cat": [reference], "dog": [det(*subject_box)]})
    assert not ok and reason == f"expected dog {opposite} target, found {relation} target"


def test_margin_removes_a_relation_that_raw_offsets_would_give():
    # Centres 2 px apart along x; boxes 10 px wide: margin 0.1 * (10 + 10) = 2 px cancels the offset entirely.
    a, b = [0, 0, 10, 10], [2, 0, 12, 10]
    assert relative_position(a, b, margin=0.0) == {"left of"}
    assert relative_position(a, b) == set()
    # Offset (-3, 1): without margin dx = -0.95 ("left of"); with it revised (-1, 0) / 3.16 = -0.32, nothing.
    a, b = [0, 1, 10, 11], [3, 0, 13, 10]
    assert relative_position(a, b, margin=0.0) == {"left of"}
    assert relative_position(a, b) == set()
    ok, reason = evaluate_detections(position("dog", "left of", "cat"), {"cat": [det(*b)], "dog": [det(*a)]})
    assert not ok and reason == "expected dog left of target, found  target"


def test_position_without_a_matched_target_group():
    md = position("dog", "left of", "cat")
    ok, reason = evaluate_detections(md, {"dog": [det(0, 0, 5, 5)]})
    assert not ok
    assert reason == "expected cat>=1, found 0\nno target for dog to be left of"
    # A target group that failed its colour check counts as unmatched too.
    md["include"][0]["color"] = "red"
    ok, reason = evaluate_detections(md, {"cat": [det(20, 0, 25, 5, color="blue")], "dog": [det(0, 0, 5, 5)]})
    assert not ok and reason.endswith("no target for dog to be left of")


def test_thresholds_counting_uses_point_nine():
    raw = {"cat": [det(0, 0, 5, 5, score=0.95), det(10, 0, 15, 5, score=0.5), det(20, 0, 25, 5, score=0.2)]}
    assert len(filter_detections(raw, "two_object")["cat"]) == 2
    assert len(filter_detections(raw, "counting")["cat"]) == 1
    assert filter_detections({"cat": [det(0, 0, 5, 5, score=0.3)]}, "single_object") == {}  # strictly greater
    many = {"cat": [det(i, 0, i + 1, 1, score=0.5 + i / 100) for i in range(20)]}
    kept = filter_detections(many, "single_object")["cat"]
    assert len(kept) == 16 and [d["score"] for d in kept] == sorted((d["score"] for d in kept), reverse=True)


def test_nms_off_by_default_and_on_when_asked():
    raw = {"cat": [det(0, 0, 10, 10, score=0.8), det(0, 0, 10, 10, score=0.9), det(20, 20, 30, 30, score=0.7)]}
    assert len(filter_detections(raw, "two_object")["cat"]) == 3
    kept = filter_detections(raw, "two_object", nms_iou=0.5)["cat"]
    assert [d["score"] for d in kept] == [0.9, 0.7]


def test_summary_is_mean_of_task_means_not_of_images():
    records = []
    for tag, flags in [
        ("single_object", [True, True, True, True]),
        ("counting", [True, False]),
        ("colors", [False]),
    ]:
        for i, flag in enumerate(flags):
            md = {"tag": tag, "include": [], "prompt": f"{tag} {i // 2}"}
            records.append(result_record(f"{tag}/{i}.png", md, flag, "", {}))
    summary = summarize(records)
    assert summary["tasks"] == {"single_object": 1.0, "counting": 0.5, "colors": 0.0}
    assert list(summary["tasks"]) == ["single_object", "counting", "colors"]
    assert summary["task_correct"]["counting"] == 1 and summary["task_images"]["counting"] == 2
    assert summary["overall"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert summary["correct_images"] == pytest.approx(5 / 7)
    assert summary["images"] == 7 and summary["prompts"] == 4
    assert summary["correct_prompts"] == pytest.approx(3 / 4)
    table = format_summary(summary)
    assert "Overall score (avg. over tasks): 0.50000" in table and "counting         = 50.00% (1 / 2)" in table


def test_result_record_and_jsonl_round_trip(tmp_path):
    md = position("dog", "left of", "cat")
    detections = {"cat": [det(10, 10, 16, 16, score=0.75)]}
    record = result_record("out/00000/samples/0000.png", md, False, "no target", detections)
    assert list(record) == ["filename", "tag", "prompt", "correct", "reason", "metadata", "details"]
    assert json.loads(record["metadata"]) == md
    assert json.loads(record["details"]) == {"cat": [[10.0, 10.0, 16.0, 16.0, 0.75]]}
    write_results_jsonl(tmp_path / "results.jsonl", [record, record])
    assert read_results_jsonl(tmp_path / "results.jsonl") == [record, record]
