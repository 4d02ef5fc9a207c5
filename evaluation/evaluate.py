"""``python -m src.cli evaluate``: generate → detect → score (GenEval rules) → results.jsonl, summary, MLflow.

Two generators: the shapes world (``--model`` a transformer folder, e.g. checkpoints/teacher_tiny) and diffusers'
FluxPipeline (``--model`` a pipeline folder or hub id, optionally ``--transformer`` an exported student). Scorers:
the classical shapes detector, real GenEval (Mask2Former + CLIP colours), CLIP score, and fidelity to a reference
run generated from the same noise. Models that need weights load before generation, so missing weights fail in
seconds with one line, not after hours of sampling; results.jsonl and summary.json are written only after every
score is computed (stale ones are removed when scoring starts).
"""

from __future__ import annotations

import gc
import json
import os
import textwrap
import time
from pathlib import Path

import mlflow
import numpy as np
import torch
import yaml
from PIL import Image, ImageDraw, ImageFont

from evaluation import glyph_detector, shapes_detector
from evaluation.clip_score import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_CLIP_PRETRAINED,
    clip_score_summary,
    clip_scores,
    load_open_clip,
)
from evaluation.detectors import image_scorer
from evaluation.fidelity import check_reference, fidelity_folders
from evaluation.generate import (
    FluxGenerator,
    across_tasks,
    generate_images,
    is_flux_pipeline,
    iter_samples,
    load_flux_pipeline,
    load_prompt_set,
    resolve_device,
)
from evaluation.geneval import format_summary, result_record, summarize, write_results_jsonl
from evaluation.geneval_agreement import check_geneval_results
from evaluation.provenance import (
    clip_weights_sha256,
    geneval_provenance,
    hub_or_folder_sha256,
    mlflow_tags,
    model_fingerprint,
    prompts_record,
    rules_record,
    source_sha256,
)
from evaluation.real_geneval import DEFAULT_DETECTOR, GenEvalScorer
from src.data import glyphs
from src.data.glyphs import check_vocabulary
from src.data.worlds import DEFAULT_WORLD, check_world
from src.errors import UserError
from src.folders import check_writable_dir
from src.models.accounting import count_params, flops_per_image, trajectory_cost
from src.models.compute_schedule import as_lists, check_fits, check_schedule
from src.models.flux_moe import set_top_k
from src.models.loading import load_transformer
from src.models.mob import mob_groups
from src.models.moe import moe_layers
from src.models.pipeline import SamplingConfig, ShapesPipeline
from src.progress import progress_bar
from src.training.mlflow_logging import check_tracking_uri, experiment_id, resolve_tracking_uri

DETECTORS = ("shapes", "glyphs", "geneval", "none")
METRIC_PREFIX = {"shapes": "geneval_shapes", "glyphs": "geneval_glyphs", "geneval": "geneval"}


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


