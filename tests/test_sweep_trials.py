"""Sweeps that run real trials, each a `fit` subprocess of seconds on a tiny teacher: a failing trial among four,
two workers on one study (SQLite threads, and two processes on a journal file), a sweep interrupted, killed and
resumed, and a LightningCLI base. Twelve trial subprocesses in all (two of them stopped early); the other sweep
tests run none."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
import yaml
from conftest import ROOT, TINY_FLUX
from diffusers import FluxTransformer2DModel
from optuna.trial import TrialState

from src.cli import main

# 1S5E2A cannot split the tiny teacher's FFN (width 64: shared 16 + 48 routed, not divisible by 5): a genuine
# failure inside the trial's fit, not a test-only switch.
LAYOUTS = ["1S4E2A", "1S8E2A", "1S5E2A", "1S2E1A"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A seconds-long experiment on a tiny teacher: two stages of 2 steps, a 6-image evaluation."""
    folder = tmp_path_factory.mktemp("sweep_base")
    torch.manual_seed(0)
    FluxTransformer2DModel(**TINY_FLUX).save_pretrained(folder / "teacher")
    experiment = {
        "name": "tiny",
        "teacher": {"path": str(folder / "teacher")},
        "student": {"conversion": {"layout": "1S4E2A"}},
        "taylor": {"batches": 1, "batch_size": 4},
        "stages": [
            {"name": "s1", "kind": "shared_kd", "steps": 2, "batch_size": 4, "warmup_steps": 1},
            {"name": "s2", "kind": "moe_kd", "steps": 4, "batch_size": 4, "warmup_steps": 1},
        ],
        "evaluation": {"prompts_per_task": 1, "images_per_prompt": 1, "steps": 2, "latency_batch": 2},
        "threads": 1,
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(experiment))
    return path


def write_sweep(folder: Path, base: Path, **fields) -> Path:
    sweep = {
        "name": "tiny",
        "base": str(base),
        "space": {"student.conversion.layout": LAYOUTS},
        "objectives": {"geneval_shapes/overall": "maximize", "params/activated": "minimize"},
        "sampler": {"name": "grid"},
        "output_dir": str(folder / "sweep"),
        "report_metrics": ["fidelity/psnr"],
        **fields,
    }
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def load(storage: str) -> optuna.Study:
    from src.sweep.storage import open_storage

    return optuna.load_study(study_name="tiny", storage=open_storage(storage))


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def sweep_cmd(sweep: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "src.cli", "sweep", "--config", str(sweep), *extra]


def runs_of_trials(client: mlflow.MlflowClient) -> tuple[object, list]:
    exp = client.get_experiment_by_name("sweep-tiny")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("sweep.role") == "study")
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return parent, trials


