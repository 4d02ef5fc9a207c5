"""Text-to-image sampling for a FLUX-architecture transformer in the shapes world (pixel tokens, hash text encoder).

The counterpart of ``diffusers.FluxPipeline`` for the embedded world: same transformer call, same rectified-flow
Euler sampler, with the project's frozen text encoder instead of T5 + CLIP and pixel patches (4×4 or 8×8) instead of VAE
latents. Noise is fixed per sample by a seed, so teacher and student images of the same (prompt, seed) are
comparable. Legend: B batch, L image tokens, D packed token width, T text tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn

from src.models.compute_schedule import Schedule, check_schedule, model_schedules, scheduled
from src.models.flow import (
    fixed_noise,
    image_ids,
    ode_sample,
    pack,
    prediction_type,
    sampling_shift,
    text_ids,
    to_uint8,
    to_velocity,
    unpack,
)
from src.models.moe import load_tracking, samples_independent
from src.models.text_encoder import HashTextEncoder, TextEncoderConfig


@dataclass
class SamplingConfig:
    steps: int = 20
    """Euler steps from σ = 1 to 0."""
    cfg_scale: float = 4.0
    """Classifier-free guidance scale (1 = no guidance, conditional branch only)."""
    shift: float | None = None
    """FLUX timestep shift of the sampling schedule; None = the model's config ``sampling_shift`` (else 1)."""
    guidance: float = 3.5
    """Value fed to a guidance-distilled transformer's guidance embedding (ignored without ``guidance_embeds``)."""
    top_k_schedule: list[tuple[float, int]] | None = None
    """Routed top-k as a function of σ: [[σ_max, k], …], σ_max strictly decreasing from 1.0, each entry holding down
    to the next σ_max ([[1.0, 2], [0.5, 1]]: k = 2 for σ > 0.5, else 1); None = the model config's
    ``sampling_schedule``, else the layers' own top-k. Models without MoE layers ignore it."""
    mob_active_schedule: list[tuple[float, int]] | None = None
    """MoB active blocks κ as a function of σ, in the same form; None = the model config's, else the groups' own."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"sampling.steps={self.steps}: must be >= 1")
        if self.cfg_scale < 0:
            raise ValueError(f"sampling.cfg_scale={self.cfg_scale}: must be >= 0")
        if self.shift is not None and self.shift <= 0:
            raise ValueError(f"sampling.shift={self.shift}: must be > 0")
        for name in ("top_k_schedule", "mob_active_schedule"):
            setattr(self, name, check_schedule(getattr(self, name), f"sampling.{name}"))

    def __repr__(self) -> str:
        # unset schedules stay out of the repr, so teacher-cache keys (src/training/report.py) of runs without one
        # keep their value
        shown = [f for f in fields(self) if not (f.name.endswith("_schedule") and getattr(self, f.name) is None)]
        return f"SamplingConfig({', '.join(f'{f.name}={getattr(self, f.name)!r}' for f in shown)})"

    def shift_for(self, model: nn.Module) -> float:
        """The shift to sample `model` with: the explicit one, else the model's own, else 1."""
        return self.shift if self.shift is not None else (sampling_shift(model) or 1.0)

    def schedules_for(self, model: nn.Module) -> tuple[Schedule | None, Schedule | None]:
        """(top-k schedule, MoB κ schedule) to sample `model` with: the explicit ones, else the model config's."""
        stored = model_schedules(model)
        return (
            self.top_k_schedule if self.top_k_schedule is not None else stored["top_k_schedule"],
            self.mob_active_schedule if self.mob_active_schedule is not None else stored["mob_active_schedule"],
        )


def flux_velocity(
    model: nn.Module,
    x_BLD: torch.Tensor,
    sigma_B: torch.Tensor,
    tokens_BTC: torch.Tensor,
    pooled_BP: torch.Tensor,
    img_ids_L3: torch.Tensor,
    txt_ids_T3: torch.Tensor,
    guidance: float,
) -> torch.Tensor:
    """The project's one FLUX transformer call: the velocity at noise level σ, for sampling and training alike.

    Inputs are cast to the model's dtype (a bf16 teacher takes bf16; a no-op when they agree); a guidance-distilled
    model (config ``guidance_embeds``) also gets ``guidance``; an x-predicting model's output (config
    ``prediction_type: sample``) is converted to the velocity.
    """
    dtype = model.dtype
    guidance_B = torch.full_like(sigma_B, guidance) if getattr(model.config, "guidance_embeds", False) else None
    out = model(
        hidden_states=x_BLD.to(dtype),
        encoder_hidden_states=tokens_BTC.to(dtype),
        pooled_projections=pooled_BP.to(dtype),
        timestep=sigma_B,
        img_ids=img_ids_L3,
        txt_ids=txt_ids_T3,
        guidance=guidance_B,
        return_dict=False,
    )[0]
    return to_velocity(out, x_BLD, sigma_B, prediction_type(model))