def _cost(transformer, trajectory: tuple | None = None, **tokens) -> dict[str, float]:
    """Activated/total parameters and forward FLOPs per image per step, logged so runs can be compared; with a
    compute schedule (``trajectory`` = steps, shift, top-k schedule, κ schedule) averaged over the sampler's steps."""
    if trajectory is not None and any(schedule is not None for schedule in trajectory[2:]):
        params = trajectory_cost(transformer, *trajectory, **tokens)
        flops = params["flops"]
    else:
        params = count_params(transformer)
        flops = flops_per_image(transformer, **tokens)["total"]
    return {
        "params/activated": float(params["activated"]),
        "params/activated_without_modulation": float(params["activated_without_modulation"]),
        "params/total": float(params["total"]),
        "flops": float(flops),
    }


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def evaluate(
    model: str = "checkpoints/teacher_tiny",
    prompts: str | None = None,
    out: str | None = None,
    images_per_prompt: int = 4,
    batch_size: int | None = None,
    seed: int = 0,
    steps: int | None = None,
    cfg_scale: float = 2.0,
    shift: float | None = None,
    image_size: int = 32,
    transformer: str | None = None,
    height: int = 1024,
    width: int = 1024,
    guidance: float = 3.5,
    max_sequence_length: int = 512,
    top_k: int | None = None,
    top_k_schedule: list[tuple[float, int]] | None = None,
    mob_active_schedule: list[tuple[float, int]] | None = None,
    detector: str | None = None,
    detector_model: str = DEFAULT_DETECTOR,
    clip_score: bool = False,
    clip_model: str = DEFAULT_CLIP_MODEL,
    clip_pretrained: str = DEFAULT_CLIP_PRETRAINED,
    reference: str | None = None,
    limit: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    experiment_name: str = "evaluation",
    run_name: str | None = None,
    tracking_uri: str | None = None,
    log_mlflow: bool = True,
    threads: int | None = None,
    geneval_results: str | None = None,
) -> dict:
    """Generate images for a prompt set with a model and score them (GenEval rules, CLIP score, fidelity).

    Args:
        model: A transformer folder of the shapes world (the teacher, or an exported student), or a diffusers
            FluxPipeline folder / hub id (e.g. a local FLUX.1-dev).
        prompts: "shapes-heldout" (553 held-out compositions, GenEval's task counts), "geneval" (GenEval's 553
            prompts), or a .txt/.jsonl file. Default: shapes-heldout for the shapes world, geneval for the glyph
            world and FLUX.
        out: Output folder in GenEval's layout (default outputs/eval/<model folder name>).
        images_per_prompt: Images per prompt (GenEval uses 4).
        batch_size: Images generated per batch (default 64 shapes world, 4 FLUX).
        seed: Noise seed; image k of prompt i always gets the same noise for every model.
        steps: Sampling steps (default 20 shapes world, 28 FLUX).
        cfg_scale: Classifier-free guidance scale (shapes world).
        shift: Timestep shift of the sampling schedule (shapes world; default: the model's ``sampling_shift``).
        image_size: Image side in pixels (shapes world).
        transformer: FLUX only: a save_pretrained transformer folder (an exported student) replacing the
            pipeline's own.
        height: FLUX image height in pixels.
        width: FLUX image width in pixels.
        guidance: FLUX guidance-embedding value (FLUX.1-dev is guidance-distilled: no classifier-free guidance).
        max_sequence_length: FLUX T5 prompt tokens (capped at the tokenizer's limit).
        top_k: Routed experts per token at inference for an MoE model (None = as trained).
        top_k_schedule: Shapes world: routed top-k as a function of σ, [[σ_max, k], …] with σ_max strictly
            decreasing from 1.0, each entry holding down to the next σ_max (e.g. [[1.0, 2], [0.5, 1]]: k = 2 for
            σ > 0.5, else 1). Default: the model config's ``sampling_schedule``, else ``top_k``.
        mob_active_schedule: Shapes world: MoB active blocks κ as a function of σ, in the same form.
        detector: "shapes" / "glyphs" (the classical detectors of the embedded worlds), "geneval" (Mask2Former +
            CLIP colours) or "none". Default: the model's world (config ``world``), geneval for FLUX.
        detector_model: Mask2Former (COCO instance segmentation) hub id or local folder, for detector=geneval.
        clip_score: Also compute the CLIP score (100 · max(cos, 0), mean over images and per task).
        clip_model: open_clip architecture for colours and CLIP score: a built-in name, a model-config .json,
            local-dir:/folder or hf-hub:org/repo.
        clip_pretrained: open_clip weights: a tag ("openai") or a checkpoint path.
        reference: Another evaluate output folder (same prompts and seed, e.g. the teacher's) for fidelity:
            PSNR, SSIM and LPIPS on same-noise pairs.
        limit: Only N prompts, spread evenly over the prompt set's tasks (quick looks; at least one per task).
        device: "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
        dtype: FLUX weights dtype: "auto" (bfloat16 on cuda, float32 on cpu), "float32", "bfloat16", "float16".
        experiment_name: MLflow experiment.
        run_name: MLflow run name (default: the output folder name).
        tracking_uri: MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db).
        log_mlflow: Log metrics and artifacts to MLflow.
        threads: torch CPU threads (default: torch's choice).
        geneval_results: Only check agreement, generate nothing: a folder already scored by GenEval's own
            evaluate_images.py (its results.jsonl, or the file itself). Prints GenEval's summary next to ours,
            re-decided from the detections GenEval kept, and the agreement per task.
    """
    arguments = dict(locals())  # the run's config.yaml
    if geneval_results is not None:
        return check_geneval_results(geneval_results)
    if threads:
        torch.set_num_threads(threads)
    flux = transformer is not None or is_flux_pipeline(model)
    world = None if flux else _model_world(model)
    detector = detector or ("geneval" if flux else world)
    if detector not in DETECTORS:
        raise UserError(f"detector={detector!r}: allowed {', '.join(DETECTORS)}")
    target = resolve_device(device)
    # the glyph world's evaluation set is GenEval's own 553 prompts, unchanged
    prompt_set = prompts or ("shapes-heldout" if world == "shapes" else "geneval")
    metadata = across_tasks(load_prompt_set(prompt_set, image_size), limit, prompt_set)
    if detector == "glyphs":
        try:
            check_vocabulary(metadata, f"prompt set {prompt_set}")
        except ValueError as err:
            raise UserError(str(err)) from None
    out_dir = Path(out or f"outputs/eval/{Path(transformer or model).name}")
    _check_outputs(out_dir, log_mlflow, tracking_uri)
    if reference is not None:
        check_reference(reference, metadata, seed, images_per_prompt)

    # Scoring models load first, on the CPU: missing weights fail here, before any sampling.
    clip = scorer = None
    if clip_score or detector == "geneval":
        clip = load_open_clip(clip_model, clip_pretrained)
    if detector == "geneval":
        scorer = GenEvalScorer.load(detector_model, clip=clip)

    if flux and (top_k_schedule is not None or mob_active_schedule is not None):
        raise UserError("top_k_schedule / mob_active_schedule: only the shapes-world sampler applies them, not FLUX")
    if flux:
        generator, info, cost = _flux_generator(
            model, transformer, dtype, target, height, width, steps or 28, guidance, max_sequence_length, top_k
        )
    else:
        schedules = (top_k_schedule, mob_active_schedule)
        generator, info, cost = _shapes_generator(
            model, image_size, steps or 20, cfg_scale, shift, top_k, target, schedules
        )
    info["prompt_set"] = prompt_set
    provenance = None
    if detector != "none":
        provenance = _provenance(
            detector, detector_model, (clip_model, clip_pretrained, clip), scorer, prompt_set, metadata,
            images_per_prompt, seed, info, target,
        )  # fmt: skip
    started = time.perf_counter()
    batch = batch_size or (4 if flux else 64)
    generated = generate_images(generator, metadata, out_dir, images_per_prompt, batch, seed, info)
    seconds = time.perf_counter() - started
    info.update(limit=limit, seed=seed, images_per_prompt=images_per_prompt, detector=detector)
    del generator
    gc.collect()
    if target.type == "cuda":
        torch.cuda.empty_cache()

    records, summary = _score(out_dir, detector, scorer, clip if clip_score else None, reference, target)
    summary["cost"] = cost
    if provenance is not None:
        summary["provenance"] = provenance
    if generated:
        summary["latency"] = {"generate_s_per_image": seconds / generated}
    if records:
        write_results_jsonl(out_dir / "results.jsonl.tmp", records)
        os.replace(out_dir / "results.jsonl.tmp", out_dir / "results.jsonl")
    _atomic_write(out_dir / "summary.json", json.dumps(summary, indent=1) + "\n")

    if records:
        print(format_summary(summary))
    for line in _extra_lines(summary):
        print(line)
    print(f"generated {generated} images in {seconds:.1f} s; results in {out_dir}")
    if log_mlflow:
        info["sha256"] = model_fingerprint(Path(transformer or model)) if Path(transformer or model).is_dir() else None
        name = run_name or out_dir.name
        _log_to_mlflow(summary, records, out_dir, experiment_name, name, tracking_uri, info, arguments)
    return summary


