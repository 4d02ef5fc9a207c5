"""What an experiment's MLflow runs say about themselves, so a run found in the UI explains its own result.

Every run of a ``fit`` (the parent run and each stage's run) carries the resolved experiment config as a
``config.yaml`` artifact and, as params, that config flattened to ``teacher/path``, ``student/conversion/layout``,
``student/mob/group_size``, ``stages/<name>/lr``, ``experiment/seed``, … plus what the YAML does not say: the sha256 of the teacher's
weights, its data world and the resolved expert widths. The parent run has every stage's settings; a stage run has
its own (``stage/...``, logged by the module) and the experiment-wide ones.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from evaluation.provenance import model_fingerprint
from src.data.worlds import model_world
from src.models.student import dense_ffn_width
from src.training.experiment import Experiment
from src.training.mlflow_logging import flat_params


def experiment_config(exp: Experiment) -> dict[str, Any]:
    """The experiment as it runs, every default filled in (a valid experiment YAML): each stage with its resolved
    ``trainer`` section, so the experiment's own section (their defaults) is left out."""
    skipped = ("callbacks", "trainer")
    as_dict = {f.name: getattr(exp, f.name) for f in dataclasses.fields(exp) if f.name not in skipped}
    plain = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in as_dict.items()}
    plain["stages"] = [s.as_dict() for s in exp.stages]
    plain["output_dir"] = str(exp.output_dir)
    return plain


def config_yaml(exp: Experiment) -> str:
    return yaml.safe_dump(experiment_config(exp), sort_keys=False)


def experiment_params(exp: Experiment, teacher, folder: Path) -> dict[str, Any]:
    """The parent run's params: the flattened config (stages by name), the teacher's hash and world, widths."""
    config = experiment_config(exp)
    stages = {s["name"]: s for s in config.pop("stages")}
    top = {k: config.pop(k) for k in list(config) if not isinstance(config[k], dict)}
    params = flat_params(config) | flat_params({"experiment": top, "stages": stages})
    params["stages/order"] = ",".join(f"{s.name}:{s.kind}" for s in exp.stages)
    params["teacher/sha256"] = model_fingerprint(folder)
    params["data/world"] = model_world(teacher)
    conversion = exp.student.conversion
    if conversion is not None:
        try:
            ffn_width = _ffn_width(teacher, exp)
            moe = conversion.moe_config(ffn_width)
        except ValueError:  # refused later, with its own message, when the student is built
            return params
        params["student/conversion/dense_ffn_width"] = ffn_width
        params["student/conversion/expert_width"] = moe.expert_width or 0
        params["student/conversion/shared_width"] = moe.shared_width or 0
    return params


def stage_params(params: dict[str, Any]) -> dict[str, Any]:
    """A stage run's share of the parent's params: all but the other stages' settings (its own are ``stage/``)."""
    return {k: v for k, v in params.items() if not k.startswith("stages/") or k == "stages/order"}


def _ffn_width(teacher, exp: Experiment) -> int:
    """The dense FFN width the conversion splits (after width pruning, as src/models/student.py does)."""
    width = dense_ffn_width(teacher)
    prune = exp.student.prune
    if prune is not None and prune.kind == "width":
        width = max(1, round(prune.ffn_fraction * width))
    return width
