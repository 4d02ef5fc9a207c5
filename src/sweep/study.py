"""The study itself: storage, sampler, pruner, directions, and whether a trial uses up budget.

Reopening a study (to resume it, or to join it from another worker) is refused when the sweep that made it differed
in what its results depend on (search space, objectives, sampler, base experiments); the trial count, timeout and
storage may change.
"""

from __future__ import annotations

import dataclasses
import os

import optuna
from optuna.trial import FrozenTrial, TrialState

from src.content_hash import content_hash
from src.errors import UserError
from src.sweep import configs
from src.sweep.pruning import make_pruner
from src.sweep.spec import SweepSpec
from src.sweep.storage import open_storage


class AskTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler without its ``study.stop()`` after the last point (only valid inside ``optimize``;
    the driver's budget already ends the study)."""

    def after_trial(self, study, trial, state, values) -> None:
        return None


def make_sampler(spec: SweepSpec, joining: bool) -> optuna.samplers.BaseSampler:
    s = spec.sampler
    # Workers that join a running study must not replay the same random proposals; the grid's seed only shuffles
    # the order of points, which every worker must agree on.
    seed = s.seed if s.seed is None or s.name == "grid" or not joining else s.seed + os.getpid()
    try:
        if s.name == "grid":
            return AskTellGridSampler(spec.grid(), seed=seed, **s.options)
        if s.name == "random":
            return optuna.samplers.RandomSampler(seed=seed, **s.options)
        if s.name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, **s.options)
        return optuna.samplers.TPESampler(**{"seed": seed, "constant_liar": True, **s.options})
    except TypeError as err:
        raise UserError(f"{spec.source}: sampler.options: {err}") from None


def fingerprint(spec: SweepSpec) -> str:
    """What the study's results depend on; a resumed study must match (trials, timeout, storage may change)."""
    names = [v.name for v in spec.variants] or [None]
    content = {
        "bases": {str(n): configs.variant_base(spec, n) for n in names},
        "space": [dataclasses.asdict(p) for p in spec.space],
        "trial_overrides": spec.trial.overrides,
        "objectives": [dataclasses.asdict(o) for o in spec.objectives],
        "sampler": [spec.sampler.name, spec.sampler.options],
    }
    return content_hash(content)


def counts(t: FrozenTrial) -> bool:
    """Whether a trial uses up budget: everything that ran or runs, except interrupted (retried) and skipped ones."""
    if t.state == TrialState.WAITING or t.user_attrs.get("skipped"):
        return False
    return not (t.state == TrialState.FAIL and t.user_attrs.get("interrupted"))


def open_study(spec: SweepSpec, url: str) -> optuna.Study:
    storage = open_storage(url)
    try:
        existing = optuna.load_study(study_name=spec.name, storage=storage)
        joining = any(t.state == TrialState.RUNNING for t in existing.get_trials(deepcopy=False))
    except KeyError:
        joining = False
    pruner = optuna.pruners.NopPruner()
    if spec.pruning is not None and not spec.multi_objective:
        try:
            pruner = make_pruner(spec.pruning.pruner, spec.pruning.options)
        except ValueError as err:
            raise UserError(f"{spec.source}: pruning: {err}") from None
    study = optuna.create_study(
        study_name=spec.name,
        storage=storage,
        sampler=make_sampler(spec, joining),
        pruner=pruner,
        directions=spec.directions,
        load_if_exists=True,
    )
    wanted = [optuna.study.StudyDirection[d.upper()] for d in spec.directions]
    if list(study.directions) != wanted:
        raise UserError(
            f"study {spec.name!r} in {url} optimises {[d.name.lower() for d in study.directions]}, the sweep file "
            f"{spec.directions}; use another name or storage"
        )
    mark = fingerprint(spec)
    recorded = study.user_attrs.get("sweep_fingerprint")
    if recorded is None:
        study.set_user_attr("sweep_fingerprint", mark)
    elif recorded != mark:
        raise UserError(
            f"study {spec.name!r} in {url} was started from a different sweep (search space, objectives, sampler or "
            "base experiments); its trials are kept untouched — use another name or storage"
        )
    return study
