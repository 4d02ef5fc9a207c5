"""The shared core of ``evaluate``: images from a generator of (prompt, seed) → GenEval layout → scores → reports.

A world's entry (`evaluation.evaluate.embedded`, `evaluation.evaluate.flux`) decides which model makes the images
and how it samples, as an `ImageSource`; everything after that is the same for both: the glyph vocabulary and
the output checks, the scoring models (loaded before the generator, so missing weights fail in seconds), resumable
generation, scoring, provenance, summary.json / results.jsonl, the console lines and the MLflow run.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

import torch

from evaluation import glyph_detector, shapes_detector
from evaluation.evaluate.options import PromptOptions, ScoringOptions, TrackingOptions
from evaluation.evaluate.report import check_tracking, log_to_mlflow, score_lines
from evaluation.evaluate.scoring import Scorers, load_scorers, score_outputs, write_scores
from evaluation.fidelity import check_reference
from evaluation.generate import Generator, across_tasks, generate_images, load_prompt_set
from evaluation.geneval import format_summary
from evaluation.provenance import (
    clip_weights_sha256,
    geneval_provenance,
    hub_or_folder_sha256,
    model_fingerprint,
    prompts_record,
    rules_record,
    source_sha256,
)
from src.data import glyphs
from src.data.glyphs import check_vocabulary
from src.errors import UserError
from src.folders import check_writable_dir
from src.models.accounting import count_params, flops_per_image, trajectory_cost


@dataclass(frozen=True)
class LoadedGenerator:
    """A model ready to sample, and what the run records about it."""

    generate: Generator
    """(prompts, seeds) → uint8 (B, H, W, 3); an image depends on its (prompt, seed) only."""
    info: dict
    """Model and sampler settings (JSON-serialisable): generation.json, where a rerun with other values is refused,
    and the MLflow run's params."""
    sampler: dict
    """The settings that change the images (steps, CFG or guidance, shift, resolution, dtype, schedules): the
    ``sampler.*`` fields of the GenEval protocol (`evaluation.provenance`)."""
    cost: dict[str, float]
    """Activated/total parameters and forward FLOPs per image per step (`generation_cost`)."""


@dataclass(frozen=True)
class ImageSource:
    """What a world's entry hands the core: how to load its generator, whose weights it samples, its batch size."""

    load: Callable[[], LoadedGenerator]
    """Loads the weights and builds the generator; called once the scoring models have loaded."""
    weights: str
    """The folder or hub id whose weights make the images (an exported transformer, else the model): the default
    output folder's name and, for a folder, the sha256 logged to MLflow."""
    batch_size: int
    """Images generated per batch."""


@dataclass(frozen=True)
class ImagePlan:
    """The images one evaluation makes: ``images_per_prompt`` of every prompt in ``metadata``, noise from ``seed``."""

    prompt_set: str
    """The prompt set's name or file."""
    metadata: list[dict]
    """GenEval metadata of the prompts drawn (after ``limit``)."""
    images_per_prompt: int
    """Images per prompt."""
    seed: int
    """Noise seed (`evaluation.generate.image_seed`)."""
    limit: int | None
    """The ``limit`` the prompts were cut to (recorded; None: the whole set)."""


def plan_images(prompts: PromptOptions, default_set: str, image_size: int = 32) -> ImagePlan:
    """The prompts ``prompts`` asks for (``default_set`` when it names none); ``image_size`` is the side the shapes
    world lays out its held-out compositions at."""
    prompt_set = prompts.prompts or default_set
    metadata = across_tasks(load_prompt_set(prompt_set, image_size), prompts.limit, prompt_set)
    return ImagePlan(prompt_set, metadata, prompts.images_per_prompt, prompts.seed, prompts.limit)


def run_config(**parts) -> dict:
    """An entry's arguments as the run's config.yaml: option groups as mappings, tuples as lists (YAML-safe)."""
    plain = {k: asdict(v) if is_dataclass(v) and not isinstance(v, type) else v for k, v in parts.items()}
    return json.loads(json.dumps(plain))


def generation_cost(transformer, trajectory: tuple | None = None, **tokens) -> dict[str, float]:
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


