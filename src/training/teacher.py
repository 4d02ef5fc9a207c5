"""Train the dense teacher: a diffusers ``FluxTransformer2DModel`` with rectified flow.

The training step reads straight through: prompts (some dropped for classifier-free guidance) → noise level σ and
noise → x_t = (1 − σ)·x_0 + σ·ε → velocity prediction → MSE to ε − x_0 → log.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel

from src.atomic import replaced_folder
from src.data.worlds import check_world
from src.errors import UserError
from src.folders import check_writable_dir
from src.models.flow import PREDICTION_TYPES, TIMESTEP_SAMPLINGS, interpolate, sample_sigmas
from src.models.loading import load_transformer
from src.models.pipeline import SamplingConfig, ShapesPipeline
from src.models.text_encoder import HashTextEncoder, TextEncoderConfig
from src.training.base import FlowModule
from src.training.schedules import LR_DECAYS, warmup_schedule


class TeacherModule(FlowModule):
    """Rectified-flow training of a dense FLUX-architecture transformer (the teacher)."""

    def __init__(
        self,
        transformer: dict[str, Any],
        text_encoder: TextEncoderConfig | None = None,
        sampling: SamplingConfig | None = None,
        image_size: int = 32,
        patch_size: int = 4,
        timestep_sampling: str = "logit_normal",
        timestep_shift: float = 1.0,
        text_dropout: float = 0.1,
        lr: float = 5e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 200,
        init_from: str | None = None,
        export_dir: str | None = None,
        prediction_type: str = "velocity",
        lr_decay: str = "none",
        world: str = "shapes",
        overwrite_export: bool = False,
    ) -> None:
        """
        Args:
            transformer: ``FluxTransformer2DModel`` config (diffusers keyword arguments).
            text_encoder: The frozen text encoder; its widths must equal ``joint_attention_dim`` /
                ``pooled_projection_dim``.
            sampling: Sampler used for validation images.
            image_size: Square image side in pixels.
            patch_size: Pixels per token side (in_channels must be 3·patch_size²).
            timestep_sampling: "uniform" or "logit_normal" noise levels during training.
            timestep_shift: FLUX shift applied to the sampled noise levels.
            text_dropout: Probability of replacing the prompt by "" (classifier-free guidance training).
            lr: AdamW peak learning rate.
            weight_decay: AdamW weight decay.
            warmup_steps: Linear warm-up steps.
            init_from: Optional diffusers folder to start from instead of random weights.
            export_dir: Where ``save_pretrained`` writes the final (EMA) transformer.
            prediction_type: What the transformer outputs: "velocity" (ε − x_0, as FLUX) or "sample" (x̂_0, JiT's
                x-prediction, trained with the same velocity loss). Stored in the exported config, so sampling and
                distillation convert the output to a velocity.
            lr_decay: After warm-up, "none" keeps the peak rate; "cosine" anneals it to a tenth of the peak at
                the trainer's ``max_steps``.
            world: The embedded world it learns ("shapes" or "glyphs"; match the data's). Stored in the exported
                config, so evaluation, distillation and its students pick the world's prompts and detector.
            overwrite_export: Replace a teacher already exported to ``export_dir`` (else such a folder is
                refused before training starts).
        """
        super().__init__()
        self.save_hyperparameters()
        if timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling={timestep_sampling!r}: allowed {TIMESTEP_SAMPLINGS}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={prediction_type!r}: allowed {PREDICTION_TYPES}")
        if lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay={lr_decay!r}: allowed {LR_DECAYS}")
        self.world = check_world(world)
        if not 0 <= text_dropout < 1:
            raise ValueError(f"text_dropout={text_dropout}: must be in [0, 1)")
        expected_in = 3 * patch_size**2
        if transformer.get("in_channels") != expected_in:
            raise ValueError(
                f"transformer.in_channels={transformer.get('in_channels')}: must be 3·patch_size² = {expected_in}"
            )
        self.text_encoder = HashTextEncoder(text_encoder)
        tc = self.text_encoder.cfg
        if (transformer.get("joint_attention_dim"), transformer.get("pooled_projection_dim")) != (
            tc.dim,
            tc.pooled_dim,
        ):
            raise ValueError(
                f"transformer joint_attention_dim/pooled_projection_dim must equal text_encoder dim/pooled_dim "
                f"({tc.dim}, {tc.pooled_dim})"
            )
        if export_dir:
            check_writable_dir(export_dir, "export_dir")
            if (Path(export_dir) / "config.json").exists() and not overwrite_export:
                raise UserError(
                    f"export_dir {export_dir}: holds an exported teacher already; it is kept untouched — choose "
                    "another export_dir or pass --model.init_args.overwrite_export true"
                )
        self.transformer = (
            load_transformer(init_from, transformer) if init_from else FluxTransformer2DModel(**transformer)
        )
        if prediction_type != "velocity" or "prediction_type" in self.transformer.config:
            self.transformer.register_to_config(prediction_type=prediction_type)
        if world != "shapes":  # travels with the weights: students and evaluation pick the world's detector
            self.transformer.register_to_config(world=world)
        if sampling is not None and sampling.shift is not None:  # travels with the weights, like prediction_type
            self.transformer.register_to_config(sampling_shift=sampling.shift)
        self.pipeline = ShapesPipeline(self.transformer, self.text_encoder, image_size, patch_size, sampling)

    def sampling_model(self) -> torch.nn.Module:
        return self.transformer

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        x0_BLD = self.pipeline.images_to_tokens(batch["image"])
        b = x0_BLD.shape[0]
        keep = torch.rand(b) >= hp.text_dropout
        prompts = [p if k else "" for p, k in zip(batch["prompt"], keep.tolist())]
        tokens, pooled = self.pipeline.encode_prompts(prompts)
        sigma_B = sample_sigmas(b, hp.timestep_sampling, hp.timestep_shift, device=self.device)
        noise_BLD = torch.randn_like(x0_BLD)
        x_t = interpolate(x0_BLD, noise_BLD, sigma_B)
        v_pred = self.pipeline.velocity(x_t, sigma_B, tokens, pooled)
        loss = F.mse_loss(v_pred.float(), (noise_BLD - x0_BLD).float())
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(self.transformer.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        total = self.trainer.max_steps if self.trainer is not None and self.trainer.max_steps > 0 else 0
        if hp.lr_decay != "none" and total <= 0:
            raise UserError(f"lr_decay={hp.lr_decay!r} needs trainer.max_steps > 0 (the step it anneals to)")
        sched = warmup_schedule(opt, hp.warmup_steps, hp.lr_decay, total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_end(self) -> None:
        # Lightning's EMA callback has swapped the averaged weights in by now (on_train_end runs first).
        if self.hparams.export_dir and self.trainer.is_global_zero:
            with replaced_folder(Path(self.hparams.export_dir)) as partial:  # the old export stays until this is whole
                self.transformer.save_pretrained(partial)
            print(f"teacher exported to {self.hparams.export_dir}")
