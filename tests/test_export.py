"""``export``: a trained student → a diffusers folder + model card that FluxPipeline loads offline; top-k at inference."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import load_file

from src.cli import main
from src.errors import UserError
from src.export import FLUX_DEV_ID, export, model_card
from src.models.accounting import count_params
from src.models.convert import ConversionConfig, convert_flux_to_moe
from src.models.flux_moe import FluxMoETransformer2DModel, set_top_k
from src.models.tiny_pipeline import TEXT_LEN, build_tiny_pipeline, tiny_transformer_config
from src.training.distill import DistillStage

SUMMARY = {"student/geneval_shapes/overall": 0.4375, "teacher/geneval_shapes/overall": 0.5, "fidelity/psnr": 17.25}
WEIGHTS = "diffusion_pytorch_model.safetensors"


def tiny_student(seed: int) -> FluxMoETransformer2DModel:
    torch.manual_seed(seed)
    dense = FluxTransformer2DModel(**tiny_transformer_config())
    conversion = ConversionConfig(split="random", assignment="random", router_init="normal", seed=seed)
    return convert_flux_to_moe(dense, conversion).eval()


def _finish_stage(exp: Path, name: str, student, when: float) -> Path:
    stage = exp / name
    student.save_pretrained(stage / "student")
    (stage / "done.json").write_text(json.dumps({"fingerprint": "f", "stage": name}) + "\n")
    os.utime(stage / "done.json", (when, when))
    return stage


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """An experiment folder as the runner leaves it: two finished stages, then the report of the last one."""
    exp = tmp_path_factory.mktemp("export") / "run"
    _finish_stage(exp, "stage1_shared", tiny_student(1), when=1_000_000)
    _finish_stage(exp, "stage2_moe", tiny_student(2), when=2_000_000)
    (exp / "experiment.json").write_text(json.dumps({"parent_run_id": "x", "name": "run"}))
    (exp / "report").mkdir()
    (exp / "report" / "summary.json").write_text(json.dumps(SUMMARY))
    os.utime(exp / "report" / "summary.json", (3_000_000, 3_000_000))
    return exp


@pytest.fixture(scope="module")
def tiny_flux_folder(tmp_path_factory) -> Path:
    """A FluxPipeline folder of tiny random components (CLIP + T5 + VAE + dense transformer), made offline."""
    path = tmp_path_factory.mktemp("pipe") / "tiny_flux"
    build_tiny_pipeline().save_pretrained(path)
    return path


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def same_weights(folder_a: Path, folder_b: Path) -> None:
    a, b = load_file(folder_a / WEIGHTS), load_file(folder_b / WEIGHTS)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_export_of_an_experiment_folder_takes_the_last_stage_and_its_evaluation(run_dir, tmp_path, capsys):
    result = export(str(run_dir), str(tmp_path / "out"))
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"config.json", WEIGHTS, "README.md"}
    same_weights(out, run_dir / "stage2_moe" / "student")
    assert result["source"] == str(run_dir / "stage2_moe" / "student")
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "diffusers" and "mixture-of-experts" in meta["tags"] and "base_model" not in meta
    params = count_params(FluxMoETransformer2DModel.from_pretrained(out))
    assert params["activated"] < params["total"]
    for label, key in (("total", "total"), ("activated", "activated")):
        assert f"| {label} | {params[key]:,} |" in card
    assert f"| activated without AdaLN modulation | {params['activated_without_modulation']:,} |" in card
    assert "| expert layout | 1S12E2A" in card and "| MoE locations | ff, ff_context, single |" in card
    assert "| geneval_shapes/overall | 0.5 | 0.4375 |" in card and "| fidelity/psnr | – | 17.25 |" in card


def test_earlier_stage_gets_no_evaluation_and_stage_or_student_folder_both_work(run_dir, tmp_path, capsys):
    export(str(run_dir / "stage1_shared"), str(tmp_path / "a"))
    export(str(run_dir / "stage1_shared" / "student"), str(tmp_path / "b"))
    same_weights(tmp_path / "a", run_dir / "stage1_shared" / "student")
    same_weights(tmp_path / "a", tmp_path / "b")
    assert "No evaluation of this exact student" in (tmp_path / "a" / "README.md").read_text()
    export(str(run_dir / "stage2_moe"), str(tmp_path / "c"))
    assert "| geneval_shapes/overall | 0.5 | 0.4375 |" in (tmp_path / "c" / "README.md").read_text()


def test_exported_student_generates_in_flux_pipeline_and_top_k_changes_at_inference(
    run_dir, tiny_flux_folder, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    export(str(run_dir), str(tmp_path / "out"))
    student = FluxMoETransformer2DModel.from_pretrained(tmp_path / "out")
    pipe = FluxPipeline.from_pretrained(tiny_flux_folder, transformer=student)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer is student

    def generate():
        return pipe(
            "a red cube left of a blue ball",
            height=16,
            width=16,
            num_inference_steps=2,
            max_sequence_length=TEXT_LEN,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    top2 = generate()
    assert top2.shape == (1, 16, 16, 3) and bool((top2 >= 0).all() and (top2 <= 1).all())
    set_top_k(student, 1)
    assert student.config.moe["top_k"] == 1
    top1 = generate()
    assert top1.shape == top2.shape and (top1 != top2).any()
    set_top_k(student, 0)  # shared experts only
    assert generate().shape == top2.shape


def test_export_of_a_stage_checkpoint_rebuilds_the_student(tmp_path, capsys):
    student = tiny_student(3)
    checkpoint = {
        "state_dict": {f"student.{k}": v for k, v in student.state_dict().items()} | {"teacher.x": torch.zeros(1)},
        "global_step": 5,
    }
    # the hook the stage runs when Lightning saves: it drops the teacher and records the student's config
    DistillStage.on_save_checkpoint(SimpleNamespace(student=student, check_finite=lambda: None), checkpoint)
    assert "teacher.x" not in checkpoint["state_dict"]
    (tmp_path / "stage" / "checkpoints").mkdir(parents=True)
    path = tmp_path / "stage" / "checkpoints" / "step000005.ckpt"
    torch.save(checkpoint, path)
    export(str(path), str(tmp_path / "out"), top_k=1)
    student.save_pretrained(tmp_path / "reference")
    same_weights(tmp_path / "out", tmp_path / "reference")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["moe"]["top_k"] == 1
    assert "| expert layout | 1S12E1A" in (tmp_path / "out" / "README.md").read_text()


def test_flux_dev_student_card_names_its_base_model_and_licence():
    from src.models.presets import flux_config

    with torch.device("meta"):
        dense = FluxTransformer2DModel(**flux_config("flux-dev"))
    meta = front_matter(model_card(dense, FLUX_DEV_ID, "somewhere", None))
    assert meta["base_model"] == FLUX_DEV_ID and meta["license_name"] == "flux-1-dev-non-commercial-license"
    from src.export import _default_base

    assert _default_base(dense) == FLUX_DEV_ID
    assert _default_base(tiny_student(0)) is None


def _cli_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["export", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_bad_input_is_one_error_line_and_touches_nothing(run_dir, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert "not an empty folder" in _cli_error(["--ckpt", str(run_dir), "--out", str(taken)], capsys)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    assert "no such file" in _cli_error(["--ckpt", str(tmp_path / "missing"), "--out", str(tmp_path / "o1")], capsys)
    (tmp_path / "empty").mkdir()
    assert "no finished stage" in _cli_error(["--ckpt", str(tmp_path / "empty"), "--out", str(tmp_path / "o2")], capsys)
    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    line = _cli_error(["--ckpt", str(tmp_path / "broken.ckpt"), "--out", str(tmp_path / "o3")], capsys)
    assert "cannot be read as a Lightning checkpoint" in line
    (tmp_path / "weights.bin").write_bytes(b"x")
    assert "not a Lightning .ckpt" in _cli_error(
        ["--ckpt", str(tmp_path / "weights.bin"), "--out", str(tmp_path / "o4")], capsys
    )
    line = _cli_error(["--ckpt", str(run_dir), "--out", str(tmp_path / "o5"), "--top_k", "13"], capsys)
    assert "top_k" in line
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))
    with pytest.raises(UserError, match="holds no student weights"):
        torch.save({"state_dict": {"teacher.x": torch.zeros(1)}}, tmp_path / "teacher_only.ckpt")
        export(str(tmp_path / "teacher_only.ckpt"), str(tmp_path / "o6"))
