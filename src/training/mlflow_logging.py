"""MLflow as the default experiment tracker.

Pitfalls handled here (docs/design.md §8.1, §8.2): MLflow 3.17 refuses the plain file store, so the default is a local SQLite
store; Lightning's ``SaveConfigCallback`` asserts a log_dir that ``MLFlowLogger`` with SQLite doesn't have, so the
resolved config is logged as an MLflow artifact instead; ``MLFlowLogger`` reads ``MLFLOW_TRACKING_URI`` at import
time, so the URI is resolved here at construction time.
"""

from __future__ import annotations

import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.entities import Param

from src.errors import UserError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")
"""SQLAlchemy databases MLflow stores runs in (a ``+driver`` suffix is allowed)."""
TRACKING_SCHEMES = ("sqlite", "http", "https", "file", "databricks", "databricks-uc", *DATABASE_SCHEMES)


def resolve_tracking_uri(uri: str | None = None) -> str:
    """Explicit URI > ``MLFLOW_TRACKING_URI`` > the local SQLite store ``./mlflow.db``."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail early, with one clear line, on a tracking URI that cannot work."""
    allowed = "sqlite:///path/to/mlflow.db, http(s)://host:port of a running MLflow server, or databricks"
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        folder = db.parent if str(db.parent) else Path(".")
        if not folder.is_dir():
            raise UserError(f"MLflow tracking URI {uri}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise UserError(f"MLflow tracking URI {uri}: {db} is not writable")
    elif uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UserError(f"MLflow tracking URI {uri} is unreachable ({reason}); allowed: {allowed}") from None
    elif "://" in uri and uri.split("://", 1)[0].split("+", 1)[0] not in TRACKING_SCHEMES:
        scheme = uri.split("://", 1)[0]
        raise UserError(
            f"MLflow tracking URI {uri!r}: unknown scheme {scheme!r}; allowed: {allowed} "
            f"(or a database URL: {', '.join(DATABASE_SCHEMES)})"
        )
    elif uri.startswith("file:") or "://" not in uri and not uri.startswith("databricks"):
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
            raise UserError(
                f"MLflow tracking URI {uri!r}: MLflow 3 refuses the file store unless MLFLOW_ALLOW_FILE_STORE=true; "
                f"allowed: {allowed}"
            )


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
"""MLflow 3's UI shows an experiment with this kind as model training (runs, params, charts), not GenAI traces."""
MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit
MAX_PARAM_VALUE = 6000


def experiment_id(client, name: str) -> str:
    """The id of MLflow experiment ``name``, created (or tagged, when older) as a model-training experiment."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
        except mlflow.exceptions.MlflowException:  # another process created it first
            experiment = client.get_experiment_by_name(name)
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return experiment.experiment_id


def log_new_params(client, run_id: str, params: dict[str, Any]) -> None:
    """Log the params the run does not have yet (MLflow refuses to change one; a resumed run keeps its first)."""
    have = client.get_run(run_id).data.params
    new = [Param(k, str(v)[:MAX_PARAM_VALUE]) for k, v in params.items() if k not in have]
    for start in range(0, len(new), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=new[start : start + MAX_PARAMS_PER_BATCH])


def mark_interrupted_runs(client, experiment: str, parent_run_id: str, stage: str) -> list[str]:
    """Runs of ``stage`` still RUNNING under the parent run, left by a killed process (the output folder's lock
    rules out a live one), become KILLED; their ids are returned for the resumed stage's ``resumed_from`` tag."""
    found = client.search_runs(
        [experiment],
        filter_string=(
            f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.stage = '{stage}' "
            "and attributes.status = 'RUNNING'"
        ),
    )
    for run in found:
        client.set_terminated(run.info.run_id, "KILLED")
    return [run.info.run_id for run in found]


def flat_params(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists as ``a/b/0`` keys (an empty container is kept as one value)."""
    if hasattr(tree, "items") and tree:
        return {k: v for key, value in tree.items() for k, v in flat_params(value, f"{prefix}{key}/").items()}
    if isinstance(tree, (list, tuple)) and tree and any(isinstance(v, (dict, list, tuple)) for v in tree):
        return {k: v for i, value in enumerate(tree) for k, v in flat_params(value, f"{prefix}{i}/").items()}
    return {prefix.rstrip("/"): tree}


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


class MLflowLogger(MLFlowLogger):
    """``MLFlowLogger`` with the project's defaults: SQLite store, git commit tag, early URI check.

    ``DENSE2MOE_PARENT_RUN_ID`` (set by the stage orchestrator and the sweep driver) nests the run under a parent.
    """

    def __init__(
        self,
        experiment_name: str = "dense2moe",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: dict[str, Any] | None = None,
        artifact_location: str | None = None,
        log_model: bool = False,
    ) -> None:
        uri = resolve_tracking_uri(tracking_uri)
        check_tracking_uri(uri)
        tags = dict(tags or {})
        commit = git_commit()
        if commit:
            tags.setdefault("mlflow.source.git.commit", commit)
        parent = os.environ.get("DENSE2MOE_PARENT_RUN_ID")
        if parent:
            tags.setdefault("mlflow.parentRunId", parent)
        experiment_id(mlflow.MlflowClient(tracking_uri=uri), experiment_name)  # before Lightning creates it untagged
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_name,
            tracking_uri=uri,
            tags=tags,
            artifact_location=artifact_location,
            log_model=log_model,
        )

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        self.experiment.log_image(self.run_id, image, artifact_file=artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.experiment.log_text(self.run_id, text, artifact_file)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.experiment.log_dict(self.run_id, data, artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """A matplotlib figure as an image artifact (a PNG at 120 dpi, cropped to its contents); closes it."""
        self.experiment.log_figure(self.run_id, figure, artifact_file, save_kwargs={"dpi": 120, "bbox_inches": "tight"})
        import matplotlib.pyplot as plt

        plt.close(figure)

    @property
    def run_url(self) -> str:
        return f"{self._tracking_uri}  experiment={self.name!r} run_id={self.run_id}"


UI_PORT = 5000
"""Port of ``mlflow ui``'s default address, for the run links the commands print."""


def ui_run_link(experiment_id: str, run_id: str) -> str:
    """The run's page under ``mlflow ui`` on its default address, in the model-training view (MLflow 3's UI opens
    its GenAI view otherwise: a browser setting the ``workflowType`` parameter overrides; docs/mlflow/)."""
    return f"http://127.0.0.1:{UI_PORT}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


class MLflowSaveConfigCallback(SaveConfigCallback):
    """Logs the fully resolved config as ``config.yaml`` to the run (and to the log dir when there is one)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        text = self.parser.dump(self.config, skip_none=False)
        # Model and data arguments arrive as hyperparameters already; the trainer's settings are added here.
        settings = {"seed_everything": self.config.get("seed_everything"), "trainer": self.config.get("trainer")}
        params = {f"cfg/{k}": v for k, v in flat_params(settings).items() if k != "trainer/callbacks"}
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                logger.experiment.log_text(logger.run_id, text, "config.yaml")
                logger.log_hyperparams(params)
