"""The sweep file: what a study searches, what it optimises, how its trials run (format: sweeps/README.md).

Parsed strictly: an unknown key, an empty choice list, low > high or a missing objective stops with one error line
naming the file, the key and what is allowed, before any storage is opened or any trial starts. The checks that
need the experiment configs (config paths, objective metrics) are in ``src/sweep/configs.py``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from evaluation.claims import TEACHER, Claim
from src.errors import UserError

PARAM_TYPES = ("categorical", "int", "float")
SAMPLERS = ("tpe", "grid", "random", "nsga2")
PRUNERS = ("median", "percentile", "hyperband", "successive_halving")
DIRECTIONS = ("maximize", "minimize")
VARIANT_PARAM = "variant"
"""Name of the categorical parameter that picks among ``variants``."""


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


@dataclass
class ParamSpec:
    """One dimension of the search space: a config path and the values it may take."""

    path: str
    """Dotted path into the experiment ("student.conversion.layout", "stages.stage2_moe.lr", "stages.*.lr")."""
    type: str = "categorical"
    """"categorical" (``choices``), "int" or "float" (``low``..``high``, optional ``step`` or ``log``)."""
    choices: list[Any] | None = None
    """Values of a categorical parameter; lists and mappings are stored in Optuna as JSON text."""
    low: float | None = None
    """Lower bound (int/float), inclusive."""
    high: float | None = None
    """Upper bound (int/float), inclusive."""
    step: float | None = None
    """Spacing of int/float values (required for a float on the grid sampler)."""
    log: bool = False
    """Sample on a log scale (low > 0; not with ``step``)."""

    def __post_init__(self) -> None:
        if self.type not in PARAM_TYPES:
            raise ValueError(f"type={self.type!r}; allowed {list(PARAM_TYPES)}")
        if self.type == "categorical":
            if not isinstance(self.choices, list) or not self.choices:
                raise ValueError(f"choices={self.choices!r}: a categorical parameter needs a non-empty list")
            labels = self.labels
            if len(set(map(json.dumps, labels))) != len(labels):
                raise ValueError(f"choices={self.choices!r}: duplicates")
            for name in ("low", "high", "step"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: only for int/float parameters, not with choices")
            return
        if self.choices is not None:
            raise ValueError(f"choices: only for categorical parameters (this one is {self.type})")
        for name in ("low", "high", "step"):
            value = getattr(self, name)
            if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as text
                try:
                    value = float(value)
                except ValueError:
                    raise ValueError(f"{name}={value!r}: not a number") from None
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{name}={value!r}: not a number")
            if value is not None and self.type == "int":
                if value != int(value):
                    raise ValueError(f"{name}={value}: an int parameter needs whole numbers")
                value = int(value)
            setattr(self, name, value)
        if self.low is None or self.high is None:
            raise ValueError(f"low={self.low}, high={self.high}: an {self.type} parameter needs both")
        if self.low > self.high:
            raise ValueError(f"low={self.low} > high={self.high}; allowed low <= high")
        if self.log and self.low <= 0:
            raise ValueError(f"log=true with low={self.low}; allowed low > 0")
        if self.log and self.step is not None:
            raise ValueError("log=true with step: choose one (Optuna samples either on a log scale or on steps)")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"step={self.step}; allowed > 0")

    @property
    def labels(self) -> list[Any]:
        """The choices as Optuna stores them (JSON text when any choice is a list or a mapping)."""
        assert self.choices is not None
        if all(_is_scalar(c) for c in self.choices):
            return list(self.choices)
        return [json.dumps(c, sort_keys=True) for c in self.choices]

    def value(self, label: Any) -> Any:
        """The config value of a sampled Optuna value."""
        if self.type != "categorical" or all(_is_scalar(c) for c in self.choices):
            return label
        return self.choices[self.labels.index(label)]

    def bounds(self) -> list[Any]:
        """Values that bracket the space (every choice, or low and high), checked against the config up front."""
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]

    def grid_values(self) -> list[Any]:
        """Every value of this parameter on a grid (ValueError where the space is continuous)."""
        if self.type == "categorical":
            return self.labels
        if self.step is None and self.type == "float":
            raise ValueError("the grid sampler needs a step for a float parameter (or list the values as choices)")
        step = self.step or 1
        count = int(math.floor((self.high - self.low) / step + 1e-9)) + 1
        values = [self.low + i * step for i in range(count)]
        return [int(v) for v in values] if self.type == "int" else [round(v, 12) for v in values]

    def suggest(self, trial: Any) -> Any:
        """Ask an Optuna trial for this parameter; returns the config value."""
        if self.type == "categorical":
            return self.value(trial.suggest_categorical(self.path, self.labels))
        if self.type == "int":
            return trial.suggest_int(self.path, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.path, self.low, self.high, step=self.step, log=self.log)


@dataclass
class VariantSpec:
    """A named experiment: another base file and/or a bundle of overrides (a choice of the ``variant`` parameter)."""

    name: str
    """Variant name (the value of the ``variant`` parameter, shown in tables)."""
    base: str | None = None
    """Experiment YAML of this variant (default: the sweep's ``base``)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Config path → value, applied on top of the variant's base."""


@dataclass
class ObjectiveSpec:
    """One objective: a metric of the run's report and whether larger is better."""

    metric: str
    """Key of ``report/summary.json`` (e.g. "geneval_shapes/overall", "params/activated", "fidelity/psnr")."""
    direction: str
    """"maximize" or "minimize"."""

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"{self.metric}: direction={self.direction!r}; allowed {list(DIRECTIONS)}")


