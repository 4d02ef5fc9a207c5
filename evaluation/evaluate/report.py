"""What an evaluation reports: console lines, the MLflow run (metrics ``compare`` reads, artifacts, provenance)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import mlflow
import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageFont

from evaluation.evaluate.options import TrackingOptions
from evaluation.evaluate.scoring import METRIC_PREFIX
from evaluation.provenance import mlflow_tags
from src.training.mlflow_logging import check_tracking_uri, experiment_id, resolve_tracking_uri


def failure_grid(records: list[dict], out: Path, limit: int = 24, tile: int = 192, cols: int = 6) -> np.ndarray | None:
    """Up to ``limit`` failed images, taken round-robin over tasks, each captioned with GenEval's reason."""
    by_task: dict[str, list[dict]] = {}
    for record in records:
        if not record["correct"]:
            by_task.setdefault(record["tag"], []).append(record)
    picked = []
    while len(picked) < limit and any(by_task.values()):
        for failures in by_task.values():
            if failures and len(picked) < limit:
                picked.append(failures.pop(0))
    if not picked:
        return None
    font = ImageFont.load_default()
    caption_h = 64
    rows = (len(picked) + cols - 1) // cols
    grid = Image.new("RGB", (cols * (tile + 4) + 4, rows * (tile + caption_h + 4) + 4), "white")
    draw = ImageDraw.Draw(grid)
    for n, record in enumerate(picked):
        image = Image.open(out / record["filename"]).convert("RGB")
        # Nearest keeps 32-pixel shapes crisp; real images are downsampled smoothly.
        resample = Image.NEAREST if image.width < tile else Image.BILINEAR
        x, y = 4 + (n % cols) * (tile + 4), 4 + (n // cols) * (tile + caption_h + 4)
        grid.paste(image.resize((tile, tile), resample), (x, y))
        text = f"{record['tag']}: {record['prompt']}\n{record['reason'].replace(chr(10), '; ')}"
        lines = [part for line in text.splitlines() for part in textwrap.wrap(line, 34)][:5]
        draw.multiline_text((x, y + tile + 2), "\n".join(lines), fill="black", font=font, spacing=1)
    return np.asarray(grid)


def score_lines(summary: dict) -> list[str]:
    """The CLIP score and fidelity of a summary, one console line each (GenEval's own table is printed apart)."""
    lines = []
    if "clip_score" in summary:
        tasks = ", ".join(f"{t} {v:.2f}" for t, v in summary["clip_score"]["tasks"].items())
        lines.append(f"CLIP score: {summary['clip_score']['clip_score']:.3f} ({tasks})")
    if "fidelity" in summary:
        lines.append("fidelity: " + ", ".join(f"{k} {v:.4g}" for k, v in summary["fidelity"].items()))
    return lines


def metrics_of(summary: dict) -> dict[str, float]:
    """The MLflow metrics of an evaluate summary (names that ``compare`` reads)."""
    metrics = dict(summary.get("cost", {}))
    prefix = METRIC_PREFIX.get(summary["detector"])
    if prefix and "tasks" in summary:
        metrics.update({f"{prefix}/{t}": v for t, v in summary["tasks"].items()})
        metrics[f"{prefix}/overall"] = summary["overall"]
    if "clip_score" in summary:
        metrics["clip_score"] = summary["clip_score"]["clip_score"]
        metrics.update({f"clip_score/{t}": v for t, v in summary["clip_score"]["tasks"].items()})
    for key, value in summary.get("fidelity", {}).items():
        if key != "pairs":
            metrics[f"fidelity/{key}"] = value
    metrics.update({f"latency/{k}": v for k, v in summary.get("latency", {}).items()})
    return metrics


def check_tracking(tracking: TrackingOptions) -> None:
    """The MLflow store must be reachable before anything is generated (nothing to check without logging)."""
    if tracking.log_mlflow:
        check_tracking_uri(resolve_tracking_uri(tracking.tracking_uri))


def log_to_mlflow(
    summary: dict, records: list[dict], out_dir: Path, tracking: TrackingOptions, info: dict, config: dict
) -> None:
    """One run per evaluation: ``config`` as ``config.yaml``, the model's settings and weights hash (``info``) as
    params, the summary's metrics, its provenance as tags, the task table and the worst failures."""
    uri = resolve_tracking_uri(tracking.tracking_uri)
    check_tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=experiment_id(mlflow.MlflowClient(uri), tracking.experiment_name))
    run_name = tracking.run_name or out_dir.name
    with mlflow.start_run(run_name=run_name, tags={"kind": "evaluation", "experiment": run_name}) as run:
        mlflow.log_params({k: v for k, v in info.items() if v is not None})
        mlflow.log_text(yaml.safe_dump(config, sort_keys=False), "config.yaml")
        mlflow.log_metrics(metrics_of(summary))
        if "provenance" in summary:
            mlflow.set_tags(mlflow_tags(summary["provenance"]))
            mlflow.log_dict(summary["provenance"], "provenance.json")
        mlflow.log_artifact(str(out_dir / "summary.json"))
        mlflow.log_text(task_table(summary), "geneval_tasks.md")
        grid = failure_grid(records, out_dir)
        if grid is not None:
            mlflow.log_image(grid, "worst_failures.png")
            reasons = [
                f"{r['filename']}\t{r['prompt']}\t{r['reason'].replace(chr(10), '; ')}"
                for r in records
                if not r["correct"]
            ]
            mlflow.log_text("\n".join(reasons[:32]) + "\n", "worst_failures.txt")
        print(f"MLflow run: {uri} experiment={tracking.experiment_name!r} run_id={run.info.run_id}")


def task_table(summary: dict) -> str:
    """Per-task table (GenEval accuracy and, when computed, CLIP score) as markdown."""
    clip = summary.get("clip_score", {}).get("tasks", {})
    tasks = list(summary.get("tasks", {})) or list(clip)
    lines = ["| task | accuracy | CLIP score |", "|---|---|---|"]
    for t in tasks:
        accuracy = f"{summary['tasks'][t]:.4f}" if t in summary.get("tasks", {}) else ""
        lines.append(f"| {t} | {accuracy} | {clip[t]:.2f} |" if t in clip else f"| {t} | {accuracy} | |")
    overall = f"**{summary['overall']:.4f}**" if "overall" in summary else ""
    mean_clip = f"**{summary['clip_score']['clip_score']:.2f}**" if "clip_score" in summary else ""
    lines.append(f"| **overall** | {overall} | {mean_clip} |")
    return "\n".join(lines) + "\n"
