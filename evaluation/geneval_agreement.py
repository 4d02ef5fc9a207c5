"""Our rules against GenEval's own scripts on a folder they scored: ``evaluate --geneval_results DIR``.

GenEval's ``evaluate_images.py`` writes one line per image to ``results.jsonl``: its verdict, its reason and
``details``, the detections it kept per class ([x1, y1, x2, y2, score] rows, already thresholded, capped at 16 and
in the order it ranked them). Two summaries of that file are printed side by side:

- **GenEval**: its own verdicts summarised with `evaluation.geneval.summarize`, i.e. what its ``summary_scores.py``
  prints for the file;
- **ours**: every image re-decided by `evaluation.geneval.evaluate_detections` from the detections GenEval kept. That
  re-checks our clause logic, found-object order, positions and exclusions on GenEval's own detections; it does not
  re-run a detector, so it cannot show detector differences. The details are used in the order GenEval wrote them
  (ranking them again would reorder ties).

results.jsonl does not say which colour CLIP gave each detection, so an image with a colour clause (GenEval's
``colors`` and ``color_attr`` tasks) cannot be re-decided: it keeps GenEval's verdict and is reported as not
re-decided. Reasons are compared with relation lists sorted (GenEval joins a set in hash order).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from evaluation.geneval import evaluate_detections, read_results_jsonl, summarize
from src.errors import UserError

_RELATIONS = re.compile(r"found ((?:left of|right of|above|below)(?: and (?:left of|right of|above|below))*) target")


def _normalise_reason(reason: str) -> str:
    return _RELATIONS.sub(lambda m: "found " + " and ".join(sorted(m.group(1).split(" and "))) + " target", reason)


def redecide(record: dict) -> tuple[bool, str] | None:
    """Our (verdict, reason) from one GenEval results.jsonl line, or None when a colour clause needs CLIP's colours."""
    metadata = json.loads(record["metadata"])
    if any("color" in clause for clause in metadata.get("include", [])):
        return None
    details = json.loads(record["details"])
    detections = {cls: [{"box": row[:4], "score": row[4]} for row in rows] for cls, rows in details.items()}
    return evaluate_detections(metadata, detections)


def agreement(records: list[dict]) -> dict:
    """{"geneval", "ours": summaries, "tasks": {tag: {"images", "redecided", "agree", "reasons_agree"}}, "differ"}.

    "differ" lists (filename, GenEval's reason, ours) for every re-decided image whose verdict differs.
    """
    ours_records, tasks, differ = [], {}, []
    for record in records:
        row = tasks.setdefault(record["tag"], {"images": 0, "redecided": 0, "agree": 0, "reasons_agree": 0})
        row["images"] += 1
        verdict = redecide(record)
        if verdict is None:
            ours_records.append(record)
            continue
        correct, reason = verdict
        row["redecided"] += 1
        row["agree"] += correct == bool(record["correct"])
        row["reasons_agree"] += _normalise_reason(reason) == _normalise_reason(record["reason"])
        if correct != bool(record["correct"]):
            differ.append((record.get("filename", "?"), record["reason"], reason))
        ours_records.append({**record, "correct": correct, "reason": reason})
    return {"geneval": summarize(records), "ours": summarize(ours_records), "tasks": tasks, "differ": differ}


def format_agreement(result: dict, source: str) -> str:
    """GenEval's summary and ours side by side, per task with the agreement of re-decided images."""
    geneval, ours = result["geneval"], result["ours"]
    lines = [
        f"GenEval results: {source} ({geneval['images']} images, {geneval['prompts']} prompts)",
        f"{'task':<16} {'GenEval':>8} {'ours':>8}  {'re-decided':>10}  {'agree':>9}  {'same reason':>11}",
    ]
    for tag, row in result["tasks"].items():
        if row["redecided"]:
            agree = f"{row['agree']}/{row['redecided']}"
            reasons = f"{row['reasons_agree']}/{row['redecided']}"
        else:
            agree, reasons = "–", "– (colours not in results.jsonl)"
        lines.append(
            f"{tag:<16} {geneval['tasks'][tag]:>8.2%} {ours['tasks'][tag]:>8.2%}  "
            f"{row['redecided']:>4}/{row['images']:<5}  {agree:>9}  {reasons:>11}"
        )
    lines.append(f"{'overall':<16} {geneval['overall']:>8.5f} {ours['overall']:>8.5f}")
    for filename, theirs, mine in result["differ"][:10]:
        lines.append(f"differs: {filename}: GenEval {theirs!r}; ours {mine!r}")
    return "\n".join(lines)


def check_geneval_results(path: str) -> dict:
    """Read GenEval's results.jsonl (``path`` or ``path``/results.jsonl), print both summaries, return `agreement`."""
    source = Path(path).expanduser()
    if source.is_dir():
        source = source / "results.jsonl"
    if not source.is_file():
        raise UserError(f"geneval_results={path!r}: no results.jsonl there (GenEval's evaluate_images.py writes it)")
    try:
        records = read_results_jsonl(source)
    except json.JSONDecodeError as exc:
        raise UserError(f"geneval_results {source}: not JSON lines ({exc.msg}, line {exc.lineno})") from None
    if not records:
        raise UserError(f"geneval_results {source}: empty")
    missing = {"tag", "correct", "reason", "metadata", "details"} - set(records[0])
    if missing:
        raise UserError(f"geneval_results {source}: not GenEval's format (no {', '.join(sorted(missing))})")
    result = agreement(records)
    print(format_agreement(result, str(source)))
    return result
