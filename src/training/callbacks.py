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


class StageProgressBar(RichProgressBar):
    """Rich progress bar whose description names the stage (step, losses and ETA are Lightning's)."""

    def __init__(self, description: str) -> None:
        super().__init__()
        self.description = description

    def _get_train_description(self, current_epoch: int) -> str:
        return self.description


class ExpertLoadCallback(Callback):
    """Per-layer expert load and router entropy during training; tokens per expert by timestep bucket.

    At the end of the stage: a load heatmap (layers × experts, share of each layer's assignments) and a
    timestep-bucket heatmap (σ buckets × experts, summed over layers) as MLflow images.
    """

    def __init__(self) -> None:
        # metrics go through LightningModule.log, which writes at the Trainer's log_every_n_steps
        self._hooks: list = []
        self.load_LE: torch.Tensor | None = None
        self.bucket_UE: torch.Tensor | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        layers = moe_layers(pl_module.student)
        routed = [layer for layer in layers if layer.num_experts]
        if not routed:
            return
        e = routed[0].num_experts
        self.load_LE = torch.zeros(len(routed), e, dtype=torch.float64)
        self.bucket_UE = torch.zeros(TIMESTEP_BUCKETS, e, dtype=torch.float64)
        self._layers = routed
        for layer in routed:
            self._hooks.append(layer.register_forward_hook(self._bucket_hook(pl_module, layer)))

    def _bucket_hook(self, pl_module, layer):
        def count(module, args, output):
            sigma_B = getattr(pl_module, "last_sigma_B", None)
            if sigma_B is None or not pl_module.training or layer.top_k == 0:
                return
            x = args[0]
            if x.dim() != 3 or x.shape[0] != sigma_B.shape[0]:
                return  # a MoB sub-batch: which samples it holds is not known here
            with torch.no_grad():  # the router again on the layer's input: cheap (E × D per token)
                topk_TK = layer.route(x.detach().reshape(-1, layer.dim))[3]
            per_sample = topk_TK.shape[0] // sigma_B.shape[0]
            bucket_T = (sigma_B.detach().cpu() * TIMESTEP_BUCKETS).long().clamp(max=TIMESTEP_BUCKETS - 1)
            bucket_T = bucket_T.repeat_interleave(per_sample)
            flat = (bucket_T[:, None] * layer.num_experts + topk_TK.cpu()).flatten()
            self.bucket_UE += torch.bincount(flat, minlength=self.bucket_UE.numel()).view_as(self.bucket_UE)

        return count

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.load_LE is None:
            return
        for i, layer in enumerate(self._layers):
            self.load_LE[i] += layer.last_counts.detach().cpu().double()
        stats = [layer.load_stats() for layer in self._layers]
        if not stats or not stats[0]:
            return
        metrics = {
            "experts/max_over_mean_load": float(np.mean([s["max_over_mean_load"].item() for s in stats])),
            "experts/router_entropy": float(np.mean([s["router_entropy"].item() for s in stats])),
        }
        for i, s in enumerate(stats):
            metrics[f"experts/layer{i:02d}/max_over_mean_load"] = s["max_over_mean_load"].item()
            metrics[f"experts/layer{i:02d}/router_entropy"] = s["router_entropy"].item()
        pl_module.log_dict(metrics)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self.load_LE is None or self.load_LE.sum() == 0 or not hasattr(trainer.logger, "log_figure"):
            return
        share_LE = self.load_LE / self.load_LE.sum(1, keepdim=True).clamp_min(1)
        share_UE = self.bucket_UE / self.bucket_UE.sum(1, keepdim=True).clamp_min(1)
        trainer.logger.log_figure(load_heatmap(share_LE.numpy(), "MoE layer"), "experts/load_heatmap.png")
        trainer.logger.log_figure(
            load_heatmap(
                share_UE.numpy(), "noise level σ bucket", [f"{i / 4:.2f}–{(i + 1) / 4:.2f}" for i in range(4)]
            ),
            "experts/timestep_buckets.png",
        )


def load_heatmap(share: np.ndarray, ylabel: str, yticks: list[str] | None = None):
    """Heatmap of assignment shares (rows sum to 1); uniform routing is 1/E everywhere."""
    import matplotlib

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
