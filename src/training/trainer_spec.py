"""Where a stage runs: the ``lightning.Trainer`` launcher settings, which do not change what the stage trains.

An experiment YAML may hold a ``trainer:`` section at its top (defaults for every stage) and one in any stage; the
stage's own keys win, key by key (``extra`` merges key by key as well), and a key set nowhere takes the default
in ``TRAINER_DEFAULTS``::

    trainer: {accelerator: gpu, devices: 8, checkpoint_every: 250, strategy: {class_path: …FSDPStrategy, …}}
    stages:
      - {name: stage1_shared, kind: shared_kd, steps: 2000, batch_size: 2}
      - {name: stage3_mob, kind: mob_kd, steps: 400, batch_size: 2, trainer: {strategy: ddp}}

What a stage trains (steps, lr, batch_size, precision, gradient_clip_val, accumulate_grad_batches, its losses)
is the stage's own (``StageSpec`` in src/training/distill.py) and part of its resume fingerprint; this section is
not, except through the global batch (``Experiment.stage_fingerprint``): a stage started on one device may resume on
two with half the per-device batch.

Before this section existed a stage held ``accelerator``, ``devices``, ``strategy``, ``checkpoint_every`` and an
untyped ``extra_trainer`` itself. Those keys still work, as shorthand for the stage's ``trainer.<key>``
(``extra_trainer``: ``trainer.extra``); ``extra_trainer`` may still name ``accelerator``, ``devices``,
``num_nodes`` or ``strategy``, which then go to their typed keys.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, fields
from typing import Any

from lightning import Trainer
from lightning.pytorch.accelerators import AcceleratorRegistry

from src.training.strategies import fsdp_spec, launched_num_nodes

TRAINER_DEFAULTS: dict[str, Any] = {
    "accelerator": "auto",
    "devices": 1,
    "num_nodes": None,
    "strategy": "auto",
    "checkpoint_every": 50,
}
"""What a key set neither in the stage nor in the experiment's ``trainer`` section means (``num_nodes`` None: the
launcher's node count, see ``launched_num_nodes``)."""

TYPED_TRAINER_ARGS = ("accelerator", "devices", "num_nodes", "strategy")
"""``lightning.Trainer`` arguments with a typed key of their own in the section (not in ``extra``)."""

SET_BY_THE_STAGE = {
    "max_steps": "steps",
    "precision": "precision",
    "gradient_clip_val": "gradient_clip_val",
    "accumulate_grad_batches": "accumulate_grad_batches",
}
"""Trainer arguments the runner takes from a stage key (they change results, so they are fingerprinted)."""

SET_BY_THE_RUNNER = {
    "logger": "each stage logs to its own MLflow run (set experiment_name / tracking_uri)",
    "callbacks": "the runner installs the checkpoint, expert-load and progress callbacks (a sweep adds its pruning "
    "callback through run_experiment's callbacks)",
    "enable_checkpointing": "stage checkpoints are what a rerun resumes from (set trainer.checkpoint_every)",
    "default_root_dir": "a stage's files live in output_dir/<stage name>",
    "max_epochs": "a stage trains exactly `steps` optimizer steps",
    "min_epochs": "a stage trains exactly `steps` optimizer steps",
    "min_steps": "a stage trains exactly `steps` optimizer steps",
    "max_time": "a stage that stopped early would be recorded as finished; it trains exactly `steps` steps",
    "fast_dev_run": "a stage that stopped early would be recorded as finished; use a shorter `steps`",
    "overfit_batches": "it changes which batches a stage trains on",
    "limit_train_batches": "it changes which batches a stage trains on",
    "gradient_clip_algorithm": "stages clip by the global norm (FSDP included); set the stage's gradient_clip_val",
}
"""Trainer arguments the runner owns, with the reason a ``trainer.extra`` key may not set them."""

RUNNER_DEFAULTS = ("log_every_n_steps", "enable_model_summary", "num_sanity_val_steps", "limit_val_batches")
"""Trainer arguments the runner sets but ``trainer.extra`` may override (logging cadence, summaries, validation)."""


def _trainer_arguments() -> set[str]:
    return set(inspect.signature(Trainer.__init__).parameters) - {"self"}