@dataclass
class SamplerSpec:
    """The Optuna sampler."""

    name: str = "tpe"
    """"tpe", "grid", "random" or "nsga2"."""
    seed: int | None = 0
    """Sampler seed (a worker joining a running study offsets it by its process id, except for the grid)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Other keyword arguments of the Optuna sampler (e.g. ``population_size`` for NSGA-II)."""

    def __post_init__(self) -> None:
        if self.name not in SAMPLERS:
            raise ValueError(f"name={self.name!r}; allowed {list(SAMPLERS)}")


@dataclass
class PruningSpec:
    """Pruning of single-objective studies on a training metric reported at ``trainer.global_step``."""

    pruner: str = "median"
    """"median", "percentile", "hyperband" or "successive_halving"."""
    monitor: str = "train/loss"
    """Training metric reported to Optuna (summed steps across the trial's stages)."""
    monitor_direction: str = "minimize"
    """Whether lower ("minimize") or higher is better for ``monitor`` (it is negated when it disagrees with the
    objective's direction, because Optuna's pruners compare in the study's direction)."""
    every_n_steps: int = 5
    """Report (and ask whether to prune) every this many optimizer steps."""
    options: dict[str, Any] = field(default_factory=dict)
    """Other keyword arguments of the Optuna pruner (e.g. ``n_startup_trials``, ``n_warmup_steps``)."""

    def __post_init__(self) -> None:
        if self.pruner not in PRUNERS:
            raise ValueError(f"pruner={self.pruner!r}; allowed {list(PRUNERS)}")
        if self.monitor_direction not in DIRECTIONS:
            raise ValueError(f"monitor_direction={self.monitor_direction!r}; allowed {list(DIRECTIONS)}")
        if self.every_n_steps < 1:
            raise ValueError(f"every_n_steps={self.every_n_steps}; allowed >= 1")


@dataclass
class TrialSpec:
    """What one trial runs."""

    stages: list[str] | None = None
    """Names of the base experiment's stages a trial runs, in the base's order (None: all)."""
    steps_scale: float = 1.0
    """Shortened schedule: every stage's steps, warm-up and checkpoint interval times this (at least 1 each)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Config path → value for every trial, applied after the scaling (e.g. a smaller evaluation)."""
    timeout: float | None = None
    """Seconds after which a trial is stopped and recorded as failed (None: no limit)."""

    def __post_init__(self) -> None:
        if not self.steps_scale > 0:
            raise ValueError(f"steps_scale={self.steps_scale}; allowed > 0")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"timeout={self.timeout}; allowed > 0 or null")
        if self.stages is not None and (not isinstance(self.stages, list) or not self.stages):
            raise ValueError(f"stages={self.stages!r}: a non-empty list of stage names, or null for all")


