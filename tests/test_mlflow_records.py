"""MLflow runs that describe themselves (config.yaml, flattened params, tags, a model-training experiment), and a
stage run left RUNNING by a killed process marked KILLED when the stage resumes."""

import shutil

import mlflow
import pytest
import torch
from conftest import ROOT, TINY_FLUX

from src.cli import main

DEBUG = str(ROOT / "experiments" / "debug.yaml")


@pytest.fixture(scope="module")
def store(tmp_path_factory, mlflow_template):
    """debug.yaml on a tiny teacher: stage 1 alone, then a leftover RUNNING stage-2 run (a killed process), then
    the rest of the experiment."""
    from diffusers import FluxTransformer2DModel

    tmp = tmp_path_factory.mktemp("records")
    torch.manual_seed(0)
    FluxTransformer2DModel(**TINY_FLUX).save_pretrained(tmp / "teacher")
    shutil.copy(mlflow_template, tmp / "mlflow.db")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    args = ["fit", "--config", DEBUG, "--teacher.path", str(tmp / "teacher"), "--output_dir", str(tmp / "run")]
    args += ["--threads", "1", "--student.mob.group_size", "2", "--student.mob.active", "1", "--tracking_uri", uri]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp)
        patch.delenv("DENSE2MOE_PARENT_RUN_ID", raising=False)
        main([*args, "--only_stage", "stage1_shared"])
        client = mlflow.MlflowClient(uri)
        experiment = client.get_experiment_by_name("dense2moe")
        (parent,) = client.search_runs([experiment.experiment_id], "tags.kind = 'dense2moe'")
        tags = {"mlflow.parentRunId": parent.info.run_id, "stage": "stage2_moe", "experiment": "debug"}
        leftover = client.create_run(experiment.experiment_id, run_name="debug/stage2_moe", tags=tags).info.run_id
        main(args)
    return client, experiment, parent.info.run_id, leftover


def test_the_experiment_is_a_model_training_experiment(store):
    _, experiment, _, _ = store
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_the_parent_run_lists_its_layout_teacher_and_stages(store):
    client, _, parent, _ = store
    run = client.get_run(parent)
    params = run.data.params
    assert len(params) >= 20
    assert params["student/conversion/layout"] == "1S12E2A" and params["student/mob/group_size"] == "2"
    assert params["student/conversion/balance"] == "aux" and params["data/world"] == "shapes"
    assert int(params["student/conversion/expert_width"]) > 0 and int(params["student/conversion/shared_width"]) > 0
    assert len(params["teacher/sha256"]) == 64
    assert params["stages/order"] == "stage1_shared:shared_kd,stage2_moe:moe_kd,stage3_mob:mob_kd"
    assert params["stages/stage2_moe/steps"] == "6"
    assert run.data.tags["experiment"] == "debug"
    assert "config.yaml" in {a.path for a in client.list_artifacts(parent)}
    config = client.download_artifacts(parent, "config.yaml")
    assert "layout: 1S12E2A" in open(config).read()


def test_every_stage_run_has_its_config_params_and_tags(store):
    client, experiment, parent, _ = store
    stages = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    finished = [r for r in stages if r.info.status == "FINISHED"]
    assert sorted(r.data.tags["stage_kind"] for r in finished) == ["mob_kd", "moe_kd", "shared_kd"]
    for run in finished:
        assert run.data.tags["experiment"] == "debug" and run.data.tags["kind"] == "stage"
        assert run.data.params["student/conversion/layout"] == "1S12E2A" and "stage/lr" in run.data.params
        assert not any(k.startswith("stages/stage") for k in run.data.params)  # other stages' settings: parent only
        assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_a_leftover_running_stage_run_is_killed_and_linked_from_its_resumption(store):
    client, experiment, parent, leftover = store
    assert client.get_run(leftover).info.status == "KILLED"
    runs = client.search_runs(
        [experiment.experiment_id], "tags.stage = 'stage2_moe' and attributes.status = 'FINISHED'"
    )
    (resumed,) = runs
    assert resumed.data.tags["resumed_from"] == leftover
    assert client.get_run(parent).info.status == "FINISHED"


def test_compare_shows_the_layout_columns(store, tmp_path, capsys):
    client, _, _, _ = store
    main(["compare", "--experiment", "dense2moe", "--tracking_uri", client._tracking_client.tracking_uri,
          "--out", str(tmp_path), "--log_mlflow", "false"])  # fmt: skip
    header = (tmp_path / "compare.md").read_text().splitlines()[0]
    assert "student/conversion/layout" in header and "student/conversion/expert_width" in header
    assert "1S12E2A" in (tmp_path / "compare.csv").read_text()
