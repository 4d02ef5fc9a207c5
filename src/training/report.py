"""The evaluation at the end of every fit: what the student gained and what it lost, against its teacher.

Teacher and student generate the same held-out prompts of the teacher's world (``shapes`` or ``glyphs``, from the
teacher's config) from the same noise. Reported (printed as one table and logged to the parent MLflow run): GenEval
per task and overall for both with the student − teacher difference and its paired bootstrap 95% interval
(``evaluation/bootstrap.py``: prompts resampled, stratified by task), fidelity to the teacher (PSNR, SSIM) with
intervals, total/activated parameters and FLOPs per image per step, and sampling latency of both measured in this
run, plus a side-by-side grid (teacher row above student row), the table, and ``report/per_prompt.json`` (every
prompt's accuracy for both models and the student's fidelity) so that later comparisons between experiments on
the same teacher can be paired prompt by prompt.

On prepared FLUX latents (``data.kind: latents``) ``evaluate_latents`` reports velocity and sampled-latent
fidelity on the held-out split instead of GenEval-shapes, with the same parameter and FLOP columns.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from PIL import Image

from evaluation.bootstrap import Interval, geneval_differences, mean_interval, per_prompt_accuracy
from evaluation.detectors import image_scorer, metric_prefix
from evaluation.fidelity import fidelity
from evaluation.generate import image_seed
from evaluation.geneval import result_record, summarize
from evaluation.provenance import state_dict_sha256
from src.data.latents import LatentDataModule, load_manifest
from src.data.shapes import TASKS
from src.data.worlds import WORLDS, make_world, model_world
from src.models.accounting import count_params, flops_per_image, trajectory_cost
from src.models.flow import fixed_noise, ode_sample
from src.models.pipeline import ShapesPipeline
from src.progress import progress_bar
from src.training.base import image_grid
from src.training.conditioning import velocity


def generate_all(
    pipeline: ShapesPipeline, model, metadata: list[dict], per_prompt: int, batch: int, seed: int, label: str = "images"
):
    items = [(i, k) for i in range(len(metadata)) for k in range(per_prompt)]
    images = []
    with progress_bar(label, len(items)) as progress:
        task = progress.add_task(label, total=len(items))
        for start in range(0, len(items), batch):
            chunk = items[start : start + batch]
            prompts = [metadata[i]["prompt"] for i, _ in chunk]
            images.append(pipeline(prompts, [image_seed(seed, i, k) for i, k in chunk], model))
            progress.advance(task, len(chunk))
    return items, np.concatenate(images)


def cached_generation(pipeline: ShapesPipeline, model, metadata: list[dict], ev, seed: int):
    """`generate_all` of a frozen model, kept in ``ev.teacher_cache`` under a key of everything the images depend on.

    Runs of one sweep (every variant of a seed) evaluate against the same teacher, prompts, noise and sampler: the
    teacher's images are made once. The key hashes the model's weights and config, the prompts, the seed, the
    image count and the sampler settings; the file is written atomically, so concurrent trials never read half of it.
    """
    digest = hashlib.sha256(state_dict_sha256(model).encode())
    sampling = pipeline.sampling
    encoder = pipeline.text_encoder
    setting = [dict(model.config), [m["prompt"] for m in metadata], seed, ev.images_per_prompt, repr(sampling)]
    setting += [pipeline.image_size, pipeline.patch_size, repr(getattr(encoder, "cfg", encoder))]
    digest.update(json.dumps(setting, sort_keys=True, default=str).encode())
    path = Path(ev.teacher_cache) / f"{digest.hexdigest()[:24]}.npz"
    items = [(i, k) for i in range(len(metadata)) for k in range(ev.images_per_prompt)]
    if path.is_file():
        return items, np.load(path)["images"]
    label = "evaluation: teacher images"
    items, images = generate_all(pipeline, model, metadata, ev.images_per_prompt, ev.batch_size, seed, label)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npz")
    np.savez(partial, images=images)
    os.replace(partial, path)
    return items, images


def score(items, images, metadata, world: str = "shapes") -> tuple[dict, list[dict]]:
    """GenEval summary and per-image records of generated images, judged by `world`'s detector."""
    scorer = image_scorer(world)
    records = []
    for (i, k), image in zip(items, images):
        correct, reason, det = scorer(image, metadata[i])
        records.append(result_record(f"{i:05d}/samples/{k:04d}.png", metadata[i], correct, reason, det))
    return summarize(records), records


