"""prepare-data: prompts (and images) → litdata shards through a tiny offline FluxPipeline; resume; bad input."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image

from src.cli import main
from src.models.tiny_pipeline import TEXT_LEN, build_tiny_pipeline

PROMPTS = [
    "a red cube",
    "two green balls",
    "a blue cat on a mat",
    "cat",
    "a yellow kite",
    "three small dogs",
    "fog",
]
SEED = 5


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory) -> Path:
    """A tiny FluxPipeline folder (guidance-distilled transformer, like FLUX.1-dev)."""
    path = tmp_path_factory.mktemp("pipe") / "pipe"
    build_tiny_pipeline(guidance_embeds=True, seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    """A .jsonl with one image per prompt (images of several sizes and aspect ratios)."""
    folder = tmp_path_factory.mktemp("prompts")
    rng = np.random.default_rng(0)
    lines = []
    for i, prompt in enumerate(PROMPTS):
        size = (16 + 4 * i, 20 + 2 * (i % 3))
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        lines.append(json.dumps({"prompt": prompt, "image": f"img{i}.png"}))
    (folder / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "prompts.jsonl"


def prepare_args(prompts: Path, pipe: Path, out: Path, *extra: str) -> list[str]:
    return [
        "prepare-data",
        "--data.prompts",
        str(prompts),
        "--data.pipeline",
        str(pipe),
        "--data.output_dir",
        str(out),
        "--data.resolution",
        "16",
        "--data.max_sequence_length",
        str(TEXT_LEN),
        "--data.heldout",
        "2",
        "--data.batch_size",
        "2",
        "--data.part_size",
        "3",
        "--data.chunk_size",
        "2",
        "--data.dtype",
        "float32",
        "--data.seed",
        str(SEED),
        "--data.steps",
        "2",
        "--progress",
        "false",
        *extra,
    ]


def read_split(out: Path, split: str) -> list[dict]:
    from litdata import StreamingDataset

    dataset = StreamingDataset(str(out / split), shuffle=False)
    return [dataset[i] for i in range(len(dataset))]


def bf16(stored: torch.Tensor) -> torch.Tensor:
    return stored.view(torch.bfloat16).float()


def load_pipe(path: Path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_vae_latents_and_text_embeddings_are_the_pipelines(pipe_dir, prompt_file, tmp_path):
    out = tmp_path / "out"
    main(prepare_args(prompt_file, pipe_dir, out, "--data.latents", "vae"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["latent_shape"] == [16, 8, 8]
    assert (manifest["splits"]["train"]["samples"], manifest["splits"]["heldout"]["samples"]) == (5, 2)
    assert [len(p["chunks"]) for p in manifest["splits"]["train"]["parts"]] == [
        2,
        1,
    ]  # parts of 3, chunks of 2
    train, heldout = read_split(out, "train"), read_split(out, "heldout")
    assert [s["index"] for s in train] == [0, 1, 2, 3, 4] and [s["index"] for s in heldout] == [5, 6]

    pipe = load_pipe(pipe_dir)
    vae = pipe.vae
    for sample in train + heldout:
        i = sample["index"]
        assert sample["prompt"] == PROMPTS[i]
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS[i], None, max_sequence_length=TEXT_LEN)
        n = int(pipe.tokenizer_2(PROMPTS[i], return_tensors="pt").attention_mask.sum())  # tokens through EOS
        assert sample["t5_length"] == n and sample["t5"].shape == (n, 32)
        torch.testing.assert_close(bf16(sample["t5"]), embeds[0, :n].bfloat16().float(), atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(bf16(sample["pooled"]), pooled[0].bfloat16().float(), atol=1e-2, rtol=1e-2)
        # the image, short side resized to 16 and centre-cropped, through the VAE with this sample's own noise
        image = Image.open(prompt_file.parent / f"img{i}.png").convert("RGB")
        scale = 16 / min(image.size)
        w, h = max(16, round(image.width * scale)), max(16, round(image.height * scale))
        image = image.resize((w, h), Image.BICUBIC).crop(
            ((w - 16) // 2, (h - 16) // 2, (w - 16) // 2 + 16, (h - 16) // 2 + 16)
        )
        x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
        gen = torch.Generator().manual_seed(SEED * 1_000_003 + i)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(generator=gen)
        expected = (z[0] - vae.config.shift_factor) * vae.config.scaling_factor
        torch.testing.assert_close(bf16(sample["latents"]), expected.bfloat16().float(), atol=2e-2, rtol=2e-2)


def test_teacher_latents_are_the_pipelines_samples(pipe_dir, prompt_file, tmp_path):
    out = tmp_path / "out"
    main(prepare_args(prompt_file, pipe_dir, out, "--data.latents", "teacher", "--data.t5_padding", "full"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["latents_from"] == "teacher" and manifest["model"]["transformer_config_sha256"]
    pipe = load_pipe(pipe_dir)
    for sample in read_split(out, "train")[:2]:
        i = sample["index"]
        assert sample["t5"].shape == (TEXT_LEN, 32)  # t5_padding full: every position FluxPipeline feeds
        packed = pipe(
            PROMPTS[i],
            height=16,
            width=16,
            num_inference_steps=2,
            guidance_scale=3.5,
            generator=torch.Generator().manual_seed(SEED * 1_000_003 + i),
            max_sequence_length=TEXT_LEN,
            output_type="latent",
        ).images
        expected = pipe._unpack_latents(packed, 16, 16, pipe.vae_scale_factor)[0]
        torch.testing.assert_close(bf16(sample["latents"]), expected.bfloat16().float(), atol=2e-2, rtol=2e-2)


def test_a_killed_run_resumes_to_the_same_shards_and_a_finished_one_is_a_no_op(
    pipe_dir, prompt_file, tmp_path, monkeypatch, capsys
):
    from src.data import prepare

    main(prepare_args(prompt_file, pipe_dir, tmp_path / "ref", "--data.latents", "vae"))
    real = prepare._write_part
    calls = []

    def killed_after_one_part(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare, "_write_part", killed_after_one_part)
    with pytest.raises(KeyboardInterrupt):
        main(prepare_args(prompt_file, pipe_dir, tmp_path / "killed", "--data.latents", "vae"))
    partial = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert not partial["complete"] and len(partial["splits"]["train"]["parts"]) == 1
    monkeypatch.setattr(prepare, "_write_part", real)
    main(prepare_args(prompt_file, pipe_dir, tmp_path / "killed", "--data.latents", "vae", "--data.batch_size", "3"))
    ref = json.loads((tmp_path / "ref" / "manifest.json").read_text())
    resumed = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert resumed["complete"] and resumed["dataset_sha256"] == ref["dataset_sha256"]
    assert sorted(p.name for p in (tmp_path / "killed" / "train").iterdir()) == sorted(
        p.name for p in (tmp_path / "ref" / "train").iterdir()
    )

    def must_not_load(cfg):
        raise AssertionError("a finished prepare-data must not load the pipeline")

    monkeypatch.setattr(prepare, "load_pipeline", must_not_load)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "ref").rglob("*")}
    capsys.readouterr()
    main(prepare_args(prompt_file, pipe_dir, tmp_path / "ref", "--data.latents", "vae"))
    assert "nothing to do" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "ref").rglob("*")}


def digest_tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def test_other_settings_on_an_existing_output_are_refused_untouched(pipe_dir, prompt_file, tmp_path, capsys):
    out = tmp_path / "out"
    main(prepare_args(prompt_file, pipe_dir, out, "--data.latents", "vae", "--data.heldout", "5"))
    before = digest_tree(out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(
            prepare_args(prompt_file, pipe_dir, out, "--data.latents", "vae", "--data.heldout", "5", "--data.seed", "9")
        )
    assert exc.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(out) in line and "changed: seed" in line
    assert digest_tree(out) == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main(prepare_args(prompt_file, pipe_dir, tmp_path / "other", "--data.latents", "vae"))
    assert "holds no manifest.json" in one_error_line(capsys.readouterr().err)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "case",
    [
        "no_folder",
        "wrong_model",
        "hub_offline",
        "bad_json",
        "missing_image",
        "unknown_format",
        "no_train",
        "bad_value",
    ],
)
def test_bad_input_is_one_error_line_naming_the_file(case, pipe_dir, prompt_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prompts, pipe, extra, expected = prompt_file, str(pipe_dir), ["--data.latents", "vae"], []
    if case == "no_folder":
        pipe, expected = str(tmp_path / "nowhere"), ["nowhere", "no such folder"]
    elif case == "wrong_model":
        shutil.copytree(pipe_dir, tmp_path / "sd")
        (tmp_path / "sd" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
        pipe, expected = (
            str(tmp_path / "sd"),
            [str(tmp_path / "sd" / "model_index.json"), "StableDiffusionPipeline"],
        )
    elif case == "hub_offline":  # no network here either way; offline mode fails at once instead of retrying
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        pipe, expected = (
            "black-forest-labs/FLUX.1-dev",
            ["black-forest-labs/FLUX.1-dev", "hub cannot provide it"],
        )
    elif case == "bad_json":
        prompts = tmp_path / "p.jsonl"
        prompts.write_text('{"prompt": "a cat"}\n{"prompt": \n')
        expected = [str(prompts), "line 2"]
    elif case == "missing_image":
        prompts = tmp_path / "p.jsonl"
        prompts.write_text("\n".join(json.dumps({"prompt": p, "image": "gone.png"}) for p in PROMPTS))
        expected = [str(tmp_path / "gone.png"), "cannot be read"]
    elif case == "unknown_format":
        prompts = tmp_path / "p.csv"
        prompts.write_text("prompt\na cat\n")
        expected = [str(prompts), ".csv"]
    elif case == "no_train":
        extra, expected = [*extra, "--data.heldout", "7"], ["heldout=7", "only 7 prompts"]
    else:
        extra, expected = ["--data.latents", "pixels"], ["latents='pixels'", "allowed"]
    with pytest.raises(SystemExit) as exc:
        main(prepare_args(prompts, Path(pipe), tmp_path / "out", *extra))
    assert exc.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert all(part in line for part in expected), line


def test_prompt_files_txt_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from src.data.prepare import read_prompts

    (tmp_path / "p.txt").write_text("a red cube\n\n  two cats  \n")
    assert read_prompts(tmp_path / "p.txt") == [
        {"prompt": "a red cube", "image": None},
        {"prompt": "two cats", "image": None},
    ]
    pq.write_table(pa.table({"text": ["a dog", "a kite"], "image": ["a.png", None]}), tmp_path / "p.parquet")
    assert read_prompts(tmp_path / "p.parquet") == [
        {"prompt": "a dog", "image": "a.png"},
        {"prompt": "a kite", "image": None},
    ]


def test_the_prepare_config_parses(capsys):
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "prepare-data",
                "--config",
                str(ROOT / "experiments" / "flux_dev_prepare.yaml"),
                "--print_config",
            ]
        )
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "pipeline: black-forest-labs/FLUX.1-dev" in out and "latents: teacher" in out
