"""The end of a study: best-trials table (markdown), and Pareto front, parameter importances and optimisation
history as PNGs (optuna.visualization.matplotlib), written to the sweep folder and logged to the study's run."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from evaluation.claims import claims_table, decide, load_per_prompt, variant_table
from src.sweep.spec import VARIANT_PARAM, SweepSpec

BEST_ROWS = 10
"""Rows of the best-trials table of a single-objective study."""
REASON_CHARS = 90


def _fmt(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) >= 1e4:
        return f"{int(value):,}"  # parameter and FLOP counts
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _with_interval(metrics: dict[str, Any], name: str) -> str:
    """A metric, followed by its 95% interval "[low, high]" when the run reported one (e.g. delta/…/overall)."""
    if name not in metrics:
        return ""
    low, high = metrics.get(f"{name}/low"), metrics.get(f"{name}/high")
    interval = f" [{_fmt(low)}, {_fmt(high)}]" if low is not None and high is not None else ""
    return _fmt(metrics[name]) + interval


def _arrow(direction: str) -> str:
    return "↑" if direction == "maximize" else "↓"


def ran(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Trials that ran (not a waiting retry, not one skipped because the budget was already reached)."""
    return [t for t in trials if t.state != TrialState.WAITING and not t.user_attrs.get("skipped")]


def best_trials(study: optuna.Study, spec: SweepSpec) -> list[FrozenTrial]:
    """The Pareto front (multi-objective, sorted by the first objective) or the best completed trials."""
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not done:
        return []
    first = spec.objectives[0]
    sign = -1 if first.direction == "maximize" else 1
    rows = study.best_trials if spec.multi_objective else done
    return sorted(rows, key=lambda t: sign * t.values[0])[: None if spec.multi_objective else BEST_ROWS]


def table(trials: list[FrozenTrial], spec: SweepSpec, with_state: bool = False) -> str:
    params = [p.path for p in spec.params]
    extra = [m for m in spec.report_metrics if m not in [o.metric for o in spec.objectives]]
    head = ["trial", *(["state"] if with_state else []), *params]
    head += [f"{o.metric} {_arrow(o.direction)}" for o in spec.objectives] + extra + ["minutes"]
    if with_state:
        head.append("reason")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in trials:
        metrics = t.user_attrs.get("metrics", {})
        row = [str(t.number), *([t.state.name] if with_state else [])]
        row += [_fmt(t.params.get(p, "")) for p in params]
        values = t.values if t.state == TrialState.COMPLETE else [None] * len(spec.objectives)
        row += [_fmt(v) if v is not None else "" for v in values]
        row += [_with_interval(metrics, m) for m in extra]
        seconds = t.user_attrs.get("seconds")
        row.append(f"{seconds / 60:.1f}" if seconds is not None else "")
        if with_state:
            row.append((t.user_attrs.get("fail_reason") or "")[:REASON_CHARS].replace("|", "/"))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def tables(study: optuna.Study, spec: SweepSpec) -> str:
    """Markdown: the claims (when the sweep has any), the best trials (or Pareto front), then every trial."""
    title = "Pareto front" if spec.multi_objective else f"Best {BEST_ROWS} trials"
    best = best_trials(study, spec)
    text = claims(study, spec)
    text += f"## {spec.name}: {title}\n\n" + (table(best, spec) if best else "No completed trial.\n")
    everything = sorted(ran(study.get_trials(deepcopy=False)), key=lambda t: t.number)
    return text + f"\n## All trials\n\n{table(everything, spec, with_state=True)}"


def claims(study: optuna.Study, spec: SweepSpec) -> str:
    """Markdown: each variant's score over its seeds, then every claim with its interval, seed spread and verdict.

    A trial's per-prompt report is ``<trial_dir>/run/report/per_prompt.json``; variants are told apart by the
    ``variant`` parameter and seeds by the report's own seed. A claim whose variants have not finished says so.
    """
    if not spec.claims:
        return ""
    runs: dict[str, list[dict]] = {}
    for t in study.get_trials(deepcopy=False):
        if t.state != TrialState.COMPLETE or "trial_dir" not in t.user_attrs:
            continue
        try:
            report = load_per_prompt(Path(t.user_attrs["trial_dir"]) / "run")
        except ValueError:
            continue
        runs.setdefault(str(t.params.get(VARIANT_PARAM, "base")), []).append(report)
    text = f"## {spec.name}: claims\n\n" + (variant_table(runs) if runs else "No finished run.\n") + "\n"
    results, missing = [], []
    for claim in spec.claims:
        try:
            results.append(decide(claim, runs))
        except ValueError as err:
            missing.append(f"- {claim.name}: not decided ({err})")
    text += claims_table(results) if results else ""
    return text + "".join(line + "\n" for line in missing) + "\n"


def _save(axes: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt  # heavy: only the plots need it

    first = axes.flat[0] if hasattr(axes, "flat") else axes
    figure = first.figure
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def plots(study: optuna.Study, spec: SweepSpec, folder: Path) -> tuple[list[Path], list[str]]:
    """(PNG files, notes on plots that were skipped and why)."""
    import matplotlib  # heavy: only the plots need it (and its backend is set before pyplot loads)

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as vis  # heavy (matplotlib): only the plots need it

    folder.mkdir(parents=True, exist_ok=True)
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    names = [o.metric for o in spec.objectives]
    files: list[Path] = []
    notes: list[str] = []
    if not done:
        return files, ["no plots: no completed trial"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's ExperimentalWarning for the matplotlib backend
        if spec.multi_objective:
            if len(names) <= 3:
                files.append(_save(vis.plot_pareto_front(study, target_names=names), folder / "pareto_front.png"))
            else:
                notes.append(f"no Pareto front plot: {len(names)} objectives (at most 3 can be drawn)")
        for i, name in enumerate(names):
            target = (lambda t, i=i: t.values[i]) if spec.multi_objective else None
            suffix = f"_{i}" if spec.multi_objective else ""
            axes = vis.plot_optimization_history(study, target=target, target_name=name)
            files.append(_save(axes, folder / f"optimization_history{suffix}.png"))
        varying = [p for p in {k for t in done for k in t.params} if len({repr(t.params.get(p)) for t in done}) > 1]
        if len(done) < 2 or not varying:
            notes.append("no parameter importances: they need at least 2 completed trials with different values")
        else:
            for i, name in enumerate(names):
                target = (lambda t, i=i: t.values[i]) if spec.multi_objective else None
                suffix = f"_{i}" if spec.multi_objective else ""
                try:
                    axes = vis.plot_param_importances(study, target=target, target_name=name)
                except (RuntimeError, ValueError, ZeroDivisionError) as err:
                    notes.append(f"no parameter importances for {name}: {err}")
                    continue
                files.append(_save(axes, folder / f"param_importances{suffix}.png"))
    return files, notes


def summary_metrics(study: optuna.Study, spec: SweepSpec) -> dict[str, float]:
    """Study-run metrics: trial counts by state, best value(s) (single objective) or the Pareto front's size."""
    out = {f"trials/{s.name.lower()}": 0.0 for s in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)}
    for t in ran(study.get_trials(deepcopy=False)):
        key = f"trials/{t.state.name.lower()}"
        if key in out:
            out[key] += 1
    best = best_trials(study, spec)
    if spec.multi_objective:
        out["pareto/size"] = float(len(best))
    elif best:
        out[f"best/{spec.objectives[0].metric}"] = best[0].values[0]
        out["best/trial"] = float(best[0].number)
    return out