def _check_outputs(out_dir: Path, log_mlflow: bool, tracking_uri: str | None) -> None:
    """Where the images and the MLflow run go must work before anything is generated."""
    check_writable_dir(str(out_dir), "out")
    if log_mlflow:
        check_tracking_uri(resolve_tracking_uri(tracking_uri))


def _score(out_dir: Path, detector: str, scorer, clip, reference: str | None, device) -> tuple[list[dict], dict]:
    """GenEval records and the summary (GenEval, CLIP score, fidelity); stale results are deleted first."""
    for stale in ("results.jsonl", "summary.json", "clip_scores.jsonl"):
        (out_dir / stale).unlink(missing_ok=True)
    records, summary = [], {}
    if detector != "none":
        records, summary = score_folder(out_dir, detector, scorer.to(device) if scorer else None)
    summary = {**summary, "detector": detector, "images": len(iter_samples(out_dir))}
    if clip is not None:
        clip_records, summary["clip_score"] = clip_score_folder(out_dir, clip.to(device))
        _atomic_write(out_dir / "clip_scores.jsonl", "".join(json.dumps(r) + "\n" for r in clip_records))
    if reference is not None:
        summary["fidelity"] = fidelity_folders(out_dir, reference, device)
    return records, summary


def _provenance(
    detector, detector_model, clip_spec, scorer, prompt_set, metadata, images_per_prompt, seed, info, device
):
    """The protocol behind this run's GenEval number (`evaluation.provenance`); hashes the scoring weights."""
    if detector == "shapes":
        detector_id, detector_hash = "shapes-classical", source_sha256(shapes_detector)
        colour_id = colour_hash = None  # the classical detector names colours itself
    elif detector == "glyphs":
        # the detector's "weights" are its code and the world's codebook and palette (src/data/glyphs.py)
        detector_id = "glyphs-classical"
        detector_hash = source_sha256(glyph_detector) + "+" + source_sha256(glyphs)
        colour_id = colour_hash = None
    else:
        clip_model, clip_pretrained, clip = clip_spec
        detector_id = detector_model
        detector_hash = hub_or_folder_sha256(detector_model, scorer.model)
        colour_id = f"{clip_model} ({clip_pretrained})"
        colour_hash = clip_weights_sha256(clip_model, clip_pretrained, clip.model)
    rules = rules_record(**(scorer.filter if scorer is not None else {}))
    sampler_keys = ("steps", "cfg_scale", "guidance", "shift", "image_size", "height", "width", "max_sequence_length")
    sampler = {k: info[k] for k in (*sampler_keys, "dtype") if k in info}
    # only when set: records of runs without a schedule stay comparable with older ones
    sampler |= {k: info[k] for k in _SCHEDULE_FLAGS if info.get(k) is not None}
    return geneval_provenance(
        prompts=prompts_record(prompt_set, metadata),
        detector=detector_id,
        detector_weights_sha256=detector_hash,
        colour_model=colour_id,
        colour_weights_sha256=colour_hash,
        rules=rules,
        images_per_prompt=images_per_prompt,
        sampler=sampler,
        sources={
            "prompts": prompt_set,
            "seed": seed,
            "model": info.get("model"),
            "transformer": info.get("transformer"),
        },
        device=device,
    )


