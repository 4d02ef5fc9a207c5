"""Real GenEval path offline: tiny FluxPipeline → tiny Mask2Former → tiny CLIP colours → GenEval rules → MLflow."""

import hashlib
import json
import os
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.geneval import read_results_jsonl, summarize
from src.cli import main

# COCO's own spelling of three classes GenEval renames (mouse, remote, keyboard): the label map must handle them.
COCO_NAMES = [
    {"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard"}.get(line.strip(), line.strip())
    for line in (Path(__file__).parents[1] / "evaluation/data/geneval/object_names.txt").read_text().splitlines()
]
TINY_CLIP = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}
PROMPTS = [
    {"tag": "single_object", "include": [{"class": "cup", "count": 1}], "prompt": "a photo of a cup"},
    {"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "red"}], "prompt": "a photo of a red cup"},
    {
        "tag": "counting",
        "include": [{"class": "cup", "count": 2}],
        "exclude": [{"class": "cup", "count": 3}],
        "prompt": "a photo of two cups",
    },
    {
        "tag": "position",
        "include": [{"class": "dog", "count": 1}, {"class": "cup", "count": 1, "position": ["left of", 0]}],
        "prompt": "a photo of a cup left of a dog",
    },
]


def tiny_mask2former(folder: Path, favourite: str = "cup") -> Path:
    """A random Mask2Former (tiny Swin) with COCO labels whose class head prefers ``favourite`` (so it detects)."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    torch.manual_seed(0)
    swin = SwinConfig(
        image_size=64, patch_size=4, embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )  # fmt: skip
    config = Mask2FormerConfig(
        backbone_config=swin, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32,
        encoder_layers=1, decoder_layers=2, num_attention_heads=2, dim_feedforward=32, num_queries=8,
        id2label=dict(enumerate(COCO_NAMES)), label2id={n: i for i, n in enumerate(COCO_NAMES)},
    )  # fmt: skip
    model = Mask2FormerForUniversalSegmentation(config)
    with torch.no_grad():
        model.class_predictor.bias[COCO_NAMES.index(favourite)] = 20.0
    model.save_pretrained(folder)
    Mask2FormerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


def tiny_clip(folder: Path) -> tuple[Path, Path]:
    """A tiny open_clip model config (.json) and a random checkpoint (.pt) for it."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    torch.save(open_clip.create_model("tiny-clip").state_dict(), folder / "tiny-clip.pt")
    return config, folder / "tiny-clip.pt"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from src.models.tiny_pipeline import build_tiny_pipeline

    tmp = tmp_path_factory.mktemp("real_geneval")
    build_tiny_pipeline().save_pretrained(tmp / "pipe")
    clip_config, clip_weights = tiny_clip(tmp / "clip")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return {
        "pipe": tmp / "pipe",
        "detector": tiny_mask2former(tmp / "mask2former"),
        "clip": ["--clip_model", str(clip_config), "--clip_pretrained", str(clip_weights)],
        "prompts": prompts,
    }


def flux_args(assets, out: Path) -> list[str]:
    return [
        "evaluate", "--model", str(assets["pipe"]), "--prompts", str(assets["prompts"]), "--out", str(out),
        "--images_per_prompt", "2", "--steps", "2", "--height", "32", "--width", "32", "--device", "cpu",
        "--experiment_name", "real_eval",
    ]  # fmt: skip


def test_real_geneval_end_to_end_offline(workdir, assets, capsys):
    out = workdir / "flux_eval"
    main(
        [*flux_args(assets, out), "--detector_model", str(assets["detector"]), *assets["clip"], "--clip_score", "true"]
    )

    assert json.loads((out / "generation.json").read_text())["complete"] is True
    assert (out / "00003" / "metadata.jsonl").is_file() and (out / "00003" / "samples" / "0001.png").is_file()
    records = read_results_jsonl(out / "results.jsonl")
    assert len(records) == 8
    assert set(records[0]) == {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"}
    # The class head prefers "cup", so a cup is found and the colour check (CLIP) decides the colours prompt.
    for record in records:
        if record["tag"] == "colors":
            assert record["correct"] or record["reason"].startswith("expected red cup>=1, found ")
        details = json.loads(record["details"])
        assert all(len(box) == 5 for boxes in details.values() for box in boxes)

    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["tasks"]) == ["single_object", "colors", "counting", "position"]
    assert summary["detector"] == "geneval" and summary["images"] == 8
    assert set(summary["clip_score"]["tasks"]) == set(summary["tasks"])
    assert 0 <= summary["clip_score"]["clip_score"] <= 100
    assert summary["cost"]["params/activated"] == summary["cost"]["params/total"] > 0
    provenance = summary["provenance"]
    protocol = provenance["protocol"]
    assert protocol["prompts_sha256"] == hashlib.sha256(assets["prompts"].read_bytes()).hexdigest()
    assert (protocol["prompts_count"], protocol["images_per_prompt"], protocol["sampler.steps"]) == (4, 2, 2)
    assert (
        protocol["detector_weights_sha256"]
        == hashlib.sha256((assets["detector"] / "model.safetensors").read_bytes()).hexdigest()
    )
    assert protocol["colour_weights_sha256"] == hashlib.sha256(Path(assets["clip"][3]).read_bytes()).hexdigest()
    assert {"sampler.guidance", "sampler.shift", "sampler.height", "counting_threshold", "seed_rule"} <= set(protocol)
    assert provenance["sources"]["detector"] == str(assets["detector"]) and provenance["environment"]["device"] == "cpu"
    assert "Overall score (avg. over tasks)" in capsys.readouterr().out

    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("real_eval").experiment_id])
    metrics = run.data.metrics
    assert metrics["geneval/overall"] == pytest.approx(summary["overall"])
    assert {"geneval/colors", "clip_score", "clip_score/colors", "params/activated", "flops"} <= set(metrics)
    assert "latency/generate_s_per_image" in metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "geneval_tasks.md", "provenance.json"} <= artifacts
    assert run.data.tags["dense2moe.geneval_protocol_id"] == provenance["protocol_id"]
    if not all(r["correct"] for r in records):
        assert "worst_failures.png" in artifacts


