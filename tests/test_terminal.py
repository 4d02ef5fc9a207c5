"""What a newcomer sees: a fit without Lightning's per-stage banners, progress bars on the silent parts, and a
``--help`` that lists every command."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY_FLUX

from src.cli import TOOLS, TRAINER_COMMANDS, main

FILTERED = (
    "GPU available",
    "TPU available",
    "💡 Tip",
    "litlogger",
    "LeafSpec",
    "in eval mode at the start",
    "`Trainer.fit` stopped",
    "database tables",
    "alembic",
)


def test_a_debug_fit_prints_no_lightning_banners_and_shows_progress(tmp_path):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    FluxTransformer2DModel(**TINY_FLUX).save_pretrained(tmp_path / "teacher")
    # a new store, as on a first run: its creation must not print either
    args = ["fit", "--config", str(ROOT / "experiments" / "debug.yaml"), "--teacher.path", str(tmp_path / "teacher")]
    args += ["--output_dir", str(tmp_path / "run"), "--threads", "1", "--student.mob.group_size", "2"]
    args += ["--student.mob.active", "1"]
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}
    env.pop("DENSE2MOE_PARENT_RUN_ID", None)
    done = subprocess.run(
        [sys.executable, "-m", "src.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert not [line for line in output.splitlines() if any(text in line for text in FILTERED)], output
    assert "Taylor scores" in output and "evaluation: student images" in output


def test_help_lists_every_command_on_one_line(capsys):
    main(["--help"])
    lines = capsys.readouterr().out.splitlines()
    for command in (*TRAINER_COMMANDS, *TOOLS):
        (line,) = [line for line in lines if line.split()[:1] == [command]]
        assert len(line.split()) > 3, line


def test_fit_help_shows_the_experiment_yaml_keys(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"])
    assert exit_.value.code in (0, None)
    out = capsys.readouterr().out
    assert "usage: python -m src.cli fit" in out and "--only_stage" in out
    for key in ("teacher.path", "student.conversion.layout", "student.mob.group_size", "stages[].kind", "data.kind"):
        assert f"\n  {key} " in out, key


def test_a_new_mlflow_database_is_created_silently(tmp_path):
    code = (
        "from src.training.terminal import quiet_lightning; quiet_lightning(); import mlflow; "
        f"mlflow.set_tracking_uri('sqlite:///{tmp_path / 'new.db'}'); mlflow.MlflowClient().search_experiments()"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "new.db").exists()
    assert "database tables" not in done.stdout + done.stderr and "alembic" not in done.stdout + done.stderr
