"""FLUX-scale path offline: teacher loading, the latent datamodule (padding, checks, resume, URLs), the conditioning
adapters, and prepare-data → fit (all three stages) → FluxPipeline generation with tiny components."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import ROOT, TINY_FLUX
from lightning.pytorch.callbacks import ModelCheckpoint

from src.cli import main
from src.data.latents import LatentDataModule
from src.errors import UserError
from src.models.tiny_pipeline import TEXT_LEN, build_tiny_pipeline, tiny_transformer_config

PROMPTS = [
    "a red cube",
    "two green balls",
    "cat",
    "a blue cat on a mat",
    "fog",
    "a yellow kite",
    "dogs",
    "a red car",
]
STAGES = [
    {"name": "stage1_shared", "kind": "shared_kd", "steps": 2, "batch_size": 2, "checkpoint_every": 1},
    {"name": "stage2_moe", "kind": "moe_kd", "steps": 2, "batch_size": 2, "checkpoint_every": 1},
    {"name": "stage3_mob", "kind": "mob_kd", "steps": 2, "batch_size": 2, "checkpoint_every": 1},
]


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    """(pipeline folder, prepare-data output): 6 train + 2 held-out teacher-generated samples at 16×16 pixels."""
    root = tmp_path_factory.mktemp("latent_path")
    build_tiny_pipeline(guidance_embeds=True, seed=0).save_pretrained(root / "pipe")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    main(
        ["prepare-data", "--data.prompts", str(root / "prompts.txt"), "--data.pipeline", str(root / "pipe")]
        + ["--data.output_dir", str(root / "data"), "--data.latents", "teacher", "--data.resolution", "16"]
        + ["--data.steps", "2", "--data.max_sequence_length", str(TEXT_LEN), "--data.heldout", "2"]
        + [
            "--data.part_size",
            "4",
            "--data.chunk_size",
            "2",
            "--data.dtype",
            "float32",
            "--progress",
            "false",
        ]
    )
    return root / "pipe", root / "data"


def fit_args(pipe: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """experiments/flux_dev_moe_s.yaml on the tiny pipeline (2 single blocks: MoB groups of 2), seconds long."""
    return [
        "fit",
        "--config",
        str(ROOT / "experiments" / "flux_dev_moe_s.yaml"),
        "--teacher.path",
        str(pipe),
        "--teacher.dtype",
        "float32",
        "--data.path",
        str(data),
        "--output_dir",
        str(out),
        "--student.mob.group_size",
        "2",
        "--taylor.batches",
        "2",
        "--taylor.batch_size",
        "2",
        "--stages",
        json.dumps(STAGES),
        "--evaluation.steps",
        "2",
        "--threads",
        "1",
        *extra,
    ]


@pytest.fixture(scope="module")
def latent_student(prepared, tmp_path_factory, mlflow_template) -> Path:
    """prepare-data → fit with all three stages on the latent shards; the final student's diffusers folder."""
    pipe, data = prepared
    run = tmp_path_factory.mktemp("latent_fit")
    shutil.copy(mlflow_template, run / "mlflow.db")
    main(fit_args(pipe, data, run / "out", "--tracking_uri", f"sqlite:///{run / 'mlflow.db'}"))
    return run / "out" / "stage3_mob" / "student"


# --- the end-to-end acceptance path --------------------------------------------------------------------------------
def test_fit_on_latents_runs_every_stage_and_reports_fidelity(latent_student):
    out = latent_student.parents[1]
    assert all((out / s["name"] / "done.json").exists() for s in STAGES)
    config = json.loads((latent_student / "config.json").read_text())
    assert config["_class_name"] == "FluxMoETransformer2DModel" and config["mob"]["group_size"] == 2
    report = json.loads((out / "report" / "summary.json").read_text())
    assert report["fidelity/pairs"] == 2  # the held-out split
    assert 0 < report["fidelity/latent_rel_mse"] < 1 and 0.5 < report["fidelity/latent_cosine"] <= 1.0001
    assert report["params/student_activated"] < report["params/teacher_activated"]
    assert report["flops/student"] < report["flops/teacher"]


def test_the_exported_latent_student_generates_in_a_flux_pipeline(latent_student, prepared, tmp_path, capsys):
    """The acceptance chain's last two links: `export` of the experiment folder, then FluxPipeline generation."""
    from diffusers import FluxPipeline

    from src.models.loading import load_transformer

    main(["export", "--ckpt", str(latent_student.parents[1]), "--out", str(tmp_path / "export")])
    card = (tmp_path / "export" / "README.md").read_text()
    assert "activated" in card and "fidelity/latent_cosine" in card.replace("`", "")
    student = load_transformer(tmp_path / "export")
    pipe = FluxPipeline.from_pretrained(prepared[0], transformer=student)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        ["a red cube", "fog"],
        height=16,
        width=16,
        num_inference_steps=2,
        max_sequence_length=TEXT_LEN,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert images.shape == (2, 16, 16, 3) and ((images >= 0) & (images <= 1)).all()


