"""The evaluation at the end of every fit: what the student gained and what it lost, against its teacher.

Teacher and student generate the same held-out prompts from the same noise. Reported (printed as one table and
logged to the parent MLflow run): GenEval-shapes per task and overall for both, fidelity to the teacher (PSNR,
SSIM), total/activated parameters and FLOPs per image per step, and sampling latency of both measured in this
run, plus a side-by-side grid (teacher row above student row) and the table as artifacts.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import numpy as np

from evaluation.fidelity import fidelity
from evaluation.generate import image_seed
from evaluation.geneval import result_record, summarize
from evaluation.shapes_detector import evaluate_shapes_image
from src.data.shapes import TASKS, ShapesWorld
from src.models.accounting import count_params, flops_per_image
from src.models.pipeline import ShapesPipeline
from src.training.base import image_grid


def generate_all(pipeline: ShapesPipeline, model, metadata: list[dict], per_prompt: int, batch: int, seed: int):
    items = [(i, k) for i in range(len(metadata)) for k in range(per_prompt)]
    images = []
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        prompts = [metadata[i]["prompt"] for i, _ in chunk]
        images.append(pipeline(prompts, [image_seed(seed, i, k) for i, k in chunk], model))
    return items, np.concatenate(images)


def score(items, images, metadata) -> dict:
    records = []
    for (i, k), image in zip(items, images):
        correct, reason, det = evaluate_shapes_image(image, metadata[i])
        records.append(result_record(f"{i:05d}/samples/{k:04d}.png", metadata[i], correct, reason, det))
    return summarize(records)


def latency(pipeline: ShapesPipeline, model, batch: int, repeats: int = 3) -> float:
    """Median seconds per image for sampling a batch (full Euler loop with CFG), after one warm-up."""
    prompts = ["a photo of a red circle and a blue square"] * batch
    seeds = list(range(batch))
    pipeline(prompts[:2], seeds[:2], model)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pipeline(prompts, seeds, model)
        times.append(time.perf_counter() - start)
    return statistics.median(times) / batch


def evaluate_experiment(exp, teacher, student, pipeline: ShapesPipeline, uri: str, parent_run_id: str) -> dict:
    import mlflow

    ev = exp.evaluation
    world = ShapesWorld(size=exp.data.image_size)
    metadata = world.heldout_metadata({t: ev.prompts_per_task for t in TASKS}, seed=exp.seed + 1)
    student.eval()
    results: dict[str, Any] = {}
    images = {}
    for name, model in (("teacher", teacher), ("student", student)):
        items, images[name] = generate_all(pipeline, model, metadata, ev.images_per_prompt, ev.batch_size, exp.seed)
        summary = score(items, images[name], metadata)
        results[f"{name}/geneval_shapes/overall"] = summary["overall"]
        for task, acc in summary["tasks"].items():
            results[f"{name}/geneval_shapes/{task}"] = acc
        results[f"latency/{name}_s_per_image"] = latency(pipeline, model, ev.latency_batch)
    results |= {f"fidelity/{k}": v for k, v in fidelity(images["teacher"], images["student"]).items()}
    tokens = pipeline.tokens_per_side**2
    text_len = pipeline.text_encoder.cfg.max_tokens
    for name, model in (("teacher", teacher), ("student", student)):
        params = count_params(model)
        results[f"params/{name}_total"] = params["total"]
        results[f"params/{name}_activated"] = params["activated"]
        results[f"params/{name}_activated_without_modulation"] = params["activated_without_modulation"]
        results[f"flops/{name}"] = flops_per_image(model, image_tokens=tokens, text_len=text_len)["total"]
    results["params/activated"] = results["params/student_activated"]
    results["flops"] = results["flops/student"]
    results["geneval_shapes/overall"] = results["student/geneval_shapes/overall"]
    results["geneval_shapes/retained"] = results["student/geneval_shapes/overall"] / max(
        results["teacher/geneval_shapes/overall"], 1e-9
    )
    table = format_table(results)
    print(table)
    client = mlflow.MlflowClient(tracking_uri=uri)
    client.log_batch(parent_run_id, metrics=[mlflow.entities.Metric(k, float(v), 0, 0) for k, v in results.items()])
    client.log_text(parent_run_id, table, "report/summary.md")
    client.log_dict(parent_run_id, results, "report/summary.json")
    pick = list(range(0, len(metadata) * ev.images_per_prompt, max(1, len(metadata) * ev.images_per_prompt // 8)))[:8]
    grid = image_grid([images["teacher"][i] for i in pick] + [images["student"][i] for i in pick], cols=len(pick))
    client.log_image(parent_run_id, grid, "report/teacher_vs_student.png")
    captions = "\n".join(f"column {c}: {metadata[items[i][0]]['prompt']}" for c, i in enumerate(pick))
    client.log_text(parent_run_id, "top row: teacher; bottom row: student (same noise)\n" + captions, "report/grid.txt")
    report_dir = exp.output_dir / "report"
    report_dir.mkdir(exist_ok=True)
    (report_dir / "summary.md").write_text(table)
    (report_dir / "summary.json").write_text(json.dumps(results, indent=1) + "\n")
    from PIL import Image

    Image.fromarray(grid).save(report_dir / "teacher_vs_student.png")
    return results


def format_table(r: dict[str, Any]) -> str:
    def pct(x):
        return f"{100 * x:.1f}"

    lines = ["| | teacher | student |", "|---|---:|---:|"]
    for task in (*TASKS, "overall"):
        t, s = r.get(f"teacher/geneval_shapes/{task}"), r.get(f"student/geneval_shapes/{task}")
        if t is not None:
            label = f"**GenEval-shapes {task}**" if task == "overall" else f"GenEval-shapes {task}"
            lines.append(f"| {label} | {pct(t)} | {pct(s)} |")
    lines.append(
        f"| params total | {r['params/teacher_total'] / 1e6:.3f} M | {r['params/student_total'] / 1e6:.3f} M |"
    )
    lines.append(
        f"| params activated | {r['params/teacher_activated'] / 1e6:.3f} M | {r['params/student_activated'] / 1e6:.3f} M |"
    )
    lines.append(
        "| activated w/o AdaLN modulation | "
        f"{r['params/teacher_activated_without_modulation'] / 1e6:.3f} M | "
        f"{r['params/student_activated_without_modulation'] / 1e6:.3f} M |"
    )
    lines.append(f"| FLOPs / image / step | {r['flops/teacher'] / 1e6:.1f} M | {r['flops/student'] / 1e6:.1f} M |")
    lines.append(
        f"| sampling latency (s/image) | {r['latency/teacher_s_per_image']:.4f} | {r['latency/student_s_per_image']:.4f} |"
    )
    fid = ", ".join(
        f"{k.split('/')[1].upper()} {v:.3f}"
        for k, v in r.items()
        if k.startswith("fidelity/") and k != "fidelity/pairs"
    )
    lines.append(f"| fidelity to teacher (same noise) | – | {fid} |")
    lines.append(f"| GenEval-shapes retained | – | {pct(r['geneval_shapes/retained'])}% |")
    return "\n".join(lines) + "\n"
