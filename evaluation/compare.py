"""``python -m src.cli compare``: a table of an MLflow experiment's runs and a quality-vs-activated-parameters plot.

Reads the runs with ``search_runs`` and keeps the metrics ``evaluate`` and the training runs log under these names:
``params/activated``, ``flops``, ``geneval*/overall`` and ``geneval*/<task>``, ``clip_score``, ``fidelity/*``,
``latency/*`` (plus the chosen quality metric, whatever its name). The Pareto front is the set of runs that no other
run beats on both axes (fewer or equal activated parameters and better or equal quality, one of them strictly).
Outputs: compare.csv, compare.md, compare.png under ``--out``; the same files are logged to a new run named
"compare" (tag ``dense2moe.kind=compare``, skipped by later compares) in the experiment.

GenEval numbers are only put side by side when they share a protocol (`evaluation.provenance`: prompts, detector
and colour weights, thresholds, images per prompt, sampler); mixed protocols are refused unless
``--allow_mixed_protocols``. Runs logged before provenance was recorded are shown with protocol "unknown" and a
warning.
"""

from __future__ import annotations

import csv
import json
import math
import tempfile
from pathlib import Path

import mlflow

from evaluation.bootstrap import Interval
from evaluation.claims import Claim, decide
from evaluation.provenance import PROTOCOL_ID_TAG, PROTOCOL_TAG, protocol_differences
from src.errors import UserError
from src.training.mlflow_logging import check_tracking_uri, resolve_tracking_uri

QUALITY_METRICS = ("geneval/overall", "geneval_glyphs/overall", "geneval_shapes/overall", "clip_score")
ACTIVATED = "params/activated"
_KIND_TAG = "dense2moe.kind"
LAYOUT_PARAMS = ("student/conversion/layout", "student/conversion/shared_width", "student/conversion/expert_width")
"""The params fit runs log for their MoE layout (src/training/describe.py): compare's default param columns."""
_LEADING = ("params/activated", "flops")
_TRAILING = ("clip_score", "fidelity/psnr", "fidelity/ssim", "fidelity/lpips")


def pareto_front(points: list[tuple[float, float]], maximize: bool = True) -> list[int]:
    """Indices of the non-dominated (cost, quality) points, by increasing cost; lower cost is better."""
    sign = 1 if maximize else -1

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        no_worse = a[0] <= b[0] and sign * a[1] >= sign * b[1]
        return no_worse and (a[0] < b[0] or sign * a[1] > sign * b[1])

    front = [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]
    return sorted(front, key=lambda i: (points[i][0], -sign * points[i][1]))


def _value(run, key: str) -> float | None:
    """A run's metric, or a numeric param of the same name."""
    if key in run.data.metrics:
        return float(run.data.metrics[key])
    try:
        return float(run.data.params[key])
    except (KeyError, ValueError):
        return None


def _columns(runs: list, metric: str) -> list[str]:
    keys = {k for run in runs for k in run.data.metrics}
    keys |= {k for k in _LEADING if any(_value(r, k) is not None for r in runs)}
    geneval = sorted(k for k in keys if k.startswith("geneval") and k.count("/") == 1 and not k.endswith("/overall"))
    overall = sorted(k for k in keys if k.startswith("geneval") and k.endswith("/overall"))
    latency = sorted(k for k in keys if k.startswith("latency/"))
    ordered = [*_LEADING, metric, *overall, *geneval, *_TRAILING, *latency]
    return [k for i, k in enumerate(ordered) if k in keys and k not in ordered[:i]]


