"""CLIP score with open_clip, and the open_clip loading that GenEval's colour classifier shares.

CLIP score of an image and its prompt = 100 · max(cos(E_img, E_txt), 0), averaged over images (torchmetrics' scale
of 100 with the per-sample clamp of CLIP-S, Hessel et al. 2021). The default backbone is OpenAI's ViT-L/14 through
open_clip's ``ViT-L-14-quickgelu`` (the OpenAI weights were trained with QuickGELU; plain ``ViT-L-14`` would build a
GELU model, docs/design.md §8.6), with its own preprocessing (resize 224 bicubic, centre crop) and 77-token truncation.
torchmetrics' CLIPScore is not used: it breaks with transformers 5 (docs/design.md §8.3). Legend: N images, D embedding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from src.errors import UserError, short_reason

DEFAULT_CLIP_MODEL = "ViT-L-14-quickgelu"
DEFAULT_CLIP_PRETRAINED = "openai"
_SCHEMAS = ("local-dir:", "hf-hub:")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
_HOW_TO = (
    "pass a local checkpoint with --clip_pretrained /path/to/open_clip_pytorch_model.bin (architecture via "
    "--clip_model: a built-in name, a model-config .json, or local-dir:/folder), or fetch the weights once on a "
    "machine with network access (open_clip caches them)"
)


@dataclass
class OpenClip:
    """An open_clip model with its preprocessing and tokenizer; embeddings come back L2-normalised."""

    model: nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    name: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> OpenClip:
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
        return nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return nn.functional.normalize(self.model.encode_text(self.tokenizer(texts).to(self.device)).float(), dim=-1)


def _architecture(model_name: str) -> str:
    """A registered architecture name; a model-config .json is registered under its file stem."""
    import open_clip  # heavy, optional: only CLIP scoring needs it

    if model_name.startswith(_SCHEMAS):
        return model_name
    path = Path(model_name)
    if path.suffix == ".json":
        if not path.is_file():
            raise UserError(f"clip_model={model_name!r}: no such open_clip model-config file")
        open_clip.add_model_config(path)
        return path.stem
    if model_name not in open_clip.list_models():
        raise UserError(
            f"clip_model={model_name!r} is not an open_clip architecture; allowed: a built-in name (e.g. "
            f"{DEFAULT_CLIP_MODEL}), a model-config .json, local-dir:/folder or hf-hub:org/repo"
        )
    return model_name


def _resolve_weights(architecture: str, pretrained: str) -> None:
    """Fail with one line when the weights are neither a local file nor a tag whose download/cache works."""
    from open_clip import pretrained as registry  # heavy, optional: only CLIP scoring needs it

    if architecture.startswith(_SCHEMAS):
        return
    if Path(pretrained).is_file():
        return
    cfg = registry.get_pretrained_cfg(architecture, pretrained)
    if not cfg:
        looks_like_path = "/" in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES)
        problem = "no such file" if looks_like_path else "not a file and not a known tag of this architecture"
        raise UserError(f"CLIP weights {pretrained!r} for {architecture}: {problem}; {_HOW_TO}")
    try:
        registry.download_pretrained(cfg)  # a cache hit when the weights were fetched before
    except (OSError, RuntimeError, ValueError) as exc:
        raise UserError(
            f"CLIP weights {architecture} (pretrained={pretrained!r}) are not available here ({short_reason(exc)}); "
            f"{_HOW_TO}"
        ) from None


def load_open_clip(
    model_name: str = DEFAULT_CLIP_MODEL, pretrained: str = DEFAULT_CLIP_PRETRAINED, device: str = "cpu"
) -> OpenClip:
    """open_clip model + preprocessing + tokenizer; weights from a tag (cached download) or a checkpoint path.

    Raises ``UserError`` with one line naming the weights and the flags to point at them when they are missing.
    """
    import open_clip  # heavy, optional: only CLIP scoring needs it

    architecture = _architecture(model_name)
    _resolve_weights(architecture, pretrained)
    weights = None if architecture.startswith(_SCHEMAS) else pretrained
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(architecture, pretrained=weights, device=device)
    except (OSError, RuntimeError, ValueError) as exc:
        raise UserError(
            f"CLIP model {model_name} (pretrained={pretrained!r}) cannot be loaded: {short_reason(exc)}"
        ) from None
    return OpenClip(model.eval(), preprocess, open_clip.get_tokenizer(architecture), architecture)


def clip_scores(clip: OpenClip, images: list[np.ndarray], prompts: list[str]) -> np.ndarray:
    """Per-image CLIP score 100 · max(cos, 0) of uint8 (H, W, 3) images against their prompts, shape (N,)."""
    if len(images) != len(prompts):
        raise ValueError(f"clip_scores: {len(images)} images but {len(prompts)} prompts")
    image_ND = clip.encode_images([Image.fromarray(im) for im in images])
    text_ND = clip.encode_texts(list(prompts))
    return (100 * (image_ND * text_ND).sum(-1)).clamp(min=0).cpu().numpy()


def clip_score_summary(scored: Iterable[tuple[str, float]]) -> dict:
    """{"clip_score": mean over images, "tasks": {tag: mean}, "images": n} from (tag, score) pairs."""
    per_task: dict[str, list[float]] = {}
    for tag, score in scored:
        per_task.setdefault(tag, []).append(float(score))
    if not per_task:
        raise ValueError("clip_score_summary: no images")
    every = [s for scores in per_task.values() for s in scores]
    return {
        "clip_score": float(np.mean(every)),
        "tasks": {tag: float(np.mean(scores)) for tag, scores in per_task.items()},
        "images": len(every),
    }