def test_four_trials_one_fails_the_others_complete(base, workdir, capsys):
    from src.training.report import summary_keys

    sweep = write_sweep(workdir, base)
    main(["sweep", "--config", str(sweep), "--workers", "2"])
    out = capsys.readouterr().out
    study = load(f"sqlite:///{workdir / 'sweep' / 'optuna.db'}")
    by_layout = {t.params["student.conversion.layout"]: t for t in study.trials}
    assert sorted(by_layout) == sorted(LAYOUTS) and len(study.trials) == 4  # each grid point exactly once
    failed = by_layout["1S5E2A"]
    assert failed.state == TrialState.FAIL and "cannot split" in failed.user_attrs["fail_reason"]
    for layout in ("1S4E2A", "1S8E2A", "1S2E1A"):
        t = by_layout[layout]
        assert t.state == TrialState.COMPLETE and 0 <= t.values[0] <= 1 and t.values[1] > 0
    # fewer routed experts at the same top-k → more activated parameters (wider experts)
    assert by_layout["1S4E2A"].values[1] > by_layout["1S8E2A"].values[1]
    summary = json.loads((Path(by_layout["1S4E2A"].user_attrs["trial_dir"]) / "run/report/summary.json").read_text())
    lpips = {"fidelity/lpips", "fidelity/lpips/low", "fidelity/lpips/high"}  # only with local LPIPS weights
    assert set(summary) <= set(summary_keys()) and set(summary_keys(world="shapes")) - set(summary) <= lpips

    parent, trials = runs_of_trials(mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"]))
    assert len(trials) == 4 and parent.info.status == "FINISHED"
    states = {r.data.params["student.conversion.layout"]: r for r in trials}
    assert states["1S5E2A"].data.tags["sweep.state"] == "FAIL" and states["1S5E2A"].info.status == "FAILED"
    assert "cannot split" in states["1S5E2A"].data.tags["sweep.fail_reason"]
    done = states["1S2E1A"]
    assert done.data.tags["sweep.state"] == "COMPLETE" and "geneval_shapes/overall" in done.data.metrics
    assert done.data.tags["sweep.study"] == "tiny" and done.data.tags["sweep.trial"].isdigit()
    experiment_runs = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{done.info.run_id}'"
    )
    assert [r.info.run_name for r in experiment_runs] == [f"tiny-t{done.data.tags['sweep.trial']}"]
    artifacts = {
        a.path
        for a in mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).list_artifacts(parent.info.run_id, "plots")
    }
    assert {"plots/pareto_front.png", "plots/param_importances_0.png", "plots/optimization_history_0.png"} <= artifacts
    table = (workdir / "sweep" / "best_trials.md").read_text()
    assert "Pareto front" in table and "cannot split" in table and "Pareto front" in out