def _runs(client, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs += [r for r in page if r.data.tags.get(_KIND_TAG) != "compare"]
        token = page.token
        if not token:
            return runs


def _protocols(runs: list, allow_mixed: bool) -> dict[str, str]:
    """Run id → GenEval protocol id ("unknown" without a record) for runs with a GenEval number; refuses a mix.

    Each family of metrics (``geneval/*``, ``geneval_shapes/*``) is checked on its own: they are separate columns.
    """
    labels: dict[str, str] = {}
    families = sorted({k.split("/")[0] for r in runs for k in r.data.metrics if k.startswith("geneval") and "/" in k})
    for family in families:
        carrying = [r for r in runs if any(k.startswith(family + "/") for k in r.data.metrics)]
        carrying.sort(key=lambda r: r.info.start_time or 0)
        protocols = {}
        for run in carrying:
            try:
                protocols[run.info.run_id] = json.loads(run.data.tags[PROTOCOL_TAG])
            except (KeyError, json.JSONDecodeError):
                continue
            labels[run.info.run_id] = run.data.tags.get(PROTOCOL_ID_TAG, "?")
        unknown = [r for r in carrying if r.info.run_id not in protocols]
        for run in unknown:
            labels[run.info.run_id] = "unknown"
        if unknown:
            names = ", ".join(_name(r) for r in unknown)
            print(f"warning: {family}/* of {names}: protocol unknown (logged before provenance was recorded)")
        first = next(iter(protocols), None)
        other = next((i for i in protocols if protocols[i] != protocols[first]), None)
        if other is not None and not allow_mixed:
            named = {r.info.run_id: _name(r) for r in carrying}
            differences = protocol_differences(protocols[first], protocols[other])
            shown = "; ".join(differences[:3]) + ("; ..." if len(differences) > 3 else "")
            raise UserError(
                f"{family}/* of runs {named[first]!r} and {named[other]!r} come from different GenEval protocols "
                f"({shown}); pass --allow_mixed_protocols true to compare them anyway"
            )
    return labels


def _teacher_deltas(runs: list, rows: list[dict]) -> list[str]:
    """Adds "Δ vs teacher" (points, with the run's own paired 95% interval) to fit runs; the column names added."""
    by_id = {r.info.run_id: r for r in runs}
    column = "Δ vs teacher [95% CI]"
    added = False
    for row in rows:
        metrics = by_id[row["run_id"]].data.metrics
        key = next((k for k in metrics if k.startswith("delta/") and k.endswith("/overall")), None)
        if key is not None and f"{key}/low" in metrics:
            interval = Interval(metrics[key], metrics[f"{key}/low"], metrics[f"{key}/high"])
            row[column] = interval.format() + ("" if interval.decided else " (undecided)")
            added = True
    return [column] if added else []


def _baseline_deltas(client, runs: list, rows: list[dict], baseline: str) -> str:
    """Adds "Δ vs <baseline>" from per-prompt reports (paired by prompt); refuses an unknown baseline."""

    def per_prompt(run) -> dict | None:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = client.download_artifacts(run.info.run_id, "report/per_prompt.json", tmp)
            except Exception:  # noqa: BLE001 — MLflow raises several kinds for a missing artifact
                return None
            return json.loads(Path(path).read_text())

    named = [r for r in runs if _name(r) == baseline]
    if not named:
        raise UserError(
            f"baseline={baseline!r}: no run of that name; runs: {', '.join(sorted({_name(r) for r in runs}))}"
        )
    reference = per_prompt(named[-1])
    if reference is None:
        raise UserError(f"baseline={baseline!r}: the run has no report/per_prompt.json (a fit run's evaluation)")
    column = f"Δ vs {baseline} [95% CI]"
    by_id = {r.info.run_id: r for r in runs}
    for row in rows:
        report = per_prompt(by_id[row["run_id"]])
        if report is None:
            continue
        try:
            result = decide(
                Claim(row["run"], better="run", worse="baseline"), {"run": [report], "baseline": [reference]}
            )
        except ValueError:
            row[column] = "not paired (other prompts or seed)"
            continue
        row[column] = result.delta.format() + ("" if result.delta.decided else " (undecided)")
    return column


def _name(run) -> str:
    return run.info.run_name or run.info.run_id[:8]


def _format(key: str, value) -> str:
    """Markdown cell: parameter counts in M/B, other large numbers (FLOPs) with SI prefixes, short run ids."""
    if value is None:
        return ""
    if key == "run_id":
        return value[:8]
    if key == "pareto":
        return "✓" if value else ""
    if not isinstance(value, float):
        return str(value)
    if key.startswith("params/") and abs(value) >= 1e6:
        return f"{value / 1e9:.3g}B" if abs(value) >= 1e9 else f"{value / 1e6:.3g}M"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= max(scale, 1e5):
            return f"{value / scale:.4g}{prefix}"
    return f"{value:.4g}"


def _plot(rows: list[dict], metric: str, front: list[int], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # heavy: only the plot needs matplotlib
    from matplotlib.figure import Figure

    scale, unit = (1e9, "B") if max(r[ACTIVATED] for r in rows) >= 1e9 else (1e6, "M")
    xs = [r[ACTIVATED] / scale for r in rows]
    ys = [r[metric] for r in rows]
    figure = Figure(figsize=(7, 5))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.scatter(xs, ys, color="tab:blue", label="runs")
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "o-", color="tab:red", label="Pareto front")
    for x, y, row in zip(xs, ys, rows):
        ax.annotate(row["run"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(f"activated parameters ({unit})")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    figure.savefig(path, dpi=120, bbox_inches="tight")


def compare(
    experiment: str,
    tracking_uri: str | None = None,
    metric: str | None = None,
    out: str = "outputs/compare",
    maximize: bool = True,
    log_mlflow: bool = True,
    allow_mixed_protocols: bool = False,
    baseline: str | None = None,
    params: list[str] | None = None,
) -> list[dict]:
    """Table of an experiment's runs (CSV + markdown) and a quality-vs-activated-parameters plot with its Pareto front.

    Args:
        experiment: MLflow experiment name.
        tracking_uri: MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db).
        metric: Quality metric for the plot (default: the first of geneval/overall, geneval_shapes/overall,
            clip_score that some run has).
        out: Output folder for compare.csv, compare.md and compare.png.
        maximize: Higher metric is better (false for e.g. fidelity/lpips).
        log_mlflow: Log the outputs to a new "compare" run in the experiment.
        allow_mixed_protocols: Put GenEval numbers of different protocols (prompts, detector, colour model,
            thresholds, images per prompt, sampler) in one table; refused by default.
        baseline: A run name: every fit run evaluated on the same prompts and noise (same seed) gets a column
            "Δ vs <baseline>" = its student's GenEval overall minus the baseline's, with the paired bootstrap 95%
            interval over prompts (from the runs' ``report/per_prompt.json``). Fit runs always get "Δ vs teacher".
        params: MLflow param keys shown as columns after the run name, e.g. ``[student/mob/active]`` (default: the
            MoE layout and expert widths that fit runs log, when some run has them).
    """
    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise UserError(f"MLflow experiment {experiment!r} does not exist at {uri}; experiments: {', '.join(names)}")
    runs = _runs(client, found.experiment_id)
    if metric is None:
        metric = next((m for m in QUALITY_METRICS if any(m in r.data.metrics for r in runs)), None)
        if metric is None:
            raise UserError(f"experiment {experiment!r}: no run has any of the metrics {', '.join(QUALITY_METRICS)}")
    runs = [r for r in runs if _value(r, metric) is not None]
    if not runs:
        raise UserError(f"experiment {experiment!r}: no run has the metric {metric!r}")
    columns = _columns(runs, metric)
    params = [k for k in LAYOUT_PARAMS if any(k in r.data.params for r in runs)] if params is None else params
    protocols = _protocols(runs, allow_mixed_protocols)
    rows = [
        {"run": _name(r), "run_id": r.info.run_id, **{k: r.data.params.get(k) for k in params}}
        | {k: _value(r, k) for k in columns}
        for r in sorted(runs, key=lambda r: r.info.start_time or 0)
    ]
    if protocols:
        for row in rows:
            row["protocol"] = protocols.get(row["run_id"])
    intervals = _teacher_deltas(runs, rows)
    if baseline is not None:
        intervals.append(_baseline_deltas(client, runs, rows, baseline))
    plotted = [r for r in rows if r.get(ACTIVATED) is not None and math.isfinite(r[metric])]
    if not plotted:
        raise UserError(f"experiment {experiment!r}: no run with {metric!r} also has {ACTIVATED!r} (evaluate logs it)")
    front = pareto_front([(r[ACTIVATED], r[metric]) for r in plotted], maximize)
    front_ids = {plotted[i]["run_id"] for i in front}
    for row in rows:
        row["pareto"] = row["run_id"] in front_ids

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    header = ["run", "run_id", *params, *columns, *intervals, *(["protocol"] if protocols else []), "pareto"]
    with (out_dir / "compare.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    markdown = "\n".join(
        [
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
            *("| " + " | ".join(_format(k, row.get(k)) for k in header) + " |" for row in rows),
        ]
    )
    (out_dir / "compare.md").write_text(markdown + "\n")
    _plot(plotted, metric, front, out_dir / "compare.png", f"{experiment}: {metric} vs activated parameters")
    print(markdown)
    print(f"Pareto front ({metric}): {', '.join(plotted[i]['run'] for i in front)}; files in {out_dir}")
    if log_mlflow:
        run = client.create_run(found.experiment_id, run_name="compare", tags={_KIND_TAG: "compare"})
        for key, value in {"metric": metric, "maximize": maximize, "runs": len(rows)}.items():
            client.log_param(run.info.run_id, key, value)
        for name in ("compare.csv", "compare.md", "compare.png"):
            client.log_artifact(run.info.run_id, str(out_dir / name))
        client.set_terminated(run.info.run_id)
        print(f"MLflow run: {uri} experiment={experiment!r} run_id={run.info.run_id}")
    return rows
