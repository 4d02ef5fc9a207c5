"""Relative paths inside a config file mean the same from any working directory (src/config_files.py)."""

import json

import pytest
import yaml
from conftest import ROOT
from test_cli import run_cli

from src.config_files import path_sources, resolve_in_config

DEBUG = ROOT / "experiments" / "debug.yaml"


def test_rule(tmp_path):
    project = tmp_path / "project"
    (project / "experiments").mkdir(parents=True)
    (project / "pyproject.toml").write_text("")
    (project / "checkpoints" / "t").mkdir(parents=True)
    (project / "experiments" / "beside").mkdir()
    config = project / "experiments" / "x.yaml"
    assert resolve_in_config("checkpoints/t", config) == str(project / "checkpoints" / "t")  # the project root
    assert resolve_in_config("beside", config) == str(project / "experiments" / "beside")  # the config's folder
    assert resolve_in_config("runs/new", config) == str(project / "runs" / "new")  # nothing there yet: the root
    hub = "black-forest-labs/FLUX.1-dev"
    assert resolve_in_config(hub, config, may_be_hub_id=True) == hub  # found nowhere: a hub id
    for kept in ("s3://bucket/data", "/abs/path", "~/x"):
        assert resolve_in_config(kept, config) == kept
    loose = tmp_path / "loose" / "x.yaml"  # no pyproject.toml above: the config's own folder
    loose.parent.mkdir()
    assert resolve_in_config("out/a/b", loose) == str(tmp_path / "loose" / "out" / "a" / "b")


def test_command_line_values_stay_relative_to_the_working_folder(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"teacher": {"path": "t"}, "output_dir": "o"}))
    keys = ("teacher.path", "output_dir")
    assert set(path_sources(["--config", str(config)], keys)) == {"teacher.path", "output_dir"}
    assert set(path_sources(["--config", str(config), "--teacher.path", "x"], keys)) == {"output_dir"}
    assert set(path_sources(["--teacher.path=x", f"--config={config}"], keys)) == {"teacher.path", "output_dir"}
    assert path_sources(["--config", str(config), "--teacher", '{"path": "x"}'], keys) == {"output_dir": config}


def test_fit_from_another_folder(capsys, workdir):
    """The issue's case: from /tmp, ``fit --config <repo>/experiments/debug.yaml`` (here one 1-step stage)."""
    stage = [{"name": "stage1_shared", "kind": "shared_kd", "steps": 1, "batch_size": 2}]
    args = ["fit", "--config", str(DEBUG), "--stages", json.dumps(stage), "--only_stage", "stage1_shared"]
    args += ["--taylor.batches", "1", "--taylor.batch_size", "2", "--threads", "1"]
    from src.cli import main

    main(args)  # no SystemExit: it ran
    out = capsys.readouterr().out
    assert "stage stage1_shared: done" in out
    assert (workdir / "runs" / "debug" / "stage1_shared" / "student" / "config.json").is_file()  # defaults: cwd


def test_sweep_from_another_folder(capsys, workdir):
    """The sweep's ``base`` and the base's teacher path resolve against the files, and the trial config is absolute."""
    from src.cli import main

    main(["sweep", "--config", str(ROOT / "sweeps" / "debug.yaml"), "--dry_run"])
    out = capsys.readouterr().out
    assert f"path: {ROOT / 'checkpoints' / 'teacher_tiny'}" in out


def test_missing_local_teacher_suggests_no_hub_download(capsys, workdir):
    (workdir / "c.yaml").write_text(DEBUG.read_text().replace("checkpoints/teacher_tiny", "./no/such/teacher"))
    code, _, err = run_cli(["fit", "--config", "c.yaml"], capsys)
    assert code == 2 and "no such folder" in err and "hf download" not in err


@pytest.mark.parametrize("name", ["checkpoints/teacher_tiny"])
def test_hub_shaped_missing_folder_names_both_readings(name, capsys, workdir, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    code, _, err = run_cli(["fit", "--config", str(DEBUG), "--teacher.path", name], capsys)
    assert code == 2 and f"no local folder {workdir / name}" in err and "hf download" not in err
