"""GenEval with real models: Mask2Former instance segmentation (transformers) and CLIP zero-shot colours (open_clip).

What GenEval's ``evaluate_images.py`` (djghosh13/geneval) does, and this module reproduces around the shared rules
of ``evaluation/geneval.py``:

- detections: Mask2Former on COCO's 80 classes; each instance's box is its mask's bounding box (x2, y2 exclusive)
  and its score is class probability × mean mask probability; then per class: sort, score > 0.3 (> 0.9 for
  counting), at most 16, NMS off (``filter_detections``);
- colour, only where a clause asks for one and enough objects were found: each of the top-``count`` detections is
  composited over a #999 background through its instance mask (PIL ``Image.composite``), cropped with PIL's ``crop``
  of its float32 box (PIL rounds each coordinate half to even) and classified zero-shot among GenEval's 10 colours
  with its three templates (per colour: text embeddings normalised, averaged, renormalised; prediction: argmax of
  image · text);
- verdict and results.jsonl line: ``evaluate_detections`` and ``result_record``, as for the shapes world.

Differences from GenEval's mmdet setup are listed in evaluation/README.md. Legend: N instances or crops, H, W image
height and width, C colours, T templates, D embedding width.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from evaluation.clip_score import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED, OpenClip, load_open_clip
from evaluation.geneval import (
    COUNTING_THRESHOLD,
    GENEVAL_COLORS,
    MAX_OBJECTS,
    NMS_THRESHOLD,
    THRESHOLD,
    Detection,
    evaluate_detections,
    filter_detections,
)
from src.errors import UserError, short_reason
from src.hub import is_hub_id

DEFAULT_DETECTOR = "facebook/mask2former-swin-small-coco-instance"
GENEVAL_CLASSES = tuple(
    line.strip()
    for line in (Path(__file__).parent / "data" / "geneval" / "object_names.txt").read_text().splitlines()
    if line.strip()
)
BACKGROUND = (153, 153, 153)
"""GenEval's crop background, "#999"."""
COLOR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")
# COCO class names as other codebases spell them → GenEval's object_names.txt.
_ALIASES = {
    "mouse": "computer mouse",
    "remote": "tv remote",
    "keyboard": "computer keyboard",
    "tvmonitor": "tv",
    "tv monitor": "tv",
    "sofa": "couch",
    "pottedplant": "potted plant",
    "diningtable": "dining table",
    "motorbike": "motorcycle",
    "aeroplane": "airplane",
    "hair dryer": "hair drier",
    "doughnut": "donut",
}
_HOW_TO = (
    "pass --detector_model with a hub id or a local folder holding a Mask2FormerForUniversalSegmentation (COCO "
    "instance) saved with save_pretrained plus its preprocessor_config.json, or download "
    f"{DEFAULT_DETECTOR} once on a machine with network access (Hugging Face cache)"
)


def label_map(id2label: dict[int, str]) -> dict[int, str]:
    """Detector label id → GenEval class name.

    By name (lower case, "_"/"-" as spaces, COCO spelling variants); a model with exactly 80 labels whose names don't
    all match is taken to list COCO's classes in order, which is how GenEval maps mmdet's class indices.
    """
    by_name = {}
    for label_id, name in id2label.items():
        key = name.lower().replace("_", " ").replace("-", " ").strip()
        key = _ALIASES.get(key, key)
        if key in GENEVAL_CLASSES:
            by_name[int(label_id)] = key
    if set(by_name.values()) == set(GENEVAL_CLASSES):
        return by_name
    if len(id2label) == len(GENEVAL_CLASSES):
        return {int(label_id): GENEVAL_CLASSES[i] for i, label_id in enumerate(sorted(id2label, key=int))}
    missing = sorted(set(GENEVAL_CLASSES) - set(by_name.values()))
    raise UserError(
        f"detector labels do not cover GenEval's 80 COCO classes (missing {len(missing)}: {', '.join(missing[:6])}"
        f"{', ...' if len(missing) > 6 else ''}); use a COCO instance-segmentation Mask2Former"
    )


