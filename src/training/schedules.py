"""Learning-rate schedules: linear warm-up, then constant or cosine decay to a tenth of the peak.

One schedule for the teacher (`TeacherModule`), the distillation stages (`DistillStage`) and the DiT
(`DiTModule`), built from torch's own schedulers; `lr_factor` is its closed form (the multiplier of the peak rate
at an optimizer step).
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any

import torch
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, SequentialLR

LR_DECAYS = ("none", "cosine")
"""What follows the warm-up: "none" keeps the peak rate, "cosine" anneals it to a tenth of the peak."""

FINAL_FACTOR = 0.1
"""The cosine decay ends at this fraction of the peak rate and stays there."""


def lr_factor(step: int, warmup: int, decay: str, total: int) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then constant or cosine down to 0.1 at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "none" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    return FINAL_FACTOR + (1 - FINAL_FACTOR) * 0.5 * (1 + math.cos(math.pi * progress))


class WarmupSchedule(SequentialLR):
    """`SequentialLR` that also resumes from the `LambdaLR` state in checkpoints written before it existed."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "lr_lambdas" not in state_dict:
            super().load_state_dict(state_dict)
            return
        # A LambdaLR state holds only its step count: replay the steps (the restored optimizer already has the
        # learning rate of that step; the schedulers' own step-order warnings do not apply to a replay).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            while self.last_epoch < state_dict["last_epoch"]:
                self.step()


def warmup_schedule(
    optimizer: torch.optim.Optimizer, warmup: int, decay: str = "none", total: int = 0
) -> WarmupSchedule:
    """The scheduler whose rate at optimizer step s is peak·`lr_factor(s, max(1, warmup), decay, total)`.

    `LinearLR` from peak/warmup to the peak over the first `warmup` steps; then, for `decay="cosine"` and
    `total > warmup`, `CosineAnnealingLR` to a tenth of the peak at step `total` and `ConstantLR` at that tenth
    after it; otherwise the peak from then on. Step it once per optimizer step (Lightning's ``interval: "step"``).
    """
    if decay not in LR_DECAYS:
        raise ValueError(f"lr_decay={decay!r}: allowed {LR_DECAYS}")
    warmup = max(1, warmup)
    peaks = {group["lr"] for group in optimizer.param_groups}
    # today's step s of the warm-up has (s+1)/warmup: LinearLR from 1/warmup reaching 1 at step warmup-1
    schedulers: list[torch.optim.lr_scheduler.LRScheduler] = [
        LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1)
    ]
    milestones: list[int] = []
    if decay == "cosine" and total > warmup:
        if len(peaks) != 1:
            raise ValueError(f"a cosine decay needs one peak learning rate for all parameter groups, got {peaks}")
        schedulers.append(CosineAnnealingLR(optimizer, T_max=total - warmup, eta_min=FINAL_FACTOR * peaks.pop()))
        schedulers.append(ConstantLR(optimizer, factor=FINAL_FACTOR, total_iters=sys.maxsize))
        milestones = [warmup, total]
    return WarmupSchedule(optimizer, schedulers, milestones)


__all__ = ["LR_DECAYS", "FINAL_FACTOR", "lr_factor", "WarmupSchedule", "warmup_schedule"]