def test_two_workers_on_a_journal_run_every_trial_once(base, workdir):
    """Two driver processes (as on two machines) share a journal file; single objective, with pruning reports."""
    sweep = write_sweep(
        workdir,
        base,
        space={"student.conversion.layout": ["1S4E2A", "1S8E2A", "1S2E1A"]},
        objectives={"fidelity/psnr": "maximize"},
        storage=f"journal:{workdir / 'study.journal'}",
        pruning={"monitor": "train/loss_out", "every_n_steps": 2, "options": {"n_startup_trials": 10}},
    )
    procs = [
        subprocess.Popen(sweep_cmd(sweep), env=env(), cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=400)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    study = load(f"journal:{workdir / 'study.journal'}")
    assert len(study.trials) == 3 and all(t.state == TrialState.COMPLETE for t in study.trials), outputs
    assert len({t.params["student.conversion.layout"] for t in study.trials}) == 3
    assert {t.user_attrs["worker_pid"] for t in study.trials} == {p.pid for p in procs}  # both workers ran trials
    for t in study.trials:
        log = (Path(t.user_attrs["trial_dir"]) / "log.txt").read_text()
        assert log.count("\n$ ") + log.startswith("$ ") == 1  # one fit per trial
        # reports every 2 steps at one step count across the stages: s1 has 2 steps, s2 4 (offset 2)
        assert sorted(t.intermediate_values) == [2, 4, 6]


def test_interrupted_and_killed_sweeps_resume_without_repeating_trials(base, workdir):
    sweep = write_sweep(
        workdir, base, space={"student.conversion.layout": ["1S4E2A", "1S2E1A"]}, sampler={"name": "random"}, trials=2
    )
    storage = f"sqlite:///{workdir / 'sweep' / 'optuna.db'}"
    trial = workdir / "sweep"

    def start() -> subprocess.Popen:
        return subprocess.Popen(
            sweep_cmd(sweep), env=env(), cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )

    def wait_for(path: Path, proc: subprocess.Popen) -> None:
        deadline = time.time() + 300
        while not path.exists():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.1)

    # 1) Ctrl-C while trial 0 runs: it is recorded as interrupted and queued again; exit 130 with one line
    first = start()
    wait_for(trial / "trial_0000" / "run", first)
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130 and "Traceback" not in err.decode()
    assert err.decode().strip().splitlines()[-1].startswith("interrupted:")
    study = load(storage)
    t0 = study.trials[0]
    assert t0.state == TrialState.FAIL and t0.user_attrs["fail_reason"].startswith("interrupted")
    retry = study.trials[1]
    assert retry.state == TrialState.WAITING and retry.system_attrs["fixed_params"] == t0.params
    parent, runs = runs_of_trials(mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"]))
    assert parent.info.status == "KILLED" and [r.data.tags["sweep.state"] for r in runs] == ["FAIL"]

    # 2) rerun: the queued retry (trial 1) completes; the driver is killed outright while trial 2 runs
    second = start()
    wait_for(trial / "trial_0002" / "run", second)
    second.kill()
    second.communicate()
    study = load(storage)
    assert study.trials[1].state == TrialState.COMPLETE and study.trials[2].state == TrialState.RUNNING
    orphan = study.trials[2].user_attrs["child_pid"]

    # 3) rerun: trial 2's dead worker is noticed at once, its orphaned fit is stopped, the study finishes
    third = subprocess.run(sweep_cmd(sweep), env=env(), cwd=workdir, capture_output=True, timeout=300)
    assert third.returncode == 0, third.stderr.decode()
    study = load(storage)
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert "is gone" in study.trials[2].user_attrs["fail_reason"] and study.trials[3].params == study.trials[2].params
    assert not Path(f"/proc/{orphan}").exists() or b"zombie" in Path(f"/proc/{orphan}/status").read_bytes().lower()
    log = (trial / "trial_0001" / "log.txt").read_text()
    assert log.count("src.cli fit") == 1  # the finished trial was not run again
    parent, runs = runs_of_trials(mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"]))
    assert parent.info.status == "FINISHED"
    assert sorted(r.data.tags["sweep.state"] for r in runs) == ["COMPLETE", "COMPLETE", "FAIL", "FAIL"]


def test_a_lightning_cli_base_runs_nested_and_an_unlogged_objective_stops_the_study(workdir, capsys):
    """A LightningCLI fit config as the base (the teacher's): the trial's outputs and MLflow run land in the
    sweep's places, pruning reports arrive, and an objective the fit never logs stops the study with the list of
    what it did log."""
    tiny = {**TINY_FLUX, "axes_dims_rope": list(TINY_FLUX["axes_dims_rope"])}
    sweep = write_sweep(
        workdir,
        ROOT / "experiments" / "teacher_tiny.yaml",
        space={"model.init_args.lr": [0.001, 0.002]},
        objectives={"val/overall": "maximize"},  # the module logs "val_overall"
        report_metrics=[],
        pruning={"monitor": "train/loss", "every_n_steps": 1, "options": {"n_startup_trials": 5}},
        trial={
            "overrides": {
                "trainer.max_steps": 2,
                "trainer.val_check_interval": 2,
                "trainer.limit_val_batches": 1,
                "trainer.enable_progress_bar": False,
                "model.init_args.transformer": tiny,
                "model.init_args.patch_size": 4,
                "model.init_args.text_encoder.dim": 16,
                "model.init_args.text_encoder.pooled_dim": 16,
                "model.init_args.sampling.steps": 2,
                "model.init_args.export_dir": "{trial_dir}/teacher",
                "data.init_args.batch_size": 4,
                "data.init_args.val_prompts_per_task": 1,
                "data.init_args.val_batch_size": 6,
            }
        },
    )
    with pytest.raises(SystemExit) as exc:
        main(["sweep", "--config", str(sweep)])
    assert exc.value.code == 2
    line = next(ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: "))
    assert "['val/overall'] not logged" in line and "'val_overall'" in line
    (trial,) = load(f"sqlite:///{workdir / 'sweep' / 'optuna.db'}").trials  # the study stopped after one trial
    assert trial.state == TrialState.FAIL and sorted(trial.intermediate_values) == [1, 2]
    trial_dir = Path(trial.user_attrs["trial_dir"])
    config = yaml.safe_load((trial_dir / "config.yaml").read_text())
    assert config["trainer"]["default_root_dir"] == str(trial_dir / "run")
    assert (trial_dir / "teacher" / "config.json").is_file()  # {trial_dir} filled in
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    parent, (trial_run,) = runs_of_trials(client)
    (fit_run,) = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{trial_run.info.run_id}'"
    )
    assert fit_run.info.run_name == f"tiny-t{trial.number}" and "val_overall" in fit_run.data.metrics
