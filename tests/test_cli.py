"""The command line: every experiment parses, bad input gives one clear error line and touches nothing."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_FLUX, tiny_teacher_args
from diffusers import FluxTransformer2DModel

from src.cli import main
from src.training.experiment import is_experiment_config

EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def one_error_line(err: str) -> str:
    """Exactly one ``error:`` line and no traceback (log lines such as Lightning's "Seed set" may precede it)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("config", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_experiment_parses(config, capsys, workdir):
    command = "prepare-data" if config.stem.endswith("_prepare") else "fit"
    code, out, _ = run_cli([command, "--config", str(config), "--print_config"], capsys)
    assert code == 0
    if command == "prepare-data":
        assert "prompts:" in out and "pipeline:" in out
    elif "stages:" in config.read_text():  # a multi-stage Dense2MoE experiment
        assert "stages:" in out and "conversion:" in out
    else:  # a plain LightningCLI config
        assert "class_path" in out and "trainer:" in out


def test_dot_override_reaches_the_config(capsys, workdir):
    config = ROOT / "experiments" / "teacher_tiny.yaml"
    code, out, _ = run_cli(["fit", "--config", str(config), "--model.init_args.lr", "0.123", "--print_config"], capsys)
    assert code == 0 and "lr: 0.123" in out


def test_unknown_config_key(capsys, workdir):
    config = ROOT / "experiments" / "teacher_tiny.yaml"
    code, _, err = run_cli(["fit", "--config", str(config), "--model.init_args.bogus_key", "3"], capsys)
    assert code == 2
    assert "bogus_key" in one_error_line(err)


def test_unknown_command(capsys, workdir):
    code, _, err = run_cli(["fitt"], capsys)
    assert code == 2 and "fitt" in one_error_line(err)


def test_missing_teacher_checkpoint(capsys, workdir):
    args = ["fit", *tiny_teacher_args(workdir), "--model.init_args.init_from", str(workdir / "nowhere")]
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert "nowhere" in one_error_line(err) and "config.json" in err


def test_wrong_shaped_checkpoint_is_refused_and_untouched(capsys, workdir):
    wrong = dict(TINY_FLUX, num_layers=1)
    FluxTransformer2DModel(**wrong).save_pretrained(workdir / "wrong")
    before = {p.name: digest(p) for p in (workdir / "wrong").iterdir()}
    args = ["fit", *tiny_teacher_args(workdir), "--model.init_args.init_from", str(workdir / "wrong")]
    code, _, err = run_cli(args, capsys)
    assert code == 2
    line = one_error_line(err)
    assert "does not match" in line and "num_layers" in line
    assert before == {p.name: digest(p) for p in (workdir / "wrong").iterdir()}
    assert not (workdir / "teacher").exists()


def test_corrupted_checkpoint(capsys, workdir):
    FluxTransformer2DModel(**TINY_FLUX).save_pretrained(workdir / "bad")
    (workdir / "bad" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    args = ["fit", *tiny_teacher_args(workdir), "--model.init_args.init_from", str(workdir / "bad")]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "cannot be loaded" in one_error_line(err)


def test_unwritable_output_folder(capsys, workdir):
    (workdir / "a_file").write_text("x")
    args = ["fit", *tiny_teacher_args(workdir), "--model.init_args.export_dir", str(workdir / "a_file" / "teacher")]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "export_dir" in one_error_line(err)
    assert (workdir / "a_file").read_text() == "x"


def test_unreachable_mlflow_uri(capsys, workdir):
    before = digest(workdir / "mlflow.db")
    args = ["fit", *tiny_teacher_args(workdir), "--trainer.logger.init_args.tracking_uri", "http://127.0.0.1:9"]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "unreachable" in one_error_line(err)
    assert digest(workdir / "mlflow.db") == before
    assert not (workdir / "teacher").exists()


def test_file_store_uri_is_refused(capsys, workdir, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    args = ["fit", *tiny_teacher_args(workdir), "--trainer.logger.init_args.tracking_uri", "file:./mlruns"]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "sqlite" in one_error_line(err)


def test_bad_prompt_file_for_evaluate(capsys, workdir):
    FluxTransformer2DModel(**TINY_FLUX).save_pretrained(workdir / "m")
    (workdir / "p.jsonl").write_text('{"prompt": "a photo of a circle"}\nnot json\n')
    code, _, err = run_cli(["evaluate", "--model", str(workdir / "m"), "--prompts", str(workdir / "p.jsonl")], capsys)
    assert code == 2 and "line 2" in one_error_line(err)


def test_geneval_metadata_is_shipped_with_licence():
    lines = (ROOT / "evaluation" / "data" / "geneval" / "evaluation_metadata.jsonl").read_text().splitlines()
    assert len(lines) == 553
    assert json.loads(lines[0])["tag"] == "single_object"
    assert "MIT License" in (ROOT / "evaluation" / "data" / "geneval" / "LICENSE").read_text()


def test_checkpoint_round_trip_loader(workdir):
    from src.models.loading import load_transformer

    model = FluxTransformer2DModel(**TINY_FLUX)
    model.save_pretrained(workdir / "ok")
    loaded = load_transformer(workdir / "ok", {"num_layers": 2, "axes_dims_rope": (2, 2, 4)})
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_stages_in_an_included_file_make_an_experiment(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"config: {ROOT / 'experiments' / 'moe_l.yaml'}\nteacher: {{path: checkpoints/teacher_tiny}}\n")
    assert is_experiment_config(str(child))
    assert not is_experiment_config(str(ROOT / "experiments" / "teacher_tiny.yaml"))
