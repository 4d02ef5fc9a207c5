"""``evaluate`` for diffusers' FluxPipeline: a pipeline folder or hub id (e.g. FLUX.1-dev), optionally with an
exported student transformer in place of its own, judged by real GenEval (Mask2Former + CLIP colours) by default."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from evaluation.evaluate.core import (
    ImageSource,
    LoadedGenerator,
    evaluate_source,
    generation_cost,
    plan_images,
    run_config,
)
from evaluation.evaluate.options import PromptOptions, ScoringOptions, TrackingOptions, check_count
from evaluation.generate import FluxGenerator, load_flux_pipeline
from src.dtypes import DTYPES, resolve_device
from src.errors import UserError
from src.models.flux_moe import set_top_k

SAMPLER_KEYS = ("steps", "guidance", "shift", "height", "width", "max_sequence_length", "dtype")
"""The settings of ``info`` that change FLUX images: the ``sampler.*`` fields of the GenEval protocol."""


@dataclass(frozen=True)
class FluxSampling:
    """How FluxPipeline samples (its own scheduler; FLUX.1-dev is guidance-distilled: no classifier-free guidance)."""

    height: int = 1024
    """Image height in pixels (a multiple of twice the VAE's downsampling)."""
    width: int = 1024
    """Image width in pixels (a multiple of twice the VAE's downsampling)."""
    steps: int = 28
    """Sampling steps."""
    guidance: float = 3.5
    """Guidance-embedding value."""
    max_sequence_length: int = 512
    """T5 prompt tokens (capped at the tokenizer's limit)."""
    top_k: int | None = None
    """Routed experts per token at inference for an MoE transformer (None: as trained)."""
    dtype: str = "auto"
    """Weights dtype: "auto" (bfloat16 on cuda, float32 on cpu), "float32", "bfloat16", "float16"."""
    batch_size: int = 4
    """Images generated per batch."""

    def __post_init__(self) -> None:
        for name in ("height", "width", "steps", "max_sequence_length", "batch_size"):
            check_count(name, getattr(self, name))
        if self.top_k is not None:
            check_count("top_k", self.top_k, minimum=0)
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: allowed auto, {', '.join(DTYPES)}")


def evaluate_flux(
    model: str,
    transformer: str | None = None,
    out: str | None = None,
    sampling: FluxSampling | None = None,
    prompts: PromptOptions | None = None,
    scoring: ScoringOptions | None = None,
    tracking: TrackingOptions | None = None,
    device: str = "auto",
    config: dict | None = None,
) -> dict:
    """Generate a prompt set's images with a FluxPipeline and score them; returns the summary.

    Args:
        model: A diffusers FluxPipeline folder (model_index.json, e.g. a local FLUX.1-dev) or hub id.
        transformer: A save_pretrained transformer folder (an exported student) replacing the pipeline's own.
        out: Output folder in GenEval's layout (default outputs/eval/<transformer or model folder name>).
        sampling: The pipeline's sampling settings.
        prompts: Which prompts (default: GenEval's 553).
        scoring: Detector (default: geneval, Mask2Former + CLIP colours), CLIP score, reference for fidelity.
        tracking: The MLflow run.
        device: "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
        config: The run's config.yaml in MLflow (default: these arguments).
    """
    sampling = sampling or FluxSampling()
    prompts = prompts or PromptOptions()
    scoring = scoring or ScoringOptions()
    tracking = tracking or TrackingOptions()
    if config is None:
        groups = {"sampling": sampling, "prompts": prompts, "scoring": scoring, "tracking": tracking}
        config = run_config(model=model, transformer=transformer, out=out, device=device, **groups)
    scoring = scoring.with_default_detector("geneval")
    target = resolve_device(device)
    plan = plan_images(prompts, "geneval")
    source = ImageSource(
        partial(load_flux_generator, model, transformer, sampling, target), transformer or model, sampling.batch_size
    )
    return evaluate_source(source, plan, scoring, tracking, out, target, config)


def load_flux_generator(model: str, transformer: str | None, sampling: FluxSampling, device) -> LoadedGenerator:
    """The pipeline on ``device`` (``transformer`` replacing its own) as a `FluxGenerator`."""
    pipeline = load_flux_pipeline(model, transformer, sampling.dtype, str(device))
    if sampling.top_k is not None:
        try:
            set_top_k(pipeline.transformer, sampling.top_k)
        except ValueError as err:  # no MoE layers, or k above the experts
            raise UserError(f"--top_k {sampling.top_k}: {err}") from None
    generator = FluxGenerator(
        pipeline, sampling.height, sampling.width, sampling.steps, sampling.guidance, sampling.max_sequence_length
    )
    cost = generation_cost(
        pipeline.transformer, image_tokens=generator.image_tokens, text_len=generator.max_sequence_length
    )
    info = {
        "model": str(model),
        "transformer": transformer,
        "steps": sampling.steps,
        "guidance": sampling.guidance,
        "height": sampling.height,
        "width": sampling.width,
        "max_sequence_length": generator.max_sequence_length,
        "shift": flux_shift(pipeline.scheduler.config),
        "top_k": sampling.top_k,
        "dtype": str(pipeline.transformer.dtype).removeprefix("torch."),
    }
    return LoadedGenerator(generator, info, {k: info[k] for k in SAMPLER_KEYS}, cost)


def flux_shift(config) -> str | float:
    """The sampling schedule's shift as FluxPipeline applies it: dynamic (mu from the image tokens) or fixed."""
    if config.get("use_dynamic_shifting"):
        return (
            f"dynamic mu: base_shift {config.get('base_shift')} at {config.get('base_image_seq_len')} tokens, "
            f"max_shift {config.get('max_shift')} at {config.get('max_image_seq_len')} tokens"
        )
    return float(config.get("shift", 1.0))