def mask_box(mask_HW: np.ndarray) -> list[float] | None:
    """Bounding box [x1, y1, x2, y2] of a binary mask, x2 and y2 exclusive (mmdet's mask2bbox); None when empty."""
    cols, rows = np.flatnonzero(mask_HW.any(0)), np.flatnonzero(mask_HW.any(1))
    if not len(cols):
        return None
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def instances_to_detections(
    segments: list[dict], masks_NHW: np.ndarray | torch.Tensor, labels: dict[int, str]
) -> dict[str, list[Detection]]:
    """Instances of ``post_process_instance_segmentation(..., return_binary_maps=True)`` → detections per class.

    ``segments[j]`` ({"label_id", "score"}) describes ``masks_NHW[j]``; labels outside GenEval's classes and empty
    masks are dropped (mmdet gives an empty mask a zero box and a zero score, which the threshold drops too).
    Classes come in GenEval's vocabulary order (the order of its per-class arrays and of results.jsonl's details);
    within a class, detections keep the detector's order, because GenEval's ``np.argsort`` ranks them from that
    order and ties depend on it.
    """
    if not segments:
        return {}
    if isinstance(masks_NHW, torch.Tensor):
        masks_NHW = masks_NHW.bool().cpu().numpy()
    assert len(masks_NHW) == len(segments), (len(masks_NHW), len(segments))
    detections: dict[str, list[Detection]] = {}
    for segment, mask_HW in zip(segments, masks_NHW):
        cls = labels.get(int(segment["label_id"]))
        box = mask_box(mask_HW)
        if cls is None or box is None:
            continue
        detections.setdefault(cls, []).append({"box": box, "score": float(segment["score"]), "mask": mask_HW})
    return {cls: detections[cls] for cls in GENEVAL_CLASSES if cls in detections}


def load_detector(name_or_path: str = DEFAULT_DETECTOR, device: str = "cpu"):
    """(Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor) from a local folder or a hub id."""
    from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor  # heavy: real GenEval only

    hub = is_hub_id(name_or_path)
    source = name_or_path if hub else str(Path(name_or_path).expanduser())
    if not hub and not Path(source).is_dir():
        raise UserError(f"detector weights {name_or_path!r}: no such folder; {_HOW_TO}")
    try:
        processor = Mask2FormerImageProcessor.from_pretrained(source)
        size = processor.size
        if size.shortest_edge and not size.longest_edge and not size.height:
            # Legacy configs give only a short side ("size": 384); transformers 5 needs a long side too. A huge one
            # keeps transformers 4's behaviour: short side resized to that value, aspect ratio kept.
            processor = Mask2FormerImageProcessor.from_pretrained(
                source, size={"shortest_edge": size.shortest_edge, "longest_edge": 1000 * size.shortest_edge}
            )
        model = Mask2FormerForUniversalSegmentation.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"detector weights {name_or_path!r} (Mask2Former, COCO instance segmentation) are not available here "
            f"({short_reason(exc)}); {_HOW_TO}"
        ) from None
    return model.eval().to(device), processor


