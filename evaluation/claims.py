"""Claims decided with confidence intervals: "variant B beats variant A" over several distillation seeds.

Every fit writes ``report/per_prompt.json``: each evaluation prompt's accuracy (mean over its images) for the
teacher and the student, and the student's per-prompt fidelity to the teacher, on prompts and noise fixed by the
experiment's seed. Runs of two variants with the same seed saw the same prompts and the same noise, so they pair
prompt by prompt. A claim compares two variants (or a variant and its ``teacher``):

- **Δ** = metric(better) − metric(worse), where a variant's per-prompt value is the mean over its seeds; the 95%
  interval is the paired bootstrap over prompts (``evaluation.bootstrap``; GenEval overall stratified by task).
- **Seed spread**: the same Δ computed within each seed alone, reported as mean ± standard deviation over seeds.
  The bootstrap over prompts does not see how much a different distillation seed moves the whole model, so:
- **Verdict**: "holds" when the interval lies above 0 and every seed's Δ is positive; "fails" when the interval
  lies below 0 and every seed's Δ is negative; otherwise "undecided" (an interval that holds 0, or seeds that
  disagree in sign). A claim with one seed can be decided, and says it has one seed.

Metrics: ``overall`` or a GenEval task name (accuracy; shown in points), or ``psnr``/``ssim``/``lpips`` (fidelity
to the teacher; only between two students). Legend: P prompts, S seeds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evaluation.bootstrap import Interval, geneval_differences, mean_difference, seed_spread

TEACHER = "teacher"
"""Pseudo-variant: the teacher as scored in the other side's own runs (same seeds, same noise)."""
FIDELITY_METRICS = ("psnr", "ssim", "lpips")


@dataclass(frozen=True)
class Claim:
    """One comparison: ``better`` is claimed to score higher than ``worse`` on ``metric``."""

    name: str
    """Label in the table, e.g. "(a) MoE-L vs width pruning at 1.5/4"."""
    better: str
    """Variant claimed better (a sweep variant name, or "teacher")."""
    worse: str
    """Variant claimed worse (a sweep variant name, or "teacher")."""
    metric: str = "overall"
    """"overall", a GenEval task, or a fidelity metric ("psnr", "ssim", "lpips"; students only)."""

    def __post_init__(self) -> None:
        if self.better == self.worse:
            raise ValueError(f"claim {self.name!r}: better and worse are both {self.better!r}")
        if self.metric in FIDELITY_METRICS and TEACHER in (self.better, self.worse):
            raise ValueError(
                f"claim {self.name!r}: metric {self.metric!r} is fidelity to the teacher; compare students"
            )


@dataclass(frozen=True)
class ClaimResult:
    claim: Claim
    delta: Interval
    """Paired bootstrap interval of metric(better) − metric(worse), seeds averaged per prompt."""
    seed_deltas: tuple[float, ...]
    """The same difference within each seed alone."""
    seeds: tuple[int, ...]

    @property
    def verdict(self) -> str:
        signs = {np.sign(d) for d in self.seed_deltas}
        if self.delta.low > 0 and signs == {1.0}:
            return "holds"
        if self.delta.high < 0 and signs == {-1.0}:
            return "fails"
        return "undecided"

    def row(self) -> str:
        scale, unit = (1.0, "") if self.claim.metric in FIDELITY_METRICS else (100.0, " pts")
        mean, sd = seed_spread(self.seed_deltas)
        digits = 3 if self.claim.metric in ("ssim", "lpips") else 1
        return (
            f"| {self.claim.name} | {self.claim.better} − {self.claim.worse} | {self.claim.metric} | "
            f"{self.delta.format(scale, digits)}{unit} | {f'{scale * mean:+.{digits}f}'.replace('-', '−')} ± "
            f"{scale * sd:.{digits}f} "
            f"(n={len(self.seeds)}) | **{self.verdict}** |"
        )


def load_per_prompt(run_dir: str | Path) -> dict:
    """``report/per_prompt.json`` of a finished experiment folder (ValueError naming the folder if absent)."""
    path = Path(run_dir) / "report" / "per_prompt.json"
    if not path.is_file():
        raise ValueError(f"{run_dir}: no report/per_prompt.json (the run has not finished its evaluation)")
    return json.loads(path.read_text())


def _values(report: dict, side: str, metric: str) -> np.ndarray:
    if metric in FIDELITY_METRICS:
        if metric not in report["fidelity"]:
            raise ValueError(f"metric {metric!r}: the runs did not measure it")
        return np.asarray(report["fidelity"][metric], dtype=np.float64)
    return np.asarray(report[side], dtype=np.float64)


