"""``python -m src.cli evaluate``: generate → detect → score (GenEval rules) → results.jsonl, summary, MLflow.

The shapes detector (classical, no weights) scores the embedded world; the real GenEval detector path
(Mask2Former + CLIP colours) plugs into the same scorer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from evaluation.generate import generate_images, iter_samples, load_prompt_set
from evaluation.geneval import format_summary, result_record, summarize, write_results_jsonl
from src.errors import UserError

DETECTORS = ("shapes",)


def score_folder(out: str | Path, detector: str = "shapes") -> tuple[list[dict], dict]:
    """Score every image of a GenEval-layout folder; writes results.jsonl and summary.json next to the images."""
    from evaluation.shapes_detector import evaluate_shapes_image

    if detector not in DETECTORS:
        raise UserError(f"detector={detector!r}: allowed {', '.join(DETECTORS)}")
    out = Path(out)
    records = []
    for filename, meta, path in iter_samples(out):
        image = np.asarray(Image.open(path).convert("RGB"))
        correct, reason, detections = evaluate_shapes_image(image, meta)
        records.append(result_record(filename, meta, correct, reason, detections))
    if not records:
        raise UserError(f"{out}: no images in GenEval layout (<out>/<%05d>/samples/<%04d>.png)")
    summary = summarize(records)
    write_results_jsonl(out / "results.jsonl", records)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return records, summary


def failure_grid(records: list[dict], out: Path, limit: int = 32) -> np.ndarray | None:
    """The first ``limit`` failed images (upscaled) as one grid; their reasons go to a text artifact."""
    from src.training.base import image_grid

    failed = [r for r in records if not r["correct"]][:limit]
    if not failed:
        return None
    return image_grid([np.asarray(Image.open(out / r["filename"]).convert("RGB")) for r in failed])


def evaluate(
    model: str = "checkpoints/teacher_tiny",
    prompts: str = "shapes-heldout",
    out: str | None = None,
    images_per_prompt: int = 4,
    batch_size: int = 64,
    seed: int = 0,
    steps: int = 20,
    cfg_scale: float = 4.0,
    image_size: int = 32,
    top_k: int | None = None,
    detector: str = "shapes",
    limit: int | None = None,
    experiment_name: str = "evaluation",
    run_name: str | None = None,
    tracking_uri: str | None = None,
    log_mlflow: bool = True,
    threads: int | None = None,
) -> dict:
    """Generate images for a prompt set with a model and score them with GenEval's rules.

    Args:
        model: A diffusers folder (the teacher, or an exported student).
        prompts: "shapes-heldout" (553 held-out compositions, GenEval's task counts), "geneval", or a .txt/.jsonl file.
        out: Output folder in GenEval's layout (default outputs/eval/<model folder name>).
        images_per_prompt: Images per prompt (GenEval uses 4).
        batch_size: Images generated per batch.
        seed: Noise seed; image k of prompt i always gets the same noise for every model.
        steps: Euler sampling steps.
        cfg_scale: Classifier-free guidance scale.
        image_size: Image side in pixels (shapes world).
        top_k: Routed experts per token at inference for an MoE model (None = as trained).
        detector: "shapes" (the classical shapes-world detector).
        limit: Only the first N prompts (quick looks).
        experiment_name: MLflow experiment.
        run_name: MLflow run name (default: the output folder name).
        tracking_uri: MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db).
        log_mlflow: Log metrics and artifacts to MLflow.
        threads: torch CPU threads (default: torch's choice).
    """
    from src.models.loading import load_transformer
    from src.models.pipeline import SamplingConfig, ShapesPipeline

    if threads:
        torch.set_num_threads(threads)
    if detector not in DETECTORS:
        raise UserError(f"detector={detector!r}: allowed {', '.join(DETECTORS)}")
    metadata = load_prompt_set(prompts, image_size)[:limit]
    out_dir = Path(out or f"outputs/eval/{Path(model).name}")
    transformer = load_transformer(model).eval()
    if top_k is not None:
        from src.models.flux_moe import set_top_k

        set_top_k(transformer, top_k)
    pipeline = ShapesPipeline(
        transformer, image_size=image_size, sampling=SamplingConfig(steps=steps, cfg_scale=cfg_scale)
    )
    info = {"model": str(model), "steps": steps, "cfg_scale": cfg_scale, "top_k": top_k}
    started = time.perf_counter()
    generated = generate_images(pipeline, metadata, out_dir, images_per_prompt, batch_size, seed, info)
    seconds = time.perf_counter() - started
    records, summary = score_folder(out_dir, detector)
    print(format_summary(summary))
    print(f"generated {generated} images in {seconds:.1f} s; results in {out_dir}/results.jsonl")
    if log_mlflow:
        _log_to_mlflow(summary, records, out_dir, experiment_name, run_name or out_dir.name, tracking_uri, info)
    return summary


def _log_to_mlflow(summary, records, out_dir, experiment_name, run_name, tracking_uri, info) -> None:
    import mlflow

    from src.training.mlflow_logging import check_tracking_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_name)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params(info)
        mlflow.log_metrics({f"geneval_shapes/{t}": v for t, v in summary["tasks"].items()})
        mlflow.log_metric("geneval_shapes/overall", summary["overall"])
        mlflow.log_artifact(str(out_dir / "summary.json"))
        mlflow.log_text(_task_table(summary), "geneval_tasks.md")
        grid = failure_grid(records, out_dir)
        if grid is not None:
            mlflow.log_image(grid, "worst_failures.png")
            reasons = [
                f"{r['filename']}\t{r['prompt']}\t{r['reason'].replace(chr(10), '; ')}"
                for r in records
                if not r["correct"]
            ]
            mlflow.log_text("\n".join(reasons[:32]) + "\n", "worst_failures.txt")
        print(f"MLflow run: {uri} experiment={experiment_name!r} run_id={run.info.run_id}")


def _task_table(summary: dict) -> str:
    lines = ["| task | accuracy |", "|---|---|"]
    lines += [f"| {t} | {v:.4f} |" for t, v in summary["tasks"].items()]
    lines.append(f"| **overall** | **{summary['overall']:.4f}** |")
    return "\n".join(lines) + "\n"
