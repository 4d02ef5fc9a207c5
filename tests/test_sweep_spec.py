"""Sweep files: parsing, config paths, trial configs, and bad files refused before any trial (no subprocess runs)."""

from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from src.cli import main
from src.errors import UserError
from src.sweep.checks import check_sweep, config_problem
from src.sweep.configs import check_path, set_path, stage_offsets, trial_config
from src.sweep.spec import load_sweep

DEBUG = str(ROOT / "experiments" / "debug.yaml")
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))


def write(folder: Path, **fields) -> Path:
    sweep = {
        "name": "t",
        "base": DEBUG,
        "space": {"student.conversion.layout": ["1S12E2A", "1S4E1A"]},
        "objectives": {"geneval_shapes/overall": "maximize"},
        "sampler": {"name": "grid"},
        "output_dir": str(folder / "out"),
        **fields,
    }
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def refused(path: Path, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["sweep", "--config", str(path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_sweep_file_passes_the_up_front_checks(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = load_sweep(path)
    check_sweep(spec)
    assert spec.n_trials is not None and spec.n_trials >= 1


def test_paper_ablations_is_a_grid_of_the_paper_comparisons(monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = load_sweep(ROOT / "sweeps" / "paper_ablations.yaml")
    variants = {v.name: trial_config(spec, {"variant": v.name, "seed": 0}) for v in spec.variants}
    seeds = next(p for p in spec.space if p.path == "seed").labels
    assert len(seeds) >= 3  # claims are decided over several distillation seeds
    assert spec.sampler.name == "grid" and spec.n_trials == len(variants) * len(seeds)
    claimed = {(c.better, c.worse) for c in spec.claims}
    assert ("teacher", "prune_width") in claimed and ("moe_l", "prune_width") in claimed  # (e) and (a)
    kinds = {
        name: (c["student"].get("conversion") or {}, c["student"].get("prune") or {}) for name, c in variants.items()
    }
    # MoE vs width pruning at activated FFN 1.5/4 and 2/4
    assert {kinds[n][1].get("ffn_fraction") for n in variants if kinds[n][1].get("kind") == "width"} == {0.375, 0.5}
    assert {kinds[n][0].get("layout") for n in variants if kinds[n][0]} >= {"1S12E2A", "1S12E4A"}
    # two-stage vs joint, Taylor vs random split, MoB vs depth pruning
    assert any(len(c["stages"]) == 1 and c["stages"][0].get("freeze_shared") is False for c in variants.values())
    assert any(kinds[n][0].get("split") == "random" for n in variants)
    assert any(c["student"].get("mob") for c in variants.values())
    assert any(kinds[n][1].get("kind") == "depth" for n in variants)


def test_a_trial_config_applies_stages_schedule_overrides_and_values_in_order(tmp_path):
    spec = load_sweep(
        write(
            tmp_path,
            space={"stages.stage2_moe.lr": [0.001], "stages.*.batch_size": {"type": "int", "low": 2, "high": 4}},
            trial={"stages": ["stage1_shared", "stage2_moe"], "steps_scale": 0.5, "overrides": {"stages.0.steps": 7}},
            sampler={"name": "tpe"},
            trials=3,
        )
    )
    config = trial_config(spec, {"stages.stage2_moe.lr": 0.001, "stages.*.batch_size": 3})
    assert [s["name"] for s in config["stages"]] == ["stage1_shared", "stage2_moe"]  # stage3_mob dropped
    assert [s["steps"] for s in config["stages"]] == [7, 3]  # 6 × 0.5 = 3, then the override
    assert [s["checkpoint_every"] for s in config["stages"]] == [2, 2]  # round(3 × 0.5)
    assert config["stages"][1]["lr"] == 0.001 and {s["batch_size"] for s in config["stages"]} == {3}
    assert stage_offsets(config) == {"stage1_shared": 0, "stage2_moe": 7}
    assert config_problem(config) is None


def test_config_paths_are_checked_against_the_experiment_schema():
    base = yaml.safe_load(Path(DEBUG).read_text())
    for good in ("student.conversion.aux_loss_weight", "stages.1.lr", "stages.stage3_mob.steps", "stages.*.lr"):
        check_path(good, base, "here")
    check_path("teacher.expected.num_layers", base, "here")  # a free-form mapping
    for bad, expected in (
        ("student.conversion.layot", "allowed ['layout'"),
        ("stages.9.lr", "no element '9'"),
        ("stages.stage9.lr", "no element 'stage9'"),
        ("stages.0.lr.x", "single value"),
        ("studnt.mob", "no key 'studnt'"),
        ("output_dir", "set by the sweep driver"),
    ):
        with pytest.raises(UserError, match=expected.replace("[", r"\[")):
            check_path(bad, base, "here")


def test_set_path_creates_missing_mappings_and_addresses_stages_by_name():
    config = {"student": {"mob": None}, "stages": [{"name": "a"}, {"name": "b"}]}
    set_path(config, "student.mob.group_size", 2)
    set_path(config, "stages.b.lr", 0.1)
    set_path(config, "stages.*.steps", 5)
    assert config == {
        "student": {"mob": {"group_size": 2}},
        "stages": [{"name": "a", "steps": 5}, {"name": "b", "lr": 0.1, "steps": 5}],
    }


def test_non_scalar_choices_are_stored_as_json_and_decoded(tmp_path):
    spec = load_sweep(write(tmp_path, space={"student.conversion.locations": [["ff"], ["ff", "single"]]}))
    (param,) = spec.params
    assert param.labels == ['["ff"]', '["ff", "single"]'] and param.value('["ff"]') == ["ff"]
    assert spec.grid() == {"student.conversion.locations": param.labels}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"space": {"student.conversion.layot": ["1S12E2A"]}}, "unknown config path 'student.conversion.layot'"),
        ({"space": {"student.conversion.layout": []}}, "non-empty list"),
        (
            {"space": {"stages.0.lr": {"type": "float", "low": 0.1, "high": 0.01}}, "sampler": {"name": "tpe"}},
            "low=0.1 > high=0.01",
        ),
        ({"objectives": {"geneval/overal": "maximize"}}, "metric 'geneval/overal' is not in a run's report"),
        ({"objectives": {"geneval_shapes/overall": "up"}}, "direction='up'"),
        ({"objectives": {}}, "objectives"),
        ({"space": {"student.conversion.layout": ["1S12X2A"]}}, "1S12X2A"),
        ({"trial": {"overrides": {"evaluation.enabled": False}}}, "evaluation.enabled is false"),
        ({"space": {"stages.0.lr": {"type": "float", "low": 0.1, "high": 0.2}}}, "grid sampler needs a step"),
        ({"trials": 5}, "exceeds the grid's 2 points"),
        ({"samplr": {"name": "tpe"}}, "unknown key 'samplr'"),
        ({"pruning": {"monitor": "val/loss"}}, "pruning.monitor='val/loss'"),
        ({"trial": {"stages": ["stage9"]}}, "trial.stages: ['stage9']"),
        (
            {"space": {"stages.0.lr": {"type": "float", "low": 0, "high": 1, "log": True}}, "sampler": {"name": "tpe"}},
            "low > 0",
        ),
        ({"sampler": {"name": "cmaes"}}, "name='cmaes'"),
        ({"base": "experiments/nope.yaml"}, "no such file"),
    ],
)
def test_bad_sweep_files_are_refused_before_any_trial(tmp_path, capsys, fields, expected):
    line = refused(write(tmp_path, **fields), capsys)
    assert expected in line, line
    assert not (tmp_path / "out").exists()  # nothing written: no storage, no trial folder


def test_an_unknown_lightning_config_key_is_refused(tmp_path, capsys):
    teacher = str(ROOT / "experiments" / "teacher_tiny.yaml")
    path = write(
        tmp_path,
        base=teacher,
        space={"model.init_args.lrr": [0.001]},
        objectives={"val/loss": "minimize"},
    )
    assert "lrr" in refused(path, capsys)
    spec = load_sweep(
        write(tmp_path, base=teacher, space={"model.init_args.lr": [0.001, 0.01]}, objectives={"val/loss": "minimize"})
    )
    check_sweep(spec)  # the LightningCLI parser accepts it (objective names are checked after the first trial)


def test_dry_run_prints_the_first_trial_and_writes_nothing(tmp_path, capsys):
    main(["sweep", "--config", str(write(tmp_path)), "--dry_run"])
    out = capsys.readouterr().out
    assert "2 trials (grid sampler)" in out and "layout: 1S12E2A" in out
    assert not (tmp_path / "out").exists()


def test_trial_threads_follow_the_users_openmp_setting(monkeypatch):
    from src.sweep.trial import child_env

    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    env = child_env(2)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"
    monkeypatch.delenv("OMP_NUM_THREADS")
    env = child_env(2)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "2"