@dataclass
class SweepSpec:
    """A whole sweep file."""

    name: str
    """Study name (Optuna), MLflow parent run name, and the default output folder runs/sweeps/<name>."""
    base: str
    """Experiment YAML (with ``stages:``) every trial starts from."""
    objectives: list[ObjectiveSpec]
    """Metric → direction; two or more make a multi-objective study (Pareto front, no pruning)."""
    space: list[ParamSpec] = field(default_factory=list)
    """Config path → values (a list is a categorical parameter)."""
    variants: list[VariantSpec] = field(default_factory=list)
    """Named experiments searched as the categorical parameter ``variant`` (crossed with ``space``)."""
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    """The Optuna sampler."""
    pruning: PruningSpec | None = None
    """Pruning (single-objective studies only; None: off)."""
    trials: int | None = None
    """Trials in the study in all (failed ones count; default for the grid: its size)."""
    timeout: float | None = None
    """Seconds after which a worker starts no new trial (None: no limit)."""
    trial: TrialSpec = field(default_factory=TrialSpec)
    """What one trial runs (stages, shortened schedule, fixed overrides, time limit)."""
    storage: str | None = None
    """Optuna storage: SQLAlchemy URL, or a journal file (``*.journal``/``*.log``, or ``journal:<path>``)
    for several workers on a shared file system (default: sqlite:///<output_dir>/optuna.db)."""
    output_dir: str | None = None
    """Trial folders, plots and tables (default runs/sweeps/<name>)."""
    experiment_name: str | None = None
    """MLflow experiment (default sweep-<name>)."""
    tracking_uri: str | None = None
    """MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)."""
    report_metrics: list[str] = field(default_factory=list)
    """More report metrics shown in the trial tables (objectives always are)."""
    claims: list[Claim] = field(default_factory=list)
    """Comparisons between variants decided at the end with paired bootstrap intervals over prompts and a seed
    spread (``evaluation/claims.py``); each ``{name, better, worse, metric}`` names two variants or "teacher"."""
    heartbeat_interval: float = 20.0
    """Seconds between a running trial's heartbeats in the storage."""
    grace_period: float = 120.0
    """A running trial whose heartbeat is this old (or whose worker on this host is gone) is failed and retried."""

    source: str = ""
    """Path of the sweep file (set by the loader)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ValueError(f"name={self.name!r}; allowed letters, digits, '_', '.', '-' (it names folders)")
        if not self.space and not self.variants:
            raise ValueError("space: empty and no variants; a sweep needs at least one parameter")
        if not self.objectives:
            raise ValueError("objectives: at least one metric → direction")
        paths = [p.path for p in self.space]
        if self.variants and VARIANT_PARAM in paths:
            raise ValueError(f"space: {VARIANT_PARAM!r} is the parameter that picks among variants")
        metrics = [o.metric for o in self.objectives]
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"objectives: {metrics} repeats a metric")
        if self.trials is not None and (isinstance(self.trials, bool) or self.trials < 1):
            raise ValueError(f"trials={self.trials}; allowed >= 1 (or null: the grid's size)")
        for name in ("timeout", "heartbeat_interval", "grace_period"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}={value}; allowed > 0")
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError(
                f"grace_period={self.grace_period} must exceed heartbeat_interval={self.heartbeat_interval}"
            )
        names = {v.name for v in self.variants} | {TEACHER}
        for claim in self.claims:
            for side in (claim.better, claim.worse):
                if side not in names:
                    raise ValueError(f"claims: {claim.name!r} names {side!r}; allowed variants {sorted(names)}")
        if self.sampler.name == "grid":
            size = self.grid_size()
            if self.trials is not None and self.trials > size:
                raise ValueError(f"trials={self.trials} exceeds the grid's {size} points")
        elif self.trials is None and self.timeout is None:
            raise ValueError(f"trials and timeout both null: the {self.sampler.name} sampler needs one of them")

    @property
    def params(self) -> list[ParamSpec]:
        """The Optuna parameters: ``variant`` (when there are variants) and the space, in file order."""
        if not self.variants:
            return list(self.space)
        variant = ParamSpec(VARIANT_PARAM, choices=[v.name for v in self.variants])
        return [variant, *self.space]

    def grid(self) -> dict[str, list[Any]]:
        """The grid sampler's search space (ValueError for a continuous parameter)."""
        grid = {}
        for p in self.params:
            try:
                grid[p.path] = p.grid_values()
            except ValueError as err:
                raise ValueError(f"space.{p.path}: {err}") from None
        return grid

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid().values())

    @property
    def n_trials(self) -> int | None:
        """Trials in all (the grid's size when not given for a grid)."""
        if self.trials is None and self.sampler.name == "grid":
            return self.grid_size()
        return self.trials

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def variant(self, name: str | None) -> VariantSpec:
        if name is None:
            return VariantSpec(name="base", base=self.base)
        return next(v for v in self.variants if v.name == name)

    def bases(self) -> list[str]:
        """Every experiment file a trial may start from."""
        if not self.variants:
            return [self.base]
        return list(dict.fromkeys(v.base or self.base for v in self.variants))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- loading -----------------------------------------------------------------------------------------------------
