"""`python -m src.cli params`: accounting of an experiment's teacher and student without weights."""

import json

import pytest
from conftest import ROOT

from src.cli import main


def run_params(capsys, name: str) -> dict:
    main(["params", "--config", str(ROOT / "experiments" / f"{name}.yaml"), "--json"])
    return json.loads(capsys.readouterr().out)


def test_flux_dev_moe_l_counts_without_weights(capsys):
    out = run_params(capsys, "flux_dev_moe_l")
    assert out["teacher"]["total"] == 11_901_408_320
    assert set(out) >= {"total", "activated", "activated_without_modulation", "flops"}
    # 1S12E2A keeps the FFN parameters (+ routers) and activates 1.5 of 4 FFN widths (docs/design.md §2.9: ≈ 8.3B)
    assert out["total"] - out["teacher"]["total"] == 12 * 3072 * 76
    assert 8.2e9 < out["activated"] < 8.4e9
    assert out["activated_without_modulation"] < out["activated"] - 3.2e9
    assert out["flops"] < out["teacher"]["flops"]


@pytest.mark.parametrize("name", ["moe_l", "moe_m", "moe_s", "moe_xs"])
def test_moe_family_activates_less_and_less(capsys, name):
    out = run_params(capsys, name)
    assert out["activated"] < out["teacher"]["activated"]


def test_family_is_ordered(capsys, tmp_path):
    # on one teacher: the main job (moe_s) has the hidden-64 glyph teacher, the rest of the family the default one
    teacher = ROOT / "checkpoints" / "teacher_glyphs_h64"
    activated = []
    for name in ("moe_l", "moe_m", "moe_s", "moe_xs"):
        config = tmp_path / f"{name}.yaml"
        config.write_text(f"config: {ROOT / 'experiments' / name}.yaml\nteacher: {{path: {teacher}}}\n")
        main(["params", "--config", str(config), "--json"])
        activated.append(json.loads(capsys.readouterr().out)["activated"])
    assert activated == sorted(activated, reverse=True)
    assert activated[2] == 591_496  # moe_s as the main job runs it (README, Measured: 0.591 M)


def test_params_needs_an_experiment(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["params", "--config", str(ROOT / "experiments" / "teacher_tiny.yaml")])
    assert exc.value.code == 2 and "stages" in capsys.readouterr().err