def _model_world(model: str) -> str:
    """The embedded world a transformer folder was trained on (its config's ``world``; shapes when absent)."""
    config = Path(model) / "config.json"
    if not config.is_file():
        return DEFAULT_WORLD
    try:
        return check_world(json.loads(config.read_text()).get("world") or DEFAULT_WORLD, f"{config}: world")
    except (ValueError, AttributeError) as err:
        raise UserError(f"{config}: {err}") from None


def _shapes_generator(
    model: str,
    image_size: int,
    steps: int,
    cfg_scale: float,
    shift: float | None,
    top_k: int | None,
    device,
    schedules: tuple[list | None, list | None] = (None, None),
):
    transformer = load_transformer(model).eval().to(device)
    if top_k is not None:
        set_top_k(transformer, top_k)
    try:
        top_k_schedule, mob_schedule = (check_schedule(v, n) for v, n in zip(schedules, _SCHEDULE_FLAGS))
        if top_k is not None and top_k_schedule is None:  # an explicit top-k also overrides the config's schedule
            top_k_schedule = ((1.0, top_k),)
        sampling = SamplingConfig(
            steps, cfg_scale, shift, top_k_schedule=top_k_schedule, mob_active_schedule=mob_schedule
        )
        top_k_schedule, mob_schedule = sampling.schedules_for(transformer)
        check_fits(transformer, top_k_schedule, mob_schedule)
    except ValueError as err:
        raise UserError(str(err)) from None
    _check_schedule_targets(transformer, top_k_schedule, mob_schedule)
    pipeline = ShapesPipeline(transformer, image_size=image_size, sampling=sampling)
    text_len = pipeline.encode_prompts([""])[0].shape[1]
    trajectory = (steps, sampling.shift_for(transformer), top_k_schedule, mob_schedule)
    cost = _cost(transformer, image_tokens=pipeline.tokens_per_side**2, text_len=text_len, trajectory=trajectory)
    info = {
        "model": str(model),
        "steps": steps,
        "cfg_scale": cfg_scale,
        "shift": pipeline.sampling.shift_for(transformer),
        "top_k": top_k,
        "top_k_schedule": as_lists(top_k_schedule),
        "mob_active_schedule": as_lists(mob_schedule),
        "image_size": image_size,
    }
    return pipeline, info, cost


