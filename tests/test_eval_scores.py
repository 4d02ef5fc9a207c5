"""Scorers with fixed fake outputs: detector → GenEval mapping, CLIP colour classifier, CLIP score, fidelity."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from evaluation import fidelity as fidelity_module
from evaluation.clip_score import clip_score_summary, clip_scores
from evaluation.fidelity import check_reference, fidelity
from evaluation.geneval import GENEVAL_COLORS
from evaluation.real_geneval import (
    BACKGROUND,
    GENEVAL_CLASSES,
    ColorClassifier,
    GenEvalScorer,
    instances_to_detections,
    label_map,
    mask_box,
)
from src.errors import UserError

PURE = dict(zip(GENEVAL_COLORS, [(255, 0, 0), (255, 128, 0), (255, 255, 0), (0, 200, 0), (0, 0, 255),
                                 (128, 0, 128), (255, 150, 200), (120, 70, 20), (0, 0, 0), (255, 255, 255)]))  # fmt: skip
CUP = GENEVAL_CLASSES.index("cup")


class FakeClip:
    """Texts embed as the one-hot of the colour they name; images as their pixel counts per pure colour."""

    def __init__(self):
        self.texts, self.crops = [], []

    def encode_texts(self, texts):
        self.texts += texts
        out = torch.zeros(len(texts), len(GENEVAL_COLORS))
        for i, text in enumerate(texts):
            out[i, next(j for j, c in enumerate(GENEVAL_COLORS) if f" {c} " in text or f" {c}-" in text)] = 1
        return out

    def encode_images(self, crops):
        self.crops += crops
        counts = [[(np.asarray(c) == rgb).all(-1).sum() for rgb in PURE.values()] for c in crops]
        return nn.functional.normalize(torch.tensor(counts, dtype=torch.float32) + 1e-3, dim=-1)


def test_colour_classifier_uses_the_instance_mask_over_grey_and_geneval_templates():
    image = np.full((40, 40, 3), (10, 200, 60), dtype=np.uint8)
    image[5:15, 5:15] = PURE["red"]
    image[5:15, 15:35] = PURE["blue"]  # inside the box, twice the red area, but outside the mask
    mask = np.zeros((40, 40), dtype=bool)
    mask[5:15, 5:15] = True
    clip = FakeClip()
    classifier = ColorClassifier(clip)
    box = [5.0, 5.0, 35.0, 15.0]
    assert classifier.classify(image, [{"box": box, "mask": mask}, {"box": box, "mask": None}], "cup") == [
        "red",
        "blue",
    ]
    crop = np.asarray(clip.crops[0])
    assert crop.shape == (10, 30, 3) and tuple(crop[0, -1]) == BACKGROUND
    assert len(clip.texts) == 30 and {
        "a photo of a red cup",
        "a photo of a red-colored cup",
        "a photo of a red object",
    } <= set(clip.texts)
    assert torch.allclose(classifier.text_embeddings("cup").norm(dim=-1), torch.ones(10))


def test_colours_are_attached_only_where_a_colour_clause_looks():
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    one = {"box": [0.0, 0.0, 4.0, 4.0], "mask": None}
    two = {"box": [4.0, 4.0, 8.0, 8.0], "mask": None}
    clip = FakeClip()
    classifier = ColorClassifier(clip)
    detections = {"cup": [one, two], "dog": [{"box": [0.0, 0.0, 2.0, 2.0]}]}
    classifier.attach(image, {"include": [{"class": "cup", "count": 1, "color": "black"}]}, detections)
    assert one["color"] == "black" and "color" not in two and "color" not in detections["dog"][0]
    clip.crops.clear()
    classifier.attach(image, {"include": [{"class": "dog", "count": 2, "color": "red"}]}, detections)
    assert clip.crops == []  # too few dogs: GenEval never classifies them


def test_label_map_handles_coco_spellings_generic_labels_and_refuses_other_datasets():
    coco = {i: {"computer mouse": "mouse", "tv remote": "remote"}.get(n, n) for i, n in enumerate(GENEVAL_CLASSES)}
    mapped = label_map(coco)
    assert mapped[GENEVAL_CLASSES.index("computer mouse")] == "computer mouse" and len(set(mapped.values())) == 80
    assert label_map({i: f"LABEL_{i}" for i in range(80)})[3] == GENEVAL_CLASSES[3]
    with pytest.raises(UserError, match="do not cover GenEval's 80 COCO classes"):
        label_map({0: "wall", 1: "floor", 2: "person"})


def test_mask_boxes_are_exclusive_like_mmdet():
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:6, 3:9] = True
    assert mask_box(mask) == [3.0, 2.0, 9.0, 6.0]
    assert mask_box(np.zeros((4, 4), dtype=bool)) is None
    segments = [{"label_id": CUP, "score": 0.4}, {"label_id": CUP, "score": 0.8}, {"label_id": 999, "score": 0.9}]
    detections = instances_to_detections(segments, np.stack([mask, mask, mask]), {CUP: "cup"})
    # The detector's order is kept: GenEval's argsort ranks a class's detections (filter_detections), ties included.
    assert list(detections) == ["cup"] and [d["score"] for d in detections["cup"]] == [0.4, 0.8]


class FakeMask2Former(nn.Module):
    """Fixed outputs: two confident cup queries (left column block, bottom-right block) and a no-object query."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(id2label=dict(enumerate(GENEVAL_CLASSES)))

    def forward(self, pixel_values, **_):
        batch = len(pixel_values)
        classes = torch.full((batch, 3, 81), -10.0)
        classes[:, 0, CUP] = classes[:, 1, CUP] = classes[:, 2, 80] = 10.0
        masks = torch.full((batch, 3, 16, 16), -10.0)
        masks[:, 0, :8, :4] = 10.0
        masks[:, 1, 8:, 8:] = 10.0
        return SimpleNamespace(class_queries_logits=classes, masks_queries_logits=masks)


