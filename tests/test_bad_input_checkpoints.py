"""A config.json that disagrees with its weights: one line naming the folder and the layer counts, no meta tensors."""

import json
from pathlib import Path

import pytest
from conftest import ROOT, TINY_FLUX
from diffusers import FluxTransformer2DModel
from test_cli import one_error_line, run_cli

from src.errors import UserError
from src.models.loading import load_transformer


def mismatched(folder: Path, **changes) -> Path:
    FluxTransformer2DModel(**TINY_FLUX).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | changes))
    return folder


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"num_layers": 3}, "num_layers=3 but the weights hold 2 blocks"),
        ({"num_single_layers": 1}, "num_single_layers=1 but the weights hold 2 blocks"),
    ],
    ids=["more-layers", "fewer-layers"],
)
def test_loader_refuses(changes, expected, tmp_path):
    with pytest.raises(UserError, match=expected):
        load_transformer(mismatched(tmp_path / "m", **changes))


@pytest.mark.parametrize("command", ["evaluate", "export", "fit"])
def test_commands_refuse(command, capsys, workdir):
    folder = str(mismatched(workdir / "m", num_layers=3))
    args = {
        "evaluate": ["evaluate", "--model", folder, "--log_mlflow", "false", "--out", "ev"],
        "export": ["export", "--ckpt", folder, "--out", "ex"],
        "fit": ["fit", "--config", str(ROOT / "experiments" / "debug.yaml"), "--teacher.path", folder],
    }[command]
    code, _, err = run_cli(args, capsys)
    line = one_error_line(err)
    assert code == 2 and "config.json does not match the weights (num_layers=3" in line, line
    assert not any((workdir / name).exists() for name in ("ev", "ex", "runs"))


def test_evaluate_top_k_on_a_dense_model(capsys, workdir):
    """--top_k names routed experts: a dense model has none, which is one error line, not a traceback."""
    folder = workdir / "dense"
    FluxTransformer2DModel(**TINY_FLUX).save_pretrained(folder)
    code, _, err = run_cli(["evaluate", "--model", str(folder), "--top_k", "1", "--log_mlflow", "false"], capsys)
    line = one_error_line(err)
    assert code == 2 and "--top_k 1" in line and "no MoE layers" in line, line
