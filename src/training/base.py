"""What every LightningModule here shares: prompt encoding, the FLUX call, sampling and held-out scoring.

The teacher and the distillation stages differ only in their training step; they generate and are judged the same
way, so their numbers are comparable. Legend: B batch, L image tokens, D packed token width, T text tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch import nn

from src.models.flow import euler_sample, fixed_noise, image_ids, pack, text_ids, to_uint8, unpack
from src.models.text_encoder import HashTextEncoder, TextEncoderConfig


@dataclass
class SamplingConfig:
    steps: int = 20
    """Euler steps from σ = 1 to 0."""
    cfg_scale: float = 4.0
    """Classifier-free guidance scale (1 = no guidance, conditional branch only)."""
    shift: float = 1.0
    """FLUX timestep shift of the sampling schedule."""
    guidance: float = 3.5
    """Value fed to a guidance-distilled transformer's guidance embedding (ignored without ``guidance_embeds``)."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"sampling.steps={self.steps}: must be >= 1")
        if self.cfg_scale < 0:
            raise ValueError(f"sampling.cfg_scale={self.cfg_scale}: must be >= 0")


class FlowModule(L.LightningModule):
    """Base: conditioning, packing and sampling for a FLUX-architecture transformer on images of ``image_size``."""

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        channels: int = 3,
        text_encoder: TextEncoderConfig | None = None,
        sampling: SamplingConfig | None = None,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} must be divisible by patch_size={patch_size}")
        self.image_size, self.patch_size, self.channels = image_size, patch_size, channels
        self.sampling = sampling or SamplingConfig()
        self.text_encoder = HashTextEncoder(text_encoder or TextEncoderConfig())
        self._val_records: list[dict] = []
        self._val_images: list[np.ndarray] = []

    # --- conditioning and the model call -------------------------------------------------------------------
    @property
    def tokens_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def token_width(self) -> int:
        return self.channels * self.patch_size**2

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens_BTC, pooled_BP = self.text_encoder(prompts)
        return tokens_BTC.to(self.device), pooled_BP.to(self.device)

    def call_transformer(
        self,
        model: nn.Module,
        x_BLD: torch.Tensor,
        sigma_B: torch.Tensor,
        tokens_BTC: torch.Tensor,
        pooled_BP: torch.Tensor,
    ) -> torch.Tensor:
        """One FLUX forward: velocity prediction for noisy tokens at noise level σ."""
        n = self.tokens_per_side
        guidance = None
        if getattr(model.config, "guidance_embeds", False):
            guidance = torch.full_like(sigma_B, self.sampling.guidance)
        return model(
            hidden_states=x_BLD,
            encoder_hidden_states=tokens_BTC,
            pooled_projections=pooled_BP,
            timestep=sigma_B,
            img_ids=image_ids(n, n, x_BLD.device),
            txt_ids=text_ids(tokens_BTC.shape[1], x_BLD.device),
            guidance=guidance,
            return_dict=False,
        )[0]

    def images_to_tokens(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return pack(images_BCHW, self.patch_size)

    # --- sampling --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, model: nn.Module, prompts: list[str], seeds: list[int], sampling: SamplingConfig | None = None):
        """Images (B, H, W, 3) uint8 for prompts, noise fixed by per-sample seeds (shared across models)."""
        s = sampling or self.sampling
        shape = (self.tokens_per_side**2, self.token_width)
        noise_BLD = fixed_noise(shape, seeds, self.device)
        cond = self.encode_prompts(prompts)
        uncond = self.encode_prompts([""] * len(prompts))

        def velocity(x_BLD, sigma_B, conditional):
            tokens, pooled = cond if conditional else uncond
            return self.call_transformer(model, x_BLD, sigma_B, tokens, pooled)

        x_BLD = euler_sample(velocity, noise_BLD, s.steps, s.cfg_scale, s.shift)
        images = unpack(x_BLD.float(), self.patch_size, self.image_size, self.image_size)
        return to_uint8(images).numpy()

    def sampling_model(self) -> nn.Module:
        raise NotImplementedError

    # --- held-out GenEval-shapes during validation -------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        from evaluation.geneval import result_record
        from evaluation.shapes_detector import evaluate_shapes_image

        metadata, seeds = batch["metadata"], batch["seed"]
        images = self.generate(self.sampling_model(), [m["prompt"] for m in metadata], seeds)
        for i, (image, meta) in enumerate(zip(images, metadata)):
            correct, reason, detections = evaluate_shapes_image(image, meta)
            name = f"{batch_idx:05d}/{i:04d}.png"
            self._val_records.append(result_record(name, meta, correct, reason, detections))
        if batch_idx == 0:
            self._val_images.extend(images)

    def on_validation_epoch_end(self) -> None:
        from evaluation.geneval import summarize

        if not self._val_records or self.trainer.sanity_checking:
            self._val_records, self._val_images = [], []
            return
        summary = summarize(self._val_records)
        metrics = {f"val/geneval_shapes/{task}": acc for task, acc in summary["tasks"].items()}
        metrics["val/geneval_shapes/overall"] = summary["overall"]
        self.log_dict(metrics, prog_bar=False, sync_dist=True)
        self.log("val_overall", summary["overall"], prog_bar=True, sync_dist=True)
        logger = self.logger
        if hasattr(logger, "log_image") and self._val_images:
            logger.log_image(image_grid(self._val_images), f"samples/step_{self.global_step:07d}.png")
        self._val_records, self._val_images = [], []


def image_grid(images: list[np.ndarray] | np.ndarray, cols: int = 8, scale: int = 4, pad: int = 2) -> np.ndarray:
    """Tile uint8 (H, W, 3) images into one grid, upscaled (nearest) so 32×32 samples are visible."""
    images = [np.kron(im, np.ones((scale, scale, 1), dtype=np.uint8)) for im in images]
    h, w, _ = images[0].shape
    rows = (len(images) + cols - 1) // cols
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = im
    return grid