def test_student_transformer_and_fidelity_to_reference(workdir, assets):
    """--transformer replaces the pipeline's; the same weights from the same seeds give the reference's images."""
    reference, out = workdir / "teacher", workdir / "student"
    main([*flux_args(assets, reference), "--detector", "none", "--log_mlflow", "false"])
    main([*flux_args(assets, out), "--transformer", str(assets["pipe"] / "transformer"), "--detector", "none",
          "--reference", str(reference)])  # fmt: skip
    name = "00001/samples/0001.png"
    assert np.array_equal(np.asarray(Image.open(out / name)), np.asarray(Image.open(reference / name)))
    fidelity = json.loads((out / "summary.json").read_text())["fidelity"]
    assert fidelity["psnr"] == 100.0 and fidelity["ssim"] == pytest.approx(1.0) and fidelity["pairs"] == 8
    assert not (out / "results.jsonl").exists()
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.search_runs([client.get_experiment_by_name("real_eval").experiment_id])[0]
    assert run.data.metrics["fidelity/psnr"] == 100.0 and run.data.params["transformer"].endswith("transformer")


@pytest.mark.parametrize("missing", ["detector", "clip"])
def test_missing_weights_fail_with_one_line_before_generating(workdir, assets, capsys, monkeypatch, missing):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = workdir / "no_weights"
    detector = str(workdir / "nonexistent_mask2former") if missing == "detector" else str(assets["detector"])
    clip = [*assets["clip"][:3], str(workdir / "nonexistent.pt")] if missing == "clip" else assets["clip"]
    with pytest.raises(SystemExit) as exc:
        main([*flux_args(assets, out), "--detector_model", detector, *clip])
    assert exc.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    if missing == "detector":
        assert "detector weights" in line and "nonexistent_mask2former" in line and "--detector_model" in line
    else:
        assert "CLIP weights" in line and "nonexistent.pt" in line and "--clip_pretrained" in line
    assert not out.exists()  # nothing generated, no results, no summary


def test_legacy_processor_config_with_only_a_short_side_still_loads(assets, tmp_path):
    """Older Mask2Former processor configs say "size": N; transformers 5 refuses that without a long side."""
    import shutil

    from evaluation.real_geneval import load_detector

    folder = shutil.copytree(assets["detector"], tmp_path / "legacy")
    config = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**config, "size": 48}))
    _, processor = load_detector(str(folder))
    pixels = processor(images=[np.zeros((200, 100, 3), dtype=np.uint8)], return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape[-2:]) == (96, 64)  # short side 100 → 48 (so 96 × 48), padded to multiples of 32


def geneval_summary_scores(lines: list[dict]) -> dict:
    """GenEval's summary_scores.py arithmetic, independently: groupby tag (file order), mean of correct per task,
    overall = mean of the task means; prompts = distinct metadata strings, a prompt is correct if any image is."""
    tags = []
    for line in lines:
        if line["tag"] not in tags:
            tags.append(line["tag"])
    tasks = {}
    for tag in tags:
        flags = [line["correct"] for line in lines if line["tag"] == tag]
        tasks[tag] = sum(flags) / len(flags)
    prompts = {line["metadata"] for line in lines}
    any_correct = [any(line["correct"] for line in lines if line["metadata"] == p) for p in prompts]
    return {
        "tasks": tasks,
        "overall": sum(tasks.values()) / len(tasks),
        "images": len(lines),
        "prompts": len(prompts),
        "correct_prompts": sum(any_correct) / len(prompts),
    }


