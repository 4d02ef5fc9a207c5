"""A trial's config: the base YAML, its variant, the shortened schedule and the sampled values.

Two kinds of base: a Dense2MoE experiment (``stages:``; ``python -m src.cli fit`` runs ``run_experiment``) and a
LightningCLI fit config (``model:``/``trainer:``, e.g. the class-conditional DiT). Config paths are dotted keys
into the YAML (``student.conversion.layout``, ``model.init_args.lr``); a list of stages is indexed by position, by
stage name or with ``*`` for every stage (``stages.1.lr``, ``stages.stage2_moe.lr``, ``stages.*.batch_size``).
The checks that run before any trial are in ``src/sweep/checks.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any

from src.config_files import EXPERIMENT_PATHS, HUB_KEYS, include_chain, resolve_in_config
from src.errors import UserError
from src.sweep.spec import VARIANT_PARAM, SweepSpec
from src.training.distill import StageSpec
from src.training.mlflow_logging import MLflowLogger
from src.training.runner import run_experiment
from src.training.trainer_spec import TRAINER_DEFAULTS

DRIVER_KEYS = (
    "name",
    "output_dir",
    "experiment_name",
    "tracking_uri",
    "only_stage",
    "callbacks",
    "mlflow_parent_run_id",
)
"""Arguments the sweep driver sets for every trial (not searchable)."""
SCHEDULE_FIELDS = ("steps", "warmup_steps", "checkpoint_every")
"""Stage fields that ``trial.steps_scale`` shortens (``checkpoint_every`` where the stage's value comes from: its
``trainer`` section, its shorthand key, the experiment's ``trainer`` section or the default)."""


# --- the schema ------------------------------------------------------------------------------------------------
@cache
def _root_types() -> dict[str, Any]:
    hints = typing.get_type_hints(run_experiment)
    hints.pop("return", None)
    return hints


def _unwrap(tp: Any) -> Any:
    """``X | None`` → ``X``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def check_path(path: str, config: dict[str, Any], where: str) -> None:
    """UserError unless ``path`` names a field of the experiment schema (list elements must exist in ``config``)."""
    segments = path.split(".")
    root = _root_types()
    if segments[0] in DRIVER_KEYS:
        raise UserError(f"{where}: {path!r}: {segments[0]!r} is set by the sweep driver for every trial")
    if segments[0] not in root:
        allowed = [k for k in root if k not in DRIVER_KEYS]
        raise UserError(f"{where}: unknown config path {path!r}: no key {segments[0]!r}; allowed {allowed}")
    tp, node = root[segments[0]], config.get(segments[0])
    for i, seg in enumerate(segments[1:], start=1):
        parent = ".".join(segments[:i])
        tp = _unwrap(tp)
        origin = typing.get_origin(tp)
        if tp is Any or tp is dict or origin is dict:
            return  # a free-form mapping (teacher.expected, trainer.extra)
        if origin is list:
            items = node if isinstance(node, list) else []
            names = [it.get("name") for it in items if isinstance(it, dict)]
            if seg == "*":
                node = None
            elif seg.isdigit() and int(seg) < len(items):
                node = items[int(seg)]
            elif seg in names:
                node = items[names.index(seg)]
            else:
                raise UserError(
                    f"{where}: unknown config path {path!r}: {parent} has no element {seg!r}; allowed an index "
                    f"0..{len(items) - 1}, a name {names} or '*'"
                )
            tp = typing.get_args(tp)[0]
            continue
        if dataclasses.is_dataclass(tp):
            fields = _fields(tp)
            if seg not in fields:
                raise UserError(
                    f"{where}: unknown config path {path!r}: {parent} has no key {seg!r}; allowed {list(fields)}"
                )
            tp, node = fields[seg], node.get(seg) if isinstance(node, dict) else None
            continue
        raise UserError(f"{where}: unknown config path {path!r}: {parent} is a single value, it has no key {seg!r}")


def set_path(config: dict[str, Any], path: str, value: Any) -> None:
    """Set ``value`` at ``path`` in a YAML-like config, creating mappings on the way."""
    if path.split(".")[0] == "student" and "student" not in config:
        config["student"] = {"conversion": {}}  # run_experiment's default student is a 1S12E2A MoE
    _set(config, path.split("."), value, path)


def _set(node: Any, segments: list[str], value: Any, path: str) -> None:
    seg, rest = segments[0], segments[1:]
    if isinstance(node, list):
        names = [it.get("name") if isinstance(it, dict) else None for it in node]
        if seg == "*":
            indices = range(len(node))
        elif seg.isdigit():
            indices = [int(seg)] if int(seg) < len(node) else []
        else:
            indices = [i for i, name in enumerate(names) if name == seg]
        if not indices:
            raise UserError(f"config path {path!r}: no element {seg!r} in a list of {len(node)} ({names})")
        for i in indices:
            if not rest:
                node[i] = copy.deepcopy(value)
                continue
            if not isinstance(node[i], (dict, list)):
                node[i] = {}
            _set(node[i], rest, value, path)
        return
    if not rest:
        node[seg] = copy.deepcopy(value)
        return
    if not isinstance(node.get(seg), (dict, list)):
        node[seg] = {}
    _set(node[seg], rest, value, path)


# --- building a trial's config -----------------------------------------------------------------------------------
def resolve_base(path: str, sweep_file: str) -> Path:
    """An experiment file as given (relative to the working folder), else as a path written in the sweep file:
    beside it, else under the project root (src/config_files.py)."""
    given = Path(path)
    if given.is_file() or given.is_absolute():
        return given
    return Path(resolve_in_config(path, Path(sweep_file)))


@cache
def _read_base(path: Path) -> dict[str, Any]:
    data = _flattened(path)
    if "stages" not in data and "model" not in data:
        raise UserError(
            f"base experiment {path}: neither a Dense2MoE experiment ('stages:') nor a LightningCLI fit config ('model:')"
        )
    return data


def _flattened(path: Path) -> dict[str, Any]:
    """A config file with the files it includes merged under it as jsonargparse merges them (a top-level section a
    later file sets replaces the earlier one whole), each file's relative paths made absolute against that file: a
    trial's config.yaml lives in another folder."""
    if not path.is_file():
        raise UserError(f"base experiment {path}: no such file")
    merged: dict[str, Any] = {}
    for file, data in include_chain(path):
        data = {k: v for k, v in copy.deepcopy(data).items() if k != "config"}
        for key in EXPERIMENT_PATHS:
            node, *rest = key.split(".")
            holder = data if not rest else data.get(node)
            leaf = rest[0] if rest else node
            if isinstance(holder, dict) and isinstance(holder.get(leaf), str):
                holder[leaf] = resolve_in_config(holder[leaf], file, may_be_hub_id=key in HUB_KEYS)
        merged |= data
    return merged


def is_experiment(config: dict[str, Any]) -> bool:
    """A Dense2MoE experiment (else a LightningCLI fit config)."""
    return "stages" in config


def load_base(path: str, sweep_file: str) -> dict[str, Any]:
    """The base config with what it includes merged in and its relative paths made absolute."""
    return copy.deepcopy(_read_base(resolve_base(path, sweep_file)))


def _stage_default(name: str) -> Any:
    return StageSpec.__dataclass_fields__[name].default


def _scaled(value: int, scale: float) -> int:
    return max(1, round(value * scale))


def shorten(config: dict[str, Any], scale: float) -> None:
    """Every stage's steps, warm-up and checkpoint interval times ``scale`` (at least 1)."""
    if scale == 1.0:
        return
    top = config.get("trainer") if isinstance(config.get("trainer"), dict) else {}
    for stage in config["stages"]:
        for name in ("steps", "warmup_steps"):
            stage[name] = _scaled(stage.get(name, _stage_default(name)), scale)
        section = stage.get("trainer") if isinstance(stage.get("trainer"), dict) else None
        own = [node for node in (section, stage) if node is not None and node.get("checkpoint_every") is not None]
        if own:  # the stage's own value (its section and its shorthand key agree, or parsing refuses them)
            for node in own:
                node["checkpoint_every"] = _scaled(node["checkpoint_every"], scale)
            continue
        inherited = top.get("checkpoint_every")
        every = _scaled(TRAINER_DEFAULTS["checkpoint_every"] if inherited is None else inherited, scale)
        if section is None:
            stage["trainer"] = section = {}
        section["checkpoint_every"] = every


def variant_base(spec: SweepSpec, variant: str | None) -> dict[str, Any]:
    """The variant's experiment with its overrides and the trial's stage selection and schedule applied."""
    v = spec.variant(variant)
    config = load_base(v.base or spec.base, spec.source)
    for path, value in v.overrides.items():
        set_path(config, path, value)
    if is_experiment(config):
        if spec.trial.stages is not None:
            config["stages"] = [s for s in config["stages"] if s.get("name") in spec.trial.stages]
        shorten(config, spec.trial.steps_scale)
    return config


def trial_config(spec: SweepSpec, values: dict[str, Any]) -> dict[str, Any]:
    """The complete experiment config of a trial, from its parameter values (config values, keyed by path)."""
    config = variant_base(spec, values.get(VARIANT_PARAM))
    for path, value in spec.trial.overrides.items():
        set_path(config, path, value)
    for p in spec.space:
        set_path(config, p.path, values[p.path])
    return config


def stage_offsets(config: dict[str, Any]) -> dict[str, int]:
    """Steps of the stages before each stage (pruning reports one increasing step across a trial's stages)."""
    offsets, total = {}, 0
    for stage in config["stages"]:
        offsets[stage["name"]] = total
        total += stage.get("steps", _stage_default("steps"))
    return offsets


def fill_trial_dir(node: Any, trial_dir: Path) -> Any:
    """``{trial_dir}`` in every string of a config → the trial's folder."""
    if isinstance(node, dict):
        return {k: fill_trial_dir(v, trial_dir) for k, v in node.items()}
    if isinstance(node, list):
        return [fill_trial_dir(v, trial_dir) for v in node]
    if isinstance(node, str) and "{trial_dir}" in node:
        return node.replace("{trial_dir}", str(trial_dir))
    return node


def place_lightning_run(
    config: dict[str, Any], run_dir: Path, experiment_name: str, run_name: str, tracking_uri: str
) -> dict[str, Any]:
    """A LightningCLI config whose outputs land in ``run_dir`` and whose MLflow run is the sweep's (nested under the
    trial run through ``DENSE2MOE_PARENT_RUN_ID``, which the project's MLflow logger reads)."""
    config = copy.deepcopy(config)
    trainer = config.setdefault("trainer", {}) or {}
    config["trainer"] = trainer
    trainer["default_root_dir"] = str(run_dir)
    logger_path = f"{MLflowLogger.__module__}.{MLflowLogger.__name__}"
    logger = trainer.get("logger")
    init = (
        dict(logger.get("init_args") or {})
        if isinstance(logger, dict) and logger.get("class_path") == logger_path
        else {}
    )
    init |= {"experiment_name": experiment_name, "run_name": run_name, "tracking_uri": tracking_uri}
    trainer["logger"] = {"class_path": logger_path, "init_args": init}
    for callback in trainer.get("callbacks") or []:
        if isinstance(callback, dict) and str(callback.get("class_path", "")).endswith("ModelCheckpoint"):
            callback.setdefault("init_args", {})["dirpath"] = str(run_dir / "checkpoints")
    return config
