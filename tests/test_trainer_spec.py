"""The trainer section (src/training/trainer_spec.py): typed launcher settings at experiment and stage level, the
old flat stage keys as shorthand, Trainer arguments the runner owns refused by name, and a resume fingerprint that
covers what changes results (the global batch) but not where a stage runs."""

import json
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from test_cli import one_error_line, run_cli

from src.errors import UserError
from src.models.convert import ConversionConfig
from src.sweep.configs import check_path, shorten
from src.training.distill import StageSpec
from src.training.experiment import (
    DataSpec,
    EvalSpec,
    Experiment,
    StudentSpec,
    TaylorSpec,
    TeacherSpec,
    with_trainer_defaults,
    yaml_keys,
)
from src.training.runner import check_stage_folders
from src.training.trainer_spec import TrainerSpec

DEBUG = ROOT / "experiments" / "debug.yaml"
FSDP = {"class_path": "lightning.pytorch.strategies.FSDPStrategy", "init_args": {"auto_wrap_policy": "blocks"}}


def experiment(stages: list[dict], trainer: TrainerSpec | None = None, out: Path = Path("out")) -> Experiment:
    """An experiment of these stages, everything else at its defaults (nothing is loaded)."""
    return Experiment(
        name="t",
        teacher=TeacherSpec(),
        student=StudentSpec(conversion=ConversionConfig()),
        stages=[StageSpec(**s) for s in stages],
        taylor=TaylorSpec(),
        evaluation=EvalSpec(),
        data=DataSpec(),
        output_dir=out,
        seed=0,
        experiment_name="e",
        tracking_uri=None,
        trainer=trainer or TrainerSpec(),
    )


def fingerprint(stage: dict, trainer: TrainerSpec | None = None) -> str:
    base = {"name": "s1", "kind": "shared_kd", "steps": 8, "lr": 1e-3}
    return experiment([base | stage], trainer).stage_fingerprint(0)


@pytest.fixture
def no_launcher(monkeypatch):
    for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "SLURM_NTASKS", "SLURM_NNODES", "SLURM_JOB_NAME"):
        monkeypatch.delenv(key, raising=False)


# --- one section, three ways to write it -------------------------------------------------------------------------
def test_shorthand_stage_section_and_experiment_section_resolve_to_the_same_stage(no_launcher):
    settings = {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "checkpoint_every": 3}
    stage = {"name": "s1", "kind": "moe_kd", "batch_size": 16}
    shorthand = experiment([stage | settings | {"extra_trainer": {"log_every_n_steps": 1}}])
    in_stage = experiment([stage | {"trainer": TrainerSpec(**settings, extra={"log_every_n_steps": 1})}])
    at_top = experiment([stage], TrainerSpec(**settings, extra={"log_every_n_steps": 1}))
    expected = TrainerSpec(**settings, num_nodes=None, extra={"log_every_n_steps": 1})
    assert all(e.stages[0].trainer == expected for e in (shorthand, in_stage, at_top))
    assert len({e.stage_fingerprint(0) for e in (shorthand, in_stage, at_top)}) == 1
    # the shorthand keys read as the section (code and YAMLs from before it)
    spec = at_top.stages[0]
    assert (spec.accelerator, spec.devices, spec.strategy, spec.checkpoint_every) == ("cpu", 2, "ddp", 3)
    assert spec.extra_trainer == {"log_every_n_steps": 1} and spec.trainer.world_size() == 2


def test_a_stage_key_wins_over_the_experiment_section_key_by_key():
    top = TrainerSpec(accelerator="cpu", devices=2, checkpoint_every=5, extra={"log_every_n_steps": 1})
    stages = [
        StageSpec(name="s1", kind="moe_kd"),
        StageSpec(name="s2", kind="mob_kd", trainer=TrainerSpec(devices=1, extra={"log_every_n_steps": 4})),
    ]
    (s1, s2) = with_trainer_defaults(stages, top)
    assert s1.trainer == TrainerSpec("cpu", 2, None, "auto", 5, {"log_every_n_steps": 1})
    assert s2.trainer == TrainerSpec("cpu", 1, None, "auto", 5, {"log_every_n_steps": 4})
    defaults = StageSpec(name="s", kind="moe_kd").with_defaults(None).trainer
    assert defaults == TrainerSpec("auto", 1, None, "auto", 50, {})  # what a stage without any section gets
    with pytest.raises(UserError, match="stage 's2': strategy: FSDP cannot run a mob_kd stage"):
        with_trainer_defaults(stages, TrainerSpec(strategy=FSDP))


