"""Paired bootstrap confidence intervals for differences between two models scored on the same prompts.

Every comparison this project prints (teacher vs student at the end of a fit, ``compare``, sweep tables, the
README's claims) is between models that generated the same prompts from the same noise, so the natural unit is
the prompt: a model's score on a prompt is the mean over its images, and a difference is judged by resampling
prompts, with the two models' values of a resampled prompt kept together (paired). GenEval's overall score is the
unweighted mean of its six task accuracies, so the resampling is stratified by task (each task keeps its prompt
count); a task's interval resamples that task's prompts. Percentile intervals, 2000 resamples by default, a fixed
seed so a report is reproducible.

A difference is **decided** when its interval excludes 0; otherwise it is undecided, whatever its sign.

Legend: P prompts, R resamples, S seeds (distillation runs of one configuration).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap confidence interval (same units as the estimate)."""

    estimate: float
    low: float
    high: float
    confidence: float = CONFIDENCE

    @property
    def decided(self) -> bool:
        """True when the interval excludes 0."""
        return self.low > 0 or self.high < 0

    def format(self, scale: float = 100.0, digits: int = 1) -> str:
        """ "−6.3 [−8.1, −4.4]" (scale 100 turns accuracies into points)."""

        def num(x: float) -> str:
            return f"{scale * x:+.{digits}f}".replace("-", "−")

        return f"{num(self.estimate)} [{num(self.low)}, {num(self.high)}]"

    def as_dict(self) -> dict[str, float | bool]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "decided": self.decided}


def _percentiles(samples_R: np.ndarray, estimate: float, confidence: float) -> Interval:
    alpha = (1 - confidence) / 2
    low, high = np.quantile(samples_R, [alpha, 1 - alpha])
    return Interval(float(estimate), float(low), float(high), confidence)


def _check_paired(a: Sequence[float], b: Sequence[float], tags: Sequence[str] | None) -> tuple[np.ndarray, ...]:
    a_P, b_P = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a_P.shape != b_P.shape or a_P.ndim != 1 or len(a_P) == 0:
        raise ValueError(f"paired values: need two equal-length, non-empty 1-D sequences, got {a_P.shape}, {b_P.shape}")
    if tags is not None and len(tags) != len(a_P):
        raise ValueError(f"paired values: {len(tags)} task tags for {len(a_P)} prompts")
    if not (np.isfinite(a_P).all() and np.isfinite(b_P).all()):
        raise ValueError("paired values: NaN or infinite per-prompt value")
    return a_P, b_P


def mean_difference(
    a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES, seed: int = 0, confidence: float = CONFIDENCE
) -> Interval:
    """mean(b − a) over prompts, with a paired bootstrap interval (resampling prompts)."""
    a_P, b_P = _check_paired(a, b, None)
    diff_P = b_P - a_P
    rng = np.random.Generator(np.random.PCG64(seed))
    picks_RP = rng.integers(len(diff_P), size=(resamples, len(diff_P)))
    return _percentiles(diff_P[picks_RP].mean(1), diff_P.mean(), confidence)


def mean_interval(
    values: Sequence[float], resamples: int = RESAMPLES, seed: int = 0, confidence: float = CONFIDENCE
) -> Interval:
    """mean(values) over prompts with a bootstrap interval (e.g. a student's PSNR to its teacher)."""
    return mean_difference(np.zeros(len(values)), values, resamples, seed, confidence)


def geneval_differences(
    tags: Sequence[str],
    a: Sequence[float],
    b: Sequence[float],
    resamples: int = RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> dict[str, Interval]:
    """Intervals of GenEval(b) − GenEval(a) for "overall" and each task present.

    ``a``/``b`` are per-prompt accuracies (mean correctness over the prompt's images) in the same prompt order,
    ``tags`` each prompt's task. Overall is the unweighted mean over tasks, resampled stratified by task.
    """
    a_P, b_P = _check_paired(a, b, tags)
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, tag in enumerate(tags):
        by_task[tag].append(i)
    rng = np.random.Generator(np.random.PCG64(seed))
    out: dict[str, Interval] = {}
    task_samples = []
    for task, indices in by_task.items():
        diff_P = (b_P - a_P)[indices]
        samples_R = diff_P[rng.integers(len(diff_P), size=(resamples, len(diff_P)))].mean(1)
        task_samples.append(samples_R)
        out[task] = _percentiles(samples_R, diff_P.mean(), confidence)
    overall = float(np.mean([out[t].estimate for t in by_task]))
    return {"overall": _percentiles(np.mean(task_samples, axis=0), overall, confidence), **out}


def per_prompt_accuracy(records: Sequence[dict], prompt_index: Sequence[int]) -> tuple[list[str], list[float]]:
    """(task tag, accuracy) per prompt from GenEval records (``correct``, ``tag``) and each record's prompt index."""
    if len(records) != len(prompt_index):
        raise ValueError(f"{len(records)} records but {len(prompt_index)} prompt indices")
    hits: dict[int, list[float]] = defaultdict(list)
    tags: dict[int, str] = {}
    for record, p in zip(records, prompt_index, strict=True):
        hits[p].append(float(record["correct"]))
        tags[p] = record["tag"]
    order = sorted(hits)
    return [tags[p] for p in order], [float(np.mean(hits[p])) for p in order]


def seed_spread(values_S: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) over seeds; the deviation is 0 for a single seed."""
    v = np.asarray(values_S, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
