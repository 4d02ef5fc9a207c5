"""Rectified flow for FLUX-architecture transformers: token packing, timestep sampling, the Euler sampler.

Conventions follow FLUX in diffusers: x_t = (1 − σ)·x_0 + σ·ε with σ ∈ [0, 1] (σ = 1 is pure noise), the model
predicts the velocity v = ε − x_0 and receives σ as ``timestep`` (it multiplies by 1000 itself). Images (or VAE
latents) are packed into tokens by p×p patches: FLUX packs 16-channel latents 2×2 into 64 channels; the shapes
world packs 3-channel pixels 4×4 into 48 channels. ``img_ids`` carry (0, row, col) for FLUX's 2D RoPE, ``txt_ids``
are zeros.

Legend: B batch, C channels, H/W height/width, L image tokens, D packed token width, S sampling steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
PREDICTION_TYPES = ("velocity", "sample")
SAMPLE_PREDICTION_MIN_SIGMA = 0.05
"""x-prediction turns into velocity as (x_t − x̂_0)/σ; σ is clamped here as JiT does (Li & He, 2025)."""


def prediction_type(model: torch.nn.Module) -> str:
    """What the transformer outputs: "velocity" (ε − x_0, FLUX) or "sample" (x̂_0, JiT-style x-prediction).

    Read from the registered config key ``prediction_type`` (absent = "velocity", as for every FLUX checkpoint).
    """
    config = getattr(model, "config", None)
    kind = config.get("prediction_type", "velocity") if config is not None else "velocity"
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"model config prediction_type={kind!r}: must be one of {PREDICTION_TYPES}")
    return kind


def sampling_shift(model: torch.nn.Module) -> float | None:
    """The timestep shift the model was trained to be sampled with (config key ``sampling_shift``), or None.

    Diffusers keeps this in a pipeline's scheduler config; a bare transformer folder carries it in its own config so
    the shapes sampler, the distillation evaluation and ``evaluate`` use the schedule the teacher was trained for.
    """
    config = getattr(model, "config", None)
    shift = config.get("sampling_shift") if config is not None else None
    if shift is not None and (not isinstance(shift, (int, float)) or shift <= 0):
        raise ValueError(f"model config sampling_shift={shift!r}: must be a positive number")
    return None if shift is None else float(shift)


def to_velocity(out_BLD: torch.Tensor, x_BLD: torch.Tensor, sigma_B: torch.Tensor, kind: str) -> torch.Tensor:
    """The velocity ε − x_0 implied by a model output of prediction type `kind` at noisy input x_t, level σ."""
    if kind == "velocity":
        return out_BLD
    sigma = sigma_B.clamp(min=SAMPLE_PREDICTION_MIN_SIGMA).to(out_BLD.dtype)[:, None, None]
    return (x_BLD.to(out_BLD.dtype) - out_BLD) / sigma


def pack(x_BCHW: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) → (B, (H/p)(W/p), C·p·p), row-major over patches (FLUX's ``_pack_latents`` order)."""
    b, c, h, w = x_BCHW.shape
    x = x_BCHW.view(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack(x_BLD: torch.Tensor, patch: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack`: (B, L, C·p·p) → (B, C, H, W)."""
    b, _, d = x_BLD.shape
    c = d // (patch * patch)
    x = x_BLD.view(b, height // patch, width // patch, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(height_tokens: int, width_tokens: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(L, 3) position ids (0, row, col) for FLUX's rotary embedding."""
    ids = torch.zeros(height_tokens, width_tokens, 3)
    ids[..., 1] = torch.arange(height_tokens)[:, None]
    ids[..., 2] = torch.arange(width_tokens)[None, :]
    return ids.reshape(-1, 3).to(device)


def text_ids(num_tokens: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.zeros(num_tokens, 3, device=device)


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """FLUX/SD3 timestep shift: σ' = s·σ / (1 + (s − 1)·σ); s > 1 spends more time at high noise."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigmas(
    batch: int, sampling: str, shift: float = 1.0, generator: torch.Generator | None = None, device="cpu"
) -> torch.Tensor:
    """Training noise levels σ (B,): "uniform" on [0, 1] or "logit_normal" (SD3: σ = sigmoid(N(0, 1))), then shifted."""
    if sampling == "uniform":
        sigma = torch.rand(batch, generator=generator)
    elif sampling == "logit_normal":
        sigma = torch.sigmoid(torch.randn(batch, generator=generator))
    else:
        raise ValueError(f"timestep_sampling={sampling!r}: allowed {TIMESTEP_SAMPLINGS}")
    return shift_sigmas(sigma, shift).to(device)


def sampling_schedule(steps: int, shift: float = 1.0) -> torch.Tensor:
    """S + 1 noise levels from 1 to 0 for the Euler sampler (linear in σ, then shifted)."""
    return shift_sigmas(torch.linspace(1.0, 0.0, steps + 1), shift)


VelocityFn = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]


@torch.no_grad()
def euler_sample(
    velocity: VelocityFn,
    noise_BLD: torch.Tensor,
    steps: int,
    cfg_scale: float = 1.0,
    shift: float = 1.0,
    progress: Callable[[int], None] | None = None,
    before_step: Callable[[float], None] | None = None,
    batch_cfg: bool = False,
) -> torch.Tensor:
    """Integrate dx/dσ = v from σ = 1 to 0 with classifier-free guidance.

    ``velocity(x, sigma_B, conditional)`` returns the model's prediction with (True) or without (False) the prompt;
    with ``cfg_scale`` == 1 only the conditional branch runs. With ``batch_cfg`` both branches run as one call,
    ``velocity(cat[x, x], sigma_2B, None)``, whose first half is conditional and second half unconditional (half the
    model calls, twice the rows per matmul: the same result for any model that treats samples independently).
    ``before_step(σ)`` runs on the host before each step's model calls (a compute schedule sets top-k / MoB κ there,
    src/models/compute_schedule.py).
    """
    sigmas = sampling_schedule(steps, shift).tolist()
    x = noise_BLD
    for i in range(steps):
        if before_step is not None:
            before_step(sigmas[i])
        sigma_B = torch.full((x.shape[0],), sigmas[i], device=x.device, dtype=x.dtype)
        if cfg_scale != 1.0 and batch_cfg:
            v, v_uncond = velocity(torch.cat([x, x]), torch.cat([sigma_B, sigma_B]), None).chunk(2)
            v = v_uncond + cfg_scale * (v - v_uncond)
        elif cfg_scale != 1.0:
            v = velocity(x, sigma_B, True)
            v_uncond = velocity(x, sigma_B, False)
            v = v_uncond + cfg_scale * (v - v_uncond)
        else:
            v = velocity(x, sigma_B, True)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
        if progress is not None:
            progress(i)
    return x


def fixed_noise(shape: tuple[int, ...], seeds: list[int], device="cpu") -> torch.Tensor:
    """Per-sample noise from per-sample seeds, so teacher and student (or two runs) share noise exactly."""
    out = torch.empty((len(seeds), *shape))
    for i, seed in enumerate(seeds):
        out[i] = torch.randn(shape, generator=torch.Generator().manual_seed(int(seed) % (2**63)))
    return out.to(device)


def to_uint8(images_BCHW: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images → uint8 (B, H, W, C)."""
    return ((images_BCHW.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


__all__ = [
    "pack",
    "unpack",
    "image_ids",
    "text_ids",
    "shift_sigmas",
    "sample_sigmas",
    "sampling_schedule",
    "euler_sample",
    "fixed_noise",
    "to_uint8",
]