def test_old_extra_trainer_launcher_keys_go_to_their_typed_keys_and_a_setting_given_twice_is_refused():
    spec = StageSpec(name="s", kind="moe_kd", extra_trainer={"num_nodes": 2, "devices": 4, "log_every_n_steps": 1})
    assert (spec.trainer.num_nodes, spec.trainer.devices, spec.trainer.extra) == (2, 4, {"log_every_n_steps": 1})
    assert spec.trainer.world_size() == 8
    with pytest.raises(ValueError, match=r"stage 's': trainer.devices=1 and devices=2: the same setting twice"):
        StageSpec(name="s", kind="moe_kd", devices=2, trainer=TrainerSpec(devices=1))
    with pytest.raises(ValueError, match=r"devices=2 and extra_trainer.devices=4: the same setting twice"):
        StageSpec(name="s", kind="moe_kd", devices=2, extra_trainer={"devices": 4})
    StageSpec(name="s", kind="moe_kd", devices=2, trainer=TrainerSpec(devices=2))  # the same value twice is one


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"max_steps": 3}, "trainer.extra.max_steps=3: not allowed here: the runner sets it from the stage's `steps`"),
        ({"precision": "bf16-mixed"}, "trainer.extra.precision='bf16-mixed': not allowed here: the runner sets it"),
        ({"gradient_clip_val": 0.5}, "from the stage's `gradient_clip_val`"),
        ({"accumulate_grad_batches": 2}, "from the stage's `accumulate_grad_batches`"),
        ({"logger": False}, "trainer.extra.logger=False: not allowed here: each stage logs to its own MLflow run"),
        ({"callbacks": []}, "trainer.extra.callbacks=[]: not allowed here: the runner installs"),
        ({"default_root_dir": "x"}, "trainer.extra.default_root_dir='x': not allowed here: a stage's files live"),
        ({"enable_checkpointing": False}, "trainer.extra.enable_checkpointing=False: not allowed here: stage check"),
        ({"max_time": "00:01:00:00"}, "recorded as finished"),
        ({"devices": 2}, "trainer.extra.devices=2: not allowed here: set trainer.devices (a typed key)"),
        ({"max_stepz": 3}, "trainer.extra.max_stepz: not a lightning.Trainer argument"),
    ],
)
def test_trainer_arguments_the_runner_sets_are_refused_naming_the_key_and_why(extra, message):
    with pytest.raises(ValueError) as err:
        TrainerSpec(extra=extra)
    assert message in str(err.value)


def test_runner_defaults_and_other_trainer_arguments_pass():
    extra = {"log_every_n_steps": 1, "enable_model_summary": True, "deterministic": True, "detect_anomaly": False}
    assert TrainerSpec(extra=extra).extra == extra


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"devices": 0}, "trainer.devices=0: allowed a count >= 1, -1 or 'auto'"),
        ({"devices": [0, 0]}, "trainer.devices=[0, 0]"),
        ({"devices": True}, "trainer.devices=True"),
        ({"accelerator": "npu"}, "trainer.accelerator='npu': allowed ["),
        ({"num_nodes": 0}, "trainer.num_nodes=0: must be an integer >= 1"),
        ({"checkpoint_every": 0}, "trainer.checkpoint_every=0: must be an integer >= 1"),
        ({"strategy": ["ddp"]}, "strategy=['ddp']: allowed a Lightning strategy name"),
    ],
)
def test_bad_launcher_values_are_refused_naming_the_key(values, message):
    with pytest.raises(ValueError) as err:
        TrainerSpec(**values)
    assert message in str(err.value)


