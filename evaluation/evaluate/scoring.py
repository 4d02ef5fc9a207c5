"""Scoring a folder in GenEval's layout: GenEval verdicts, CLIP score, fidelity to a reference; the score files.

Both kinds of model are scored here the same way, whatever generated the images.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from evaluation.clip_score import OpenClip, clip_score_summary, clip_scores, load_open_clip
from evaluation.detectors import image_scorer
from evaluation.evaluate.options import ScoringOptions
from evaluation.fidelity import fidelity_folders
from evaluation.generate import iter_samples
from evaluation.geneval import result_record, summarize, write_results_jsonl
from evaluation.real_geneval import GenEvalScorer
from src.errors import UserError
from src.progress import progress_bar

METRIC_PREFIX = {"shapes": "geneval_shapes", "glyphs": "geneval_glyphs", "geneval": "geneval"}
"""Detector → namespace of its GenEval metrics (``<prefix>/<task>``, ``<prefix>/overall``)."""

SCORE_FILES = ("results.jsonl", "summary.json", "clip_scores.jsonl")
"""What scoring writes into the output folder (deleted first: a stale score never outlives a new run)."""


def _load_images(paths: list[Path]) -> list[np.ndarray]:
    return [np.asarray(Image.open(path).convert("RGB")) for path in paths]


def score_folder(out: str | Path, detector: str = "shapes", scorer=None, batch_size: int = 8) -> tuple[list, dict]:
    """Score every image of a GenEval-layout folder: (results.jsonl records, GenEval summary); writes nothing.

    ``scorer(images, metadata) -> [(correct, reason, detections)]`` defaults to the shapes detector.
    """
    if detector not in METRIC_PREFIX:
        raise UserError(f"detector={detector!r}: allowed {', '.join(METRIC_PREFIX)}")
    if scorer is None:
        judge = image_scorer(detector)

        def scorer(images, metadata):
            return [judge(image, meta) for image, meta in zip(images, metadata)]

    samples = iter_samples(out)
    if not samples:
        raise UserError(f"{out}: no images in GenEval layout (<out>/<%05d>/samples/<%04d>.png)")
    records = []
    with progress_bar(f"geneval ({detector})", len(samples)) as progress:
        task = progress.add_task("score", total=len(samples))
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            verdicts = _score_chunk(scorer, chunk)
            for (filename, meta, _), (correct, reason, detections) in zip(chunk, verdicts):
                records.append(result_record(filename, meta, correct, reason, detections))
            progress.advance(task, len(chunk))
    return records, summarize(records)


def _score_chunk(scorer, chunk: list[tuple[str, dict, Path]]) -> list[tuple[bool, str, dict]]:
    """``scorer`` on a batch; a ValueError (e.g. a NaN detection) is raised again naming the image it came from."""
    try:
        return scorer(_load_images([path for _, _, path in chunk]), [meta for _, meta, _ in chunk])
    except ValueError as err:
        if len(chunk) == 1:
            raise ValueError(f"image {chunk[0][0]}: {err}") from err
    # Rare: find the broken image by scoring the batch one image at a time.
    return [verdict for sample in chunk for verdict in _score_chunk(scorer, [sample])]


def clip_score_folder(out: str | Path, clip, batch_size: int = 32) -> tuple[list[dict], dict]:
    """Per-image CLIP score records ({"filename", "tag", "clip_score"}) and their summary (mean, per task)."""
    samples = iter_samples(out)
    records = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        scores = clip_scores(clip, _load_images([p for _, _, p in chunk]), [m["prompt"] for _, m, _ in chunk])
        records += [{"filename": f, "tag": m["tag"], "clip_score": float(s)} for (f, m, _), s in zip(chunk, scores)]
    return records, clip_score_summary((r["tag"], r["clip_score"]) for r in records)


@dataclass(frozen=True)
class Scorers:
    """The scoring models an evaluation needs, loaded on the CPU before any image is generated."""

    clip: OpenClip | None = None
    """open_clip, for the CLIP score and real GenEval's colours (None when neither is asked for)."""
    geneval: GenEvalScorer | None = None
    """Mask2Former + CLIP colours, for detector=geneval (None: a classical detector, or none)."""


def load_scorers(scoring: ScoringOptions) -> Scorers:
    """Loads the weights ``scoring`` needs: missing ones fail here in one line, before any sampling."""
    clip = load_open_clip(scoring.clip_model, scoring.clip_pretrained) if scoring.needs_clip else None
    geneval = GenEvalScorer.load(scoring.detector_model, clip=clip) if scoring.detector == "geneval" else None
    return Scorers(clip, geneval)


def score_outputs(out_dir: Path, scoring: ScoringOptions, scorers: Scorers, device) -> tuple[list[dict], dict]:
    """GenEval records and the summary (GenEval, CLIP score, fidelity); stale results are deleted first."""
    for stale in SCORE_FILES:
        (out_dir / stale).unlink(missing_ok=True)
    records, summary = [], {}
    if scoring.detector != "none":
        scorer = scorers.geneval.to(device) if scorers.geneval else None
        records, summary = score_folder(out_dir, scoring.detector, scorer)
    summary = {**summary, "detector": scoring.detector, "images": len(iter_samples(out_dir))}
    if scoring.clip_score:
        clip_records, summary["clip_score"] = clip_score_folder(out_dir, scorers.clip.to(device))
        write_atomically(out_dir / "clip_scores.jsonl", "".join(json.dumps(r) + "\n" for r in clip_records))
    if scoring.reference is not None:
        summary["fidelity"] = fidelity_folders(out_dir, scoring.reference, device)
    return records, summary


def write_scores(out_dir: Path, records: list[dict], summary: dict) -> None:
    """results.jsonl (GenEval's format; only with a detector) and summary.json, each renamed into place."""
    if records:
        write_results_jsonl(out_dir / "results.jsonl.tmp", records)
        os.replace(out_dir / "results.jsonl.tmp", out_dir / "results.jsonl")
    write_atomically(out_dir / "summary.json", json.dumps(summary, indent=1) + "\n")


def write_atomically(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary file and a rename: a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
