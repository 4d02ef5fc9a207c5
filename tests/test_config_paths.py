"""Relative paths inside a config file mean the same from any working directory (src/config_files.py)."""

import json

import pytest
import yaml
from conftest import ROOT
from test_cli import run_cli

from src.commands import _load_experiment as load_experiment
from src.config_files import path_sources, resolve_in_config
from src.errors import UserError
from src.sweep.configs import load_base

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


def test_an_included_base_keeps_its_own_paths_and_yields_whole_sections(tmp_path):
    """`config: base.yaml` (jsonargparse's include): the base's relative paths keep the base's folder, the including
    file's keys win, and a section it sets replaces the base's section whole — in fit/params and in a sweep's base."""
    (tmp_path / "bases").mkdir()
    (tmp_path / "bases" / "data_here").mkdir()
    (tmp_path / "bases" / "base.yaml").write_text(
        yaml.safe_dump({"data": {"kind": "latents", "path": "data_here"}, "evaluation": {"steps": 28, "batch_size": 4}})
    )
    child = tmp_path / "child.yaml"
    child.write_text(
        yaml.safe_dump(
            {"config": "bases/base.yaml", "evaluation": {"steps": 5}, "stages": [{"name": "a", "kind": "shared_kd"}]}
        )
    )
    keys = ("data.path", "evaluation.teacher_cache")
    assert path_sources(["--config", str(child)], keys) == {"data.path": tmp_path / "bases" / "base.yaml"}
    flat = load_base(str(child), str(child))
    assert flat["data"]["path"] == str(tmp_path / "bases" / "data_here")
    assert flat["evaluation"] == {"steps": 5} and "config" not in flat
    (tmp_path / "bases" / "base.yaml").write_text(yaml.safe_dump({"config": "../child.yaml"}))
    with pytest.raises(UserError, match="includes itself"):
        path_sources(["--config", str(child)], keys)


@pytest.mark.parametrize("size", ["l", "m", "s", "l_fsdp"])
def test_flux_experiments_share_one_base(size):
    """The FLUX.1-dev experiments include experiments/base/flux_dev.yaml instead of repeating teacher and data."""
    args = load_experiment(str(ROOT / "experiments" / f"flux_dev_moe_{size}.yaml"))
    assert args["teacher"].path == "black-forest-labs/FLUX.1-dev" and args["teacher"].dtype == "bfloat16"
    assert args["data"].kind == "latents" and args["data"].image_size == 1024
    assert args["evaluation"].enabled == (size != "l_fsdp")
