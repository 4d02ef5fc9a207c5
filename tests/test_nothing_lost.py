"""Nothing lost: one writer per output folder, a refused rerun touches no MLflow run, exports replaced whole."""

import json
import os

import mlflow
import pytest
from conftest import ROOT, tiny_teacher_args
from test_cli import one_error_line, run_cli

from src.atomic import replaced_folder
from src.errors import UserError
from src.training.folder_lock import folder_lock

DEBUG = str(ROOT / "experiments" / "debug.yaml")


def test_second_holder_is_refused_with_the_holders_name(tmp_path):
    with folder_lock(tmp_path / "out", "output_dir"):
        with pytest.raises(UserError, match=rf"output_dir .*out: in use by pid {os.getpid()} on "):
            with folder_lock(tmp_path / "out", "output_dir"):
                pass
    with folder_lock(tmp_path / "out", "output_dir"):  # released when the holder ends
        pass


def test_fit_into_a_held_folder_is_refused(capsys, workdir):
    with folder_lock(workdir / "out", "output_dir"):
        code, _, err = run_cli(["fit", "--config", DEBUG, "--output_dir", "out"], capsys)
    assert code == 2 and "output_dir out: in use by pid" in one_error_line(err)
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    assert client.get_experiment_by_name("dense2moe") is None  # no run was created
    assert sorted(p.name for p in (workdir / "out").iterdir()) == [".lock"]


def test_refused_rerun_leaves_the_finished_parent_run_alone(capsys, workdir):
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.create_run(client.create_experiment("dense2moe"), run_name="debug")
    client.set_terminated(run.info.run_id, "FINISHED")
    out = workdir / "out"
    (out / "stage1_shared").mkdir(parents=True)
    (out / "experiment.json").write_text(json.dumps({"parent_run_id": run.info.run_id, "name": "debug"}))
    (out / "stage1_shared" / "done.json").write_text(json.dumps({"fingerprint": "another", "stage": "x"}))
    code, _, err = run_cli(["fit", "--config", DEBUG, "--output_dir", "out"], capsys)
    assert code == 2 and "finished with a different configuration" in one_error_line(err)
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_replaced_folder_keeps_the_old_one_when_writing_fails(tmp_path):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text("old")
    with pytest.raises(OSError):
        with replaced_folder(tmp_path / "export") as partial:
            (partial / "config.json").write_text("half")
            raise OSError(28, "No space left on device")
    assert (tmp_path / "export" / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    with replaced_folder(tmp_path / "export") as partial:
        (partial / "config.json").write_text("new")
    assert (tmp_path / "export" / "config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_existing_teacher_export_needs_overwrite(capsys, workdir):
    (workdir / "teacher").mkdir()
    (workdir / "teacher" / "config.json").write_text("{}")
    code, _, err = run_cli(["fit", *tiny_teacher_args(workdir)], capsys)
    assert code == 2 and "overwrite_export" in one_error_line(err)
    assert (workdir / "teacher" / "config.json").read_text() == "{}"
