"""The option groups both kinds of model share: which prompts, how the images are scored, where the run is logged.

Each world's entry adds its own sampler group (`evaluation.evaluate.embedded.EmbeddedSampling`,
`evaluation.evaluate.flux.FluxSampling`). A bad value is a ValueError naming the field (the command line reports it
as one line).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from evaluation.clip_score import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED
from evaluation.real_geneval import DEFAULT_DETECTOR

DETECTORS = ("shapes", "glyphs", "geneval", "none")
"""The classical detectors of the embedded worlds, real GenEval (Mask2Former + CLIP colours), or no GenEval score."""


def check_count(name: str, value: object, minimum: int = 1) -> None:
    """An integer (not a bool) of at least ``minimum``; otherwise a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}")


@dataclass(frozen=True)
class PromptOptions:
    """Which prompts are drawn, how many images of each, and from which noise."""

    prompts: str | None = None
    """"shapes-heldout" (553 held-out compositions, GenEval's task counts), "geneval" (GenEval's 553 prompts), or a
    .txt/.jsonl file. None: the model's default (shapes-heldout for the shapes world, geneval for the glyph world
    and FLUX)."""
    images_per_prompt: int = 4
    """Images per prompt (GenEval uses 4)."""
    seed: int = 0
    """Noise seed; image k of prompt i always gets the same noise for every model."""
    limit: int | None = None
    """Only N prompts, spread evenly over the prompt set's tasks (quick looks; at least one per task)."""

    def __post_init__(self) -> None:
        check_count("images_per_prompt", self.images_per_prompt)


@dataclass(frozen=True)
class ScoringOptions:
    """How the generated images are scored: GenEval's rules with a detector, CLIP score, fidelity to a reference."""

    detector: str | None = None
    """"shapes" / "glyphs" (the classical detectors of the embedded worlds), "geneval" (Mask2Former + CLIP colours)
    or "none". None: the model's own (its world's detector; geneval for FLUX)."""
    detector_model: str = DEFAULT_DETECTOR
    """Mask2Former (COCO instance segmentation) hub id or local folder, for detector=geneval."""
    clip_score: bool = False
    """Also compute the CLIP score (100 · max(cos, 0), mean over images and per task)."""
    clip_model: str = DEFAULT_CLIP_MODEL
    """open_clip architecture for colours and CLIP score: a built-in name, a model-config .json, local-dir:/folder or
    hf-hub:org/repo."""
    clip_pretrained: str = DEFAULT_CLIP_PRETRAINED
    """open_clip weights: a tag ("openai") or a checkpoint path."""
    reference: str | None = None
    """Another evaluate output folder (same prompts and seed, e.g. the teacher's) for fidelity: PSNR, SSIM and LPIPS
    on same-noise pairs."""

    def __post_init__(self) -> None:
        if self.detector is not None and self.detector not in DETECTORS:
            raise ValueError(f"detector={self.detector!r}: allowed {', '.join(DETECTORS)}")

    def with_default_detector(self, detector: str) -> ScoringOptions:
        """These options with ``detector`` filled in when none was chosen."""
        return self if self.detector is not None else replace(self, detector=detector)

    @property
    def needs_clip(self) -> bool:
        """CLIP is loaded for the CLIP score and for real GenEval's colour classification."""
        return self.clip_score or self.detector == "geneval"


@dataclass(frozen=True)
class TrackingOptions:
    """The MLflow run an evaluation is logged to."""

    log_mlflow: bool = True
    """Log metrics and artifacts to MLflow."""
    experiment_name: str = "evaluation"
    """MLflow experiment."""
    run_name: str | None = None
    """MLflow run name (None: the output folder's name)."""
    tracking_uri: str | None = None
    """MLflow tracking URI (None: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)."""