def check_extra(extra: Any, where: str) -> None:
    """ValueError naming ``<where>.<key>`` for a key that is no ``lightning.Trainer`` argument, has a typed key of
    its own, or is one the runner sets (``SET_BY_THE_STAGE``, ``SET_BY_THE_RUNNER``), with the reason."""
    if not isinstance(extra, dict) or not all(isinstance(k, str) for k in extra):
        raise ValueError(f"{where}={extra!r}: must be a mapping of lightning.Trainer argument names to values")
    accepted = _trainer_arguments()
    for key, value in extra.items():
        if key not in accepted:
            raise ValueError(f"{where}.{key}: not a lightning.Trainer argument")
        if key in SET_BY_THE_STAGE:
            raise ValueError(
                f"{where}.{key}={value!r}: not allowed here: the runner sets it from the stage's "
                f"`{SET_BY_THE_STAGE[key]}` (it changes results, so it is part of the stage's resume fingerprint)"
            )
        if key in SET_BY_THE_RUNNER:
            raise ValueError(f"{where}.{key}={value!r}: not allowed here: {SET_BY_THE_RUNNER[key]}")
        if key in TYPED_TRAINER_ARGS:
            raise ValueError(f"{where}.{key}={value!r}: not allowed here: set trainer.{key} (a typed key)")


def _accelerators() -> list[str]:
    return sorted({"auto", "gpu", *AcceleratorRegistry.available_accelerators()})


def check_value(name: str, value: Any, shown: str) -> None:
    """ValueError naming ``shown`` (``trainer.devices``, or ``devices`` for the stage shorthand) for a bad value of
    the section's key ``name``; None (unset) is always fine."""
    if value is None:
        return
    if name == "accelerator":
        if value not in _accelerators():
            raise ValueError(f"{shown}={value!r}: allowed {_accelerators()}")
    elif name == "devices":
        if device_count_spec(value) is None:
            raise ValueError(
                f"{shown}={value!r}: allowed a count >= 1, -1 or 'auto' (every device of the accelerator), a list "
                "of device ids or a string of comma-separated ids"
            )
    elif name in ("num_nodes", "checkpoint_every"):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{shown}={value!r}: must be an integer >= 1")
    elif name == "strategy":
        fsdp_spec(value)  # a name or {class_path, init_args}; its own errors name `strategy`


def device_count_spec(devices: Any) -> int | None:
    """Devices per node that ``devices`` names: a number, 0 for "every device" (-1 or "auto"), None if invalid."""
    if isinstance(devices, bool):
        return None
    if isinstance(devices, int):
        return devices if devices >= 1 else 0 if devices == -1 else None
    if isinstance(devices, list):
        ids = devices
        ok = ids and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
        return len(ids) if ok and len(set(ids)) == len(ids) else None
    if isinstance(devices, str):
        text = devices.strip()
        if text in ("auto", "-1"):
            return 0
        if "," in text:
            parts = [p.strip() for p in text.split(",") if p.strip()]
            return len(parts) if parts and all(p.isdigit() for p in parts) else None
        return int(text) if text.isdigit() and int(text) >= 1 else None
    return None


def _every_device(accelerator: str) -> int:
    """What Lightning's ``devices="auto"``/-1 means for ``accelerator`` (for "auto": the one Lightning picks)."""
    registry = AcceleratorRegistry
    names = {"auto": ("mps", "cuda"), "gpu": ("mps", "cuda")}.get(accelerator, (accelerator,))
    for name in names:
        if name in registry:
            cls = registry[name]["accelerator"]
            if cls.is_available():
                return max(1, cls.auto_device_count())
    return 1


