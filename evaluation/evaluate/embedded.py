"""``evaluate`` for the embedded worlds: a transformer folder of the shapes or glyph world, sampled by
`src.models.pipeline.ShapesPipeline` and judged by its world's classical detector (by default)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from evaluation.evaluate.core import (
    ImageSource,
    LoadedGenerator,
    evaluate_source,
    generation_cost,
    plan_images,
    run_config,
)
from evaluation.evaluate.options import PromptOptions, ScoringOptions, TrackingOptions, check_count
from src.data.worlds import DEFAULT_WORLD, check_world
from src.dtypes import resolve_device
from src.errors import UserError
from src.models.compute_schedule import as_lists, check_fits, check_schedule
from src.models.flux_moe import set_top_k
from src.models.loading import load_transformer
from src.models.mob import mob_groups
from src.models.moe import moe_layers
from src.models.pipeline import SamplingConfig, ShapesPipeline

SCHEDULE_KEYS = ("top_k_schedule", "mob_active_schedule")
SAMPLER_KEYS = ("steps", "cfg_scale", "shift", "image_size")
"""The settings of ``info`` that change the images: the ``sampler.*`` fields of the GenEval protocol (with the
schedules, when set)."""


@dataclass(frozen=True)
class EmbeddedSampling:
    """How an embedded world's transformer is sampled (Euler, classifier-free guidance, optional compute schedules)."""

    image_size: int = 32
    """Image side in pixels."""
    steps: int = 20
    """Sampling steps."""
    cfg_scale: float = 2.0
    """Classifier-free guidance scale."""
    shift: float | None = None
    """Timestep shift of the sampling schedule (None: the model's ``sampling_shift``)."""
    top_k: int | None = None
    """Routed experts per token at inference for an MoE model (None: as trained); also overrides the config's
    top-k schedule."""
    top_k_schedule: list[tuple[float, int]] | None = None
    """Routed top-k as a function of σ, [[σ_max, k], …] with σ_max strictly decreasing from 1.0, each entry holding
    down to the next σ_max (e.g. [[1.0, 2], [0.5, 1]]: k = 2 for σ > 0.5, else 1). None: the model config's
    ``sampling_schedule``, else ``top_k``."""
    mob_active_schedule: list[tuple[float, int]] | None = None
    """MoB active blocks κ as a function of σ, in the same form."""
    batch_size: int = 64
    """Images generated per batch."""

    def __post_init__(self) -> None:
        for name in ("image_size", "steps", "batch_size"):
            check_count(name, getattr(self, name))
        if self.top_k is not None:
            check_count("top_k", self.top_k, minimum=0)
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale={self.cfg_scale}: must be >= 0")
        if self.shift is not None and self.shift <= 0:
            raise ValueError(f"shift={self.shift}: must be > 0 (or None: the model's own)")
        for name in SCHEDULE_KEYS:
            check_schedule(getattr(self, name), name)


def evaluate_embedded(
    model: str,
    out: str | None = None,
    sampling: EmbeddedSampling | None = None,
    prompts: PromptOptions | None = None,
    scoring: ScoringOptions | None = None,
    tracking: TrackingOptions | None = None,
    device: str = "auto",
    config: dict | None = None,
) -> dict:
    """Generate a prompt set's images with an embedded world's transformer and score them; returns the summary.

    Args:
        model: A transformer folder of the shapes or glyph world (the teacher, or an exported student).
        out: Output folder in GenEval's layout (default outputs/eval/<model folder name>).
        sampling: The sampler's settings.
        prompts: Which prompts (default: shapes-heldout for the shapes world, GenEval's own for the glyph world).
        scoring: Detector (default: the model's world, config ``world``), CLIP score, reference for fidelity.
        tracking: The MLflow run.
        device: "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
        config: The run's config.yaml in MLflow (default: these arguments).
    """
    sampling = sampling or EmbeddedSampling()
    prompts = prompts or PromptOptions()
    scoring = scoring or ScoringOptions()
    tracking = tracking or TrackingOptions()
    if config is None:
        groups = {"sampling": sampling, "prompts": prompts, "scoring": scoring, "tracking": tracking}
        config = run_config(model=model, out=out, device=device, **groups)
    world = model_world(model)
    scoring = scoring.with_default_detector(world)
    target = resolve_device(device)
    # the glyph world's evaluation set is GenEval's own 553 prompts, unchanged
    plan = plan_images(prompts, "shapes-heldout" if world == "shapes" else "geneval", sampling.image_size)
    source = ImageSource(partial(load_embedded_generator, model, sampling, target), model, sampling.batch_size)
    return evaluate_source(source, plan, scoring, tracking, out, target, config)