def with_schedules(pipeline: ShapesPipeline, ev) -> ShapesPipeline:
    """`pipeline` sampling with ``ev``'s compute schedules (top-k / MoB κ as functions of σ), or itself without any."""
    if ev.top_k_schedule is None and ev.mob_active_schedule is None:
        return pipeline
    scheduled = copy.copy(pipeline)
    scheduled.sampling = dataclasses.replace(
        pipeline.sampling, top_k_schedule=ev.top_k_schedule, mob_active_schedule=ev.mob_active_schedule
    )
    return scheduled


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


def summary_keys(data_kind: str = "shapes", world: str | None = None) -> list[str]:
    """Every metric the end-of-fit evaluation writes to ``report/summary.json`` (what a sweep may optimise):
    ``evaluate_experiment``'s for an embedded world (``world``; None: the keys of every world, since which one a
    run writes depends on its teacher), ``evaluate_latents``'s for prepared latents.

    ``fidelity/lpips`` (and its interval) appears only when the LPIPS weights are available locally.
    """
    keys = []
    for name in ("teacher", "student"):
        keys += [f"params/{name}_{kind}" for kind in ("total", "activated", "activated_without_modulation")]
        keys += [f"flops/{name}", f"latency/{name}_s_per_image"]
    keys += ["params/activated", "flops", "fidelity/pairs"]
    if data_kind == "latents":
        keys += [f"fidelity/velocity_rel_mse_sigma_{s}" for s in VELOCITY_SIGMAS]
        return keys + ["fidelity/velocity_rel_mse", "fidelity/latent_rel_mse", "fidelity/latent_cosine"]
    for prefix in (metric_prefix(w) for w in (WORLDS if world is None else [world])):
        for name in ("teacher", "student"):
            keys += [f"{name}/{prefix}/{task}" for task in ("overall", *TASKS)]
        for task in ("overall", *TASKS):
            keys += [f"delta/{prefix}/{task}{end}" for end in ("", "/low", "/high")]
        keys += [f"{prefix}/overall", f"{prefix}/retained"]
    for metric in ("psnr", "ssim", "lpips"):
        keys += [f"fidelity/{metric}", f"fidelity/{metric}/low", f"fidelity/{metric}/high"]
    return keys