def _paired(
    better: list[dict], worse: list[dict], claim: Claim
) -> tuple[list[int], list[np.ndarray], list[np.ndarray], list[str]]:
    """Per seed: (better values, worse values) on the same prompts; checks that the runs pair up."""
    by_seed_b = {r["seed"]: r for r in better}
    by_seed_w = {r["seed"]: r for r in worse}
    seeds = sorted(set(by_seed_b) & set(by_seed_w))
    if not seeds:
        raise ValueError(
            f"claim {claim.name!r}: no seed in common ({claim.better}: {sorted(by_seed_b)}, {claim.worse}: {sorted(by_seed_w)})"
        )
    tags = None
    values_b, values_w = [], []
    for s in seeds:
        rb, rw = by_seed_b[s], by_seed_w[s]
        if rb["prompts"] != rw["prompts"] or rb["images_per_prompt"] != rw["images_per_prompt"]:
            raise ValueError(
                f"claim {claim.name!r}: seed {s}'s runs were evaluated on different prompts or image counts"
            )
        tags = rb["tags"]
        side_b = "teacher" if claim.better == TEACHER else "student"
        side_w = "teacher" if claim.worse == TEACHER else "student"
        values_b.append(_values(rb, side_b, claim.metric))
        values_w.append(_values(rw, side_w, claim.metric))
    return seeds, values_b, values_w, tags


def decide(claim: Claim, runs: dict[str, list[dict]], resamples: int = 2000) -> ClaimResult:
    """The claim's interval, seed spread and verdict from per-prompt reports grouped by variant.

    ``runs[variant]`` lists that variant's ``per_prompt.json`` contents, one per seed. The pseudo-variant "teacher"
    uses the other side's runs (the teacher is scored on the same prompts and noise in each of them).
    """
    for side in (claim.better, claim.worse):
        if side != TEACHER and not runs.get(side):
            raise ValueError(f"claim {claim.name!r}: no finished run of variant {side!r}")
    better = runs[claim.worse] if claim.better == TEACHER else runs[claim.better]
    worse = runs[claim.better] if claim.worse == TEACHER else runs[claim.worse]
    seeds, values_b, values_w, tags = _paired(better, worse, claim)
    mean_b, mean_w = np.mean(values_b, axis=0), np.mean(values_w, axis=0)
    if claim.metric in FIDELITY_METRICS:
        delta = mean_difference(mean_w, mean_b, resamples)
        per_seed = [float(np.mean(b - w)) for b, w in zip(values_b, values_w)]
    else:
        intervals = geneval_differences(tags, mean_w, mean_b, resamples)
        if claim.metric not in intervals:
            raise ValueError(f"claim {claim.name!r}: metric {claim.metric!r} not among {sorted(intervals)}")
        delta = intervals[claim.metric]
        per_seed = [_point(tags, b, claim.metric) - _point(tags, w, claim.metric) for b, w in zip(values_b, values_w)]
    return ClaimResult(claim, delta, tuple(per_seed), tuple(seeds))


TABLE_HEAD = (
    "| claim | difference | metric | Δ [95% CI] | Δ per seed, mean ± sd | verdict |\n|---|---|---|---:|---:|---|\n"
)


def claims_table(results: list[ClaimResult]) -> str:
    """Markdown table of decided and undecided claims."""
    return TABLE_HEAD + "".join(r.row() + "\n" for r in results)


def variant_table(runs: dict[str, list[dict]]) -> str:
    """Markdown: each variant's GenEval overall (student, and its teacher) as mean ± sd over seeds."""
    lines = ["| variant | seeds | student overall | teacher overall |", "|---|---:|---:|---:|"]
    for name, reports in runs.items():
        student = [_overall(r["tags"], r["student"]) for r in reports]
        teacher = [_overall(r["tags"], r["teacher"]) for r in reports]
        (ms, ss), (mt, st) = seed_spread(student), seed_spread(teacher)
        lines.append(f"| {name} | {len(reports)} | {100 * ms:.1f} ± {100 * ss:.1f} | {100 * mt:.1f} ± {100 * st:.1f} |")
    return "\n".join(lines) + "\n"


def _overall(tags: list[str], accuracy: list[float]) -> float:
    return _point(tags, accuracy, "overall")


def _point(tags: list[str], accuracy, metric: str) -> float:
    """GenEval score of per-prompt accuracies: a task's mean, or overall = the unweighted mean of task means."""
    by_task: dict[str, list[float]] = {}
    for tag, acc in zip(tags, accuracy, strict=True):
        by_task.setdefault(tag, []).append(float(acc))
    if metric != "overall":
        return float(np.mean(by_task[metric]))
    return float(np.mean([np.mean(v) for v in by_task.values()]))
