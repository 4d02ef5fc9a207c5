"""What the distillation stages feed the transformer, for either kind of training data.

A conditioning adapter turns one batch of the datamodule into ``FlowInputs``: the clean image tokens x0 and the
text conditioning with their RoPE position ids. ``ShapesConditioning`` renders the embedded shapes world (pixel
patches, hash text encoder); ``LatentConditioning`` reads the FLUX latents and T5/CLIP embeddings that
``prepare-data`` stored, packing the latents 2×2 as ``FluxPipeline._pack_latents`` does. ``velocity`` is the one
transformer call both use, teacher and student alike.

Legend: B batch, C latent channels, h/w latent height/width, L image tokens, D packed token width, T text tokens,
E text-token width, P pooled width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from src.models.flow import image_ids, pack, text_ids
from src.models.pipeline import ShapesPipeline, flux_velocity


@dataclass
class FlowInputs:
    """One batch as the transformer takes it: clean tokens, text conditioning and position ids."""

    x0_BLD: torch.Tensor
    """Clean image tokens (packed patches or latents)."""
    tokens_BTE: torch.Tensor
    """Text-token embeddings (FLUX: T5)."""
    pooled_BP: torch.Tensor
    """Pooled text embedding (FLUX: CLIP)."""
    img_ids_L3: torch.Tensor
    """(0, row, col) per image token for FLUX's 2D RoPE."""
    txt_ids_T3: torch.Tensor
    """Zeros, one row per text token."""


def velocity(
    model: nn.Module, x_BLD: torch.Tensor, sigma_B: torch.Tensor, inputs: FlowInputs, guidance: float
) -> torch.Tensor:
    """One FLUX forward on a batch's inputs (``src.models.pipeline.flux_velocity``, the one transformer call)."""
    return flux_velocity(
        model, x_BLD, sigma_B, inputs.tokens_BTE, inputs.pooled_BP, inputs.img_ids_L3, inputs.txt_ids_T3, guidance
    )


class ShapesConditioning:
    """Shapes-world batches ``{"image": (B, 3, H, W), "prompt": [...]}`` through a ``ShapesPipeline``."""

    def __init__(self, pipeline: ShapesPipeline) -> None:
        self.pipeline = pipeline
        self.guidance = pipeline.sampling.guidance

    def inputs(self, batch: dict) -> FlowInputs:
        pipe = self.pipeline
        x0_BLD = pipe.images_to_tokens(batch["image"])
        tokens_BTE, pooled_BP = pipe.encode_prompts(batch["prompt"])
        n = pipe.tokens_per_side
        return FlowInputs(
            x0_BLD,
            tokens_BTE,
            pooled_BP,
            image_ids(n, n, x0_BLD.device),
            text_ids(tokens_BTE.shape[1], x0_BLD.device),
        )

    def unconditional(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Empty-prompt conditioning for classifier-free guidance."""
        return self.pipeline.encode_prompts([""] * batch_size)


class LatentConditioning:
    """Batches of ``LatentDataModule``: VAE latents (B, C, h, w) packed 2×2, stored T5 and pooled CLIP embeddings."""

    pipeline = None

    def __init__(self, guidance: float) -> None:
        self.guidance = guidance

    def inputs(self, batch: dict) -> FlowInputs:
        latents_BChw = batch["latents"].float()
        _, _, h, w = latents_BChw.shape
        x0_BLD = pack(latents_BChw, 2)
        tokens_BTE = batch["t5"].float()
        device = x0_BLD.device
        return FlowInputs(
            x0_BLD,
            tokens_BTE,
            batch["pooled"].float(),
            image_ids(h // 2, w // 2, device),
            text_ids(tokens_BTE.shape[1], device),
        )

    def unconditional(self, batch_size: int) -> None:
        """No empty-prompt embeddings are stored: a guidance-distilled teacher (FLUX.1-dev) needs none."""
        return None


__all__ = ["FlowInputs", "velocity", "ShapesConditioning", "LatentConditioning"]