def test_summary_matches_geneval_summary_scores(tmp_path):
    rng = np.random.default_rng(0)
    tags = ["position", "colors", "single_object", "colors", "counting", "position", "two_object", "color_attr"]
    lines = []
    for i in range(60):
        tag = tags[int(rng.integers(len(tags)))]
        metadata = json.dumps({"tag": tag, "prompt": f"p{i % 17}"})
        lines.append({"tag": tag, "metadata": metadata, "correct": bool(rng.random() < 0.4), "prompt": f"p{i % 17}"})
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    ours, reference = summarize(read_results_jsonl(path)), geneval_summary_scores(lines)
    assert list(ours["tasks"]) == list(reference["tasks"])  # tags in file order, as groupby(sort=False)
    assert ours["tasks"] == pytest.approx(reference["tasks"])
    assert ours["overall"] == pytest.approx(reference["overall"])
    assert (ours["images"], ours["prompts"]) == (reference["images"], reference["prompts"])
    assert ours["correct_prompts"] == pytest.approx(reference["correct_prompts"])


def test_colour_crop_is_genevals_mask_composite_over_999_then_pil_rounded_crop():
    from evaluation.real_geneval import ColorClassifier

    image_HW3 = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
    mask_HW = np.zeros((10, 12), dtype=bool)
    mask_HW[3:5, 4:7] = True
    crops = ColorClassifier(clip=None)
    # float32 box; PIL rounds half to even: 2.5 → 2, 1.5 → 2, 7.5 → 8, 6.5 → 6.
    crop = np.asarray(crops.crop(image_HW3, {"box": [2.5, 1.5, 7.5, 6.5], "score": 0.9, "mask": mask_HW}))
    assert crop.shape == (4, 6, 3)
    expected = np.where(mask_HW[..., None], image_HW3, np.uint8(153))[2:6, 2:8]
    assert np.array_equal(crop, expected)
    assert (crop[0] == 153).all() and np.array_equal(crop[1, 2:5], image_HW3[3, 4:7])
    # Without a mask the plain image is cropped.
    plain = np.asarray(crops.crop(image_HW3, {"box": [0.0, 0.0, 3.0, 2.0], "score": 0.9}))
    assert np.array_equal(plain, image_HW3[:2, :3])


def test_colours_are_classified_on_the_top_count_kept_detections_only():
    from evaluation.geneval import filter_detections
    from evaluation.real_geneval import ColorClassifier

    seen = []

    class Recorder(ColorClassifier):
        def classify(self, image_HW3, detections, cls):
            seen.append([d["score"] for d in detections])
            return ["red"] * len(detections)

    dets = [{"box": [0, 0, 2, 2], "score": s} for s in (0.5, 0.9, 0.2, 0.7)]
    md = {"tag": "color_attr", "include": [{"class": "cup", "count": 2, "color": "red"}, {"class": "dog", "count": 1}]}
    kept = filter_detections({"cup": dets}, "color_attr")
    Recorder(clip=None).attach(np.zeros((4, 4, 3), np.uint8), md, kept)
    assert seen == [[0.9, 0.7]]
    assert [d.get("color") for d in kept["cup"]] == ["red", "red", None]


def test_instances_come_in_genevals_vocabulary_order_and_the_detectors_order():
    from evaluation.real_geneval import GENEVAL_CLASSES, instances_to_detections

    labels = {0: "person", 1: "dog", 2: "cup"}
    masks_NHW = np.zeros((4, 6, 6), dtype=bool)
    for j in range(4):
        masks_NHW[j, j : j + 2, j : j + 2] = True
    segments = [{"label_id": 2, "score": 0.4}, {"label_id": 1, "score": 0.8}, {"label_id": 2, "score": 0.9},
                {"label_id": 0, "score": 0.6}]  # fmt: skip
    detections = instances_to_detections(segments, masks_NHW, labels)
    assert list(detections) == sorted(detections, key=GENEVAL_CLASSES.index) == ["person", "dog", "cup"]
    assert [d["score"] for d in detections["cup"]] == [0.4, 0.9]  # not re-sorted: GenEval's argsort ranks them
    assert detections["cup"][1]["box"] == [2.0, 2.0, 4.0, 4.0]