def test_the_world_size_counts_devices_as_lightning_does(no_launcher, monkeypatch):
    assert TrainerSpec().world_size() == 1
    assert TrainerSpec(accelerator="cpu", devices="auto").world_size() == 1
    assert TrainerSpec(devices="0,1").world_size() == 2
    assert TrainerSpec(devices=[0, 2, 3], num_nodes=2).world_size() == 6
    monkeypatch.setenv("WORLD_SIZE", "16")  # torchrun: 2 nodes of 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert TrainerSpec(devices=8).world_size() == 16


# --- the resume fingerprint -----------------------------------------------------------------------------------------
def test_the_fingerprint_follows_the_global_batch_not_where_the_stage_runs(no_launcher):
    one = fingerprint({"batch_size": 32})
    same = [
        {"batch_size": 16, "devices": 2, "strategy": "ddp", "accelerator": "cpu"},
        {"batch_size": 8, "trainer": TrainerSpec(devices=4, strategy=FSDP, checkpoint_every=7)},
        {"batch_size": 16, "trainer": TrainerSpec(num_nodes=2)},
        {"batch_size": 32, "extra_trainer": {"log_every_n_steps": 1, "enable_model_summary": True}},
    ]
    for stage in same:
        assert fingerprint(stage) == one, stage
    assert fingerprint({"batch_size": 16}, TrainerSpec(devices=2, strategy="ddp")) == one  # the experiment's section
    different = [
        {"batch_size": 16},  # half the global batch
        {"batch_size": 32, "lr": 2e-3},
        {"batch_size": 32, "steps": 9},
        {"batch_size": 32, "precision": "bf16-mixed"},
        {"batch_size": 32, "gradient_clip_val": 0.5},
        {"batch_size": 16, "accumulate_grad_batches": 2},  # micro-batch statistics over 16 samples, not 32
    ]
    for stage in different:
        assert fingerprint(stage) != one, stage
    # with accumulation, ranks and micro-batches hold different samples: the world size counts too
    assert fingerprint({"batch_size": 8, "accumulate_grad_batches": 2, "devices": 2}) != fingerprint(
        {"batch_size": 16, "accumulate_grad_batches": 2}
    )
    assert fingerprint({"batch_size": 8, "accumulate_grad_batches": 2, "devices": 2}) == fingerprint(
        {"batch_size": 8, "accumulate_grad_batches": 2, "trainer": TrainerSpec(devices=2, strategy="ddp")}
    )


def test_fingerprints_of_stage_folders_written_before_the_trainer_section_still_match():
    stages = [
        {"name": "s1", "kind": "shared_kd", "steps": 8, "batch_size": 4, "checkpoint_every": 2},
        {
            "name": "s2",
            "kind": "moe_kd",
            "steps": 12,
            "batch_size": 4,
            "accelerator": "cpu",
            "devices": 1,
            "strategy": "auto",
            "extra_trainer": {"log_every_n_steps": 1},
        },
    ]
    exp = experiment(stages)
    # what the code before the trainer section recorded for this configuration (stage folders on disk hold these)
    recorded = ["feaad2d6f0435caa", "ef73986e90c99ce6"]
    assert [exp.legacy_stage_fingerprint(i) for i in range(2)] == recorded
    assert all(exp.matches(i, fp) for i, fp in enumerate(recorded))
    # the same configuration written with trainer sections records the same
    top = TrainerSpec(checkpoint_every=2)
    sections = [
        stages[0] | {"checkpoint_every": None},
        {k: v for k, v in stages[1].items() if k not in ("accelerator", "devices", "strategy", "extra_trainer")}
        | {"trainer": TrainerSpec("cpu", 1, None, "auto", 50, {"log_every_n_steps": 1})},
    ]
    assert [experiment(sections, top).legacy_stage_fingerprint(i) for i in range(2)] == recorded
    assert not exp.matches(0, "another")