def test_detector_outputs_flow_through_hf_postprocessing_into_geneval_rules():
    from transformers import Mask2FormerImageProcessor

    scorer = GenEvalScorer(FakeMask2Former(), Mask2FormerImageProcessor(size={"height": 64, "width": 64}), FakeClip())
    image = np.full((32, 32, 3), 90, dtype=np.uint8)
    image[:16, :8] = PURE["red"]  # the first cup's mask region
    two_cups = {"tag": "counting", "include": [{"class": "cup", "count": 2}], "exclude": [{"class": "cup", "count": 3}]}
    red_cup = {"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "red"}]}
    blue_cup = {"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "blue"}]}
    three = {"tag": "counting", "include": [{"class": "cup", "count": 3}], "exclude": [{"class": "cup", "count": 4}]}
    verdicts = scorer([image] * 4, [two_cups, red_cup, blue_cup, three])
    assert [v[0] for v in verdicts] == [True, True, False, False]
    assert verdicts[2][1] == "expected blue cup>=1, found 0 blue; and 1 red"
    assert verdicts[3][1] == "expected cup>=3, found 2"
    boxes = sorted(d["box"] for d in verdicts[0][2]["cup"])
    np.testing.assert_allclose(boxes, [[0, 0, 8, 16], [16, 16, 32, 32]], atol=1)


def test_clip_score_is_100_times_clamped_cosine_and_averages_per_task():
    clip = SimpleNamespace(
        encode_images=lambda ims: torch.tensor([[1.0, 0.0]] * len(ims)),
        encode_texts=lambda texts: torch.tensor([[0.6, 0.8], [-0.6, 0.8], [1.0, 0.0]]),
    )
    images = [np.zeros((4, 4, 3), dtype=np.uint8)] * 3
    np.testing.assert_allclose(clip_scores(clip, images, ["a", "b", "c"]), [60.0, 0.0, 100.0], atol=1e-5)
    summary = clip_score_summary([("colors", 60.0), ("colors", 0.0), ("counting", 100.0)])
    assert summary["clip_score"] == pytest.approx(160 / 3) and summary["tasks"] == {"colors": 30.0, "counting": 100.0}


def test_tiny_open_clip_loads_from_a_config_file_and_checkpoint(tmp_path):
    import open_clip

    from evaluation.clip_score import load_open_clip

    config = {"embed_dim": 8, "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "patch_size": 8, "head_width": 8},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 8, "heads": 1, "layers": 1}}  # fmt: skip
    (tmp_path / "clip-eval-tiny.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "clip-eval-tiny.json")
    torch.manual_seed(1)
    reference = open_clip.create_model("clip-eval-tiny")
    torch.save(reference.state_dict(), tmp_path / "w.pt")
    clip = load_open_clip(str(tmp_path / "clip-eval-tiny.json"), str(tmp_path / "w.pt"))
    assert torch.equal(clip.model.text_projection, reference.text_projection)
    assert torch.allclose(clip.encode_texts(["a red cup"]).norm(dim=-1), torch.ones(1))
    with pytest.raises(UserError, match="not an open_clip architecture"):
        load_open_clip("no-such-architecture", "openai")


def noisy_pair(offset: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.random.default_rng(0).integers(40, 200, (2, 24, 24, 3)).astype(np.uint8)
    return a, (a.astype(int) + offset).astype(np.uint8)


def test_fidelity_psnr_ssim_and_lpips_skip(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    fidelity_module._noted.clear()
    a, b = noisy_pair(10)
    result = fidelity(a, b)
    assert result["psnr"] == pytest.approx(20 * np.log10(255 / 10), abs=1e-3)
    assert 0 < result["ssim"] < 1 and result["pairs"] == 2 and "lpips" not in result
    assert capsys.readouterr().err.strip().startswith("note: LPIPS skipped")
    same = fidelity(a, a)
    assert same["psnr"] == fidelity_module.PSNR_CAP and same["ssim"] == pytest.approx(1.0)
    # Per-pair PSNR averaged (not the PSNR of the pooled error).
    mixed = fidelity(np.concatenate([a[:1], a[:1]]), np.concatenate([b[:1], noisy_pair(20)[1][:1]]))
    assert mixed["psnr"] == pytest.approx((20 * np.log10(255 / 10) + 20 * np.log10(255 / 20)) / 2, abs=1e-3)
    with pytest.raises(ValueError, match="must be"):
        fidelity(a.astype(np.float32), b)


def test_fidelity_lpips_with_local_backbone_weights(monkeypatch, tmp_path):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = fidelity_module.lpips_weights_file("squeeze")
    weights.parent.mkdir(parents=True)
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), weights)
    a, b = noisy_pair(30)
    assert fidelity(a, a, lpips_net="squeeze")["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert fidelity(a, b, lpips_net="squeeze")["lpips"] > 0


def test_reference_must_share_prompts_and_seed(tmp_path):
    (tmp_path / "00000").mkdir()
    (tmp_path / "00000" / "metadata.jsonl").write_text(json.dumps({"prompt": "a cat"}) + "\n")
    (tmp_path / "generation.json").write_text(json.dumps({"complete": True, "seed": 1, "images_per_prompt": 4}))
    assert check_reference(tmp_path, [{"prompt": "a cat"}], seed=1, images_per_prompt=4) == tmp_path
    with pytest.raises(UserError, match="same seed"):
        check_reference(tmp_path, [{"prompt": "a cat"}], seed=0, images_per_prompt=4)
    with pytest.raises(UserError, match="prompt 0 differs"):
        check_reference(tmp_path, [{"prompt": "a dog"}], seed=1, images_per_prompt=4)
