"""Pruning from inside a trial's own ``fit`` process, at ``trainer.global_step``.

optuna-integration's Lightning callback reports once per epoch, and an epoch never ends in these step-based stages
(docs/design.md §8.5), so this callback reports every ``every_n_steps`` optimizer steps. A trial runs in a
subprocess: the callback opens the study's storage itself, reports the monitored training metric at one step count
that keeps increasing across the trial's stages, and when the pruner says so records ``pruned_at_step`` on the trial
and raises ``optuna.TrialPruned``; the sweep driver then tells the study the trial was PRUNED. Multi-objective
studies cannot prune (Optuna's pruners compare one value), so the driver never attaches this callback to them.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import optuna
from lightning.pytorch.callbacks import Callback

from src.errors import UserError
from src.sweep.storage import open_storage

TRAIN_METRICS = ("train/loss", "train/loss_out", "train/loss_feature", "train/loss_balance")
"""Metrics every distillation stage logs at every step (src/training/distill.py)."""


def make_pruner(name: str, options: dict[str, Any] | None = None) -> optuna.pruners.BasePruner:
    """The Optuna pruner called ``name`` ("median", "percentile", "hyperband", "successive_halving")."""
    classes = {
        "median": optuna.pruners.MedianPruner,
        "percentile": optuna.pruners.PercentilePruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    }
    if name not in classes:
        raise ValueError(f"pruner={name!r}; allowed {list(classes)}")
    try:
        return classes[name](**(options or {}))
    except TypeError as err:
        raise ValueError(f"pruner {name}: {err}") from None


class OptunaStepPruning(Callback):
    """Reports ``monitor`` to an Optuna trial every ``every_n_steps`` steps; raises ``TrialPruned`` when told to."""

    def __init__(
        self,
        storage: str,
        study_name: str,
        trial_number: int,
        monitor: str = "train/loss",
        pruner: str = "median",
        pruner_options: dict[str, Any] | None = None,
        every_n_steps: int = 5,
        sign: float = 1.0,
        stage_offsets: dict[str, int] | None = None,
    ) -> None:
        """
        Args:
            storage: The study's storage URL (or ``journal:<path>``).
            study_name: The study.
            trial_number: The trial this process runs.
            monitor: Logged training metric to report.
            pruner: Pruner name (the same as the driver's).
            pruner_options: Pruner keyword arguments.
            every_n_steps: Report every this many optimizer steps.
            sign: Factor on the reported value (-1 when the study maximises and the monitor is a loss).
            stage_offsets: Steps of the stages before each stage, by stage name (steps restart at 0 per stage).
        """
        super().__init__()
        self.storage, self.study_name, self.trial_number = storage, study_name, trial_number
        self.monitor, self.every_n_steps, self.sign = monitor, every_n_steps, sign
        self.pruner, self.pruner_options = pruner, dict(pruner_options or {})
        self.stage_offsets = dict(stage_offsets or {})
        self._trial: optuna.trial.Trial | None = None

    def _open(self) -> optuna.trial.Trial:
        if self._trial is None:
            storage = open_storage(self.storage)
            study = optuna.load_study(
                study_name=self.study_name,
                storage=storage,
                pruner=make_pruner(self.pruner, self.pruner_options),
            )
            study_id = storage.get_study_id_from_name(self.study_name)
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, self.trial_number)
            self._trial = optuna.trial.Trial(study, trial_id)
        return self._trial

    def step(self, pl_module: L.LightningModule, global_step: int) -> int:
        """The trial-wide step: this stage's step plus the steps of the stages before it."""
        spec = getattr(pl_module, "spec", None)
        return self.stage_offsets.get(getattr(spec, "name", None), 0) + global_step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The distillation stages bring their losses to the host only at logging steps (no sync in between), so
        # every reporting step must be one: log at least every `every_n_steps` (their gcd keeps both schedules).
        trainer.log_every_n_steps = math.gcd(trainer.log_every_n_steps or self.every_n_steps, self.every_n_steps)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 0 or trainer.global_step % self.every_n_steps:
            return
        prune = False
        if trainer.is_global_zero:
            value = trainer.callback_metrics.get(self.monitor)
            if value is None:
                logged = sorted(k for k in trainer.callback_metrics if k.startswith("train/"))
                raise UserError(f"pruning monitor {self.monitor!r} is not logged by this stage; logged: {logged}")
            trial, step = self._open(), self.step(pl_module, trainer.global_step)
            trial.report(self.sign * float(value), step)
            prune = trial.should_prune()
            if prune:
                trial.set_user_attr("pruned_at_step", step)
                trial.set_user_attr("pruned_value", float(value))
        if trainer.strategy.broadcast(prune, src=0):  # every rank of a DDP trial stops together
            raise optuna.TrialPruned(
                f"trial {self.trial_number} pruned at step {self.step(pl_module, trainer.global_step)}"
            )
