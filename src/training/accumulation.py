"""Gradient accumulation for the distillation stages: one optimizer step = A micro-batches of ``batch_size``.

The data stream is asked for the step's whole per-device batch (A·b) and ``MicroBatches`` hands it to Lightning in
A slices, so the samples of a step do not depend on A: rank r's micro-batch m holds rows (r·A + m)·b … of the
global batch of R·A·b, the same layout ``DistillStage.losses`` uses for the step's noise and noise levels (drawn
from the (seed, step) generator for the whole global batch, then sliced). With a loss that is a mean over samples,
A micro-batches of b equal one batch of A·b (tests/test_accumulation.py).

What is a statistic of the micro-batch rather than of the step: the feature-loss weights w_l (normalisers from the
teacher's features) and the expert loads f_i of the "aux" balance loss, as in Megatron-style trainers; the
aux-loss-free bias is updated once per optimizer step from the loads of all its micro-batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

UNSUPPORTED_KINDS = {
    "mob_kd": "MoB skips blocks per sample, so the blocks a rank uses differ between micro-batches, and DDP "
    "(find_unused_parameters, gradients synced on the last micro-batch only) has dropped the gradients of "
    "parameters used only in earlier ones (pytorch/pytorch#69031)",
}
"""Stage kinds that refuse ``accumulate_grad_batches`` > 1, with the reason."""


def check_accumulation(value: Any, kind: str) -> None:
    """ValueError naming ``accumulate_grad_batches`` for a bad value or a stage kind that cannot use it."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"accumulate_grad_batches={value!r}: must be an integer >= 1")
    if value > 1 and kind in UNSUPPORTED_KINDS:
        allowed = sorted({"shared_kd", "moe_kd", "mob_kd", "dense_kd"} - set(UNSUPPORTED_KINDS))
        raise ValueError(
            f"accumulate_grad_batches={value} with kind={kind!r}: {UNSUPPORTED_KINDS[kind]}; "
            f"allowed: 1 for {kind}, any value for {', '.join(allowed)}"
        )


def split_batch(batch: dict[str, Any], parts: int, index: int) -> dict[str, Any]:
    """Micro-batch ``index`` of ``parts`` of a batch dict: tensors and lists with the batch's leading size are
    sliced, anything else (the stream's batch index) is kept."""
    sizes = {n for n in map(_rows, batch.values()) if n}
    if not sizes:
        raise ValueError("a batch without tensors or lists cannot be split into micro-batches")
    total = max(sizes)
    if total % parts:
        raise ValueError(f"a batch of {total} samples does not split into {parts} micro-batches")
    size = total // parts
    rows = slice(index * size, (index + 1) * size)
    return {k: v[rows] if _rows(v) == total else v for k, v in batch.items()}


def _rows(value: Any) -> int | None:
    if isinstance(value, torch.Tensor):
        return value.shape[0] if value.dim() else None
    return len(value) if isinstance(value, list | tuple) else None


class MicroBatches:
    """An iterable over ``loader``'s batches, each handed out as ``parts`` consecutive micro-batches.

    ``state_dict``/``load_state_dict`` are the wrapped loader's (litdata's resumable loader): checkpoints are
    written after an optimizer step, when every micro-batch of the current batch has been handed out.
    """

    def __init__(self, loader: Iterable, parts: int) -> None:
        self.loader, self.parts = loader, parts

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            for i in range(self.parts):
                yield split_batch(batch, self.parts, i)

    def __getattr__(self, name: str) -> Any:
        if name in ("state_dict", "load_state_dict") and hasattr(self.loader, name):
            return getattr(self.loader, name)
        raise AttributeError(name)


def accumulate_datamodule(data: Any, parts: int) -> Any:
    """``data`` whose training loader yields micro-batches (``data``'s own batch size must be parts × b)."""
    if parts == 1:
        return data
    make = data.train_dataloader
    data.train_dataloader = lambda: MicroBatches(make(), parts)
    return data
