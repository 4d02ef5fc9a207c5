"""Rectified flow, the project's one convention: noise levels, velocities, the Euler/Heun sampler; token packing.

Conventions follow FLUX in diffusers: x_t = (1 − σ)·x_0 + σ·ε with σ ∈ [0, 1] (σ = 1 is pure noise), the model
predicts the velocity v = ε − x_0 and receives σ as ``timestep`` (it multiplies by 1000 itself). The
class-conditional DiT (src/models/dit.py) runs on the same σ, velocities and sampler; only its network reads the
DSMoE/JiT recipe's clean-time t = 1 − σ and predicts x_0 − ε (``dit.network_velocity`` converts). Images (or VAE
latents) are packed into tokens by p×p patches: FLUX packs 16-channel latents 2×2 into 64 channels; the shapes
world packs 3-channel pixels 4×4 into 48 channels. ``img_ids`` carry (0, row, col) for FLUX's 2D RoPE, ``txt_ids``
are zeros.

Legend: B batch, C channels, H/W height/width, L image tokens, D packed token width, S sampling steps. Functions
that only scale per sample (``interpolate``, ``to_velocity``, the sampler) take tensors of any rank with the batch
first: (B, L, D) tokens or (B, C, H, W) images.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
PREDICTION_TYPES = ("velocity", "sample")
SAMPLERS = ("euler", "heun")
SAMPLE_PREDICTION_MIN_SIGMA = 0.05
"""x-prediction turns into velocity as (x_t − x̂_0)/σ; σ is clamped here as JiT does (Li & He, 2025)."""
INTERVAL_TOLERANCE = 1e-6
"""A σ within this of a guidance interval's end counts as inside: the sampler's σ grid is float32 (k/S for S = 50
is off by up to 6e-8), and the interval is closed."""


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


def per_sample(sigma_B: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """σ (B,) shaped (B, 1, …, 1) to broadcast over a batch-first tensor of any rank, in its dtype."""
    return sigma_B.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def interpolate(x0: torch.Tensor, noise: torch.Tensor, sigma_B: torch.Tensor) -> torch.Tensor:
    """The noisy input x_σ = (1 − σ)·x_0 + σ·ε (per sample σ, any rank with the batch first; σ keeps its dtype, so a
    float32 σ on bfloat16 data gives a float32 x_σ, as writing the formula out does)."""
    s = sigma_B.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise


def to_velocity(
    out: torch.Tensor,
    x_t: torch.Tensor,
    sigma_B: torch.Tensor,
    kind: str,
    min_sigma: float = SAMPLE_PREDICTION_MIN_SIGMA,
) -> torch.Tensor:
    """The velocity ε − x_0 implied by a model output of prediction type `kind` at noisy input x_t, level σ.

    "velocity": the output as is; "sample" (x̂_0): (x_t − x̂_0)/max(σ, min_sigma), JiT's clamp. Any rank with the
    batch first ((B, L, D) tokens, (B, C, H, W) images).
    """
    if kind == "velocity":
        return out
    if kind != "sample":
        raise ValueError(f"prediction kind={kind!r}: allowed {PREDICTION_TYPES}")
    sigma = per_sample(sigma_B.clamp(min=min_sigma), out)
    return (x_t.to(out.dtype) - out) / sigma


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
    batch: int,
    sampling: str,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device="cpu",
    mean: float = 0.0,
    std: float = 1.0,
) -> torch.Tensor:
    """Training noise levels σ (B,): "uniform" on [0, 1] or "logit_normal" σ = sigmoid(N(mean, std)), then shifted.

    SD3/FLUX: logit-normal N(0, 1). JiT samples its clean-time t = 1 − σ as sigmoid(N(−0.8, 0.8)), which is σ =
    sigmoid(N(0.8, 0.8)).
    """
    if sampling == "uniform":
        sigma = torch.rand(batch, generator=generator)
    elif sampling == "logit_normal":
        sigma = torch.sigmoid(mean + std * torch.randn(batch, generator=generator))
    else:
        raise ValueError(f"timestep_sampling={sampling!r}: allowed {TIMESTEP_SAMPLINGS}")
    return shift_sigmas(sigma, shift).to(device)


def sampling_schedule(steps: int, shift: float = 1.0) -> torch.Tensor:
    """S + 1 noise levels from 1 to 0 for the Euler sampler (linear in σ, then shifted)."""
    return shift_sigmas(torch.linspace(1.0, 0.0, steps + 1), shift)


VelocityFn = Callable[[torch.Tensor, torch.Tensor, bool | None], torch.Tensor]


def guided_velocity(
    velocity: VelocityFn,
    x: torch.Tensor,
    sigma: float,
    cfg_scale: float = 1.0,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    batch_cfg: bool = False,
) -> torch.Tensor:
    """The velocity at level σ with classifier-free guidance v_uncond + s·(v_cond − v_uncond).

    Guidance applies when ``cfg_scale`` != 1 and lo <= σ <= hi for ``cfg_interval`` = (lo, hi) (closed, up to
    ``INTERVAL_TOLERANCE``); elsewhere only the conditional branch runs. ``batch_cfg``: both branches as one call
    ``velocity(cat[x, x], sigma_2B, None)`` (first half conditional), else two calls ``velocity(x, sigma_B, True)``
    and ``velocity(x, sigma_B, False)``.
    """
    sigma_B = torch.full((x.shape[0],), sigma, device=x.device, dtype=x.dtype)
    lo, hi = cfg_interval
    if cfg_scale == 1.0 or not lo - INTERVAL_TOLERANCE <= sigma <= hi + INTERVAL_TOLERANCE:
        return velocity(x, sigma_B, True)
    if batch_cfg:
        v, v_uncond = velocity(torch.cat([x, x]), torch.cat([sigma_B, sigma_B]), None).chunk(2)
    else:
        v = velocity(x, sigma_B, True)
        v_uncond = velocity(x, sigma_B, False)
    return v_uncond + cfg_scale * (v - v_uncond)


@torch.no_grad()
def ode_sample(
    velocity: VelocityFn,
    noise: torch.Tensor,
    steps: int,
    cfg_scale: float = 1.0,
    shift: float = 1.0,
    progress: Callable[[int], None] | None = None,
    before_step: Callable[[float], None] | None = None,
    batch_cfg: bool = False,
    method: str = "euler",
    cfg_interval: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """Integrate dx/dσ = v from σ = 1 (``noise``) to 0 on ``sampling_schedule(steps, shift)``; returns x at σ = 0.

    ``velocity(x, sigma_B, conditional)`` returns the model's prediction with (True) or without (False) the prompt
    or class; ``guided_velocity`` combines them (``cfg_scale``, ``cfg_interval`` in σ, ``batch_cfg``: half the
    model calls, twice the rows per matmul, the same result for any model that treats samples independently).
    ``method``: "euler" (FLUX; DSMoE, 250 steps) or "heun" (JiT, 50 steps: the trapezoid of the velocities at σ and
    at the Euler point, two evaluations per step; the last step, to σ = 0, stays Euler, where an x-prediction's
    1/σ would divide by its clamp). ``before_step(σ)`` runs on the host before the model calls at each σ (a
    compute schedule sets top-k / MoB κ there, src/models/compute_schedule.py).
    """
    if method not in SAMPLERS:
        raise ValueError(f"method={method!r}: allowed values are {', '.join(SAMPLERS)}")
    sigmas = sampling_schedule(steps, shift).tolist()
    x = noise
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if before_step is not None:
            before_step(sigma)
        v = guided_velocity(velocity, x, sigma, cfg_scale, cfg_interval, batch_cfg)
        x_euler = x + (sigma_next - sigma) * v
        if method == "euler" or i == steps - 1:
            x = x_euler
        else:
            if before_step is not None:
                before_step(sigma_next)
            v_next = guided_velocity(velocity, x_euler, sigma_next, cfg_scale, cfg_interval, batch_cfg)
            x = x + (sigma_next - sigma) * 0.5 * (v + v_next)
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
    "per_sample",
    "interpolate",
    "to_velocity",
    "shift_sigmas",
    "sample_sigmas",
    "sampling_schedule",
    "guided_velocity",
    "ode_sample",
    "fixed_noise",
    "to_uint8",
]
