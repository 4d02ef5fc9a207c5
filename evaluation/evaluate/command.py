"""The ``evaluate`` command: its flat command-line flags, routed to the entry for the kind of model ``--model`` is.

A transformer folder goes to `evaluation.evaluate.embedded.evaluate_embedded`, a FluxPipeline folder or hub id
(or any ``--transformer``) to `evaluation.evaluate.flux.evaluate_flux`; each takes only the flags that mean
something for it, grouped into option dataclasses. The flags and their defaults are the command line's (jsonargparse
builds it from this signature), so they stay flat.
"""

from __future__ import annotations

import torch

from evaluation.clip_score import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED
from evaluation.evaluate.embedded import EmbeddedSampling, evaluate_embedded
from evaluation.evaluate.flux import FluxSampling, evaluate_flux
from evaluation.evaluate.options import PromptOptions, ScoringOptions, TrackingOptions
from evaluation.generate import is_flux_pipeline
from evaluation.geneval_agreement import check_geneval_results
from evaluation.real_geneval import DEFAULT_DETECTOR
from src.errors import UserError


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
    if flux and (top_k_schedule is not None or mob_active_schedule is not None):
        raise UserError("top_k_schedule / mob_active_schedule: only the shapes-world sampler applies them, not FLUX")
    try:  # a bad value is one line naming its flag
        groups = {
            "prompts": PromptOptions(prompts, images_per_prompt, seed, limit),
            "scoring": ScoringOptions(
                detector or None, detector_model, clip_score, clip_model, clip_pretrained, reference
            ),
            "tracking": TrackingOptions(log_mlflow, experiment_name, run_name, tracking_uri),
        }
        if flux:
            groups["sampling"] = FluxSampling(
                height=height,
                width=width,
                steps=steps or 28,
                guidance=guidance,
                max_sequence_length=max_sequence_length,
                top_k=top_k,
                dtype=dtype,
                batch_size=batch_size or 4,
            )
        else:
            groups["sampling"] = EmbeddedSampling(
                image_size=image_size,
                steps=steps or 20,
                cfg_scale=cfg_scale,
                shift=shift,
                top_k=top_k,
                top_k_schedule=top_k_schedule,
                mob_active_schedule=mob_active_schedule,
                batch_size=batch_size or 64,
            )
    except ValueError as err:
        raise UserError(str(err)) from None
    if flux:
        return evaluate_flux(model, transformer, out, device=device, config=arguments, **groups)
    return evaluate_embedded(model, out, device=device, config=arguments, **groups)
