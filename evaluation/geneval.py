"""GenEval's scoring rules as pure functions of prompt metadata and per-class detections.

Reproduces the decisions of GenEval (Ghosh et al., NeurIPS 2023 D&B; djghosh13/geneval
``evaluation/evaluate_images.py`` and ``summary_scores.py``) without its detector, so the same rules score the
embedded shapes world (classical detector) and real COCO images (Mask2Former + CLIP colour classifier):

- detections per class: score > 0.3 (> 0.9 for the counting task), at most 16 per class, NMS off by default;
- include clauses must all hold: at least ``count`` detections of the class (the first ``count`` in GenEval's
  ranking are "found"), of the right colour if one is asked, and in the right relation to every found object of the
  group that ``position`` points to; exclude clauses fail when there are ``count`` or more detections (so "exactly
  n" is include n + exclude n+1);
- score: per-task accuracy over images; overall = unweighted mean of the task accuracies.

The numerics are GenEval's, not nicer ones (float32 thresholds and positions, numpy 1.23's argsort tie order):
see `evaluation.geneval_numerics` for what they are and why. Given the same detections, every verdict equals
GenEval's; failure reasons equal its strings except that a list of relations is sorted.

A detection is a dict: {"box": [x1, y1, x2, y2] (pixels), "score": float, "color": str | None, optional "mask"}.
Colours are attached by the caller before `evaluate_detections` (GenEval classifies the box crop with CLIP).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.geneval_numerics import box_iou, float32_rows, geneval_order
from evaluation.geneval_numerics import relative_position as _relative_position

Detection = dict[str, Any]

THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
NMS_THRESHOLD = 1.0
POSITION_THRESHOLD = 0.1
"""GenEval's ``position_threshold``: the margin, as a fraction of the two box sizes, removed from centre offsets."""
# GenEval's colour vocabulary, in the order its failure reasons list colour counts.
GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")


def filter_detections(
    raw: dict[str, list[Detection]],
    tag: str,
    threshold: float = THRESHOLD,
    counting_threshold: float = COUNTING_THRESHOLD,
    max_objects: int = MAX_OBJECTS,
    nms_iou: float = NMS_THRESHOLD,
) -> dict[str, list[Detection]]:
    """GenEval's per-class filtering: rank, threshold, cap, greedy NMS; empty classes are dropped.

    Ranking, threshold and NMS follow GenEval's numerics (`evaluation.geneval_numerics`): float32 scores compared
    with a float32 threshold (a score exactly at it fails), ties in ``np.argsort(scores)[::-1]`` order, the cap
    applied after the threshold. The kept detection dicts are the input ones (positions and results.jsonl round them
    to float32 again); a NaN score or box raises ValueError naming the class.
    """
    min_score = np.float32(counting_threshold if tag == "counting" else threshold)
    kept = {}
    for cls, detections in raw.items():
        rows_N5 = float32_rows(detections, where=f"class {cls!r}: ")
        ranked = [i for i in geneval_order(rows_N5[:, 4]) if rows_N5[i, 4] > min_score][:max_objects]
        survivors = []
        while ranked:
            best = ranked.pop(0)
            survivors.append(best)
            # nms_iou == 1 switches NMS off (GenEval's default), even for identical boxes.
            if nms_iou != 1:
                ranked = [i for i in ranked if box_iou(rows_N5[best], rows_N5[i]) < nms_iou]
        if survivors:
            kept[cls] = [detections[i] for i in survivors]
    return kept


def relative_position(a_box: list[float], b_box: list[float], margin: float = POSITION_THRESHOLD) -> set[str]:
    """Relations of box A to box B (left of / right of / above / below), in GenEval's float32 arithmetic."""
    return _relative_position(a_box, b_box, margin)


def _colour_counts(colors: list[str | None]) -> str:
    named = [c for c in GENEVAL_COLORS if c in colors]
    named += sorted({c for c in colors if c is not None and c not in GENEVAL_COLORS})
    return ", ".join(f"{colors.count(c)} {c}" for c in named)


