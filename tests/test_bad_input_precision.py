"""Precision strings and Trainer overrides are checked when the experiment is parsed, before Taylor scoring."""

import json

import pytest
from conftest import ROOT
from test_cli import one_error_line, run_cli

DEBUG = str(ROOT / "experiments" / "debug.yaml")


def stages(**extra) -> str:
    return json.dumps([{"name": "s1", "kind": "shared_kd", "steps": 1, **extra}])


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({"precision": "banana"}, "precision='banana': not a precision this project trains with"),
        ({"precision": "bf16-true"}, "precision='bf16-true': trained parameters stay fp32"),
        ({"extra_trainer": {"precision": "banana"}}, "extra_trainer.precision='banana'"),
        ({"extra_trainer": {"max_stepz": 3}}, "extra_trainer.max_stepz: not a lightning.Trainer argument"),
    ],
    ids=["stage", "half-true", "extra_trainer", "unknown-trainer-arg"],
)
def test_refused_before_anything_runs(extra, expected, capsys, workdir):
    code, out, err = run_cli(["fit", "--config", DEBUG, "--stages", stages(**extra), "--output_dir", "out"], capsys)
    line = one_error_line(err)
    assert code == 2 and expected in line and "stage 's1'" in line, line
    assert "Taylor" not in out and not (workdir / "out").exists()
    assert "allowed" in line or "Trainer argument" in line