def evaluate_source(
    source: ImageSource,
    plan: ImagePlan,
    scoring: ScoringOptions,
    tracking: TrackingOptions,
    out: str | None,
    device: torch.device,
    config: dict,
) -> dict:
    """Generate ``plan``'s images with ``source`` into ``out`` (GenEval's layout, resumable), score them, write
    results.jsonl and summary.json, print the scores and log the run; returns the summary.

    ``scoring.detector`` must be decided (the entry's default filled in); ``config`` is the run's config.yaml.
    """
    detector = scoring.detector
    if detector is None:
        raise ValueError("scoring.detector: None; the entry must fill in its model's default detector")
    if detector == "glyphs":
        try:
            check_vocabulary(plan.metadata, f"prompt set {plan.prompt_set}")
        except ValueError as err:
            raise UserError(str(err)) from None
    out_dir = Path(out or f"outputs/eval/{Path(source.weights).name}")
    check_writable_dir(str(out_dir), "out")  # where the images and the MLflow run go must work before generating
    check_tracking(tracking)
    if scoring.reference is not None:
        check_reference(scoring.reference, plan.metadata, plan.seed, plan.images_per_prompt)

    # Scoring models load first, on the CPU: missing weights fail here, before any sampling.
    scorers = load_scorers(scoring)
    loaded = source.load()
    info = {**loaded.info, "prompt_set": plan.prompt_set}
    provenance = None if detector == "none" else _provenance(scoring, scorers, plan, loaded.sampler, info, device)
    started = time.perf_counter()
    generated = generate_images(
        loaded.generate, plan.metadata, out_dir, plan.images_per_prompt, source.batch_size, plan.seed, info
    )
    seconds = time.perf_counter() - started
    info.update(limit=plan.limit, seed=plan.seed, images_per_prompt=plan.images_per_prompt, detector=detector)
    cost = loaded.cost
    del loaded  # the generator's weights go before the scorers move to the device
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    records, summary = score_outputs(out_dir, scoring, scorers, device)
    summary["cost"] = cost
    if provenance is not None:
        summary["provenance"] = provenance
    if generated:
        summary["latency"] = {"generate_s_per_image": seconds / generated}
    write_scores(out_dir, records, summary)

    if records:
        print(format_summary(summary))
    for line in score_lines(summary):
        print(line)
    print(f"generated {generated} images in {seconds:.1f} s; results in {out_dir}")
    if tracking.log_mlflow:
        weights = Path(source.weights)
        info["sha256"] = model_fingerprint(weights) if weights.is_dir() else None
        log_to_mlflow(summary, records, out_dir, tracking, info, config)
    return summary


def _provenance(scoring: ScoringOptions, scorers: Scorers, plan: ImagePlan, sampler: dict, info: dict, device) -> dict:
    """The protocol behind this run's GenEval number (`evaluation.provenance`); hashes the scoring weights."""
    if scoring.detector == "shapes":
        detector_id, detector_hash = "shapes-classical", source_sha256(shapes_detector)
        colour_id = colour_hash = None  # the classical detector names colours itself
    elif scoring.detector == "glyphs":
        # the detector's "weights" are its code and the world's codebook and palette (src/data/glyphs.py)
        detector_id = "glyphs-classical"
        detector_hash = source_sha256(glyph_detector) + "+" + source_sha256(glyphs)
        colour_id = colour_hash = None
    else:
        detector_id = scoring.detector_model
        detector_hash = hub_or_folder_sha256(scoring.detector_model, scorers.geneval.model)
        colour_id = f"{scoring.clip_model} ({scoring.clip_pretrained})"
        colour_hash = clip_weights_sha256(scoring.clip_model, scoring.clip_pretrained, scorers.clip.model)
    rules = rules_record(**(scorers.geneval.filter if scorers.geneval is not None else {}))
    return geneval_provenance(
        prompts=prompts_record(plan.prompt_set, plan.metadata),
        detector=detector_id,
        detector_weights_sha256=detector_hash,
        colour_model=colour_id,
        colour_weights_sha256=colour_hash,
        rules=rules,
        images_per_prompt=plan.images_per_prompt,
        sampler=sampler,
        sources={
            "prompts": plan.prompt_set,
            "seed": plan.seed,
            "model": info.get("model"),
            "transformer": info.get("transformer"),
        },
        device=device,
    )