def evaluate_detections(metadata: dict, detections: dict[str, list[Detection]]) -> tuple[bool, str]:
    """GenEval's verdict for one image: (correct, reasons joined by newlines)."""
    correct = True
    reasons = []
    matched_groups: list[list[Detection] | None] = []
    for clause in metadata.get("include", []):
        cls, count = clause["class"], clause["count"]
        found = detections.get(cls, [])[:count]
        matched = True
        if len(found) < count:
            matched = False
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        else:
            if "color" in clause:
                target = clause["color"]
                colors = [d.get("color") for d in found]
                if colors.count(target) < count:
                    matched = False
                    reasons.append(
                        f"expected {target} {cls}>={count}, found {colors.count(target)} {target}; and "
                        + _colour_counts(colors)
                    )
            if "position" in clause and matched:
                relation, group = clause["position"]
                targets = matched_groups[group]
                if targets is None:
                    matched = False
                    reasons.append(f"no target for {cls} to be {relation}")
                else:
                    matched = _check_relation(cls, relation, found, targets, reasons)
        correct &= matched
        matched_groups.append(found if matched else None)
    for clause in metadata.get("exclude", []):
        cls, count = clause["class"], clause["count"]
        n = len(detections.get(cls, []))
        if n >= count:
            correct = False
            reasons.append(f"expected {cls}<{count}, found {n}")
    return correct, "\n".join(reasons)


def _check_relation(
    cls: str, relation: str, found: list[Detection], targets: list[Detection], reasons: list[str]
) -> bool:
    # GenEval stops at the first (object, target) pair that breaks the relation and reports only that pair.
    for obj in found:
        for target in targets:
            relations = relative_position(obj["box"], target["box"])
            if relation not in relations:
                # Sorted for a reproducible message (GenEval prints a set in hash order).
                reasons.append(f"expected {cls} {relation} target, found {' and '.join(sorted(relations))} target")
                return False
    return True


def result_record(
    filename: str, metadata: dict, correct: bool, reason: str, detections: dict[str, list[Detection]]
) -> dict:
    """One line of GenEval's results.jsonl; details holds [x1, y1, x2, y2, score] per kept detection.

    Values are the float32 numbers GenEval writes (its ``box.tolist()`` of mmdet's float32 rows).
    """
    details = {cls: float32_rows(dets).tolist() for cls, dets in detections.items()}
    return {
        "filename": filename,
        "tag": metadata["tag"],
        "prompt": metadata["prompt"],
        "correct": bool(correct),
        "reason": reason,
        "metadata": json.dumps(metadata),
        "details": json.dumps(details),
    }


def summarize(records: list[dict]) -> dict:
    """GenEval's summary: per-task accuracy (tasks in order of first appearance) and their unweighted mean.

    Returns {"overall", "tasks": {tag: accuracy}, "task_correct": {tag: n}, "task_images": {tag: n}, "images",
    "prompts", "correct_images", "correct_prompts"}. Prompts are counted like GenEval does, as distinct metadata
    strings, so a prompt that appears several times counts once.
    """
    if not records:
        raise ValueError("summarize: no records (results.jsonl is empty)")
    per_task: dict[str, list[bool]] = {}
    per_prompt: dict[str, list[bool]] = {}
    for record in records:
        per_task.setdefault(record["tag"], []).append(bool(record["correct"]))
        per_prompt.setdefault(record["metadata"], []).append(bool(record["correct"]))
    tasks = {tag: sum(flags) / len(flags) for tag, flags in per_task.items()}
    return {
        "overall": float(np.mean(list(tasks.values()))),
        "tasks": tasks,
        "task_correct": {tag: sum(flags) for tag, flags in per_task.items()},
        "task_images": {tag: len(flags) for tag, flags in per_task.items()},
        "images": len(records),
        "prompts": len(per_prompt),
        "correct_images": sum(bool(r["correct"]) for r in records) / len(records),
        "correct_prompts": sum(any(flags) for flags in per_prompt.values()) / len(per_prompt),
    }


def format_summary(summary: dict) -> str:
    """A small text table like GenEval's summary_scores.py prints."""
    lines = [
        f"Total images: {summary['images']}",
        f"Total prompts: {summary['prompts']}",
        f"% correct images: {summary['correct_images']:.2%}",
        f"% correct prompts: {summary['correct_prompts']:.2%}",
        "Task breakdown",
    ]
    for tag, accuracy in summary["tasks"].items():
        correct, images = summary["task_correct"][tag], summary["task_images"][tag]
        lines.append(f"{tag:<16} = {accuracy:.2%} ({correct} / {images})")
    lines.append(f"Overall score (avg. over tasks): {summary['overall']:.5f}")
    return "\n".join(lines)


def write_results_jsonl(path: str | Path, records: list[dict]) -> None:
    """Write records one JSON object per line (GenEval's results.jsonl)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def read_results_jsonl(path: str | Path) -> list[dict]:
    """Read a results.jsonl written by `write_results_jsonl` or by GenEval itself."""
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]