_SCHEDULE_FLAGS = ("top_k_schedule", "mob_active_schedule")


def _check_schedule_targets(transformer, top_k_schedule, mob_schedule) -> None:
    """A schedule for layers the model does not have is a mistake on the command line, not a silent no-op."""
    if top_k_schedule is not None and not moe_layers(transformer):
        raise UserError("top_k_schedule: the model has no MoE layers to route")
    if mob_schedule is not None and not mob_groups(transformer):
        raise UserError("mob_active_schedule: the model has no MoB groups")


def _flux_generator(model, transformer, dtype, device, height, width, steps, guidance, max_sequence_length, top_k):
    pipeline = load_flux_pipeline(model, transformer, dtype, str(device))
    if top_k is not None:
        set_top_k(pipeline.transformer, top_k)
    generator = FluxGenerator(pipeline, height, width, steps, guidance, max_sequence_length)
    cost = _cost(pipeline.transformer, image_tokens=generator.image_tokens, text_len=generator.max_sequence_length)
    info = {
        "model": str(model),
        "transformer": transformer,
        "steps": steps,
        "guidance": guidance,
        "height": height,
        "width": width,
        "max_sequence_length": generator.max_sequence_length,
        "shift": _flux_shift(pipeline.scheduler.config),
        "top_k": top_k,
        "dtype": str(pipeline.transformer.dtype).removeprefix("torch."),
    }
    return generator, info, cost


def _flux_shift(config) -> str | float:
    """The sampling schedule's shift as FluxPipeline applies it: dynamic (mu from the image tokens) or fixed."""
    if config.get("use_dynamic_shifting"):
        return (
            f"dynamic mu: base_shift {config.get('base_shift')} at {config.get('base_image_seq_len')} tokens, "
            f"max_shift {config.get('max_shift')} at {config.get('max_image_seq_len')} tokens"
        )
    return float(config.get("shift", 1.0))


def _extra_lines(summary: dict) -> list[str]:
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


def _log_to_mlflow(summary, records, out_dir, experiment_name, run_name, tracking_uri, info, arguments) -> None:
    """One run per evaluation: its arguments as ``config.yaml``, the model's settings and weights hash as params."""
    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=experiment_id(mlflow.MlflowClient(uri), experiment_name))
    with mlflow.start_run(run_name=run_name, tags={"kind": "evaluation", "experiment": run_name}) as run:
        mlflow.log_params({k: v for k, v in info.items() if v is not None})
        mlflow.log_text(yaml.safe_dump(arguments, sort_keys=False), "config.yaml")
        mlflow.log_metrics(metrics_of(summary))
        if "provenance" in summary:
            mlflow.set_tags(mlflow_tags(summary["provenance"]))
            mlflow.log_dict(summary["provenance"], "provenance.json")
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
