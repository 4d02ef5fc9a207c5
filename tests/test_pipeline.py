"""The Dense2MoE pipeline: stages in order, nested MLflow runs, resume, NaN handling and bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import ROOT, TINY_FLUX
from diffusers import FluxTransformer2DModel

from src.cli import main

DEBUG = str(ROOT / "experiments" / "debug.yaml")


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher"
    FluxTransformer2DModel(**TINY_FLUX).save_pretrained(path)
    return path


def debug_args(teacher: Path, out: Path, *extra: str) -> list[str]:
    """debug.yaml on the tiny test teacher (2 single blocks: MoB groups of 2)."""
    return [
        "fit",
        "--config",
        DEBUG,
        "--teacher.path",
        str(teacher),
        "--output_dir",
        str(out),
        "--threads",
        "1",
        "--student.mob.group_size",
        "2",
        "--student.mob.active",
        "1",
        *extra,
    ]


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_debug_experiment_end_to_end(tiny_teacher, workdir, capsys):
    main(debug_args(tiny_teacher, workdir / "run"))
    out = capsys.readouterr().out
    assert "GenEval-shapes overall" in out and "params activated" in out
    report = json.loads((workdir / "run" / "report" / "summary.json").read_text())
    assert report["params/student_activated"] < report["params/teacher_activated"]
    assert 0 <= report["student/geneval_shapes/overall"] <= 1
    assert {"fidelity/psnr", "fidelity/ssim", "latency/teacher_s_per_image", "flops/student"} <= set(report)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("dense2moe")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.info.run_name == "debug")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["stage"] for r in children) == ["stage1_shared", "stage2_moe", "stage3_mob"]
    assert all(r.info.status == "FINISHED" for r in [parent, *children])
    assert "train/loss_feature" in children[0].data.metrics
    stage2 = next(r for r in children if r.data.tags["stage"] == "stage2_moe")
    assert "experts/router_entropy" in stage2.data.metrics
    assert {a.path for a in client.list_artifacts(stage2.info.run_id, "experts")} >= {"experts/load_heatmap.png"}
    assert "report" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    # the final student is a diffusers folder with MoB groups and top-2 MoE layers
    config = json.loads((workdir / "run" / "stage3_mob" / "student" / "config.json").read_text())
    assert config["_class_name"] == "FluxMoETransformer2DModel" and config["mob"]["active"] == 1

    capsys.readouterr()
    main(debug_args(tiny_teacher, workdir / "run", "--evaluation.enabled", "false"))
    assert capsys.readouterr().out.count("finished earlier, skipped") == 3


def _student_state(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "diffusion_pytorch_model.safetensors")


def test_killed_run_resumes_to_the_same_result(tiny_teacher, workdir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    steps = [
        "--stages",
        json.dumps(
            [
                {"name": "s1", "kind": "shared_kd", "steps": 8, "batch_size": 4, "checkpoint_every": 2},
                {"name": "s2", "kind": "moe_kd", "steps": 12, "batch_size": 4, "checkpoint_every": 2},
            ]
        ),
        "--evaluation.enabled",
        "false",
        "--student.mob",
        "null",
    ]
    cmd = [sys.executable, "-m", "src.cli", *debug_args(tiny_teacher, workdir / "ref", *steps)]
    subprocess.run(cmd, env=env, cwd=workdir, check=True, capture_output=True)
    killed = [sys.executable, "-m", "src.cli", *debug_args(tiny_teacher, workdir / "killed", *steps)]
    proc = subprocess.Popen(killed, env=env, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = workdir / "killed" / "s2" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not any(ckpts.glob("step*.ckpt")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (workdir / "killed" / "s2" / "done.json").exists(), "the kill came too late to test resuming"
    subprocess.run(killed, env=env, cwd=workdir, check=True, capture_output=True)
    ref, resumed = (
        _student_state(workdir / "ref" / "s2" / "student"),
        _student_state(workdir / "killed" / "s2" / "student"),
    )
    assert ref.keys() == resumed.keys()
    for key in ref:
        assert torch.equal(ref[key], resumed[key]), key


def test_nan_loss_stops_the_stage_and_keeps_the_last_checkpoint(tiny_teacher, workdir, capsys, monkeypatch):
    from src.training import distill

    real = distill.DistillStage.losses

    def poisoned(self, batch):
        parts = real(self, batch)
        if self.global_step >= 4:
            parts["loss"] = parts["loss"] * float("nan")
        return parts

    monkeypatch.setattr(distill.DistillStage, "losses", poisoned)
    args = debug_args(tiny_teacher, workdir / "nan", "--evaluation.enabled", "false")
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert "nan" in line.lower() and "stage1_shared" in line
    assert any((workdir / "nan" / "stage1_shared" / "checkpoints").glob("*.ckpt"))
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("dense2moe").experiment_id])
    assert {r.info.status for r in runs} == {"FAILED"}


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--student.mob", "null"], "needs student.mob"),
        (["--stages", '[{"name": "a", "kind": "moe_kd"}, {"name": "b", "kind": "shared_kd"}]'], "must come before"),
        (["--stages", '[{"name": "a", "kind": "mob_kd"}, {"name": "b", "kind": "moe_kd"}]'], "cannot follow"),
        (["--stages", '[{"name": "a", "kind": "dense_kd"}]'], "dense_kd"),
        (["--teacher.expected", '{"num_layers": 7}'], "does not match"),
        (["--student.conversion.layout", "1S5E2A"], "cannot split"),
        (["--stages", '[{"name": "a", "kind": "warp_kd"}]'], "kind"),
        (["--student.mob.group_size", "3"], "group_size"),
    ],
)
def test_bad_experiments_are_refused_with_one_line(tiny_teacher, workdir, capsys, extra, expected):
    with pytest.raises(SystemExit) as exc:
        main(debug_args(tiny_teacher, workdir / "bad", *extra))
    assert exc.value.code == 2
    assert expected in one_error_line(capsys.readouterr().err)


def test_a_finished_stage_from_another_layout_is_refused_and_untouched(tiny_teacher, workdir, capsys):
    one_stage = ["--stages", '[{"name": "s1", "kind": "shared_kd", "steps": 2, "batch_size": 4}]']
    main(
        debug_args(tiny_teacher, workdir / "run", *one_stage, "--evaluation.enabled", "false", "--student.mob", "null")
    )
    done = workdir / "run" / "s1" / "student" / "diffusion_pytorch_model.safetensors"
    before = done.read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(
            debug_args(
                tiny_teacher,
                workdir / "run",
                *one_stage,
                "--evaluation.enabled",
                "false",
                "--student.mob",
                "null",
                "--student.conversion.layout",
                "1S4E2A",
            )
        )
    assert "different configuration" in one_error_line(capsys.readouterr().err)
    assert done.read_bytes() == before