def model_world(model: str) -> str:
    """The embedded world a transformer folder was trained on (its config's ``world``; shapes when absent)."""
    config = Path(model) / "config.json"
    if not config.is_file():
        return DEFAULT_WORLD
    try:
        return check_world(json.loads(config.read_text()).get("world") or DEFAULT_WORLD, f"{config}: world")
    except (ValueError, AttributeError) as err:
        raise UserError(f"{config}: {err}") from None


def load_embedded_generator(model: str, sampling: EmbeddedSampling, device) -> LoadedGenerator:
    """The transformer on ``device`` inside a `ShapesPipeline`, its schedules checked against its layers."""
    transformer = load_transformer(model).eval().to(device)
    top_k = sampling.top_k
    if top_k is not None:
        try:
            set_top_k(transformer, top_k)
        except ValueError as err:  # no MoE layers, or k above the experts
            raise UserError(f"--top_k {top_k}: {model}: {err}") from None
    try:
        top_k_schedule, mob_schedule = (check_schedule(getattr(sampling, n), n) for n in SCHEDULE_KEYS)
        if top_k is not None and top_k_schedule is None:  # an explicit top-k also overrides the config's schedule
            top_k_schedule = ((1.0, top_k),)
        sampler_config = SamplingConfig(
            sampling.steps,
            sampling.cfg_scale,
            sampling.shift,
            top_k_schedule=top_k_schedule,
            mob_active_schedule=mob_schedule,
        )
        top_k_schedule, mob_schedule = sampler_config.schedules_for(transformer)
        check_fits(transformer, top_k_schedule, mob_schedule)
    except ValueError as err:
        raise UserError(str(err)) from None
    _check_schedule_targets(transformer, top_k_schedule, mob_schedule)
    pipeline = ShapesPipeline(transformer, image_size=sampling.image_size, sampling=sampler_config)
    text_len = pipeline.encode_prompts([""])[0].shape[1]
    trajectory = (sampling.steps, sampler_config.shift_for(transformer), top_k_schedule, mob_schedule)
    cost = generation_cost(
        transformer, image_tokens=pipeline.tokens_per_side**2, text_len=text_len, trajectory=trajectory
    )
    info = {
        "model": str(model),
        "steps": sampling.steps,
        "cfg_scale": sampling.cfg_scale,
        "shift": pipeline.sampling.shift_for(transformer),
        "top_k": top_k,
        "top_k_schedule": as_lists(top_k_schedule),
        "mob_active_schedule": as_lists(mob_schedule),
        "image_size": sampling.image_size,
    }
    # only when set: records of runs without a schedule stay comparable with older ones
    sampler = {k: info[k] for k in SAMPLER_KEYS}
    sampler |= {k: info[k] for k in SCHEDULE_KEYS if info[k] is not None}
    return LoadedGenerator(pipeline, info, sampler, cost)


def _check_schedule_targets(transformer, top_k_schedule, mob_schedule) -> None:
    """A schedule for layers the model does not have is a mistake on the command line, not a silent no-op."""
    if top_k_schedule is not None and not moe_layers(transformer):
        raise UserError("top_k_schedule: the model has no MoE layers to route")
    if mob_schedule is not None and not mob_groups(transformer):
        raise UserError("mob_active_schedule: the model has no MoB groups")