@dataclass
class TrainerSpec:
    """Where and how a stage runs (Lightning's launcher settings); unset keys (null) are inherited."""

    accelerator: str | None = None
    """Lightning accelerator: "auto", "cpu", "gpu", "cuda", "mps" or "tpu" (null: inherited; default "auto")."""
    devices: int | str | list[int] | None = None
    """Devices per node: a count, -1 or "auto" (every device), or a list of ids (null: inherited; default 1);
    batch_size is per device."""
    num_nodes: int | None = None
    """Nodes (null: inherited; default the launcher's: torchrun's WORLD_SIZE / LOCAL_WORLD_SIZE, srun's
    SLURM_NNODES, else 1)."""
    strategy: str | dict[str, Any] | None = None
    """Lightning strategy: a name ("auto", "ddp", "fsdp", …) or {class_path, init_args} (src/training/strategies.py;
    null: inherited; default "auto")."""
    checkpoint_every: int | None = None
    """Optimizer steps between resumable checkpoints (null: inherited; default 50)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other ``lightning.Trainer`` arguments (log_every_n_steps, deterministic, profiler, …), merged key by key
    over the experiment's; arguments the runner sets (max_steps, precision, logger, callbacks, …) are refused."""

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name != "extra":
                check_value(f.name, getattr(self, f.name), f"trainer.{f.name}")
        check_extra(self.extra, "trainer.extra")

    def over(self, base: TrainerSpec | None) -> TrainerSpec:
        """This section's keys, the unset ones taken from ``base`` (``extra``: ``base``'s, updated with these)."""
        if base is None:
            return self
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        inherited = {k: getattr(base, k) if v is None else v for k, v in values.items()}
        return TrainerSpec(**inherited, extra={**base.extra, **self.extra})

    def filled(self) -> TrainerSpec:
        """Every unset key at its default (``num_nodes`` stays None: the launcher's)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return TrainerSpec(
            **{k: TRAINER_DEFAULTS[k] if v is None else v for k, v in values.items()}, extra=dict(self.extra)
        )

    def nodes(self) -> int:
        """Nodes the stage runs on: ``num_nodes``, else the launcher's."""
        return self.num_nodes or launched_num_nodes()

    def world_size(self) -> int:
        """Processes the stage runs on: devices per node × nodes, as Lightning counts them (``devices`` -1 or "auto":
        every device of the accelerator Lightning picks)."""
        spec = self.filled()
        per_node = device_count_spec(spec.devices) or _every_device(spec.accelerator)
        return per_node * spec.nodes()


def shorthand_trainer(values: dict[str, Any], extra_trainer: dict[str, Any]) -> TrainerSpec:
    """The trainer section a stage's shorthand keys (``accelerator``, ``devices``, ``strategy``, ``checkpoint_every``,
    ``extra_trainer``) describe; errors name those keys as the stage wrote them."""
    if not isinstance(extra_trainer, dict):
        raise ValueError(f"extra_trainer={extra_trainer!r}: must be a mapping of lightning.Trainer arguments")
    typed = {k: v for k, v in extra_trainer.items() if k in TYPED_TRAINER_ARGS}
    rest = {k: v for k, v in extra_trainer.items() if k not in TYPED_TRAINER_ARGS}
    for name, value in typed.items():
        if values.get(name) is not None and values[name] != value:
            raise ValueError(
                f"{name}={values[name]!r} and extra_trainer.{name}={value!r}: the same setting twice; keep one"
            )
        check_value(name, value, f"extra_trainer.{name}")
    for name, value in values.items():
        check_value(name, value, name)
    check_extra(rest, "extra_trainer")
    merged = {k: v for k, v in values.items() if v is not None} | typed
    return TrainerSpec(**merged, extra=rest)


def merge_same(section: TrainerSpec, shorthand: TrainerSpec) -> TrainerSpec:
    """A stage's ``trainer`` section and its shorthand keys as one section; a key both set differently is refused."""
    values = {}
    for f in fields(section):
        if f.name == "extra":
            continue
        a, b = getattr(section, f.name), getattr(shorthand, f.name)
        if a is not None and b is not None and a != b:
            short = f.name if f.name != "num_nodes" else "extra_trainer.num_nodes"
            raise ValueError(f"trainer.{f.name}={a!r} and {short}={b!r}: the same setting twice; keep trainer.{f.name}")
        values[f.name] = a if a is not None else b
    for key in section.extra.keys() & shorthand.extra.keys():
        if section.extra[key] != shorthand.extra[key]:
            raise ValueError(
                f"trainer.extra.{key}={section.extra[key]!r} and extra_trainer.{key}={shorthand.extra[key]!r}: the "
                "same setting twice; keep trainer.extra"
            )
    return TrainerSpec(**values, extra={**shorthand.extra, **section.extra})