class ShapesPipeline:
    """Prompt → image for a transformer whose ``in_channels`` = 3·patch² (pixels packed patch × patch)."""

    def __init__(
        self,
        transformer: nn.Module,
        text_encoder: HashTextEncoder | None = None,
        image_size: int = 32,
        patch_size: int | None = None,
        sampling: SamplingConfig | None = None,
    ) -> None:
        cfg = transformer.config
        self.transformer = transformer
        self.patch_size = patch_size or int(math.isqrt(cfg.in_channels // 3))
        if 3 * self.patch_size**2 != cfg.in_channels or image_size % self.patch_size:
            raise ValueError(
                f"transformer in_channels={cfg.in_channels} / image_size={image_size} do not fit 3-channel "
                f"{self.patch_size}×{self.patch_size} pixel patches"
            )
        self.image_size = image_size
        self.text_encoder = text_encoder or HashTextEncoder(
            TextEncoderConfig(dim=cfg.joint_attention_dim, pooled_dim=cfg.pooled_projection_dim)
        )
        self.sampling = sampling or SamplingConfig()

    @property
    def tokens_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens_BTC, pooled_BP = self.text_encoder(prompts)
        return tokens_BTC.to(self.device), pooled_BP.to(self.device)

    def images_to_tokens(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return pack(images_BCHW, self.patch_size)

    def velocity(
        self,
        x_BLD: torch.Tensor,
        sigma_B: torch.Tensor,
        tokens_BTC: torch.Tensor,
        pooled_BP: torch.Tensor,
        transformer: nn.Module | None = None,
    ) -> torch.Tensor:
        """One FLUX forward: the velocity at noise level σ (an x-predicting model's output is converted)."""
        n = self.tokens_per_side
        img_ids_L3, txt_ids_T3 = image_ids(n, n, x_BLD.device), text_ids(tokens_BTC.shape[1], x_BLD.device)
        model = transformer or self.transformer
        return flux_velocity(
            model, x_BLD, sigma_B, tokens_BTC, pooled_BP, img_ids_L3, txt_ids_T3, self.sampling.guidance
        )

    @torch.no_grad()
    def __call__(self, prompts: list[str], seeds: list[int], transformer: nn.Module | None = None) -> np.ndarray:
        """Images (B, H, W, 3) uint8, noise fixed by the per-sample seeds."""
        x_BLD = self.sample_tokens(prompts, seeds, transformer)
        images = unpack(x_BLD.float(), self.patch_size, self.image_size, self.image_size)
        return to_uint8(images).numpy()

    @torch.no_grad()
    def sample_tokens(
        self,
        prompts: list[str],
        seeds: list[int],
        transformer: nn.Module | None = None,
        batch_cfg: bool | None = None,
    ) -> torch.Tensor:
        """The sampled pixel tokens (B, L, D) before quantisation. Both guidance branches run as one batch of 2·B
        (``batch_cfg``; default: whenever the model treats samples independently, see ``samples_independent``);
        the MoE layers' load statistics are off while sampling."""
        s = self.sampling
        noise_BLD = fixed_noise((self.tokens_per_side**2, 3 * self.patch_size**2), seeds, self.device)
        cond = self.encode_prompts(prompts)
        uncond = self.encode_prompts([""] * len(prompts))
        both = tuple(torch.cat(pair) for pair in zip(cond, uncond))

        def velocity(x_BLD, sigma_B, conditional):
            tokens, pooled = both if conditional is None else cond if conditional else uncond
            return self.velocity(x_BLD, sigma_B, tokens, pooled, transformer)

        model = transformer or self.transformer
        with scheduled(model, *s.schedules_for(model)) as apply, load_tracking(model, False):
            x_BLD = ode_sample(
                velocity,
                noise_BLD,
                s.steps,
                s.cfg_scale,
                s.shift_for(model),
                before_step=apply,
                batch_cfg=samples_independent(model) if batch_cfg is None else batch_cfg,
            )
        return x_BLD