def write_stage_folders(exp: Experiment) -> None:
    """Stage folders as a run leaves them: s1 finished, s2 checkpointed (stage.json), each with its fingerprint."""
    for index, marker in ((0, "done.json"), (1, "stage.json")):
        folder = exp.output_dir / exp.stages[index].name
        folder.mkdir(parents=True)
        (folder / marker).write_text(json.dumps({"fingerprint": exp.stage_fingerprint(index), "stage": "x"}) + "\n")


def test_a_rerun_on_other_devices_with_the_same_global_batch_resumes_and_other_settings_are_refused(
    tmp_path, no_launcher
):
    def stages(**changes) -> list[dict]:
        return [
            {"name": "s1", "kind": "shared_kd", "steps": 8, "batch_size": 32} | changes,
            {"name": "s2", "kind": "moe_kd", "steps": 12, "batch_size": 32} | changes,
        ]

    out = tmp_path / "out"
    write_stage_folders(experiment(stages(), TrainerSpec(accelerator="cpu", devices=1), out))
    # 2 processes × 16 (DDP, another checkpoint interval, other logging) is the same run
    moved = TrainerSpec(
        accelerator="cpu", devices=2, strategy="ddp", checkpoint_every=10, extra={"log_every_n_steps": 1}
    )
    check_stage_folders(experiment(stages(batch_size=16), moved, out), None)
    check_stage_folders(
        experiment(stages(batch_size=8, trainer=TrainerSpec(devices=4, strategy=FSDP)), None, out), None
    )
    for changed, state in (
        (stages(lr=1e-3), "finished"),
        (stages(steps=9), "finished"),
        (stages(batch_size=16), "finished"),  # 1 × 16: half the global batch
        ([stages()[0], stages(warmup_steps=3)[1]], "started"),  # the checkpointed stage alone
    ):
        with pytest.raises(UserError, match=f"{state} with a different configuration"):
            check_stage_folders(experiment(changed, None, out), None)


# --- where the section shows up -------------------------------------------------------------------------------------
def test_fit_help_lists_the_trainer_keys_at_both_levels():
    keys = yaml_keys()
    for key in ("trainer.devices", "trainer.extra", "stages[].trainer.strategy", "stages[].devices"):
        assert f"\n  {key} " in keys, key
    assert "Shorthand for trainer.devices" in keys


def test_sweep_paths_reach_the_section_and_shortening_scales_the_inherited_checkpoint_interval():
    base = yaml.safe_load(DEBUG.read_text())
    for good in ("trainer.devices", "stages.0.trainer.devices", "stages.0.devices", "stages.*.trainer.extra.x"):
        check_path(good, base, "here")
    with pytest.raises(UserError, match=r"trainer has no key 'max_steps'; allowed \['accelerator'"):
        check_path("trainer.max_steps", base, "here")
    config = {
        "trainer": {"checkpoint_every": 10},
        "stages": [
            {"name": "a", "steps": 20},
            {"name": "b", "steps": 20, "trainer": {"checkpoint_every": 4}},
            {"name": "c", "steps": 20, "checkpoint_every": 6},
            {"name": "d", "steps": 20, "trainer": {"devices": 2}},
        ],
    }
    shorten(config, 0.5)
    assert [s.get("trainer", {}).get("checkpoint_every") for s in config["stages"]] == [5, 2, None, 5]
    assert config["stages"][2]["checkpoint_every"] == 3 and config["stages"][3]["trainer"]["devices"] == 2
    shorten(no_top := {"stages": [{"name": "a"}]}, 0.1)
    assert no_top["stages"][0]["trainer"]["checkpoint_every"] == 5  # the default 50


def test_a_runner_owned_key_in_the_experiment_section_is_one_error_line(capsys, workdir):
    args = ["fit", "--config", str(DEBUG), "--trainer.extra", '{"max_steps": 3}', "--output_dir", "out"]
    code, out, err = run_cli(args, capsys)
    line = one_error_line(err)
    assert code == 2 and "trainer.extra.max_steps=3: not allowed here" in line and "`steps`" in line, line
    assert "Taylor" not in out and not (workdir / "out").exists()
