"""The distillation stages of Dense2MoE as LightningModules (paper §3; docs/design.md §2).

- ``shared_kd`` (stage 1, enhanced MoE initialisation): the Taylor-initialised student runs with top-k = 0 (shared
  experts only) and is distilled with output loss + block feature loss.
- ``moe_kd`` (stage 2, dense-to-MoE distillation): shared experts frozen (paper), routed experts + routers trained
  with L_out + Σ_l w_l·L_feat(l) + λ·L_balance (λ = 0.01, inside the MoE layers).
- ``mob_kd`` (stage 3, Mixture of Blocks): each MoB group's output is matched to the dense teacher's output of the
  last block of that group; MoB routers (and, configurably, the grouped blocks) train, everything else is frozen.
- ``dense_kd`` (baselines): a width- or depth-pruned dense student distilled the same way.

Every step: t and noise → teacher (no grad) → student → losses → log. Teacher and student see the same noisy
input, noise level, text embeddings and guidance; a conditioning adapter (``src/training/conditioning.py``)
makes those from shapes-world or prepared-latent batches. The step's randomness is a pure function of (seed,
step, micro-batch, rank), so a resumed stage continues exactly as an uninterrupted one.

Nothing in a training step reads a device tensor on the host: losses are logged (and the loss checked for NaN/inf)
only at logging steps and before a checkpoint is written, so a GPU runs ahead of the Python loop between them.
Legend: B batch, L image tokens, D token width.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from src.data.worlds import model_world
from src.errors import UserError
from src.models.flow import TIMESTEP_SAMPLINGS, interpolate, sample_sigmas
from src.models.mob import mob_groups
from src.models.moe import (
    clear_aux_losses,
    moe_layers,
    set_layers_top_k,
    sync_balance_losses,
    update_expert_biases,
)
from src.training.accumulation import check_accumulation
from src.training.base import FlowModule
from src.training.conditioning import LatentConditioning, ShapesConditioning, velocity
from src.training.precision import apply_precision, check_precision
from src.training.schedules import warmup_schedule
from src.training.strategies import check_strategy, fsdp_spec
from src.training.trainer_spec import TrainerSpec, merge_same, shorthand_trainer

STAGE_KINDS = ("shared_kd", "moe_kd", "mob_kd", "dense_kd")
TRAINABLE = ("default", "all")


SHORTHAND_KEYS = ("checkpoint_every", "accelerator", "devices", "strategy", "extra_trainer")
"""Stage keys from before the ``trainer`` section: shorthand for the stage's ``trainer.<key>`` (``extra_trainer``:
``trainer.extra``); after parsing each reads the same as its ``trainer`` key."""


@dataclass
class StageSpec:
    """One distillation stage of an experiment: what it trains. Where it runs is its ``trainer`` section
    (src/training/trainer_spec.py), over the experiment's."""

    name: str
    """Stage name (unique in the experiment; its folder and MLflow run are named after it)."""
    kind: str
    """"shared_kd" (stage 1), "moe_kd" (stage 2), "mob_kd" (stage 3) or "dense_kd" (pruned baselines)."""
    steps: int = 200
    """Optimizer steps."""
    lr: float = 5e-4
    """AdamW peak learning rate (linear warm-up, then cosine decay to 10%)."""
    batch_size: int = 32
    """Images per step and device (global batch = batch_size × devices × nodes × accumulate_grad_batches)."""
    precision: str = "32-true"
    """Lightning precision: "32-true", "bf16-mixed" or "16-mixed" (trained parameters stay fp32 in all three)."""
    accumulate_grad_batches: int = 1
    """Micro-batches of ``batch_size`` per optimizer step (not for mob_kd; src/training/accumulation.py)."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    output_weight: float = 1.0
    """Weight of the output loss ‖v_teacher − v_student‖²."""
    feature_weight: float = 1.0
    """Weight of the (normalised, layer-averaged) block or group feature loss."""
    freeze_shared: bool = True
    """moe_kd: keep the shared experts frozen (paper: stage 2); False trains them jointly (the joint ablation)."""
    train_blocks: bool = True
    """mob_kd: also train the blocks inside MoB groups, not only the MoB routers."""
    trainable: str = "default"
    """"default" (what the stage's kind trains) or "all" (every student parameter)."""
    timestep_sampling: str = "logit_normal"
    """Noise-level sampling: "uniform" or "logit_normal"."""
    timestep_shift: float = 1.0
    """FLUX shift applied to the sampled noise levels."""
    gradient_clip_val: float = 1.0
    """Gradient norm clipping (by the global norm)."""
    trainer: TrainerSpec | None = None
    """Where the stage runs: accelerator, devices, num_nodes, strategy, checkpoint_every, extra Trainer arguments;
    keys left unset come from the experiment's ``trainer`` section (src/training/trainer_spec.py)."""
    checkpoint_every: int | None = None
    """Shorthand for trainer.checkpoint_every."""
    accelerator: str | None = None
    """Shorthand for trainer.accelerator."""
    devices: int | str | list[int] | None = None
    """Shorthand for trainer.devices."""
    strategy: str | dict[str, Any] | None = None
    """Shorthand for trainer.strategy."""
    extra_trainer: dict[str, Any] = field(default_factory=dict)
    """Shorthand for trainer.extra (its accelerator, devices, num_nodes, strategy go to the typed trainer keys)."""

    def __post_init__(self) -> None:
        if self.kind not in STAGE_KINDS:
            raise ValueError(f"stage {self.name!r}: kind={self.kind!r}; allowed {list(STAGE_KINDS)}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"stage {self.name!r}: trainable={self.trainable!r}; allowed {list(TRAINABLE)}")
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(
                f"stage {self.name!r}: timestep_sampling={self.timestep_sampling!r}; allowed {list(TIMESTEP_SAMPLINGS)}"
            )
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"stage {self.name!r}: {name}={getattr(self, name)} must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"stage {self.name!r}: lr={self.lr} must be > 0")
        try:
            check_precision(self.precision)
            check_accumulation(self.accumulate_grad_batches, self.kind)
            shorthand = shorthand_trainer(
                {k: getattr(self, k) for k in SHORTHAND_KEYS if k != "extra_trainer"}, self.extra_trainer
            )
            self.trainer = merge_same(self.trainer or TrainerSpec(), shorthand)
            if self.trainer.strategy is not None:
                check_strategy(self.trainer.strategy, self.kind)
        except ValueError as err:
            raise ValueError(f"stage {self.name!r}: {err}") from None
        # the shorthand keys read as the section (code and YAMLs written before it keep working)
        for key in SHORTHAND_KEYS:
            setattr(self, key, dict(self.trainer.extra) if key == "extra_trainer" else getattr(self.trainer, key))

    def with_defaults(self, defaults: TrainerSpec | None) -> StageSpec:
        """This stage with every trainer key resolved: its own, else ``defaults``' (the experiment's section), else
        the default (``TRAINER_DEFAULTS``)."""
        return dataclasses.replace(self, trainer=self.trainer.over(defaults).filled())

    def as_dict(self) -> dict[str, Any]:
        """The stage as a YAML mapping, without the shorthand keys (its ``trainer`` section holds them)."""
        return {k: v for k, v in asdict(self).items() if k not in SHORTHAND_KEYS}


# --- which parameters a stage trains ------------------------------------------------------------------------------
def _moe_param_groups(student: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    shared, routed = [], []
    for layer in moe_layers(student):
        for name, p in layer.named_parameters():
            (routed if name in ("router.weight", "w_up", "b_up", "w_down") else shared).append(p)
    return shared, routed


def trainable_parameters(student: nn.Module, spec: StageSpec) -> list[nn.Parameter]:
    """Sets ``requires_grad`` on the student as the stage prescribes and returns the trained parameters."""
    if spec.trainable == "all" or spec.kind == "dense_kd":
        chosen = list(student.parameters())
    elif spec.kind == "shared_kd":
        chosen = _moe_param_groups(student)[0]
    elif spec.kind == "moe_kd":
        shared, routed = _moe_param_groups(student)
        chosen = routed if spec.freeze_shared else shared + routed
    else:  # mob_kd
        chosen = [p for g in mob_groups(student) for p in g.parameters()]
        if spec.train_blocks:
            for stream, start, size in group_spans_of(student):
                blocks = getattr(student, _STREAM_ATTR[stream])
                chosen += [p for block in blocks[start : start + size] for p in block.parameters()]
    ids = {id(p) for p in chosen}
    for p in student.parameters():
        p.requires_grad_(id(p) in ids)
    if not chosen:
        raise UserError(f"stage {spec.name!r} ({spec.kind}) has nothing to train in this student")
    return chosen


_STREAM_ATTR = {"double": "transformer_blocks", "single": "single_transformer_blocks"}


def group_spans_of(student: nn.Module) -> list[tuple[str, int, int]]:
    return [(g.stream, g.start, g.size) for g in mob_groups(student)]


# --- feature taps ----------------------------------------------------------------------------------------------------
class FeatureTaps:
    """Forward hooks keeping the (text + image) hidden states each tapped module output in the last forward."""

    def __init__(self, modules: dict[tuple[str, int], nn.Module]) -> None:
        self.outputs: dict[tuple[str, int], torch.Tensor] = {}
        self._handles = [m.register_forward_hook(self._hook(key)) for key, m in modules.items()]

    def _hook(self, key: tuple[str, int]):
        def keep(module, args, output):
            encoder_hidden_states, hidden_states = output
            self.outputs[key] = torch.cat([encoder_hidden_states, hidden_states], dim=1)

        return keep

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def feature_pairs(
    teacher: nn.Module, student: nn.Module, kind: str
) -> tuple[dict[tuple[str, int], nn.Module], dict[tuple[str, int], nn.Module], list[tuple[tuple, tuple]]]:
    """Modules to tap in teacher and student and the (student key, teacher key) pairs the feature loss matches.

    Blocks map one to one, through ``kept_double``/``kept_single`` for a depth-pruned student; in ``mob_kd`` each
    MoB group's output maps to the teacher's last block of that group (paper: group feature loss).
    """
    cfg = getattr(student, "config", {})
    kept = {
        "double": cfg.get("kept_double") or list(range(len(student.transformer_blocks))),
        "single": cfg.get("kept_single") or list(range(len(student.single_transformer_blocks))),
    }
    teacher_taps, student_taps, pairs = {}, {}, []
    groups = mob_groups(student)
    if kind == "mob_kd":
        for g in groups:
            last = kept[g.stream][g.start + g.size - 1]
            student_taps[(g.stream + "_group", g.start)] = g
            teacher_taps[(g.stream, last)] = getattr(teacher, _STREAM_ATTR[g.stream])[last]
            pairs.append(((g.stream + "_group", g.start), (g.stream, last)))
        return teacher_taps, student_taps, pairs
    if groups:
        raise UserError(f"a {kind} stage cannot follow a mob_kd stage: the student's blocks are already grouped")
    for stream, attr in _STREAM_ATTR.items():
        for i, block in enumerate(getattr(student, attr)):
            t = kept[stream][i]
            student_taps[(stream, i)] = block
            teacher_taps[(stream, t)] = getattr(teacher, attr)[t]
            pairs.append(((stream, i), (stream, t)))
    return teacher_taps, student_taps, pairs


# --- the stage module ---------------------------------------------------------------------------------------------
class DistillStage(FlowModule):
    """One distillation stage; ``spec.kind`` decides what trains and which features are matched."""

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        spec: StageSpec,
        conditioning: ShapesConditioning | LatentConditioning,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters({"stage": spec.as_dict(), "noise_seed": seed})
        self.spec, self.seed = spec, seed
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student.train()
        self.conditioning = conditioning
        self.pipeline = conditioning.pipeline  # shapes-world sampling for validation; None on latent data
        self.world = model_world(teacher)  # the embedded world whose detector scores validation samples
        self.strict_loading = False  # the frozen teacher is not stored in stage checkpoints
        self.top_k = max((layer.cfg.top_k for layer in moe_layers(student)), default=0)
        if spec.kind == "shared_kd":
            set_layers_top_k(student, 0)
        self._params = trainable_parameters(student, spec)
        apply_precision(student, self._params, spec.precision, fsdp=fsdp_spec(spec.trainer.strategy or "auto"))
        teacher_taps, student_taps, self.pairs = feature_pairs(teacher, student, spec.kind)
        self._teacher_taps = FeatureTaps(teacher_taps)
        self._student_taps = FeatureTaps(student_taps)
        self.last_sigma_B: torch.Tensor | None = None
        self._micro_batch = 0
        # On-device running state between logging steps: the micro-batch-mean losses of the current optimizer
        # step, and the first step whose loss was not finite (-1: none).
        self._step_parts: dict[str, torch.Tensor] = {}
        self.shown_loss: float | None = None
        """The loss at the last logging step, on the host (what the progress bar shows)."""
        self._first_bad_step: torch.Tensor | None = None

    def sampling_model(self) -> nn.Module:
        return self.student

    def _data_parallel_rank(self) -> tuple[int, int]:
        """(rank, ranks) splitting each global batch; (0, 1) outside a Trainer."""
        trainer = self._trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _accumulation(self) -> int:
        return self._trainer.accumulate_grad_batches if self._trainer is not None else 1

    def _step_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.global_step)

    def _is_logging_step(self) -> bool:
        """Whether the optimizer step this micro-batch belongs to is one Lightning logs (or the last one)."""
        trainer = self._trainer
        if trainer is None:
            return True
        step = self.global_step + 1
        return (trainer.log_every_n_steps > 0 and step % trainer.log_every_n_steps == 0) or step == trainer.max_steps

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        spec, guidance = self.spec, self.conditioning.guidance
        gen = self._step_generator()
        inputs = self.conditioning.inputs(batch)
        x0_BLD = inputs.x0_BLD
        b = x0_BLD.shape[0]
        # Each rank draws the noise of the step's global batch (R ranks × A micro-batches × b) and keeps its slice:
        # R ranks × A micro-batches of b see exactly what one process with batch R·A·b sees (the data stream and
        # MicroBatches slice the same way: rank-major, then micro-batch).
        rank, world = self._data_parallel_rank()
        parts = self._accumulation()
        start = (rank * parts + self._micro_batch) * b
        mine = slice(start, start + b)
        total = b * world * parts
        sigma_B = sample_sigmas(total, spec.timestep_sampling, spec.timestep_shift, generator=gen)[mine]
        sigma_B = sigma_B.to(self.device)
        noise_BLD = torch.randn((total, *x0_BLD.shape[1:]), generator=gen)[mine].to(self.device)
        x_t = interpolate(x0_BLD, noise_BLD, sigma_B)
        self.last_sigma_B = sigma_B
        with torch.no_grad():
            v_teacher = velocity(self.teacher, x_t, sigma_B, inputs, guidance)
        layers = moe_layers(self.student)
        clear_aux_losses(self.student)  # layers in blocks that MoB skips this step must not contribute a stale loss
        v_student = velocity(self.student, x_t, sigma_B, inputs, guidance)
        out = F.mse_loss(v_student.float(), v_teacher.float())
        sync_balance_losses(self.student)  # expert loads of the global batch under DDP / FSDP
        # w_l: each layer's term on the output loss's scale, divided by that teacher feature's relative size
        # (paper: normalised, detached per-block weights). Both are global-batch statistics (the mean of the
        # equal-sized ranks' means), so data-parallel ranks weight layers exactly as one process would.
        teacher_feats = self._teacher_taps.outputs
        norms = torch.stack(
            [v_teacher.float().pow(2).mean(), *(teacher_feats[t].float().pow(2).mean() for _, t in self.pairs)]
        ).detach()
        if self._trainer is not None:
            norms = self.trainer.strategy.reduce(norms, reduce_op="mean")
        scale = norms[0]
        feats = []
        for (s_key, t_key), norm in zip(self.pairs, norms[1:]):
            f_teacher = teacher_feats[t_key].float()
            f_student = self._student_taps.outputs[s_key].float()
            w = scale / norm.clamp_min(1e-8)
            feats.append(w * F.mse_loss(f_student, f_teacher))
        feature = torch.stack(feats).mean() if feats else out.new_zeros(())
        balance = sum((layer.aux_loss for layer in layers), out.new_zeros(()))
        total = spec.output_weight * out + spec.feature_weight * feature + balance
        return {"loss": total, "loss_out": out, "loss_feature": feature, "loss_balance": balance}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        parts_per_step = self._accumulation()
        self._micro_batch = batch_idx % parts_per_step
        parts = self.losses(batch)
        loss = parts["loss"]
        # No host sync here: the NaN/inf flag and the step's losses accumulate on the device.
        bad = ~torch.isfinite(loss.detach())
        if self._first_bad_step is None:
            self._first_bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
        self._first_bad_step = torch.where(bad & (self._first_bad_step < 0), self.global_step, self._first_bad_step)
        for k, v in parts.items():
            mean = v.detach() / parts_per_step
            self._step_parts[k] = self._step_parts[k] + mean if self._micro_batch else mean
        if self._micro_batch == parts_per_step - 1 and self._is_logging_step():
            self.check_finite()
            step_parts = self._step_parts
            # sync_dist: the mean over ranks is the loss of the global batch (equal-sized ranks, see losses)
            # Not prog_bar: Lightning converts progress-bar tensors with .item() after every later batch as well
            # (a device sync per step); the bar shows the host copy taken here, once per logging step.
            self.log_dict({f"train/{k}": v for k, v in step_parts.items()}, sync_dist=True)
            self.shown_loss = float(step_parts["loss"])
        return loss

    def check_finite(self) -> None:
        """Raise ``NonFiniteLossError`` if any loss since the stage started was NaN/inf (one host sync)."""
        if self._first_bad_step is None:
            return
        step = int(self._first_bad_step)
        if step >= 0:
            raise NonFiniteLossError(
                f"stage {self.spec.name!r}: non-finite loss (NaN or inf) first at step {step}; the last good "
                "checkpoint is kept and the MLflow run is marked FAILED (lower the lr or use fp32)"
            )

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        update_expert_biases(self.student)  # once per optimizer step, from the loads of all its micro-batches

    def on_train_end(self) -> None:
        self.check_finite()

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        model = self.trainer.model if self._trainer is not None else None
        if gradient_clip_val and isinstance(model, FullyShardedDataParallel):
            # Lightning's FSDP precision plugin cannot clip by norm; FSDP computes the norm over all shards
            model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        spec = self.spec
        opt = torch.optim.AdamW(self._params, lr=spec.lr, weight_decay=spec.weight_decay)
        # always a cosine decay: total > warm-up
        total = max(spec.steps, max(1, spec.warmup_steps) + 1)
        sched = warmup_schedule(opt, spec.warmup_steps, "cosine", total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_finite()  # a checkpoint after a NaN is never written: the last good one stays the newest
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}
        # what `export` needs to rebuild the student from this file alone (under FSDP, self.student is a wrapper)
        student = getattr(self.student, "module", self.student)
        config = {k: v for k, v in dict(student.config).items() if not k.startswith("_")}
        checkpoint["student_config"] = {"class_name": type(student).__name__, "config": config}

    def teardown(self, stage: str) -> None:
        self._teacher_taps.remove()
        self._student_taps.remove()


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite."""