def evaluate_experiment(exp, teacher, student, pipeline: ShapesPipeline, uri: str, parent_run_id: str) -> dict:
    ev = exp.evaluation
    world = model_world(teacher)
    prefix = metric_prefix(world)
    metadata = make_world(world, exp.data.image_size).heldout_metadata(
        {t: ev.prompts_per_task for t in TASKS}, seed=exp.seed + 1
    )
    student.eval()
    results: dict[str, Any] = {}
    images, accuracy = {}, {}
    # the student samples with the compute schedules (if any); the teacher's images and cache key stay as they were
    pipelines = {"teacher": pipeline, "student": with_schedules(pipeline, ev)}
    for name, model in (("teacher", teacher), ("student", student)):
        if name == "teacher" and ev.teacher_cache:
            items, images[name] = cached_generation(pipeline, model, metadata, ev, exp.seed)
        else:
            items, images[name] = generate_all(
                pipelines[name], model, metadata, ev.images_per_prompt, ev.batch_size, exp.seed,
                f"evaluation: {name} images",
            )  # fmt: skip
        summary, records = score(items, images[name], metadata, world)
        tags, accuracy[name] = per_prompt_accuracy(records, [i for i, _ in items])
        results[f"{name}/{prefix}/overall"] = summary["overall"]
        for task, acc in summary["tasks"].items():
            results[f"{name}/{prefix}/{task}"] = acc
        results[f"latency/{name}_s_per_image"] = latency(pipelines[name], model, ev.latency_batch)
    close = fidelity(images["teacher"], images["student"], per_pair=True)
    per_pair = close.pop("per_pair")
    results |= {f"fidelity/{k}": v for k, v in close.items()}
    prompt_of_image = np.array([i for i, _ in items])
    per_prompt_fidelity = {
        metric: [float(values[prompt_of_image == i].mean()) for i in range(len(metadata))]
        for metric, values in per_pair.items()
    }
    intervals = geneval_differences(tags, accuracy["teacher"], accuracy["student"], seed=exp.seed)
    for task, interval in intervals.items():
        results[f"delta/{prefix}/{task}"] = interval.estimate
        results[f"delta/{prefix}/{task}/low"], results[f"delta/{prefix}/{task}/high"] = interval.low, interval.high
    for metric, values in per_prompt_fidelity.items():
        interval = mean_interval(values, seed=exp.seed)
        results[f"fidelity/{metric}/low"], results[f"fidelity/{metric}/high"] = interval.low, interval.high
    tokens = pipeline.tokens_per_side**2
    text_len = pipeline.text_encoder.cfg.max_tokens
    for name, model in (("teacher", teacher), ("student", student)):
        sampling = pipelines[name].sampling
        schedules = sampling.schedules_for(model)
        if any(s is not None for s in schedules):  # activated counts follow σ: their average over the trajectory
            params = trajectory_cost(
                model, sampling.steps, sampling.shift_for(model), *schedules, image_tokens=tokens, text_len=text_len
            )
            flops = params["flops"]
        else:
            params = count_params(model)
            flops = flops_per_image(model, image_tokens=tokens, text_len=text_len)["total"]
        results[f"params/{name}_total"] = params["total"]
        results[f"params/{name}_activated"] = params["activated"]
        results[f"params/{name}_activated_without_modulation"] = params["activated_without_modulation"]
        results[f"flops/{name}"] = flops
    results["params/activated"] = results["params/student_activated"]
    results["flops"] = results["flops/student"]
    results[f"{prefix}/overall"] = results[f"student/{prefix}/overall"]
    results[f"{prefix}/retained"] = results[f"student/{prefix}/overall"] / max(
        results[f"teacher/{prefix}/overall"], 1e-9
    )
    per_prompt = {
        "world": world,
        "seed": exp.seed,
        "images_per_prompt": ev.images_per_prompt,
        "prompts": [m["prompt"] for m in metadata],
        "tags": tags,
        "teacher": accuracy["teacher"],
        "student": accuracy["student"],
        "fidelity": per_prompt_fidelity,
    }
    table = format_table(results, prefix, intervals)
    print(table)
    client = mlflow.MlflowClient(tracking_uri=uri)
    client.log_batch(parent_run_id, metrics=[mlflow.entities.Metric(k, float(v), 0, 0) for k, v in results.items()])
    client.log_text(parent_run_id, table, "report/summary.md")
    client.log_dict(parent_run_id, results, "report/summary.json")
    client.log_dict(parent_run_id, per_prompt, "report/per_prompt.json")
    pick = list(range(0, len(metadata) * ev.images_per_prompt, max(1, len(metadata) * ev.images_per_prompt // 8)))[:8]
    grid = image_grid([images["teacher"][i] for i in pick] + [images["student"][i] for i in pick], cols=len(pick))
    client.log_image(parent_run_id, grid, "report/teacher_vs_student.png")
    captions = "\n".join(f"column {c}: {metadata[items[i][0]]['prompt']}" for c, i in enumerate(pick))
    client.log_text(parent_run_id, "top row: teacher; bottom row: student (same noise)\n" + captions, "report/grid.txt")
    report_dir = exp.output_dir / "report"
    report_dir.mkdir(exist_ok=True)
    (report_dir / "summary.md").write_text(table)
    (report_dir / "summary.json").write_text(json.dumps(results, indent=1) + "\n")
    (report_dir / "per_prompt.json").write_text(json.dumps(per_prompt) + "\n")
    Image.fromarray(grid).save(report_dir / "teacher_vs_student.png")
    return results


def format_table(
    r: dict[str, Any], prefix: str = "geneval_shapes", intervals: dict[str, Interval] | None = None
) -> str:
    """The end-of-fit table; with `intervals`, a column of student − teacher differences [95% CI] in points."""

    def pct(x):
        return f"{100 * x:.1f}"

    name = "GenEval-" + prefix.removeprefix("geneval_")
    intervals = intervals or {}
    lines = ["| | teacher | student | Δ student − teacher [95% CI] |", "|---|---:|---:|---:|"]
    for task in (*TASKS, "overall"):
        t, s = r.get(f"teacher/{prefix}/{task}"), r.get(f"student/{prefix}/{task}")
        if t is not None:
            label = f"**{name} {task}**" if task == "overall" else f"{name} {task}"
            delta = intervals[task].format() if task in intervals else "–"
            if task in intervals and not intervals[task].decided:
                delta += " (undecided)"
            lines.append(f"| {label} | {pct(t)} | {pct(s)} | {delta} |")
    lines.append(
        f"| params total | {r['params/teacher_total'] / 1e6:.3f} M | {r['params/student_total'] / 1e6:.3f} M | |"
    )
    lines.append(
        f"| params activated | {r['params/teacher_activated'] / 1e6:.3f} M | {r['params/student_activated'] / 1e6:.3f} M | |"
    )
    lines.append(
        "| activated w/o AdaLN modulation | "
        f"{r['params/teacher_activated_without_modulation'] / 1e6:.3f} M | "
        f"{r['params/student_activated_without_modulation'] / 1e6:.3f} M | |"
    )
    lines.append(f"| FLOPs / image / step | {r['flops/teacher'] / 1e6:.1f} M | {r['flops/student'] / 1e6:.1f} M | |")
    lines.append(
        f"| sampling latency (s/image) | {r['latency/teacher_s_per_image']:.4f} "
        f"| {r['latency/student_s_per_image']:.4f} | |"
    )
    parts = []
    for key, value in r.items():
        metric = key.split("/")[1] if key.startswith("fidelity/") and key.count("/") == 1 else None
        if metric is None or metric == "pairs":
            continue
        low, high = r.get(f"fidelity/{metric}/low"), r.get(f"fidelity/{metric}/high")
        parts.append(f"{metric.upper()} {value:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None else ""))
    lines.append(f"| fidelity to teacher (same noise) | – | {', '.join(parts)} | |")
    lines.append(f"| {name} retained | – | {pct(r[f'{prefix}/retained'])}% | |")
    return "\n".join(lines) + "\n"


# --- latent data (FLUX scale) ---------------------------------------------------------------------------------------
VELOCITY_SIGMAS = (0.25, 0.5, 0.75, 1.0)
"""Noise levels at which held-out velocity fidelity is measured."""


def evaluate_latents(exp, teacher, student, conditioning, uri: str, parent_run_id: str) -> dict:
    """Teacher vs student on the held-out prepared samples (data.kind = latents).

    GenEval needs decoded images and a detector, which the fit does not load; this reports what the latents show:
    the student's velocity error relative to the teacher's at fixed noise levels, the relative error and cosine of
    the latents both sample from the same noise (Euler, FLUX's resolution-dependent shift, the teacher's guidance
    embedding), sampling latency, and parameters/FLOPs. Image-level quality: export the student and run
    ``python -m src.cli evaluate`` with the FLUX pipeline.
    """
    manifest = load_manifest(exp.data.path, exp.data.cache_dir)
    _, h, w = manifest["latent_shape"]
    tokens = (h // 2) * (w // 2)
    results: dict[str, Any] = {}
    for name, model in (("teacher", teacher), ("student", student)):
        params = count_params(model)
        results[f"params/{name}_total"] = params["total"]
        results[f"params/{name}_activated"] = params["activated"]
        results[f"params/{name}_activated_without_modulation"] = params["activated_without_modulation"]
        # FluxPipeline runs max_sequence_length T5 tokens at inference
        flops = flops_per_image(model, image_tokens=tokens, text_len=manifest["max_sequence_length"])
        results[f"flops/{name}"] = flops["total"]
    if manifest["splits"]["heldout"]["samples"]:
        results |= _latent_fidelity(exp, teacher, student, conditioning, tokens)
    else:
        print("evaluation: the prepared data has no held-out samples (prepare-data heldout: 0); fidelity skipped")
    results["params/activated"] = results["params/student_activated"]
    results["flops"] = results["flops/student"]
    table = format_latent_table(results)
    print(table)
    client = mlflow.MlflowClient(tracking_uri=uri)
    client.log_batch(parent_run_id, metrics=[mlflow.entities.Metric(k, float(v), 0, 0) for k, v in results.items()])
    client.log_text(parent_run_id, table, "report/summary.md")
    client.log_dict(parent_run_id, results, "report/summary.json")
    report_dir = exp.output_dir / "report"
    report_dir.mkdir(exist_ok=True)
    (report_dir / "summary.md").write_text(table)
    (report_dir / "summary.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def _latent_fidelity(exp, teacher, student, conditioning, tokens: int) -> dict[str, Any]:
    """Velocity and sampled-latent fidelity over the held-out split; every sample's noise is seeded by its index."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # heavy (transformers): latent data only

    ev, guidance = exp.evaluation, conditioning.guidance
    data = LatentDataModule(
        exp.data.path, ev.batch_size, split="heldout", shuffle=False, drop_last=False, cache_dir=exp.data.cache_dir
    )
    device = next(teacher.parameters()).device
    shift = math.exp(calculate_shift(tokens))  # FluxPipeline's dynamic shift at this resolution
    student.eval()
    sums: dict[str, float] = {}
    seconds = {"teacher": 0.0, "student": 0.0}
    samples, cosines = 0, []

    def add(key: str, value: torch.Tensor) -> None:
        sums[key] = sums.get(key, 0.0) + float(value)

    with torch.no_grad():
        for batch in data.dataloader():
            inputs = conditioning.inputs({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
            x0_BLD = inputs.x0_BLD
            seeds = [exp.seed * 1_000_003 + int(i) for i in batch["index"]]
            noise_BLD = fixed_noise(tuple(x0_BLD.shape[1:]), seeds, device)
            for sigma in VELOCITY_SIGMAS:
                sigma_B = torch.full((x0_BLD.shape[0],), sigma, device=device)
                x_t = (1 - sigma) * x0_BLD + sigma * noise_BLD
                v_t = velocity(teacher, x_t, sigma_B, inputs, guidance).float()
                v_s = velocity(student, x_t, sigma_B, inputs, guidance).float()
                add(f"err/{sigma}", (v_s - v_t).pow(2).sum())
                add(f"ref/{sigma}", v_t.pow(2).sum())
            final = {}
            for name, model in (("teacher", teacher), ("student", student)):
                start = time.perf_counter()
                final[name] = ode_sample(
                    lambda x, s, _cond, m=model, i=inputs: velocity(m, x, s, i, guidance).float(),
                    noise_BLD,
                    ev.steps,
                    shift=shift,
                )
                seconds[name] += time.perf_counter() - start
            add("latent_err", (final["student"] - final["teacher"]).pow(2).sum())
            add("latent_ref", final["teacher"].pow(2).sum())
            flat_t, flat_s = final["teacher"].flatten(1), final["student"].flatten(1)
            cosines += torch.nn.functional.cosine_similarity(flat_s, flat_t, dim=1).tolist()
            samples += x0_BLD.shape[0]
    out: dict[str, Any] = {
        f"fidelity/velocity_rel_mse_sigma_{s}": sums[f"err/{s}"] / max(sums[f"ref/{s}"], 1e-12) for s in VELOCITY_SIGMAS
    }
    out["fidelity/velocity_rel_mse"] = sum(sums[f"err/{s}"] for s in VELOCITY_SIGMAS) / max(
        sum(sums[f"ref/{s}"] for s in VELOCITY_SIGMAS), 1e-12
    )
    out["fidelity/latent_rel_mse"] = sums["latent_err"] / max(sums["latent_ref"], 1e-12)
    out["fidelity/latent_cosine"] = statistics.fmean(cosines)
    out["fidelity/pairs"] = samples
    for name in ("teacher", "student"):
        out[f"latency/{name}_s_per_image"] = seconds[name] / samples
    return out


def format_latent_table(r: dict[str, Any]) -> str:
    def size(n: float) -> str:
        return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.3f} M"

    lines = ["| | teacher | student |", "|---|---:|---:|"]
    for label, key in (
        ("params total", "total"),
        ("params activated", "activated"),
        ("activated w/o AdaLN modulation", "activated_without_modulation"),
    ):
        lines.append(f"| {label} | {size(r[f'params/teacher_{key}'])} | {size(r[f'params/student_{key}'])} |")
    lines.append(f"| FLOPs / image / step | {r['flops/teacher']:.4g} | {r['flops/student']:.4g} |")
    if "fidelity/pairs" in r:
        lines.append(
            f"| sampling latency (s/image) | {r['latency/teacher_s_per_image']:.4f} "
            f"| {r['latency/student_s_per_image']:.4f} |"
        )
        for s in VELOCITY_SIGMAS:
            error = r[f"fidelity/velocity_rel_mse_sigma_{s}"]
            lines.append(f"| velocity rel. MSE to teacher, σ = {s} | – | {error:.4f} |")
        lines.append(f"| sampled-latent rel. MSE to teacher (same noise) | – | {r['fidelity/latent_rel_mse']:.4f} |")
        lines.append(f"| sampled-latent cosine to teacher | – | {r['fidelity/latent_cosine']:.4f} |")
        lines.append(f"| held-out samples | – | {r['fidelity/pairs']} |")
    return "\n".join(lines) + "\n"
