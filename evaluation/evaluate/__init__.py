"""``python -m src.cli evaluate``: generate → detect → score (GenEval rules) → results.jsonl, summary, MLflow.

Two kinds of model, one entry each around a shared core:

- `embedded.evaluate_embedded`: the embedded worlds (``--model`` a transformer folder of the shapes or glyph
  world, e.g. checkpoints/teacher_tiny), sampled by ``ShapesPipeline``, judged by the world's classical detector;
- `flux.evaluate_flux`: diffusers' FluxPipeline (``--model`` a pipeline folder or hub id, optionally
  ``--transformer`` an exported student), judged by real GenEval (Mask2Former + CLIP colours);
- `core.evaluate_source`: what both share once a generator of images for (prompt, seed) exists: GenEval-layout
  folder, scoring (`scoring`: GenEval, CLIP score, fidelity to a reference run generated from the same noise),
  provenance, summary, console and MLflow report (`report`); option groups both use are in `options`;
- `command.evaluate`: the command line's flat flags, routed to the entry for ``--model``.

Models that need weights load before generation, so missing weights fail in seconds with one line, not after hours
of sampling; results.jsonl and summary.json are written only after every score is computed (stale ones are removed
when scoring starts).
"""

from evaluation.evaluate.command import evaluate
from evaluation.evaluate.core import ImagePlan, ImageSource, LoadedGenerator, evaluate_source
from evaluation.evaluate.embedded import EmbeddedSampling, evaluate_embedded
from evaluation.evaluate.flux import FluxSampling, evaluate_flux
from evaluation.evaluate.options import DETECTORS, PromptOptions, ScoringOptions, TrackingOptions
from evaluation.evaluate.report import failure_grid, metrics_of
from evaluation.evaluate.scoring import METRIC_PREFIX, clip_score_folder, score_folder

__all__ = [
    "DETECTORS",
    "METRIC_PREFIX",
    "EmbeddedSampling",
    "FluxSampling",
    "ImagePlan",
    "ImageSource",
    "LoadedGenerator",
    "PromptOptions",
    "ScoringOptions",
    "TrackingOptions",
    "clip_score_folder",
    "evaluate",
    "evaluate_embedded",
    "evaluate_flux",
    "evaluate_source",
    "failure_grid",
    "metrics_of",
    "score_folder",
]
