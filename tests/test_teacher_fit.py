"""The teacher's fit → export → evaluate → MLflow path, end to end on a tiny transformer."""

import json
from pathlib import Path

import mlflow
import pytest
from conftest import tiny_teacher_args

from src.cli import main


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, mlflow_template):
    import os
    import shutil

    tmp = tmp_path_factory.mktemp("teacher_fit")
    shutil.copy(mlflow_template, tmp / "mlflow.db")
    old = os.getcwd()
    os.chdir(tmp)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    try:
        main(["fit", *tiny_teacher_args(tmp, steps=2)])
    finally:
        os.chdir(old)
    return tmp


def test_fit_logs_a_complete_mlflow_run(fitted):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{fitted / 'mlflow.db'}")
    exp = client.get_experiment_by_name("teacher_tiny")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert "train/loss" in run.data.metrics
    assert "val/geneval_shapes/overall" in run.data.metrics
    params = run.data.params  # flattened hyperparameters and trainer settings
    assert params["lr"] == "0.0007" and params["transformer/num_layers"] == "2"
    assert params["cfg/trainer/max_steps"] == "2" and "mlflow.source.git.commit" in run.data.tags
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts and "samples" in artifacts
    config = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(fitted))).read_text()
    assert "TeacherModule" in config and "max_steps: 2" in config


def test_export_is_a_loadable_diffusers_folder(fitted):
    from src.models.loading import load_transformer

    model = load_transformer(fitted / "teacher")
    assert model.config.num_layers == 2


def test_evaluate_is_resumable_and_marks_completion(fitted, capsys, monkeypatch):
    monkeypatch.chdir(fitted)
    out = fitted / "eval"
    args = [
        "evaluate",
        "--model",
        str(fitted / "teacher"),
        "--out",
        str(out),
        "--limit",
        "6",
        "--images_per_prompt",
        "2",
        "--steps",
        "2",
        "--batch_size",
        "5",
    ]
    main(args)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 12 and len(summary["tasks"]) == 6  # --limit 6: one prompt of every task
    assert json.loads((out / "generation.json").read_text())["complete"] is True
    assert (out / "00000" / "metadata.jsonl").is_file() and (out / "00005" / "samples" / "0001.png").is_file()
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert set(results[0]) >= {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"}

    missing = out / "00003" / "samples" / "0000.png"
    kept = out / "00001" / "samples" / "0000.png"
    missing.unlink()
    kept_mtime = kept.stat().st_mtime_ns
    capsys.readouterr()
    main(args)
    assert "generated 1 images" in capsys.readouterr().out
    assert missing.is_file() and kept.stat().st_mtime_ns == kept_mtime