class ColorClassifier:
    """GenEval's colour check: masked box crop over #999 → CLIP zero-shot over its 10 colours and 3 templates."""

    def __init__(
        self,
        clip: OpenClip,
        colors: tuple[str, ...] = GENEVAL_COLORS,
        templates: tuple[str, ...] = COLOR_TEMPLATES,
        background: tuple[int, int, int] = BACKGROUND,
    ) -> None:
        self.clip, self.colors, self.templates, self.background = clip, colors, templates, background
        self._text_CD: dict[str, torch.Tensor] = {}

    def text_embeddings(self, cls: str) -> torch.Tensor:
        """(C, D): per colour, the mean of its normalised template embeddings, renormalised (cached per class)."""
        if cls not in self._text_CD:
            texts = [t.format(c=c, cls=cls) for c in self.colors for t in self.templates]
            text_CTD = self.clip.encode_texts(texts).reshape(len(self.colors), len(self.templates), -1)
            self._text_CD[cls] = torch.nn.functional.normalize(text_CTD.mean(1), dim=-1)
        return self._text_CD[cls]

    def crop(self, image_HW3: np.ndarray, detection: Detection) -> Image.Image:
        """GenEval's ``ImageCrops``: the instance over a #999 canvas through its mask, then PIL's crop of the box."""
        image = Image.fromarray(image_HW3).convert("RGB")
        mask_HW = detection.get("mask")
        if mask_HW is not None:
            if tuple(mask_HW.shape) != image.size[::-1]:
                raise ValueError(f"mask shape {tuple(mask_HW.shape)} does not match image size {image.size[::-1]}")
            blank = Image.new("RGB", image.size, color=self.background)
            image = Image.composite(image, blank, Image.fromarray(np.asarray(mask_HW, dtype=bool)))
        # mmdet's box is a float32 row; PIL rounds it (half to even) to whole pixels, as in GenEval.
        return image.crop(tuple(float(v) for v in np.asarray(detection["box"][:4], dtype=np.float32)))

    def classify(self, image_HW3: np.ndarray, detections: list[Detection], cls: str) -> list[str]:
        """The colour of each detection of class ``cls``."""
        if not detections:
            return []
        image_ND = self.clip.encode_images([self.crop(image_HW3, d) for d in detections])
        best_N = (image_ND @ self.text_embeddings(cls).to(image_ND.device).T).argmax(-1)
        return [self.colors[i] for i in best_N.tolist()]

    def attach(self, image_HW3: np.ndarray, metadata: dict, detections: dict[str, list[Detection]]) -> None:
        """Set "color" on the detections a colour clause will look at (GenEval classifies only those)."""
        for clause in metadata.get("include", []):
            if "color" not in clause:
                continue
            found = detections.get(clause["class"], [])[: clause["count"]]
            if len(found) == clause["count"]:
                for detection, color in zip(found, self.classify(image_HW3, found, clause["class"])):
                    detection["color"] = color


class GenEvalScorer:
    """Mask2Former detections → GenEval filtering → CLIP colours → GenEval verdict, for batches of images."""

    def __init__(
        self,
        model: torch.nn.Module,
        processor,
        clip: OpenClip,
        threshold: float = THRESHOLD,
        counting_threshold: float = COUNTING_THRESHOLD,
        max_objects: int = MAX_OBJECTS,
        nms_iou: float = NMS_THRESHOLD,
    ) -> None:
        self.model, self.processor = model, processor
        self.labels = label_map(model.config.id2label)
        self.colors = ColorClassifier(clip)
        self.filter = {
            "threshold": threshold,
            "counting_threshold": counting_threshold,
            "max_objects": max_objects,
            "nms_iou": nms_iou,
        }

    @classmethod
    def load(
        cls,
        detector: str = DEFAULT_DETECTOR,
        clip_model: str = DEFAULT_CLIP_MODEL,
        clip_pretrained: str = DEFAULT_CLIP_PRETRAINED,
        clip: OpenClip | None = None,
        device: str = "cpu",
    ) -> GenEvalScorer:
        """Detector from a hub id or folder, CLIP from open_clip (or an already loaded ``clip``)."""
        model, processor = load_detector(detector, device)
        return cls(model, processor, clip or load_open_clip(clip_model, clip_pretrained, device))

    def to(self, device: str | torch.device) -> GenEvalScorer:
        self.model.to(device)
        self.colors.clip.to(device)
        self.colors._text_CD.clear()
        return self

    @torch.no_grad()
    def detect(self, images: list[np.ndarray]) -> list[dict[str, list[Detection]]]:
        """Raw detections (with masks) per image, before GenEval's per-task filtering."""
        device = next(self.model.parameters()).device
        inputs = self.processor(images=list(images), return_tensors="pt").to(device)
        outputs = self.model(**inputs)
        results = self.processor.post_process_instance_segmentation(
            outputs,
            threshold=min(self.filter["threshold"], self.filter["counting_threshold"]),
            target_sizes=[im.shape[:2] for im in images],
            return_binary_maps=True,
        )
        return [instances_to_detections(r["segments_info"], r["segmentation"], self.labels) for r in results]

    def __call__(self, images: list[np.ndarray], metadata: list[dict]) -> list[tuple[bool, str, dict]]:
        """(correct, reason, kept detections) per image."""
        verdicts = []
        for image, meta, raw in zip(images, metadata, self.detect(images)):
            kept = filter_detections(raw, meta["tag"], **self.filter)
            self.colors.attach(image, meta, kept)
            correct, reason = evaluate_detections(meta, kept)
            verdicts.append((correct, reason, kept))
        return verdicts
