"""Everything about a sweep that can be known without running a trial, checked before the first one starts.

Config paths are checked against the experiment schema (the arguments of ``run_experiment`` and their
dataclasses); every value a parameter can take (each choice, or low and high) is put into a trial config and
parsed the way ``fit`` will parse it; objective metrics are checked against what the end-of-fit report writes.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from functools import cache
from typing import Any

from jsonargparse import ArgumentError, ArgumentParser
from lightning.pytorch.cli import LightningCLI

from src.config_parsing import config_error_line, instantiate, user_facing_error
from src.errors import UserError
from src.models.convert import ConversionConfig
from src.sweep.configs import check_path, is_experiment, load_base, trial_config, variant_base
from src.sweep.pruning import TRAIN_METRICS
from src.sweep.spec import VARIANT_PARAM, SweepSpec
from src.training.experiment import StudentSpec, validate_order, validate_schedules, with_trainer_defaults
from src.training.report import summary_keys
from src.training.runner import run_experiment

MAX_COMBINATIONS = 64
"""Combinations of the other parameters' bounds tried before a value is called invalid (m ≤ κ-style couplings)."""


@cache
def _experiment_parser():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_function_arguments(run_experiment, as_positional=False)
    return parser


def _experiment_problem(config: dict[str, Any]) -> str | None:
    parser = _experiment_parser()
    try:
        init = instantiate(parser, parser.parse_object(copy.deepcopy(config)))  # parse_object edits its input
        student = init.student or StudentSpec(conversion=ConversionConfig())
        validate_order(init.stages, student)
        validate_schedules(init.evaluation, student, init.data)
        with_trainer_defaults(init.stages, init.trainer)
    except ArgumentError as err:
        return config_error_line(err)
    except UserError as err:
        return str(err)
    except ValueError as err:
        return user_facing_error(err) or str(err).strip().splitlines()[0]
    return None


def _lightning_problem(config: dict[str, Any]) -> str | None:
    """Parse (without instantiating anything) the way ``python -m src.cli fit --config`` will."""

    class ParseOnly(LightningCLI):
        def _set_seed(self) -> None:
            return None

        def instantiate_classes(self) -> None:
            return None

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "args given while sys.argv has arguments": intended here
            ParseOnly(
                model_class=None,
                datamodule_class=None,
                save_config_callback=None,
                auto_configure_optimizers=False,
                run=False,
                parser_kwargs={"exit_on_error": False},
                args=copy.deepcopy(config),
            )
    except ArgumentError as err:
        return config_error_line(err)
    except (ValueError, TypeError) as err:
        return str(err).strip().splitlines()[0]
    return None


def config_problem(config: dict[str, Any]) -> str | None:
    """Why ``fit`` would refuse this config before running anything (None: it wouldn't)."""
    return _experiment_problem(config) if is_experiment(config) else _lightning_problem(config)


def check_sweep(spec: SweepSpec) -> None:
    """UserError, naming the sweep file and the key, on the first problem found."""
    where = spec.source
    names = [v.name for v in spec.variants] or [None]
    raw = {name: load_base(spec.variant(name).base or spec.base, spec.source) for name in names}
    for v in spec.variants:
        if is_experiment(raw[v.name]):
            for path in v.overrides:
                check_path(path, raw[v.name], f"{where}: variants.{v.name}.overrides")
    experiments = [name for name in names if is_experiment(raw[name])]
    if len(experiments) < len(names) and (spec.trial.stages is not None or spec.trial.steps_scale != 1.0):
        raise UserError(
            f"{where}: trial.stages and trial.steps_scale apply to Dense2MoE experiments; for a LightningCLI base "
            "set trainer.max_steps in trial.overrides"
        )
    if spec.trial.stages is not None:
        known = {s.get("name") for name in names for s in raw[name]["stages"]}
        missing = [s for s in spec.trial.stages if s not in known]
        if missing:
            raise UserError(f"{where}: trial.stages: {missing} not in the base experiment(s); allowed {sorted(known)}")
    bases = {name: variant_base(spec, name) for name in names}
    for name in experiments:
        if not bases[name]["stages"]:
            raise UserError(f"{where}: trial.stages={spec.trial.stages} keeps no stage of {name or spec.base}")
        for path in spec.trial.overrides:
            check_path(path, bases[name], f"{where}: trial.overrides")
        for p in spec.space:
            check_path(p.path, bases[name], f"{where}: space")
    for name in experiments:
        known = summary_keys((bases[name].get("data") or {}).get("kind", "shapes"))
        for metric in [o.metric for o in spec.objectives] + list(spec.report_metrics):
            if metric not in known:
                raise UserError(f"{where}: metric {metric!r} is not in a run's report/summary.json; allowed {known}")
    if experiments:
        if spec.pruning is not None and spec.pruning.monitor not in TRAIN_METRICS:
            raise UserError(
                f"{where}: pruning.monitor={spec.pruning.monitor!r} is not logged by every stage; "
                f"allowed {list(TRAIN_METRICS)}"
            )
    for name in names:
        _check_values(spec, name)


def _check_values(spec: SweepSpec, variant: str | None) -> None:
    """Each value of each parameter must give a valid config with some values of the others."""
    label = f" (variant {variant})" if variant else ""
    where = spec.source
    params = spec.space
    if not params:
        config = trial_config(spec, {VARIANT_PARAM: variant})
        problem = config_problem(config)
        if problem:
            raise UserError(f"{where}: variant {variant}: {problem}")
        _check_evaluation(config, where + label)
        return
    for p in params:
        others = [q for q in params if q is not p]
        for value in p.bounds():
            problem = None
            for combo in itertools.islice(itertools.product(*(q.bounds() for q in others)), MAX_COMBINATIONS):
                values = {q.path: v for q, v in zip(others, combo)} | {p.path: value, VARIANT_PARAM: variant}
                config = trial_config(spec, values)
                problem = config_problem(config)
                if problem is None:
                    _check_evaluation(config, where + label)
                    break
            if problem:
                raise UserError(f"{where}: space.{p.path}={value!r}{label}: {problem}")


def _check_evaluation(config: dict[str, Any], where: str) -> None:
    if is_experiment(config) and (config.get("evaluation") or {}).get("enabled", True) is False:
        raise UserError(f"{where}: evaluation.enabled is false, but the objectives come from the evaluation report")
