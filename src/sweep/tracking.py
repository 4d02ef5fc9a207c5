"""MLflow for a study: one parent run per study, one nested run per trial, the trial's experiment nested below.

study run (tags sweep.study, sweep.role=study; the sweep file, plots and tables as artifacts)
└── trial run per trial (tags sweep.study, sweep.trial, sweep.state, sweep.fail_reason; params; objective values)
    └── the experiment's parent run (src/training/runner.py), and its stage runs below it
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.entities import Metric, Param

from src.training.mlflow_logging import experiment_id, flat_params, log_new_params

STUDY_RUN_ATTR = "mlflow_parent_run_id"
"""Study user attribute holding the study's MLflow run id (shared by every worker)."""
RUN_STATUS = {"COMPLETE": "FINISHED", "FAIL": "FAILED", "PRUNED": "KILLED"}
MAX_TAG = 5000


def mlflow_key(name: str) -> str:
    """MLflow keys allow letters, digits, ``_ - . / `` and spaces (a path like ``stages.*.lr`` has a ``*``)."""
    return re.sub(r"[^\w\-. /]", "_", name)


class Tracker:
    """The MLflow side of one worker process."""

    def __init__(self, uri: str, experiment_name: str) -> None:
        self.uri, self.experiment_name = uri, experiment_name
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        self.experiment_id = experiment_id(self.client, experiment_name)  # a model-training experiment in the UI

    def study_run(self, study: Any, params: dict[str, Any], sweep_text: str) -> str:
        """The study's parent run: the one recorded in the study, else a new one (a resumed study reuses it)."""
        existing = study.user_attrs.get(STUDY_RUN_ATTR)
        if existing:
            try:
                self.client.get_run(existing)
                self.client.update_run(existing, status="RUNNING")
                return existing
            except mlflow.exceptions.MlflowException:
                pass  # the study outlived its MLflow store: start a new parent run
        tags = {"sweep.study": study.study_name, "sweep.role": "study"}
        run = self.client.create_run(self.experiment_id, run_name=study.study_name, tags=tags)
        run_id = run.info.run_id
        study.set_user_attr(STUDY_RUN_ATTR, run_id)
        winner = study.user_attrs.get(STUDY_RUN_ATTR)
        if winner != run_id:  # two workers started together: keep the one the study recorded
            self.client.delete_run(run_id)
            return winner
        self.client.log_batch(run_id, params=[Param(mlflow_key(k), str(v)[:6000]) for k, v in params.items()])
        self.client.log_text(run_id, sweep_text, "sweep.yaml")
        return run_id

    def start_trial(
        self, parent_id: str, study_name: str, number: int, params: dict[str, Any], config: dict[str, Any]
    ) -> str:
        """The trial's run: its sampled params, its whole config as ``config.yaml`` and flattened (the keys the
        experiment's own parent run has: ``student/conversion/layout``, ``stages/<name>/lr``, …)."""
        tags = {
            "mlflow.parentRunId": parent_id,
            "sweep.study": study_name,
            "sweep.trial": str(number),
            "sweep.state": "RUNNING",
            "kind": "sweep_trial",
            "experiment": str(config.get("name", study_name)),
        }
        run = self.client.create_run(self.experiment_id, run_name=f"{study_name}/trial {number}", tags=tags)
        run_id = run.info.run_id
        self.client.log_batch(run_id, params=[Param(mlflow_key(k), str(v)[:6000]) for k, v in params.items()])
        log_new_params(self.client, run_id, {mlflow_key(k): v for k, v in _config_params(config).items()})
        self.client.log_text(run_id, yaml.safe_dump(config, sort_keys=False), "config.yaml")
        return run_id

    def finish_trial(self, run_id: str, state: str, metrics: dict[str, float], reason: str | None = None) -> None:
        """Final state (COMPLETE, FAIL, PRUNED) as tag and run status, with the trial's metrics and failure reason."""
        self.client.set_tag(run_id, "sweep.state", state)
        if reason:
            self.client.set_tag(run_id, "sweep.fail_reason", reason[:MAX_TAG])
        finite = [Metric(mlflow_key(k), float(v), 0, 0) for k, v in metrics.items() if _finite(v)]
        if finite:
            self.client.log_batch(run_id, metrics=finite)
        self.client.set_terminated(run_id, RUN_STATUS[state])

    def child_metrics(self, trial_run_id: str) -> dict[str, float]:
        """Latest values of the metrics logged by the runs nested directly under a trial's run (a LightningCLI fit)."""
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{trial_run_id}'"
        )
        metrics: dict[str, float] = {}
        for run in runs:
            metrics |= {k: float(v) for k, v in run.data.metrics.items()}
        return metrics

    def log_trial_on_study(self, parent_id: str, number: int, values: dict[str, float]) -> None:
        """Objective values of a finished trial on the study run, stepped by trial number (a history chart)."""
        metrics = [Metric(mlflow_key(f"trials/{k}"), float(v), 0, number) for k, v in values.items() if _finite(v)]
        if metrics:
            self.client.log_batch(parent_id, metrics=metrics)

    def finish_study(
        self, parent_id: str, status: str, metrics: dict[str, float], files: list[tuple[Path, str]]
    ) -> None:
        """Final metrics, artifacts (file, artifact folder) and status of the study run."""
        finite = [Metric(mlflow_key(k), float(v), 0, 0) for k, v in metrics.items() if _finite(v)]
        if finite:
            self.client.log_batch(parent_id, metrics=finite)
        for path, folder in files:
            self.client.log_artifact(parent_id, str(path), folder or None)
        self.client.set_terminated(parent_id, status)


def _config_params(config: dict[str, Any]) -> dict[str, Any]:
    """An experiment config flattened as src/training/describe.py names its params (stages by name)."""
    config = dict(config)
    stages = config.pop("stages", None)
    top = {k: config.pop(k) for k in list(config) if not isinstance(config[k], dict)}
    params = flat_params(config) | flat_params({"experiment": top})
    if isinstance(stages, list):
        params |= flat_params({"stages": {str(s.get("name", i)): s for i, s in enumerate(stages)}})
    return params


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