# --- the datamodule -----------------------------------------------------------------------------------------
def test_batches_pad_t5_to_the_longest_prompt_with_zeros(prepared):
    from litdata import StreamingDataset

    data = LatentDataModule(str(prepared[1]), batch_size=3, shuffle=False, teacher_config=tiny_transformer_config())
    batch = next(iter(data.train_dataloader()))
    stored = StreamingDataset(str(prepared[1] / "train"), shuffle=False)
    assert batch["latents"].shape == (3, 16, 8, 8) and batch["latents"].dtype == torch.bfloat16
    lengths = batch["t5_length"].tolist()
    assert len(set(lengths)) > 1 and batch["t5"].shape == (3, max(lengths), 32)
    for row, (index, n) in enumerate(zip(batch["index"].tolist(), lengths)):
        assert torch.equal(batch["t5"][row, :n], stored[index]["t5"].view(torch.bfloat16))
        assert not batch["t5"][row, n:].any()
        assert batch["prompt"][row] == PROMPTS[index]


def test_an_object_store_url_streams_the_same_batches(prepared, tmp_path):
    def indices(path: str, **kwargs) -> list[list[int]]:
        data = LatentDataModule(path, batch_size=2, seed=3, **kwargs)
        return [b["index"].tolist() for b in data.train_dataloader()]

    local = indices(str(prepared[1]))
    assert local == indices(f"local:{prepared[1]}", cache_dir=str(tmp_path / "cache"))
    assert sorted(i for b in local for i in b) == list(range(6))