def _build(cls: type, data: Any, where: str, **extra: Any) -> Any:
    """``cls(**data)`` with unknown keys and validation errors reported as one line naming ``where``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping, got {data!r}")
    allowed = [f.name for f in dataclasses.fields(cls) if f.name not in extra and f.name != "source"]
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; allowed {allowed}")
    try:
        return cls(**data, **extra)
    except (TypeError, ValueError) as err:
        raise UserError(f"{where}: {err}") from None


def _space(data: Any, where: str) -> list[ParamSpec]:
    if data is None:
        return []
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of config path → values, got {data!r}")
    params = []
    for path, value in data.items():
        if isinstance(value, list):
            value = {"type": "categorical", "choices": value}
        elif not isinstance(value, dict):
            raise UserError(
                f"{where}.{path}: {value!r}; give a list of choices or {{type: int|float, low: .., high: ..}}"
            )
        params.append(_build(ParamSpec, value, f"{where}.{path}", path=str(path)))
    return params


def _variants(data: Any, where: str) -> list[VariantSpec]:
    if data is None:
        return []
    if not isinstance(data, dict) or not data:
        raise UserError(f"{where}: expected a non-empty mapping of variant name → {{base, overrides}}, got {data!r}")
    return [_build(VariantSpec, value, f"{where}.{name}", name=str(name)) for name, value in data.items()]


def _objectives(data: Any, where: str) -> list[ObjectiveSpec]:
    if not isinstance(data, dict) or not data:
        raise UserError(f"{where}: expected a mapping of metric → maximize|minimize, got {data!r}")
    out = []
    for metric, direction in data.items():
        try:
            out.append(ObjectiveSpec(str(metric), direction))
        except ValueError as err:
            raise UserError(f"{where}: {err}") from None
    return out


def _claims(data: Any, where: str) -> list[Claim]:
    if data is None:
        return []
    if not isinstance(data, list):
        raise UserError(f"{where}: expected a list of {{name, better, worse, metric}}, got {data!r}")
    return [_build(Claim, item, f"{where}[{i}]") for i, item in enumerate(data)]


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and check a sweep file (UserError naming the file and key on any problem)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep file {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"sweep file {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"sweep file {path}: expected a mapping at the top level")
    where = str(path)
    nested = {
        "space": _space(data.get("space"), f"{where}: space"),
        "variants": _variants(data.get("variants"), f"{where}: variants"),
        "sampler": _build(SamplerSpec, data.get("sampler"), f"{where}: sampler"),
        "trial": _build(TrialSpec, data.get("trial"), f"{where}: trial"),
        "claims": _claims(data.get("claims"), f"{where}: claims"),
    }
    if "objectives" not in data:
        raise UserError(f"{where}: objectives missing (metric → maximize|minimize)")
    nested["objectives"] = _objectives(data["objectives"], f"{where}: objectives")
    if data.get("pruning") is not None:
        nested["pruning"] = _build(PruningSpec, data["pruning"], f"{where}: pruning")
    for key in ("name", "base"):
        if key not in data:
            raise UserError(f"{where}: {key} missing")
    rest = {k: v for k, v in data.items() if k not in (*nested, "pruning")}
    return _build(SweepSpec, rest, where, **nested, source=str(path))
