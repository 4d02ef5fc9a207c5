"""Callbacks: side effects only (expert analytics, progress display); they never change the loss.

Legend: L MoE layers, E experts, U timestep buckets.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar

from src.models.moe import moe_layers

TIMESTEP_BUCKETS = 4


def is_logging_step(trainer: L.Trainer, batch_idx: int) -> bool:
    """At a batch end: whether an optimizer step just finished that Lightning logs (or the last one)."""
    if (batch_idx + 1) % trainer.accumulate_grad_batches:
        return False
    step = trainer.global_step
    return (trainer.log_every_n_steps > 0 and step % trainer.log_every_n_steps == 0) or step == trainer.max_steps


class StageProgressBar(RichProgressBar):
    """Rich progress bar whose description names the stage (step, losses and ETA are Lightning's)."""

    def __init__(self, description: str) -> None:
        super().__init__()
        self.description = description

    def _get_train_description(self, current_epoch: int) -> str:
        return self.description

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        """The stage's loss as of its last logging step (a host float), without Lightning's ``v_num``."""
        metrics = {k: v for k, v in super().get_metrics(trainer, pl_module).items() if k != "v_num"}
        shown = getattr(pl_module, "shown_loss", None)
        return metrics | ({"loss": f"{shown:.4g}"} if shown is not None else {})


class ExpertLoadCallback(Callback):
    """Per-layer expert load and router entropy during training; tokens per expert by timestep bucket.

    Everything accumulates on the device (no host sync in a training step): the per-layer loads after every
    batch, the timestep buckets from each layer's recorded choices (``last_topk_idx_TK``, or with expert choice
    ``last_token_idx_EM``; no second routing). Expert-choice layers also log the share of tokens no expert took.
    The metrics come to the host once per logging step (one transfer), the heatmaps at the end of the stage: a
    load heatmap (layers × experts, share of each layer's assignments) and a timestep-bucket heatmap (σ buckets ×
    experts, summed over layers) as MLflow images.
    """

    def __init__(self) -> None:
        self._hooks: list = []
        self._layers: list = []
        self.load_LE: torch.Tensor | None = None
        self.bucket_UE: torch.Tensor | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        routed = [layer for layer in moe_layers(pl_module.student) if layer.num_experts]
        if not routed:
            return
        e, device = routed[0].num_experts, routed[0].expert_bias.device
        self.load_LE = torch.zeros(len(routed), e, dtype=torch.long, device=device)
        self.bucket_UE = torch.zeros(TIMESTEP_BUCKETS, e, dtype=torch.long, device=device)
        self._layers = routed
        for layer in routed:
            self._hooks.append(layer.register_forward_hook(self._bucket_hook(pl_module, layer)))

    def _bucket_hook(self, pl_module, layer):
        def count(module, args, output):
            sigma_B = getattr(pl_module, "last_sigma_B", None)
            topk_TK, token_EM = layer.last_topk_idx_TK, layer.last_token_idx_EM
            if sigma_B is None or not pl_module.training or layer.top_k == 0 or (topk_TK is None and token_EM is None):
                return
            x = args[0]
            if x.dim() != 3 or x.shape[0] != sigma_B.shape[0]:
                return  # a MoB sub-batch: which samples it holds is not known here
            bucket_B = (sigma_B.detach() * TIMESTEP_BUCKETS).long().clamp(0, TIMESTEP_BUCKETS - 1)
            bucket_T = bucket_B.to(layer.expert_bias.device).repeat_interleave(x.shape[1])
            if topk_TK is not None:
                flat = (bucket_T[:, None] * layer.num_experts + topk_TK).flatten()
            else:  # expert choice: expert e took the tokens token_EM[e]
                expert_E1 = torch.arange(layer.num_experts, device=token_EM.device).unsqueeze(1)
                flat = bucket_T.index_select(0, token_EM.flatten()).view_as(token_EM) * layer.num_experts + expert_E1
                flat = flat.flatten()
            # integer scatter-add: exact and order-independent (bincount would sync for its output size)
            self.bucket_UE.view(-1).scatter_add_(0, flat, torch.ones_like(flat))

        return count

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.load_LE is None:
            return
        self.load_LE += torch.stack([layer.last_counts for layer in self._layers]).to(self.load_LE)
        if not is_logging_step(trainer, batch_idx):
            return
        stats = [layer.load_stats() for layer in self._layers]
        names = ["max_over_mean_load", "router_entropy"]
        if all("dropped_share" in s for s in stats):
            names.append("dropped_share")
        values_NL = torch.stack([torch.stack([s[name].float() for s in stats]) for name in names])
        rows = values_NL.tolist()  # the one device → host transfer, at a logging step
        metrics = {f"experts/{name}": float(np.mean(row)) for name, row in zip(names, rows)}
        for name, row in zip(names, rows):
            for i, value in enumerate(row):
                metrics[f"experts/layer{i:02d}/{name}"] = value
        pl_module.log_dict(metrics)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self.load_LE is None or not hasattr(trainer.logger, "log_figure"):
            return
        load_LE, bucket_UE = self.load_LE.double().cpu(), self.bucket_UE.double().cpu()
        if load_LE.sum() == 0:
            return
        share_LE = load_LE / load_LE.sum(1, keepdim=True).clamp_min(1)
        share_UE = bucket_UE / bucket_UE.sum(1, keepdim=True).clamp_min(1)
        trainer.logger.log_figure(load_heatmap(share_LE.numpy(), "MoE layer"), "experts/load_heatmap.png")
        trainer.logger.log_figure(
            load_heatmap(
                share_UE.numpy(), "noise level σ bucket", [f"{i / 4:.2f}–{(i + 1) / 4:.2f}" for i in range(4)]
            ),
            "experts/timestep_buckets.png",
        )


def load_heatmap(share: np.ndarray, ylabel: str, yticks: list[str] | None = None):
    """Heatmap of assignment shares (rows sum to 1); uniform routing is 1/E everywhere."""
    import matplotlib  # heavy: only the heatmap needs it (and its backend is set before pyplot loads)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, experts = share.shape
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * experts, 1.0 + 0.3 * rows))
    im = ax.imshow(share, cmap="viridis", vmin=0, vmax=max(2.0 / experts, float(share.max())), aspect="auto")
    ax.set_xlabel("expert")
    ax.set_ylabel(ylabel)
    ax.set_xticks(range(experts))
    if yticks:
        ax.set_yticks(range(rows), yticks)
    ax.set_title(f"share of routed tokens (uniform = {1 / experts:.3f})")
    fig.colorbar(im, ax=ax)
    return fig