class Recorder(L.LightningModule):
    """Records the sample indices each training step sees."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["index"].tolist())
        return self.w.square().sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(data_path: Path, ckpt_dir: Path, steps: int, resume: Path | None = None) -> list[list[int]]:
    module = Recorder()
    trainer = L.Trainer(
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=1, save_top_k=-1)],
    )
    trainer.fit(module, datamodule=LatentDataModule(str(data_path), batch_size=2, seed=1), ckpt_path=resume)
    return module.seen


def test_a_resumed_fit_continues_mid_epoch_with_the_next_batch(prepared, tmp_path):
    full = _fit(prepared[1], tmp_path / "ckpt", steps=7)  # 3 batches an epoch: crosses two epoch ends
    assert sorted(i for b in full[:3] for i in b) == list(range(6)) and full[:3] != full[3:6]  # reshuffled
    for step in (2, 4):
        resumed = _fit(prepared[1], tmp_path / f"resumed{step}", 7, resume=tmp_path / "ckpt" / f"step={step}.ckpt")
        assert resumed == full[step:], step
    other = LatentDataModule(str(prepared[1]), batch_size=2)
    with pytest.raises(UserError, match="other prepared data"):
        other.load_state_dict({"dataset_sha256": "0" * 64})


def test_data_that_does_not_fit_the_teacher_is_refused_naming_the_manifest(prepared, tmp_path, capsys, monkeypatch):
    with pytest.raises(UserError) as exc:
        LatentDataModule(str(prepared[1]), teacher_config=TINY_FLUX)
    assert str(prepared[1] / "manifest.json") in str(exc.value) and "in_channels=48" in str(exc.value)
    # through fit: the shapes-world teacher against FLUX latents, refused before any stage
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(SystemExit):
        main(
            fit_args(
                ROOT / "checkpoints" / "teacher_tiny",
                prepared[1],
                tmp_path / "out",
                "--teacher.subfolder",
                "null",
            )
        )
    line = one_error_line(capsys.readouterr().err)
    assert "manifest.json" in line and "does not fit the teacher" in line
    assert not (tmp_path / "out" / "stage1_shared").exists()


def test_damaged_or_unfinished_data_is_refused_naming_the_file(prepared, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(prepared[1], data)
    chunk = sorted((data / "train").glob("chunk-*.bin"))[1]
    original = chunk.read_bytes()
    chunk.write_bytes(original[: len(original) // 2])
    with pytest.raises(UserError, match=f"shard {chunk}: .*truncated"):
        LatentDataModule(str(data), batch_size=2)
    chunk.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))  # same size, one byte flipped
    LatentDataModule(str(data), batch_size=2)  # the size check passes ...
    with pytest.raises(UserError, match=f"shard {chunk}: sha256"):
        LatentDataModule(str(data), batch_size=2, verify="hash")  # ... the hash check does not
    chunk.unlink()
    with pytest.raises(UserError, match=f"shard {chunk}: missing"):
        LatentDataModule(str(data), batch_size=2)
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps(manifest | {"complete": False}))
    with pytest.raises(UserError, match="did not finish"):
        LatentDataModule(str(data), batch_size=2)
    with pytest.raises(UserError, match=f"{tmp_path / 'nothing' / 'manifest.json'}: no such file"):
        LatentDataModule(str(tmp_path / "nothing"))


# --- teacher loading ----------------------------------------------------------------------------------------
def test_the_teacher_loads_from_a_pipeline_folder_in_bf16(prepared):
    from diffusers import FluxTransformer2DModel

    from src.training.experiment import TeacherSpec
    from src.training.runner import load_teacher

    spec = TeacherSpec(path=str(prepared[0]), subfolder="transformer", dtype="bfloat16")
    teacher = load_teacher(SimpleNamespace(teacher=spec))
    saved = FluxTransformer2DModel.from_pretrained(prepared[0], subfolder="transformer")
    assert teacher.dtype == torch.bfloat16 and not any(p.requires_grad for p in teacher.parameters())
    for (name, a), b in zip(teacher.state_dict().items(), saved.state_dict().values()):
        assert torch.equal(a, b.bfloat16()), name


@pytest.mark.parametrize("case", ["missing", "no_subfolder", "wrong_pipeline", "wrong_model", "hub_offline"])
def test_a_teacher_that_cannot_be_loaded_is_one_error_line(case, prepared, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    pipe = tmp_path / "pipe"
    shutil.copytree(prepared[0], pipe)
    extra: list[str] = []
    if case == "missing":
        path, expected = tmp_path / "nowhere", ["nowhere", "no such folder"]
    elif case == "no_subfolder":
        path, extra = pipe, ["--teacher.subfolder", "null"]
        expected = [str(pipe / "config.json"), "teacher.subfolder: transformer"]
    elif case == "wrong_pipeline":
        (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
        path, expected = pipe, [str(pipe / "model_index.json"), "StableDiffusion3Pipeline"]
    elif case == "wrong_model":
        config = json.loads((pipe / "transformer" / "config.json").read_text())
        (pipe / "transformer" / "config.json").write_text(json.dumps(config | {"_class_name": "SD3Transformer2DModel"}))
        path, expected = pipe, [str(pipe / "transformer" / "config.json"), "SD3Transformer2DModel"]
    else:
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        path, expected = (
            "black-forest-labs/FLUX.1-dev",
            ["black-forest-labs/FLUX.1-dev", "hub cannot provide it"],
        )
    args = fit_args(prepared[0], prepared[1], tmp_path / "out", *extra)
    args[args.index("--teacher.path") + 1] = str(path)
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert all(part in line for part in expected), line


# --- conditioning adapters ----------------------------------------------------------------------------------
def test_shapes_conditioning_is_the_shapes_pipelines_call():
    from conftest import dense_model

    from src.data.datamodule import ShapesStream
    from src.data.shapes import ShapesWorld
    from src.models.pipeline import ShapesPipeline
    from src.training.conditioning import ShapesConditioning, velocity

    model = dense_model(in_channels=48)
    pipe = ShapesPipeline(model, image_size=16)
    batch = ShapesStream(ShapesWorld(size=16), 3, seed=0).batch(0)
    inputs = ShapesConditioning(pipe).inputs(batch)
    x_BLD = torch.randn(inputs.x0_BLD.shape)
    sigma_B = torch.tensor([0.1, 0.5, 0.9])
    expected = pipe.velocity(x_BLD, sigma_B, *pipe.encode_prompts(batch["prompt"]), model)
    assert torch.equal(velocity(model, x_BLD, sigma_B, inputs, 3.5), expected)


def test_latent_conditioning_packs_like_flux_pipeline():
    from diffusers import FluxPipeline

    from src.training.conditioning import LatentConditioning

    latents = torch.randn(2, 16, 6, 8).bfloat16()
    batch = {
        "latents": latents,
        "t5": torch.randn(2, 5, 32).bfloat16(),
        "pooled": torch.randn(2, 16).bfloat16(),
    }
    inputs = LatentConditioning(guidance=3.5).inputs(batch)
    assert torch.equal(inputs.x0_BLD, FluxPipeline._pack_latents(latents.float(), 2, 16, 6, 8))
    assert torch.equal(inputs.img_ids_L3, FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32))
    assert inputs.txt_ids_T3.shape == (5, 3) and not inputs.txt_ids_T3.any()


# --- accounting of the FLUX.1-dev family --------------------------------------------------------------------
def test_flux_dev_moe_m_and_s_count_without_weights(capsys):
    without = {}
    for size in ("m", "s"):  # flux_dev_moe_l: tests/test_params_cli.py
        main(["params", "--config", str(ROOT / "experiments" / f"flux_dev_moe_{size}.yaml"), "--json"])
        counts = json.loads(capsys.readouterr().out)
        assert counts["teacher"]["total"] == 11_901_408_320
        assert counts["activated"] < counts["teacher"]["activated"]
        without[size] = counts["activated_without_modulation"]
    # paper: MoE-L 5.15 B, MoE-M 4 B, MoE-S 3.2 B activated (without the per-block AdaLN modulation)
    assert 3.0e9 < without["s"] < 3.5e9 < without["m"] < 4.2e9
