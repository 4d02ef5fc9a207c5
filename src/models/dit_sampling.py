"""Rectified flow for the class-conditional DiT: timesteps, x-/v-prediction, Euler and Heun samplers with CFG.

Convention of the DSMoE/JiT recipe (arXiv 2512.01252), the reverse of FLUX's σ: t ∈ [0, 1] with t = 0 pure
noise and t = 1 data, z_t = t·x + (1 − t)·ε, velocity v = dz/dt = x − ε. A "v" network predicts v directly
(DSMoE); an "x" network predicts the clean image and v = (x̂ − z_t)/(1 − t), with 1 − t clamped at t_eps
(JiT). Both recipes put the loss on v.

Legend: B batch, C channels, H/W height/width, S sampling steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

METHODS = ("euler", "heun")
TIMESTEP_DISTRIBUTIONS = ("uniform", "logit_normal")

ModelFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def sample_timesteps(
    batch: int,
    distribution: str,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Training t (B,): "uniform" on [0, 1] (DSMoE) or "logit_normal" sigmoid(N(mean, std)) (JiT: −0.8, 0.8)."""
    if distribution == "uniform":
        t_B = torch.rand(batch, generator=generator)
    elif distribution == "logit_normal":
        t_B = torch.sigmoid(mean + std * torch.randn(batch, generator=generator))
    else:
        raise ValueError(f"timestep distribution={distribution!r}: allowed {', '.join(TIMESTEP_DISTRIBUTIONS)}")
    return t_B.to(device)


def interpolate(x_BCHW: Tensor, noise_BCHW: Tensor, t_B: Tensor) -> Tensor:
    """z_t = t·x + (1 − t)·ε."""
    t = t_B.view(-1, 1, 1, 1).to(x_BCHW.dtype)
    return t * x_BCHW + (1 - t) * noise_BCHW


def to_velocity(out_BCHW: Tensor, z_BCHW: Tensor, t_B: Tensor, prediction: str, t_eps: float = 0.05) -> Tensor:
    """The network output as a velocity: as is for "v"; (x̂ − z_t)/max(1 − t, t_eps) for "x" (JiT)."""
    if prediction == "v":
        return out_BCHW
    if prediction != "x":
        raise ValueError(f"prediction={prediction!r}: allowed v, x")
    one_minus_t = (1 - t_B).clamp_min(t_eps).view(-1, 1, 1, 1).to(out_BCHW.dtype)
    return (out_BCHW - z_BCHW) / one_minus_t


@dataclass
class SamplerConfig:
    """How images are generated: ODE integrator, steps and classifier-free guidance."""

    method: str = "euler"
    """"euler" (DSMoE: 250 steps) or "heun" (JiT: 50 steps; the last step is Euler, where x-prediction's
    1/(1 − t) would divide by t_eps)."""
    steps: int = 50
    """Integration steps S on a uniform t grid from 0 to 1."""
    cfg_scale: float = 1.0
    """Guidance s: v = v_uncond + s·(v_cond − v_uncond); 1 = no guidance (one model call per evaluation)."""
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    """Guidance only while lo <= t <= hi, conditional velocity elsewhere (JiT: (0.1, 1.0))."""
    t_eps: float = 0.05
    """Floor on 1 − t when turning an x-prediction into a velocity (JiT)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: allowed values are {', '.join(METHODS)}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps={self.steps!r}: must be a positive integer")
        if not self.cfg_scale >= 0:
            raise ValueError(f"cfg_scale={self.cfg_scale!r}: must be >= 0")
        lo, hi = self.cfg_interval
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"cfg_interval={self.cfg_interval!r}: must satisfy 0 <= lo <= hi <= 1")
        if not 0 < self.t_eps < 1:
            raise ValueError(f"t_eps={self.t_eps!r}: must be in (0, 1)")

    def guided(self, t: float) -> bool:
        """Whether guidance applies at time t."""
        lo, hi = self.cfg_interval
        return self.cfg_scale != 1.0 and lo <= t <= hi


def guided_velocity(
    model: ModelFn, z_BCHW: Tensor, t: float, labels_B: Tensor, null_class: int, prediction: str, cfg: SamplerConfig
) -> Tensor:
    """v at time t, with classifier-free guidance when ``cfg.guided(t)`` (conditional and null batched)."""
    b = z_BCHW.shape[0]
    if cfg.guided(t):
        z_2B = torch.cat([z_BCHW, z_BCHW])
        t_2B = torch.full((2 * b,), t, device=z_BCHW.device, dtype=z_BCHW.dtype)
        y_2B = torch.cat([labels_B, torch.full_like(labels_B, null_class)])
        v_cond, v_uncond = to_velocity(model(z_2B, t_2B, y_2B), z_2B, t_2B, prediction, cfg.t_eps).chunk(2)
        return v_uncond + cfg.cfg_scale * (v_cond - v_uncond)
    t_B = torch.full((b,), t, device=z_BCHW.device, dtype=z_BCHW.dtype)
    return to_velocity(model(z_BCHW, t_B, labels_B), z_BCHW, t_B, prediction, cfg.t_eps)


@torch.no_grad()
def sample(
    model: ModelFn,
    noise_BCHW: Tensor,
    labels_B: Tensor,
    null_class: int,
    prediction: str,
    cfg: SamplerConfig,
) -> Tensor:
    """Integrate dz/dt = v from t = 0 (the given noise) to t = 1; returns the generated (B, C, H, W)."""
    ts = torch.linspace(0.0, 1.0, cfg.steps + 1).tolist()
    z = noise_BCHW
    for i in range(cfg.steps):
        t, t_next = ts[i], ts[i + 1]
        v = guided_velocity(model, z, t, labels_B, null_class, prediction, cfg)
        z_euler = z + (t_next - t) * v
        if cfg.method == "euler" or i == cfg.steps - 1:
            z = z_euler
            continue
        v_next = guided_velocity(model, z_euler, t_next, labels_B, null_class, prediction, cfg)
        z = z + (t_next - t) * 0.5 * (v + v_next)
    return z


__all__ = [
    "SamplerConfig",
    "sample_timesteps",
    "interpolate",
    "to_velocity",
    "guided_velocity",
    "sample",
]
