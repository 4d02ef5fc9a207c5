"""Train a class-conditional DiT / DSMoE / JiTMoE from scratch with rectified flow (arXiv 2512.01252's recipe).

The training step reads straight through, in flow.py's convention (σ = 1 pure noise, v = ε − x): labels (some
replaced by the null class for classifier-free guidance) → σ and noise → x_σ = (1 − σ)·x + σ·ε → network (which
reads the recipe's t = 1 − σ) → velocity → MSE to ε − x, plus the MoE layers' balance losses → log. Two
objectives: "flow" (DSMoE: the network predicts v, t uniform) and "jit" (JiT: the network predicts x, the loss
stays on v, t logit-normal). After every optimizer step the aux-loss-free layers
move their selection bias toward balance (DeepSeek-V3); the recipe's released code registers that bias but
never updates it. EMA weights come from Lightning's ``EMAWeightAveraging`` callback (it swaps them in for
validation and at the end of fit); per-layer expert load and router entropy from ``ExpertLoadCallback``.

Validation generates ``val_images_per_class`` images of each of the 24 classes from fixed seeds and logs
class accuracy (shapes detector), FID when Inception weights are given, and a grid with one row per class.

Legend: B batch, C channels, H/W height/width.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from evaluation.fid import check_fid_available, class_accuracy, fid_input, fid_metric
from src.models.dit import DiT, SamplerConfig, network_velocity, param_counts, sample
from src.models.dit_presets import dit_config
from src.models.flow import fixed_noise, interpolate, sample_sigmas, to_uint8, to_velocity
from src.models.moe import sync_balance_losses, total_aux_loss, update_expert_biases
from src.training.base import image_grid
from src.training.schedules import warmup_schedule

OBJECTIVES = {"flow": ("v", "uniform"), "jit": ("x", "logit_normal")}
"""objective → (the prediction the network must make, training noise-level distribution)."""


class DiTModule(L.LightningModule):
    """Rectified-flow training of a class-conditional DiT built from a named preset plus overrides."""

    def __init__(
        self,
        preset: str = "dsmoe-s-e48-mini",
        model: dict[str, Any] | None = None,
        objective: str = "flow",
        timestep_mean: float = -0.8,
        timestep_std: float = 0.8,
        noise_scale: float = 1.0,
        label_dropout: float = 0.1,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        sampler: SamplerConfig | None = None,
        fid_weights: str | None = None,
        fid_real_per_class: int = 50,
    ) -> None:
        """
        Args:
            preset: Architecture preset from ``src.models.dit_presets.PRESETS`` (e.g. dsmoe-s-e48-mini).
            model: DiTConfig fields overriding the preset; ``moe`` may be a dict of MoEConfig fields merged into
                the preset's layout, or null for a dense model.
            objective: "flow" (v-prediction, uniform t; DSMoE) or "jit" (x-prediction, v-loss, logit-normal t).
            timestep_mean: Mean of the logit-normal distribution of the clean-time t = 1 − σ ("jit"; JiT uses
                -0.8, i.e. σ = sigmoid(N(0.8, 0.8))).
            timestep_std: Std of that logit-normal distribution ("jit"; JiT uses 0.8).
            noise_scale: ε is drawn with this std (JiT: 1.0 at 256 px).
            label_dropout: Probability of training a sample with the null class (classifier-free guidance).
            lr: AdamW learning rate (recipe: 1e-4 constant for DSMoE, 2e-4 for JiTMoE).
            betas: AdamW betas (recipe: (0.9, 0.999) DSMoE, (0.9, 0.95) JiTMoE).
            weight_decay: AdamW weight decay (recipe: 0).
            warmup_steps: Linear learning-rate warm-up steps, then constant.
            sampler: Sampler for validation images (method, steps, CFG scale and interval).
            fid_weights: Local file of the FID Inception weights; null skips FID (class accuracy still runs).
            fid_real_per_class: Real renders per class for FID's reference statistics.
        """
        super().__init__()
        self.save_hyperparameters()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r}: allowed values are {', '.join(OBJECTIVES)}")
        if not 0 <= label_dropout < 1:
            raise ValueError(f"label_dropout={label_dropout!r}: must be in [0, 1)")
        if not noise_scale > 0 or not timestep_std > 0:
            raise ValueError(f"noise_scale={noise_scale!r}, timestep_std={timestep_std!r}: must be > 0")
        if fid_real_per_class < 2:
            raise ValueError(f"fid_real_per_class={fid_real_per_class!r}: FID needs at least 2 real images")
        cfg = dit_config(preset, **(model or {}))
        prediction, self.timestep_distribution = OBJECTIVES[objective]
        if cfg.prediction != prediction:
            raise ValueError(
                f"objective={objective!r} trains a {prediction!r}-prediction network, but model.prediction="
                f"{cfg.prediction!r}; allowed: objective flow with prediction v, objective jit with prediction x"
            )
        if fid_weights is not None:
            check_fid_available(fid_weights)  # fail before training, not at the first validation
        self.model = DiT(cfg)
        self.sampler = sampler or SamplerConfig()
        # Plain dict: a Metric attribute would become a submodule (checkpointed, copied by the EMA callback).
        self._fid: dict[str, Any] = {}
        self._val_images: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []
        self.last_sigma_B: torch.Tensor | None = None

    @property
    def student(self) -> DiT:
        """The routed network, under the name ``ExpertLoadCallback`` reads."""
        return self.model

    def on_train_start(self) -> None:
        if self.logger is not None:
            counts = {f"params/{k}": v for k, v in param_counts(self.model).items()}
            self.logger.log_hyperparams(counts)
            self.logger.log_metrics(counts, step=0)  # also as metrics: sweeps and `compare` read metrics

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp, cfg = self.hparams, self.model.cfg
        x_BCHW, y_B = batch["image"], batch["label"]
        b = x_BCHW.shape[0]
        drop_B = torch.rand(b, device=self.device) < hp.label_dropout
        y_B = torch.where(drop_B, torch.full_like(y_B, self.model.null_class), y_B)
        # logit(σ) = −logit(t): the t distribution's mean flips sign
        mean, std = -hp.timestep_mean, hp.timestep_std
        sigma_B = sample_sigmas(b, self.timestep_distribution, mean=mean, std=std, device=self.device)
        noise_BCHW = hp.noise_scale * torch.randn_like(x_BCHW)
        z_BCHW = interpolate(x_BCHW, noise_BCHW, sigma_B)
        self.last_sigma_B = sigma_B  # for ExpertLoadCallback's timestep buckets
        v_pred = network_velocity(self.model, z_BCHW, sigma_B, y_B, cfg.prediction, self.sampler.t_eps)
        # JiT's target (z − x)/σ with the same clamp as the prediction; ε − x for v-prediction.
        v_target = (
            to_velocity(x_BCHW, z_BCHW, sigma_B, "sample", self.sampler.t_eps)
            if cfg.prediction == "x"
            else (noise_BCHW - x_BCHW)
        )
        flow_loss = F.mse_loss(v_pred.float(), v_target.float())
        sync_balance_losses(self.model)  # DDP: the balance loss sees the global expert loads (no-op otherwise)
        aux_loss = total_aux_loss(self.model).to(flow_loss.device)
        self.log("train/loss", flow_loss, prog_bar=True)
        self.log("train/aux_loss", aux_loss)
        return flow_loss + aux_loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.update_expert_biases()

    def update_expert_biases(self) -> None:
        """DeepSeek-V3 aux-loss-free step on every "aux_free" layer (``moe.update_expert_biases``)."""
        update_expert_biases(self.model)

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(self.model.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        sched = warmup_schedule(opt, hp.warmup_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- validation: class accuracy, FID, one grid row per class ----------------------------------------

    def generate(self, labels_B: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """uint8 (B, H, W, 3) images of ``labels_B`` from per-image seeds (the current weights, EMA in validation)."""
        cfg = self.model.cfg
        noise = self.hparams.noise_scale * fixed_noise((cfg.in_channels, cfg.image_size, cfg.image_size), seeds)
        x = sample(
            self.model,
            noise.to(self.device),
            labels_B.to(self.device),
            self.model.null_class,
            cfg.prediction,
            self.sampler,
        )
        return to_uint8(x)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images = self.generate(batch["label"], batch["seed"])
        self._val_images.append(images)
        self._val_labels.append(batch["label"].cpu())

    def on_validation_epoch_end(self) -> None:
        images, labels = self._val_images, self._val_labels
        self._val_images, self._val_labels = [], []
        if not images or self.trainer.sanity_checking:
            return
        images_BHW3, labels_B = torch.cat(images), torch.cat(labels)
        scores = class_accuracy(list(images_BHW3.numpy()), labels_B.tolist())
        self.log("val/class_accuracy", scores["accuracy"], prog_bar=True)
        if self.hparams.fid_weights is not None:
            self.log("val/fid", self._compute_fid(images_BHW3))
        if hasattr(self.logger, "log_image"):
            order = torch.argsort(labels_B, stable=True)
            per_class = int(torch.bincount(labels_B).max())
            grid = image_grid(list(images_BHW3[order].numpy()), cols=per_class)
            self.logger.log_image(grid, f"samples/classes_step_{self.global_step:07d}.png")

    def _compute_fid(self, fake_BHW3: torch.Tensor) -> float:
        if "metric" not in self._fid:
            metric = fid_metric(self.hparams.fid_weights)
            real = self.trainer.datamodule.reference_images(self.hparams.fid_real_per_class)
            for chunk in np.array_split(real, max(1, len(real) // 64)):
                metric.update(fid_input(chunk), real=True)
            self._fid["metric"] = metric
        metric = self._fid["metric"]
        metric.reset()  # drops the fake statistics only (reset_real_features=False)
        for chunk in fake_BHW3.split(64):
            metric.update(fid_input(chunk), real=False)
        return float(metric.compute())
