"""The training precision policy (docs/scale.md, "Precision"): what dtype each tensor of a stage lives in.

- Trained student parameters, their gradients and the AdamW moments: fp32, always. Pure-bf16 AdamW loses the
  small updates (a bf16 weight near 1 cannot move by less than 2^-8 of itself).
- Frozen student parameters (the attention and embedders in every stage, the shared experts in stage 2, the
  blocks outside MoB groups in stage 3): the stage's compute dtype, bf16 under "bf16-mixed", fp32 under
  "32-true". Under FSDP they stay fp32: FSDP flattens a unit (one block, trained and frozen parameters together)
  into one tensor of one dtype, and its ``mixed_precision`` casts the gathered block for compute anyway.
- The teacher: ``teacher.dtype`` (bf16 for FLUX.1-dev); it is frozen and never cast by a stage.
- Buffers (the MoE selection bias) stay fp32 (``MoEFeedForward._apply``).
- Compute: "bf16-mixed" runs the forward under bf16 autocast; routers compute their logits in fp32 either way.

Reloads name their dtype: a stage's ``student/`` folder is read back in fp32 (``STUDENT_LOAD_DTYPE``) and then
cast by this policy, so nothing depends on the dtypes a previous stage happened to save.
"""

from __future__ import annotations

import torch
from torch import nn

PRECISIONS = {"32-true": torch.float32, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
"""Lightning precision → compute dtype of the frozen parts. "bf16-true"/"16-true" would train half-precision
parameters and are refused; "64-true" and the short aliases are not used here."""

STUDENT_LOAD_DTYPE = torch.float32
"""The dtype every student reload asks for (then cast by ``apply_precision``)."""


def check_precision(value: str) -> None:
    """ValueError naming ``precision``, the value and the allowed ones."""
    if value in ("bf16-true", "16-true", "bf16", "16"):
        raise ValueError(
            f"precision={value!r}: trained parameters stay fp32 (docs/scale.md, Precision); "
            f"allowed: {', '.join(PRECISIONS)}"
        )
    if value not in PRECISIONS:
        raise ValueError(
            f"precision={value!r}: not a precision this project trains with; allowed: {', '.join(PRECISIONS)}"
        )


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype frozen student parameters are kept in under ``precision``."""
    check_precision(precision)
    return PRECISIONS[precision]


@torch.no_grad()
def apply_precision(model: nn.Module, trained: list[nn.Parameter], precision: str, fsdp: bool = False) -> None:
    """Cast ``model``'s parameters in place: ``trained`` to fp32, the others to the compute dtype (fp32 under FSDP).

    One parameter at a time, so the peak is the model plus one parameter; ``requires_grad`` is kept.
    """
    frozen_dtype = torch.float32 if fsdp else compute_dtype(precision)
    ids = {id(p) for p in trained}
    for p in model.parameters():
        want = torch.float32 if id(p) in ids else frozen_dtype
        if p.dtype != want and p.is_floating_point():
            p.data = p.data.to(want)


def dtype_report(model: nn.Module) -> dict[str, set[torch.dtype]]:
    """{"trained": dtypes of parameters with requires_grad, "frozen": of the others}."""
    report: dict[str, set[torch.dtype]] = {"trained": set(), "frozen": set()}
    for p in model.parameters():
        report["trained" if p.requires_grad else "frozen"].add(p.dtype)
    return report
